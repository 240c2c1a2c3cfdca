"""Scores of a model on processed data: answer-only loss, generation metrics, multiple-choice accuracy, speed.

    evaluate(cfg)  ->  evaluation_results.json  (schema below) + report.md / report.html (see report.py)

evaluation_results.json:
    {"schema_version": 1, "created": ..., "test_data": ..., "settings": {...}, "versions": {...},
     "models": {"base": {...}, "qlora": {...}, ...}}          one entry per model, each:
        {"name", "path", "status": "ok" | "failed", "error": null | "one line",
         "loss": {"loss", "perplexity", "tokens", "examples"},
         "generation": {"rouge1", "rouge2", "rougeL", "bleu", "token_f1", "rougeL_ci": [lo, hi], "items"},
         "choice": {"items", "accuracy_loglik", "accuracy_loglik_ci", "macro_f1_loglik",
                    "accuracy_generate", "accuracy_generate_ci", "macro_f1_generate", "unparseable_rate"},
         "efficiency": {"trainable_parameters", "size_bytes", "train_runtime_s", "train_tokens_per_s",
                        "peak_memory_gb", "latency_s_per_answer", "generated_tokens_per_s",
                        "merged_latency_s_per_answer", "merged_generated_tokens_per_s"},
                       (LoRA on the CPU is evaluated merged; its as-trained speed is then timed on one batch)
         "training": {"loss_curve": [...], "validation_loss_base", "validation_loss_final"} | null,
         "samples": [{"question", "reference", "answer"}, ...]}
"""

from __future__ import annotations

import math
import random
import re
import string
import time
from collections import Counter
from dataclasses import dataclass

import torch
from tqdm.auto import tqdm

from .data import PadCollator, render, tokenize_records
from .distributed import is_main_process
from .modeling import autocast

# ----------------------------------------------------------------------------------------------- losses


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


# ----------------------------------------------------------------------------------------------- metrics

def _normalise_tokens(text: str) -> list[str]:
    text = text.lower()
    text = "".join(ch if ch not in string.punctuation else " " for ch in text)
    return [t for t in text.split() if t not in ("a", "an", "the")]


def token_f1(prediction: str, reference: str) -> float:
    """SQuAD-style F1 over lower-cased words without punctuation and articles."""
    pred, ref = _normalise_tokens(prediction), _normalise_tokens(reference)
    if not pred or not ref:
        return float(pred == ref)
    common = sum((Counter(pred) & Counter(ref)).values())
    if common == 0:
        return 0.0
    precision, recall = common / len(pred), common / len(ref)
    return 2 * precision * recall / (precision + recall)


def text_metrics(predictions: list[str], references: list[str]) -> tuple[dict, list[dict]]:
    """Corpus ROUGE-1/2/L (mean F), BLEU and token F1, plus the per-item scores."""
    import sacrebleu
    from rouge_score import rouge_scorer

    scorer = rouge_scorer.RougeScorer(["rouge1", "rouge2", "rougeL"], use_stemmer=True)
    items = []
    for pred, ref in zip(predictions, references):
        scores = scorer.score(ref, pred)
        items.append({k: scores[k].fmeasure for k in ("rouge1", "rouge2", "rougeL")} | {"token_f1": token_f1(pred, ref)})
    summary = {k: round(sum(i[k] for i in items) / max(len(items), 1), 4)
               for k in ("rouge1", "rouge2", "rougeL", "token_f1")}
    summary["bleu"] = round(sacrebleu.corpus_bleu(predictions, [references]).score, 3) if items else 0.0
    summary["items"] = len(items)
    return summary, items


def bootstrap_ci(values: list[float], resamples: int = 1000, seed: int = 0, level: float = 0.95) -> list[float]:
    """Percentile bootstrap interval of the mean."""
    if not values:
        return [0.0, 0.0]
    rng = random.Random(seed)
    n = len(values)
    means = sorted(sum(values[rng.randrange(n)] for _ in range(n)) / n for _ in range(resamples))
    lo = means[int((1 - level) / 2 * resamples)]
    hi = means[min(resamples - 1, int((1 + level) / 2 * resamples))]
    return [round(lo, 4), round(hi, 4)]


