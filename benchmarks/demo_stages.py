"""Time every stage of the demo pipeline (what `make demo` runs) and print a table.

    python benchmarks/demo_stages.py                      # fresh output folder, the demo config
    python benchmarks/demo_stages.py --config my.yaml     # any run_all config

Stages: model conversion (first use of the embedded model only), prepare, training of each method, evaluation
of each model, report. Writes benchmarks/results/demo_stages.json (or --output).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))


def main(argv=None):
    from medpeft.cli import _quiet_libraries
    from medpeft.pipeline import DEMO_CONFIG, plan, run_pipeline
    from medpeft.precision import cpu_name, explain

    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--config", default=str(DEMO_CONFIG))
    p.add_argument("--output", default=str(HERE / "results" / "demo_stages.json"))
    p.add_argument("--keep", default=None, help="write the pipeline's outputs here and keep them")
    args = p.parse_args(argv)
    root = Path(args.keep) if args.keep else Path(tempfile.mkdtemp(prefix="demo-stages-"))
    _quiet_libraries()
    steps = plan(["--config", args.config, "--output_root", str(root)], "demo_stages")
    marks = [("start", time.time())]

    def log(line):
        print(line, flush=True)
        if line.startswith("[") or line.startswith("report:"):
            marks.append((line, time.time()))

    t0 = time.time()
    results = run_pipeline(steps, log=log)
    total = time.time() - t0
    marks.append(("end", time.time()))
    stages = []
    for (label, start), (_, end) in zip(marks, marks[1:]):
        stages.append({"stage": label.split(":")[0].split(" ->")[0], "seconds": round(end - start, 1)})
    per_model = {name: entry.get("eval_seconds") for name, entry in results["models"].items()}
    out = {"config": args.config, "total_seconds": round(total, 1), "stages": stages, "eval_seconds": per_model,
           "machine": {"cpus": os.cpu_count(), "platform": platform.platform(), "cpu": cpu_name(),
                       "compute": explain("auto", "cpu"),
                       "env": {k: os.environ[k] for k in ("ATEN_CPU_CAPABILITY", "ONEDNN_MAX_CPU_ISA") if k in os.environ}}}
    print("\n| stage | seconds |\n|---|---:|")
    for s in stages:
        print(f"| {s['stage']} | {s['seconds']} |")
    print(f"| **total** | **{total:.0f}** |")
    print("evaluation seconds per model:", per_model)
    Path(args.output).parent.mkdir(parents=True, exist_ok=True)
    Path(args.output).write_text(json.dumps(out, indent=1))
    if not args.keep:
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
