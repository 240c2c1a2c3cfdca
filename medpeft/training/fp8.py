"""--fp8 on: the frozen base's linear layers multiply in FP8 (e4m3) while training; adapters, LoRA weights, prompt
encoders, norms, attention and the loss stay in the working precision.

    to_fp8(model) -> (layers converted, what undoes it)

Each frozen linear weight of the decoder layers is stored as e4m3 with one scale per output row (half the memory of
bf16); its input is scaled per row (token) on the fly, and the product runs on the FP8 tensor cores (Ada, Hopper:
twice the bf16 rate) with float32 accumulation. Backward needs only the input's gradient (the weight is frozen): a
bf16 matmul with the dequantized weight, so the gradients' precision is not lowered, and no activation is kept for
the frozen weight. An approximation, unlike the other levers: each product is rounded to 3 bits of mantissa before
accumulating, so it is opt-in and the loss curve is checked against bf16 (benchmarks/gpu_throughput.py
--check_set fp8=on). Undo puts the exact weights back (kept in host memory meanwhile), so evaluation and saving
after training see the base as it was loaded.

A 4-bit (NF4) base keeps its 4-bit weights: each call dequantizes them as bitsandbytes does, then rounds the result to
e4m3 rows for the product (the GPU dequantizes a 4-bit weight before every bf16 matmul anyway; the FP8 copy is one
layer's, for the moment of its product), and backward multiplies with the dequantized weight as bitsandbytes does.
"""

from __future__ import annotations

import torch
from torch import nn

from ..errors import UsageError
from .speedups import decoder_layers

E4M3 = torch.float8_e4m3fn
ALIGN = 16  # the FP8 matmul kernels want both dimensions of the weight in multiples of 16


def quantize_rows(t: torch.Tensor):
    """(e4m3 tensor, float32 scale of each row, shape [rows, 1]) with t ~= q * scale; the largest element of each
    row lands on e4m3's largest value."""
    # e4m3's largest value, torch.finfo(E4M3).max; not a module-level constant: dynamo fails on a module-level float
    # that two autograd.Functions' traced forwards share ("lift_tracked_freevar_to_input ... root SubgraphTracer")
    top = 448.0
    amax = t.detach().abs().amax(dim=-1, keepdim=True).float().clamp(min=1e-12)
    scale = amax / top
    return (t.float() / scale).clamp(-top, top).to(E4M3), scale


def _scaled_product(x, weight, scale):
    """x [..., in] times the e4m3 weight [out, in] with its row scales [out, 1]: a bf16 product cast to x's dtype."""
    rows = x.reshape(-1, x.shape[-1])
    q, x_scale = quantize_rows(rows)
    y = torch._scaled_mm(q, weight.t(), scale_a=x_scale, scale_b=scale.t(), out_dtype=torch.bfloat16,
                         use_fast_accum=True)
    return y.to(x.dtype).reshape(*x.shape[:-1], weight.shape[0])


class _Fp8Matmul(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, scale):  # x [..., in], weight [out, in] e4m3, scale [out, 1] float32
        ctx.save_for_backward(weight, scale)
        return _scaled_product(x, weight, scale)

    @staticmethod
    def backward(ctx, grad):
        weight, scale = ctx.saved_tensors
        dense = (weight.to(torch.float32) * scale).to(grad.dtype)
        return grad @ dense, None, None


class _Nf4Fp8Matmul(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, packed, quant_state):  # packed: bitsandbytes' 4-bit weight, quant_state its shape and scales
        import bitsandbytes.functional as bnbf

        weight, scale = quantize_rows(bnbf.dequantize_4bit(packed, quant_state))
        ctx.quant_state = quant_state
        ctx.save_for_backward(packed)  # the 4-bit weight only: the FP8 copy lives for this product
        return _scaled_product(x, weight, scale)

    @staticmethod
    def backward(ctx, grad):
        import bitsandbytes.functional as bnbf

        (packed,) = ctx.saved_tensors
        return grad @ bnbf.dequantize_4bit(packed, ctx.quant_state).to(grad.dtype), None, None


class Fp8Linear(nn.Linear):
    """A frozen nn.Linear whose weight is e4m3 (`weight`, same shape) with a scale per output row (`fp8_scale`)."""

    def forward(self, x):
        y = _Fp8Matmul.apply(x, self.weight, self.fp8_scale)
        return y if self.bias is None else y + self.bias.to(y.dtype)


def _linear4bit():
    try:
        from bitsandbytes.nn import Linear4bit
    except ImportError:  # no bitsandbytes, no 4-bit layers
        return None
    return Linear4bit


class Fp8Linear4bit(nn.Module):  # the bases are set at conversion: bitsandbytes is imported only where it is used
    """A frozen bitsandbytes Linear4bit whose product runs in FP8 from its dequantized weight (its 4-bit weight kept)."""

    def forward(self, x):
        state = self.weight.quant_state
        y = _Nf4Fp8Matmul.apply(x.to(state.dtype), self.weight, state).to(x.dtype)
        return y if self.bias is None else y + self.bias.to(y.dtype)


