"""Likely patient identifiers in text: find, count per column, or replace with typed placeholders.

    prepare_dataset.py ... --phi warn     # default: count what looks like identifiers, per column, and say so
    prepare_dataset.py ... --phi redact   # replace them with [EMAIL], [PHONE], [SSN], [RECORD_ID], [DOB], [DATE], [ADDRESS]
    prepare_dataset.py ... --phi off

Phone numbers come from Google's libphonenumber rules (the `phonenumbers` package, offline); the other types are
patterns written for clinical text. This is a screen, not a guarantee: names and free-text locations are not
found (that needs a trained NER model, which cannot be fetched offline). Precision and recall on a labelled set:
`python benchmarks/phi_eval.py` (docs in README, "Patient data").
"""

from __future__ import annotations

import re
from collections import Counter

TYPES = ("EMAIL", "PHONE", "SSN", "RECORD_ID", "DOB", "DATE", "ADDRESS")

_MONTH = (r"(?:Jan(?:uary)?|Feb(?:ruary)?|Mar(?:ch)?|Apr(?:il)?|May|June?|July?|Aug(?:ust)?|Sep(?:t(?:ember)?)?|"
          r"Oct(?:ober)?|Nov(?:ember)?|Dec(?:ember)?)\.?")
_FULL_DATE = (rf"(?:\d{{1,2}}[/.-]\d{{1,2}}[/.-](?:19|20)\d{{2}}|(?:19|20)\d{{2}}-\d{{2}}-\d{{2}}|"
              rf"{_MONTH}\s+\d{{1,2}}(?:st|nd|rd|th)?,?\s+(?:19|20)\d{{2}}|\d{{1,2}}\s+{_MONTH}\s+(?:19|20)\d{{2}})")
_STREET = (r"(?:Street|St|Avenue|Ave|Road|Rd|Boulevard|Blvd|Lane|Ln|Drive|Dr|Court|Ct|Way|Place|Pl|Terrace|Ter|"
           r"Circle|Cir|Parkway|Pkwy|Highway|Hwy)\.?")

# Order matters: earlier types claim their text first (a DOB is not also reported as a DATE).
PATTERNS = [
    ("EMAIL", re.compile(r"\b[A-Za-z0-9._%+-]+@[A-Za-z0-9.-]+\.[A-Za-z]{2,}\b")),
    ("SSN", re.compile(r"\b(?!000|666|9\d\d)\d{3}-(?!00)\d{2}-(?!0000)\d{4}\b")),
    ("SSN", re.compile(r"\b(?:SSN|social security(?: number| no\.?)?)\s*(?:is\s*)?[:#]?\s*(\d{3}[ .]?\d{2}[ .]?\d{4})\b",
                       re.IGNORECASE)),
    ("RECORD_ID", re.compile(r"\b(?:MRN|medical record(?: number| no\.?| #)?|record (?:number|no\.?|#)|"
                             r"patient (?:ID|number|no\.?)|chart (?:number|no\.?|#))\s*(?:is\s*)?[:#]?\s*"
                             r"([A-Z]{0,3}-?\d[\d-]{4,})\b", re.IGNORECASE)),
    ("DOB", re.compile(rf"\b(?:DOB|D\.O\.B\.|date of birth|birth ?date|born(?: on)?)\s*(?:is\s*)?[:\-]?\s*"
                       rf"({_FULL_DATE}|\d{{1,2}}[/.-]\d{{1,2}}[/.-]\d{{2}})\b", re.IGNORECASE)),
    ("DATE", re.compile(rf"\b{_FULL_DATE}\b", re.IGNORECASE)),
    ("ADDRESS", re.compile(rf"\b\d{{1,6}}\s+(?:[NSEW]\.?\s+)?(?:[A-Z][a-z]+\s+){{1,3}}{_STREET}"
                           rf"(?:\s*(?:,\s*)?(?:Apt|Suite|Unit|#)\.?\s*\w+)?\b")),
]


# Phone-shaped in North American form, whether or not the number is assigned (libphonenumber's VALID test rejects
# unassigned exchanges such as 555-201-7789, and a missed identifier costs far more than a false alarm): an
# optional +1, a 3-digit area code (bracketed or followed by a separator), 3 digits, a separator, 4 digits, an
# optional extension. Clinical values do not take this shape (doses and lab values carry units or decimals, ranges
# and dates have other group sizes); ten digits in a row count only after a word that says phone.
_EXTENSION = r"(?:\s*(?:x|ext\.?|extension)\s*\d{1,6})?"
_UNIT = r"(?:(?:mg|mcg|µg|ug|g|kg|ml|l|iu|units?|mmol|mol|meq|cells|copies|cpm|bpm|mmhg)\b|%)"  # a measured value
PHONE_SHAPED = re.compile(r"(?i)(?<![\w/.-])(?:\+?1[\s.-]?)?(?:\(\d{3}\)\s?|\d{3}[\s.-])\d{3}[\s.-]\d{4}"
                          + _EXTENSION + r"(?![\w/]|[.-]\d)(?!\s*" + _UNIT + r")")
