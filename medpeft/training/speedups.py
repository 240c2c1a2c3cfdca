"""GPU speed levers of the training path, each with a clean fallback on the CPU.

    apply_liger(model)                -> True when Liger kernels now run the model (fused linear cross-entropy:
                                         the logits of a whole micro-batch are never materialised)
    limit_checkpointing(model, share) -> recompute activations in the first `share` of decoder layers only
    CheckpointBudget                  -> --checkpoint_share auto: as many layers store their activations as fit
                                         under --max_memory_gb, measured on the first steps
    offload_checkpoints(model)        -> the inputs checkpointed layers keep for recomputation wait in pinned host
                                         memory between forward and backward
    plan_checkpointing(...)           -> the three above as the settings ask
    compile_layers(model)             -> each decoder layer runs through torch.compile (fewer, fused kernels and
                                         no Python between them); uncompile_layers(model) undoes it
"""

from __future__ import annotations

import importlib.util

import torch

from ..distributed import process_count, sharded
from .graphs import graph_layers


def _transformers_model(model):
    """The transformers model inside a peft wrapper (AdapterHub models are transformers models already)."""
    inner = model.get_base_model() if hasattr(model, "get_base_model") else model
    return inner


def liger_available() -> bool:
    return importlib.util.find_spec("liger_kernel") is not None


def apply_liger(model, log=print, fused_cross_entropy: bool = True, layers: bool = True) -> bool:
    """`layers` False: the fused linear cross-entropy only (compiled decoder layers fuse their norms and
    activations themselves)."""
    inner = _transformers_model(model)
    # under FSDP the base reaches the GPUs only when training shards it
    on_gpu = next(inner.parameters()).device.type == "cuda" or sharded()
    if not liger_available() or not torch.cuda.is_available() or not on_gpu:
        return False
    from liger_kernel.transformers.monkey_patch import MODEL_TYPE_TO_APPLY_LIGER_FN, _apply_liger_kernel_to_instance

    model_type = getattr(inner.config, "model_type", None)
    if model_type not in MODEL_TYPE_TO_APPLY_LIGER_FN:
        log(f"liger: no kernels for model type '{model_type}'; running without them")
        return False
    # Note: besides this instance, Liger also patches transformers' module-level classes and RoPE function,
    # so models of this type built later in the process use its RMSNorm, SwiGLU and RoPE too.
    _apply_liger_kernel_to_instance(model=inner, rope=layers, rms_norm=layers, swiglu=layers,
                                    fused_linear_cross_entropy=fused_cross_entropy, cross_entropy=False)
    return True


def decoder_layers(model):
    from transformers.modeling_layers import GradientCheckpointingLayer

    return [m for m in _transformers_model(model).modules() if isinstance(m, GradientCheckpointingLayer)]


def limit_checkpointing(model, share: float):
    """Keep recomputation in the first round(share x n) decoder layers; the rest store their activations.
    Returns (how many layers still recompute, what undoes it)."""
    every = len([m for m in decoder_layers(model) if getattr(m, "gradient_checkpointing", False)])
    # all of them on undo: --checkpoint_share auto changes the split while training
    return set_checkpointed(model, round(share * every)), lambda: set_checkpointed(model, every)


def set_checkpointed(model, keep: int) -> int:
    """Recompute activations in the first `keep` decoder layers, store them in the rest."""
    layers = decoder_layers(model)
    for i, layer in enumerate(layers):
        layer.gradient_checkpointing = i < keep
    return min(keep, len(layers))