def _adapters_linear(module) -> bool:
    """AdapterHub wraps the attention's linear layers in its LoRA class even where no LoRA is added (bottleneck
    adapters); without one in it, its forward is nn.Linear's (through super()) and nothing else."""
    try:
        from adapters.methods.lora import LoRALinearTorch
    except ImportError:
        return False
    return isinstance(module, LoRALinearTorch) and not module.loras and not module.fan_in_fan_out


def eligible(module) -> bool:
    w = getattr(module, "weight", None)
    return ((type(module) is nn.Linear or _adapters_linear(module)) and not w.requires_grad
            and w.dtype in (torch.bfloat16, torch.float16, torch.float32)
            and w.shape[0] % ALIGN == 0 and w.shape[1] % ALIGN == 0)


def eligible_4bit(module) -> bool:
    """A frozen bitsandbytes Linear4bit (NF4 or FP4; not a subclass, whose forward may differ) with its quantization
    state in place and dimensions FP8's kernels take."""
    four = _linear4bit()
    state = getattr(getattr(module, "weight", None), "quant_state", None)
    return (four is not None and type(module) is four and state is not None and not module.weight.requires_grad
            and state.shape[0] % ALIGN == 0 and state.shape[1] % ALIGN == 0)


_CLASSES = {nn.Linear: Fp8Linear}


def fp8_class(cls):
    """cls with Fp8Linear where it has nn.Linear among its bases (its forward's super().forward() reaches ours), or
    bitsandbytes' Linear4bit under Fp8Linear4bit (whose forward replaces its own)."""
    if cls not in _CLASSES:
        if cls is _linear4bit():
            _CLASSES[cls] = type("Fp8Linear4bit", (Fp8Linear4bit, cls), {})
        else:
            bases = tuple(Fp8Linear if b is nn.Linear else b for b in cls.__bases__)
            _CLASSES[cls] = type(f"Fp8{cls.__name__}", bases, {})
    return _CLASSES[cls]


def to_fp8(model, layers=None):
    """Every frozen nn.Linear or 4-bit Linear4bit inside the decoder layers (q/k/v/o, gate/up/down; LoRA's base
    layers) multiplies in FP8; trainable linear layers (LoRA's A and B, adapters' projections) and those of other
    kinds are left alone. `layers`: where to look (default: the decoder layers). Returns (how many were converted,
    what undoes it)."""
    converted = []
    for layer in (layers or decoder_layers)(model):
        for module in layer.modules():
            if eligible_4bit(module):  # nothing stored: its product dequantizes, then rounds to e4m3 (above)
                exact = None
            elif eligible(module):
                exact = module.weight.data
                module.weight.data, scale = quantize_rows(exact)
                module.register_buffer("fp8_scale", scale, persistent=False)
                exact = exact.to("cpu")
            else:
                continue
            converted.append((module, type(module), exact))
            module.__class__ = fp8_class(type(module))

    def undo():  # holds both copies for a moment: a training run reads its peak memory before this
        for module, cls, exact in converted:
            module.__class__ = cls
            if exact is not None:
                module.weight.data = exact.to(module.weight.device)
                del module.fp8_scale
        converted.clear()

    return len(converted), undo


def refusal(device: str) -> str | None:
    """Why --fp8 on cannot run on this device (None: it can; the settings' own conflicts are TrainConfig.validate's).
    A CPU has no FP8 matmul units: torch emulates them there, 4x slower than bf16 (AMD EPYC, 2026-12-06), so a CPU
    is refused too; the tests lift that refusal to train through the same code."""
    if device != "cuda":
        return ("FP8 needs a CUDA GPU with FP8 tensor cores (compute capability 8.9+: Ada, Hopper and later); on a "
                "CPU it is emulated and slower than bf16: leave --fp8 off")
    major, minor = torch.cuda.get_device_capability()
    if (major, minor) < (8, 9):
        return (f"this GPU (compute capability {major}.{minor}) has no FP8 tensor cores (8.9+: Ada, Hopper and "
                f"later); leave --fp8 off")
    return None


def plan(model, cfg, device: str, speed: dict, undo, log=print) -> None:
    """--fp8 in a training run: with `on`, refused here (UsageError) or the layers converted, their count into
    `speed`, the undo onto `undo` (an ExitStack)."""
    if cfg.fp8 != "on":
        return
    why = refusal(device)
    if why:
        raise UsageError(f"--fp8 on: {why}")
    speed["fp8_layers"], unconvert = to_fp8(model)
    undo.callback(unconvert)
    if not speed["fp8_layers"]:
        log("--fp8 on: no frozen linear layer in the decoder layers; training in the working precision")
