"""Evaluation: metric functions against hand-computed values, option scoring, the report, the pipeline."""

import json

import pytest
import torch

from conftest import report_results
from medpeft.metrics import bootstrap_ci, macro_f1, parse_choice, text_metrics, token_f1
from medpeft.scoring import generate_answers, score_options
from medpeft.modeling import load_tokenizer

pytestmark = pytest.mark.filterwarnings("ignore")


def test_token_f1_by_hand():
    # pred {cat, sat} vs ref {cat, sat, down} (articles and punctuation dropped): P 1, R 2/3 -> F1 0.8
    assert token_f1("The cat sat.", "a cat sat down") == pytest.approx(0.8)
    assert token_f1("dog", "cat") == 0.0
    assert token_f1("", "") == 1.0


def test_rouge_and_bleu_by_hand():
    summary, items = text_metrics(["the cat sat on the mat", "hello"], ["the cat sat on the mat", "goodbye"])
    assert items[0]["rougeL"] == pytest.approx(1.0) and items[1]["rougeL"] == 0.0
    assert summary["rougeL"] == pytest.approx(0.5) and summary["items"] == 2
    # ROUGE-1 of "the cat is on the mat" vs "the cat sat on the mat": 5 of 6 unigrams match -> 0.8333
    partial, _ = text_metrics(["the cat is on the mat"], ["the cat sat on the mat"])
    assert partial["rouge1"] == pytest.approx(5 / 6, abs=1e-4)
    perfect, _ = text_metrics(["the cat sat on the mat"], ["the cat sat on the mat"])
    assert perfect["bleu"] == pytest.approx(100.0)


def test_macro_f1_by_hand():
    # A: tp 1, fp 0, fn 1 -> 2/3; B: tp 2, fp 1, fn 0 -> 4/5; mean 0.7333
    assert macro_f1(["A", "B", "B", "B"], ["A", "A", "B", "B"]) == pytest.approx(0.7333, abs=1e-4)
    assert macro_f1([None, None], ["A", "B"]) == 0.0


def test_bootstrap_interval():
    assert bootstrap_ci([0.5] * 20) == [0.5, 0.5]
    values = [1.0] * 30 + [0.0] * 70
    lo, hi = bootstrap_ci(values)
    assert lo < 0.3 < hi and hi - lo < 0.25
    assert bootstrap_ci(values, seed=1) != [0.0, 0.0]


@pytest.mark.parametrize("text,expected", [
    ("B", "B"), ("B. Vitamin C", "B"), ("(C) Iron", "C"), ("Answer: D", "D"), ("The answer is A", "A"),
    ("I think it is vitamin c.", "B"), ("Because of diet.", None), ("Vitamin A or vitamin C", None), ("", None),
    ("A patient should take zinc", "D"), ("Vitamin C (B)", "B"), ("Vitamin Cx", None),
])
def test_parse_choice(text, expected):
    options = {"A": "Vitamin A", "B": "Vitamin C", "C": "Iron", "D": "Zinc"}
    assert parse_choice(text, options) == expected


@pytest.mark.parametrize("text,expected", [("No, it does not.", "B"), ("yes", "A"), ("Maybe.", "C"),
                                           ("It is not known", None), ("Yes and no", None)])
def test_parse_yes_no_maybe(text, expected):
    assert parse_choice(text, {"A": "yes", "B": "no", "C": "maybe"}) == expected


class PreferringModel(torch.nn.Module):
    """A stand-in language model whose every next-token distribution favours a fixed set of tokens."""

    def __init__(self, vocab, favoured):
        super().__init__()
        self.bias = torch.nn.Parameter(torch.zeros(vocab))
        with torch.no_grad():
            self.bias[list(favoured)] = 5.0

    def forward(self, input_ids, attention_mask=None, past_key_values=None, use_cache=None, position_ids=None,
                logits_to_keep=0):
        logits = self.bias.expand(*input_ids.shape, -1)[:, -logits_to_keep:]
        return type("Out", (), {"logits": logits, "past_key_values": past_key_values or FakeCache(input_ids)})()


class FakeCache:
    def __init__(self, input_ids):
        self.length = input_ids.shape[1]
        self.layers = []

    def get_seq_length(self):
        return self.length

    def reorder_cache(self, index):
        pass


