"""Choosing settings on the validation split: the score, the best checkpoint of a run, the learning-rate search.

    score = validation_score(model, tokenizer, records, cfg)   # {"score", "metric", "accuracy", "macro_f1", "loss"}
    Selector(...)                                              # a Trainer callback: keeps the best, stops early
    cfg, search = search_learning_rate(method, cfg, opts, log, build)   # --learning_rate auto

The score is the task's: where the validation items have options, the mean of multiple-choice accuracy and macro-F1
(option-text scoring, as the evaluation does), so that a model answering the most frequent label everywhere scores
low however frequent the label; otherwise minus the answer loss.
"""

from __future__ import annotations

import dataclasses
import json
import math
import random
import shutil
import tempfile
import time
from pathlib import Path

import torch

from ..classification import picks
from ..config import MIN_SWEEP_STEPS
from ..data import read_metadata
from ..errors import UsageError
from ..scoring import loss_summary, score_and_generate
from .checkpoints import trainable_state
from .measure import count_parameters

BEST_FILE, BEST_INFO = "best_trainable.safetensors", "best.json"
SIZE_REFERENCE = 7.24e9  # the default base (Mistral-7B) for which the methods' default learning rates are set
GRID = (0.25, 1.0, 4.0, 16.0)  # candidates: the scaled default times these (skewed up: seed defaults are low)


@torch.no_grad()
def validation_score(model, tokenizer, records: list[dict], cfg) -> dict:
    was_training = model.training
    model.eval()
    try:
        found = score_and_generate(model, tokenizer, records, cfg.batch_size, 0, cfg.max_length, "selection")
    finally:
        if was_training:
            model.train()
    scored = [i for i, n in enumerate(found["tokens"]) if n]
    loss = loss_summary([found["nll"][i] for i in scored], [found["tokens"][i] for i in scored])["loss"]
    choice = [(r, o) for r, o in zip(records, found["options"]) if r.get("options") and o]
    if not choice:
        return {"metric": "-answer loss", "score": -loss, "loss": loss}
    gold = [r["label"] for r, _ in choice]
    labels = sorted({k for r, _ in choice for k in r["options"]})
    p = picks([max(o, key=o.get) for _, o in choice], gold, labels)
    return {"metric": "mean of accuracy and macro-F1", "score": round((p["accuracy"] + p["macro_f1"]) / 2, 4),
            "accuracy": p["accuracy"], "macro_f1": p["macro_f1"], "loss": loss, "collapsed": p["collapsed"]}


def score_unpatched(model, tokenizer, records: list[dict], cfg) -> dict:
    """validation_score in the middle of training, with the model as it will be used: a forward that training
    replaced on the instance (packed P-Tuning's, accelerate's mixed-precision wrapper) and compiled layers (built for
    packed rows without a key/value cache) are set aside meanwhile."""
    saved = {k: vars(model).pop(k) for k in ("forward", "_original_forward") if k in vars(model)}
    compiled = [(m, m._compiled_call_impl) for m in model.modules() if getattr(m, "_compiled_call_impl", None)]
    for m, _ in compiled:
        m._compiled_call_impl = None
    try:
        return validation_score(model, tokenizer, records, cfg)
    finally:
        vars(model).update(saved)
        for m, impl in compiled:
            m._compiled_call_impl = impl


