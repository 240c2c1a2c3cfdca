"""What this CPU computes fast: the dtype medpeft chooses here, and one training step of the embedded model in each.

    python benchmarks/cpu_dtypes.py                     # SmolLM2-135M, LoRA r16 on every linear layer, 16 x 64 tokens
    ATEN_CPU_CAPABILITY=avx2 ONEDNN_MAX_CPU_ISA=AVX2 python benchmarks/cpu_dtypes.py   # an AVX2-only CPU, simulated

Prints the CPU model (as lscpu names it), PyTorch's capability, whether bf16 is native, the dtype `--dtype auto`
takes, and the forward + backward time of the embedded model with LoRA on a base in float32, bfloat16, NF4
computing in float32 and NF4 computing in bfloat16 (after a float32 warm-up step, one warm-up step per case on a quarter of
the batch, then the median of --repeats steps). On an AVX2-only CPU the bf16 cases take minutes. Writes benchmarks/results/cpu_dtypes_<tag>.json.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))

CASES = (("float32", False), ("bfloat16", False), ("float32", True), ("bfloat16", True))


def step_seconds(model, ids, repeats: int) -> list[float]:
    from medpeft.modeling import autocast

    def step(batch):
        with autocast(model):
            loss = model(input_ids=batch, labels=batch).loss
        loss.backward()
        model.zero_grad(set_to_none=True)

    step(ids[: max(1, len(ids) // 4)])  # warm-up: oneDNN picks its kernels for this dtype
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        step(ids)
        times.append(time.perf_counter() - t0)
    return times


def warm_up(resolved: str, args) -> None:
    """One float32 step on the whole batch before any timing: the process's first steps pay for the thread pool and
    the allocator's growth (measured: the first case 30-50% slower than the same case run again)."""
    import torch
    from peft import LoraConfig, get_peft_model

    from medpeft.modeling import load_model

    model = get_peft_model(load_model(resolved, device="cpu", dtype=torch.float32),
                           LoraConfig(r=16, lora_alpha=32, target_modules="all-linear", task_type="CAUSAL_LM"))
    ids = torch.randint(0, model.config.vocab_size, (args.batch, args.seq))
    model(input_ids=ids, labels=ids).loss.backward()


def main(argv=None):
    import torch
    from peft import LoraConfig, get_peft_model

    from medpeft.modeling import load_model, prepare_kbit, resolve_model
    from medpeft.precision import cpu_bf16, cpu_name, explain, resolve, short

    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model_name", default="smollm2-135m")
    p.add_argument("--batch", type=int, default=16, help="sequences per step")
    p.add_argument("--seq", type=int, default=64, help="tokens per sequence")
    p.add_argument("--repeats", type=int, default=2, help="timed steps per case (the median is reported)")
    p.add_argument("--cases", default="all", help="comma-separated of fp32,bf16,nf4-fp32,nf4-bf16 (default: all)")
    p.add_argument("--tag", default=None, help="file name tag (default: capability and CPU kind)")
    p.add_argument("--output", default=None, help="JSON path (default: benchmarks/results/cpu_dtypes_<tag>.json)")
    args = p.parse_args(argv)

    probe = cpu_bf16()
    names = {"fp32": CASES[0], "bf16": CASES[1], "nf4-fp32": CASES[2], "nf4-bf16": CASES[3]}
    wanted = list(names) if args.cases == "all" else [c.strip() for c in args.cases.split(",")]
    unknown = [c for c in wanted if c not in names]
    if unknown:
        p.error(f"--cases: unknown {unknown}; known: {', '.join(names)}")
    resolved = resolve_model(args.model_name)
    torch.manual_seed(0)
    header = {"cpu": cpu_name(), "cores": os.cpu_count(), "capability": probe.capability,
              "bf16_native": probe.native, "probe": probe.why, "chosen_dtype": short(resolve("auto", "cpu")),
              "line": explain("auto", "cpu"), "torch": torch.__version__, "threads": torch.get_num_threads(),
              "env": {k: os.environ[k] for k in ("ATEN_CPU_CAPABILITY", "ONEDNN_MAX_CPU_ISA") if k in os.environ},
              "model": args.model_name, "batch": args.batch, "seq": args.seq,
              "step": "forward + backward, LoRA r16 alpha32 on all linear layers, labels = inputs"}
    print(f"CPU: {header['cpu']} ({header['cores']} cores), torch {torch.__version__}, capability "
          f"{probe.capability}, bf16 native: {probe.native} ({probe.why})")
    print(f"medpeft --dtype auto: {header['line']}")
    results = []
    warm_up(resolved, args)
    for case in wanted:
        dtype_name, four_bit = names[case]
        dtype = resolve(dtype_name, "cpu")
        base = load_model(resolved, load_in_4bit=four_bit, device="cpu", dtype=dtype)
        base.config.use_cache = False
        if four_bit:
            base = prepare_kbit(base)
        model = get_peft_model(base, LoraConfig(r=16, lora_alpha=32, target_modules="all-linear",
                                                task_type="CAUSAL_LM"))
        model.train()
        ids = torch.randint(0, base.config.vocab_size, (args.batch, args.seq))
        times = step_seconds(model, ids, args.repeats)
        row = {"case": case, "weights": "nf4" if four_bit else dtype_name, "compute": dtype_name,
               "step_s": round(statistics.median(times), 3), "steps_s": [round(t, 3) for t in times],
               "tokens_per_s": round(args.batch * args.seq / statistics.median(times), 1)}
        results.append(row)
        print(f"  {case:9s} {row['step_s']:8.2f} s per step  ({row['tokens_per_s']:,.0f} tokens/s)", flush=True)
        del model, base
    fp32 = next((r["step_s"] for r in results if r["case"] == "fp32"), None)
    print("\n| case | weights | compute | s per step | tokens/s | x fp32 |\n|---|---|---|---:|---:|---:|")
    for r in results:
        ratio = f"{r['step_s'] / fp32:.2f}" if fp32 else "-"
        print(f"| {r['case']} | {r['weights']} | {r['compute']} | {r['step_s']} | {r['tokens_per_s']:,.0f} | {ratio} |")
    tag = args.tag or f"{probe.capability.lower()}{'' if probe.native else '-no-bf16'}"
    out = Path(args.output or HERE / "results" / f"cpu_dtypes_{tag}.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({**header, "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "results": results},
                              indent=1) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
