"""The Triton kernels of fp8_nf4 (its docstring says what they compute), in their own module: Triton is imported
only where they run, and its CPU interpreter (the tests) resolves a kernel's helpers among its module's names."""

import triton
import triton.language as tl


@triton.jit
def lookup(n, code):
    """code[n] for 4-bit n, as a tree of selects between its 16 values (no per-element gather)."""
    b0, b1, b2, b3 = (n & 1) != 0, (n & 2) != 0, (n & 4) != 0, (n & 8) != 0
    a0 = tl.where(b0, tl.load(code + 1), tl.load(code + 0))
    a1 = tl.where(b0, tl.load(code + 3), tl.load(code + 2))
    a2 = tl.where(b0, tl.load(code + 5), tl.load(code + 4))
    a3 = tl.where(b0, tl.load(code + 7), tl.load(code + 6))
    a4 = tl.where(b0, tl.load(code + 9), tl.load(code + 8))
    a5 = tl.where(b0, tl.load(code + 11), tl.load(code + 10))
    a6 = tl.where(b0, tl.load(code + 13), tl.load(code + 12))
    a7 = tl.where(b0, tl.load(code + 15), tl.load(code + 14))
    d0, d1 = tl.where(b1, a1, a0), tl.where(b1, a3, a2)
    d2, d3 = tl.where(b1, a5, a4), tl.where(b1, a7, a6)
    return tl.where(b3, tl.where(b2, d3, d2), tl.where(b2, d1, d0))

@triton.jit
def rows_kernel(packed, absmax, code, inv_scale, out, n_bytes, row_bytes, BLOCKSIZE: tl.constexpr,
                SPLIT: tl.constexpr):
    i = tl.program_id(0) * SPLIT + tl.arange(0, SPLIT)  # packed bytes, in the weight's row-major order
    inside = i < n_bytes
    byte = tl.load(packed + i, mask=inside, other=0)
    scale = tl.load(absmax + i // (BLOCKSIZE // 2), mask=inside, other=0.0)
    inv = tl.load(inv_scale + i // row_bytes, mask=inside, other=0.0)
    high = tl.clamp(lookup((byte >> 4).to(tl.int32), code) * scale * inv, -448.0, 448.0)
    low = tl.clamp(lookup((byte & 0xF).to(tl.int32), code) * scale * inv, -448.0, 448.0)
    j = tl.program_id(0) * 2 * SPLIT + tl.arange(0, 2 * SPLIT)  # element 2i: byte i's high nibble; 2i+1: low
    tl.store(out + j, tl.interleave(high, low).to(out.dtype.element_ty), mask=j < 2 * n_bytes)

@triton.jit
def columns_kernel(packed, absmax, code, inv_scale, out, n_out, n_in, BLOCKSIZE: tl.constexpr, T: tl.constexpr):
    r = tl.program_id(0) * T + tl.arange(0, T)  # the weight's rows (outputs) of this tile
    b = tl.program_id(1) * (T // 2) + tl.arange(0, T // 2)  # its packed bytes along the row
    inside = (r[:, None] < n_out) & (b[None, :] < n_in // 2)
    byte = tl.load(packed + r[:, None] * (n_in // 2) + b[None, :], mask=inside, other=0)
    scale = tl.load(absmax + (r[:, None] * n_in + 2 * b[None, :]) // BLOCKSIZE, mask=inside, other=0.0)
    high = lookup((byte >> 4).to(tl.int32), code) * scale
    low = lookup((byte & 0xF).to(tl.int32), code) * scale
    w = tl.reshape(tl.join(high, low), (T, T))  # element 2i is byte i's high nibble, 2i+1 its low one
    c = tl.program_id(1) * T + tl.arange(0, T)
    w = tl.clamp(w * tl.load(inv_scale + c, mask=c < n_in, other=0.0)[None, :], -448.0, 448.0)
    keep = (c[:, None] < n_in) & (r[None, :] < n_out)
    tl.store(out + c[:, None] * n_out + r[None, :], tl.trans(w).to(out.dtype.element_ty), mask=keep)
