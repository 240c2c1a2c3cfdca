"""Settings chosen on the validation split: the learning-rate search, the best checkpoint, early stopping, the
search's budget and minimum, label balance, and run_all's defaults."""

import json

import pytest
import torch

from medpeft import methods
from medpeft.cli import run
from medpeft.config import PrepareConfig, TrainConfig
from medpeft.data import prepare
from medpeft.errors import UsageError
from medpeft.outputs import load_trained
from medpeft.training import run as training_run
from medpeft.training import selection, train

from conftest import qa_rows, write_jsonl

pytestmark = pytest.mark.filterwarnings("ignore")


@pytest.fixture(scope="module")
def free_text(tmp_path_factory, tiny_model):
    """Question-answer data only: the validation score is minus the answer loss."""
    d = tmp_path_factory.mktemp("free")
    prepare(PrepareConfig(input_data=str(write_jsonl(d / "qa.jsonl", qa_rows(40))), output_dir=str(d / "p"),
                          model_name=tiny_model), log=lambda *a: None)
    return str(d / "p")


def settings(tiny_model, data, out, **kw):
    values = dict(model_name=tiny_model, data_path=data, output_dir=str(out), max_steps=8, batch_size=4,
                  learning_rate=1e-2, logging_steps=1, max_eval_samples=8, seed=0, report_to="none", save_steps=0)
    return TrainConfig(**(values | kw))


def test_the_search_picks_the_learning_rate_that_clearly_wins(tiny_model, free_text, tmp_path, monkeypatch):
    # a step too small to learn anything, and one that learns
    monkeypatch.setattr(selection, "candidates", lambda method, n: [1e-7, 1e-2])
    logs = []
    metrics = train("qlora", settings(tiny_model, free_text, tmp_path / "new" / "q", learning_rate="auto"),
                    methods.get("qlora").Options(lora_r=4, lora_alpha=8), log=logs.append)
    search = metrics["learning_rate_search"]
    assert search["winner"] == 1e-2 and [c["learning_rate"] for c in search["candidates"]] == [1e-7, 1e-2]
    low, high = search["candidates"]
    assert search["metric"] == "-answer loss" and high["loss"] < low["loss"] - 0.05
    assert search["steps_per_candidate"] == 4 and all(c["steps"] == 4 for c in search["candidates"])
    assert metrics["steps"] == 8 and search["cost_ratio"] > 0
    out = tmp_path / "new" / "q"  # a folder whose parent did not exist yet
    saved = json.loads((out / "metrics.json").read_text())
    assert saved["learning_rate_search"]["candidates"] == search["candidates"]  # the table is in metrics.json
    assert json.loads((out / "medpeft_config.json").read_text())["settings"]["learning_rate"] == 1e-2
    assert any("learning rate search: 0.01 wins by" in line for line in logs)
    assert "| learning rate | score |" in (out / "README.md").read_text()
    assert [p.name for p in out.parent.iterdir()] == ["q"]  # the candidates' scratch folders are gone


def test_the_guard_keeps_the_default_when_its_full_run_scores_better(tiny_model, free_text, tmp_path, monkeypatch):
    """A short candidate favours large steps: the full run at the method's default (2e-4 for QLoRA) is trained
    beside the winner's and kept when it scores better on validation."""
    import math

    def by_rate(model, tokenizer, records, cfg):  # the closer to 2e-4, the better; the loss as real
        return {"metric": "scripted", "score": -abs(math.log(cfg.learning_rate / 2e-4)), "loss": 1.0}

    monkeypatch.setattr(selection, "candidates", lambda method, n: [1e-2, 5e-2])
    monkeypatch.setattr(selection, "validation_score", by_rate)
    monkeypatch.setattr(training_run, "validation_score", by_rate)
    logs = []
    out = tmp_path / "q"
    metrics = train("qlora", settings(tiny_model, free_text, out, learning_rate="auto", select="last"),
                    methods.get("qlora").Options(lora_r=4, lora_alpha=8), log=logs.append)
    search = metrics["learning_rate_search"]
    assert search["winner"] == 1e-2 and search["guard"]["kept"] == "default" and search["guard"]["default"] == 2e-4
    assert search["guard"]["default_validation"] > search["guard"]["winner_validation"]
    assert json.loads((out / "medpeft_config.json").read_text())["settings"]["learning_rate"] == 2e-4
    assert any(line.startswith("guard: the full run at the default") for line in logs)
    assert "kept the default" in (out / "README.md").read_text()
    monkeypatch.setattr(selection, "validation_score", lambda *a: {"metric": "s", "score": 0.0, "loss": 1.0})
    unguarded = train("qlora", settings(tiny_model, free_text, tmp_path / "u", learning_rate="auto", select="last",
                                        sweep_guard=False), methods.get("qlora").Options(lora_r=4, lora_alpha=8),
                      log=lambda *a: None)
    assert "guard" not in unguarded["learning_rate_search"]


