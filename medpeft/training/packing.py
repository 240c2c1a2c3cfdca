"""Padding-free training batches: examples packed end to end into one row, kept apart inside attention.

    batches = pack_batches(lengths, budget=4096, seed=0)   # lists of example indices, each <= budget tokens
    collate = PackedCollator()                             # one pack -> input_ids [1, T], position_ids restart
    collate = PackedCollator(static=StaticRows.of(...))    # every row the same shape (CUDA graphs replay them)
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
from dataclasses import dataclass

import torch

ATTENTION = "medpeft_varlen"


def token_budget(cfg) -> int:
    """Tokens in a packed micro-batch: --tokens_per_batch, else as many as --batch_size rows of --max_length."""
    return cfg.tokens_per_batch or cfg.batch_size * cfg.max_length


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


@dataclass(frozen=True)
class StaticRows:
    """One shape for every packed row: `tokens` long, `segments` examples, none longer than `longest`. A row is
    filled out with padding segments (no loss) of at most `longest` tokens, then with empty segments, so that the
    attention kernel sees the same sizes and the same maximum length each time."""

    tokens: int
    segments: int
    longest: int

    @classmethod
    def of(cls, groups: list[list[dict]], budget: int) -> "StaticRows":
        """The shape that fits every group of tokenized examples (padding segments as long as the longest example)."""
        lengths = [[len(e["input_ids"]) for e in g] for g in groups]
        tokens = max([budget] + [sum(g) for g in lengths])
        longest = max(n for g in lengths for n in g)
        segments = max(len(g) + -(-(tokens - sum(g)) // longest) for g in lengths)
        return cls(tokens, segments, longest)


class PackedCollator:
    """One group of tokenized examples -> a single row with restarting positions and example boundaries.

    The first label of each example is ignored, so no example learns to predict the next one's first token.

    `prefix` > 0 opens the row with that many slots (token 0, no loss) for a method to fill (P-Tuning's virtual
    tokens), which every example of the row sees as though they stood right before it: the examples' positions
    start after the prefix, and `kv_index` lists, example by example, the row positions each one attends to
    (the prefix, then its own tokens). The prefix is computed once per row, not once per example. It counts as
    neither useful nor padded tokens, as a method's own tokens do in padded batches."""

    def __init__(self, prefix: int = 0, static: StaticRows | None = None):
        if static is not None and prefix:
            raise ValueError("rows of one shape are not made with a prefix")
        self.prefix, self.static = prefix, static
        self.real_tokens = 0  # the row's tokens less the method's prefix: all of them examples' tokens
        self.padded_tokens = 0

    def __call__(self, groups: list[list[dict]] | list[dict]) -> dict:
        examples = [e for g in groups for e in (g if isinstance(g, list) else [g])]
        p = self.prefix
        ids, labels, positions = [0] * p, [-100] * p, list(range(p))
        starts, key_starts, keys = [0] + [p] * bool(p), [0] + [p] * bool(p), list(range(p))
        for e in examples:
            n, at = len(e["input_ids"]), len(ids)
            ids.extend(e["input_ids"])
            labels.extend([-100] + list(e["labels"][1:]))
            positions.extend(range(p, p + n))
            starts.append(at + n)
            if p:
                keys.extend([*range(p), *range(at, at + n)])
                key_starts.append(key_starts[-1] + p + n)
        self.real_tokens += len(ids) - p
        if self.static is not None:
            self._fill(ids, labels, positions, starts)
        self.padded_tokens += len(ids) - p
        row = {"input_ids": torch.tensor([ids]), "labels": torch.tensor([labels]),
               "position_ids": torch.tensor([positions])}
        for side, bounds in (("q", starts), ("k", key_starts if p else starts)):
            row[f"cu_seq_lens_{side}"] = torch.tensor(bounds, dtype=torch.int32)
            row[f"max_length_{side}"] = (self.static.longest if self.static is not None
                                         else max(b - a for a, b in zip(bounds, bounds[1:])))
        if p:
            row["kv_index"] = torch.tensor(keys)
        return row

    def _fill(self, ids, labels, positions, starts):
        shape = self.static
        if len(ids) > shape.tokens or any(b - a > shape.longest for a, b in zip(starts, starts[1:])):
            raise ValueError(f"a packed row of {len(ids)} tokens does not fit {shape}")
        while len(ids) < shape.tokens:
            n = min(shape.longest, shape.tokens - len(ids))
            ids.extend([0] * n)
            labels.extend([-100] * n)
            positions.extend(range(n))
            starts.append(len(ids))
        if len(starts) - 1 > shape.segments:
            raise ValueError(f"a packed row of {len(starts) - 1} segments does not fit {shape}")
        starts.extend([len(ids)] * (shape.segments + 1 - len(starts)))


