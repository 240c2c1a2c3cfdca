"""Reliability: a killed run resumes to the same weights, training that goes wrong stops with a clear message."""

import errno
import gc
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from medpeft.cli import run

ROOT = Path(__file__).resolve().parents[1]
METHOD_ARGS = {"qlora": ["--method", "qlora"], "lora": ["--method", "qlora", "--no-load_in_4bit"],
               "adapter": ["--method", "adapter"], "ptuning": ["--method", "ptuning"]}
WEIGHTS = {"qlora": "adapter_model.safetensors", "lora": "adapter_model.safetensors",
           "adapter": "adapter.safetensors", "ptuning": "adapter_model.safetensors"}


def train_argv(name, model, data, out, *extra):
    # 96 training examples, 16 per step: 6 steps an epoch, 12 in all, a checkpoint every 4 (one mid-epoch-2)
    return ["train", *METHOD_ARGS[name], "--model_name", model, "--data_path", data, "--output_dir", str(out),
            "--num_epochs", "2", "--batch_size", "16", "--save_steps", "4", "--max_eval_samples", "4",
            "--learning_rate", "5e-3", "--report_to", "none", *extra]


def error_line(err: str) -> str:
    """The one error line of a run that got going (progress bars came before it on stderr)."""
    assert "Traceback" not in err
    lines = [ln for ln in err.replace("\r", "\n").splitlines() if ln.startswith("error: ")]
    assert len(lines) == 1, err
    return lines[0]


def weights(out: Path, name: str) -> dict:
    path = out / WEIGHTS[name]
    return load_file(str(path))


def assert_identical(a: dict, b: dict):
    assert a.keys() == b.keys()
    different = [k for k in a if not torch.equal(a[k], b[k])]
    assert not different, different[:3]


@pytest.mark.slow  # make test-fast leaves it out
@pytest.mark.parametrize("name", ["lora", "adapter", "ptuning"])
def test_a_crashed_run_resumes_to_the_same_weights(name, tiny_model, processed, tmp_path, monkeypatch):
    """Crash after step 9 (epoch 2), resume from the step-8 checkpoint: the same final weights, bit for bit."""
    from transformers import TrainerCallback

    from medpeft.training import checkpoints as ckpt
    from medpeft.training import trainer
    from medpeft.training import run as training_run

    assert run(train_argv(name, tiny_model, processed, tmp_path / "whole")) == 0

    class Crash(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            if state.global_step == 9:
                raise RuntimeError("simulated crash")

    original = trainer.trainer_class()

    class Crashing(original):
        def __init__(self, *a, callbacks=(), **k):
            super().__init__(*a, callbacks=[*callbacks, Crash()], **k)

    monkeypatch.setattr(training_run, "trainer_class", lambda: Crashing)
    out = tmp_path / "resumed"
    with pytest.raises(RuntimeError, match="simulated crash"):
        run(train_argv(name, tiny_model, processed, out))
    checkpoints = ckpt.checkpoint_dir(out)
    assert [p.name for p in ckpt.complete_checkpoints(checkpoints)] == ["checkpoint-4", "checkpoint-8"]
    assert not out.exists()  # nothing half-written in place
    monkeypatch.setattr(training_run, "trainer_class", lambda: original)

    assert run(train_argv(name, tiny_model, processed, out, "--resume_from_checkpoint", "auto")) == 0
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["resumed_from"].endswith("checkpoint-8") and metrics["steps"] == 12
    assert_identical(weights(tmp_path / "whole", name), weights(out, name))
    assert not checkpoints.exists()  # removed once the output is complete


@pytest.mark.slow  # make test-fast leaves it out
def test_sigkill_in_the_middle_then_resume_gives_the_same_adapter(tiny_model, processed, tmp_path):
    """A real SIGKILL of the training process (4-bit QLoRA), then --resume_from_checkpoint auto."""
    whole, killed = tmp_path / "whole", tmp_path / "killed"
    assert run(train_argv("qlora", tiny_model, processed, whole)) == 0
    # The child sleeps in each step so that the kill lands between checkpoints, not after the end.
    slow = ("import time, transformers; step = transformers.Trainer.training_step\n"
            "def slow(self, *a, **k):\n    time.sleep(0.4)\n    return step(self, *a, **k)\n"
            "transformers.Trainer.training_step = slow\n"
            "import sys; from medpeft.cli import run; sys.exit(run(sys.argv[1:]))")
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    child = subprocess.Popen([sys.executable, "-c", slow, *train_argv("qlora", tiny_model, processed, killed)],
                             env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    marker = Path(f"{killed}.checkpoints") / "checkpoint-8" / "medpeft_complete"
    deadline = time.time() + 300
    while not marker.exists() and child.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    os.kill(child.pid, signal.SIGKILL)
    assert child.wait() == -signal.SIGKILL
    assert not killed.exists()
    leftovers = [p.name for p in tmp_path.iterdir() if p.name.startswith(".killed.")]
    assert leftovers  # its scratch folders, cleaned by the next run

    assert run(train_argv("qlora", tiny_model, processed, killed, "--resume_from_checkpoint", "auto")) == 0
    assert json.loads((killed / "metrics.json").read_text())["resumed_from"].endswith("checkpoint-8")
    assert_identical(weights(whole, "qlora"), weights(killed, "qlora"))
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".killed.")]