def macro_f1(predicted: list[str | None], gold: list[str]) -> float:
    labels = sorted(set(gold))
    scores = []
    for label in labels:
        tp = sum(p == label and g == label for p, g in zip(predicted, gold))
        fp = sum(p == label and g != label for p, g in zip(predicted, gold))
        fn = sum(p != label and g == label for p, g in zip(predicted, gold))
        scores.append(0.0 if tp == 0 else 2 * tp / (2 * tp + fp + fn))
    return round(sum(scores) / max(len(scores), 1), 4)


def parse_choice(text: str, options: dict[str, str]) -> str | None:
    """The option a generated answer names: a leading letter ("B", "B.", "(B)", "Answer: B"), a trailing one
    ("Vitamin C (B)"), or exactly one option's text as whole words (the longest wins when one contains another)."""
    head = text.strip()
    m = re.match(r"^(?:the\s+)?(?:correct\s+)?(?:answer|option)?\s*(?:is)?\s*[:\-]?\s*\(?([A-J])(?:[.):]|\s*$)", head,
                 flags=re.IGNORECASE)
    if m and m.group(1).upper() in options:
        return m.group(1).upper()
    lowered = head.lower()
    found = [k for k, v in options.items() if re.search(rf"(?<!\w){re.escape(v.lower())}(?!\w)", lowered)]
    found = [k for k in found if not any(options[k].lower() in options[j].lower() and k != j for j in found)]
    if len(found) == 1:
        return found[0]
    m = re.search(r"\(([A-J])\)\W*$", head)
    if m and m.group(1) in options and not found:
        return m.group(1)
    return None


# ----------------------------------------------------------------------------------------------- model calls

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
        shared = max(1, min([_common_prefix(head, full), first_label] + [_common_prefix(head, ids) for _, ids in options]))
        items.append(_Item(prefix=head[:shared], generation_tail=head[shared:], answer_tail=full[shared:],
                           answer_scored=[lab != -100 for lab in labels[shared:]],
                           options=[(letter, ids[shared:], _common_prefix(head, ids) - shared)
                                    for letter, ids in options]))
    return items


def _rows_of(cache, index: torch.Tensor):
    """A cache holding the given rows of `cache`, which stays as it is (DynamicCache: layers replaced, not changed)."""
    import copy

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
            picked = torch.cat([_logprobs(last[owner, None], tail_ids[:, :1]), _logprobs(logits[:, :-1], tail_ids[:, 1:])],
                               dim=1)
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


# ----------------------------------------------------------------------------------------------- one model

