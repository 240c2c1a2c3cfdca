"""Standard benchmarks through lm-evaluation-harness, for the base model and every trained output at once.

    medpeft bench --base_model M --qlora_model models/qlora --tasks medical --limit 200
    medpeft bench --base_model M --adapter_model models/adapter --tasks medqa_local,pubmedqa_local \
        --data_dir my_benchmarks --general_tasks general_local

Each model is loaded by medpeft (GGUF bases, 4-bit QLoRA, AdapterHub, P-Tuning) and handed to lm-eval's HFLM as a
model object: the same weights lm-eval's own `peft=` path would build for LoRA, and the only way in for the other
two. lm-eval's per-task accuracy and stderr go into the results file under "bench", with a paired bootstrap of each
output against the base over the items both scored; `--general_tasks` is the forgetting check, shown apart.
Offline, the task files in medpeft/resources/lm_eval_tasks read local MedQA/MedMCQA/PubMedQA-layout files.
"""

from __future__ import annotations

import difflib
import json
from collections import Counter
import re
import shutil
import tempfile
import time
from pathlib import Path

import torch

from .classification import paired_sets
from .config import PrepareConfig
from .errors import UsageError
from .evaluation import check_outputs, is_lora, load_target, targets_of
from .modeling import autocast, default_device, hub_reachable
from .outputs import write_json
from .readers import read_rows
from .records import detect_schema, to_record

TASKS_DIR = Path(__file__).parent / "resources" / "lm_eval_tasks"
GROUPS = {  # what the Open Medical-LLM Leaderboard reports, and general tasks for the forgetting check
    "medical": ["pubmedqa", "medqa_4options", "medmcqa", "mmlu_anatomy", "mmlu_clinical_knowledge",
                "mmlu_college_medicine", "mmlu_medical_genetics", "mmlu_professional_medicine",
                "mmlu_college_biology"],
    "medical_local": ["medqa_local", "medmcqa_local", "pubmedqa_local"],
    "general": ["arc_easy", "mmlu_high_school_geography", "mmlu_world_religions"],
}
LOCAL_FILES = {"medqa_local": "medqa_test.jsonl", "medmcqa_local": "medmcqa_test.jsonl",
               "pubmedqa_local": "pubmedqa_test.jsonl", "general_local": "general_test.jsonl"}


def _lm_eval():
    try:
        import lm_eval
        import lm_eval.tasks
        from lm_eval.models.huggingface import HFLM
    except ImportError as exc:
        raise UsageError("medpeft bench needs lm-evaluation-harness: pip install 'lm-eval==0.4.13' (or "
                         "pip install 'medpeft[bench]')") from exc
    return lm_eval, HFLM


def task_list(spec: str) -> list[str]:
    names = []
    for part in (p.strip() for p in spec.split(",")):
        names += GROUPS.get(part, [part] if part else [])
    return list(dict.fromkeys(names))


def _local_dir(cfg) -> Path:
    """The shipped task files, their data paths pointed at --data_dir (relative ones stay relative to the
    working folder), and the user's --tasks_dir beside them."""
    out = Path(tempfile.mkdtemp(prefix="medpeft-tasks-"))
    for path in TASKS_DIR.iterdir():
        text = path.read_text(encoding="utf-8")
        if path.suffix == ".yaml" and cfg.data_dir:
            text = re.sub(r"(data_files:\s*\{test:\s*)([^}\s]+)",
                          lambda m: m.group(1) + json.dumps(str(Path(cfg.data_dir).resolve() / m.group(2))), text)
        (out / path.name).write_text(text, encoding="utf-8")
    return out


