"""The `medpeft` command and the seed's scripts: parse flags (+ YAML), call the package, map errors to exit 2.

    medpeft prepare --input_data data.csv --output_dir processed_data --model_name smollm2-135m
    medpeft train --method qlora --model_name smollm2-135m --data_path processed_data --output_dir models/qlora
    medpeft evaluate ... | medpeft run ...
"""

from __future__ import annotations

import logging
import os
import sys
import warnings
from typing import Optional

from . import config, data, inference, methods, pipeline
from .bench import run_bench
from .distributed import is_main_process, launch, local_rank
from .errors import TrainingStopped, UsageError
from .evaluation import run_evaluation
from .export import merge
from .gguf_export import ExportConfig, run_export
from .pipeline import DEMO_CONFIG
from .report import (COLUMNS, bench_lines, classification_lines, read_results, recommend_lines, summary_rows,
                     write_report)
from .training import train

SUBCOMMANDS = {
    "prepare": "medical data -> processed_data/{train,validation,test}.json + metadata.json",
    "train": "fine-tune with one method (--method qlora|adapter|ptuning)",
    "evaluate": "compare the base model and fine-tuned models on the test split",
    "run": "prepare, train every method, evaluate, report",
    "merge": "fold a LoRA/QLoRA output into its base: a standalone transformers model",
    "export": "a GGUF file (llama.cpp, Ollama, LM Studio) of a merged LoRA/QLoRA output or a base model, checked",
    "generate": "answers to --prompt or to every question of --input, from a base or tuned model",
    "chat": "talk to a base or tuned model in the terminal (streamed answers)",
    "recommend": "rank the evaluated methods that fit a memory budget",
    "bench": "standard benchmarks (lm-evaluation-harness) for the base model and every trained output",
}


def _quiet_libraries() -> None:
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")
    warnings.filterwarnings("ignore", message=".*kernels-community.*")
    warnings.filterwarnings("ignore", category=FutureWarning)
    warnings.filterwarnings("ignore", message=".*use_reentrant.*")
    # peft, P-Tuning under generate(): the virtual tokens get their own positions, as intended
    warnings.filterwarnings("ignore", message="Position ids are not supported for parameter efficient tuning")
    logging.basicConfig(level=logging.WARNING, format="%(message)s")
    logging.getLogger("bitsandbytes").setLevel(logging.ERROR)
    # "adapters available but none are activated": expected while the base model's loss is measured
    logging.getLogger("adapters").setLevel(logging.ERROR)


def cmd_prepare(argv, prog):
    (cfg,) = config.parse(argv, prog, SUBCOMMANDS["prepare"], [config.PrepareConfig])
    meta = data.prepare(cfg)
    rows, tok = meta["rows"], meta["tokens"]
    print(f"kept {rows['kept']} of {rows['read']} rows; dropped {rows['dropped']}"
          + (f" ({', '.join(f'{n} {r}' for r, n in rows['dropped_by_reason'].items())})" if rows["dropped"] else ""))
    print("splits: " + ", ".join(f"{k} {v}" for k, v in meta["counts"].items()))
    t = tok["total"]
    print(f"tokens per example: mean {t['mean']}, median {t['median']}, p90 {t['p90']}, max {t['max']}; "
          f"{tok['truncated']} truncated at --max_length {cfg.max_length}")
    print(f"wrote {cfg.output_dir}/train.json, validation.json, test.json, metadata.json")
    return 0


def _pop_flag(argv, name):
    for i, a in enumerate(argv):
        if a == name and i + 1 < len(argv):
            return argv[i + 1], argv[:i] + argv[i + 2:]
        if a.startswith(name + "="):
            return a.split("=", 1)[1], argv[:i] + argv[i + 1:]
    return None, argv


def cmd_train(argv, prog, method_name=None):
    flag, argv = _pop_flag(list(argv), "--method")
    method_name = flag or method_name
    config_path, settings = config.config_file(argv)
    config_method = settings.get("method")
    if method_name and config_method and config_method != method_name:
        raise UsageError(f"{prog}: --config {config_path} is for method '{config_method}', "
                         f"but this command trains '{method_name}'")
    method_name = method_name or config_method
    if method_name is None:
        raise UsageError(f"{prog}: --method is required: one of {', '.join(methods.NAMES)}")
    method = methods.get(method_name)
    cfg, opts = config.parse(argv, prog, method.HELP, [config.TrainConfig, method.Options], method.DEFAULTS,
                             rules=methods.training_rules(method), loaded=settings)
    if cfg.num_gpus > 1 and local_rank() is None:
        return launch(cfg.num_gpus, ["train", "--method", method_name, *argv], fsdp=cfg.fsdp)
    # set by the pipeline when it launches a multi-GPU training stage (run_all.py --num_gpus)
    fingerprint = os.environ.pop("MEDPEFT_STAGE_FINGERPRINT", None)
    metrics = train(method_name, cfg, opts, fingerprint=fingerprint, discard_stale_checkpoints=bool(fingerprint))
    if not is_main_process():
        return 0
    print(f"{method_name}: validation loss {metrics['validation_loss_base']:.4f} (base) -> "
          f"{metrics['validation_loss_final']:.4f} (tuned); {metrics['tokens_per_s']:.0f} tokens/s; "
          f"peak memory {metrics['peak_memory_gb']:.2f} GB; {metrics['trainable_parameters']:,} trainable parameters")
    return 0