class CheckpointBudget:
    """--checkpoint_share auto: the first optimizer step recomputes every layer (its peak: the weights, the optimizer
    state, the checkpointed inputs, one layer's activations); the second stores the activations of `probe` layers
    (its peak minus the first, over `probe`: what one layer's activations cost at this micro-batch size); from the
    third step on, as many layers store theirs as fit under the budget, less a margin for fragmentation and for
    micro-batches longer than the two measured. `memory()` returns the peak bytes since `reset()` (CUDA's by
    default; the tests pass their own)."""

    MARGIN = 0.06  # of the budget

    def __init__(self, model, budget_gb: float, log=print, probe: int = 2, memory=None, reset=None, record=None):
        self.model, self.budget, self.log, self.record = model, budget_gb * 2**30, log, record
        self.layers = len(decoder_layers(model))
        self.probe = min(probe, self.layers)
        self.memory = memory or torch.cuda.max_memory_allocated
        self.reset = reset or torch.cuda.reset_peak_memory_stats
        self.first = self.choice = None
        self.steps = 0  # of this run (a resumed one starts past the Trainer's step 2)

    def after_step(self):
        self.steps += 1
        step = self.steps
        if step == 1:
            self.first = self.memory()
            self.reset()
            set_checkpointed(self.model, self.layers - self.probe)
        elif step == 2 and self.first is not None:
            per_layer = max((self.memory() - self.first) / max(self.probe, 1), 1.0)
            room = self.budget * (1 - self.MARGIN) - self.first
            stored = max(0, min(self.layers, int(room // per_layer)))
            keep = set_checkpointed(self.model, self.layers - stored)
            self.choice = {"checkpointed_layers": keep, "layers": self.layers, "budget_gb": round(self.budget / 2**30, 2),
                           "peak_gb_all_checkpointed": round(self.first / 2**30, 2),
                           "gb_per_stored_layer": round(per_layer / 2**30, 3)}
            self.log(f"--checkpoint_share auto: {keep} of {self.layers} layers recompute their activations, "
                     f"{self.layers - keep} store them ({self.choice['gb_per_stored_layer']} GB each; "
                     f"{self.choice['peak_gb_all_checkpointed']} GB with all recomputed, budget "
                     f"{self.choice['budget_gb']} GB less {self.MARGIN:.0%})")
            if self.record is not None:
                self.record(self.choice)

    def callback(self):
        from transformers import TrainerCallback

        budget = self

        class Budget(TrainerCallback):
            def on_step_end(self, args, state, control, **kwargs):
                budget.after_step()

        return Budget()


class _Saved:
    __slots__ = ("host", "device", "copied", "gpu", "fetched", "before")


class HostOffload:
    """Saved-tensor hooks that move what a reentrant checkpoint saves (its layer's input) to host memory: copied
    out on a side stream while the forward goes on (pinned memory, so the copy does not hold the GPU's queue),
    copied back in backward, one layer ahead of the layer that needs it. On the CPU the "host" copy is a clone:
    the same bookkeeping, which is what the tests check."""

    MIN_BYTES = 1 << 16  # position ids and the like stay where they are

    def __init__(self):
        self.stream = torch.cuda.Stream() if torch.cuda.is_available() else None
        self.last = None
        self.saved = 0

    def pack(self, t):
        if not isinstance(t, torch.Tensor) or t.numel() * t.element_size() < self.MIN_BYTES:
            return t
        rec = _Saved()
        rec.device, rec.gpu, rec.fetched, rec.before = t.device, None, None, self.last
        if t.is_cuda:
            rec.host = torch.empty(t.shape, dtype=t.dtype, pin_memory=True)
            self.stream.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(self.stream):
                rec.host.copy_(t, non_blocking=True)
                rec.copied = torch.cuda.Event()
                rec.copied.record()
            t.record_stream(self.stream)  # its memory is not reused before the copy has read it
        else:
            rec.host, rec.copied = t.detach().clone(), None
        self.last = rec
        self.saved += 1
        return rec

    def _fetch(self, rec):
        if rec.gpu is not None or rec.host is None:
            return
        if rec.device.type != "cuda":
            rec.gpu = rec.host
            return
        with torch.cuda.stream(self.stream):
            self.stream.wait_event(rec.copied)
            rec.gpu = rec.host.to(rec.device, non_blocking=True)
            rec.fetched = torch.cuda.Event()
            rec.fetched.record()

    def unpack(self, rec):
        if not isinstance(rec, _Saved):
            return rec
        self._fetch(rec)
        t = rec.gpu
        if rec.fetched is not None:
            torch.cuda.current_stream().wait_event(rec.fetched)
            t.record_stream(torch.cuda.current_stream())
        rec.gpu = rec.fetched = None  # a second unpack copies again; the graph owns the tensor now
        if rec.before is not None:  # backward runs the layers in reverse: the one before is next
            self._fetch(rec.before)
            rec.before = None
        if self.last is rec:
            self.last = None
        return t


def offload_checkpoints(model):
    """Checkpointed decoder layers keep their input (tokens x hidden: 32 MB at 4,096 tokens of Mistral-7B, 1 GB over
    its 32 layers) in host memory between forward and backward. Uses the reentrant checkpoint, which saves its
    inputs through saved-tensor hooks (the non-reentrant one keeps them in a closure, out of the hooks' reach). A
    layer whose inputs need no gradient (the first, after a frozen embedding) keeps the checkpoint it had: the
    reentrant one would leave its trainable weights without gradients. Returns (the hooks, what undoes it)."""
    from torch.utils.checkpoint import checkpoint

    store = HostOffload()
    layers = [m for m in decoder_layers(model) if hasattr(m, "_gradient_checkpointing_func")]
    originals = [layer._gradient_checkpointing_func for layer in layers]

    def wrap(original):
        def offloaded(fn, *args, **kwargs):
            if not torch.is_grad_enabled() or not any(isinstance(a, torch.Tensor) and a.requires_grad for a in args):
                return original(fn, *args, **kwargs)
            with torch.autograd.graph.saved_tensors_hooks(store.pack, store.unpack):
                return checkpoint(fn, *args, use_reentrant=True, **kwargs)
        return offloaded

    for layer, original in zip(layers, originals):
        layer._gradient_checkpointing_func = wrap(original)

    def undo():
        for layer, original in zip(layers, originals):
            layer._gradient_checkpointing_func = original

    return store, undo


def offload_wanted(cfg, device) -> bool:
    """--offload_checkpoints auto: on a single GPU, where its 50-step loss curves matched checkpoints kept in place
    (QLoRA, adapter; H200, 2026-12-02) and it took 0.7 GB less at no loss of speed; not on a CPU (host memory is
    where the activations already are) nor with several processes (not tried there)."""
    if cfg.offload_checkpoints != "auto":
        return cfg.offload_checkpoints == "on"
    return device == "cuda" and cfg.num_gpus == 1 and not cfg.fsdp and process_count() == 1


def plan_checkpointing(model, cfg, device, speed: dict, undo, log=print, graphs_refused: str | None = "off"):
    """--checkpoint_share, --cuda_graphs and --offload_checkpoints on a model whose layers checkpoint: what changes
    goes onto `undo`, what was chosen into `speed`. `graphs_refused`: why the layers are not CUDA graphs (None: they
    are). Returns the CheckpointBudget to call after each step (auto on CUDA), or None."""
    auto = cfg.checkpoint_share == "auto"
    speed["checkpointed_layers"], unlimit = limit_checkpointing(model, 1.0 if auto else cfg.checkpoint_share)
    undo.callback(unlimit)
    speed["cuda_graphs"] = f"off ({graphs_refused})" if graphs_refused else None
    offload = offload_wanted(cfg, device)
    if offload:  # under the graphs, for the calls they do not replay (a capture that failed, other shapes)
        undo.callback(offload_checkpoints(model)[1])
        speed["offloaded_checkpoints"] = True
    if not graphs_refused:  # a replayed layer keeps its input in the graphs' buffers, offloaded inside the graphs
        shared, ungraph = graph_layers(decoder_layers(model), device, log, offload=offload)
        undo.callback(ungraph)
        speed["cuda_graphs"] = shared.stats  # filled in while training
    if auto and device == "cuda":
        budget = cfg.max_memory_gb or torch.cuda.get_device_properties(0).total_memory / 2**30
        return CheckpointBudget(model, budget, log, record=speed.update)
    if auto:
        log("--checkpoint_share auto: the budget is GPU memory; on the CPU every layer recomputes")
    return None


COMPILE_BACKEND = "inductor"  # tests use "aot_eager": the same tracing and autograd, without code generation


def compile_layers(model, fallback: bool = False):
    """torch.compile every decoder layer (one compiled graph shared by all of them). Checkpointing stays outside
    the compiled region: the recomputation calls the compiled forward again. `fallback`: a layer that fails to
    compile runs eagerly, with a warning, instead of stopping the run (--compile auto, for architectures the
    compiler has not been tried on). Returns (the number of layers, what undoes it)."""
    layers = decoder_layers(model)
    if not layers:  # an architecture without transformers' checkpointing layers: nothing to compile
        return 0, lambda: None
    # every layer is another instance of the same code; a guard per instance must not exhaust the cache
    dynamo = torch._dynamo.config
    name = "recompile_limit" if hasattr(dynamo, "recompile_limit") else "cache_size_limit"
    setattr(dynamo, name, max(getattr(dynamo, name), 2 * len(layers) + 8))
    suppressed, dynamo.suppress_errors = dynamo.suppress_errors, fallback
    for layer in layers:
        layer.compile(backend=COMPILE_BACKEND, dynamic=True)  # packed rows vary in length: one graph for all

    def undo():
        for layer in layers:
            layer._compiled_call_impl = None
        torch._dynamo.reset()  # the compiled code and its guards keep references to this model
        dynamo.suppress_errors = suppressed

    return len(layers), undo
