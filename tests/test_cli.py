"""The command line: bad input ends with one line on stderr and exit code 2, and leaves no output behind."""

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import qa_rows, write_jsonl
from medpeft.cli import run

ROOT = Path(__file__).resolve().parents[1]


def prepare_argv(input_data, out, model, *extra):
    return ["--input_data", str(input_data), "--output_dir", str(out), "--model_name", model, *extra]


def assert_clean_failure(capsys, code, out_dir, *needles):
    err = capsys.readouterr().err.strip()
    assert code == 2
    assert len(err.splitlines()) == 1, err
    assert err.startswith("error: ") and "Traceback" not in err
    for needle in needles:
        assert needle in err, err
    assert not Path(out_dir).exists(), "a failed run left an output directory"
    leftovers = [p for p in Path(out_dir).parent.iterdir() if p.name.startswith(f".{Path(out_dir).name}")]
    assert not leftovers, leftovers


def test_seed_prepare_command_runs_as_a_script(tmp_path, tiny_model, qa_file):
    """The seed's exact command line, as a subprocess."""
    out = tmp_path / "processed_data"
    proc = subprocess.run([sys.executable, "utils/prepare_dataset.py", "--input_data", str(qa_file), "--output_dir",
                           str(out), "--model_name", tiny_model, "--max_length", "512", "--train_size", "0.8"],
                          cwd=ROOT, capture_output=True, text=True, env=dict(os.environ, HF_HUB_OFFLINE="1"))
    assert proc.returncode == 0, proc.stderr
    assert "splits: train 32, validation 4, test 4" in proc.stdout
    assert {p.name for p in out.iterdir()} == {"train.json", "validation.json", "test.json", "metadata.json"}


def test_bad_input_in_a_subprocess_has_no_traceback(tmp_path, tiny_model):
    proc = subprocess.run([sys.executable, "utils/prepare_dataset.py", "--input_data", str(tmp_path / "nope.csv"),
                           "--output_dir", str(tmp_path / "out"), "--model_name", tiny_model],
                          cwd=ROOT, capture_output=True, text=True)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [
        f"error: --input_data: '{tmp_path / 'nope.csv'}' does not exist; give a data file, a folder, "
        "or a hub dataset id (owner/name)"]


@pytest.mark.parametrize("name,content,needles", [
    ("empty.csv", "", ["empty.csv", "empty"]),
    ("data.xml", "<a/>", ["unknown format '.xml'", "supported"]),
    ("cols.csv", "foo,bar\n1,2\n", ["could not find question and answer columns among: foo, bar",
                                   "--question_column"]),
    ("bad.jsonl", '{"question": "a?", "answer": "b"}\n{"question": "c?", "answer": \n',
     ["bad.jsonl: line 2 is not valid JSON"]),
    ("array.json", '[\n{"question": "a?", "answer": "b"},\n{"question": "c?" "answer": "d"}\n]',
     ["array.json: invalid JSON at line 3"]),
    ("latin1.csv", "question,answer\n\"Qu\xe9?\",\"Oui\"\n".encode("latin-1"), ["not UTF-8", "re-save the file as UTF-8"]),
    ("blank.csv", "question,answer\n\"\",\"\"\n\" \",\"x\"\n\"y\",\"\"\n", ["no usable rows", "empty question",
                                                                           "empty answer"]),
    ("dupes.csv", "question,answer,answer\nq,a,b\n", ["duplicate column names ['answer']"]),
])
def test_bad_data_files(tmp_path, tiny_model, capsys, name, content, needles):
    path = tmp_path / name
    path.write_bytes(content if isinstance(content, bytes) else content.encode())
    out = tmp_path / "out"
    code = run(["prepare", *prepare_argv(path, out, tiny_model)])
    assert_clean_failure(capsys, code, out, *needles)


@pytest.mark.parametrize("flags,needles", [
    (["--train_size", "1.5"], ["--train_size must be between 0 and 1 (exclusive), got 1.5"]),
    (["--train_size", "0", "--max_length", "4"], ["2 problems", "--train_size", "--max_length must be at least 16"]),
    (["--train_size", "abc"], ["argument --train_size: invalid"]),
    (["--schema", "xml"], ["invalid choice: 'xml'"]),
])
def test_bad_flags_are_all_reported(tmp_path, tiny_model, qa_file, capsys, flags, needles):
    out = tmp_path / "out"
    code = run(["prepare", *prepare_argv(qa_file, out, tiny_model, *flags)])
    assert_clean_failure(capsys, code, out, *needles)


