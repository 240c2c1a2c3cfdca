"""A bitsandbytes 4-bit weight straight to e4m3, in one pass: what `--fp8 on` multiplies with a 4-bit (QLoRA) base.

    rows(packed, state)    -> (e4m3 [out, in], float32 scale per output row [out, 1])    forward's operand
    columns(packed, state) -> (e4m3 [in, out] contiguous, float32 scale per input column [1, in])   backward's

The alternative, bitsandbytes' dequantize_4bit then a rounding of the result, moves 7.5 bytes an element (half a byte
read, two written as bf16, read twice for the row maxima and the cast, one written); this moves 1.5. No data pass
for the scales either: a 4-bit weight is code x block scale (absmax), so a row's largest value is at most its blocks'
largest absmax times the code's largest magnitude, known from the small absmax tensor alone. That bound is exact
when a block holds the code's extreme (NF4's +-1: where bitsandbytes puts each block's largest element), and at worst
costs a little range, never an overflow. Columns (backward multiplies grad @ W, whose e4m3 operand the FP8 kernels
want contiguous along `out`) take the bound of the blocks they cross. The kernel writes that transpose itself.

On the GPU the pass is a Triton kernel; elsewhere (the CPU tests, a GPU without Triton) the same arithmetic in torch.
Weights whose rows are not whole blocks (`in` not a multiple of the block size) have no per-row absmax: fused()
says no and the caller dequantizes as bitsandbytes does.
"""

from __future__ import annotations

import functools

import torch

E4M3 = torch.float8_e4m3fn
TOP = 448.0  # e4m3's largest value


def fused(state) -> bool:
    """Whether this quantization state's weight can take the one-pass route (each row whole blocks)."""
    return len(state.shape) == 2 and state.shape[1] % state.blocksize == 0 and state.shape[1] % 2 == 0


def _absmax(state) -> torch.Tensor:
    """The float32 scale of each block, the doubly quantized (nested) kind dequantized as bitsandbytes does."""
    if not state.nested:
        return state.absmax.float()
    import bitsandbytes.functional as bnbf

    return (bnbf.dequantize_blockwise(state.absmax, state.state2) + state.offset).float()


def _scales(state, transpose: bool):
    """(scale per output row [out] or per input column [in], float32): the bound above over 448."""
    out_f, in_f = state.shape
    blocks = _absmax(state).view(out_f, in_f // state.blocksize)
    top = state.code.float().abs().max()  # NF4's code: 16 values in [-1, 1]
    bound = blocks.amax(0)[:, None].expand(-1, state.blocksize).reshape(-1) if transpose else blocks.amax(1)
    # 448.0 written out, not TOP: dynamo fails on a module-level float shared by two traced autograd.Functions
    # ("lift_tracked_freevar_to_input ... root SubgraphTracer", seen on an H100; the note in fp8.quantize_rows)
    return (bound * top).clamp(min=1e-12) / 448.0


def rows(packed, state):
    scale = _scales(state, transpose=False)
    q = convert(packed.view(torch.uint8).reshape(-1), _absmax(state), state.code.float(), 1.0 / scale,
                *state.shape, state.blocksize, False)
    return q, scale[:, None]


def columns(packed, state):
    scale = _scales(state, transpose=True)
    q = convert(packed.view(torch.uint8).reshape(-1), _absmax(state), state.code.float(), 1.0 / scale,
                *state.shape, state.blocksize, True)
    return q, scale[None, :]


def reference(packed, absmax, code, inv_scale, n_out: int, n_in: int, blocksize: int, transpose: bool, dtype=E4M3):
    """The kernel's arithmetic in torch, element by element in the same order (float32): code[nibble] x absmax of its
    block x the inverse scale of its row (or column), clamped to e4m3's range, cast. High nibble first, as
    bitsandbytes packs."""
    nibbles = torch.stack([packed >> 4, packed & 0xF], dim=-1).reshape(n_out, n_in).long()
    w = code[nibbles] * absmax.view(n_out, n_in // blocksize).repeat_interleave(blocksize, dim=1)
    w = (w * (inv_scale[None, :] if transpose else inv_scale[:, None])).clamp(-TOP, TOP).to(dtype)
    return w.t().contiguous() if transpose else w


@torch.library.custom_op("medpeft::nf4_to_e4m3", mutates_args=())
def convert(packed: torch.Tensor, absmax: torch.Tensor, code: torch.Tensor, inv_scale: torch.Tensor, n_out: int,
            n_in: int, blocksize: int, transpose: bool) -> torch.Tensor:
    """An opaque op to the compiler (it cannot see into a bitsandbytes layout): the Triton kernel on a GPU."""
    kernel = _kernel() if packed.is_cuda else None
    if kernel is None:
        return reference(packed, absmax, code, inv_scale, n_out, n_in, blocksize, transpose)
    out = torch.empty((n_in, n_out) if transpose else (n_out, n_in), dtype=E4M3, device=packed.device)
    launch(kernel, packed, absmax, code, inv_scale, out, n_out, n_in, blocksize, transpose)
    return out


@convert.register_fake
def _(packed, absmax, code, inv_scale, n_out, n_in, blocksize, transpose):
    return packed.new_empty((n_in, n_out) if transpose else (n_out, n_in), dtype=E4M3)


SPLIT = 1024  # rows layout: a program's run of packed bytes (2,048 elements)
TILE = 64  # columns layout: a program's tile of the weight, TILE x TILE elements


def launch(kernel, packed, absmax, code, inv_scale, out, n_out, n_in, blocksize, transpose):
    """Run the kernel into `out` (e4m3 on the GPU; float32 in the tests, under Triton's CPU interpreter, whose own
    e4m3 cast rounds differently from the GPU's)."""
    rows_kernel, columns_kernel = kernel
    if transpose:
        grid = ((n_out + TILE - 1) // TILE, (n_in + TILE - 1) // TILE)
        columns_kernel[grid](packed, absmax, code, inv_scale, out, n_out, n_in, BLOCKSIZE=blocksize, T=TILE)
    else:
        grid = ((n_out * n_in // 2 + SPLIT - 1) // SPLIT,)
        rows_kernel[grid](packed, absmax, code, inv_scale, out, n_out * n_in // 2, n_in // 2, BLOCKSIZE=blocksize,
                          SPLIT=SPLIT)


@functools.cache
def _kernel():
    """The Triton kernels (rows, columns), built on first use (None without Triton): Triton is imported only where it
    runs."""
    try:
        from . import fp8_nf4_kernels
    except ImportError:
        return None
    return fp8_nf4_kernels.rows_kernel, fp8_nf4_kernels.columns_kernel
