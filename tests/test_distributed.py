"""Data-parallel training: two processes (gloo on the CPU here; NCCL, one per GPU, through --num_gpus on a GPU
machine) follow the one-process run with the same effective batch, and only the first process writes."""

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


QLORA = ("--method", "qlora", "--no-load_in_4bit", "--lora_dropout", "0")


def train(tiny_model, processed, out, launcher, env=None, extra=(), method=QLORA):
    argv = ["-m", "medpeft.cli", "train", *method, "--model_name", tiny_model,
            "--data_path", processed, "--output_dir", str(out), "--max_steps", "6", "--batch_size", "8",
            "--gradient_accumulation_steps", "2", "--report_to", "none", "--max_eval_samples", "8",
            "--logging_steps", "1", *extra]
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", **(env or {})}
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
    assert (two_run.stdout + two_run.stderr).count("validation loss after training") == 1  # and one log
    settings = json.loads((tmp_path / "two" / "medpeft_config.json").read_text())["settings"]
    assert settings["gradient_accumulation_steps"] == 1  # divided between the two processes
    assert not [p for p in tmp_path.iterdir() if p.name.startswith((".one.", ".two."))]


def test_packed_ptuning_on_two_processes_follows_one(tiny_model, processed, tmp_path):
    """P-Tuning's packed forward (the virtual tokens written into each row) also runs inside data parallel."""
    ptuning = ("--method", "ptuning", "--num_virtual_tokens", "4", "--learning_rate", "5e-2", "--packing", "on",
               "--tokens_per_batch", "512")
    _, one = train(tiny_model, processed, tmp_path / "one", [], method=ptuning)
    _, two = train(tiny_model, processed, tmp_path / "two", ["-m", "torch.distributed.run", "--nproc_per_node", "2"],
                   method=ptuning)
    assert two["processes"] == 2 and one["speed_settings"]["packing"] is True
    rel = [abs(a["loss"] - b["loss"]) / a["loss"] for a, b in zip(one["loss_curve"], two["loss_curve"])]
    assert len(rel) == 6 and max(rel) < 1e-3, rel
    assert one["validation_loss_final"] < one["validation_loss_base"]


POISONED = """
import os, sys
from medpeft.training import run as training
from medpeft.cli import run

original = training.trainer_class()


class Poisoned(original):  # only the second process's loss turns NaN, at step 3
    def compute_loss(self, model, inputs, *a, **k):
        loss = super().compute_loss(model, inputs, *a, **k)
        return loss * float("nan") if os.environ["RANK"] == "1" and self.state.global_step >= 2 else loss


training.trainer_class = lambda: Poisoned
sys.exit(run(sys.argv[1:]))
"""


def test_a_loss_gone_bad_on_one_process_stops_every_process(tiny_model, processed, tmp_path):
    script = tmp_path / "poisoned.py"
    script.write_text(POISONED)
    argv = ["train", "--method", "qlora", "--no-load_in_4bit", "--model_name", tiny_model, "--data_path", processed,
            "--output_dir", str(tmp_path / "m"), "--max_steps", "6", "--batch_size", "8", "--report_to", "none",
            "--max_eval_samples", "8", "--logging_steps", "2", "--save_steps", "0"]
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    done = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", str(script), *argv],
                          capture_output=True, text=True, env=env, timeout=600)
    assert done.returncode != 0
    assert done.stderr.count("training stopped at step 3: the loss is nan") == 2, done.stderr[-3000:]  # both, no hang
    assert not (tmp_path / "m").exists()


def test_num_gpus_beyond_the_machine_is_refused(tiny_model, processed, tmp_path, capsys):
    from medpeft.cli import run

    code = run(["train", "--method", "adapter", "--model_name", tiny_model, "--data_path", processed,
                "--output_dir", str(tmp_path / "m"), "--num_gpus", "2"])
    assert code == 2
    assert "--num_gpus 2: 0 CUDA GPU(s) visible; lower --num_gpus" in capsys.readouterr().err
    assert not (tmp_path / "m").exists()



def test_fsdp_launch_gives_each_process_the_settings_the_benchmark_uses():
    """`--fsdp` launches through accelerate's own flags; the benchmark (torchrun) sets the variables directly:
    accelerate's parser must turn the one into exactly the other."""
    from accelerate.commands.launch import launch_command_parser
    from accelerate.utils.launch import prepare_multi_gpu_env

    from medpeft.distributed import fsdp_environment, launch_command

    command = launch_command(2, ["train", "--method", "qlora"], fsdp=True)
    assert command[1:3] == ["-m", "accelerate.commands.launch"]
    args = launch_command_parser().parse_args(command[3:])
    assert args.use_fsdp and not args.multi_gpu and args.num_processes == 2
    env = prepare_multi_gpu_env(args)
    expected = fsdp_environment()
    assert {k: env.get(k) for k in expected} == expected
    assert expected["FSDP_USE_ORIG_PARAMS"] == "false" and expected["FSDP_SYNC_MODULE_STATES"] == "true"