def test_unknown_model_fails_fast_naming_alternatives(tmp_path, qa_file, capsys):
    out = tmp_path / "out"
    code = run(["prepare", *prepare_argv(qa_file, out, "someone/unknown-model-7b")])
    assert_clean_failure(capsys, code, out, "not in the local Hugging Face cache", "smollm2-135m", "local model dir")


def test_missing_group_column(tmp_path, tiny_model, qa_file, capsys):
    out = tmp_path / "out"
    code = run(["prepare", *prepare_argv(qa_file, out, tiny_model, "--group_by", "topic")])
    assert_clean_failure(capsys, code, out, "--group_by: column 'topic' not found")


def test_output_dir_that_is_not_ours_is_not_clobbered(tmp_path, tiny_model, qa_file, capsys):
    out = tmp_path / "mine"
    out.mkdir()
    (out / "precious.txt").write_text("keep me")
    code = run(["prepare", *prepare_argv(qa_file, out, tiny_model)])
    assert code == 2 and "is not a medpeft output" in capsys.readouterr().err
    assert (out / "precious.txt").read_text() == "keep me"


def test_rerun_replaces_a_previous_output(tmp_path, tiny_model, capsys):
    out = tmp_path / "out"
    assert run(["prepare", *prepare_argv(write_jsonl(tmp_path / "a.jsonl", qa_rows(20)), out, tiny_model)]) == 0
    assert run(["prepare", *prepare_argv(write_jsonl(tmp_path / "b.jsonl", qa_rows(30)), out, tiny_model)]) == 0
    assert json.loads((out / "metadata.json").read_text())["rows"]["kept"] == 30


def test_yaml_config_with_flag_override(tmp_path, tiny_model, qa_file):
    cfg = tmp_path / "prep.yaml"
    cfg.write_text(f"input_data: {qa_file}\nmodel_name: {tiny_model}\ntrain_size: 0.5\nmax_length: 128\n")
    out = tmp_path / "out"
    assert run(["prepare", "--config", str(cfg), "--output_dir", str(out), "--train_size", "0.75"]) == 0
    meta = json.loads((out / "metadata.json").read_text())
    assert meta["split"]["train_size"] == 0.75 and meta["max_length"] == 128 and meta["counts"]["train"] == 30


def test_yaml_config_problems_are_listed(tmp_path, capsys):
    cfg = tmp_path / "bad.yaml"
    cfg.write_text("lora_rank: 8\nlearning_rate: fast\n")
    code = run(["train", "--method", "qlora", "--config", str(cfg)])
    err = capsys.readouterr().err
    assert code == 2 and "2 problems" in err
    assert "unknown setting 'lora_rank'" in err and "lora_r" in err and "learning_rate" in err


def test_train_on_missing_data_and_unknown_method(tmp_path, tiny_model, capsys):
    code = run(["train", "--method", "qlora", "--model_name", tiny_model, "--data_path", str(tmp_path / "none"),
                "--output_dir", str(tmp_path / "m")])
    assert_clean_failure(capsys, code, tmp_path / "m", "is not a processed dataset", "prepare_dataset.py")
    assert run(["train", "--method", "lora2"]) == 2
    assert "unknown method 'lora2'; known methods: qlora, adapter, ptuning" in capsys.readouterr().err


def test_seed_qlora_command_trains(tmp_path, tiny_model, processed, capsys):
    out = tmp_path / "models" / "qlora"
    code = run(["--model_name", tiny_model, "--data_path", processed, "--output_dir", str(out), "--num_epochs", "3",
                "--learning_rate", "2e-4", "--batch_size", "8", "--lora_r", "16", "--lora_alpha", "32",
                "--max_steps", "2", "--max_eval_samples", "8", "--logging_steps", "1"], prog="qlora/train_qlora.py",
               command="train", method="qlora")
    assert code == 0
    captured = capsys.readouterr()
    assert "qlora: validation loss" in captured.out
    settings = json.loads((out / "medpeft_config.json").read_text())["settings"]
    assert settings["load_in_4bit"] is True and settings["lora_r"] == 16 and settings["learning_rate"] == 2e-4
    # one readable line per log, not a dict
    lines = [ln for ln in (captured.out + captured.err).splitlines() if ln.startswith("step 2/2 | epoch")]
    assert len(lines) == 1 and " | loss " in lines[0] and " | lr " in lines[0] and "tokens/s" in lines[0], lines
    assert "{'loss'" not in captured.out + captured.err

    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(out / "logs"))
    events.Reload()
    tags = set(events.Tags()["scalars"])
    assert {"train/loss", "train/learning_rate", "train/grad_norm", "eval/answer_loss"} <= tags, tags
    assert [e.step for e in events.Scalars("train/loss")] == [1, 2]
    metrics = json.loads((out / "metrics.json").read_text())
    validation = [(e.step, e.value) for e in events.Scalars("eval/answer_loss")]  # float32 in the event file
    assert [step for step, _ in validation] == [0, 2]
    assert validation[0][1] == pytest.approx(metrics["validation_loss_base"], abs=1e-5)
    assert validation[1][1] == pytest.approx(metrics["validation_loss_final"], abs=1e-5)