def resolve_tasks(cfg, task_manager, names: list[str]) -> None:
    """Unknown names list the near matches; a local task whose file is missing names it; a hub task offline
    says which local task and file would do instead."""
    known = set(task_manager.all_tasks)
    unknown = [n for n in names if n not in known]
    if unknown:
        hints = [f"{n} (did you mean {', '.join(difflib.get_close_matches(n, known, 3, 0.6)) or 'nothing close'}?)"
                 for n in unknown]
        raise UsageError(f"--tasks: unknown task(s): {'; '.join(hints)}; groups: {', '.join(GROUPS)}; a folder of "
                         "your own task files goes in --tasks_dir")
    for name in names:
        if name in LOCAL_FILES:
            where = Path(cfg.data_dir or ".") / LOCAL_FILES[name]
            if not where.is_file():
                raise UsageError(f"--tasks: {name} reads '{where}', which does not exist; put the file there "
                                 "(the README's layouts) or point --data_dir at its folder")
            _check_local_file(name, where)
    hub = [n for n in names if n not in LOCAL_FILES and not _is_user_task(cfg, n)]
    if hub and not hub_reachable():
        local = {"pubmedqa": "pubmedqa_local", "medqa_4options": "medqa_local", "medmcqa": "medmcqa_local"}
        raise UsageError(f"--tasks: {', '.join(hub)} read their data from the Hugging Face hub, which cannot be "
                         "reached; offline, use the local tasks (" + ", ".join(
                             f"{local.get(n, 'general_local')} reading {LOCAL_FILES[local.get(n, 'general_local')]}"
                             for n in hub) + ") with --data_dir")


def _check_local_file(name: str, path: Path) -> None:
    """A local task's file must hold multiple-choice rows medpeft can read (what the task files score)."""
    rows, _ = read_rows(str(path))
    try:
        schema = detect_schema(rows, PrepareConfig(input_data=str(path)))
    except UsageError as exc:
        raise UsageError(f"--tasks: {name} reads '{path}': {exc}") from None
    usable = sum(bool((rec := to_record(r, schema, "")[0]) and rec.get("options")) for r in rows)
    if not usable:
        raise UsageError(f"--tasks: {name} reads '{path}', whose {len(rows)} rows hold no multiple-choice item "
                         "(question, options and a right answer, in the README's layouts)")


def _is_user_task(cfg, name: str) -> bool:
    return bool(cfg.tasks_dir) and any(f"task: {name}" in p.read_text(encoding="utf-8", errors="replace")
                                       for p in Path(cfg.tasks_dir).glob("*.yaml"))


class _AsScored(torch.nn.Module):
    """The model as medpeft's evaluation runs it, for lm-eval: under medpeft's autocast (a 4-bit base computes in
    its compute dtype), and without P-Tuning's virtual-token logits, which its forward returns before the text's
    while lm-eval reads logits by text position."""

    def __init__(self, model):
        super().__init__()
        self.inner = model
        self.config = model.config
        self.name_or_path = getattr(model, "name_or_path", "medpeft")
        config = (getattr(model, "peft_config", None) or {}).get("default")
        self.virtual = getattr(config, "num_virtual_tokens", 0) if getattr(
            getattr(config, "peft_type", None), "value", None) == "P_TUNING" else 0

    @property
    def device(self):
        return next(self.inner.parameters()).device

    def tie_weights(self):  # lm-eval ties a model it was given; medpeft's loaders have done so already
        pass

    def forward(self, input_ids, attention_mask=None, **kwargs):
        with autocast(self.inner):
            out = self.inner(input_ids=input_ids, attention_mask=attention_mask, **kwargs)
        out.logits = out.logits[:, self.virtual:]
        return out


def _as_lm(model, tokenizer, cfg, HFLM):
    return HFLM(pretrained=_AsScored(model), tokenizer=tokenizer, batch_size=cfg.batch_size, max_length=cfg.max_length)


def _per_task(out: dict) -> dict:
    """lm-eval's results and samples -> {task: {acc, acc_stderr, acc_norm?, items, hits: {doc_id: 0/1}}}."""
    tasks = {}
    for task, metrics in out["results"].items():
        samples = out.get("samples", {}).get(task)
        if not samples:  # a group's aggregate row
            continue
        gold = Counter(str(s["target"]) for s in samples)
        entry = {"acc": metrics.get("acc,none"), "acc_stderr": metrics.get("acc_stderr,none"),
                 "items": len(samples), "hits": {str(s["doc_id"]): float(s["acc"]) for s in samples},
                 # always giving the items' most frequent answer (the test prior: an upper bound of the baseline)
                 "majority_acc": round(max(gold.values()) / len(samples), 4),
                 "picks": {str(s["doc_id"]): _argmax([r[0] for r in s["filtered_resps"]]) for s in samples}}
        if metrics.get("acc_norm,none") is not None:
            entry["acc_norm"] = metrics["acc_norm,none"]
        tasks[task] = entry
    return tasks