def test_option_scoring_picks_the_option_the_model_prefers(tiny_model):
    tok = load_tokenizer(tiny_model)
    record = {"messages": [{"role": "user", "content": "Which vitamin prevents scurvy?"},
                           {"role": "assistant", "content": "Vitamin C (B)"}],
              "options": {"A": "Vitamin A", "B": "Vitamin C", "C": "Iron"}, "label": "B"}
    other = dict(record, options={"A": "Iron", "B": "Zinc", "C": "Vitamin C", "D": "Vitamin A"}, label="C")
    favoured = set(tok("Vitamin C", add_special_tokens=False)["input_ids"])
    first, second = score_options(PreferringModel(len(tok), favoured), tok, [record, other])
    assert max(first, key=first.get) == "B" and max(second, key=second.get) == "C"  # same text, other letter
    favoured = set(tok("Iron", add_special_tokens=False)["input_ids"]) | set(tok("A", add_special_tokens=False)[
        "input_ids"])  # a preferred letter alone does not win: only the option text is scored
    (scores,) = score_options(PreferringModel(len(tok), favoured), tok, [record])
    assert max(scores, key=scores.get) == "C"


def test_generation_runs_in_batches_and_times_itself(tiny_model):
    from transformers import AutoModelForCausalLM

    tok = load_tokenizer(tiny_model)
    model = AutoModelForCausalLM.from_pretrained(tiny_model)
    records = [{"messages": [{"role": "user", "content": q}, {"role": "assistant", "content": "x"}]}
               for q in ("What causes scurvy?", "How does warfarin work?", "Hi")]
    answers, timing = generate_answers(model, tok, records, batch_size=2, max_new_tokens=6)
    assert len(answers) == 3 and all(isinstance(a, str) for a in answers)
    assert timing["generated_tokens"] > 0 and timing["latency_s_per_answer"] > 0
    assert tok.padding_side == "right"  # restored after left-padded generation


def test_report_is_made_from_the_results_file_alone(tmp_path):
    from medpeft.report import main

    results = report_results()
    path = tmp_path / "evaluation_results.json"
    path.write_text(json.dumps(results))
    assert main([str(path)]) == 0
    md = (tmp_path / "report.md").read_text()
    page = (tmp_path / "report.html").read_text()
    assert "| qlora | ok | 1.000 | 2.72 | 0.600 [0.500, 0.700]" in md and "| base | ok | 2.000 | 7.39 [6.50, 8.20] |" in md
    assert "+0.500 [+0.000, +1.000] within noise" in md and "failed: training failed: boom" in md
    assert page.count("data:image/png;base64,") == 3  # metric bars, loss curves, time and memory
    assert "base says &lt;b&gt;" in page and "<b>" not in page.split("base says")[1][:10]
    assert {p.name for p in (tmp_path / "report_files").iterdir()} == {"metrics.png", "loss_curves.png",
                                                                       "time_memory.png"}


def test_per_example_loss_matches_the_model_loss_and_has_an_interval(tiny_model, processed):
    from transformers import AutoModelForCausalLM

    from medpeft.data import load_split
    from medpeft.scoring import answer_loss
    from medpeft.tokens import tokenize_records

    tok = load_tokenizer(tiny_model)
    model = AutoModelForCausalLM.from_pretrained(tiny_model)
    examples = tokenize_records(tok, load_split(processed, "validation")[:12], 512)
    result = answer_loss(model, examples, tok.pad_token_id, batch_size=4, interval=True)
    batch = {k: torch.tensor([examples[0][k]]) for k in ("input_ids", "labels")}
    single = answer_loss(model, examples[:1], tok.pad_token_id)
    with torch.no_grad():
        assert single["loss"] == pytest.approx(float(model(**batch).loss), abs=1e-4)
    lo, hi = result["perplexity_ci"]
    assert lo < result["perplexity"] < hi


@pytest.mark.parametrize("content,needle", [
    (None, "does not exist; run utils/prepare_dataset.py first"),
    ("{bad", "is not valid JSON"),
    ("[1, 2]", "is not a list of processed records"),
    ("[]", "holds no records"),
])
def test_evaluate_rejects_bad_test_data_in_one_line(tmp_path, tiny_model, capsys, content, needle):
    from medpeft.cli import run

    path = tmp_path / "test.json"
    if content is not None:
        path.write_text(content)
    code = run(["--base_model", tiny_model, "--test_data", str(path), "--output_file", str(tmp_path / "r.json")],
               prog="utils/evaluate_models.py", command="evaluate")
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1 and needle in err
    assert not (tmp_path / "r.json").exists()