def evaluate_model(model, tokenizer, records: list[dict], cfg, desc: str) -> dict:
    """Loss, generation metrics and multiple-choice accuracy of one loaded model on the test records."""
    free = [r for r in records if not r.get("options")]
    choice = [r for r in records if r.get("options")]
    found = score_and_generate(model, tokenizer, records, cfg.batch_size, cfg.max_new_tokens, cfg.max_length, desc)
    scored = [i for i, n in enumerate(found["tokens"]) if n]  # records with answer tokens within --max_length
    result: dict = {"loss": loss_summary([found["nll"][i] for i in scored], [found["tokens"][i] for i in scored],
                                         interval=True, seed=cfg.seed)}
    timing = found["timing"]
    by_id = dict(zip((id(r) for r in records), found["answers"]))
    options_by_id = dict(zip((id(r) for r in records), found["options"]))
    if free:
        summary, items = text_metrics([by_id[id(r)] for r in free], [r["answer"] for r in free])
        summary["rougeL_ci"] = bootstrap_ci([i["rougeL"] for i in items], seed=cfg.seed)
        result["generation"] = summary
    if choice:
        gold = [r["label"] for r in choice]
        loglik = [max(sc, key=sc.get) for sc in (options_by_id[id(r)] for r in choice)]
        parsed = [parse_choice(by_id[id(r)], r["options"]) for r in choice]
        hits_ll = [float(p == g) for p, g in zip(loglik, gold)]
        hits_gen = [float(p == g) for p, g in zip(parsed, gold)]
        result["choice"] = {
            "items": len(choice),
            "accuracy_loglik": round(sum(hits_ll) / len(choice), 4),
            "accuracy_loglik_ci": bootstrap_ci(hits_ll, seed=cfg.seed),
            "macro_f1_loglik": macro_f1(loglik, gold),
            "accuracy_generate": round(sum(hits_gen) / len(choice), 4),
            "accuracy_generate_ci": bootstrap_ci(hits_gen, seed=cfg.seed),
            "macro_f1_generate": macro_f1(parsed, gold),
            "unparseable_rate": round(sum(p is None for p in parsed) / len(choice), 4),
            "hits_loglik": hits_ll,
        }
    result["efficiency"] = dict(timing)
    result["samples"] = [{"question": r["question"], "reference": r["answer"], "answer": by_id[id(r)]}
                         for r in (free or choice)[: cfg.num_samples_shown]]
    return result


# ----------------------------------------------------------------------------------------------- all models

METHOD_FLAGS = (("qlora", "qlora_model"), ("adapter", "adapter_model"), ("ptuning", "ptuning_model"))


def load_test_records(path: str, max_samples: int, seed: int) -> list[dict]:
    from pathlib import Path

    from .data import read_processed
    from .errors import UsageError

    records = read_processed(Path(path), "--test_data")
    if not records:
        raise UsageError(f"--test_data: '{path}' holds no records; prepare the data with a smaller --train_size")
    if 0 < max_samples < len(records):
        records = [records[i] for i in sorted(random.Random(seed).sample(range(len(records)), max_samples))]
    return records


def _one_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0][:300] if text else ''}"


def _efficiency_from_training(path: str) -> tuple[dict, dict | None]:
    import json
    from pathlib import Path

    metrics_file = Path(path) / "metrics.json"
    if not metrics_file.is_file():
        return {}, None
    m = json.loads(metrics_file.read_text(encoding="utf-8"))
    eff = {"trainable_parameters": m.get("trainable_parameters"), "total_parameters": m.get("total_parameters"),
           "size_bytes": m.get("adapter_size_bytes"), "train_runtime_s": m.get("train_runtime_s"),
           "train_tokens_per_s": m.get("tokens_per_s"), "peak_memory_gb": m.get("peak_memory_gb"),
           "memory_kind": m.get("memory_kind")}
    training = {k: m.get(k) for k in ("loss_curve", "eval_curve", "validation_loss_base", "validation_loss_final",
                                      "steps", "device")}
    return eff, training


def _is_lora(model) -> bool:
    config = getattr(model, "peft_config", {}).get("default")
    return hasattr(model, "merge_and_unload") and getattr(getattr(config, "peft_type", None), "value", None) == "LORA"


def _speed_of(model, tokenizer, records, cfg, prefix: str) -> dict:
    timing = score_and_generate(model, tokenizer, records[: min(len(records), cfg.batch_size)], cfg.batch_size,
                                cfg.max_new_tokens, cfg.max_length, f"{prefix} generate", score=False)["timing"]
    return {f"{prefix}_latency_s_per_answer": timing["latency_s_per_answer"],
            f"{prefix}_generated_tokens_per_s": timing["generated_tokens_per_s"]}


def _merge_for_evaluation(model, tokenizer, records, cfg) -> tuple[object, dict]:
    """On the CPU a LoRA model is evaluated merged (its extra small matmuls cost a third of the time there),
    after timing one batch as trained; elsewhere it is evaluated as trained and one batch is timed merged.
    Returns the model to evaluate and the speed of the other form."""
    if not _is_lora(model):
        return model, {}
    if next(model.parameters()).device.type != "cpu":
        return model, {}
    unmerged = _speed_of(model, tokenizer, records, cfg, "unmerged")
    return model.merge_and_unload(), unmerged


