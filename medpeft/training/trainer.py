"""The glue to Hugging Face's Trainer: its subclass, the callbacks, the data order, the optimizer, logging and GC."""

from __future__ import annotations

import contextlib
import functools
import gc
import importlib.util
import time
from pathlib import Path

import torch

from ..errors import TrainingStopped, UsageError
from ..distributed import sharded
from .checkpoints import TRAINABLE_FILE, complete_checkpoints, load_trainable, trainable_state


def progress_callback(collator):
    """Trainer's progress bar, with each log written as one readable line instead of a dict."""
    from transformers.trainer_callback import ProgressCallback

    start = []

    class Progress(ProgressCallback):
        def on_train_begin(self, args, state, control, **kwargs):
            start.append(time.perf_counter())
            return super().on_train_begin(args, state, control, **kwargs)

        def on_log(self, args, state, control, logs=None, **kwargs):
            if not (state.is_world_process_zero and self.training_bar is not None and "loss" in (logs or {})):
                return
            parts = [f"step {state.global_step}/{state.max_steps}", f"epoch {state.epoch or 0:.2f}",
                     f"loss {logs['loss']:.4f}"]
            if logs.get("learning_rate") is not None:
                parts.append(f"lr {logs['learning_rate']:.2e}")
            if logs.get("grad_norm") is not None:
                parts.append(f"grad norm {logs['grad_norm']:.3f}")
            if start:
                parts.append(f"{collator.real_tokens / max(time.perf_counter() - start[0], 1e-9):,.0f} tokens/s")
            self.training_bar.write(" | ".join(parts))

    return Progress()


def reporters(report_to: str) -> list[str]:
    """TrainingArguments.report_to from --report_to, refusing a logger that is not installed."""
    names = [r.strip() for r in report_to.split(",") if r.strip() and r.strip() != "none"]
    for name, module, package in (("tensorboard", "tensorboard", "tensorboard"), ("wandb", "wandb", "wandb")):
        if name in names and importlib.util.find_spec(module) is None:
            raise UsageError(f"--report_to {name}: the {package} package is not installed; "
                             f"pip install {package}, or pass --report_to none")
    return names


def close_loggers(trainer) -> None:
    for callback in trainer.callback_handler.callbacks:
        writer = getattr(callback, "tb_writer", None)
        if writer is not None:
            writer.close()
            callback.tb_writer = None


def optimizer(cfg, device: str) -> str:
    if cfg.optim == "auto":
        return "adamw_torch_fused" if device == "cuda" else "adamw_torch"
    if cfg.optim == "paged_adamw_8bit" and sharded():  # peft's FSDP notes: bitsandbytes' optimizers fail there
        raise UsageError("--optim paged_adamw_8bit does not work with --fsdp; use --optim auto")
    return cfg.optim


def out_of_memory(exc: BaseException) -> bool:
    from accelerate.utils.memory import should_reduce_batch_size

    return isinstance(exc, torch.OutOfMemoryError) or should_reduce_batch_size(exc)


def finite_loss_callback(trainer):
    """Stops a run whose loss is no longer finite before it logs, evaluates or saves a checkpoint."""
    from transformers import TrainerCallback

    class FiniteLoss(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):  # after the Trainer's flow callback sets its flags
            if control.should_log or control.should_save or control.should_evaluate or control.should_training_stop:
                trainer.stop_if_not_finite()

    return FiniteLoss()


GC_EVERY = 50  # optimizer steps between collections of Python's young objects while training


@contextlib.contextmanager
def scheduled_gc():
    """Python's automatic garbage collector off while training. Its full collections pause the process for 0.25 s
    or more (half a million objects: modules, parameters, compiled graphs), at steps of their own choosing: a slow
    step on one GPU, and under data parallel every process waits for the one collecting. Young objects are
    collected every GC_EVERY steps instead and everything at checkpoints and evaluations, at the same step on
    every process (as OLMo-core and torchtitan do)."""
    enabled = gc.isenabled()
    gc.collect()
    gc.disable()
    try:
        yield
    finally:
        if enabled:
            gc.enable()


def gc_callback():
    from transformers import TrainerCallback

    class ScheduledGC(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            if control.should_save or control.should_evaluate:
                gc.collect()
            elif state.global_step % GC_EVERY == 0:
                gc.collect(1)

    return ScheduledGC()


class SeededLengthOrder(torch.utils.data.Sampler):
    """The Trainer's length-grouped order, drawn from (seed, epoch) instead of the global RNG, so that a run resumed
    mid-epoch sees the same batches as one that was never interrupted."""

    def __init__(self, lengths: list[int], batch_size: int, seed: int):
        super().__init__()
        self.lengths, self.batch_size, self.seed, self.epoch = lengths, batch_size, seed, 0

    def set_epoch(self, epoch: int) -> None:  # called by accelerate's data loader at each epoch
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.lengths)

    def __iter__(self):
        from transformers.trainer_pt_utils import get_length_grouped_indices

        generator = torch.Generator().manual_seed(self.seed + self.epoch)
        return iter(get_length_grouped_indices(self.lengths, self.batch_size, generator=generator))