def test_an_explicit_learning_rate_runs_no_search(tiny_model, free_text, tmp_path):
    metrics = train("adapter", settings(tiny_model, free_text, tmp_path / "a", learning_rate=3e-3, select="last"),
                    methods.get("adapter").Options(adapter_size=8), log=lambda *a: None)
    assert "learning_rate_search" not in metrics and metrics["selection"] is None


def scripted(monkeypatch, scores):
    """The validation score at each scoring, in order; the trainable weights at each are recorded."""
    seen = []

    def score(model, tokenizer, records, cfg):
        seen.append({n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad})
        value, loss = scores[len(seen) - 1] if isinstance(scores[len(seen) - 1], tuple) else (scores[len(seen) - 1], 0.0)
        return {"metric": "scripted", "score": value, "loss": loss}

    monkeypatch.setattr(training_run, "score_unpatched", score)
    return seen


def test_best_differs_from_last_and_is_the_one_saved(tiny_model, free_text, tmp_path, monkeypatch):
    seen = scripted(monkeypatch, [0.1, 0.5, 0.3, 0.2])  # scored at steps 2, 4, 6, 8: best at step 4
    metrics = train("qlora", settings(tiny_model, free_text, tmp_path / "q", eval_steps=2, load_in_4bit=False),
                    methods.get("qlora").Options(lora_r=4, lora_alpha=8), log=lambda *a: None)
    chosen = metrics["selection"]
    assert [h["step"] for h in chosen["history"]] == [2, 4, 6, 8]
    assert chosen["chosen_step"] == 4 and chosen["last_step"] == 8 and chosen["best"]["score"] == 0.5
    model, _, _ = load_trained(str(tmp_path / "q"), dtype="float32")
    saved = {n: p for n, p in model.named_parameters() if "lora_" in n}
    at_best, at_last = seen[1], seen[3]
    assert sorted(saved) == sorted(at_best) and saved  # the same parameters, by name
    for name, value in saved.items():
        assert torch.equal(value.float(), at_best[name].float()), name  # the best step's weights, exactly
    assert any(not torch.equal(at_best[n], at_last[n]) for n in saved)  # which the last step's are not


def test_equal_scores_are_broken_by_the_lower_validation_loss(tiny_model, free_text, tmp_path, monkeypatch):
    # accuracy on a few items ties often: the demo kept its first scoring over a later one with a lower loss
    scripted(monkeypatch, [(0.5, 2.0), (0.5, 1.5), (0.5, 1.8), (0.3, 1.0)])
    metrics = train("qlora", settings(tiny_model, free_text, tmp_path / "q", eval_steps=2, load_in_4bit=False),
                    methods.get("qlora").Options(lora_r=4, lora_alpha=8), log=lambda *a: None)
    assert metrics["selection"]["chosen_step"] == 4 and metrics["selection"]["best"]["loss"] == 1.5


