"""Scores of answers against references, with no model involved: text overlap, choice parsing, intervals.

    text_metrics(["Metformin."], ["Metformin, first line."])  -> ({"rouge1": ..., "bleu": ..., "items": 1}, [...])
    parse_choice("The answer is (B)", {"A": "Iron", "B": "Vitamin C"}) -> "B"
"""

from __future__ import annotations

import random
import re
import string
from collections import Counter


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
