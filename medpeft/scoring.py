"""What the evaluation asks of a model: answer-only losses, option scores and greedy answers, in batches.

    score_and_generate(model, tokenizer, records, batch_size=16, max_new_tokens=128)
        -> {"nll": [...], "tokens": [...], "answers": [...], "options": [...], "timing": {...}}

A record is one line of a processed split (medpeft/data.py): {"messages": [...], "options": {...} | None, ...}.
"""

from __future__ import annotations

import copy
import math
import random
import time
from dataclasses import dataclass

import torch
from tqdm.auto import tqdm

from .distributed import is_main_process
from .modeling import autocast
from .tokens import PadCollator, render, tokenize_records


@torch.no_grad()
def answer_loss(model, examples: list[dict], pad_token_id: int, batch_size: int = 8, desc: str = "loss",
                interval: bool = False, seed: int = 0) -> dict:
    """Token-weighted mean cross-entropy over answer tokens and its perplexity; with `interval`, a 95% bootstrap
    interval of the perplexity over examples."""
    collate = PadCollator(pad_token_id)
    was_training = model.training
    model.eval()
    device = next(p for p in model.parameters()).device
    nll, counts = [], []
    # Longest first: similar lengths share a batch, so little padding is computed.
    order = sorted(range(len(examples)), key=lambda i: -len(examples[i]["input_ids"]))
    for start in tqdm(range(0, len(order), batch_size), desc=desc, leave=False, unit="batch",
                      disable=not is_main_process()):
        batch = collate([examples[i] for i in order[start:start + batch_size]])
        batch = {k: v.to(device) for k, v in batch.items()}
        labels = batch.pop("labels")
        # logits (a vocabulary-wide matmul) only from the first answer token of the batch on
        width = labels.shape[1]
        keep = width - max(int((labels != -100).int().argmax(dim=1).min()) - 1, 0)
        with autocast(model):
            logits = model(**batch, logits_to_keep=keep).logits[:, -keep:]  # P-Tuning's virtual tokens come first
        targets = labels[:, width - keep + 1:]
        scored = targets != -100  # the softmax over the vocabulary only where an answer token is predicted
        losses = torch.nn.functional.cross_entropy(logits[:, :-1][scored].float(), targets[scored], reduction="none")
        rows = scored.nonzero()[:, 0]
        nll.extend(torch.zeros(len(targets), dtype=losses.dtype).index_add_(0, rows.cpu(), losses.cpu()).tolist())
        counts.extend(scored.sum(dim=1).tolist())
    if was_training:
        model.train()
    return loss_summary(nll, counts, interval, seed)


def loss_summary(nll: list[float], counts: list[int], interval: bool = False, seed: int = 0) -> dict:
    """Token-weighted mean of per-example summed losses, its perplexity, and optionally a 95% bootstrap interval of
    the perplexity over examples."""
    total = sum(counts)
    loss = sum(nll) / max(total, 1)
    out = {"loss": round(loss, 5), "perplexity": round(math.exp(min(loss, 50)), 3), "tokens": total,
           "examples": len(nll)}
    if interval and nll:
        rng = random.Random(seed)
        n, ppl = len(nll), []
        for _ in range(1000):
            idx = [rng.randrange(n) for _ in range(n)]
            ppl.append(math.exp(min(sum(nll[i] for i in idx) / max(sum(counts[i] for i in idx), 1), 50)))
        ppl.sort()
        out["perplexity_ci"] = [round(ppl[25], 3), round(ppl[974], 3)]
    return out


def _prompt(tokenizer, record: dict) -> str:
    return render(tokenizer, record["messages"][:-1], add_generation_prompt=True)


@dataclass
class _Item:
    """One test record as token sequences: a prefix every continuation shares, run once, and what continues it."""

    prefix: list[int]
    generation_tail: list[int]  # the rest of the generation prompt (empty unless an option merges with its end)
    answer_tail: list[int]  # the reference answer, truncated at --max_length: scored for the loss
    answer_scored: list[bool]  # which answer_tail tokens are answer tokens (labels), not template
    options: list[tuple[str, list[int], int]]  # (letter, tail, index in the tail where the option's text starts)