def test_a_step_whose_answer_loss_is_above_the_bases_is_not_kept(tiny_model, free_text, tmp_path, monkeypatch):
    """On a few multiple-choice items a diverged model can pick more right options by chance: the best score comes
    with an answer loss above the base model's (which the real scorer measures first, on the untrained model)."""
    base = {}
    real = training_run.TrainingRun.validation_loss

    def measured(self, desc="validation", model=None):  # the first one: the base model's, before training
        out = real(self, desc, model)
        base.setdefault("loss", out["loss"])
        return out

    monkeypatch.setattr(training_run.TrainingRun, "validation_loss", measured)
    seen = []

    def score(model, tokenizer, records, cfg):  # step 4: the best score, with a loss 3 nats above the base's
        seen.append(1)
        return {"metric": "scripted", "score": [0.3, 0.9, 0.4, 0.35][len(seen) - 1],
                "loss": base["loss"] + (3.0 if len(seen) == 2 else -0.5)}

    monkeypatch.setattr(training_run, "score_unpatched", score)
    logs = []
    metrics = train("qlora", settings(tiny_model, free_text, tmp_path / "q", eval_steps=2, load_in_4bit=False),
                    methods.get("qlora").Options(lora_r=4, lora_alpha=8), log=logs.append)
    chosen = metrics["selection"]
    assert [h["diverged"] for h in chosen["history"]] == [False, True, False, False]
    assert chosen["chosen_step"] == 6 and chosen["best"]["score"] == 0.4
    assert any("above the base's" in line for line in logs)


def test_the_search_ranks_a_diverged_candidate_last(tiny_model, free_text, tmp_path, monkeypatch):
    monkeypatch.setattr(selection, "candidates", lambda method, n: [1e-3, 1e-2])
    calls = []

    def by_rate(model, tokenizer, records, cfg):  # 1e-2 scores higher but lost the answers: 30 nats over the base
        calls.append(cfg.learning_rate)
        return {"metric": "scripted", "score": 0.9 if cfg.learning_rate == 1e-2 else 0.3,
                "loss": 40.0 if cfg.learning_rate == 1e-2 else 1.5}

    monkeypatch.setattr(selection, "validation_score", by_rate)
    logs = []
    metrics = train("qlora", settings(tiny_model, free_text, tmp_path / "q", learning_rate="auto", select="last",
                                      sweep_guard=False),
                    methods.get("qlora").Options(lora_r=4, lora_alpha=8), log=logs.append)
    search = metrics["learning_rate_search"]
    assert search["winner"] == 1e-3 and 1.5 < search["base_validation"]["loss"] < 40.0  # the tiny model's, measured
    assert [c["diverged"] for c in search["candidates"]] == [False, True]
    assert any("diverged, ranked last" in line for line in logs)
    card = (tmp_path / "q" / "README.md").read_text()
    assert "| 40.0000 (diverged) |" in card and "The base model's validation answer loss:" in card


def test_rank_key_orders_by_divergence_then_score_then_loss():
    rows = [{"score": 0.9, "loss": 9.0}, {"score": 0.5, "loss": 1.0}, {"score": 0.5, "loss": 0.8}]
    assert sorted(rows, key=lambda r: selection.rank_key(r, 2.0), reverse=True) == [rows[2], rows[1], rows[0]]
    assert sorted(rows, key=selection.rank_key, reverse=True)[0] is rows[0]  # no base known: the score decides


def test_select_last_keeps_the_final_step(tiny_model, free_text, tmp_path, monkeypatch):
    scripted(monkeypatch, [0.1, 0.5, 0.3, 0.2])
    metrics = train("adapter", settings(tiny_model, free_text, tmp_path / "a", eval_steps=2, select="last",
                                        early_stopping=0), methods.get("adapter").Options(adapter_size=8),
                    log=lambda *a: None)
    assert metrics["selection"] is None