@contextlib.contextmanager
def mixed_precision(bf16: bool):
    """accelerate keeps one process-wide state, and TrainingArguments writes bf16 into the process's
    ACCELERATE_MIXED_PRECISION without taking it back: a second run in the same process (run_all, tests) would
    inherit the first run's mixed precision. Both are reset on entry and put back on exit."""
    import os

    from accelerate.state import AcceleratorState

    before = os.environ.get("ACCELERATE_MIXED_PRECISION")
    AcceleratorState._reset_state(reset_partial_state=True)
    os.environ["ACCELERATE_MIXED_PRECISION"] = "bf16" if bf16 else "no"
    try:
        yield
    finally:
        AcceleratorState._reset_state(reset_partial_state=True)
        if before is None:
            os.environ.pop("ACCELERATE_MIXED_PRECISION", None)
        else:
            os.environ["ACCELERATE_MIXED_PRECISION"] = before


@contextlib.contextmanager
def quantized_base_trainable(model):
    """The Trainer refuses a quantized base that is not a peft model; AdapterHub adapters on a 4-bit base are just
    as trainable (AdapterHub's own AdapterTrainer lifts the same flag). Lifted while the Trainer is built."""
    lifted = getattr(model, "is_quantized", False) and not hasattr(model, "peft_config")
    if lifted:
        model.is_quantized = False
    try:
        yield
    finally:
        if lifted:
            model.is_quantized = True


@functools.lru_cache(maxsize=1)
def trainer_class():
    from transformers import Trainer

    class MedpeftTrainer(Trainer):
        """Checkpoints hold the trainable weights only, in one format for every method (peft's own save keeps
        P-Tuning's virtual tokens but not the encoder that makes them); a loss that is not finite stops the run before
        its next log, evaluation or checkpoint, naming the step where it happened."""

        _first_bad = None
        _flops_per_token = None
        param_groups = None  # the method's, with their own learning rates (LoRA+); the scheduler scales each

        def create_optimizer(self):
            if self.param_groups is None or self.optimizer is not None:
                return super().create_optimizer()
            cls, kwargs = Trainer.get_optimizer_cls_and_kwargs(self.args, self.model)
            kwargs.pop("lr", None)
            self.optimizer = cls([dict(g, weight_decay=self.args.weight_decay) for g in self.param_groups], **kwargs)
            return self.optimizer

        def floating_point_ops(self, inputs):
            # The Trainer's counts the model's parameters again at every micro-batch, Python time on every step
            # (docs/performance.md); the count is the same each time.
            ids = inputs.get("input_ids") if isinstance(inputs, dict) else None
            if not isinstance(ids, torch.Tensor):
                return super().floating_point_ops(inputs)
            if self._flops_per_token is None:
                self._flops_per_token = super().floating_point_ops({"input_ids": ids.reshape(-1)[:1]})
            return self._flops_per_token * ids.numel()

        def _get_train_sampler(self, train_dataset=None):
            sampler = super()._get_train_sampler(train_dataset)
            if self.args.group_by_length:  # its order must not depend on the RNG state, or a resume reorders data
                return SeededLengthOrder(sampler.lengths, sampler.batch_size, self.args.seed)
            return sampler

        def _save(self, output_dir=None, state_dict=None):
            from safetensors.torch import save_file

            out = Path(output_dir or self.args.output_dir)
            out.mkdir(parents=True, exist_ok=True)
            save_file(trainable_state(self.model), str(out / TRAINABLE_FILE))

        def _load_from_checkpoint(self, resume_from_checkpoint, model=None):
            load_trainable(model or self.model, Path(resume_from_checkpoint) / TRAINABLE_FILE)

        def training_step(self, model, inputs, num_items_in_batch=None):
            loss = super().training_step(model, inputs, num_items_in_batch)
            # Noted on the device and read when the Trainer syncs anyway (log, save, evaluation, end): reading it
            # here would make the CPU wait for every backward pass, and the GPU then wait for the CPU.
            loss_now = loss.detach().double().reshape(-1)[:1]
            if self._first_bad is None:  # (step, loss) of the first non-finite loss; inf while there is none
                self._first_bad = torch.full((2,), float("inf"), dtype=torch.float64, device=loss.device)
            found = torch.cat([torch.full_like(loss_now, self.state.global_step + 1), loss_now])  # no host copy
            self._first_bad = torch.where(~torch.isfinite(loss_now) & torch.isinf(self._first_bad[:1]), found,
                                          self._first_bad)
            return loss

        def stop_if_not_finite(self):
            if self._first_bad is None:
                return
            rows = self.accelerator.gather(self._first_bad[None]).reshape(-1, 2)  # every process stops alike
            step, value = rows[int(rows[:, 0].argmin())].tolist()
            if step == float("inf"):
                return
            good = complete_checkpoints(Path(self.args.output_dir))
            kept = (f"the last good checkpoint is {good[-1]} (step {good[-1].name.split('-')[-1]})" if good
                    else "no checkpoint was saved before it (see --save_steps)")
            raise TrainingStopped(
                f"training stopped at step {int(step)}: the loss is {value:g}. Likely causes: a learning rate "
                f"too high (--learning_rate {self.args.learning_rate:g}; try a tenth), an example that is empty "
                f"or corrupt, or overflow in 16-bit arithmetic (--dtype float32); {kept}")

    return MedpeftTrainer
