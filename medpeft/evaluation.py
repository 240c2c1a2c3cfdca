"""Scores of a model on processed data: answer-only loss, generation metrics, multiple-choice accuracy, speed.

    evaluate(cfg)  ->  evaluation_results.json  (schema below) + report.md / report.html (see report.py)

evaluation_results.json:
    {"schema_version": 1, "created": ..., "test_data": ..., "settings": {...}, "versions": {...},
     "models": {"base": {...}, "qlora": {...}, ...}}          one entry per model, each:
        {"name", "path", "status": "ok" | "failed", "error": null | "one line",
         "loss": {"loss", "perplexity", "tokens", "examples"},
         "generation": {"rouge1", "rouge2", "rougeL", "bleu", "token_f1", "rougeL_ci": [lo, hi], "items"},
         "choice": {"items", "accuracy_loglik", "accuracy_loglik_ci", "macro_f1_loglik",
                    "accuracy_generate", "accuracy_generate_ci", "macro_f1_generate", "unparseable_rate"},
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
import random
import time
from pathlib import Path

import torch

from .data import read_processed
from .errors import UsageError
from .metrics import bootstrap_ci, macro_f1, parse_choice, text_metrics
from .modeling import default_device, load_model, load_tokenizer, model_compute_dtype, resolve_model
from .outputs import library_versions, load_trained, read_metrics, read_run, signature_differences, update_card, \
    write_json
from .precision import explain, resolve, short
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
    timing = found["timing"]
    by_id = dict(zip((id(r) for r in records), found["answers"]))
    options_by_id = dict(zip((id(r) for r in records), found["options"]))
    if free:
        summary, items = text_metrics([by_id[id(r)] for r in free], [r["answer"] for r in free])
        summary["rougeL_ci"] = bootstrap_ci([i["rougeL"] for i in items], seed=cfg.seed)
        result["generation"] = summary
    if choice:
        gold = [r["label"] for r in choice]
        loglik = [max(sc, key=sc.get) for sc in (options_by_id[id(r)] for r in choice)]
        parsed = [parse_choice(by_id[id(r)], r["options"]) for r in choice]
        hits_ll = [float(p == g) for p, g in zip(loglik, gold)]
        hits_gen = [float(p == g) for p, g in zip(parsed, gold)]
        result["choice"] = {
            "items": len(choice),
            "accuracy_loglik": round(sum(hits_ll) / len(choice), 4),
            "accuracy_loglik_ci": bootstrap_ci(hits_ll, seed=cfg.seed),
            "macro_f1_loglik": macro_f1(loglik, gold),
            "accuracy_generate": round(sum(hits_gen) / len(choice), 4),
            "accuracy_generate_ci": bootstrap_ci(hits_gen, seed=cfg.seed),
            "macro_f1_generate": macro_f1(parsed, gold),
            "unparseable_rate": round(sum(p is None for p in parsed) / len(choice), 4),
            "hits_loglik": hits_ll,
        }
    result["efficiency"] = dict(timing)
    result["samples"] = [{"question": r["question"], "reference": r["answer"], "answer": by_id[id(r)]}
                         for r in (free or choice)[: cfg.num_samples_shown]]
    return result


# ----------------------------------------------------------------------------------------------- all models

METHOD_FLAGS = (("qlora", "qlora_model"), ("adapter", "adapter_model"), ("ptuning", "ptuning_model"))


def load_test_records(path: str, max_samples: int, seed: int) -> list[dict]:
    records = read_processed(Path(path), "--test_data")
    if not records:
        raise UsageError(f"--test_data: '{path}' holds no records; prepare the data with a smaller --train_size")
    if 0 < max_samples < len(records):
        records = [records[i] for i in sorted(random.Random(seed).sample(range(len(records)), max_samples))]
    return records


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
                                      "steps", "device")}
    return eff, training


def _is_lora(model) -> bool:
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
    if not _is_lora(model):
        return model, {}
    if next(model.parameters()).device.type != "cpu":
        return model, {}
    unmerged = _speed_of(model, tokenizer, records, cfg, "unmerged")
    return model.merge_and_unload(), unmerged


def _merged_speed(model, tokenizer, records, cfg) -> dict:
    """Generation speed after folding LoRA into the base (only LoRA can be merged)."""
    return _speed_of(model.merge_and_unload(), tokenizer, records, cfg, "merged") if _is_lora(model) else {}


def run_evaluation(cfg, log=print, failed: dict | None = None, fingerprint: str | None = None) -> dict:
    """Evaluate the base model and every fine-tuned model given on the same test items; write the results."""
    records = load_test_records(cfg.test_data, cfg.max_samples, cfg.seed)
    targets = [("base", cfg.base_model)] + [(m, getattr(cfg, f)) for m, f in METHOD_FLAGS if getattr(cfg, f)]
    resolved_base = resolve_model(cfg.base_model)
    for name, path in targets[1:]:  # refuse a half-written, foreign or mismatched output before loading a model
        run = read_run(path)
        if run["method"] != name:
            raise UsageError(f"--{name}_model: '{path}' holds the output of {run['method']}, not {name}; pass it "
                             f"as --{run['method']}_model")
        trained_on = run["settings"].get("model_name")
        if cfg.base_model != trained_on and resolved_base != run.get("resolved_model"):
            from transformers import AutoConfig

            differences = signature_differences(run.get("base_signature") or {}, AutoConfig.from_pretrained(
                resolved_base, trust_remote_code=cfg.trust_remote_code))
            if differences:
                raise UsageError(f"--{name}_model: '{path}' was trained on base model '{trained_on}', not on "
                                 f"--base_model '{cfg.base_model}' ({', '.join(differences)}); compare it with "
                                 "its own base")
            log(f"note: {name} was trained on '{trained_on}'; --base_model '{cfg.base_model}' has the same shape")
    n_choice = sum(bool(r.get("options")) for r in records)
    log(f"evaluating {len(targets)} models on {len(records)} test items ({n_choice} multiple choice)")
    log(explain(cfg.dtype, default_device()))
    results = {}
    for name, path in targets:
        entry = {"name": name, "path": path, "status": "ok", "error": None}
        model = None
        try:
            if name == "base":
                tokenizer = load_tokenizer(resolved_base, cfg.trust_remote_code)
                model = load_model(resolved_base, device=default_device(), trust_remote_code=cfg.trust_remote_code,
                                   dtype=resolve(cfg.dtype, default_device()))
                efficiency, training = {}, None
            else:
                model, tokenizer, run = load_trained(path, dequantize=default_device() == "cpu",
                                                     dtype=None if cfg.dtype == "auto" else cfg.dtype)
                if default_device() == "cpu" and run["settings"].get("load_in_4bit"):
                    entry["note"] = (f"4-bit base evaluated as {short(model_compute_dtype(model))} layers holding "
                                     "the same values (CPU speed)")
                efficiency, training = _efficiency_from_training(path)
                entry["settings"] = run["settings"]
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
    _add_significance(results)
    out = {"schema_version": 1, "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "test_data": cfg.test_data,
           "test_items": len(records), "choice_items": n_choice, "settings": dataclasses.asdict(cfg),
           "versions": library_versions(), "fingerprint": fingerprint, "models": results}
    path = Path(cfg.output_file)
    path.parent.mkdir(parents=True, exist_ok=True)
    write_json(path, out)
    return out


def _card_figures(entry: dict) -> dict:
    """What a model card shows of an evaluation: loss, generation and choice figures (no per-item hits)."""
    figures = {k: entry[k] for k in ("loss", "generation") if k in entry}
    if "choice" in entry:
        figures["choice"] = {k: v for k, v in entry["choice"].items() if k != "hits_loglik"}
    return figures


def _add_significance(results: dict) -> None:
    """Per method: is its multiple-choice accuracy's gain over the base outside the base's 95% interval,
    and a paired bootstrap interval of the difference."""
    base = results.get("base", {}).get("choice")
    for name, entry in results.items():
        mine = entry.get("choice")
        if name == "base" or not base or not mine:
            continue
        diffs = [a - b for a, b in zip(mine["hits_loglik"], base["hits_loglik"])]
        ci = bootstrap_ci(diffs)
        mine["gain_vs_base"] = round(sum(diffs) / len(diffs), 4)
        mine["gain_vs_base_ci"] = ci
        mine["gain_significant"] = ci[0] > 0 or ci[1] < 0


def _summary_line(entry: dict) -> str:
    parts = [f"{entry['name']}: loss {entry['loss']['loss']:.3f} (ppl {entry['loss']['perplexity']:.2f})"]
    if "generation" in entry:
        parts.append(f"ROUGE-L {entry['generation']['rougeL']:.3f}")
    if "choice" in entry:
        parts.append(f"MC accuracy {entry['choice']['accuracy_loglik']:.3f} (log-lik), "
                     f"{entry['choice']['accuracy_generate']:.3f} (generated)")
    return "; ".join(parts)
