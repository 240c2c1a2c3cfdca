"""Letter scoring as lm-evaluation-harness does it, so that medpeft's figures sit beside published ones.

The harness's zero-shot multiple-choice tasks put no chat template around the item: MedQA is scored as
"Question: ...\nA. ...\nB. ...\nAnswer:" followed by " A", " B", ... and PubMedQA as "Abstract: ...\nQuestion:
...\nAnswer:" followed by " yes", " no", " maybe"; the pick is the continuation with the highest summed
log-likelihood (lm-eval's `acc`). `doc_to_text`/`doc_choices` below are also what the task files in
medpeft/resources/lm_eval_tasks use, so a local task run through lm-eval sees the very same text.

    letter_picks(model, tokenizer, records)  ->  ["B", "A", ...]   (the option letter each record's pick names)
"""

from __future__ import annotations

import torch
from tqdm.auto import tqdm

from .distributed import is_main_process
from .modeling import autocast
from .records import LETTERS, YES_NO_MAYBE


def is_yes_no_maybe(options: dict[str, str]) -> bool:
    return list(options.values()) == list(YES_NO_MAYBE)


def doc_to_text(question: str, options: dict[str, str], context: str | None = None) -> str:
    """The harness's prompt of an item: PubMedQA's for yes/no/maybe items, MedQA's for lettered options."""
    if is_yes_no_maybe(options):
        return (f"Abstract: {context}\n" if context else "") + f"Question: {question}\nAnswer:"
    return f"Question: {question}\n" + "".join(f"{k}. {v}\n" for k, v in options.items()) + "Answer:"


def doc_choices(options: dict[str, str]) -> list[str]:
    """What is scored after the prompt (the harness puts a space between): the label words or the letters."""
    return list(YES_NO_MAYBE) if is_yes_no_maybe(options) else list(options)


def _encode(tokenizer, text: str) -> list[int]:
    """The harness's tok_encode: the tokenizer's own special tokens, unless the text already starts with BOS."""
    bos = tokenizer.bos_token
    return tokenizer.encode(text, add_special_tokens=not (bos and text.startswith(bos)))


def encode_pair(tokenizer, context: str, continuation: str) -> tuple[list[int], list[int]]:
    """The harness's _encode_pair for causal models: trailing spaces move to the continuation; the whole is
    encoded and the context's tokens split off."""
    spaces = len(context) - len(context.rstrip())
    if spaces:
        context, continuation = context[:-spaces], context[-spaces:] + continuation
    whole = _encode(tokenizer, context + continuation)
    context_ids = _encode(tokenizer, context)
    return context_ids, whole[len(context_ids):]


@torch.no_grad()
def continuation_logliks(model, tokenizer, pairs: list[tuple[str, str]], max_length: int = 2048,
                         batch_size: int = 8, desc: str = "letters") -> list[float]:
    """Summed log-likelihood of each continuation after its context, left-truncated to max_length as the
    harness does; right-padded batches, so positions are those of each row alone. Pairs whose model input is the
    same (one-token continuations of one context: " A", " B", ...) share one forward pass."""
    inputs: dict[tuple, list[tuple[int, list[int]]]] = {}  # model input -> (pair, its continuation's tokens)
    for k, (context, continuation) in enumerate(pairs):
        ctx, cont = encode_pair(tokenizer, context, continuation)
        whole = (ctx + cont)[-(max_length + 1):]
        inputs.setdefault(tuple(whole[:-1]), []).append((k, whole[-len(cont):]))
    seqs = list(inputs)
    device = next(model.parameters()).device
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    out = [0.0] * len(pairs)
    order = sorted(range(len(seqs)), key=lambda i: -len(seqs[i]))
    was_training = model.training
    model.eval()
    for start in tqdm(range(0, len(order), batch_size), desc=desc, leave=False, unit="batch",
                      disable=not is_main_process()):
        idx = order[start:start + batch_size]
        width = max(len(seqs[i]) for i in idx)
        ids = torch.tensor([list(seqs[i]) + [pad] * (width - len(seqs[i])) for i in idx], device=device)
        mask = (torch.arange(width, device=device)[None] < torch.tensor([len(seqs[i]) for i in idx],
                                                                        device=device)[:, None]).long()
        with autocast(model):
            logits = model(input_ids=ids, attention_mask=mask).logits
        shift = logits.shape[1] - width  # P-Tuning's virtual tokens come first
        for row, i in enumerate(idx):
            n = len(seqs[i])
            for k, targets in inputs[seqs[i]]:
                rows = logits[row, shift + n - len(targets): shift + n].float().log_softmax(-1)
                out[k] = float(rows.gather(-1, torch.tensor(targets, device=device)[:, None]).sum())
    if was_training:
        model.train()
    return out


def letter_picks(model, tokenizer, records: list[dict], max_length: int = 2048, batch_size: int = 8,
                 desc: str = "letters") -> list[str]:
    """Per multiple-choice record, the option letter whose continuation the harness's format makes likeliest."""
    pairs, sizes = [], []
    for rec in records:
        text = doc_to_text(rec["question"], rec["options"], rec.get("context"))
        choices = doc_choices(rec["options"])
        pairs += [(text, " " + choice) for choice in choices]
        sizes.append(len(choices))
    scores = continuation_logliks(model, tokenizer, pairs, max_length, batch_size, desc)
    picked, start = [], 0
    for n in sizes:
        mine = scores[start:start + n]
        picked.append(LETTERS[mine.index(max(mine))])  # ties go to the first choice, as argmax does
        start += n
    return picked