def _argmax(values: list[float]) -> int:
    return max(range(len(values)), key=lambda i: (values[i], -i))  # the first of equals, as numpy's argmax


def run_bench(cfg, log=print) -> dict:
    """Every model on every task; the results go under "bench" in --output_file (beside evaluate's, if any)."""
    lm_eval, HFLM = _lm_eval()
    medical, general = task_list(cfg.tasks), task_list(cfg.general_tasks)
    if not medical:
        raise UsageError("--tasks is empty; name tasks or a group (" + ", ".join(GROUPS) + ")")
    tasks_dir = _local_dir(cfg)
    try:
        task_manager = lm_eval.tasks.TaskManager(include_path=[str(tasks_dir)] + (
            [cfg.tasks_dir] if cfg.tasks_dir else []))
        resolve_tasks(cfg, task_manager, medical + general)
        targets = targets_of(cfg)
        check_outputs(cfg, targets, log)
        models: dict[str, dict] = {}
        for name, path in targets:
            started = time.time()
            model = None
            try:
                model, tokenizer, _ = load_target(name, path, cfg)
                if default_device() == "cpu" and is_lora(model):  # as evaluate does: the CPU runs it merged faster
                    model = model.merge_and_unload()
                out = lm_eval.simple_evaluate(model=_as_lm(model, tokenizer, cfg, HFLM), tasks=medical + general,
                                              task_manager=task_manager, limit=cfg.limit if cfg.limit > 0 else None,
                                              log_samples=True, bootstrap_iters=1000, random_seed=cfg.seed,
                                              numpy_random_seed=cfg.seed, torch_random_seed=cfg.seed)
                models[name] = _per_task(out)
                log(f"{name}: " + ", ".join(f"{t} {r['acc']:.3f}" for t, r in models[name].items())
                    + f" ({time.time() - started:.0f} s)")
            except (RuntimeError, ValueError, OSError) as exc:  # one model failing leaves the others' figures
                models[name] = {"_error": f"{type(exc).__name__}: {str(exc).strip().splitlines()[0][:300]}"}
                log(f"{name}: failed: {models[name]['_error']}")
            finally:
                del model
    finally:
        shutil.rmtree(tasks_dir, ignore_errors=True)
    base = models.get("base", {})
    for name, tasks in models.items():
        for task, r in tasks.items():
            if name != "base" and task in base and task != "_error":
                vs = paired_sets(r["hits"], base[task]["hits"], seed=cfg.seed)
                r |= {"gain_vs_base": vs["gain"], "gain_vs_base_ci": vs["ci"], "significant": vs["significant"]}
    bench = {"lm_eval_version": lm_eval.__version__ if hasattr(lm_eval, "__version__") else _version(),
             "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "limit": cfg.limit, "tasks": medical,
             "general": general, "num_fewshot": 0, "models": models}
    return _write(cfg, bench)


def _version() -> str:
    from importlib.metadata import version

    return version("lm_eval")


def _write(cfg, bench: dict) -> dict:
    path = Path(cfg.output_file)
    results = {}
    if path.is_file():
        try:
            results = json.loads(path.read_text(encoding="utf-8"))
        except ValueError:
            results = {}
    if not isinstance(results, dict) or "models" not in results:  # no evaluation beside it: bench alone
        results = {"schema_version": 2, "created": bench["created"], "models": {}, "test_items": 0,
                   "choice_items": 0, "test_data": None}
    results["bench"] = bench
    path.parent.mkdir(parents=True, exist_ok=True)
    write_json(path, results)
    return results