def test_resume_refuses_a_checkpoint_of_other_settings(tiny_model, processed, tmp_path, capsys):
    out = tmp_path / "m"
    assert run(train_argv("lora", tiny_model, processed, out, "--keep_checkpoints")) == 0
    code = run(train_argv("lora", tiny_model, processed, out, "--resume_from_checkpoint", "auto", "--lora_r", "4"))
    err = error_line(capsys.readouterr().err)
    assert code == 2 and "was made by a run with other settings or data (lora_r 16 vs 4)" in err, err
    code = run(train_argv("lora", tiny_model, processed, out, "--resume_from_checkpoint", str(tmp_path)))
    assert code == 2 and "is not a complete medpeft checkpoint" in capsys.readouterr().err


def test_a_diverging_loss_stops_naming_the_step_and_keeps_the_last_good_checkpoint(tiny_model, processed, tmp_path,
                                                                                   monkeypatch, capsys):
    from medpeft.training import checkpoints as ckpt
    from medpeft.training import trainer
    from medpeft.training import run as training_run

    original = trainer.trainer_class()

    class Poisoned(original):  # the loss turns NaN at step 6, as after an exploding update
        def compute_loss(self, model, inputs, *a, **k):
            loss = super().compute_loss(model, inputs, *a, **k)
            return loss * float("nan") if self.state.global_step >= 5 else loss

    monkeypatch.setattr(training_run, "trainer_class", lambda: Poisoned)
    out = tmp_path / "m"
    code = run(train_argv("lora", tiny_model, processed, out))
    err = error_line(capsys.readouterr().err)
    assert code == 1
    assert "training stopped at step 6: the loss is nan" in err and "--learning_rate 0.005" in err
    assert "the last good checkpoint is" in err and "checkpoint-4 (step 4)" in err
    good = load_file(str(ckpt.checkpoint_dir(out) / "checkpoint-4" / ckpt.TRAINABLE_FILE))
    assert all(torch.isfinite(t).all() for t in good.values())
    assert not out.exists()
    assert gc.isenabled()  # the collector is back after a run that stopped


def test_no_automatic_garbage_collection_lands_inside_training(tiny_model, processed, tmp_path, monkeypatch):
    """Python's full collections pause a real 7B process for 0.25 s or more, at steps of their own choosing (and
    under data parallel every process waits for the one collecting): while training the collector is off, young
    objects are collected every GC_EVERY steps, everything at checkpoints, and the collector is on again after."""
    from medpeft.training import trainer
    from medpeft.training import run as training_run

    monkeypatch.setattr(trainer, "GC_EVERY", 3)
    original = trainer.trainer_class()
    steps, collections = [], []

    class Watch(original):
        def training_step(self, *a, **k):
            steps.append(gc.isenabled())
            return super().training_step(*a, **k)

    def record(phase, info):
        if phase == "start" and steps and not gc.isenabled():
            collections.append((len(steps), info["generation"]))

    monkeypatch.setattr(training_run, "trainer_class", lambda: Watch)
    gc.callbacks.append(record)
    try:
        assert run(train_argv("lora", tiny_model, processed, tmp_path / "a")) == 0
    finally:
        gc.callbacks.remove(record)
    assert len(steps) == 12 and not any(steps) and gc.isenabled()
    assert {s for s, g in collections if g < 2} == {3, 6, 9}  # 12 is a checkpoint step: a full collection
    assert {s for s, g in collections if g == 2} == {4, 8, 12}  # checkpoints every 4 steps
    assert all(g in (1, 2) for _, g in collections)