PHONE_DIGITS = re.compile(r"\b(?:phone|tel|telephone|call|cell|mobile|fax|contact|reach(?:ed)?(?: at)?|number)"
                          r"\W{0,3}(?:\w+\W{1,3}){0,2}?(\+?1?\d{10})" + _EXTENSION + r"\b", re.IGNORECASE)


def _phones(text: str, taken: list[tuple[int, int]]) -> list[tuple[int, int, str]]:
    """Phone numbers libphonenumber finds (any country it can parse), and phone-shaped ones it rejects."""
    if sum(c.isdigit() for c in text) < 7:
        return []
    import phonenumbers

    spans = [(m.start, m.end) for m in phonenumbers.PhoneNumberMatcher(text, "US", leniency=phonenumbers.Leniency.VALID)]
    spans += [m.span() for m in PHONE_SHAPED.finditer(text)]
    spans += [(m.start(1), m.end()) for m in PHONE_DIGITS.finditer(text)]
    found: list[tuple[int, int, str]] = []
    for start, end in sorted(spans, key=lambda s: (s[0], -s[1])):  # the longest of spans that start together
        if not any(a < end and start < b for a, b in taken) and not any(a < end and start < b for a, b, _ in found):
            found.append((start, end, "PHONE"))
    return found


def find(text: str) -> list[tuple[int, int, str]]:
    """(start, end, type) of every likely identifier, non-overlapping, in order."""
    spans: list[tuple[int, int, str]] = []
    for kind, pattern in PATTERNS:
        for m in pattern.finditer(text):
            start, end = m.span(1) if m.groups() else m.span()
            if not any(a < end and start < b for a, b, _ in spans):
                spans.append((start, end, kind))
    spans += _phones(text, [(a, b) for a, b, _ in spans])
    return sorted(spans)


def redact(text: str) -> tuple[str, list[str]]:
    """The text with each identifier replaced by its [TYPE], and the types replaced."""
    spans = find(text)
    out, last = [], 0
    for start, end, kind in spans:
        out += [text[last:start], f"[{kind}]"]
        last = end
    return "".join(out) + text[last:], [k for _, _, k in spans]


def _walk(value, mode: str, counts: Counter):
    """Strings inside a cell (also inside lists and dicts: options, conversations), counted or redacted."""
    if isinstance(value, str):
        if mode == "redact":
            value, kinds = redact(value)
        else:
            kinds = [k for _, _, k in find(value)]
        counts.update(kinds)
        return value
    if isinstance(value, list):
        return [_walk(v, mode, counts) for v in value]
    if isinstance(value, dict):
        return {k: _walk(v, mode, counts) for k, v in value.items()}
    return value


def screen_rows(rows: list[dict], columns: list[str], mode: str) -> dict[str, dict[str, int]]:
    """Count (mode 'warn') or redact in place (mode 'redact') likely identifiers in the given columns of every
    row. Returns {column: {type: count}} for the columns where any were found."""
    per_column: dict[str, Counter] = {c: Counter() for c in columns}
    for row in rows:
        for column in columns:
            if column in row:
                new = _walk(row[column], mode, per_column[column])
                if mode == "redact":
                    row[column] = new
    return {c: dict(sorted(n.items())) for c, n in per_column.items() if n}


def summary(found: dict[str, dict[str, int]]) -> str:
    return "; ".join(f"{column}: " + ", ".join(f"{n} {kind}" for kind, n in kinds.items())
                     for column, kinds in found.items())


def score_labelled(rows: list[dict]) -> dict:
    """Precision and recall of `find` on rows {"text", "entities": [{"type", "text"}]}: a found span counts
    when it overlaps a labelled one of the same type."""
    tp, fp, fn = Counter(), Counter(), Counter()
    misses, false_alarms = [], []
    for row in rows:
        text, gold, cursor = row["text"], [], 0
        for e in row["entities"]:
            start = text.index(e["text"], cursor)
            gold.append((start, start + len(e["text"]), e["type"]))
            cursor = start + 1
        found = find(text)
        matched = set()
        for a, b, kind in found:
            hit = next((g for g in gold if g[2] == kind and g[0] < b and a < g[1] and g not in matched), None)
            if hit:
                matched.add(hit)
                tp[kind] += 1
            else:
                fp[kind] += 1
                false_alarms.append(f"{kind}: {text[a:b]!r} in {text!r}")
        for g in gold:
            if g not in matched:
                fn[g[2]] += 1
                misses.append(f"{g[2]}: {text[g[0]:g[1]]!r} in {text!r}")

    def pr(t, p, n):
        return {"precision": round(t / (t + p), 3) if t + p else None,
                "recall": round(t / (t + n), 3) if t + n else None, "true_pos": t, "false_pos": p, "false_neg": n}

    per_type = {k: pr(tp[k], fp[k], fn[k]) for k in TYPES if tp[k] + fp[k] + fn[k]}
    overall = pr(sum(tp.values()), sum(fp.values()), sum(fn.values()))
    return {"texts": len(rows), "entities": sum(len(r["entities"]) for r in rows), "overall": overall,
            "per_type": per_type, "misses": misses, "false_alarms": false_alarms}