def print_summary(results: dict) -> None:
    keep = ["model", "status", "loss", "ROUGE-L [95% CI]", "MC acc. option text [95% CI]", "MC macro-F1",
            "gain vs base", "gain vs majority",
            "trainable params", "train s", "peak mem GB", "s/answer"]
    idx = [i for i, (h, _) in enumerate(COLUMNS) if h in keep]
    rows = [[COLUMNS[i][0] for i in idx]] + [[r[i] for i in idx] for r in summary_rows(results)]
    widths = [max(len(r[c]) for r in rows) for c in range(len(idx))]
    for n, row in enumerate(rows):
        print("  ".join(cell.ljust(w) for cell, w in zip(row, widths)))
        if n == 0:
            print("  ".join("-" * w for w in widths))
    if (results.get("coverage") or {}).get("line"):
        print(f"coverage: {results['coverage']['line']}")
    for line in classification_lines(results)[:1]:  # the majority-class baseline
        print(line)
    collapsed = [e["name"] for e in results["models"].values()
                 if ((e.get("choice") or {}).get("picks") or {}).get("loglik", {}).get("collapsed")]
    if collapsed:
        print(f"collapsed onto one label (over 90% of picks): {', '.join(collapsed)}")


def cmd_evaluate(argv, prog):
    from pathlib import Path

    (cfg,) = config.parse(argv, prog, SUBCOMMANDS["evaluate"], [config.EvalConfig])
    results = run_evaluation(cfg)
    md, page = write_report(results, Path(cfg.output_file).parent)
    print_summary(results)
    print(f"wrote {cfg.output_file}, {md}, {page}")
    return 0


def cmd_bench(argv, prog):
    from pathlib import Path

    (cfg,) = config.parse(argv, prog, SUBCOMMANDS["bench"], [config.BenchConfig])
    results = run_bench(cfg)
    md, page = write_report(results, Path(cfg.output_file).parent)
    print("\n".join(bench_lines(results)))
    print(f"wrote {cfg.output_file}, {md}, {page}")
    return 0


def cmd_run(argv, prog):
    if not argv:  # a bare `python run_all.py` is the demo: every method on the embedded model and sample
        argv = ["--config", str(DEMO_CONFIG)]
        print(f"no arguments: running the demo configuration {DEMO_CONFIG}")
    results = pipeline.run_pipeline(pipeline.plan(argv, prog, SUBCOMMANDS["run"]))
    print_summary(results)
    return 0


def cmd_merge(argv, prog):
    from dataclasses import dataclass

    @dataclass
    class MergeConfig:
        adapter: str = config.opt("models/qlora", "a QLoRA/LoRA training output")
        output: str = config.opt("merged", "new folder for the merged model")

        def validate(self):
            return []

    (cfg,) = config.parse(argv, prog, SUBCOMMANDS["merge"], [MergeConfig])
    merge(cfg.adapter, cfg.output)
    return 0


def cmd_export(argv, prog):
    (cfg,) = config.parse(argv, prog, SUBCOMMANDS["export"], [ExportConfig])
    run_export(cfg)
    return 0


def cmd_generate(argv, prog, interactive=False):
    (cfg,) = config.parse(argv, prog, SUBCOMMANDS["chat" if interactive else "generate"],
                          [inference.GenerateConfig])
    if interactive:
        inference.chat(cfg)
    else:
        inference.generate(cfg)
    return 0


def cmd_recommend(argv, prog):
    from dataclasses import dataclass

    @dataclass
    class RecommendConfig:
        results: str = config.opt("evaluation_results.json", "results written by evaluate_models / run_all")
        memory_gb: Optional[float] = config.opt(None, "memory available for training, GB (default: no limit)")

        def validate(self):
            return [f"--memory_gb must be positive, got {self.memory_gb}"] if (self.memory_gb or 1) <= 0 else []

    (cfg,) = config.parse(argv, prog, SUBCOMMANDS["recommend"], [RecommendConfig])
    print("\n".join(recommend_lines(read_results(cfg.results), cfg.memory_gb)))
    return 0


def run(argv, prog="medpeft", command=None, method=None) -> int:
    """Entry point shared by `medpeft` and the seed scripts; returns the exit code."""
    _quiet_libraries()
    try:
        if command is None:
            if not argv or argv[0] in ("-h", "--help"):
                print(f"usage: {prog} {{{','.join(SUBCOMMANDS)}}} [flags]\n")
                for name, text in SUBCOMMANDS.items():
                    print(f"  {name:9s} {text}")
                print(f"\n`{prog} COMMAND --help` lists a command's flags.")
                return 0 if argv else 2
            command, argv = argv[0], argv[1:]
            prog = f"{prog} {command}"
        if command == "prepare":
            return cmd_prepare(argv, prog)
        if command == "train":
            return cmd_train(argv, prog, method)
        if command == "evaluate":
            return cmd_evaluate(argv, prog)
        if command == "run":
            return cmd_run(argv, prog)
        if command == "merge":
            return cmd_merge(argv, prog)
        if command == "export":
            return cmd_export(argv, prog)
        if command in ("generate", "chat"):
            return cmd_generate(argv, prog, interactive=command == "chat")
        if command == "recommend":
            return cmd_recommend(argv, prog)
        if command == "bench":
            return cmd_bench(argv, prog)
        raise UsageError(f"{prog}: unknown command '{command}'; commands: {', '.join(SUBCOMMANDS)}")
    except UsageError as exc:
        fresh_line = "\n" if isinstance(exc, TrainingStopped) else ""  # after a progress bar cut short
        print(f"{fresh_line}error: {exc}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        print("interrupted; no output was written as complete", file=sys.stderr)
        return 130


def main() -> None:
    sys.exit(run(sys.argv[1:]))


if __name__ == "__main__":
    main()