@functools.lru_cache(maxsize=1)
def _varlen_kernel():
    """(PyTorch's varlen flash kernel or None, the names of its parameters): looked up once, not per layer."""
    try:
        from torch.nn.attention.varlen import varlen_attn
    except ImportError:
        return None, frozenset()
    return varlen_attn, frozenset(inspect.signature(varlen_attn).parameters)


def _per_example_sdpa(q, k, v, cu_q, cu_k, scaling):
    """q: [T, Hq, D], k/v: [Tk, Hkv, D] -> [T, Hq, D]; one causal SDPA per example. A key segment longer than
    its query segment (a shared prefix before it) is aligned at the end, as the flash kernel aligns it."""
    groups = q.shape[1] // k.shape[1]
    out = torch.empty_like(q)
    for (a, b), (c, d) in zip(zip(cu_q.tolist(), cu_q[1:].tolist()), zip(cu_k.tolist(), cu_k[1:].tolist())):
        if a == b:  # an empty segment (rows of one shape end with them)
            continue
        qi = q[a:b].transpose(0, 1)
        ki = k[c:d].transpose(0, 1).repeat_interleave(groups, dim=0)
        vi = v[c:d].transpose(0, 1).repeat_interleave(groups, dim=0)
        mask = torch.ones(b - a, d - c, dtype=torch.bool, device=q.device).tril(diagonal=(d - c) - (b - a))
        out[a:b] = torch.nn.functional.scaled_dot_product_attention(
            qi, ki, vi, attn_mask=mask, scale=scaling).transpose(0, 1)
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
    cu_k = cu
    if kwargs.get("kv_index") is not None:  # a shared prefix: each example's keys are the prefix's and its own
        index = kwargs["kv_index"].to(q.device)
        k, v = k.index_select(0, index), v.index_select(0, index)
        cu_k = kwargs["cu_seq_lens_k"].to(device=q.device, dtype=torch.int32)
    kernel, params = _varlen_kernel() if q.is_cuda else (None, frozenset())
    if kernel is None:
        return _per_example_sdpa(q, k, v, cu, cu_k, scaling).unsqueeze(0), None
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
    longest_k = int(kwargs.get("max_length_k") or (cu_k[1:] - cu_k[:-1]).max())
    if dtype not in (torch.float16, torch.bfloat16):  # the flash kernel computes in half precision only
        q, k, v = (t.to(torch.bfloat16) for t in (q, k, v))
    # causal with more keys than queries (a shared prefix): the kernel aligns the mask at the end (flash-attention 2)
    out = kernel(q.contiguous(), k.contiguous(), v.contiguous(), cu, cu_k, longest, longest_k, scale=scaling, **extra)
    return out.to(dtype).unsqueeze(0), None


def _configs(model):
    seen = {}
    for m in model.modules():
        config = getattr(m, "config", None)
        if config is not None and hasattr(config, "_attn_implementation"):
            seen[id(config)] = config
    return list(seen.values())


def enable_varlen_attention(model):
    """Route the model's attention through `varlen_attention`; returns what undoes it."""
    from transformers import AttentionInterface
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS

    AttentionInterface.register(ATTENTION, varlen_attention)
    # Padded batches (evaluation inside training) still need SDPA's padding mask.
    ALL_MASK_ATTENTION_FUNCTIONS.register(ATTENTION, ALL_MASK_ATTENTION_FUNCTIONS["sdpa"])
    configs = _configs(model)
    previous = configs[0]._attn_implementation if configs else "sdpa"
    for config in configs:
        config._attn_implementation = ATTENTION

    def undo():
        for config in _configs(model):
            config._attn_implementation = previous

    return undo
