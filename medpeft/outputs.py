"""The folders medpeft writes and reads back: one owner for their file names, their atomic writing and their reading.

A training output (written to a hidden temporary folder, renamed into place when complete):
    <method files>            adapter_model.safetensors + adapter_config.json (peft), or the AdapterHub format
    tokenizer files           the tokenizer used, with its fixed special tokens
    medpeft_config.json       method, every resolved setting, resolved base model, base signature, data summary
    metrics.json              loss curve, base/final validation loss, runtime, tokens/s, memory, parameters, versions
    README.md                 model card
    logs/                     TensorBoard event files

Evaluation, export, inference and the pipeline read outputs through this module (`read_run`, `read_metrics`,
`load_trained`); none of them imports training.
"""

from __future__ import annotations

import dataclasses
import json
import os
import platform
import shutil
from pathlib import Path

import torch

from . import methods
from .errors import UsageError
from .modeling import default_device, dequantize_4bit, load_model, load_tokenizer, pin_4bit_layout, prepare_kbit, \
    resolve_model
from .precision import cpu_bf16, cpu_name, resolve

CONFIG_FILE = "medpeft_config.json"
METRICS_FILE = "metrics.json"
CARD_FILE = "README.md"
SIGNATURE_FIELDS = ("model_type", "hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size",
                    "vocab_size")
DISCLAIMER = ("**Not medical advice.** This model is a research artefact. Its answers can be wrong, outdated or "
              "unsafe; they must not be used to diagnose, treat or make decisions about any person's health. "
              "A qualified clinician must check anything it says.")


def atomic_write(path: Path, data: str | bytes) -> None:
    """Write to a temporary file beside `path`, then rename it into place: a crash leaves the old file or none,
    never half of the new one."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        if isinstance(data, bytes):
            tmp.write_bytes(data)
        else:
            tmp.write_text(data, encoding="utf-8")
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def write_json(path: Path, data) -> None:
    atomic_write(path, json.dumps(data, indent=2, ensure_ascii=False, default=str) + "\n")


def publish_dir(tmp: Path, target: Path, marker: str) -> None:
    """Move a finished output into place; refuse to clobber a folder that is not one of ours."""
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o777 & ~umask)  # mkdtemp makes it private; the output should look like any other folder
    if target.exists():
        if any(target.iterdir()) and not (target / marker).exists():
            raise UsageError(f"output directory '{target}' exists and is not a medpeft output (no {marker}); "
                             "choose another --output_dir or empty it")
        old = target.with_name(f".{target.name}.old-{os.getpid()}")
        os.replace(target, old)
        os.replace(tmp, target)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(tmp, target)


def library_versions() -> dict:
    import importlib.metadata as md

    out = {"python": platform.python_version(), "platform": platform.platform(), "cpu": cpu_name(),
           "cpu_bf16_native": cpu_bf16().native}
    for name in ("medpeft", "torch", "transformers", "peft", "adapters", "trl", "bitsandbytes", "accelerate"):
        try:
            out[name] = md.version(name)
        except md.PackageNotFoundError:
            out[name] = None
    if torch.cuda.is_available():
        out["cuda_device"] = torch.cuda.get_device_name(0)
    return out


def check_output_dir(out: Path) -> None:
    """Refuse an --output_dir that holds something other than a medpeft output."""
    if out.exists() and (not out.is_dir() or (any(out.iterdir()) and not (out / CONFIG_FILE).exists())):
        raise UsageError(f"--output_dir '{out}' exists and is not a medpeft output (no {CONFIG_FILE}); "
                         "choose another --output_dir or empty it")


def base_signature(model) -> dict:
    """The shape of the base model a method was trained on; loading onto another shape is refused."""
    config = model.config
    return {k: getattr(config, k, None) for k in SIGNATURE_FIELDS}


def signature_differences(expected: dict, config) -> list[str]:
    """'field trained vs found' for each shape field of `expected` that `config` does not share."""
    return [f"{k} {v} vs {getattr(config, k, None)}" for k, v in expected.items() if v != getattr(config, k, None)]


def read_run(out_dir: str) -> dict:
    path = Path(out_dir) / CONFIG_FILE
    if not path.is_file():
        raise UsageError(f"'{out_dir}' is not a complete medpeft training output (no {CONFIG_FILE})")
    return json.loads(path.read_text(encoding="utf-8"))


def read_metrics(out_dir: str) -> dict | None:
    """metrics.json of a training output, or None when it has none."""
    path = Path(out_dir) / METRICS_FILE
    return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else None


def write_output_files(staging: Path, run_info: dict, metrics: dict) -> None:
    """The files every training output holds beside the method's weights and the tokenizer."""
    write_json(staging / CONFIG_FILE, run_info)
    write_json(staging / METRICS_FILE, metrics)
    write_model_card(staging, run_info, metrics)


