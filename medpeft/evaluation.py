"""Scores of a model on processed data. For now: the answer-only loss (mean NLL per answer token)."""

from __future__ import annotations

import math

import torch
from tqdm.auto import tqdm

from .data import PadCollator
from .modeling import autocast


@torch.no_grad()
def answer_loss(model, examples: list[dict], pad_token_id: int, batch_size: int = 8, desc: str = "loss") -> dict:
    """Token-weighted mean cross-entropy over answer tokens, and its perplexity."""
    collate = PadCollator(pad_token_id)
    was_training = model.training
    model.eval()
    device = next(p for p in model.parameters()).device
    total, count = 0.0, 0
    # Longest first: similar lengths share a batch, so little padding is computed.
    order = sorted(range(len(examples)), key=lambda i: -len(examples[i]["input_ids"]))
    for start in tqdm(range(0, len(order), batch_size), desc=desc, leave=False, unit="batch"):
        batch = collate([examples[i] for i in order[start:start + batch_size]])
        batch = {k: v.to(device) for k, v in batch.items()}
        n = int((batch["labels"][:, 1:] != -100).sum())
        if n == 0:
            continue
        with autocast(model):
            out = model(**batch)
        total += float(out.loss) * n
        count += n
    if was_training:
        model.train()
    loss = total / max(count, 1)
    return {"loss": round(loss, 5), "perplexity": round(math.exp(min(loss, 50)), 3), "tokens": count,
            "examples": len(examples)}