def _common_prefix(a: list[int], b: list[int]) -> int:
    return next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))


def _items(tokenizer, records: list[dict], max_length: int) -> list[_Item]:
    examples = tokenize_records(tokenizer, records, max_length)
    items = []
    for record, example in zip(records, examples):
        prompt = _prompt(tokenizer, record)
        head = tokenizer(prompt, add_special_tokens=False)["input_ids"]
        full, labels = example["input_ids"], example["labels"]
        options = [(letter, tokenizer(prompt + text, add_special_tokens=False)["input_ids"])
                   for letter, text in (record.get("options") or {}).items()]
        first_label = next((i for i, lab in enumerate(labels) if lab != -100), len(full))
        # shared while every sequence agrees (an option may merge with the prompt's last token), and before the
        # first answer token; at least one token, so that every continuation has logits to start from
        starts = [_common_prefix(head, ids) for _, ids in options]
        shared = max(1, min([_common_prefix(head, full), first_label] + starts))
        items.append(_Item(prefix=head[:shared], generation_tail=head[shared:], answer_tail=full[shared:],
                           answer_scored=[lab != -100 for lab in labels[shared:]],
                           options=[(letter, ids[shared:], start - shared)
                                    for (letter, ids), start in zip(options, starts)]))
    return items


def _rows_of(cache, index: torch.Tensor):
    """A cache holding the given rows of `cache`, which stays as it is (DynamicCache: layers replaced, not changed)."""
    rows = copy.copy(cache)
    rows.layers = [copy.copy(layer) for layer in cache.layers]
    rows.reorder_cache(index)
    return rows