def _merged_speed(model, tokenizer, records, cfg) -> dict:
    """Generation speed after folding LoRA into the base (only LoRA can be merged)."""
    return _speed_of(model.merge_and_unload(), tokenizer, records, cfg, "merged") if _is_lora(model) else {}


def run_evaluation(cfg, log=print, failed: dict | None = None, fingerprint: str | None = None) -> dict:
    """Evaluate the base model and every fine-tuned model given on the same test items; write the results."""
    import dataclasses
    import gc
    from pathlib import Path

    from .config import write_json
    from .errors import UsageError
    from .modeling import default_device, load_model, load_tokenizer, model_compute_dtype, resolve_model
    from .precision import explain, resolve, short
    from .training import library_versions, load_trained, read_run, signature_differences

    records = load_test_records(cfg.test_data, cfg.max_samples, cfg.seed)
    targets = [("base", cfg.base_model)] + [(m, getattr(cfg, f)) for m, f in METHOD_FLAGS if getattr(cfg, f)]
    resolved_base = resolve_model(cfg.base_model)
    for name, path in targets[1:]:  # refuse a half-written, foreign or mismatched output before loading a model
        run = read_run(path)
        if run["method"] != name:
            raise UsageError(f"--{name}_model: '{path}' holds the output of {run['method']}, not {name}; pass it "
                             f"as --{run['method']}_model")
        trained_on = run["settings"].get("model_name")
        if cfg.base_model != trained_on and resolved_base != run.get("resolved_model"):
            from transformers import AutoConfig

            differences = signature_differences(run.get("base_signature") or {}, AutoConfig.from_pretrained(
                resolved_base, trust_remote_code=cfg.trust_remote_code))
            if differences:
                raise UsageError(f"--{name}_model: '{path}' was trained on base model '{trained_on}', not on "
                                 f"--base_model '{cfg.base_model}' ({', '.join(differences)}); compare it with "
                                 "its own base")
            log(f"note: {name} was trained on '{trained_on}'; --base_model '{cfg.base_model}' has the same shape")
    n_choice = sum(bool(r.get("options")) for r in records)
    log(f"evaluating {len(targets)} models on {len(records)} test items ({n_choice} multiple choice)")
    log(explain(cfg.dtype, default_device()))
    results = {}
    for name, path in targets:
        entry = {"name": name, "path": path, "status": "ok", "error": None}
        model = None
        try:
            if name == "base":
                tokenizer = load_tokenizer(resolved_base, cfg.trust_remote_code)
                model = load_model(resolved_base, device=default_device(), trust_remote_code=cfg.trust_remote_code,
                                   dtype=resolve(cfg.dtype, default_device()))
                efficiency, training = {}, None
            else:
                model, tokenizer, run = load_trained(path, dequantize=default_device() == "cpu",
                                                     dtype=None if cfg.dtype == "auto" else cfg.dtype)
                if default_device() == "cpu" and run["settings"].get("load_in_4bit"):
                    entry["note"] = (f"4-bit base evaluated as {short(model_compute_dtype(model))} layers holding "
                                     "the same values (CPU speed)")
                efficiency, training = _efficiency_from_training(path)
                entry["settings"] = run["settings"]
            started = time.time()
            model, other_speed = _merge_for_evaluation(model, tokenizer, records, cfg)
            if other_speed:
                entry["note"] = "; ".join(filter(None, [entry.get("note"), "LoRA merged into the base for the CPU "
                                                        "evaluation (weights rounded to the base's dtype)"]))
            entry.update(evaluate_model(model, tokenizer, records, cfg, name))
            entry["efficiency"].update(efficiency)
            if other_speed:  # evaluated merged: the full run's speed is the merged one
                eff = entry["efficiency"]
                eff["merged_latency_s_per_answer"] = eff.pop("latency_s_per_answer")
                eff["merged_generated_tokens_per_s"] = eff.pop("generated_tokens_per_s")
                eff["latency_s_per_answer"] = other_speed["unmerged_latency_s_per_answer"]
                eff["generated_tokens_per_s"] = other_speed["unmerged_generated_tokens_per_s"]
            else:
                entry["efficiency"].update(_merged_speed(model, tokenizer, records, cfg))
            if default_device() == "cuda":
                entry["efficiency"]["eval_peak_memory_gb"] = round(torch.cuda.max_memory_allocated() / 2**30, 3)
            entry["training"] = training
            entry["eval_seconds"] = round(time.time() - started, 1)
            if name != "base":
                _update_card(path, entry)
            log(_summary_line(entry))
        except UsageError as exc:
            entry.update(status="failed", error=str(exc))
            log(f"{name}: failed: {exc}")
        except (RuntimeError, ValueError, OSError) as exc:  # e.g. out of memory: reported, the others go on
            entry.update(status="failed", error=_one_line(exc))
            log(f"{name}: failed: {_one_line(exc)}")
        finally:
            del model
            gc.collect()
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
                torch.cuda.reset_peak_memory_stats()
        results[name] = entry
    for name, error in (failed or {}).items():  # methods whose training failed (run_all)
        results[name] = {"name": name, "path": None, "status": "failed", "error": f"training failed: {error}"}
    _add_significance(results)
    out = {"schema_version": 1, "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "test_data": cfg.test_data,
           "test_items": len(records), "choice_items": n_choice, "settings": dataclasses.asdict(cfg),
           "versions": library_versions(), "fingerprint": fingerprint, "models": results}
    path = Path(cfg.output_file)
    path.parent.mkdir(parents=True, exist_ok=True)
    write_json(path, out)
    return out


