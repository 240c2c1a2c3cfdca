"""GPU speed levers of the training path, each with a clean fallback on the CPU.

    apply_liger(model)                -> True when Liger kernels now run the model (fused linear cross-entropy:
                                         the logits of a whole micro-batch are never materialised)
    limit_checkpointing(model, share) -> recompute activations in the first `share` of decoder layers only
    compile_layers(model)             -> each decoder layer runs through torch.compile (fewer, fused kernels and
                                         no Python between them); uncompile_layers(model) undoes it
"""

from __future__ import annotations

import importlib.util

import torch

from ..distributed import sharded


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
    layers = [m for m in decoder_layers(model) if getattr(m, "gradient_checkpointing", False)]
    keep = round(share * len(layers))
    for layer in layers[keep:]:
        layer.gradient_checkpointing = False

    def undo():
        for layer in layers[keep:]:
            layer.gradient_checkpointing = True

    return keep, undo


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