def test_out_of_memory_gives_advice_or_halves_the_batch(tiny_model, processed, tmp_path, monkeypatch, capsys):
    from medpeft.training import trainer
    from medpeft.training import run as training_run

    original = trainer.trainer_class()

    class Small(original):  # a device on which more than 8 examples per micro-batch do not fit
        def training_step(self, model, inputs, *a, **k):
            if inputs["input_ids"].shape[0] > 8:
                raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
            return super().training_step(model, inputs, *a, **k)

    monkeypatch.setattr(training_run, "trainer_class", lambda: Small)
    code = run(train_argv("lora", tiny_model, processed, tmp_path / "a"))
    err = error_line(capsys.readouterr().err)
    assert code == 1
    assert "out of CPU memory at --batch_size 16: lower --batch_size and raise --gradient_accumulation_steps" in err
    assert "--auto_batch_size" in err and not (tmp_path / "a").exists()

    assert run(train_argv("lora", tiny_model, processed, tmp_path / "b", "--auto_batch_size")) == 0
    out = capsys.readouterr().out
    assert "retrying with --batch_size 8 --gradient_accumulation_steps 2" in out
    settings = json.loads((tmp_path / "b" / "medpeft_config.json").read_text())["settings"]
    metrics = json.loads((tmp_path / "b" / "metrics.json").read_text())
    assert settings["batch_size"] == 8 and settings["gradient_accumulation_steps"] == 2 and metrics["steps"] == 12


def test_disk_full_while_saving_leaves_no_output(tiny_model, processed, tmp_path, monkeypatch, capsys):
    from medpeft.methods import qlora

    def full(*a, **k):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(qlora, "save", full)
    out = tmp_path / "m"
    code = run(train_argv("lora", tiny_model, processed, out, "--save_steps", "0"))
    err = error_line(capsys.readouterr().err)
    assert code == 1 and err.startswith("error: disk full while writing") and err.endswith("free space and run again")
    assert not out.exists() and not [p for p in tmp_path.iterdir() if p.name.startswith(".m.")]
    assert not Path(f"{out}.checkpoints").exists()  # no empty checkpoint folder that suggests a resume


def test_disk_full_while_checkpointing_keeps_the_last_complete_checkpoint(tiny_model, processed, tmp_path,
                                                                          monkeypatch, capsys):
    from medpeft.training import checkpoints as ckpt
    from medpeft.training import trainer
    from medpeft.training import run as training_run

    original = trainer.trainer_class()

    class FillsUp(original):  # the disk fills up in the middle of the step-8 checkpoint
        def _save_optimizer_and_scheduler(self, output_dir):
            if self.state.global_step == 8:
                raise OSError(errno.ENOSPC, "No space left on device")
            return super()._save_optimizer_and_scheduler(output_dir)

    monkeypatch.setattr(training_run, "trainer_class", lambda: FillsUp)
    out = tmp_path / "m"
    code = run(train_argv("lora", tiny_model, processed, out))
    err = error_line(capsys.readouterr().err)
    assert code == 1 and "disk full while saving a checkpoint" in err and "--resume_from_checkpoint auto" in err
    root = ckpt.checkpoint_dir(out)
    assert sorted(p.name for p in root.glob("checkpoint-*")) == ["checkpoint-4"]  # the partial one is gone
    assert (root / "checkpoint-4" / ckpt.CHECKPOINT_COMPLETE).is_file() and not out.exists()
