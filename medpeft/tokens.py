"""Processed records -> token ids with answer-only labels, through the model's own chat template; batches of them.

    tokenize_records(tokenizer, records, max_length=512)
        -> [{"input_ids": [...], "labels": [-100, ..., 1234, 5678], "n_tokens": 57, "truncated": False}, ...]
"""

from __future__ import annotations

import statistics
import sys

from .errors import UsageError


def render(tokenizer, messages: list[dict], add_generation_prompt: bool = False) -> str:
    """The chat template as text; templates without a system role get it folded into the first user turn."""
    try:
        return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt)
    except Exception:
        if not messages or messages[0]["role"] != "system":
            raise
        system, rest = messages[0]["content"], [dict(m) for m in messages[1:]]
        if rest and rest[0]["role"] == "user":
            rest[0]["content"] = f"{system}\n\n{rest[0]['content']}"
        return tokenizer.apply_chat_template(rest, tokenize=False, add_generation_prompt=add_generation_prompt)


def answer_spans(tokenizer, messages: list[dict]) -> tuple[str, list[tuple[int, int]]]:
    """Full text and the character spans of every assistant turn (what the loss is computed on)."""
    full = render(tokenizer, messages)
    spans = []
    for i, m in enumerate(messages):
        if m["role"] != "assistant":
            continue
        before = render(tokenizer, messages[:i], add_generation_prompt=True)
        upto = render(tokenizer, messages[: i + 1])
        if not full.startswith(before) or not full.startswith(upto[: len(before)]):
            spans = []  # template is not prefix-stable: fall back to the final answer only
            break
        spans.append((len(before), len(upto)))
    if not spans:
        before = render(tokenizer, messages[:-1], add_generation_prompt=True)
        if not full.startswith(before):
            raise UsageError("the chat template renders the prompt differently from the conversation; "
                             "cannot locate the answer tokens")
        spans = [(len(before), len(full))]
    return full, spans


def tokenize_records(tokenizer, records: list[dict], max_length: int) -> list[dict]:
    """input_ids + labels (-100 outside assistant turns), truncated to max_length; adds 'truncated' and 'n_tokens'."""
    texts, all_spans = [], []
    for rec in records:
        text, spans = answer_spans(tokenizer, rec["messages"])
        texts.append(text)
        all_spans.append(spans)
    out = []
    for start in range(0, len(texts), 512):
        enc = tokenizer(texts[start:start + 512], add_special_tokens=False, return_offsets_mapping=True)
        for k, (ids, offsets) in enumerate(zip(enc["input_ids"], enc["offset_mapping"])):
            spans = all_spans[start + k]
            labels = [tok if any(s < e_ and e > s_ for s_, e_ in spans) and e > s else -100
                      for tok, (s, e) in zip(ids, offsets)]
            out.append({"input_ids": ids[:max_length], "labels": labels[:max_length], "n_tokens": len(ids),
                        "truncated": len(ids) > max_length})
    return out


def answer_examples(tokenizer, records: list[dict], max_length: int) -> list[dict]:
    """tokenize_records, keeping only examples with at least one answer token left after truncation."""
    return [e for e in tokenize_records(tokenizer, records, max_length) if any(lab != -100 for lab in e["labels"])]


def length_stats(values: list[int]) -> dict:
    if not values:
        return {}
    s = sorted(values)
    pct = lambda p: s[min(len(s) - 1, int(p * len(s)))]
    return {"count": len(s), "min": s[0], "mean": round(statistics.fmean(s), 1), "median": pct(0.5),
            "p90": pct(0.9), "p95": pct(0.95), "max": s[-1]}


def show_tokens(tokenizer, example: dict, stream=None) -> None:
    """Print one example: tokens trained on in green, masked (prompt) tokens dimmed."""
    stream = stream or sys.stdout
    parts = []
    for tok, lab in zip(example["input_ids"], example["labels"]):
        piece = tokenizer.decode([tok]).replace("\n", "\\n\n")
        parts.append(f"\033[32m{piece}\033[0m" if lab != -100 else f"\033[2m{piece}\033[0m")
    n_lab = sum(lab != -100 for lab in example["labels"])
    print(f"--- {len(example['input_ids'])} tokens, {n_lab} trained on (green), the rest masked (dim) ---",
          file=stream)
    print("".join(parts), file=stream)


class PadCollator:
    """Right-pads a list of tokenized examples; counts the real and padded tokens it hands out.

    `answer_logits`: when set, a batch also asks the model for logits only from the batch's first answer position on
    (`logits_to_keep`, with the labels cut to match, so the loss is the same): the vocabulary-wide matmul and softmax
    skip the prompt tokens, a fifth of a small model's work on short answers. Its value is the number of positions
    the model puts before the text (P-Tuning's virtual tokens), 0 otherwise."""

    def __init__(self, pad_token_id: int, answer_logits: int | None = None):
        self.pad_token_id = pad_token_id
        self.answer_logits = answer_logits
        self.real_tokens = 0
        self.padded_tokens = 0

    def __call__(self, examples: list[dict]) -> dict:
        import torch

        width = max(len(e["input_ids"]) for e in examples)
        ids = torch.full((len(examples), width), self.pad_token_id, dtype=torch.long)
        labels = torch.full((len(examples), width), -100, dtype=torch.long)
        mask = torch.zeros((len(examples), width), dtype=torch.long)
        for i, e in enumerate(examples):
            n = len(e["input_ids"])
            ids[i, :n] = torch.tensor(e["input_ids"])
            labels[i, :n] = torch.tensor(e["labels"])
            mask[i, :n] = 1
        self.real_tokens += int(mask.sum())
        self.padded_tokens += ids.numel()
        batch = {"input_ids": ids, "labels": labels, "attention_mask": mask}
        answers = labels != -100
        if self.answer_logits is not None and answers.any():
            # position p's logits predict label p + 1: keep from the position before the first answer token
            first = int(answers.int().argmax(dim=1)[answers.any(dim=1)].min())
            keep = width - max(first - 1, 0)
            batch["labels"] = labels[:, width - keep:]
            batch["logits_to_keep"] = keep + self.answer_logits
        return batch
