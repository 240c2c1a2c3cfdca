"""Data-parallel training: two processes (gloo on the CPU here; NCCL, one per GPU, through --num_gpus on a GPU
machine) follow the one-process run with the same effective batch, and only the first process writes."""

import json

import pytest
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


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


@pytest.mark.slow  # make test-fast leaves it out
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


@pytest.mark.slow  # make test-fast leaves it out
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


@pytest.mark.slow  # make test-fast leaves it out
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


def test_the_shipped_fsdp_config_says_what_medpeft_launches_with():
    import yaml

    from medpeft.distributed import FSDP_SETTINGS

    shipped = yaml.safe_load((ROOT / "configs" / "accelerate" / "fsdp_qlora.yaml").read_text())
    assert shipped["distributed_type"] == "FSDP"
    given = {k.removeprefix("fsdp_"): str(v).lower() for k, v in shipped["fsdp_config"].items()}
    assert given == {k: v.lower() for k, v in FSDP_SETTINGS.items()}
