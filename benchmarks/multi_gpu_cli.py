"""The seed's command lines on several GPUs, as a user runs them: prepare, train each method on N GPUs (QLoRA also
with --fsdp), evaluate the outputs on one GPU, and run_all --num_gpus N.

    python benchmarks/multi_gpu_cli.py --num_gpus 2            # on a machine with 2 GPUs; writes multi_gpu_cli.json

The base is a random Mistral with the 7B's widths and --layers decoder layers (no weights can be downloaded on the
benchmark machine) and the tests' small offline tokenizer; the data is the bundled sample. What it shows is that
each path runs and what it reports (processes, shards, memory, losses), not model quality.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def build_base(path: Path, layers: int) -> Path:
    import torch
    from transformers import MistralConfig, MistralForCausalLM

    sys.path.insert(0, str(ROOT / "tests"))
    from conftest import build_tokenizer

    if (path / "config.json").is_file():
        return path
    tok = build_tokenizer()
    torch.manual_seed(0)
    config = MistralConfig(vocab_size=len(tok), hidden_size=4096, intermediate_size=14336, num_hidden_layers=layers,
                           num_attention_heads=32, num_key_value_heads=8, max_position_embeddings=4096,
                           sliding_window=None, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id,
                           bos_token_id=tok.bos_token_id, tie_word_embeddings=False, dtype="bfloat16")
    with torch.device("cuda" if torch.cuda.is_available() else "cpu"):
        model = MistralForCausalLM(config).to(torch.bfloat16)
    model.save_pretrained(path, safe_serialization=True)
    tok.save_pretrained(path)
    return path


def step(label: str, argv: list[str], log: dict) -> int:
    t = time.time()
    done = subprocess.run([sys.executable, *argv], cwd=ROOT, capture_output=True, text=True,
                          env={**os.environ, "NCCL_NVLS_ENABLE": "0",
                               "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))})
    tail = (done.stdout + done.stderr).strip().splitlines()
    with open(Path(os.environ.get("OUT") or "/tmp") / "multi_gpu_cli.log", "a") as f:  # every line, for failures
        f.write(f"\n===== {label}: {' '.join(argv)}\n{done.stdout}\n{done.stderr}\n")
    log[label] = {"command": " ".join(["python", *argv]), "exit_code": done.returncode,
                  "seconds": round(time.time() - t, 1), "last_lines": tail[-6:]}
    print(f"{label}: exit {done.returncode} in {time.time() - t:.0f} s | {tail[-1] if tail else ''}", flush=True)
    save(log)  # after every step: a run cut short keeps what it did
    return done.returncode


def save(log: dict) -> Path:
    out = Path(os.environ.get("OUT") or ROOT / "benchmarks" / "results") / "multi_gpu_cli.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(log, indent=1))
    return out


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--num_gpus", type=int, default=2)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--max_steps", type=int, default=20)
    p.add_argument("--work", default="/tmp/medpeft-multi-gpu")
    p.add_argument("--stages", default="qlora_1gpu,qlora_ddp,qlora_fsdp,adapter_ddp,ptuning_ddp,evaluate,run_all")
    args = p.parse_args(argv)
    stages = set(args.stages.split(","))
    work = Path(args.work)
    base = str(build_base(work / "base", args.layers))
    data, n = str(work / "processed_data"), str(args.num_gpus)
    log: dict = {"num_gpus": args.num_gpus, "layers": args.layers}
    common = ["--model_name", base, "--data_path", data, "--max_steps", str(args.max_steps), "--report_to", "none",
              "--max_eval_samples", "32", "--logging_steps", "5"]
    step("prepare", ["utils/prepare_dataset.py", "--input_data", "medpeft/resources/medical_sample.jsonl",
                     "--output_dir", data, "--model_name", base, "--max_length", "512", "--train_size", "0.8"], log)
    runs = {"qlora_1gpu": ["qlora/train_qlora.py", "--output_dir", str(work / "qlora_1gpu")],
            "qlora_ddp": ["qlora/train_qlora.py", "--output_dir", str(work / "qlora"), "--num_gpus", n],
            "qlora_fsdp": ["qlora/train_qlora.py", "--output_dir", str(work / "qlora_fsdp"), "--num_gpus", n,
                           "--fsdp"],
            "adapter_ddp": ["adapter_tuning/train_adapter.py", "--output_dir", str(work / "adapter"), "--num_gpus", n],
            "ptuning_ddp": ["p_tuning/train_ptuning.py", "--output_dir", str(work / "ptuning"), "--num_gpus", n]}
    for label, command in runs.items():
        if label in stages and step(label, command + common, log) == 0:
            metrics = json.loads((Path(command[2]) / "metrics.json").read_text())
            log[label]["metrics"] = {k: metrics.get(k) for k in (
                "processes", "sharded", "parameters_per_process", "total_parameters", "peak_memory_gb",
                "tokens_per_s", "steps", "validation_loss_base", "validation_loss_final")}
    trained = [f"--{m}_model={work / d}" for m, d in (("qlora", "qlora_fsdp"), ("adapter", "adapter"),
                                                     ("ptuning", "ptuning")) if (work / d / "metrics.json").is_file()]
    if "evaluate" in stages:
        step("evaluate", ["utils/evaluate_models.py", "--base_model", base, *trained, "--test_data",
                          f"{data}/test.json", "--output_file", str(work / "evaluation_results.json"),
                          "--max_samples", "24", "--max_new_tokens", "16"], log)
    results = work / "evaluation_results.json"
    if results.is_file():
        models = json.loads(results.read_text())["models"]
        log["evaluate"]["models"] = {m: {k: e.get(k) for k in ("status", "loss", "mc_accuracy", "device")}
                                     for m, e in models.items()}
    if "run_all" in stages:
        step("run_all", ["run_all.py", "--input_data", "medpeft/resources/medical_sample.jsonl", "--model_name", base,
                         "--num_epochs", "1", "--batch_size", "8", "--num_gpus", n, "--methods", "qlora,adapter",
                         "--max_steps", "10", "--max_samples", "16", "--max_new_tokens", "8",
                         "--output_root", str(work / "pipeline")], log)
    print(f"wrote {save(log)}")


if __name__ == "__main__":
    main()
