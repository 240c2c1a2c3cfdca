"""medpeft bench: lm-evaluation-harness over local task files, for the base and every method's output; medpeft's
own letter scoring picks what lm-eval picks; the errors a user meets."""

import json
import random

import pytest
import torch

from medpeft.bench import run_bench
from medpeft.cli import run
from medpeft.config import BenchConfig, PrepareConfig
from medpeft.data import prepare
from medpeft.harness import letter_picks
from medpeft.modeling import load_model, load_tokenizer
from medpeft.outputs import load_trained

from conftest import build_model_dir, train_tiny, write_jsonl

pytestmark = pytest.mark.filterwarnings("ignore")


def medqa_rows(n, seed=0):
    rng = random.Random(seed)
    return [{"question": f"Which drug is first line for condition {i}?",
             "options": {k: f"drug {k.lower()}{i} {rng.choice(['tablets', 'infusion', 'cream'])}" for k in "ABCD"},
             "answer_idx": rng.choice("ABCD")} for i in range(n)]


def pubmedqa_rows(n, seed=1):
    rng = random.Random(seed)
    return [{"QUESTION": f"Does treatment {i} lower blood pressure?",
             "CONTEXTS": [f"In a trial of {20 + i} adults, treatment {i} was compared with placebo for 12 weeks."],
             "final_decision": rng.choice(["yes", "no", "maybe"])} for i in range(n)]


def general_rows(n):
    return [{"question": f"What is {i} + {i + 3}?", "options": {"A": str(2 * i + 3), "B": str(2 * i + 5),
                                                                "C": str(i), "D": str(3 * i)},
             "answer_idx": "A"} for i in range(n)]


@pytest.fixture(scope="module")
def local(tmp_path_factory):
    d = tmp_path_factory.mktemp("bench-data")
    write_jsonl(d / "medqa_test.jsonl", medqa_rows(20))
    write_jsonl(d / "pubmedqa_test.jsonl", pubmedqa_rows(20))
    write_jsonl(d / "general_test.jsonl", general_rows(12))
    return d


@pytest.fixture(scope="module")
def outputs(tiny_model, processed, tmp_path_factory):
    root = tmp_path_factory.mktemp("bench-outputs")
    return {"qlora": train_tiny(tiny_model, processed, root / "qlora", "qlora", dict(lora_r=4, lora_alpha=8),
                                load_in_4bit=True),
            "adapter": train_tiny(tiny_model, processed, root / "adapter", "adapter", dict(adapter_size=8)),
            "ptuning": train_tiny(tiny_model, processed, root / "ptuning", "ptuning", dict(num_virtual_tokens=4))}


@pytest.fixture(scope="module")
def benched(tiny_model, outputs, local, tmp_path_factory):
    out = tmp_path_factory.mktemp("bench-out") / "evaluation_results.json"
    cfg = BenchConfig(base_model=tiny_model, qlora_model=outputs["qlora"], adapter_model=outputs["adapter"],
                      ptuning_model=outputs["ptuning"], tasks="medqa_local,pubmedqa_local",
                      general_tasks="general_local", data_dir=str(local), output_file=str(out), batch_size=4,
                      dtype="float32")  # the agreement test below compares picks: no bf16 rounding near ties
    return run_bench(cfg, log=lambda *a: None), out


def test_bench_scores_every_model_on_every_local_task_with_paired_intervals(benched):
    results, path = benched
    bench = json.loads(path.read_text())["bench"]
    assert bench["tasks"] == ["medqa_local", "pubmedqa_local"] and bench["general"] == ["general_local"]
    assert set(bench["models"]) == {"base", "qlora", "adapter", "ptuning"}
    for name, tasks in bench["models"].items():
        assert "_error" not in tasks, tasks
        for task, n in (("medqa_local", 20), ("pubmedqa_local", 20), ("general_local", 12)):
            r = tasks[task]
            assert r["items"] == n and len(r["hits"]) == n and 0 <= r["acc"] <= 1 and r["acc_stderr"] > 0
            assert r["acc"] == pytest.approx(sum(r["hits"].values()) / n)
            assert 1 / 4 <= r["majority_acc"] <= 1  # the most frequent right answer's share
            if name != "base":
                lo, hi = r["gain_vs_base_ci"]
                assert lo <= r["gain_vs_base"] <= hi
                assert r["significant"] == (lo > 0 or hi < 0)


