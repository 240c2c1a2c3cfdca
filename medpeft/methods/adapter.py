"""Adapter Tuning: bottleneck adapters (AdapterHub `adapters`) in every decoder layer, base frozen.

    pfeiffer  one adapter after each feed-forward block            (SeqBnConfig)
    houlsby   one after attention and one after feed-forward       (DoubleSeqBnConfig)
    parallel  one beside each feed-forward block, output scaled x4 (ParBnConfig)

`--adapter_size` is the bottleneck width (reduction factor = hidden size / adapter_size). Adapters start as
the identity: the up-projection is zero ("mam_adapter" initialisation; the library's Pfeiffer default is not).
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from pathlib import Path


from ..config import opt
from ..errors import UsageError
from .base import Capabilities, no_packing, no_rules, one_group

NAME = "adapter"
HELP = "Adapter Tuning: bottleneck adapters in every decoder layer of a frozen base"
DEFAULTS = {"learning_rate": 1e-4, "output_dir": "models/adapter"}
# compiled layers measured faster on the GPU (docs/performance.md); AdapterHub layers are not wrapped for FSDP here
CAPABILITIES = Capabilities(gradient_checkpointing=True, compile="always", fsdp=False, liger=True, liger_fused_ce=True)
WEIGHTS_FILE = "adapter.safetensors"  # what save() writes the trained weights to
ADAPTER = "medical"
TYPES = ("pfeiffer", "houlsby", "parallel")


@dataclass
class Options:
    adapter_size: int = opt(64, "bottleneck width of each adapter")
    adapter_type: str = opt("pfeiffer", "where adapters sit", list(TYPES))
    non_linearity: str = opt("relu", "activation inside the bottleneck", ["relu", "gelu", "swish", "silu", "tanh"])

    def validate(self) -> list[str]:
        if self.adapter_size <= 0:
            return [f"--adapter_size must be positive, got {self.adapter_size}"]
        return []


def _adapter_config(opts: Options, hidden_size: int):
    from adapters import DoubleSeqBnConfig, ParBnConfig, SeqBnConfig

    if opts.adapter_size > hidden_size:
        raise UsageError(f"--adapter_size {opts.adapter_size} is larger than the model's hidden size {hidden_size}")
    cls = {"pfeiffer": SeqBnConfig, "houlsby": DoubleSeqBnConfig, "parallel": ParBnConfig}[opts.adapter_type]
    return cls(reduction_factor=hidden_size / opts.adapter_size, non_linearity=opts.non_linearity,
               init_weights="mam_adapter")


def _cache_under_old_name(forward):
    import functools

    @functools.wraps(forward)
    def wrapped(self, *args, **kwargs):
        if kwargs.get("past_key_value") is None and "past_key_values" in kwargs:
            kwargs["past_key_value"] = kwargs.pop("past_key_values")
        return forward(self, *args, **kwargs)

    return wrapped


def _fix_kv_cache(model) -> None:
    """AdapterHub 1.3's attention layers take the cache as `past_key_value`; transformers 4.57 passes it as
    `past_key_values`, so it would land in **kwargs, never be updated, and every decoding step after the first
    would attend only to itself (greedy answers turn to garbage). Hand the cache over under the old name."""
    import inspect
    import types

    for module in model.modules():
        params = inspect.signature(type(module).forward).parameters
        if "past_key_value" not in params or "past_key_values" in params or hasattr(module, "_medpeft_cache_fix"):
            continue
        module.forward = types.MethodType(_cache_under_old_name(type(module).forward), module)
        module._medpeft_cache_fix = True


def _place(model) -> None:
    """AdapterHub creates adapter weights on the CPU in fp32: move them beside the base, keep them fp32."""
    device = model.get_input_embeddings().weight.device
    for name, param in model.named_parameters():
        if "adapters." in name and param.device != device:
            param.data = param.data.to(device)


def prepare(ctx, opts: Options):
    import adapters

    model = ctx.load_base()
    adapters.init(model)
    model.add_adapter(ADAPTER, config=_adapter_config(opts, model.config.hidden_size))
    model.train_adapter(ADAPTER)
    _place(model)
    _fix_kv_cache(model)
    return model


@contextlib.contextmanager
def disabled(model):
    active = model.active_adapters
    model.set_active_adapters(None)
    try:
        yield model
    finally:
        model.set_active_adapters(active)


check = no_rules
pack = no_packing


def save(model, out_dir: Path, ctx, state_dict: dict | None = None) -> None:
    # with_head=False: AdapterHub would otherwise also save the frozen LM head (113 MB for SmolLM2-135M)
    model.save_adapter(str(out_dir), ADAPTER, with_head=False, use_safetensors=True)


def load(base_model, out_dir: Path, opts: Options):
    import adapters

    adapters.init(base_model)
    name = base_model.load_adapter(str(out_dir), load_as=ADAPTER, with_head=False, set_active=True,
                                   use_safetensors=True)
    base_model.set_active_adapters(name)
    _place(base_model)
    _fix_kv_cache(base_model)
    return base_model


def trainable_formula(model, opts: Options) -> int:
    """Per adapter: down (hidden x size + size) and up (size x hidden + hidden); 1 or 2 adapters per layer."""
    hidden, size = model.config.hidden_size, opts.adapter_size
    per_layer = 2 if opts.adapter_type == "houlsby" else 1
    return model.config.num_hidden_layers * per_layer * (2 * hidden * size + size + hidden)


optimizer_groups = one_group
