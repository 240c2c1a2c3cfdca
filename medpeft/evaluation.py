"""Scores of a model on processed data: answer-only loss, generation metrics, multiple-choice accuracy, speed.

    evaluate(cfg)  ->  evaluation_results.json  (schema below) + report.md / report.html (see report.py)

evaluation_results.json:
    {"schema_version": 2, "created": ..., "test_data": ..., "settings": {...}, "versions": {...},
     "coverage": {"input_test_items", "test_file_items", "evaluated", "line": "N of M test items scored", ...},
     "majority_baseline": {"label", "source", "prior", "test_prior", "accuracy", "accuracy_ci", "macro_f1"},
     "scoring": {what each figure is and how it was computed}, "bench": {...} (medpeft bench, bench.py),
     "models": {"base": {...}, "qlora": {...}, ...}}          one entry per model, each:
        {"name", "path", "status": "ok" | "failed", "error": null | "one line",
         "loss": {"loss", "perplexity", "tokens", "examples"},
         "generation": {"rouge1", "rouge2", "rougeL", "bleu", "token_f1", "rougeL_ci": [lo, hi], "items"},
         "choice": {"items", "accuracy_loglik", "accuracy_loglik_ci", "macro_f1_loglik",       option-text scoring
                    "accuracy_letter", "accuracy_letter_ci", "macro_f1_letter",          lm-eval's letter format
                    "accuracy_generate", "accuracy_generate_ci", "macro_f1_generate", "unparseable_rate",
                    "picks": {"loglik"|"letter"|"generate": {"predicted", "confusion", "collapsed", ...}},
                    "gain_vs_base[_letter]", "..._ci", "gain_significant[_letter]",
                    "gain_vs_majority[_letter]", "..._ci", "gain_vs_majority_significant[_letter]"},
         "efficiency": {"trainable_parameters", "size_bytes", "train_runtime_s", "train_tokens_per_s",
                        "peak_memory_gb", "latency_s_per_answer", "generated_tokens_per_s",
                        "merged_latency_s_per_answer", "merged_generated_tokens_per_s"},
                       (LoRA on the CPU is evaluated merged; its as-trained speed is then timed on one batch)
         "training": {"loss_curve": [...], "validation_loss_base", "validation_loss_final"} | null,
         "samples": [{"question", "reference", "answer"}, ...]}
"""

from __future__ import annotations

import dataclasses
import gc
import json
import time
from pathlib import Path

import torch

from .config import more_models
from .data import read_processed
from .errors import UsageError
from .classification import COLLAPSE_SHARE, majority, paired, picks
from .harness import letter_picks
from .metrics import bootstrap_ci, macro_f1, parse_choice, text_metrics
from .modeling import default_device, load_model, load_tokenizer, model_compute_dtype, resolve_model
from .outputs import library_versions, load_trained, read_metrics, read_run, signature_differences, update_card, \
    write_json
from .precision import explain, resolve, short
from .records import LETTERS, sample
from .scoring import loss_summary, score_and_generate


# ----------------------------------------------------------------------------------------------- one model

