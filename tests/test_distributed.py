"""Data-parallel training: two processes (gloo on the CPU here; NCCL, one per GPU, through --num_gpus on a GPU
machine) follow the one-process run with the same effective batch, and only the first process writes."""

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def train(tiny_model, processed, out, launcher):
    argv = ["-m", "medpeft.cli", "train", "--method", "qlora", "--no-load_in_4bit", "--model_name", tiny_model,
            "--data_path", processed, "--output_dir", str(out), "--max_steps", "6", "--batch_size", "8",
            "--gradient_accumulation_steps", "2", "--report_to", "none", "--max_eval_samples", "8",
            "--logging_steps", "1", "--lora_dropout", "0"]
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    done = subprocess.run([sys.executable, *launcher, *argv], capture_output=True, text=True, env=env, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    return done, json.loads((Path(out) / "metrics.json").read_text())


def test_two_processes_follow_one_with_the_same_effective_batch(tiny_model, processed, tmp_path):
    _, one = train(tiny_model, processed, tmp_path / "one", [])
    two_run, two = train(tiny_model, processed, tmp_path / "two",
                         ["-m", "torch.distributed.run", "--nproc_per_node", "2"])
    assert two["processes"] == 2 and one["processes"] == 1
    assert [p["learning_rate"] for p in two["loss_curve"]] == [p["learning_rate"] for p in one["loss_curve"]]
    assert two["epochs"] == one["epochs"] == 1.0  # 96 examples, 16 per optimizer step either way
    rel = [abs(a["loss"] - b["loss"]) / a["loss"] for a, b in zip(one["loss_curve"], two["loss_curve"])]
    assert len(rel) == 6 and max(rel) < 0.02, rel
    assert two_run.stdout.count("qlora: validation loss") == 1  # one summary: the first process
    settings = json.loads((tmp_path / "two" / "medpeft_config.json").read_text())["settings"]
    assert settings["gradient_accumulation_steps"] == 1  # divided between the two processes
    assert not [p for p in tmp_path.iterdir() if p.name.startswith((".one.", ".two."))]


def test_num_gpus_beyond_the_machine_is_refused(tiny_model, processed, tmp_path, capsys):
    from medpeft.cli import run

    code = run(["train", "--method", "adapter", "--model_name", tiny_model, "--data_path", processed,
                "--output_dir", str(tmp_path / "m"), "--num_gpus", "2"])
    assert code == 2
    assert "--num_gpus 2: 0 CUDA GPU(s) visible; lower --num_gpus" in capsys.readouterr().err
    assert not (tmp_path / "m").exists()