def update_card(out_dir: str, evaluation: dict) -> None:
    """The model card of an evaluated output gains the evaluation figures (a read-only output stays as it is)."""
    try:
        run, metrics = read_run(out_dir), read_metrics(out_dir)
        write_model_card(Path(out_dir), run, metrics, evaluation=evaluation)
    except (OSError, ValueError, UsageError):
        pass


def load_trained(out_dir: str, device: str | None = None, dequantize: bool = False, dtype: str | None = None):
    """(model, tokenizer, run config) of a finished training output, ready for evaluation or generation.

    `dequantize`: a 4-bit base is turned into plain layers holding the same values, in its compute dtype
    (bitsandbytes' CPU 4-bit matmul is slower than a plain one; the logits stay the same to rounding).
    `dtype` overrides the run's --dtype."""
    run = read_run(out_dir)
    method = methods.get(run["method"])
    settings = run["settings"]
    names = {f.name for f in dataclasses.fields(method.Options)}
    opts = method.Options(**{k: v for k, v in settings.items() if k in names})
    resolved = resolve_model(settings["model_name"])
    tokenizer = load_tokenizer(str(out_dir))
    four_bit = settings.get("load_in_4bit", False)
    device = device or default_device()
    base = load_model(resolved, load_in_4bit=four_bit, device=device,
                      trust_remote_code=settings.get("trust_remote_code", False),
                      dtype=resolve(dtype or settings.get("dtype", "auto"), device))
    if four_bit:  # the same norm and embedding dtypes as during training, so logits match exactly
        base = prepare_kbit(base)
        if dequantize:
            base = dequantize_4bit(base)
    differences = signature_differences(run.get("base_signature") or {}, base.config)
    if differences:
        raise UsageError(f"the {run['method']} weights in '{out_dir}' do not fit base model "
                         f"'{settings['model_name']}': trained on another shape ({', '.join(differences)})")
    try:
        model = pin_4bit_layout(method.load(base, Path(out_dir), opts))
    except (RuntimeError, ValueError, KeyError) as exc:  # size mismatches, missing modules
        raise UsageError(f"the {run['method']} weights in '{out_dir}' do not fit base model "
                         f"'{settings['model_name']}': {str(exc).strip().splitlines()[0][:300]}") from exc
    model.eval()
    return model, tokenizer, run


def write_model_card(out_dir: Path, run: dict, metrics: dict | None = None, evaluation: dict | None = None) -> Path:
    """README.md for a training (or merged) output: base model, method and settings, data, figures, limits."""
    settings = run.get("settings", {})
    data = run.get("data") or {}
    library = "transformers" if run.get("merged_from") or run.get("method") == "adapter" else "peft"
    front = ["---", f"base_model: {json.dumps(str(settings.get('model_name')))}", f"library_name: {library}",
             "tags: [medical, medpeft, " + str(run.get("method")) + "]", "---", ""]
    lines = front + [f"# {run.get('method', 'model')} adapter of {settings.get('model_name', '?')} (medpeft)", "",
             DISCLAIMER, "",
             "## Model", "",
             f"- base model: `{settings.get('model_name')}` (resolved: `{run.get('resolved_model')}`)",
             f"- method: **{run.get('method')}**" + (" (merged into the base: a standalone model)"
                                                      if run.get("merged_from") else ""),
             "- settings: " + ", ".join(f"`{k}={v}`" for k, v in sorted(settings.items())
                                        if k not in ("output_dir", "data_path")), "",
             "## Data", "",
             f"- source: `{data.get('input_data')}` (sha256 `{str(data.get('input_sha256'))[:16]}…`)",
             f"- schema: {data.get('schema')}; examples per split: {data.get('counts')}", ""]
    if metrics:
        lines += ["## Training", "",
                  f"- validation loss: {metrics.get('validation_loss_base')} (base) → "
                  f"{metrics.get('validation_loss_final')} (tuned), {metrics.get('validation_examples')} examples",
                  f"- {metrics.get('steps')} steps, {metrics.get('train_runtime_s')} s on {metrics.get('device')}, "
                  f"{metrics.get('tokens_per_s')} tokens/s, peak memory {metrics.get('peak_memory_gb')} GB",
                  f"- trainable parameters: {metrics.get('trainable_parameters'):,} of "
                  f"{metrics.get('total_parameters'):,}" if metrics.get("trainable_parameters") else "",
                  "- training logs: `logs/` (TensorBoard: `tensorboard --logdir logs`)"
                  if (Path(out_dir) / "logs").is_dir() else "", ""]
        lines += selection_lines(metrics)
    if run.get("merge_check"):
        c = run["merge_check"]
        lines += ["## Merge check", "", f"- max |logit difference| vs the adapter model: {c['max_abs_logit_diff']} "
                  f"(logits span {c['logit_range']}; same greedy next tokens: {c['same_greedy_next_tokens']})", ""]
    if evaluation:
        lines += ["## Evaluation", "", "```json", json.dumps(evaluation, indent=1)[:4000], "```", ""]
    lines += ["## Intended use and limits", "",
              "For research on adapting language models to medical question answering. Trained on the data above "
              "only; it inherits the base model's biases and gaps, may state false facts fluently, and was not "
              "evaluated for clinical safety. Not for use with patients.", "",
              "## Loading", "", _loading_hint(run), ""]
    path = Path(out_dir) / CARD_FILE
    atomic_write(path, "\n".join(x for x in lines if x is not None) + "\n")
    return path


