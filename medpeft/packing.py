"""Padding-free training batches: examples packed end to end into one row, kept apart inside attention.

    batches = pack_batches(lengths, budget=4096, seed=0)   # lists of example indices, each <= budget tokens
    collate = PackedCollator()                             # one pack -> input_ids [1, T], position_ids restart
    enable_varlen_attention(model)                         # attention never crosses an example boundary

The packed row carries `cu_seq_lens_q/k` (cumulative example starts) and `max_length_q/k`, the keyword names
transformers passes down to attention functions. On CUDA, attention is PyTorch's variable-length flash kernel
(`torch.nn.attention.varlen.varlen_attn`); elsewhere, and where that kernel is missing, one causal SDPA call
per example (slower, exact). A batch without those keywords (evaluation, generation) takes plain SDPA.
"""

from __future__ import annotations

import functools
import inspect
import random

import torch

ATTENTION = "medpeft_varlen"


def pack_batches(lengths: list[int], budget: int, seed: int = 0) -> list[list[int]]:
    """Indices grouped so that each group's total length is at most `budget` (an example longer than the
    budget gets a group of its own). Examples are shuffled, then each goes to the first group with room
    among the last few open ones: groups come out nearly full without sorting the data by length."""
    order = list(range(len(lengths)))
    random.Random(seed).shuffle(order)
    groups: list[list[int]] = []
    room: list[int] = []
    window = 64  # how many open groups an example may join: bounds the search, keeps the data order mixed
    for i in order:
        n = lengths[i]
        for g in range(max(0, len(groups) - window), len(groups)):
            if room[g] >= n:
                groups[g].append(i)
                room[g] -= n
                break
        else:
            groups.append([i])
            room.append(budget - n)
    return groups


class PackedCollator:
    """One group of tokenized examples -> a single row with restarting positions and example boundaries.

    The first label of each example is ignored, so no example learns to predict the next one's first token.
    `prefix` slots (token 0, no loss) open each example, for a method that fills them itself (P-Tuning's virtual
    tokens); they count as neither useful nor padded tokens, as a method's own tokens do in padded batches."""

    def __init__(self, prefix: int = 0):
        self.prefix = prefix
        self.real_tokens = 0  # every token of a packed row is an example's token (or a method's prefix)
        self.padded_tokens = 0

    def __call__(self, groups: list[list[dict]] | list[dict]) -> dict:
        examples = [e for g in groups for e in (g if isinstance(g, list) else [g])]
        ids, labels, positions, starts = [], [], [], [0]
        slots = [0] * self.prefix
        for e in examples:
            n = len(e["input_ids"])
            ids.extend(slots + list(e["input_ids"]))
            labels.extend([-100] * (self.prefix + 1) + list(e["labels"][1:]))
            positions.extend(range(self.prefix + n))
            starts.append(starts[-1] + self.prefix + n)
        self.real_tokens += len(ids) - self.prefix * len(examples)
        self.padded_tokens += len(ids) - self.prefix * len(examples)
        cu = torch.tensor(starts, dtype=torch.int32)
        longest = max(b - a for a, b in zip(starts, starts[1:]))
        return {"input_ids": torch.tensor([ids]), "labels": torch.tensor([labels]),
                "position_ids": torch.tensor([positions]), "cu_seq_lens_q": cu, "cu_seq_lens_k": cu,
                "max_length_q": longest, "max_length_k": longest}


@functools.lru_cache(maxsize=1)
def _varlen_kernel():
    """(PyTorch's varlen flash kernel or None, the names of its parameters): looked up once, not per layer."""
    try:
        from torch.nn.attention.varlen import varlen_attn
    except ImportError:
        return None, frozenset()
    return varlen_attn, frozenset(inspect.signature(varlen_attn).parameters)


def _per_example_sdpa(q, k, v, cu, scaling):
    """q: [T, Hq, D], k/v: [T, Hkv, D] -> [T, Hq, D]; one causal SDPA per example."""
    groups = q.shape[1] // k.shape[1]
    out = torch.empty_like(q)
    bounds = cu.tolist()
    for a, b in zip(bounds, bounds[1:]):
        qi = q[a:b].transpose(0, 1)
        ki = k[a:b].transpose(0, 1).repeat_interleave(groups, dim=0)
        vi = v[a:b].transpose(0, 1).repeat_interleave(groups, dim=0)
        out[a:b] = torch.nn.functional.scaled_dot_product_attention(
            qi, ki, vi, is_causal=True, scale=scaling).transpose(0, 1)
    return out


def varlen_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    """An attention function for transformers' AttentionInterface. query: [B, Hq, T, D] -> [B, T, Hq, D]."""
    cu = kwargs.get("cu_seq_lens_q")
    if cu is None:
        from transformers.integrations.sdpa_attention import sdpa_attention_forward

        return sdpa_attention_forward(module, query, key, value, attention_mask, scaling=scaling,
                                      dropout=dropout, **kwargs)
    if query.shape[0] != 1:
        raise ValueError("packed batches hold one row; got a batch of %d" % query.shape[0])
    q, k, v = (t[0].transpose(0, 1) for t in (query, key, value))  # [T, H, D]
    dtype = q.dtype
    cu = cu.to(device=q.device, dtype=torch.int32)
    kernel, params = _varlen_kernel() if q.is_cuda else (None, frozenset())
    if kernel is None:
        return _per_example_sdpa(q, k, v, cu, scaling).unsqueeze(0), None
    extra = {}
    if "enable_gqa" in params:
        extra["enable_gqa"] = k.shape[1] != q.shape[1]
    elif k.shape[1] != q.shape[1]:
        k = k.repeat_interleave(q.shape[1] // k.shape[1], dim=1)
        v = v.repeat_interleave(q.shape[1] // v.shape[1], dim=1)
    if "window_size" in params:
        extra["window_size"] = (-1, 0)
    else:
        extra["is_causal"] = True
    longest = int(kwargs.get("max_length_q") or (cu[1:] - cu[:-1]).max())
    if dtype not in (torch.float16, torch.bfloat16):  # the flash kernel computes in half precision only
        q, k, v = (t.to(torch.bfloat16) for t in (q, k, v))
    out = kernel(q.contiguous(), k.contiguous(), v.contiguous(), cu, cu, longest, longest, scale=scaling, **extra)
    return out.to(dtype).unsqueeze(0), None


def _configs(model):
    seen = {}
    for m in model.modules():
        config = getattr(m, "config", None)
        if config is not None and hasattr(config, "_attn_implementation"):
            seen[id(config)] = config
    return list(seen.values())


def enable_varlen_attention(model) -> str:
    """Route the model's attention through `varlen_attention`; returns the implementation it replaced."""
    from transformers import AttentionInterface
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS

    AttentionInterface.register(ATTENTION, varlen_attention)
    # Padded batches (evaluation inside training) still need SDPA's padding mask.
    ALL_MASK_ATTENTION_FUNCTIONS.register(ATTENTION, ALL_MASK_ATTENTION_FUNCTIONS["sdpa"])
    configs = _configs(model)
    previous = configs[0]._attn_implementation if configs else "sdpa"
    for config in configs:
        config._attn_implementation = ATTENTION
    return previous


def restore_attention(model, previous: str) -> None:
    for config in _configs(model):
        config._attn_implementation = previous