def evaluate_model(model, tokenizer, records: list[dict], cfg, desc: str) -> dict:
    """Loss, generation metrics and multiple-choice accuracy of one loaded model on the test records."""
    free = [r for r in records if not r.get("options")]
    choice = [r for r in records if r.get("options")]
    found = score_and_generate(model, tokenizer, records, cfg.batch_size, cfg.max_new_tokens, cfg.max_length, desc)
    scored = [i for i, n in enumerate(found["tokens"]) if n]  # records with answer tokens within --max_length
    result: dict = {"loss": loss_summary([found["nll"][i] for i in scored], [found["tokens"][i] for i in scored],
                                         interval=True, seed=cfg.seed)}
    # an item whose answer starts beyond --max_length has no loss: counted, never silently left out
    result["loss"]["items_without_answer_tokens"] = len(records) - len(scored)
    timing = found["timing"]
    by_id = dict(zip((id(r) for r in records), found["answers"]))
    options_by_id = dict(zip((id(r) for r in records), found["options"]))
    if free:
        summary, items = text_metrics([by_id[id(r)] for r in free], [r["answer"] for r in free])
        summary["rougeL_ci"] = bootstrap_ci([i["rougeL"] for i in items], seed=cfg.seed)
        result["generation"] = summary
    if choice:
        gold = [r["label"] for r in choice]
        labels = choice_labels(choice)
        loglik = [max(sc, key=sc.get) for sc in (options_by_id[id(r)] for r in choice)]
        parsed = [parse_choice(by_id[id(r)], r["options"]) for r in choice]
        letter = letter_picks(model, tokenizer, choice, batch_size=cfg.batch_size, desc=f"{desc} letters")
        hits = {name: [float(p == g) for p, g in zip(picked, gold)]
                for name, picked in (("loglik", loglik), ("generate", parsed), ("letter", letter))}
        result["choice"] = {
            "items": len(choice),
            **{key: value for name, picked in (("loglik", loglik), ("generate", parsed), ("letter", letter))
               for key, value in ((f"accuracy_{name}", round(sum(hits[name]) / len(choice), 4)),
                                  (f"accuracy_{name}_ci", bootstrap_ci(hits[name], seed=cfg.seed)),
                                  (f"macro_f1_{name}", macro_f1(picked, gold)))},
            "unparseable_rate": round(sum(p is None for p in parsed) / len(choice), 4),
            "picks": {name: picks(picked, gold, labels) for name, picked in
                      (("loglik", loglik), ("letter", letter), ("generate", parsed))},
            "hits_loglik": hits["loglik"], "hits_letter": hits["letter"],
        }
    result["efficiency"] = dict(timing)
    result["samples"] = [{"question": r["question"], "reference": r["answer"], "answer": by_id[id(r)]}
                         for r in (free or choice)[: cfg.num_samples_shown]]
    return result


# ----------------------------------------------------------------------------------------------- all models

METHOD_FLAGS = (("qlora", "qlora_model"), ("adapter", "adapter_model"), ("ptuning", "ptuning_model"))


def choice_labels(records: list[dict]) -> list[str]:
    """The labels multiple-choice records pick among: their option letters, in order."""
    return sorted({k for r in records for k in r["options"]}, key=LETTERS.index)


def load_test_records(path: str, max_samples: int, seed: int) -> list[dict]:
    records = read_processed(Path(path), "--test_data")
    if not records:
        raise UsageError(f"--test_data: '{path}' holds no records; prepare the data with a smaller --train_size")
    return sample(records, max_samples, seed)


def coverage(path: str, records: list[dict], cfg) -> dict:
    """How many test items there were and how many were scored, from the input file to the evaluation: the
    input's own test split (prepare's metadata.json, when it defines one), the test file, the evaluated subset."""
    in_file = len(read_processed(Path(path), "--test_data"))
    meta_path = Path(path).parent / "metadata.json"
    meta = json.loads(meta_path.read_text(encoding="utf-8")) if meta_path.is_file() else {}
    given = (meta.get("predefined_items") or {}).get("test")
    out = {"input_test_items": given["given"] if given else None,
           "not_kept_by_prepare": given["dropped_by_reason"] if given else {},
           "test_file_items": in_file, "evaluated": len(records),
           "sampled": len(records) < in_file, "seed": cfg.seed if len(records) < in_file else None,
           "contexts_shortened": sum("context_kept" in r for r in records)}
    total = out["input_test_items"] or in_file
    out["line"] = (f"{len(records)} of {total} test items scored" + (
        f" (the input's test split had {total}; prepare kept {in_file})" if given and in_file != total else "") + (
        f" (a sample drawn with seed {cfg.seed}; --max_samples -1 scores all {in_file})" if out["sampled"] else "")
        + (f"; {out['contexts_shortened']} with their context shortened to fit" if out["contexts_shortened"] else ""))
    return out


def baseline(path: str, records: list[dict]) -> dict | None:
    """The majority-class baseline of the multiple-choice items: the most frequent label of the training split
    beside the test file (the test file's own when there is none), always given."""
    choice = [r for r in records if r.get("options")]
    if not choice:
        return None
    train_path = Path(path).parent / "train.json"
    prior = [r["label"] for r in read_processed(train_path, "--test_data") if r.get("options")] \
        if train_path.is_file() else []
    source = "the training split" if prior else "the test items (the training split beside the test file has no " \
        "multiple-choice items)" if train_path.is_file() else "the test items (no training split beside the test file)"
    labels = choice_labels(choice)
    shared = all(r["options"] == choice[0]["options"] for r in choice)  # e.g. yes/no/maybe: name labels by text
    return majority(prior or [r["label"] for r in choice], [r["label"] for r in choice], labels, source) | {
        "names": {k: choice[0]["options"][k] if shared else k for k in labels}}


