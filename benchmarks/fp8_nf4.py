"""--fp8 on with a 4-bit base, one layer at a time at Mistral-7B's shapes: the one-pass NF4 -> e4m3 kernel checked and
timed, and the layer's three routes against bitsandbytes' own bf16 product.

    python3 benchmarks/fp8_nf4.py [--tokens 4096] [--shapes gate] [--out benchmarks/results/fp8_nf4.json]

Kernel: its e4m3 output against medpeft.training.fp8_nf4.reference run by torch on the same GPU (elements that
differ), and its time against what it replaces (bitsandbytes' dequantize_4bit, then the row maxima and the cast).
Layer: forward, and forward + the input's gradient, compiled, for bitsandbytes' Linear4bit (bf16) and the FP8 routes
`dequantize` (dequantize, round; backward bf16), `fused_forward` (the kernel; backward bf16) and `fused` (the
kernel both ways: backward's product in FP8 from the kernel's transposed weight); each one's error against a float32
product. Prints tables and writes JSON. Needs a GPU with FP8 tensor cores (8.9+) and bitsandbytes.
"""

import argparse
import json
from pathlib import Path

import torch
from torch import nn

from fp8_matmul import SHAPES, timed
from medpeft.training import fp8, fp8_nf4

ROUTES = ("dequantize", "fused_forward", "fused")


def linear4bit(fan_in, fan_out):
    from bitsandbytes.nn import Linear4bit

    four = Linear4bit(fan_in, fan_out, bias=False, compute_dtype=torch.bfloat16, quant_type="nf4",
                      compress_statistics=True, device="cpu")  # QLoRA's setting: NF4, double quantization
    four.load_state_dict(nn.Linear(fan_in, fan_out, bias=False).state_dict())
    return four.to("cuda").requires_grad_(False)


def kernel_rows(name, four):
    import bitsandbytes.functional as bnbf

    state, packed = four.weight.quant_state, four.weight.data
    out = []
    for transpose in (False, True):
        scale = fp8_nf4._scales(state, transpose)
        args = (packed.view(torch.uint8).reshape(-1), fp8_nf4._absmax(state), state.code.float(), 1.0 / scale,
                *state.shape, state.blocksize, transpose)
        got, want = fp8_nf4.convert(*args), fp8_nf4.reference(*args)
        differ = int((got.view(torch.uint8) != want.view(torch.uint8)).sum())
        ours = timed(lambda t=transpose: fp8_nf4.columns(packed, state) if t else fp8_nf4.rows(packed, state))
        theirs = torch.compile(lambda: fp8.quantize_rows(bnbf.dequantize_4bit(packed, state)))
        before = timed(theirs)
        out.append(dict(shape=name, layout="columns [in, out]" if transpose else "rows [out, in]",
                        elements=got.numel(), differ_from_torch=differ, kernel_ms=round(ours * 1e3, 3),
                        kernel_gb_s=round(got.numel() * 1.5 / ours / 1e9), dequantize_then_round_ms=round(before * 1e3, 3)))
        print(json.dumps(out[-1]), flush=True)
    return out


def layer_rows(name, fan_in, fan_out, tokens):
    four = linear4bit(fan_in, fan_out)
    import bitsandbytes.functional as bnbf

    dense = bnbf.dequantize_4bit(four.weight.data, four.weight.quant_state).float()
    x = torch.randn(tokens, fan_in, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    grad = torch.randn(tokens, fan_out, device="cuda", dtype=torch.bfloat16)
    want, want_grad = x.detach().float() @ dense.t(), grad.float() @ dense
    out = kernel_rows(name, four)
    flops = 2 * tokens * fan_in * fan_out
    for route in ("bf16",) + ROUTES:
        if route != "bf16":
            fp8.to_fp8(nn.ModuleList([four]), layers=lambda m: list(m))
            fp8.NF4_ROUTE = route
        torch._dynamo.reset()
        f = torch.compile(four, dynamic=True)
        y = f(x)
        y.backward(grad)
        err = float((y.float() - want).norm() / want.norm())
        err_grad = float((x.grad.float() - want_grad).norm() / want_grad.norm())
        x.grad = None

        def fwd(f=f):
            with torch.no_grad():
                f(x)

        def fwd_bwd(f=f):
            f(x).backward(grad)
            x.grad = None

        t_f, t_fb = timed(fwd), timed(fwd_bwd)
        out.append(dict(shape=name, tokens=tokens, route=route, forward_ms=round(t_f * 1e3, 3),
                        forward_backward_ms=round(t_fb * 1e3, 3), forward_tflops=round(flops / t_f / 1e12),
                        forward_backward_tflops=round(2 * flops / t_fb / 1e12), rel_error=round(err, 5),
                        grad_rel_error=round(err_grad, 5)))
        print(json.dumps(out[-1]), flush=True)
    return out


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--tokens", type=int, default=4096)
    p.add_argument("--shapes", default="", help="only the shapes whose name holds one of these words (comma-"
                   "separated), e.g. 'gate'; default: all four")
    p.add_argument("--out", default="benchmarks/results/fp8_nf4.json")
    args = p.parse_args()
    torch.manual_seed(0)
    words = [w for w in args.shapes.split(",") if w]
    shapes = {n: s for n, s in SHAPES.items() if not words or any(w in n for w in words)}
    rows = [r for name, (fan_in, fan_out) in shapes.items() for r in layer_rows(name, fan_in, fan_out, args.tokens)]
    print("\n| shape | layout | elements differing from torch's cast | kernel ms (GB/s at 1.5 B/element) | "
          "dequantize + round ms |")
    print("|---|---|---:|---:|---:|")
    for r in rows:
        if "layout" in r:
            print(f"| {r['shape']} | {r['layout']} | {r['differ_from_torch']} of {r['elements']:,} | {r['kernel_ms']} "
                  f"({r['kernel_gb_s']}) | {r['dequantize_then_round_ms']} |")
    print("\n| shape | route | forward ms (TFLOP/s) | forward + input grad ms (TFLOP/s) | error vs fp32 | grad error |")
    print("|---|---|---:|---:|---:|---:|")
    for r in rows:
        if "route" in r:
            print(f"| {r['shape']} | {r['route']} | {r['forward_ms']} ({r['forward_tflops']}) | "
                  f"{r['forward_backward_ms']} ({r['forward_backward_tflops']}) | {r['rel_error']} | "
                  f"{r['grad_rel_error']} |")
    out = {"device": torch.cuda.get_device_name(0), "torch": torch.__version__, "tokens": args.tokens, "rows": rows}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(out, indent=1))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
