"""The frozen base's matmuls in FP8 (--fp8 on) against bf16, one linear layer at a time, at Mistral-7B's shapes.

    python3 benchmarks/fp8_matmul.py [--tokens 4096] [--out benchmarks/results/fp8_matmul.json]

For each projection shape: forward (what a checkpointed layer runs twice) and forward + the input's gradient (the
weight is frozen), eager and torch.compile'd, bf16 nn.Linear against medpeft.training.fp8.Fp8Linear; the error of
each against a float32 product. Prints a table and writes JSON. Needs a GPU with FP8 tensor cores (8.9+).
"""

import argparse
import json
import time
from pathlib import Path

import torch
from torch import nn

from medpeft.training import fp8

SHAPES = {"q_proj / o_proj": (4096, 4096), "k_proj / v_proj": (4096, 1024), "gate_proj / up_proj": (4096, 14336),
          "down_proj": (14336, 4096)}


def timed(fn, reps=50):
    for _ in range(5):
        fn()
    torch.cuda.synchronize()
    t = time.perf_counter()
    for _ in range(reps):
        fn()
    torch.cuda.synchronize()
    return (time.perf_counter() - t) / reps


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--tokens", type=int, default=4096)
    p.add_argument("--out", default="benchmarks/results/fp8_matmul.json")
    args = p.parse_args()
    torch.manual_seed(0)
    rows = []
    for name, (fan_in, fan_out) in SHAPES.items():
        dense = nn.Linear(fan_in, fan_out, bias=False, device="cuda", dtype=torch.bfloat16).requires_grad_(False)
        x = torch.randn(args.tokens, fan_in, device="cuda", dtype=torch.bfloat16, requires_grad=True)
        grad = torch.randn(args.tokens, fan_out, device="cuda", dtype=torch.bfloat16)
        reference = x.detach().float() @ dense.weight.float().t()
        quantized = nn.Linear(fan_in, fan_out, bias=False, device="cuda", dtype=torch.bfloat16).requires_grad_(False)
        quantized.weight.data.copy_(dense.weight)
        fp8.to_fp8(nn.ModuleList([quantized]), layers=lambda m: list(m))
        flops = 2 * args.tokens * fan_in * fan_out
        for label, layer in (("bf16", dense), ("fp8", quantized)):
            err = float((layer(x.detach()).float() - reference).norm() / reference.norm())
            for mode, f in (("eager", layer), ("compiled", torch.compile(layer, dynamic=True))):
                def fwd(f=f, x=x):
                    with torch.no_grad():
                        f(x)

                def fwd_bwd(f=f, x=x, grad=grad):
                    f(x).backward(grad)
                    x.grad = None

                t_f, t_fb = timed(fwd), timed(fwd_bwd)
                rows.append(dict(shape=name, tokens=args.tokens, kind=label, mode=mode, forward_ms=round(t_f * 1e3, 3),
                                 forward_tflops=round(flops / t_f / 1e12), forward_backward_ms=round(t_fb * 1e3, 3),
                                 forward_backward_tflops=round(2 * flops / t_fb / 1e12), rel_error=round(err, 5)))
                print(json.dumps(rows[-1]), flush=True)
    print("\n| shape | kind | mode | forward ms (TFLOP/s) | forward + input grad ms (TFLOP/s) | error vs fp32 |")
    print("|---|---|---|---:|---:|---:|")
    for r in rows:
        print(f"| {r['shape']} | {r['kind']} | {r['mode']} | {r['forward_ms']} ({r['forward_tflops']}) | "
              f"{r['forward_backward_ms']} ({r['forward_backward_tflops']}) | {r['rel_error']} |")
    out = {"device": torch.cuda.get_device_name(0), "torch": torch.__version__, "rows": rows}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(out, indent=1))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