def _one_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0][:300] if text else ''}"


def _efficiency_from_training(path: str) -> tuple[dict, dict | None]:
    m = read_metrics(path)
    if m is None:
        return {}, None
    eff = {"trainable_parameters": m.get("trainable_parameters"), "total_parameters": m.get("total_parameters"),
           "size_bytes": m.get("adapter_size_bytes"), "train_runtime_s": m.get("train_runtime_s"),
           "train_tokens_per_s": m.get("tokens_per_s"), "peak_memory_gb": m.get("peak_memory_gb"),
           "memory_kind": m.get("memory_kind")}
    training = {k: m.get(k) for k in ("loss_curve", "eval_curve", "validation_loss_base", "validation_loss_final",
                                      "steps", "device", "learning_rate_search", "selection", "balance")}
    return eff, training


def is_lora(model) -> bool:
    config = getattr(model, "peft_config", {}).get("default")
    return hasattr(model, "merge_and_unload") and getattr(getattr(config, "peft_type", None), "value", None) == "LORA"


def _speed_of(model, tokenizer, records, cfg, prefix: str) -> dict:
    timing = score_and_generate(model, tokenizer, records[: min(len(records), cfg.batch_size)], cfg.batch_size,
                                cfg.max_new_tokens, cfg.max_length, f"{prefix} generate", score=False)["timing"]
    return {f"{prefix}_latency_s_per_answer": timing["latency_s_per_answer"],
            f"{prefix}_generated_tokens_per_s": timing["generated_tokens_per_s"]}


def _merge_for_evaluation(model, tokenizer, records, cfg) -> tuple[object, dict]:
    """On the CPU a LoRA model is evaluated merged (its extra small matmuls cost a third of the time there),
    after timing one batch as trained; elsewhere it is evaluated as trained and one batch is timed merged.
    Returns the model to evaluate and the speed of the other form."""
    if not is_lora(model):
        return model, {}
    if next(model.parameters()).device.type != "cpu":
        return model, {}
    unmerged = _speed_of(model, tokenizer, records, cfg, "unmerged")
    return model.merge_and_unload(), unmerged


def _merged_speed(model, tokenizer, records, cfg) -> dict:
    """Generation speed after folding LoRA into the base (only LoRA can be merged)."""
    return _speed_of(model.merge_and_unload(), tokenizer, records, cfg, "merged") if is_lora(model) else {}


def targets_of(cfg) -> list[tuple[str, str]]:
    """(name, path) of the base model and of every trained output given (--qlora_model, ...)."""
    return ([("base", cfg.base_model)] + [(m, getattr(cfg, f)) for m, f in METHOD_FLAGS if getattr(cfg, f)]
            + more_models(cfg.more_models))


def check_outputs(cfg, targets: list[tuple[str, str]], log=print) -> None:
    """Refuse a half-written, foreign or mismatched output before loading a model: each must be the named
    method's finished output, trained on --base_model (or on a model of the same shape)."""
    resolved_base = resolve_model(cfg.base_model)
    for name, path in targets[1:]:
        run = read_run(path)
        if name in dict(METHOD_FLAGS) and run["method"] != name:
            raise UsageError(f"--{name}_model: '{path}' holds the output of {run['method']}, not {name}; pass it "
                             f"as --{run['method']}_model")
        trained_on = run["settings"].get("model_name")
        if cfg.base_model != trained_on and resolved_base != run.get("resolved_model"):
            from transformers import AutoConfig

            differences = signature_differences(run.get("base_signature") or {}, AutoConfig.from_pretrained(
                resolved_base, trust_remote_code=cfg.trust_remote_code))
            if differences:
                flag = f"--{name}_model" if name in dict(METHOD_FLAGS) else f"--more_models {name}"
                raise UsageError(f"{flag}: '{path}' was trained on base model '{trained_on}', not on "
                                 f"--base_model '{cfg.base_model}' ({', '.join(differences)}); compare it with "
                                 "its own base")
            log(f"note: {name} was trained on '{trained_on}'; --base_model '{cfg.base_model}' has the same shape")


