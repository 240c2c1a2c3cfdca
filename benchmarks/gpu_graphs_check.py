"""CUDA graphs on a GPU, small and quick, before the 7B benchmark:

1. the varlen flash kernel gives the real tokens the same outputs and gradients when their row is filled out to one
   shape (a padding segment, then empty segments), as --cuda_graphs rows are;
2. a few decoder layers of Mistral-7B's widths (random weights) train alike with --cuda_graphs on and off, per
   method, through medpeft's own training path; with the step times of each.

    python3 benchmarks/gpu_graphs_check.py                    # 2 layers, 12 steps, qlora,lora,adapter
    python3 benchmarks/gpu_graphs_check.py --layers 4 --methods qlora --set compile=on

Writes gpu_graphs_check.json to $OUT (or benchmarks/results/) and prints a table last.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
sys.path.insert(0, str(HERE))


def rel(a, b):
    return ((a.float() - b.float()).norm() / b.float().norm().clamp_min(1e-30)).item()


def varlen_check(seed=0):
    """Real rows of 100, 300 and 212 tokens alone, and the same rows filled out to 1,024 tokens and 7 segments."""
    import torch

    from medpeft.training.packing import varlen_attention

    gen = torch.Generator(device="cuda").manual_seed(seed)
    lengths, total, longest, segments = [100, 300, 212], 1024, 300, 7
    real = sum(lengths)
    shape = dict(device="cuda", dtype=torch.bfloat16, generator=gen)
    q, k, v = (torch.randn(1, h, total, 128, **shape) for h in (32, 8, 8))
    grad = torch.randn(1, real, 32, 128, **shape)

    def run(n, bounds):
        leaves = [t[:, :, :n].detach().clone().requires_grad_() for t in (q, k, v)]
        cu = torch.tensor(bounds, dtype=torch.int32, device="cuda")
        out, _ = varlen_attention(None, *leaves, None, scaling=128 ** -0.5, cu_seq_lens_q=cu, cu_seq_lens_k=cu,
                                  max_length_q=longest, max_length_k=longest)
        (out[0, :real] * grad[0]).sum().backward()
        return out[0, :real], [t.grad[:, :, :real] for t in leaves]

    alone = [0, 100, 400, real]
    filled = alone + [real + 300, total] + [total] * (segments + 1 - 6)
    out_a, grads_a = run(real, alone)
    out_b, grads_b = run(total, filled)
    torch.cuda.synchronize()
    return {"cu_filled": filled, "out_rel_diff": rel(out_b, out_a),
            "grad_rel_diff": max(rel(b, a) for a, b in zip(grads_a, grads_b)),
            "finite": bool(torch.isfinite(out_b).all())}


def build_small(path, layers):
    import torch
    from transformers import MistralConfig, MistralForCausalLM

    if (Path(path) / "config.json").is_file():
        return
    cfg = MistralConfig(vocab_size=32000, hidden_size=4096, intermediate_size=14336, num_hidden_layers=layers,
                        num_attention_heads=32, num_key_value_heads=8, max_position_embeddings=32768,
                        rope_theta=1e6, sliding_window=None)
    torch.manual_seed(0)
    with torch.device("cuda"):
        model = MistralForCausalLM(cfg).to(torch.bfloat16)
    model.save_pretrained(path, safe_serialization=True)
    del model
    torch.cuda.empty_cache()


def main(argv=None):
    import torch

    from gpu_throughput import run_ours_isolated, settings

    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--steps", type=int, default=12)
    p.add_argument("--methods", default="qlora,lora,adapter")
    p.add_argument("--tokens_per_batch", type=int, default=4096)
    p.add_argument("--set", default="compile=off", help="settings for both sides, e.g. 'compile=on'")
    args = p.parse_args(argv)
    out = Path(os.environ.get("OUT") or HERE / "results")
    out.mkdir(parents=True, exist_ok=True)
    results = {"device": torch.cuda.get_device_name(0), "torch": torch.__version__, "layers": args.layers}
    try:
        results["varlen"] = varlen_check()
    except Exception as exc:  # noqa: BLE001 - recorded, the training check still runs
        results["varlen"] = {"error": f"{type(exc).__name__}: {str(exc)[:300]}"}
    print("varlen", json.dumps(results["varlen"]), flush=True)
    ckpt = f"/tmp/mistral-{args.layers}layers-random"
    build_small(ckpt, args.layers)
    common = dict(settings(args.set), logging_steps=1)
    results["train"] = {}
    for name in filter(None, args.methods.split(",")):
        row = results["train"][name] = {}
        for graphs in ("off", "on"):
            t0 = time.time()
            try:
                m = run_ours_isolated(name, ckpt, args.steps, args.tokens_per_batch, dict(common, cuda_graphs=graphs),
                                      seed=1)
            except Exception as exc:  # noqa: BLE001 - the other runs still go
                row[graphs] = {"error": f"{type(exc).__name__}: {str(exc)[:300]}"}
                print(name, graphs, "FAILED", row[graphs]["error"], flush=True)
                continue
            row[graphs] = {"curve": [x["loss"] for x in m["loss_curve"]], "step_s": m["steady_step_s"],
                           "useful_tokens_per_s": m["steady_tokens_per_s"], "peak_gb": m["peak_memory_gb"],
                           "cuda_graphs": m["speed_settings"].get("cuda_graphs"), "wall_s": round(time.time() - t0)}
            print(name, graphs, json.dumps(row[graphs]), flush=True)
        if "curve" in row.get("on", {}) and "curve" in row.get("off", {}):
            row["curve_max_rel_diff"] = max(abs(a - b) / b for a, b in zip(row["on"]["curve"], row["off"]["curve"]))
        (out / "gpu_graphs_check.json").write_text(json.dumps(results, indent=1))
    print(f"\nvarlen filled rows: {results['varlen']}")
    print("| method | graphs off step s | graphs on step s | speed-up | peak GB off / on | curves max rel. diff |")
    print("|---|---:|---:|---:|---|---:|")
    for name, row in results["train"].items():
        off, on = row.get("off", {}), row.get("on", {})
        if "step_s" in off and "step_s" in on:
            print(f"| {name} | {off['step_s']} | {on['step_s']} | {off['step_s'] / on['step_s']:.2f}x | "
                  f"{off['peak_gb']} / {on['peak_gb']} | {row.get('curve_max_rel_diff', float('nan')):.5f} |")
        else:
            print(f"| {name} | {off.get('error', '')[:60]} | {on.get('error', '')[:60]} | | | |")


if __name__ == "__main__":
    main()