def test_early_stopping_stops_after_n_evaluations_without_gain(tiny_model, free_text, tmp_path, monkeypatch):
    scripted(monkeypatch, [0.5, 0.4, 0.3, 0.2, 0.1, 0.0, 0.0, 0.0])
    metrics = train("ptuning", settings(tiny_model, free_text, tmp_path / "p", eval_steps=1, early_stopping=2,
                                        max_steps=8), methods.get("ptuning").Options(num_virtual_tokens=4),
                    log=lambda *a: None)
    assert metrics["steps"] == 3 and metrics["selection"]["stopped_early"]
    assert metrics["selection"]["chosen_step"] == 1


def test_a_budget_too_short_for_one_candidate_stops_before_the_run(tiny_model, free_text, tmp_path):
    with pytest.raises(UsageError, match="--sweep_budget_s 0.001 is too short for one candidate: 1 steps of qlora"):
        train("qlora", settings(tiny_model, free_text, tmp_path / "q", learning_rate="auto", sweep_budget_s=0.001),
              methods.get("qlora").Options(lora_r=4, lora_alpha=8), log=lambda *a: None)
    assert not (tmp_path / "q").exists()


def test_the_time_limit_stops_a_candidate_when_its_share_is_spent(monkeypatch):
    clock = iter(range(0, 1000, 10))  # every reading of the clock is 10 s later
    monkeypatch.setattr(selection.time, "time", lambda: next(clock))

    class Control:
        should_training_stop = False

    limit, control = selection.time_limit_callback(25), Control()
    limit.on_train_begin(None, None, control)
    steps = 0
    while not control.should_training_stop:
        steps += 1
        limit.on_step_end(None, None, control)
    assert steps == 3  # 10, 20 s: go on; 30 s > 25: stop


def test_too_few_steps_for_a_search_says_the_minimum(tiny_model, free_text, tmp_path, capsys):
    code = run(["train", "--method", "qlora", "--model_name", tiny_model, "--data_path", free_text, "--output_dir",
                str(tmp_path / "q"), "--learning_rate", "auto", "--max_steps", "5"])
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1
    assert "--learning_rate auto needs a run of at least 8 steps" in err and "--max_steps is 5" in err


def test_the_candidates_hold_the_default_and_larger_steps_for_smaller_models():
    qlora = methods.get("qlora")
    assert selection.candidates(qlora, 7_240_000_000) == [5e-5, 2e-4, 8e-4, 3.2e-3]  # the default's size: no scaling
    small = selection.candidates(qlora, 135_000_000)
    assert 2e-4 in small and len(small) == 5 and max(small) > 10 * 2e-4


def test_balance_labels_oversamples_the_rarer_labels():
    records = [{"options": {"A": "yes", "B": "no"}, "label": "A", "question": f"q{i}"} for i in range(7)] + [
        {"options": {"A": "yes", "B": "no"}, "label": "B", "question": f"r{i}"} for i in range(2)] + [
        {"options": None, "label": None, "question": "free"}]
    balanced, info = selection.balance_labels(records)
    labels = [r["label"] for r in balanced if r.get("options")]
    assert labels.count("A") == labels.count("B") == 7 and info == {"before": {"A": 7, "B": 2},
                                                                      "after": {"A": 7, "B": 7}, "added": 5}
    assert sum(r["question"] == "free" for r in balanced) == 1
    assert selection.balance_labels(records[:7]) == (records[:7], None)  # one label: nothing to balance


def test_run_all_searches_unless_a_learning_rate_is_given(tiny_model, tmp_path):
    from medpeft.pipeline import DEMO_CONFIG, plan

    searched = plan(["--model_name", tiny_model, "--output_root", str(tmp_path)])
    assert all(cfg.learning_rate == "auto" for cfg, _ in searched.stages.values())
    given = plan(["--model_name", tiny_model, "--output_root", str(tmp_path), "--learning_rate", "3e-4"])
    assert all(cfg.learning_rate == 3e-4 for cfg, _ in given.stages.values())
    demo = plan(["--config", str(DEMO_CONFIG)])
    assert {n: cfg.learning_rate for n, (cfg, _) in demo.stages.items()} == {"qlora": 2e-3, "adapter": 2e-3,
                                                                             "ptuning": 3e-3}