def test_fsdp_is_refused_where_it_cannot_apply(tiny_model, processed, tmp_path, capsys):
    from medpeft.cli import run

    common = ["--model_name", tiny_model, "--data_path", processed, "--output_dir", str(tmp_path / "m")]
    assert run(["train", "--method", "adapter", *common, "--num_gpus", "2", "--fsdp"]) == 2
    assert "--fsdp shards LoRA training (method qlora); adapter trains on several GPUs data-parallel" in \
        capsys.readouterr().err
    assert run(["train", "--method", "qlora", *common, "--num_gpus", "2", "--fsdp", "--compile", "on"]) == 2
    assert "--compile on cannot run with --fsdp" in capsys.readouterr().err
    assert run(["train", "--method", "qlora", *common, "--fsdp"]) == 2
    assert "--fsdp splits the base over several GPUs: add --num_gpus N" in capsys.readouterr().err
    assert run(["train", "--method", "qlora", *common, "--fsdp", "--num_gpus", "2"]) == 2
    assert "--num_gpus 2: 0 CUDA GPU(s) visible" in capsys.readouterr().err
    assert not (tmp_path / "m").exists()


def test_run_all_trains_each_stage_through_the_launcher(tiny_model, tmp_path, monkeypatch, capsys):
    """run_all --num_gpus N hands each training stage to the launcher as `medpeft train --config FILE`; the
    launched run writes the stage's fingerprint, so a second run_all skips it. (The launcher is replaced by an
    in-process call here: this machine has no GPU.)"""
    from medpeft.cli import run

    launched = []

    def one_process_launch(num_gpus, argv, fsdp=False, env=None):
        import torch.distributed as dist

        launched.append((num_gpus, argv[:3], fsdp))
        # as in a launched process (of one), which does not launch again
        launched_env = {"LOCAL_RANK": "0", "RANK": "0", "WORLD_SIZE": "1", "MASTER_ADDR": "127.0.0.1",
                        "MASTER_PORT": str(free_port()), **(env or {})}
        for k, v in launched_env.items():
            monkeypatch.setenv(k, v)
        try:
            return run(argv)
        finally:
            if dist.is_initialized():
                dist.destroy_process_group()
            for k in launched_env:
                monkeypatch.delenv(k, raising=False)  # the launched command consumes the stage fingerprint

    monkeypatch.setattr("medpeft.pipeline.launch", one_process_launch)
    argv = ["--model_name", tiny_model, "--output_root", str(tmp_path), "--max_steps", "2", "--max_samples", "8",
            "--max_new_tokens", "4", "--batch_size", "4", "--methods", "qlora,adapter", "--num_gpus", "2"]
    assert run(argv, prog="run_all.py", command="run") == 0
    assert launched == [(2, ["train", "--method", "qlora"], False), (2, ["train", "--method", "adapter"], False)]
    settings = json.loads((tmp_path / "models" / "adapter" / "medpeft_config.json").read_text())["settings"]
    assert settings["num_gpus"] == 2 and settings["max_steps"] == 2 and settings["learning_rate"] == 1e-4
    results = json.loads((tmp_path / "evaluation_results.json").read_text())
    assert all(results["models"][m]["status"] == "ok" for m in ("base", "qlora", "adapter"))
    capsys.readouterr()
    assert run(argv, prog="run_all.py", command="run") == 0
    assert capsys.readouterr().out.count("up to date, skipped") == 4 and len(launched) == 2


def test_run_all_on_more_gpus_than_the_machine_has_stops_with_one_line(tiny_model, tmp_path, capsys):
    from medpeft.cli import run

    code = run(["--model_name", tiny_model, "--output_root", str(tmp_path), "--max_steps", "2", "--num_gpus", "2"],
               prog="run_all.py", command="run")
    assert code == 2
    assert "--num_gpus 2: 0 CUDA GPU(s) visible; lower --num_gpus" in capsys.readouterr().err
    assert not (tmp_path / "models").exists() or not any((tmp_path / "models").iterdir())


def test_the_shipped_fsdp_config_says_what_medpeft_launches_with():
    import yaml

    from medpeft.distributed import FSDP_SETTINGS

    shipped = yaml.safe_load((ROOT / "configs" / "accelerate" / "fsdp_qlora.yaml").read_text())
    assert shipped["distributed_type"] == "FSDP"
    given = {k.removeprefix("fsdp_"): str(v).lower() for k, v in shipped["fsdp_config"].items()}
    assert given == {k: v.lower() for k, v in FSDP_SETTINGS.items()}