def balance_labels(records: list[dict], seed: int = 0) -> tuple[list[dict], dict | None]:
    """--balance labels: the training records of multiple-choice data with each label's items repeated (in turn,
    then at random) until every label is as frequent as the most frequent one; free-text records stay as they are.
    Oversampling was chosen over a class-weighted loss: it leaves the loss, packing and every method untouched."""
    by_label: dict[str, list[dict]] = {}
    for r in records:
        if r.get("options") and r.get("label"):
            by_label.setdefault(r["label"], []).append(r)
    if len(by_label) < 2:
        return records, None
    top = max(len(v) for v in by_label.values())
    rng, extra = random.Random(seed), []
    for items in by_label.values():
        need = top - len(items)
        extra += items * (need // len(items)) + rng.sample(items, need % len(items))
    before = {k: len(v) for k, v in sorted(by_label.items())}
    return records + extra, {"before": before, "after": {k: top for k in before}, "added": len(extra)}


def time_limit_callback(seconds: float):
    """Stops training once `seconds` have passed since its first step (a learning-rate candidate's share)."""
    from transformers import TrainerCallback

    class TimeLimit(TrainerCallback):
        def on_train_begin(self, args, state, control, **kwargs):
            self.t0 = time.time()

        def on_step_end(self, args, state, control, **kwargs):
            if time.time() - self.t0 > seconds:
                control.should_training_stop = True
            return control

    return TimeLimit()


def diverged(result: dict, ceiling: float | None) -> bool:
    """Training made the validation answers less likely than the base model found them (`ceiling`: the base's
    answer loss): on a few multiple-choice items such a model can still pick more right options by chance, but it
    has unlearned the answers (on the bundled sample, a 4-step candidate with loss 8.5 against the base's 2.7 had
    the best score of 16 items)."""
    return ceiling is not None and result.get("loss") is not None and result["loss"] > ceiling


def rank_key(result: dict, ceiling: float | None = None) -> tuple:
    """Higher is better: a result that did not diverge before one that did, then the score, then (ties are common
    in accuracy on a few items) the lower answer loss."""
    return not diverged(result, ceiling), result["score"], -result.get("loss", 0.0)


def evaluation_interval(cfg, steps_per_epoch: int) -> int:
    """Steps between validation scores: --eval_steps, else twice per epoch (at least every step)."""
    return cfg.eval_steps or max(1, steps_per_epoch // 2)


def selector_callback(score_fn, every: int, cfg, model, log, resume: Path | None, ceiling: float | None = None):
    """A Trainer callback: scores the model every `every` steps and at the end, keeps the best trainable weights
    (in memory, and beside each checkpoint so that a resumed run keeps its best so far), stops after
    --early_stopping evaluations without gain. `ceiling`: the base model's validation answer loss (a step above it
    ranks below every step under it). `.finish()` puts the best back when --select best."""
    from safetensors.torch import load_file, save_file
    from transformers import TrainerCallback

    class Selector(TrainerCallback):
        def __init__(self):
            self.history, self.best, self.best_state, self.stale, self.stopped_early = [], None, None, 0, False
            if resume is not None and (resume / BEST_INFO).is_file():
                self.best = json.loads((resume / BEST_INFO).read_text(encoding="utf-8"))
                self.history = self.best.pop("history", [])
                self.best_state = load_file(str(resume / BEST_FILE))
                log(f"resumed with the best so far: step {self.best['step']}, score {self.best['score']}")

        def _score(self, state, control):
            if self.history and self.history[-1]["step"] == state.global_step:
                return
            result = score_fn() | {"step": state.global_step}
            result["diverged"] = diverged(result, ceiling)
            self.history.append(result)
            if self.best is None or rank_key(result, ceiling) > rank_key(self.best, ceiling):
                self.best, self.best_state, self.stale = dict(result), trainable_state(model), 0
            else:
                self.stale += 1
            log(f"validation at step {state.global_step}: {result['metric']} {result['score']:.4f}"
                + (f", answer loss {result['loss']:.4f} above the base's {ceiling:.4f}" if result["diverged"] else "")
                + f" (best {self.best['score']:.4f} at step {self.best['step']})")
            if cfg.early_stopping and self.stale >= cfg.early_stopping:
                self.stopped_early = True
                control.should_training_stop = True
                log(f"early stopping: {self.stale} evaluations without a better score")

        def on_step_end(self, args, state, control, **kwargs):
            if state.global_step % every == 0 or state.global_step >= state.max_steps:
                self._score(state, control)
            return control

        def on_train_end(self, args, state, control, **kwargs):
            self._score(state, control)

        def on_save(self, args, state, control, **kwargs):
            folder = Path(args.output_dir) / f"checkpoint-{state.global_step}"
            if state.is_world_process_zero and folder.is_dir() and self.best_state is not None:
                save_file(self.best_state, str(folder / BEST_FILE))
                (folder / BEST_INFO).write_text(json.dumps(self.best | {"history": self.history}), encoding="utf-8")

        def finish(self, last_step: int) -> dict:
            chosen = self.best if cfg.select == "best" and self.best else (self.history[-1] if self.history else None)
            if cfg.select == "best" and self.best and self.best["step"] != last_step:
                with torch.no_grad():
                    params = {n: p for n, p in model.named_parameters() if p.requires_grad}
                    for name, value in self.best_state.items():
                        params[name].copy_(value.to(params[name].device, params[name].dtype))
                log(f"--select best: keeping step {self.best['step']} (score {self.best['score']:.4f}), not the last "
                    f"step {last_step} ({self.history[-1]['score']:.4f})")
            return {"select": cfg.select, "every_steps": every, "chosen_step": chosen and chosen["step"],
                    "last_step": last_step, "best": self.best, "history": self.history,
                    "stopped_early": self.stopped_early}

    return Selector()


def candidates(method, total_parameters: int) -> list[float]:
    """A log grid around the method's default learning rate, scaled for the model's size (a smaller model takes
    larger steps: the square root of the size ratio, 1 to 10 times), and the default itself (the seed's value), so
    that the winner scores at least as well on validation as the default would in the same steps."""
    scale = min(10.0, max(1.0, math.sqrt(SIZE_REFERENCE / max(total_parameters, 1))))
    default = method.DEFAULTS.get("learning_rate", 2e-4)
    return sorted({float(f"{default * scale * g:.2g}") for g in GRID} | {default})


def run_steps(cfg, train_rows: int) -> int:
    if cfg.max_steps > 0:
        return cfg.max_steps
    per_epoch = math.ceil(train_rows / (cfg.batch_size * cfg.gradient_accumulation_steps))
    return max(1, math.ceil(per_epoch * cfg.num_epochs))


def search_learning_rate(method_name: str, method, cfg, opts, log, build) -> tuple[object, dict]:
    """--learning_rate auto: each candidate trains a bounded share of the run from the same start, is scored on the
    validation split, and the run's settings get the winner. Returns (settings, the search's record)."""
    total = run_steps(cfg, read_metadata(cfg.data_path)["counts"]["train"])
    if total < 2 * MIN_SWEEP_STEPS:
        raise UsageError(f"--learning_rate auto needs a run of at least {2 * MIN_SWEEP_STEPS} steps (each candidate "
                         f"trains at least {MIN_SWEEP_STEPS}); this run has {total}: raise --num_epochs or "
                         "--max_steps, or give a --learning_rate")
    steps = cfg.sweep_steps or min(100, max(MIN_SWEEP_STEPS, round(total / 4)))
    steps = min(steps, total)
    rows, started = [], time.time()
    Path(cfg.output_dir).parent.mkdir(parents=True, exist_ok=True)  # a fresh run's models/ folder, say
    scratch = Path(tempfile.mkdtemp(prefix=".lr-search-", dir=Path(cfg.output_dir).parent))
    grid = base = None
    try:
        k = 0
        while grid is None or k < len(grid):
            trial = dataclasses.replace(cfg, learning_rate=1.0, max_steps=steps, output_dir=str(scratch / f"c{k}"),
                                        save_steps=0, select="last", early_stopping=0, push_to_hub="",
                                        resume_from_checkpoint="", report_to="none", eval_steps=0)
            run = build(method_name, trial, opts, lambda *a, **kw: None)
            try:
                grid = grid or candidates(method, count_parameters(run.model)[1])
                share = cfg.sweep_budget_s / len(grid) if cfg.sweep_budget_s else None
                run.cfg = dataclasses.replace(trial, learning_rate=grid[k])
                run.time_limit_s = share
                if base is None:  # the same start for every candidate: measured once
                    with method.disabled(run.model):
                        base = {"loss": run.validation_loss("base validation")["loss"]}
                run.base_score = base
                t0 = time.time()
                metrics = run.fit(score_base=False)
                result = validation_score(run.model, run.tokenizer, run.val_records, run.cfg)
            finally:
                run.cleanup()
            done = metrics["steps"]
            if done < MIN_SWEEP_STEPS:
                raise UsageError(f"--sweep_budget_s {cfg.sweep_budget_s:g} is too short for one candidate: "
                                 f"{done} steps of {method_name} took {time.time() - t0:.0f} s; give at least "
                                 f"{math.ceil((time.time() - t0) / max(done, 1) * MIN_SWEEP_STEPS * len(grid))} s "
                                 "or a --learning_rate")
            rows.append({"learning_rate": grid[k], "steps": done, "seconds": round(time.time() - t0, 1), **result,
                         "diverged": diverged(result, base["loss"])})
            log(f"learning rate {grid[k]:.2g} ({k + 1}/{len(grid)}): {result['metric']} {result['score']:.4f} after "
                f"{done} steps ({rows[-1]['seconds']:.0f} s)"
                + (f"; answer loss {result['loss']:.4f} above the base's {base['loss']:.4f}: diverged, ranked last"
                   if rows[-1]["diverged"] else ""))
            k += 1
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    ranked = sorted(rows, key=lambda r: rank_key(r, base["loss"]), reverse=True)
    winner = ranked[0]
    margin = winner["score"] - ranked[1]["score"] if len(ranked) > 1 else 0.0
    runner_up = f" over {ranked[1]['learning_rate']:.2g}" if len(ranked) > 1 else ""
    log(f"learning rate search: {winner['learning_rate']:.2g} wins by {margin:+.4f} ({winner['metric']}){runner_up}; "
        f"{time.time() - started:.0f} s for {len(rows)} candidates of {steps} steps")
    return dataclasses.replace(cfg, learning_rate=winner["learning_rate"]), {
        "metric": winner["metric"], "candidates": rows, "winner": winner["learning_rate"], "margin": round(margin, 4),
        "steps_per_candidate": steps, "run_steps": total, "seconds": round(time.time() - started, 1),
        "base_validation": base}


def guard_default(run, metrics, method_name: str, cfg, opts, default: float, search: dict, log, build):
    """--sweep_guard: the full run at the method's default learning rate beside the winner's (a few steps favour
    large ones: the winner of a short candidate can end below the default over the whole run); the run whose kept
    weights score better on validation is the one saved. Returns (that run, its metrics)."""
    started = time.time()
    other = build(method_name, dataclasses.replace(cfg, learning_rate=default, save_steps=0,
                                                   resume_from_checkpoint="", push_to_hub=""), opts, log)
    other.fingerprint, other.discard_stale_checkpoints = run.fingerprint, run.discard_stale_checkpoints
    try:
        other_metrics = other.fit()
    except BaseException:
        other.cleanup()
        raise
    mine, theirs = run.validation_score, other.validation_score
    ceiling = (search.get("base_validation") or {}).get("loss")
    keep_default = rank_key(theirs, ceiling) > rank_key(mine, ceiling)
    search["guard"] = {"default": default, "winner_validation": mine["score"], "default_validation": theirs["score"],
                       "kept": "default" if keep_default else "winner", "seconds": round(time.time() - started, 1)}
    log(f"guard: the full run at the default {default:.2g} scores {theirs['score']:.4f} on validation, at the "
        f"winner {search['winner']:.2g} {mine['score']:.4f}: keeping the {search['guard']['kept']}")
    if keep_default:
        run.cleanup()
        return other, other_metrics
    other.cleanup()
    return run, metrics