def test_logging_and_upload_refusals(tmp_path, tiny_model, processed, capsys, monkeypatch):
    base = ["train", "--method", "qlora", "--no-load_in_4bit", "--model_name", tiny_model, "--data_path", processed, "--max_steps", "1",
            "--max_eval_samples", "4"]
    code = run([*base, "--output_dir", str(tmp_path / "a"), "--report_to", "tensorboard,mlflow"])
    assert_clean_failure(capsys, code, tmp_path / "a", "--report_to must be tensorboard, wandb")
    if importlib.util.find_spec("wandb") is None:
        code = run([*base, "--output_dir", str(tmp_path / "b"), "--report_to", "wandb"])
        assert_clean_failure(capsys, code, tmp_path / "b", "the wandb package is not installed", "pip install wandb")
    monkeypatch.delenv("HF_TOKEN", raising=False)
    code = run([*base, "--output_dir", str(tmp_path / "c"), "--push_to_hub", "someone/med-lora", "--report_to", "none"])
    assert_clean_failure(capsys, code, tmp_path / "c", "--push_to_hub someone/med-lora: set HF_TOKEN")
    code = run([*base, "--output_dir", str(tmp_path / "d"), "--report_to", "none"])
    assert code == 0 and (tmp_path / "d" / "adapter_model.safetensors").is_file()
    assert not (tmp_path / "d" / "logs").exists()


def test_push_to_hub_uploads_the_output_with_the_environment_token(tmp_path, monkeypatch, capsys):
    import huggingface_hub

    from medpeft.errors import UsageError
    from medpeft.export import push_to_hub

    token = "hf_" + "x" * 34
    calls = []

    class FakeApi:
        def __init__(self, token):
            calls.append(("token", token))

        def create_repo(self, repo_id, private, exist_ok):
            calls.append(("create", repo_id, private))

        def upload_folder(self, folder_path, repo_id, commit_message):
            calls.append(("upload", folder_path, repo_id))
            if repo_id.endswith("denied"):
                raise RuntimeError(f"403 Forbidden for token {token}")

    monkeypatch.setattr(huggingface_hub, "HfApi", FakeApi)
    monkeypatch.setenv("HF_TOKEN", token)
    push_to_hub(tmp_path, "someone/med-lora", log=print)
    assert calls == [("token", token), ("create", "someone/med-lora", True), ("upload", str(tmp_path), "someone/med-lora")]
    with pytest.raises(UsageError) as exc:
        push_to_hub(tmp_path, "someone/denied", log=print)
    assert "upload failed (403 Forbidden for token ***)" in str(exc.value) and token not in str(exc.value)
    assert token not in capsys.readouterr().out


def test_help_lists_every_flag_with_its_default(capsys):
    with pytest.raises(SystemExit) as exc:
        run(["train", "--method", "qlora", "--help"])
    assert exc.value.code == 0
    out = capsys.readouterr().out
    for flag in ("--lora_r", "--lora_alpha", "--lora_dropout", "--target_modules", "--init_lora_weights",
                 "--gradient_accumulation_steps", "--max_steps", "--seed", "--eval_steps", "--load_in_4bit",
                 "--no-load_in_4bit", "--config"):
        assert flag in out, flag
    assert "(default: True)" in out


def test_config_for_another_method_is_refused(capsys):
    code = run(["--config", str(ROOT / "configs" / "adapter.yaml")], prog="qlora/train_qlora.py", command="train",
               method="qlora")
    assert code == 2
    assert "is for method 'adapter', but this command trains 'qlora'" in capsys.readouterr().err