def test_a_constant_answer_is_flagged_collapsed_and_scored_against_the_majority():
    from medpeft.classification import majority, paired, picks

    gold = ["A"] * 55 + ["B"] * 30 + ["C"] * 15
    constant = picks(["A"] * 100, gold, ["A", "B", "C"])
    assert constant["accuracy"] == 0.55 and constant["collapsed"] == "A" and constant["collapsed_share"] == 1.0
    assert constant["macro_f1"] == round((2 * 55 / (2 * 55 + 45)) / 3, 4)  # one label's F1 of three
    assert constant["predicted"] == {"A": 100, "B": 0, "C": 0}
    assert constant["confusion"]["B"] == {"A": 30, "B": 0, "C": 0}
    base = majority(["A"] * 6 + ["B"] * 3 + ["C"], gold, ["A", "B", "C"], "the training split")
    assert base["label"] == "A" and base["accuracy"] == 0.55 and base["prior"] == {"A": 0.6, "B": 0.3, "C": 0.1}
    same = paired([float(g == "A") for g in gold], base["hits"])
    assert same["gain"] == 0 and not same["significant"]  # "better than the base" is not "better than the prior"
    varied = picks(["A"] * 89 + ["B"] * 11, gold, ["A", "B", "C"])
    assert varied["collapsed"] is None and varied["collapsed_share"] == 0.89


def test_the_report_separates_gains_over_the_base_from_gains_over_the_majority(tmp_path):
    from medpeft.report import write_report

    gold = ["A"] * 60 + ["B"] * 40
    results = report_results()
    results["majority_baseline"] = {"label": "A", "source": "the training split", "prior": {"A": 0.6, "B": 0.4},
                                    "test_prior": {"A": 0.6, "B": 0.4}, "accuracy": 0.6, "accuracy_ci": [0.5, 0.7],
                                    "macro_f1": 0.375, "names": {"A": "yes", "B": "no"}}
    results["coverage"] = {"line": "100 of 120 test items scored (a sample drawn with seed 42)"}
    from medpeft.classification import picks

    for name, predicted in (("base", ["B"] * 100), ("qlora", ["A"] * 100)):
        entry = results["models"][name]
        entry["choice"] |= {"picks": {s: picks(predicted, gold, ["A", "B"]) for s in ("loglik", "letter")}}
    results["models"]["qlora"]["choice"] |= {"gain_vs_base": 0.2, "gain_vs_base_ci": [0.1, 0.3],
                                             "gain_significant": True, "gain_vs_majority": 0.0,
                                             "gain_vs_majority_ci": [0.0, 0.0],
                                             "gain_vs_majority_significant": False}
    md, html = write_report(results, tmp_path)
    text = md.read_text()
    assert "Coverage: 100 of 120 test items scored" in text
    assert "always answering 'yes' (the most frequent label of the training split: yes 60%, no 40%" in text
    row = next(line for line in text.splitlines() if line.startswith("| qlora | option text"))
    assert "better than the base model; not distinguishable from always answering the majority label" in row
    assert "yes: 100% 'yes'" in row  # collapsed
    assert "Confusion of qlora" in text


def test_evaluate_reports_coverage_majority_and_letter_scoring(tmp_path, tiny_model, capsys):
    from medpeft.cli import run

    from conftest import write_jsonl

    rows = [{"QUESTION": f"Does drug {i} help patients with condition {i % 7}?", "CONTEXTS": [f"A trial of {i}."],
             "final_decision": "yes" if i % 4 else "no", "split": "test" if i < 12 else "train" if i < 40 else
             "validation"} for i in range(44)]
    data = write_jsonl(tmp_path / "p.jsonl", rows)
    assert run(["prepare", "--input_data", str(data), "--output_dir", str(tmp_path / "d"), "--model_name",
                tiny_model]) == 0
    out = tmp_path / "r" / "evaluation_results.json"
    assert run(["evaluate", "--base_model", tiny_model, "--test_data", str(tmp_path / "d" / "test.json"),
                "--output_file", str(out), "--max_new_tokens", "4", "--max_samples", "10"]) == 0
    printed = capsys.readouterr().out
    results = json.loads(out.read_text())
    assert results["coverage"]["line"].startswith("10 of 12 test items scored (a sample drawn with seed 42")
    assert "coverage: 10 of 12 test items scored" in printed
    maj = results["majority_baseline"]
    assert maj["label"] == "A" and maj["names"] == {"A": "yes", "B": "no", "C": "maybe"}
    assert maj["source"] == "the training split" and maj["prior"] == {"A": 0.75, "B": 0.25, "C": 0.0}
    choice = results["models"]["base"]["choice"]
    for scoring in ("loglik", "letter", "generate"):
        p = choice["picks"][scoring]
        assert sum(p["predicted"].values()) == 10 == sum(sum(row.values()) for row in p["confusion"].values()) + \
            p["predicted"].get("none", 0)
        assert p["accuracy"] == choice[f"accuracy_{scoring}"]
    assert "gain_vs_majority" in choice and "gain_vs_majority_letter" in choice
    assert "Majority-class baseline: always answering 'yes'" in (tmp_path / "r" / "report.md").read_text()