def load_target(name: str, path: str, cfg) -> tuple[object, object, dict]:
    """(model, tokenizer, what to record of it) of the base model or of a trained output, for scoring."""
    if name == "base":
        resolved = resolve_model(cfg.base_model)
        tokenizer = load_tokenizer(resolved, cfg.trust_remote_code)
        model = load_model(resolved, device=default_device(), trust_remote_code=cfg.trust_remote_code,
                           dtype=resolve(cfg.dtype, default_device()))
        return model, tokenizer, {}
    model, tokenizer, run = load_trained(path, dequantize=default_device() == "cpu",
                                         dtype=None if cfg.dtype == "auto" else cfg.dtype)
    extra = {"settings": run["settings"]}
    if default_device() == "cpu" and run["settings"].get("load_in_4bit"):
        extra["note"] = (f"4-bit base evaluated as {short(model_compute_dtype(model))} layers holding the same "
                         "values (CPU speed)")
    return model, tokenizer, extra


def run_evaluation(cfg, log=print, failed: dict | None = None, fingerprint: str | None = None) -> dict:
    """Evaluate the base model and every fine-tuned model given on the same test items; write the results."""
    records = load_test_records(cfg.test_data, cfg.max_samples, cfg.seed)
    targets = targets_of(cfg)
    check_outputs(cfg, targets, log)
    n_choice = sum(bool(r.get("options")) for r in records)
    cover = coverage(cfg.test_data, records, cfg)
    log(f"evaluating {len(targets)} models on {len(records)} test items ({n_choice} multiple choice): "
        f"{cover['line']}")
    log(explain(cfg.dtype, default_device()))
    results = {}
    for name, path in targets:
        entry = {"name": name, "path": path, "status": "ok", "error": None}
        model = None
        try:
            model, tokenizer, extra = load_target(name, path, cfg)
            entry.update(extra)
            efficiency, training = _efficiency_from_training(path) if name != "base" else ({}, None)
            started = time.time()
            model, other_speed = _merge_for_evaluation(model, tokenizer, records, cfg)
            if other_speed:
                entry["note"] = "; ".join(filter(None, [entry.get("note"), "LoRA merged into the base for the CPU "
                                                        "evaluation (weights rounded to the base's dtype)"]))
            entry.update(evaluate_model(model, tokenizer, records, cfg, name))
            entry["efficiency"].update(efficiency)
            if other_speed:  # evaluated merged: the full run's speed is the merged one
                eff = entry["efficiency"]
                eff["merged_latency_s_per_answer"] = eff.pop("latency_s_per_answer")
                eff["merged_generated_tokens_per_s"] = eff.pop("generated_tokens_per_s")
                eff["latency_s_per_answer"] = other_speed["unmerged_latency_s_per_answer"]
                eff["generated_tokens_per_s"] = other_speed["unmerged_generated_tokens_per_s"]
            else:
                entry["efficiency"].update(_merged_speed(model, tokenizer, records, cfg))
            if default_device() == "cuda":
                entry["efficiency"]["eval_peak_memory_gb"] = round(torch.cuda.max_memory_allocated() / 2**30, 3)
            entry["training"] = training
            entry["eval_seconds"] = round(time.time() - started, 1)
            if name != "base":
                update_card(path, _card_figures(entry))
            log(_summary_line(entry))
        except UsageError as exc:
            entry.update(status="failed", error=str(exc))
            log(f"{name}: failed: {exc}")
        except (RuntimeError, ValueError, OSError) as exc:  # e.g. out of memory: reported, the others go on
            entry.update(status="failed", error=_one_line(exc))
            log(f"{name}: failed: {_one_line(exc)}")
        finally:
            del model
            gc.collect()
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
                torch.cuda.reset_peak_memory_stats()
        results[name] = entry
    for name, error in (failed or {}).items():  # methods whose training failed (run_all)
        results[name] = {"name": name, "path": None, "status": "failed", "error": f"training failed: {error}"}
    majority_baseline = baseline(cfg.test_data, records)
    _add_significance(results, majority_baseline)
    out = {"schema_version": 2, "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "test_data": cfg.test_data,
           "test_items": len(records), "choice_items": n_choice, "coverage": cover,
           "majority_baseline": majority_baseline, "scoring": SCORING,
           "settings": dataclasses.asdict(cfg), "versions": library_versions(), "fingerprint": fingerprint,
           "models": results}
    path = Path(cfg.output_file)
    path.parent.mkdir(parents=True, exist_ok=True)
    write_json(path, out)
    return out