def _logprobs(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """log p(target) at each position, without a vocabulary-wide log-softmax tensor."""
    return logits.gather(-1, targets[..., None])[..., 0] - torch.logsumexp(logits, dim=-1)


def _right_padded(seqs: list[list[int]], pad: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(1, max(len(s) for s in seqs))
    ids = torch.tensor([s + [pad] * (width - len(s)) for s in seqs], device=device)
    mask = torch.tensor([[1] * len(s) + [0] * (width - len(s)) for s in seqs], device=device)
    return ids, mask


@torch.no_grad()
def score_and_generate(model, tokenizer, records: list[dict], batch_size: int, max_new_tokens: int,
                       max_length: int = 512, desc: str = "evaluate", score: bool = True) -> dict:
    """Everything the evaluation asks of a model, with each prompt run once.

    Per batch of records: their prompts, left-padded, run once into a key/value cache. From it continue (1) the
    reference answer, teacher-forced, for the answer-only loss (its tokens as `tokenize_records` labels them, cut
    at `max_length`); (2) every option's text, for the option scores; (3) greedy decoding (argmax, no logits
    processors) for up to `max_new_tokens` answer tokens. Continuations see exactly the prompt a separate pass
    would: the cache is the same, positions continue the prompt's, padding is masked. P-Tuning's virtual tokens are
    put before each prompt once (positions 0..V-1, as in training) and stay in the cache.

    Returns {"nll": [sum over answer tokens | None], "tokens": [...], "answers": [...], "options":
    [{letter: mean log-probability per token} | None], "timing": {...}} in the order of `records`; timing covers
    the prompt passes and decoding (what generating the answers costs), not the loss and option continuations
    (`score=False` skips those: generation alone, to time it)."""
    device = next(model.parameters()).device
    prompt_learning = bool(getattr(getattr(model, "active_peft_config", None), "is_prompt_learning", False))
    # P-Tuning adds its virtual tokens on every call of the peft model: after the prompt, the bare base model goes on
    decoder = model.get_base_model() if prompt_learning else model
    pad, eos = tokenizer.pad_token_id, tokenizer.eos_token_id
    items = _items(tokenizer, records, max_length)
    out = {"nll": [None] * len(items), "tokens": [0] * len(items), "answers": [""] * len(items),
           "options": [None] * len(items)}
    generated, seconds = 0, 0.0
    order = sorted(range(len(items)), key=lambda i: len(items[i].prefix))
    for start in tqdm(range(0, len(order), batch_size), desc=desc, leave=False, unit="batch",
                      disable=not is_main_process()):
        batch = [items[i] for i in order[start:start + batch_size]]
        t0 = time.perf_counter()
        width = max(len(it.prefix) for it in batch)
        ids = torch.tensor([[pad] * (width - len(it.prefix)) + it.prefix for it in batch], device=device)
        mask = torch.tensor([[0] * (width - len(it.prefix)) + [1] * len(it.prefix) for it in batch], device=device)
        positions = (mask.cumsum(1) - 1).clamp(min=0)
        with autocast(model):
            if prompt_learning:
                virtual = model.get_prompt(batch_size=len(batch))
                embeds = model.get_input_embeddings()(ids)
                n = virtual.shape[1]
                mask = torch.cat([mask.new_ones(len(batch), n), mask], dim=1)
                positions = torch.cat([torch.arange(n, device=device).expand(len(batch), n), positions + n], dim=1)
                first = decoder(inputs_embeds=torch.cat([virtual.to(embeds.dtype), embeds], dim=1),
                                attention_mask=mask, position_ids=positions, use_cache=True, logits_to_keep=1)
            else:
                first = model(input_ids=ids, attention_mask=mask, position_ids=positions, use_cache=True,
                              logits_to_keep=1)
        cache, last = first.past_key_values, first.logits[:, -1].float()
        next_position = positions[:, -1] + 1
        seconds += time.perf_counter() - t0

        # (1) + (2): teacher-forced continuations, a few rows of the cache at a time
        tails = [(k, "answer", it.answer_tail) for k, it in enumerate(batch) if score and any(it.answer_scored)]
        tails += [(k, letter, tail) for k, it in enumerate(batch) for letter, tail, _ in it.options if score]
        tails.sort(key=lambda t: len(t[2]))  # little padding within a chunk
        for chunk_start in range(0, len(tails), 2 * batch_size):
            chunk = tails[chunk_start:chunk_start + 2 * batch_size]
            owner = torch.tensor([k for k, *_ in chunk], device=device)
            tail_ids, tail_mask = _right_padded([t for *_, t in chunk], pad, device)
            with autocast(model):
                logits = decoder(input_ids=tail_ids, attention_mask=torch.cat([mask[owner], tail_mask], dim=1),
                                 position_ids=next_position[owner, None] + torch.arange(tail_ids.shape[1],
                                                                                       device=device),
                                 past_key_values=_rows_of(cache, owner), use_cache=True).logits.float()
            # position j of a tail is predicted by the prompt's last logits (j = 0), then by the tail's own
            picked = torch.cat([_logprobs(last[owner, None], tail_ids[:, :1]),
                                _logprobs(logits[:, :-1], tail_ids[:, 1:])], dim=1)
            for row, (k, what, tail) in enumerate(chunk):
                item, index = batch[k], order[start + k]
                if what == "answer":
                    scored = torch.tensor(item.answer_scored, device=device)
                    out["nll"][index] = float(-picked[row, :len(tail)][scored].sum())
                    out["tokens"][index] = int(scored.sum())
                else:
                    begin = next(s for letter, _, s in item.options if letter == what)
                    out["options"][index] = out["options"][index] or {}
                    out["options"][index][what] = float(picked[row, begin:len(tail)].mean())

        # (3): greedy decoding from the prompts' cache
        t0 = time.perf_counter()
        if max_new_tokens and any(it.generation_tail for it in batch):
            tail_ids, tail_mask = _right_padded([it.generation_tail for it in batch], pad, device)
            with autocast(model):
                logits = decoder(input_ids=tail_ids, attention_mask=torch.cat([mask, tail_mask], dim=1),
                                 position_ids=next_position[:, None] + torch.arange(tail_ids.shape[1], device=device),
                                 past_key_values=cache, use_cache=True).logits.float()
            lengths = tail_mask.sum(1)
            has_tail = lengths > 0
            last = torch.where(has_tail[:, None], logits[torch.arange(len(batch)), (lengths - 1).clamp(min=0)], last)
            mask = torch.cat([mask, tail_mask], dim=1)
            next_position = next_position + lengths
        tokens = [[] for _ in batch]
        rows = list(range(len(batch)))  # the batch rows still decoding; finished ones leave the cache
        step_ids = last.argmax(-1)
        for step in range(max_new_tokens):
            for k, token in zip(rows, step_ids.tolist()):
                tokens[k].append(token)
            going = step_ids != eos
            if step == max_new_tokens - 1 or not bool(going.any()):
                break
            if not bool(going.all()):
                keep = going.nonzero()[:, 0]
                cache.batch_select_indices(keep)
                rows = [rows[i] for i in keep.tolist()]
                step_ids, mask, next_position = step_ids[keep], mask[keep], next_position[keep]
            mask = torch.cat([mask, mask.new_ones(len(rows), 1)], dim=1)
            with autocast(model):
                logits = decoder(input_ids=step_ids[:, None], attention_mask=mask, position_ids=next_position[:, None],
                                 past_key_values=cache, use_cache=True).logits[:, -1]
            next_position = next_position + 1
            step_ids = logits.argmax(-1)
        seconds += time.perf_counter() - t0
        for k, toks in enumerate(tokens):
            toks = [t for t in toks if t not in (eos, pad)]
            generated += len(toks)
            out["answers"][order[start + k]] = tokenizer.decode(toks, skip_special_tokens=True).strip()
    out["timing"] = {"latency_s_per_answer": round(seconds / max(len(records), 1), 4),
                     "generated_tokens_per_s": round(generated / seconds, 2) if seconds else 0.0,
                     "generated_tokens": generated}
    return out


def score_options(model, tokenizer, records: list[dict], batch_size: int = 16) -> list[dict[str, float]]:
    """Per record, the mean log-probability per token of each option's text as the start of the answer, given
    the prompt (which lists the options). Letters are not scored: a 135M model cannot tie knowledge to letters,
    and a learned preference for one letter would decide; the mean keeps long options from losing for length.
    Every option continues from its prompt's key/value cache (score_and_generate)."""
    return score_and_generate(model, tokenizer, records, batch_size, max_new_tokens=0, desc="options")["options"]


@torch.no_grad()
def generate_answers(model, tokenizer, records: list[dict], batch_size: int, max_new_tokens: int,
                     desc: str = "generate") -> tuple[list[str], dict]:
    """Greedy answers with the chat template, in left-padded batches; also latency and generated tokens/s."""
    device = next(model.parameters()).device
    prompts = [_prompt(tokenizer, r) for r in records]
    side = tokenizer.padding_side
    tokenizer.padding_side = "left"
    answers: list[str] = [""] * len(prompts)
    generated_tokens, seconds = 0, 0.0
    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))
    try:
        for start in tqdm(range(0, len(order), batch_size), desc=desc, leave=False, unit="batch",
                          disable=not is_main_process()):
            idx = order[start:start + batch_size]
            enc = tokenizer([prompts[i] for i in idx], return_tensors="pt", padding=True, add_special_tokens=False)
            enc = {k: enc[k].to(device) for k in ("input_ids", "attention_mask")}
            t0 = time.perf_counter()
            with autocast(model):
                out = model.generate(**enc, max_new_tokens=max_new_tokens, do_sample=False,
                                     pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id)
            seconds += time.perf_counter() - t0
            new = out[:, enc["input_ids"].shape[1]:]
            for row, i in enumerate(idx):
                tokens = new[row].tolist()
                if tokenizer.eos_token_id in tokens:
                    tokens = tokens[:tokens.index(tokenizer.eos_token_id)]
                tokens = [t for t in tokens if t != tokenizer.pad_token_id]
                generated_tokens += len(tokens)
                answers[i] = tokenizer.decode(tokens, skip_special_tokens=True).strip()
    finally:
        tokenizer.padding_side = side
    timing = {"latency_s_per_answer": round(seconds / max(len(records), 1), 4),
              "generated_tokens_per_s": round(generated_tokens / seconds, 2) if seconds else 0.0,
              "generated_tokens": generated_tokens}
    return answers, timing
