"""What a model's picks among fixed labels say, with no model involved: accuracy beside macro-F1, the predicted
labels' distribution, a confusion matrix, the majority-class baseline, collapse, paired bootstrap intervals.

    picks(["A", "A", "B"], ["A", "B", "B"], labels=["A", "B"])
        -> {"accuracy": 0.667, "macro_f1": 0.667, "predicted": {"A": 2, "B": 1}, "confusion": {...}, ...}
"""

from __future__ import annotations

from collections import Counter

from .metrics import bootstrap_ci, macro_f1

COLLAPSE_SHARE = 0.9  # a model giving one label to more than this share of the items has collapsed onto it


def picks(predicted: list[str | None], gold: list[str], labels: list[str]) -> dict:
    """Accuracy and macro-F1 side by side, how often each label was predicted, and gold x predicted counts."""
    n = len(gold)
    counts = Counter(predicted)
    top, top_n = counts.most_common(1)[0] if counts else (None, 0)
    return {
        "items": n,
        "accuracy": round(sum(p == g for p, g in zip(predicted, gold)) / n, 4) if n else None,
        "macro_f1": macro_f1(predicted, gold),
        "predicted": {label: counts.get(label, 0) for label in labels} | (
            {"none": counts[None]} if counts.get(None) else {}),
        "confusion": {g: {p: sum(a == g and b == p for a, b in zip(gold, predicted)) for p in labels}
                      for g in labels},  # rows: the right label; columns: the one the model picked
        "collapsed": top if n and top_n / n > COLLAPSE_SHARE else None,
        "collapsed_share": round(top_n / n, 4) if n else None,
    }


def majority(prior_labels: list[str], gold: list[str], labels: list[str], source: str) -> dict:
    """The baseline a skeptic asks for first: always answering the label most frequent in `prior_labels`
    (the training split's, so the test labels are not peeked at), scored on the test items."""
    prior = Counter(prior_labels)
    label = max(labels, key=lambda lab: (prior.get(lab, 0), -labels.index(lab)))
    hits = [float(g == label) for g in gold]
    return {"label": label, "source": source,
            "prior": {lab: round(prior.get(lab, 0) / max(len(prior_labels), 1), 4) for lab in labels},
            "test_prior": {lab: round(gold.count(lab) / max(len(gold), 1), 4) for lab in labels},
            "accuracy": round(sum(hits) / max(len(hits), 1), 4), "accuracy_ci": bootstrap_ci(hits),
            "macro_f1": macro_f1([label] * len(gold), gold), "hits": hits}


def paired(mine: list[float], other: list[float], resamples: int = 1000, seed: int = 0) -> dict:
    """Paired bootstrap of the mean difference on the same items: its interval, and whether 0 is outside it."""
    diffs = [a - b for a, b in zip(mine, other)]
    ci = bootstrap_ci(diffs, resamples=resamples, seed=seed)
    return {"gain": round(sum(diffs) / max(len(diffs), 1), 4), "ci": ci, "significant": ci[0] > 0 or ci[1] < 0}


def paired_sets(mine: dict[str, float], other: dict[str, float], resamples: int = 1000, seed: int = 0) -> dict:
    """`paired` over the items two runs share, matched by item id; says how many that was."""
    shared = sorted(set(mine) & set(other), key=str)
    result = paired([mine[k] for k in shared], [other[k] for k in shared], resamples, seed)
    return result | {"items": len(shared)}