def _card_figures(entry: dict) -> dict:
    """What a model card shows of an evaluation: loss, generation and choice figures (no per-item hits)."""
    figures = {k: entry[k] for k in ("loss", "generation") if k in entry}
    if "choice" in entry:
        figures["choice"] = {k: v for k, v in entry["choice"].items() if not k.startswith("hits_")}
    return figures


SCORING = {
    "loss": "mean cross-entropy per answer token of the reference answer, after the chat-template prompt",
    "accuracy_loglik": "option-text scoring: the option whose text has the highest mean log-probability per "
                       "token as the start of the answer, after the chat-template prompt listing the options",
    "accuracy_letter": "letter scoring, lm-evaluation-harness's zero-shot format and its acc: no chat template; "
                       "'Question: ...\\nA. ...\\nAnswer:' followed by ' A', ' B', ... (PubMedQA: 'Abstract: "
                       "...\\nQuestion: ...\\nAnswer:' followed by ' yes', ' no', ' maybe'); the highest summed "
                       "log-likelihood wins",
    "accuracy_generate": "the option a greedy answer names (a letter, or exactly one option's text)",
    "macro_f1": "the mean over the labels of each label's F1 (a constant answer scores low here however "
                "frequent its label)",
    "majority_baseline": "always answering the most frequent label of the training split",
    "gain_ci": "95% paired bootstrap interval (1,000 resamples of the same items) of the accuracy difference",
    "collapsed": f"one label predicted for more than {COLLAPSE_SHARE:.0%} of the items",
}


def _add_significance(results: dict, majority_baseline: dict | None) -> None:
    """Per method and scoring: the paired bootstrap of its accuracy against the base model's on the same items,
    and every model's against always answering the majority label."""
    base = results.get("base", {}).get("choice")
    for name, entry in results.items():
        mine = entry.get("choice")
        if not mine:
            continue
        for scoring in ("loglik", "letter"):
            suffix = "" if scoring == "loglik" else "_letter"  # the option-text keys keep their first names
            if name != "base" and base:
                vs = paired(mine[f"hits_{scoring}"], base[f"hits_{scoring}"])
                mine |= {f"gain_vs_base{suffix}": vs["gain"], f"gain_vs_base{suffix}_ci": vs["ci"],
                         f"gain_significant{suffix}": vs["significant"]}
            if majority_baseline:
                vs = paired(mine[f"hits_{scoring}"], majority_baseline["hits"])
                mine |= {f"gain_vs_majority{suffix}": vs["gain"], f"gain_vs_majority{suffix}_ci": vs["ci"],
                         f"gain_vs_majority_significant{suffix}": vs["significant"]}


def _summary_line(entry: dict) -> str:
    missing = entry["loss"].get("items_without_answer_tokens")
    parts = [f"{entry['name']}: loss {entry['loss']['loss']:.3f} (ppl {entry['loss']['perplexity']:.2f}"
             + (f"; {missing} items have no answer token within --max_length" if missing else "") + ")"]
    if "generation" in entry:
        parts.append(f"ROUGE-L {entry['generation']['rougeL']:.3f}")
    if "choice" in entry:
        c = entry["choice"]
        parts.append(f"MC accuracy {c['accuracy_loglik']:.3f} (option text), {c['accuracy_letter']:.3f} (letters, "
                     f"lm-eval format), {c['accuracy_generate']:.3f} (generated); macro-F1 {c['macro_f1_loglik']:.3f}")
        if c["picks"]["loglik"]["collapsed"]:
            parts.append(f"collapsed: {c['picks']['loglik']['collapsed_share']:.0%} of its option-text picks are "
                         f"'{c['picks']['loglik']['collapsed']}'")
    return "; ".join(parts)