def test_bench_report_has_the_medical_and_the_forgetting_sections(benched):
    from medpeft.report import write_report

    results, path = benched
    md, _ = write_report(results, path.parent)
    text = md.read_text()
    assert "## Standard benchmarks (lm-evaluation-harness)" in text
    medical, forgetting = text.split("Forgetting check: general tasks:")
    assert "| medqa_local | 20 |" in medical and "| pubmedqa_local | 20 |" in medical
    assert "| general_local | 12 |" in forgetting and "general_local" not in medical


def _other(row):
    """Another item of the same layout (a different question)."""
    key = "question" if "question" in row else "QUESTION"
    return row | {key: "In adults, " + row[key]}


def _test_records(tmp_path, tiny_model, rows):
    """The same items prepared by medpeft (as its test split)."""
    tmp_path.mkdir(parents=True, exist_ok=True)
    data = write_jsonl(tmp_path / "in.jsonl", [r | {"split": "test"} for r in rows]
                       + [_other(r) | {"split": "train"} for r in rows[:3]]
                       + [_other(r) | {"split": "validation"} for r in rows[3:5]])
    prepare(PrepareConfig(input_data=str(data), output_dir=str(tmp_path / "p"), model_name=tiny_model),
            log=lambda *a: None)
    return json.loads((tmp_path / "p" / "test.json").read_text())


@pytest.mark.parametrize("name", ["base", "qlora", "adapter", "ptuning"])
def test_letter_scoring_picks_what_lm_eval_picks(benched, outputs, tiny_model, tmp_path, name):
    """medpeft evaluate's letter scoring and lm-eval's run of the local tasks choose the same option on every
    item, for the base and for each method (P-Tuning's virtual tokens included)."""
    results, _ = benched
    if name == "base":
        model, tokenizer = load_model(tiny_model, dtype=torch.float32), load_tokenizer(tiny_model)
    else:
        model, tokenizer, _ = load_trained(outputs[name], dequantize=True, dtype="float32")
    for task, rows in (("medqa_local", medqa_rows(20)), ("pubmedqa_local", pubmedqa_rows(20))):
        records = _test_records(tmp_path / task, tiny_model, rows)
        assert len(records) == 20
        ours = letter_picks(model, tokenizer, records)
        theirs = results["bench"]["models"][name][task]["picks"]
        assert ours == ["ABCD"[theirs[str(i)]] for i in range(20)], task
        if task == "medqa_local":  # options of different texts: the random model does not pick one letter only
            assert len(set(ours)) > 1


def test_unknown_task_lists_near_matches(tiny_model, local, capsys):
    code = run(["bench", "--base_model", tiny_model, "--tasks", "medqa_locl", "--data_dir", str(local)])
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1
    assert "unknown task(s): medqa_locl (did you mean medqa_local" in err


def test_local_task_without_its_file_names_the_file(tiny_model, tmp_path, capsys):
    code = run(["bench", "--base_model", tiny_model, "--tasks", "pubmedqa_local", "--data_dir", str(tmp_path)])
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1 and f"{tmp_path}/pubmedqa_test.jsonl" in err


def test_hub_task_offline_names_the_local_task_and_file(tiny_model, monkeypatch, capsys):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    code = run(["bench", "--base_model", tiny_model, "--tasks", "pubmedqa"])
    err = capsys.readouterr().err.strip()
    assert code == 2 and "cannot be reached" in err and "pubmedqa_local reading pubmedqa_test.jsonl" in err


def test_an_output_of_another_base_is_refused(outputs, local, tmp_path, capsys):
    from transformers import AutoConfig

    other = build_model_dir(tmp_path / "other")
    config = AutoConfig.from_pretrained(other)
    config.num_hidden_layers = 3  # another shape: the check reads the configuration before any weights load
    config.save_pretrained(other)
    code = run(["bench", "--base_model", str(other), "--qlora_model", outputs["qlora"], "--tasks", "medqa_local",
                "--data_dir", str(local)])
    err = capsys.readouterr().err.strip()
    assert code == 2 and "was trained on base model" in err and "num_hidden_layers" in err


@pytest.mark.parametrize("content", ['{"question": "What is fever?", "answer": "A rise in temperature."}\n',
                                     '{"question": "Which?", "options": {"A": "x"}, "answer_idx": "A"}\n', "\x00\xff"])
def test_a_local_file_without_a_multiple_choice_item_is_refused_in_one_line(tiny_model, tmp_path, capsys, content):
    (tmp_path / "medqa_test.jsonl").write_text(content)
    code = run(["bench", "--base_model", tiny_model, "--tasks", "medqa_local", "--data_dir", str(tmp_path)])
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1 and "medqa_test.jsonl" in err, err
