"""The one-command pipeline: prepare -> train every method -> evaluate -> report.

    python run_all.py                       # bundled sample + embedded SmolLM2-135M, on the CPU
    python run_all.py --input_data data.csv --model_name mistralai/Mistral-7B-Instruct-v0.2 --num_epochs 3

Layout under --output_root: processed_data/, models/<method>/, evaluation_results.json, report.md, report.html.
A stage is skipped when its output is complete and was made from the same settings and inputs (a fingerprint
stored in the output); a training stage that was killed resumes from its newest checkpoint; a method that fails
is reported as failed and the others go on.

Settings: RunConfig below holds what only the pipeline has; every training flag (TrainConfig) is a run_all flag too,
for every method, and a --config file's per-method sections (`qlora: {lora_r: 8}`) hold a method's own.
All of them go through config.settle, and every problem of every method is reported before anything runs.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import re
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import yaml

import torch

from . import config, methods, precision
from .bench import run_bench
from .config import DEFAULT_SYSTEM_PROMPT, BenchConfig, EvalConfig, PrepareConfig, TrainConfig, opt
from .data import prepare
from .distributed import launch
from .errors import UsageError
from .evaluation import run_evaluation
from .modeling import default_device
from .outputs import CONFIG_FILE
from .report import write_report
from .sample_data import SAMPLE_PATH
from .training import train

DEMO_CONFIG = Path(__file__).parent / "resources" / "demo.yaml"
DEFAULTS = {"model_name": "smollm2-135m"}  # run_all's defaults that differ from TrainConfig's
OWNED = ("data_path", "output_dir", "resume_from_checkpoint")  # set by the pipeline for each stage, not flags
# A --config section of settings for machines whose models compute in float32 (a CPU without native bf16 runs
# the same job about half as fast): they replace the file's own, top-level and per-method; a flag still wins.
FLOAT32 = "float32"


@dataclass
class RunConfig:
    input_data: str = opt(str(SAMPLE_PATH), "medical data (default: the bundled synthetic sample)")
    methods: str = opt(",".join(methods.NAMES), "comma-separated methods to train")
    output_root: str = opt(".", "folder for processed_data/, models/, evaluation_results.json and the report")
    train_size: float = opt(0.8, "share of rows for training")
    group_by: Optional[str] = opt(None, "column whose groups stay inside one split")
    max_samples: int = opt(200, "test items evaluated (-1 = all)")
    eval_batch_size: int = opt(16, "sequences per batch in the evaluation (generation is faster in larger batches)")
    system_prompt: str = opt(DEFAULT_SYSTEM_PROMPT, "system prompt put before every question ('' for none)")
    max_new_tokens: int = opt(128, "longest generated answer in the evaluation")
    bench: str = opt("", "after the evaluation, lm-eval tasks or groups to run on every model (medpeft bench "
                         "--tasks), e.g. medical or medical_local; empty = none")
    bench_general: str = opt("", "general tasks for the forgetting check (medpeft bench --general_tasks)")
    bench_data_dir: Optional[str] = opt(None, "folder of the local tasks' files (medpeft bench --data_dir)")
    bench_limit: int = opt(-1, "items per benchmark task (-1 = all)")
    variants: str = opt("", "more runs of a method with other options, compared side by side with the methods: "
                            "'qlora:use_dora=true;qlora:use_rslora=true,lora_r=32' trains models/qlora-use_dora and "
                            "models/qlora-use_rslora-lora_r32")

    def validate(self) -> list[str]:
        unknown = [m for m in self.method_list() if m not in methods.NAMES]
        problems = [f"--methods: unknown method(s) {unknown}; known: {', '.join(methods.NAMES)}"] if unknown else []
        if not self.method_list():
            problems.append("--methods is empty")
        try:
            self.variant_list()
        except UsageError as exc:
            problems.append(str(exc))
        return problems

    def variant_list(self) -> list[tuple[str, str, dict]]:
        """--variants -> [(stage name, method, {option: value as written})]."""
        out = []
        for item in (v.strip() for v in self.variants.split(";")):
            if not item:
                continue
            method, _, rest = item.partition(":")
            pairs = [p.split("=", 1) for p in rest.split(",") if p.strip()]
            if method.strip() not in methods.NAMES or not pairs or any(len(p) != 2 or not p[0].strip() for p in pairs):
                raise UsageError(f"--variants: '{item}' is not METHOD:OPTION=VALUE[,OPTION=VALUE] with a method of "
                                 f"{', '.join(methods.NAMES)} (e.g. qlora:use_dora=true)")
            values = {k.strip(): v.strip() for k, v in pairs}
            tag = "-".join(k if v.lower() == "true" else f"{k}{v}" for k, v in values.items())
            out.append((re.sub(r"[^A-Za-z0-9_.-]", "_", f"{method.strip()}-{tag}"), method.strip(), values))
        names = [n for n, _, _ in out]
        if len(set(names)) != len(names):
            raise UsageError(f"--variants: two variants would share a name ({', '.join(names)})")
        return out

    def method_list(self) -> list[str]:
        return [m.strip() for m in self.methods.split(",") if m.strip()]


@dataclass
class Plan:
    """Everything a pipeline run will do, settled and validated before any of it starts."""

    run: RunConfig
    prepare: PrepareConfig
    stages: dict  # stage name (a method's, or a variant's) -> (TrainConfig, the method's Options)
    evaluate: EvalConfig
    num_gpus: int
    bench: BenchConfig | None = None
    method_of: dict = dataclasses.field(default_factory=dict)  # a variant's stage name -> its method
    float32_settings: dict = dataclasses.field(default_factory=dict)  # the config's float32 section, if it applied

    def method(self, stage: str) -> str:
        return self.method_of.get(stage, stage)


def plan(argv, prog: str = "run_all.py", description: str = "prepare, train every method, evaluate, report") -> Plan:
    """Parse run_all's flags and --config file (with its per-method sections) into a Plan; one UsageError lists
    every problem of every stage."""
    given, origins, sections = config.given_values(argv, prog, description, [RunConfig, TrainConfig], DEFAULTS,
                                                   nested=(*methods.NAMES, FLOAT32), exclude=OWNED)
    float32, where = sections.pop(FLOAT32, ({}, ""))
    _, problems = config.settle([RunConfig, TrainConfig], float32, {k: where for k in float32})  # on every machine
    if float32 and not problems and _computes_float32(given.get("dtype", "auto")):
        float32 = {k: v for k, v in float32.items() if k not in given or k in origins}  # flags have no origin
        given, origins = {**given, **float32}, {**origins, **{k: where for k in float32}}
        sections = {name: ({k: v for k, v in values.items() if k not in float32}, at)
                    for name, (values, at) in sections.items()}
    else:
        float32 = {}
    (run, top), found = config.settle([RunConfig, TrainConfig], {**DEFAULTS, **given}, origins)
    problems += found
    train_fields = {f.name for f in dataclasses.fields(TrainConfig)}
    shared = {k: v for k, v in {**DEFAULTS, **given}.items() if k in train_fields}  # explicit beat method defaults
    root = Path(run.output_root)
    data_dir = root / "processed_data"
    stages, method_of = {}, {}
    runs = [(m, m, {}) for m in run.method_list()] + run.variant_list() if not problems else []
    for name, method_name, variant in runs:
        method = methods.get(method_name)
        section, where = sections.get(method_name, ({}, ""))
        values = {**method.DEFAULTS, **shared, "data_path": str(data_dir), "output_dir": str(root / "models" / name),
                  "resume_from_checkpoint": "auto", **section, **variant}  # a killed run resumes from its checkpoint
        given_rate = "learning_rate" in shared or "learning_rate" in section or "learning_rate" in variant
        if not given_rate and _searchable(values.get("max_steps")):
            values["learning_rate"] = "auto"  # searched unless given (a run of a few steps keeps the default)
        origins_here = {k: where for k in section} | {k: f"--variants {name}" for k in variant}
        instances, found = config.settle([TrainConfig, method.Options], values, origins_here,
                                         rules=methods.training_rules(method))
        problems += [f"{name}: {p}" for p in found]
        stages[name] = tuple(instances)
        if name != method_name:
            method_of[name] = method_name
    prep = PrepareConfig(input_data=run.input_data, output_dir=str(data_dir), model_name=top.model_name,
                         max_length=top.max_length, train_size=run.train_size, group_by=run.group_by, seed=top.seed,
                         system_prompt=run.system_prompt)
    evaluate = EvalConfig(base_model=top.model_name, test_data=str(data_dir / "test.json"),
                          output_file=str(root / "evaluation_results.json"), max_samples=run.max_samples,
                          batch_size=run.eval_batch_size, max_new_tokens=run.max_new_tokens,
                          max_length=top.max_length, seed=top.seed, dtype=top.dtype,
                          trust_remote_code=top.trust_remote_code)
    bench = BenchConfig(base_model=top.model_name, tasks=run.bench, general_tasks=run.bench_general,
                        data_dir=run.bench_data_dir, limit=run.bench_limit, batch_size=run.eval_batch_size,
                        output_file=evaluate.output_file, seed=top.seed, dtype=top.dtype,
                        trust_remote_code=top.trust_remote_code) if run.bench else None
    if not problems:
        problems += prep.validate() + evaluate.validate() + (bench.validate() if bench else [])
    config.raise_problems(prog, problems)
    return Plan(run=run, prepare=prep, stages=stages, evaluate=evaluate, num_gpus=top.num_gpus, bench=bench,
                method_of=method_of, float32_settings=float32)


def _computes_float32(dtype) -> bool:
    try:
        return precision.resolve(str(dtype), default_device()) == torch.float32
    except ValueError:  # settle names the bad value
        return False


def _searchable(max_steps) -> bool:
    """Whether a run is long enough for run_all to search its learning rate unasked (an explicit
    --learning_rate auto on a shorter one is refused, saying the minimum)."""
    try:
        steps = int(max_steps if max_steps is not None else -1)
    except (TypeError, ValueError):
        return True  # settle reports the bad value
    return steps == -1 or steps >= 2 * config.MIN_SWEEP_STEPS


def fingerprint(*parts) -> str:
    parts = [{k: v for k, v in p.items() if k not in config.NOT_FINGERPRINTED} if isinstance(p, dict) else p for p in parts]
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:16]


def _stored(path: Path, key="fingerprint") -> str | None:
    try:
        return json.loads(path.read_text(encoding="utf-8")).get(key)
    except (OSError, json.JSONDecodeError):
        return None


def run_pipeline(steps: Plan, log=print) -> dict:
    root = Path(steps.run.output_root)
    prep, data_dir = steps.prepare, Path(steps.prepare.output_dir)
    if steps.float32_settings:
        log("this machine computes in float32: the config's float32 settings apply ("
            + ", ".join(f"{k} {v}" for k, v in steps.float32_settings.items()) + ")")
    prep_fp = fingerprint(dataclasses.asdict(prep), _input_hash(prep.input_data))
    if _stored(data_dir / "metadata.json") == prep_fp:
        log(f"[1/3] prepare: {data_dir} is up to date, skipped")
    else:
        log(f"[1/3] prepare: {prep.input_data} -> {data_dir}")
        prepare(prep, log=log, fingerprint=prep_fp)

    trained, failed = {}, {}
    for i, (name, (train_cfg, opts)) in enumerate(steps.stages.items(), start=1):
        method_name = steps.method(name)
        method = methods.get(method_name)
        fp = fingerprint(dataclasses.asdict(train_cfg), dataclasses.asdict(opts), prep_fp)
        out = Path(train_cfg.output_dir)
        if _stored(out / CONFIG_FILE) == fp and (out / method.WEIGHTS_FILE).is_file():
            log(f"[2/3] train {name} ({i}/{len(steps.stages)}): {out} is up to date, skipped")
            trained[name] = str(out)
            continue
        log(f"[2/3] train {name} ({i}/{len(steps.stages)}) -> {out}")
        try:
            if steps.num_gpus > 1:
                _train_on_gpus(method_name, train_cfg, opts, fp, steps.num_gpus)
            else:
                train(method_name, train_cfg, opts, log=log, fingerprint=fp, discard_stale_checkpoints=True)
            trained[name] = str(out)
        except UsageError:
            raise  # bad settings or data: every method would fail the same way
        except Exception as exc:  # one method failing does not stop the others
            failed[name] = f"{type(exc).__name__}: {str(exc).strip().splitlines()[0][:300] if str(exc).strip() else ''}"
            log(f"[2/3] train {name} failed: {failed[name]}")

    targets = _targets(trained, steps)
    eval_cfg = dataclasses.replace(steps.evaluate, **targets)
    eval_fp = fingerprint(dataclasses.asdict(eval_cfg), prep_fp,
                          {m: _stored(Path(p) / CONFIG_FILE) for m, p in trained.items()}, failed)
    results_path = Path(eval_cfg.output_file)
    if _stored(results_path) == eval_fp and (root / "report.html").is_file():
        log(f"[3/3] evaluate: {results_path} is up to date, skipped")
        results = json.loads(results_path.read_text(encoding="utf-8"))
    else:
        log(f"[3/3] evaluate {len(trained) + 1} models -> {results_path}")
        results = run_evaluation(eval_cfg, log=log, failed=failed, fingerprint=eval_fp)
    if steps.bench:
        log(f"[3/3] bench: {steps.bench.tasks}" + (f" + {steps.bench.general_tasks}" if steps.bench.general_tasks
                                                    else "") + f" on {len(trained) + 1} models (lm-eval)")
        results = run_bench(dataclasses.replace(steps.bench, **targets), log)
    md, page = write_report(results, root)
    log(f"report: {md}, {page}")
    return results


def _targets(trained: dict[str, str], steps: Plan) -> dict:
    """The evaluation's flags for the trained outputs: a method's own (--qlora_model), variants in --more_models."""
    flags = {f"{name}_model": path for name, path in trained.items() if name not in steps.method_of}
    more = ";".join(f"{name}={path}" for name, path in trained.items() if name in steps.method_of)
    return flags | ({"more_models": more} if more else {})


def _train_on_gpus(name: str, train_cfg, opts, fp: str, num_gpus: int) -> None:
    """One training stage in num_gpus processes (`medpeft train --config`, launched like `--num_gpus`)."""
    with tempfile.TemporaryDirectory(prefix="medpeft-stage-") as tmp:
        settings = Path(tmp) / f"{name}.yaml"
        settings.write_text(yaml.safe_dump({"method": name, **config.as_dict(train_cfg, opts)}), encoding="utf-8")
        # the output records the stage's fingerprint, as an in-process stage does
        code = launch(num_gpus, ["train", "--method", name, "--config", str(settings)],
                      env={"MEDPEFT_STAGE_FINGERPRINT": fp})
    if code == 2:
        raise UsageError(f"training {name} on {num_gpus} GPUs: refused (the message is above)")
    if code != 0:
        raise RuntimeError(f"training on {num_gpus} GPUs exited with code {code} (its messages are above)")


def _input_hash(input_data: str) -> str:
    path = Path(input_data)
    files = sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path] if path.is_file() else []
    h = hashlib.sha256(input_data.encode())
    for f in files:
        h.update(f.read_bytes())
    return h.hexdigest()
