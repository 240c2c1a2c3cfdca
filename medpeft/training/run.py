"""The one training path every method shares: data -> base model -> method -> Trainer -> output directory.

    run = build("qlora", TrainConfig(...), qlora.Options(...))   # data, base model, method attached
    metrics = run.fit()                                          # the base's validation loss, training, the tuned one
    run.save(metrics)                                            # the output folder (medpeft/outputs.py)
    run.cleanup()
    train(...) does all four; the rest of this package: trainer.py (the Trainer and its callbacks), checkpoints.py,
    measure.py (memory, speed), packing.py and speedups.py (the GPU path).
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from .. import methods
from ..config import NOT_FINGERPRINTED, as_dict
from ..data import load_split, read_metadata
from ..distributed import is_main_process, process_count, sharded, sum_over_processes
from ..errors import TrainingStopped, UsageError
from ..export import hub_token, push_to_hub
from ..modeling import (default_device, load_model, load_tokenizer, model_compute_dtype, pin_4bit_layout,
                        prepare_kbit, resolve_model)
from ..outputs import (CONFIG_FILE, base_signature, check_output_dir, library_versions, publish_dir, write_json,
                       write_output_files)
from ..precision import explain, resolve, short
from ..records import sample
from ..scoring import answer_loss
from ..tokens import PadCollator, answer_examples
from .checkpoints import (CHECKPOINT_IDENTITY, checkpoint_dir, complete_checkpoints, disk_full,
                          drop_incomplete_checkpoints, find_checkpoint, mark_complete_callback)
from .measure import RssSampler, StepTimer, count_parameters, peak_memory_gb
from . import fp8, graphs
from .packing import PackedCollator, StaticRows, enable_varlen_attention, pack_batches, token_budget
from .selection import (balance_labels, evaluation_interval, guard_default, score_unpatched, search_learning_rate,
                        selector_callback, time_limit_callback, validation_score)
from .speedups import apply_liger, compile_layers, decoder_layers, liger_available, plan_checkpointing
from .trainer import (close_loggers, finite_loss_callback, gc_callback, mixed_precision, optimizer, out_of_memory,
                      progress_callback, quantized_base_trainable, reporters, scheduled_gc, trainer_class)


@dataclass
class RunContext:
    """What a method needs from the run: settings, the resolved base model, a scratch folder."""

    cfg: object
    resolved_model: str
    device: str
    work_dir: Path
    gradient_checkpointing: bool

    def load_base(self, load_in_4bit: bool | None = None, path: str | None = None, prepare_for_training=True):
        load_in_4bit = self.cfg.load_in_4bit if load_in_4bit is None else load_in_4bit
        model = load_model(path or self.resolved_model, load_in_4bit=load_in_4bit, device=self.device,
                           trust_remote_code=self.cfg.trust_remote_code, dtype=resolve(self.cfg.dtype, self.device))
        model.config.use_cache = False
        if not prepare_for_training:
            return model
        if load_in_4bit:
            model = prepare_kbit(model, self.gradient_checkpointing)
        else:
            for p in model.parameters():
                p.requires_grad_(False)
            if self.gradient_checkpointing:
                model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        return model


@dataclass
class TrainingRun:
    """Everything `train` sets up, kept apart so that tests can look between the stages."""

    method_name: str
    cfg: object
    opts: object
    ctx: RunContext
    model: object
    tokenizer: object
    train_examples: list
    val_examples: list
    metadata: dict
    staging: Path
    log: object = print
    fingerprint: str | None = None  # set by the pipeline to recognise an up-to-date output
    discard_stale_checkpoints: bool = False  # the pipeline: checkpoints of other settings are deleted, not refused
    val_records: list | None = None  # the validation records behind val_examples: the selection scores them
    time_limit_s: float | None = None  # a learning-rate candidate stops when its share of the search is spent
    selection: dict | None = None  # --select / --early_stopping: the validation scores and the step kept
    balance: dict | None = None  # --balance labels: the label counts before and after
    validation_score: dict | None = None  # the saved weights on the selection's measure (selection.py)
    checkpoint_budget: object = None  # --checkpoint_share auto (speedups.CheckpointBudget)
    base_score: dict | None = None  # the base's validation answer loss (a search sets it once for its candidates)

    @property
    def method(self):
        return methods.get(self.method_name)

    gathered: dict | None = None  # under FSDP: the trained weights, gathered from the shards (first process)

    def validation_loss(self, desc="validation", model=None) -> dict:
        return answer_loss(model or self.model, self.val_examples, self.tokenizer.pad_token_id, self.cfg.batch_size,
                           desc)

    def _batches(self, undo: contextlib.ExitStack):
        """(training data, collator, per-device batch size, speed settings): packed token-budget rows where
        packing applies (CUDA by default), else padded batches; Liger kernels and partial checkpointing on top.
        What this changes in the model goes onto `undo` (Liger's kernels stay: they compute the same function)."""
        cfg, device = self.cfg, self.ctx.device
        packing = cfg.packing == "on" or (cfg.packing == "auto" and device == "cuda")
        speed = {"packing": packing}
        # micro-batches per optimizer step: an epoch's last step, when partial, would hold repeated examples on
        # some processes (or fewer micro-batches on one): trimmed, so that 1 and N processes take the same steps
        unit = process_count() * cfg.gradient_accumulation_steps
        graphs_refused = graphs.refusal(cfg, device, packing, self.ctx.gradient_checkpointing, decoder_layers(self.model))
        if packing:
            budget = token_budget(cfg)
            slots, unpack = self.method.pack(self.model)
            undo.callback(unpack)
            groups = pack_batches([len(e["input_ids"]) for e in self.train_examples], budget - slots, cfg.seed)
            if unit > 1 and len(groups) > unit:
                groups = groups[:len(groups) - len(groups) % unit]
            data = [[self.train_examples[i] for i in g] for g in groups]
            collator, batch_size = PackedCollator(slots, None if graphs_refused else StaticRows.of(data, budget)), 1
            undo.callback(enable_varlen_attention(self.model))
            speed.update(tokens_per_batch=budget, micro_batches=len(groups),
                         examples_per_micro_batch=round(len(self.train_examples) / len(groups), 2))
        else:
            data, collator, batch_size = self.train_examples, PadCollator(self.tokenizer.pad_token_id), cfg.batch_size
            step = batch_size * unit
            if unit > 1 and len(data) > step and len(data) % step:
                data = data[:len(data) - len(data) % step]
        # auto: one process only; under data parallel compiled layers measured slower, and once failed
        # (docs/performance.md); --compile on still opts in
        can = self.method.CAPABILITIES
        measured = can.compile == "always" or (can.compile == "packed" and packing)
        compiled = (cfg.compile == "on" or (cfg.compile == "auto" and device == "cuda" and measured
                                            and process_count() == 1)) and not sharded()
        liger = cfg.liger == "on" or (cfg.liger == "auto" and device == "cuda" and can.liger
                                       and liger_available())
        if compiled and not can.liger_fused_ce:
            liger = False  # compiled layers fuse their norms and activations: nothing is left for Liger to do
        if liger and not apply_liger(self.model, self.log, can.liger_fused_ce, layers=not compiled):
            if cfg.liger == "on":
                raise UsageError("--liger on: Liger kernels need a CUDA GPU and the liger-kernel package")
            liger = False
        speed["liger"] = liger and ("fused cross-entropy only" if compiled else
                                    "all" if can.liger_fused_ce else "without fused cross-entropy")
        if not packing and not liger:  # logits from the first answer token on; Liger's fused loss makes none
            peft_config = getattr(self.model, "active_peft_config", None)
            collator.answer_logits = peft_config.num_virtual_tokens if getattr(
                peft_config, "is_prompt_learning", False) else 0
            speed["answer_logits_only"] = True
        fp8.plan(self.model, cfg, device, speed, undo, self.log)
        self.checkpoint_budget = (plan_checkpointing(self.model, cfg, device, speed, undo, self.log, graphs_refused)
                                  if self.ctx.gradient_checkpointing else None)
        if compiled:
            speed["compiled_layers"], uncompile = compile_layers(self.model, fallback=cfg.compile == "auto")
            undo.callback(uncompile)
        return data, collator, batch_size, speed

    def fit(self, score_base: bool = True) -> dict:
        cfg, device = self.cfg, self.ctx.device
        trainable, total = count_parameters(self.model)
        self.log(f"trainable parameters: {trainable:,} of {total:,} ({100 * trainable / total:.3f}%)")
        # Under FSDP the base exists whole only on the first process's CPU until training shards it: the base
        # model is scored after training instead (the same frozen weights, adapters switched off).
        shard = sharded()
        trainable_names = {n for n, p in self.model.named_parameters() if p.requires_grad} if shard else None
        base_val = None
        if not shard and score_base:
            with self.method.disabled(self.model):
                base_val = self.validation_loss("base validation")
            self.log(f"validation loss before training (base model): {base_val['loss']:.4f}")
            self.base_score = self.base_score or {"loss": base_val["loss"]}  # a step above it diverged
        if shard and cfg.resume_from_checkpoint not in ("", "auto"):
            raise UsageError("--resume_from_checkpoint: runs with --fsdp write no checkpoints; start without it")
        resume = (find_checkpoint(cfg, self._checkpoint_identity(), self.log, self.discard_stale_checkpoints)
                  if cfg.resume_from_checkpoint and not shard else None)
        if cfg.resume_from_checkpoint and resume is None:
            self.log(f"no complete checkpoint in {checkpoint_dir(cfg.output_dir)}: starting from step 0")
        elif resume:
            self.log(f"resuming from {resume}")
        while True:
            try:
                trainer, result, runtime, collator, speed, timer, peak = self._train(base_val, resume)
                break
            except Exception as exc:  # noqa: BLE001 - sorted below: out of memory, disk full, or not ours
                if not out_of_memory(exc):
                    if disk_full(exc, checkpoint_dir(cfg.output_dir)):
                        drop_incomplete_checkpoints(checkpoint_dir(cfg.output_dir))
                        raise TrainingStopped(
                            f"disk full while saving a checkpoint in {checkpoint_dir(cfg.output_dir)}: free space "
                            "or raise --save_steps; the last complete checkpoint is kept, resume with "
                            "--resume_from_checkpoint auto") from None
                    raise
                if not cfg.auto_batch_size or cfg.batch_size == 1:
                    raise TrainingStopped(
                        f"out of {'GPU' if device == 'cuda' else 'CPU'} memory at --batch_size {cfg.batch_size}: "
                        "lower --batch_size and raise --gradient_accumulation_steps (the same effective batch), or "
                        "pass --auto_batch_size; a 4-bit base (--load_in_4bit), --gradient_checkpointing and a "
                        "shorter --max_length or --tokens_per_batch also save memory") from None
                cfg = self.cfg = dataclasses.replace(
                    cfg, batch_size=cfg.batch_size // 2,
                    gradient_accumulation_steps=cfg.gradient_accumulation_steps * 2,
                    tokens_per_batch=token_budget(cfg) // 2)
                self.log(f"out of memory: retrying with --batch_size {cfg.batch_size} "
                         f"--gradient_accumulation_steps {cfg.gradient_accumulation_steps}")
                if device == "cuda":
                    torch.cuda.empty_cache()
        if shard:  # every process takes part: each forward gathers the shards of one layer at a time
            scored = trainer.model
            final_val = self.validation_loss("final validation", scored)
            if score_base:
                with self.method.disabled(self.model):
                    base_val = self.validation_loss("base validation", scored)
            state = trainer.accelerator.get_state_dict(trainer.model)  # on the first process, on its CPU
            self.gathered = {k: v for k, v in state.items() if k in trainable_names}
        else:
            # Drop the autocast wrapper accelerate put around forward, so the model behaves as it will after loading.
            self.model = trainer.accelerator.unwrap_model(trainer.model, keep_fp32_wrapper=False)
            # a learning-rate candidate is scored by the search itself (its validation score holds the loss)
            final_val = self.validation_loss("final validation") if score_base else None
            if self.val_records and score_base:  # what the saved weights score on the selection's measure
                kept = self.selection and next((h for h in self.selection["history"]
                                                if h["step"] == self.selection["chosen_step"]), None)
                self.validation_score = kept or validation_score(self.model, self.tokenizer, self.val_records, cfg)
                self.log(f"validation {self.validation_score['metric']}: {self.validation_score['score']:.4f}")
        base_val = base_val or {"loss": None, "perplexity": None}  # a learning-rate candidate skips the base
        if final_val:
            self.log(f"validation loss after training: {final_val['loss']:.4f}"
                     + (f" (base {base_val['loss']:.4f})" if base_val["loss"] is not None else ""))
            trainer.log({"eval_answer_loss": final_val["loss"]})
        final_val = final_val or {"loss": None, "perplexity": None}
        close_loggers(trainer)

        history = trainer.state.log_history
        real_tokens, padded_tokens = sum_over_processes([collator.real_tokens, collator.padded_tokens])
        steady = timer.steady()
        return {
            "method": self.method_name, "model_name": cfg.model_name,
            "steps": trainer.state.global_step, "epochs": round(trainer.state.epoch or 0, 3),
            "train_loss": round(result.training_loss, 5), "resumed_from": str(resume) if resume else None,
            "loss_curve": [{"step": h["step"], "loss": h["loss"], "learning_rate": h.get("learning_rate"),
                            "grad_norm": h.get("grad_norm")}
                           for h in history if "loss" in h],
            "eval_curve": [{"step": h["step"], "loss": h["eval_loss"]} for h in history if "eval_loss" in h],
            "validation_loss_base": base_val["loss"], "validation_loss_final": final_val["loss"],
            "validation_perplexity_base": base_val["perplexity"],
            "validation_perplexity_final": final_val["perplexity"],
            "validation_examples": len(self.val_examples), "train_examples": len(self.train_examples),
            "selection": self.selection, "balance": self.balance, "validation_score": self.validation_score,
            "train_runtime_s": round(runtime, 2),
            "tokens_per_s": round(real_tokens / runtime, 1), "padded_tokens_per_s": round(padded_tokens / runtime, 1),
            "train_tokens": int(real_tokens), "speed_settings": speed, **steady,
            "processes": process_count(), "sharded": shard,
            # what this process holds: the whole model, or under FSDP its shard of every layer
            "parameters_per_process": sum(p.numel() for p in trainer.model.parameters()),
            **peak, "device": device,
            "compute_dtype": short(model_compute_dtype(self.model)),
            "trainable_parameters": trainable, "total_parameters": total,
            "trainable_percent": round(100 * trainable / total, 4),
            "versions": library_versions(),
        }

    def _checkpoint_identity(self) -> dict:
        """What a checkpoint must share with this run to be resumed by it."""
        skip = {"output_dir", "resume_from_checkpoint", "keep_checkpoints", "save_steps", "report_to",
                "push_to_hub", "logging_steps", "auto_batch_size", "compile", *NOT_FINGERPRINTED}
        settings = {k: v for k, v in as_dict(self.cfg, self.opts).items() if k not in skip}
        settings["data_created"] = self.metadata.get("created")  # a re-prepared dataset is other data
        return {"method": self.method_name, "settings": settings, "train_examples": len(self.train_examples)}

    def _train(self, base_val: dict | None, resume: Path | None):
        # every change to the model and the process is undone on the way out, also after an error: evaluation and
        # generation afterwards run the model as it was, and the next run in this process starts clean
        with contextlib.ExitStack() as undo:
            train_data, collator, batch_size, speed = self._batches(undo)
            self.log("speed: " + ", ".join(f"{k} {v}" for k, v in speed.items()))
            trainer, result, runtime, timer, peak = self._run_trainer(train_data, collator, batch_size, base_val,
                                                                      resume, undo, speed)
        return trainer, result, runtime, collator, speed, timer, peak

    def _run_trainer(self, train_data, collator, batch_size, base_val, resume, undo, speed: dict):
        from transformers import TrainingArguments
        from transformers.trainer_callback import ProgressCallback

        cfg, device = self.cfg, self.ctx.device
        use_bf16 = model_compute_dtype(self.model) == torch.bfloat16
        undo.enter_context(mixed_precision(use_bf16))
        checkpoints = checkpoint_dir(cfg.output_dir)
        if sharded() and cfg.save_steps:
            self.log("--fsdp: no checkpoints are written (a sharded run cannot be resumed)")
            cfg = dataclasses.replace(cfg, save_steps=0)
        if cfg.save_steps and is_main_process():
            checkpoints.mkdir(parents=True, exist_ok=True)
            write_json(checkpoints / CHECKPOINT_IDENTITY, self._checkpoint_identity())
        args = TrainingArguments(
            output_dir=str(checkpoints), num_train_epochs=cfg.num_epochs, max_steps=cfg.max_steps,
            per_device_train_batch_size=batch_size, per_device_eval_batch_size=cfg.batch_size,
            gradient_accumulation_steps=cfg.gradient_accumulation_steps, learning_rate=cfg.learning_rate,
            lr_scheduler_type=cfg.lr_scheduler_type, warmup_ratio=cfg.warmup_ratio, weight_decay=cfg.weight_decay,
            max_grad_norm=cfg.max_grad_norm, logging_steps=cfg.logging_steps,
            eval_strategy="steps" if cfg.eval_steps else "no",
            eval_steps=cfg.eval_steps or None, save_strategy="steps" if cfg.save_steps else "no",
            save_steps=cfg.save_steps or 500, save_total_limit=2, report_to=reporters(cfg.report_to),
            logging_dir=str(self.staging / "logs"), seed=cfg.seed,
            bf16=use_bf16, use_cpu=device == "cpu", optim=optimizer(cfg, device),
            remove_unused_columns=False, label_names=["labels"], dataloader_num_workers=0,
            group_by_length=cfg.group_by_length and batch_size > 1, disable_tqdm=False,
            gradient_checkpointing=False,  # set up by ctx.load_base, before the method is attached
            ddp_find_unused_parameters=False,  # every trainable parameter takes part in every step
            logging_nan_inf_filter=False,  # a non-finite loss stops the run (FiniteLoss): no per-step sync
            # pinned batches copied to the GPU asynchronously: a blocking copy makes the CPU wait for the previous
            # step to finish, and the GPU then idles while the CPU prepares the next one
            accelerator_config={"non_blocking": device == "cuda"},
        )
        with quantized_base_trainable(self.model):
            trainer = trainer_class()(model=self.model, args=args, train_dataset=train_data,
                                      eval_dataset=self.val_examples if cfg.eval_steps else None,
                                      data_collator=collator,
                                      callbacks=[(timer := StepTimer(collator, device)).callback,
                                                 mark_complete_callback()])
        trainer.param_groups = self.method.optimizer_groups(self.model, self.opts, cfg.learning_rate)
        trainer.remove_callback(ProgressCallback)
        callbacks = [finite_loss_callback(trainer), progress_callback(collator), gc_callback()]
        callbacks += [self.checkpoint_budget.callback()] if self.checkpoint_budget else []  # --checkpoint_share auto
        callbacks += [time_limit_callback(self.time_limit_s)] if self.time_limit_s else []  # a search's candidate
        for callback in callbacks:
            trainer.add_callback(callback)
        selector = None
        if (cfg.select == "best" or cfg.early_stopping) and self.val_records and not sharded():
            every = evaluation_interval(cfg, math.ceil(len(train_data) / (batch_size * cfg.gradient_accumulation_steps
                                                                          * process_count())))
            selector = selector_callback(lambda: score_unpatched(self.model, self.tokenizer, self.val_records, cfg),
                                         every, cfg, self.model, self.log, resume, (self.base_score or {}).get("loss"))
            trainer.add_callback(selector)
        elif cfg.select == "best" and sharded():
            self.log("--fsdp: the run keeps its last step (--select best needs the whole model on each process)")
        if base_val is not None:
            trainer.log({"eval_answer_loss": base_val["loss"]})  # step 0 of the validation curve: the base model
        if device == "cuda":
            torch.cuda.reset_peak_memory_stats()
        sampler = RssSampler() if device == "cpu" else None
        if sampler is not None:
            undo.callback(sampler.stop)  # a stopped sampler keeps its peak: stopping twice is harmless
        t0 = time.time()
        with scheduled_gc():
            result = trainer.train(resume_from_checkpoint=str(resume) if resume else None)
        self.selection = selector.finish(trainer.state.global_step) if selector else None
        return trainer, result, time.time() - t0, timer, peak_memory_gb(device, sampler, speed)  # before the undo

    def save(self, metrics: dict) -> Path:
        out, staging = Path(self.cfg.output_dir), self.staging
        self.method.save(self.model, staging, self.ctx,
                         **({"state_dict": self.gathered} if self.gathered is not None else {}))
        self.tokenizer.save_pretrained(staging)
        run_info = {
            "method": self.method_name, "settings": as_dict(self.cfg, self.opts),
            "resolved_model": self.ctx.resolved_model, "base_signature": base_signature(self.model),
            "data": {k: self.metadata.get(k) for k in ("input_data", "input_sha256", "schema", "counts", "rows")},
            "medpeft_version": library_versions()["medpeft"], "fingerprint": self.fingerprint}
        metrics["adapter_size_bytes"] = (staging / self.method.WEIGHTS_FILE).stat().st_size
        write_output_files(staging, run_info, metrics)
        publish_dir(staging, out, CONFIG_FILE)
        self.log(f"saved to {out}")
        return out

    def cleanup(self) -> None:
        shutil.rmtree(self.ctx.work_dir, ignore_errors=True)
        shutil.rmtree(self.staging, ignore_errors=True)


def load_examples(cfg, tokenizer) -> tuple[list, list, dict, list, dict | None]:
    """(training examples, validation examples, metadata, validation records, label balance) of a processed data
    directory."""
    train_records, balance = load_split(cfg.data_path, "train"), None
    if cfg.balance == "labels":
        train_records, balance = balance_labels(train_records)
    train_examples = answer_examples(tokenizer, train_records, cfg.max_length)
    val_records = sample(load_split(cfg.data_path, "validation"), cfg.max_eval_samples, cfg.seed)
    val_examples = answer_examples(tokenizer, val_records, cfg.max_length)
    if not train_examples:
        raise UsageError(f"--data_path: '{cfg.data_path}' has no training examples with answer tokens")
    if not val_examples:
        raise UsageError(f"--data_path: '{cfg.data_path}' has an empty validation split; "
                         "re-run prepare_dataset with a smaller --train_size")
    return train_examples, val_examples, read_metadata(cfg.data_path), val_records, balance


def build(method_name: str, cfg, opts, log=print, data=None) -> TrainingRun:
    """Data, base model and method, ready to fit. Call `.cleanup()` when done (train() does).
    `data` = (tokenizer, training examples, validation examples, metadata) replaces reading cfg.data_path
    (the GPU benchmark trains on synthetic token ids)."""
    from transformers import set_seed
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    if not is_main_process():  # the first process speaks for all; errors still stop every process
        def log(*args, **kwargs):
            return None
    method = methods.get(method_name)
    # the rules every command checks while parsing, again for callers of the library: before any model loads
    problems = cfg.validate() + opts.validate() + methods.training_rules(method)(cfg, opts)
    if problems:
        raise UsageError("; ".join(problems))
    out = Path(cfg.output_dir)
    check_output_dir(out)
    reporters(cfg.report_to)  # a missing logger or token is found before the training, not after it
    if cfg.push_to_hub:
        hub_token(cfg.push_to_hub)
    set_seed(cfg.seed)
    device = default_device()
    resolved = resolve_model(cfg.model_name)
    val_records, balance = None, None
    if data is None:
        tokenizer = load_tokenizer(resolved, cfg.trust_remote_code)
        train_examples, val_examples, metadata, val_records, balance = load_examples(cfg, tokenizer)
        if balance:
            log(f"--balance labels: training label counts {balance['before']} -> {balance['after']}")
    else:
        tokenizer, train_examples, val_examples, metadata = data
    log(f"{method_name}: {len(train_examples)} training examples, {len(val_examples)} validation examples, "
        f"base {cfg.model_name} on {device}{' (4-bit NF4)' if cfg.load_in_4bit else ''}")
    log(explain(cfg.dtype, device))
    out.parent.mkdir(parents=True, exist_ok=True)
    world = process_count()
    if world > 1 and cfg.gradient_accumulation_steps % world == 0:  # the same effective batch as on one GPU
        cfg = dataclasses.replace(cfg, gradient_accumulation_steps=cfg.gradient_accumulation_steps // world)
        log(f"{world} processes: --gradient_accumulation_steps {cfg.gradient_accumulation_steps} each")
    elif world > 1:
        log(f"{world} processes: the effective batch is {world} x --batch_size x --gradient_accumulation_steps")
    if is_main_process():
        for stale in [*out.parent.glob(f".{out.name}.work-*"), *out.parent.glob(f".{out.name}.tmp-*")]:
            log(f"removing {stale}, left by an earlier run that did not finish")  # killed: never renamed
            shutil.rmtree(stale, ignore_errors=True)
    scratch = out.parent if is_main_process() else None  # other processes never write the output
    work = Path(tempfile.mkdtemp(prefix=f".{out.name}.work-", dir=scratch))
    staging = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=scratch))
    ctx = RunContext(cfg=cfg, resolved_model=resolved, device=device, work_dir=work,
                     gradient_checkpointing=cfg.gradient_checkpointing and method.CAPABILITIES.gradient_checkpointing)
    try:
        model = pin_4bit_layout(method.prepare(ctx, opts))
    except BaseException:
        shutil.rmtree(work, ignore_errors=True)
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return TrainingRun(method_name, cfg, opts, ctx, model, tokenizer, train_examples, val_examples, metadata,
                       staging, log, val_records=val_records, balance=balance)


def train(method_name: str, cfg, opts, log=print, fingerprint: str | None = None,
          discard_stale_checkpoints: bool = False) -> dict:
    """Train one method end to end; returns the metrics also written to metrics.json."""
    search = None
    if cfg.learning_rate == "auto":  # the search, then the run at its winner
        cfg, search = search_learning_rate(method_name, methods.get(method_name), cfg, opts, log, build)
    run = build(method_name, cfg, opts, log)
    run.fingerprint, run.discard_stale_checkpoints = fingerprint, discard_stale_checkpoints
    try:
        metrics = run.fit()
        if search:
            default = methods.get(method_name).DEFAULTS.get("learning_rate", 2e-4)
            if cfg.sweep_guard and search["winner"] != default and run.validation_score:
                run, metrics = guard_default(run, metrics, method_name, cfg, opts, default, search, log, build)
            metrics["learning_rate_search"] = search | {
                "cost_ratio": round((search["seconds"] + search.get("guard", {}).get("seconds", 0))
                                    / max(metrics["train_runtime_s"], 1e-9), 2)}
        if not is_main_process():
            return metrics
        try:
            out = run.save(metrics)
        except Exception as exc:  # noqa: BLE001 - only a full disk is turned into a message
            if not disk_full(exc, Path(cfg.output_dir).parent):
                raise
            kept = complete_checkpoints(checkpoint_dir(cfg.output_dir))
            again = (f"run again with --resume_from_checkpoint auto (checkpoint {kept[-1].name} is kept)" if kept
                     else "run again")
            raise TrainingStopped(f"disk full while writing {cfg.output_dir}: nothing was put in place (the "
                                  f"previous output, if any, is untouched); free space and {again}") from None
        if not cfg.keep_checkpoints:
            shutil.rmtree(checkpoint_dir(cfg.output_dir), ignore_errors=True)
        if cfg.push_to_hub:
            push_to_hub(out, cfg.push_to_hub, log)
        return metrics
    finally:
        run.cleanup()
        root = checkpoint_dir(cfg.output_dir)
        # nothing to resume from: no folder that says there is
        if is_main_process() and root.is_dir() and not complete_checkpoints(root):
            shutil.rmtree(root, ignore_errors=True)