def selection_lines(metrics: dict) -> list[str]:
    """How the saved weights were chosen: the learning-rate search's candidates, the checkpoint kept, the balance."""
    lines = []
    search = metrics.get("learning_rate_search")
    if search:
        lines += [f"Learning rate searched (`--learning_rate auto`, {search['steps_per_candidate']} steps per candidate, "
                  f"scored on the validation split by {search['metric']}; {search['seconds']} s, "
                  f"{search.get('cost_ratio')}x the run): **{search['winner']:.2g}** won by {search['margin']:+.4f}.", "",
                  "| learning rate | score | accuracy | macro-F1 | answer loss | steps |", "|---:|---:|---:|---:|---:|---:|"]
        lines += [f"| {c['learning_rate']:.2g} | {c['score']:.4f} | {c.get('accuracy', '–')} | {c.get('macro_f1', '–')} "
                  f"| {c['loss']:.4f}{' (diverged)' if c.get('diverged') else ''} | {c['steps']} |"
                  for c in search["candidates"]] + [""]
        base = search.get("base_validation")
        if base and base.get("loss") is not None:
            lines += [f"The base model's validation answer loss: {base['loss']:.4f}; a candidate or step whose answer "
                      "loss is above it is marked diverged and ranked below every other.", ""]
        guard = search.get("guard")
        if guard:
            lines += [f"Guard (`--sweep_guard`): the full run at the default {guard['default']:.2g} scored "
                      f"{guard['default_validation']:.4f} on validation, at the winner {guard['winner_validation']:.4f}; "
                      f"kept the {guard['kept']} ({guard['seconds']} s more).", ""]
    chosen = metrics.get("selection")
    if chosen and chosen.get("best"):
        lines += [f"Checkpoint kept (`--select {chosen['select']}`, validation scored every {chosen['every_steps']} "
                  f"steps): step {chosen['chosen_step']} of {chosen['last_step']} (best: step {chosen['best']['step']}, "
                  f"{chosen['best']['metric']} {chosen['best']['score']:.4f})"
                  + ("; stopped early" if chosen.get("stopped_early") else "") + ".", ""]
    if metrics.get("balance"):
        b = metrics["balance"]
        lines += [f"Labels balanced (`--balance labels`): training label counts {b['before']} → {b['after']}.", ""]
    return lines


def _loading_hint(run: dict) -> str:
    """The card's loading snippet, runnable as it stands (tests/test_using.py runs it for every method)."""
    folder = run.get("merged_to") or run.get("settings", {}).get("output_dir")
    base = run.get("resolved_model") or run.get("settings", {}).get("model_name")
    if run.get("merged_from"):
        lines = ["from transformers import AutoModelForCausalLM", "",
                 f"model = AutoModelForCausalLM.from_pretrained({json.dumps(folder)})"]
    elif run.get("method") == "adapter":
        lines = ["import adapters", "from transformers import AutoModelForCausalLM", "",
                 f"model = AutoModelForCausalLM.from_pretrained({json.dumps(base)})  # the base model",
                 "adapters.init(model)",
                 f"model.load_adapter({json.dumps(folder)}, with_head=False, set_active=True, use_safetensors=True)"]
    else:
        lines = ["from peft import PeftModel", "from transformers import AutoModelForCausalLM", "",
                 f"base_model = AutoModelForCausalLM.from_pretrained({json.dumps(base)})",
                 f"model = PeftModel.from_pretrained(base_model, {json.dumps(folder)})"]
    return "```python\n" + "\n".join(lines) + "\n```"