def _update_card(path: str, entry: dict) -> None:
    """The model card of an evaluated output gains the evaluation figures."""
    import json
    from pathlib import Path

    from .export import write_model_card
    from .training import CONFIG_FILE, METRICS_FILE

    out = Path(path)
    try:
        run = json.loads((out / CONFIG_FILE).read_text(encoding="utf-8"))
        metrics = json.loads((out / METRICS_FILE).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return
    figures = {k: entry[k] for k in ("loss", "generation") if k in entry}
    if "choice" in entry:
        figures["choice"] = {k: v for k, v in entry["choice"].items() if k != "hits_loglik"}
    try:
        write_model_card(out, run, metrics, evaluation=figures)
    except OSError:  # a read-only output is still evaluated
        pass


def _add_significance(results: dict) -> None:
    """Per method: is its multiple-choice accuracy's gain over the base outside the base's 95% interval,
    and a paired bootstrap interval of the difference."""
    base = results.get("base", {}).get("choice")
    for name, entry in results.items():
        mine = entry.get("choice")
        if name == "base" or not base or not mine:
            continue
        diffs = [a - b for a, b in zip(mine["hits_loglik"], base["hits_loglik"])]
        ci = bootstrap_ci(diffs)
        mine["gain_vs_base"] = round(sum(diffs) / len(diffs), 4)
        mine["gain_vs_base_ci"] = ci
        mine["gain_significant"] = ci[0] > 0 or ci[1] < 0


def _summary_line(entry: dict) -> str:
    parts = [f"{entry['name']}: loss {entry['loss']['loss']:.3f} (ppl {entry['loss']['perplexity']:.2f})"]
    if "generation" in entry:
        parts.append(f"ROUGE-L {entry['generation']['rougeL']:.3f}")
    if "choice" in entry:
        parts.append(f"MC accuracy {entry['choice']['accuracy_loglik']:.3f} (log-lik), "
                     f"{entry['choice']['accuracy_generate']:.3f} (generated)")
    return "; ".join(parts)
