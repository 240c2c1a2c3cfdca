"""The one-command pipeline: prepare -> train every method -> evaluate -> report.

    python run_all.py                       # bundled sample + embedded SmolLM2-135M, on the CPU
    python run_all.py --input_data data.csv --model_name mistralai/Mistral-7B-Instruct-v0.2 --num_epochs 3

Layout under --output_root: processed_data/, models/<method>/, evaluation_results.json, report.md, report.html.
A stage is skipped when its output is complete and was made from the same settings and inputs (a fingerprint
stored in the output); a training stage that was killed resumes from its newest checkpoint; a method that fails
is reported as failed and the others go on.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from . import methods
from .config import DEFAULT_SYSTEM_PROMPT, EvalConfig, PrepareConfig, TrainConfig, opt
from .errors import UsageError
from .sample_data import SAMPLE_PATH

DEMO_CONFIG = Path(__file__).parent / "resources" / "demo.yaml"


@dataclass
class RunConfig:
    input_data: str = opt(str(SAMPLE_PATH), "medical data (default: the bundled synthetic sample)")
    model_name: str = opt("smollm2-135m", "base model for every method (default: the embedded SmolLM2-135M)")
    num_epochs: float = opt(3.0, "passes over the training split, every method")
    batch_size: int = opt(8, "examples per micro-batch, every method")
    max_steps: int = opt(-1, "optimizer steps per method (-1 = as many as --num_epochs gives)")
    methods: str = opt(",".join(methods.NAMES), "comma-separated methods to train")
    output_root: str = opt(".", "folder for processed_data/, models/, evaluation_results.json and the report")
    max_length: int = opt(512, "tokens per example")
    train_size: float = opt(0.8, "share of rows for training")
    group_by: Optional[str] = opt(None, "column whose groups stay inside one split")
    max_samples: int = opt(200, "test items evaluated (-1 = all)")
    eval_batch_size: int = opt(16, "sequences per batch in the evaluation (generation is faster in larger batches)")
    system_prompt: str = opt(DEFAULT_SYSTEM_PROMPT, "system prompt put before every question ('' for none)")
    max_new_tokens: int = opt(128, "longest generated answer in the evaluation")
    seed: int = opt(42, "random seed for splits, training and evaluation")
    dtype: str = opt("auto", "compute dtype of every method and of the evaluation (auto = bf16 on a GPU and on a CPU "
                             "with native bf16, float32 on other CPUs)", ["auto", "float32", "bfloat16"])
    num_gpus: int = opt(1, "GPUs to train each method on (data parallel through accelerate launch); the evaluation "
                           "runs on one")

    def validate(self) -> list[str]:
        unknown = [m for m in self.method_list() if m not in methods.NAMES]
        problems = [f"--methods: unknown method(s) {unknown}; known: {', '.join(methods.NAMES)}"] if unknown else []
        if self.num_gpus < 1:
            problems.append(f"--num_gpus must be 1 or more, got {self.num_gpus}")
        if not self.method_list():
            problems.append("--methods is empty")
        return problems

    def method_list(self) -> list[str]:
        return [m.strip() for m in self.methods.split(",") if m.strip()]


def fingerprint(*parts) -> str:
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:16]


def _stored(path: Path, key="fingerprint") -> str | None:
    try:
        return json.loads(path.read_text(encoding="utf-8")).get(key)
    except (OSError, json.JSONDecodeError):
        return None


def run_pipeline(cfg: RunConfig, method_overrides: dict | None = None, log=print) -> dict:
    from .data import prepare
    from .evaluation import run_evaluation
    from .report import write_report
    from .outputs import CONFIG_FILE
    from .training import train

    root = Path(cfg.output_root)
    data_dir, models_dir = root / "processed_data", root / "models"
    prep = PrepareConfig(input_data=cfg.input_data, output_dir=str(data_dir), model_name=cfg.model_name,
                         max_length=cfg.max_length, train_size=cfg.train_size, group_by=cfg.group_by, seed=cfg.seed,
                         system_prompt=cfg.system_prompt)
    problems = prep.validate()
    if problems:
        raise UsageError("; ".join(problems))
    input_hash = _input_hash(cfg.input_data)
    prep_fp = fingerprint(dataclasses.asdict(prep), input_hash)
    if _stored(data_dir / "metadata.json") == prep_fp:
        log(f"[1/3] prepare: {data_dir} is up to date, skipped")
    else:
        log(f"[1/3] prepare: {cfg.input_data} -> {data_dir}")
        prepare(prep, log=log, fingerprint=prep_fp)

    trained, failed = {}, {}
    names = cfg.method_list()
    for i, name in enumerate(names, start=1):
        method = methods.get(name)
        settings = dict(method.DEFAULTS, model_name=cfg.model_name, data_path=str(data_dir),
                        output_dir=str(models_dir / name), num_epochs=cfg.num_epochs, batch_size=cfg.batch_size,
                        max_steps=cfg.max_steps, max_length=cfg.max_length, seed=cfg.seed, dtype=cfg.dtype,
                        num_gpus=cfg.num_gpus,
                        resume_from_checkpoint="auto")  # a run killed mid-training goes on from its checkpoint
        settings.update((method_overrides or {}).get(name, {}))
        fields = {f.name for f in dataclasses.fields(TrainConfig)}
        train_cfg = TrainConfig(**{k: v for k, v in settings.items() if k in fields})
        opts = method.Options(**{k: v for k, v in settings.items() if k not in fields})
        problems = train_cfg.validate() + opts.validate()
        if problems:
            raise UsageError(f"settings for {name}: " + "; ".join(problems))
        fp = fingerprint(dataclasses.asdict(train_cfg), dataclasses.asdict(opts), prep_fp)
        out = Path(train_cfg.output_dir)
        if _stored(out / CONFIG_FILE) == fp and (out / method.WEIGHTS_FILE).is_file():
            log(f"[2/3] train {name} ({i}/{len(names)}): {out} is up to date, skipped")
            trained[name] = str(out)
            continue
        log(f"[2/3] train {name} ({i}/{len(names)}) -> {out}")
        try:
            if cfg.num_gpus > 1:
                _train_on_gpus(name, train_cfg, opts, fp, cfg.num_gpus)
            else:
                train(name, train_cfg, opts, log=log, fingerprint=fp, discard_stale_checkpoints=True)
            trained[name] = str(out)
        except UsageError:
            raise  # bad settings or data: every method would fail the same way
        except Exception as exc:  # one method failing does not stop the others
            failed[name] = f"{type(exc).__name__}: {str(exc).strip().splitlines()[0][:300] if str(exc).strip() else ''}"
            log(f"[2/3] train {name} failed: {failed[name]}")

    eval_cfg = EvalConfig(base_model=cfg.model_name, test_data=str(data_dir / "test.json"),
                          output_file=str(root / "evaluation_results.json"), max_samples=cfg.max_samples,
                          batch_size=cfg.eval_batch_size, max_new_tokens=cfg.max_new_tokens, max_length=cfg.max_length,
                          seed=cfg.seed, dtype=cfg.dtype, **{f"{m}_model": p for m, p in trained.items()})
    eval_fp = fingerprint(dataclasses.asdict(eval_cfg), prep_fp,
                          {m: _stored(Path(p) / CONFIG_FILE) for m, p in trained.items()}, failed)
    results_path = Path(eval_cfg.output_file)
    if _stored(results_path) == eval_fp and (root / "report.html").is_file():
        log(f"[3/3] evaluate: {results_path} is up to date, skipped")
        results = json.loads(results_path.read_text(encoding="utf-8"))
    else:
        log(f"[3/3] evaluate {len(trained) + 1} models -> {results_path}")
        results = run_evaluation(eval_cfg, log=log, failed=failed, fingerprint=eval_fp)
    md, page = write_report(results, root)
    log(f"report: {md}, {page}")
    return results


def _train_on_gpus(name: str, train_cfg, opts, fp: str, num_gpus: int) -> None:
    """One training stage in num_gpus processes (`medpeft train --config`, launched like `--num_gpus`)."""
    import tempfile

    import yaml

    from .config import as_dict
    from .distributed import launch

    with tempfile.TemporaryDirectory(prefix="medpeft-stage-") as tmp:
        settings = Path(tmp) / f"{name}.yaml"
        settings.write_text(yaml.safe_dump({"method": name, **as_dict(train_cfg, opts)}), encoding="utf-8")
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
