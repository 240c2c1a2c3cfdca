"""Prepare a dataset: read, convert, screen, de-duplicate, split, measure and write it; read a prepared one back.

    prepare(PrepareConfig(input_data="data.csv", output_dir="processed_data", model_name="smollm2-135m"))
        -> processed_data/{train,validation,test}.json + metadata.json

Records are described in medpeft/records.py; reading input files in medpeft/readers.py; tokens in medpeft/tokens.py.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import tempfile
import time
from collections import Counter
from pathlib import Path

from . import __version__, phi
from .errors import UsageError
from .modeling import load_tokenizer, resolve_model
from .outputs import publish_dir
from .readers import SPLIT_ALIASES, read_rows
from .records import SPLITS, cell_text, detect_schema, normalise, shorten_context, split_records, to_record
from .tokens import length_stats, show_tokens, tokenize_records


# ----------------------------------------------------------------------------------------------- prepare

def _file_hash(files: list[Path]) -> str | None:
    if not files:
        return None
    h = hashlib.sha256()
    for f in files:
        with open(f, "rb") as fh:
            for block in iter(lambda: fh.read(1 << 20), b""):
                h.update(block)
    return h.hexdigest()


def _screen_phi(rows: list[dict], mode: str, log) -> dict | None:
    """--phi: count likely patient identifiers per column (warn), or replace them in the rows (redact)."""
    if mode == "off":
        return None
    columns = list(dict.fromkeys(k for r in rows[:1000] for k in r if k != "split"))
    found = phi.screen_rows(rows, columns, mode)
    if not found:
        log(f"patient data screen (--phi {mode}): no likely identifiers (e-mail, phone, SSN, record number, "
            "date of birth, date, street address)")
    elif mode == "redact":
        log(f"patient data screen (--phi redact): replaced {phi.summary(found)}")
    else:
        log(f"patient data screen (--phi warn): likely identifiers in {phi.summary(found)}; check the data has "
            "consent or is de-identified, or pass --phi redact to replace them with placeholders")
    return found


def smallest_sizes(train_size: float, validation_share: float, limit: int = 10_000) -> int | None:
    """The fewest rows (question groups) that split_records turns into non-empty train, validation and test."""
    for n in range(3, limit):
        train = max(1, round(n * train_size))
        validation = round((n - train) * validation_share)
        if validation >= 1 and n - train - validation >= 1:
            return n
    return None


def _check_splits(splits: dict, cfg, rows_read: int, usable: int, log) -> None:
    """An empty validation or test split stops here, saying what the settings would need; --allow_empty_splits
    (training data only) turns that into a warning. An empty training split always stops."""
    counted = f"{usable} usable row{'s' if usable != 1 else ''} of {rows_read} read"
    if not splits["train"]:
        raise UsageError(f"the train split is empty ({counted}); add data, raise --train_size, or mark rows with "
                         "split=train")
    empty = [name for name in ("validation", "test") if not splits[name]]
    if not empty:
        return
    fewest = smallest_sizes(cfg.train_size, cfg.validation_share)
    what = " and ".join(f"the {name} split" for name in empty)
    need = (f"--train_size {cfg.train_size} with --validation_share {cfg.validation_share} needs at least {fewest} "
            "rows with different questions" if fewest else
            f"--train_size {cfg.train_size} with --validation_share {cfg.validation_share} leaves nothing for it")
    if cfg.allow_empty_splits:
        log(f"warning: {what} {'are' if len(empty) > 1 else 'is'} empty ({counted}; {need}): prepared for "
            "training only, as --allow_empty_splits asks; training needs a validation split")
        return
    raise UsageError(f"{what} would be empty: {counted}, and {need}; add data, "
                     "lower --train_size or change --validation_share, give rows a split column "
                     "(train/validation/test), or pass --allow_empty_splits to prepare training data only")


ELLIPSIS = " […] "


def _cut(tokenizer, ids: list[int], keep: int, how: str) -> str:
    """`keep` of a context's tokens as text: its start (end) or its start and end (middle), marked where cut."""
    def text(part):
        return tokenizer.decode(part, skip_special_tokens=True).strip("\ufffd")  # no half character at a cut

    if keep <= 0:
        return ELLIPSIS.strip()
    if how == "end":
        return text(ids[:keep]).rstrip() + ELLIPSIS.rstrip()
    head = (keep + 1) // 2
    return text(ids[:head]).rstrip() + ELLIPSIS + text(ids[len(ids) - (keep - head):]).lstrip()


def fit_context(rec: dict, tok: dict, tokenizer, max_length: int, how: str) -> tuple[dict, dict]:
    """A record too long for max_length with its context shortened until prompt and whole answer fit (or the
    context is gone): (record, its tokens). Question, options and answer are never cut here."""
    ids = tokenizer(rec["context"], add_special_tokens=False)["input_ids"]
    keep = len(ids) - (tok["n_tokens"] - max_length) - len(tokenizer(ELLIPSIS, add_special_tokens=False)["input_ids"])
    for _ in range(20):  # decoding and re-tokenising a cut moves a few tokens: shrink by the overshoot
        keep = max(keep, 0)
        fitted = shorten_context(rec, _cut(tokenizer, ids, keep, how))
        fitted_tok = tokenize_records(tokenizer, [fitted], max_length)[0]
        over = fitted_tok["n_tokens"] - max_length
        if over <= 0 or keep == 0:
            return fitted | {"context_kept": f"{keep} of {len(ids)} tokens"}, fitted_tok
        keep -= over
    return fitted, fitted_tok


def prepare(cfg, log=print, fingerprint: str | None = None) -> dict:
    """Read, convert, de-duplicate, split, measure and write a processed dataset. Returns the metadata."""
    t0 = time.time()
    rows, files = read_rows(cfg.input_data, cfg.max_rows)
    if not rows:
        raise UsageError(f"--input_data: '{cfg.input_data}' holds no data rows")
    if cfg.group_by and not any(cfg.group_by in r for r in rows[:1000]):
        raise UsageError(f"--group_by: column '{cfg.group_by}' not found; columns are: {', '.join(rows[0])}")
    schema = detect_schema(rows, cfg)
    log(f"read {len(rows)} rows from {cfg.input_data}; schema: {schema.kind} {schema.describe()}")
    phi_found = _screen_phi(rows, cfg.phi, log)

    dropped: Counter = Counter()
    given: Counter = Counter()  # rows of each split the input defines
    lost: dict[str, Counter] = {s: Counter() for s in SPLITS}  # ... and why some of them were not kept
    records, seen = [], set()
    used = {c for v in schema.describe().values() for c in (v if isinstance(v, list) else [v])} | {"split"}
    for i, row in enumerate(rows):
        split = row.get("split")
        split = SPLIT_ALIASES.get(str(split).strip().lower()) if split not in (None, "") else None
        given[split] += 1
        rec, reason = to_record(row, schema, cfg.system_prompt)
        if rec is None:
            dropped[reason] += 1
            lost.get(split, Counter())[reason] += 1
            continue
        key = (normalise(rec["question"]), normalise(rec["answer"]), rec["options"] and json.dumps(rec["options"]),
               normalise(rec.get("context") or ""))  # one question about two passages is two items
        if key in seen and split != "test":  # a benchmark's test items are all scored, repeats included
            dropped["duplicate of an earlier row"] += 1
            lost.get(split, Counter())["duplicate of an earlier row"] += 1
            continue
        seen.add(key)
        rec["split"] = split
        rec["group"] = (cell_text(row.get(cfg.group_by)) or None) if cfg.group_by else None  # empty: no group
        rec["id"] = f"row-{i:06d}"
        extra = {k: v for k, v in row.items() if k not in used and k != cfg.group_by
                 and isinstance(v, (str, int, float, bool)) and len(str(v)) <= 200}
        if extra:
            rec["meta"] = extra
        records.append(rec)
    if not records:
        reasons = ", ".join(f"{n} {r}" for r, n in dropped.most_common())
        raise UsageError(f"--input_data: no usable rows in '{cfg.input_data}' ({reasons})")

    tokenizer = load_tokenizer(resolve_model(cfg.model_name), cfg.trust_remote_code)
    tokens = tokenize_records(tokenizer, records, cfg.max_length)
    kept, too_long = [], f"prompt alone reaches --max_length {cfg.max_length}"
    for rec, tok in zip(records, tokens):
        if tok["truncated"] and rec.get("context") and cfg.shorten_context != "off":
            rec, tok = fit_context(rec, tok, tokenizer, cfg.max_length, cfg.shorten_context)
        if not any(lab != -100 for lab in tok["labels"]):
            dropped[too_long + (" with its context shortened away" if rec.get("context_kept") else "")] += 1
            lost.get(rec["split"], Counter())[too_long] += 1
            continue
        rec["_tok"] = tok
        kept.append(rec)
    if not kept:
        raise UsageError(f"every prompt is longer than --max_length {cfg.max_length}; raise --max_length")
    shortened = sum("context_kept" in r for r in kept)
    if shortened:
        log(f"shortened the context of {shortened} rows to fit --max_length {cfg.max_length} "
            f"(--shorten_context {cfg.shorten_context}; question, options and answer kept whole)")
    splits = split_records(kept, cfg.train_size, cfg.validation_share, cfg.seed)
    _check_splits(splits, cfg, len(rows), len(kept), log)
    items = {s: {"given": given[s], "kept": sum(r["split"] == s for r in kept), "dropped_by_reason": dict(lost[s])}
             for s in SPLITS if given[s]}
    for s, n in items.items():
        log(f"{s}: {n['kept']} of {n['given']} items the input puts in {s} kept" + (
            "" if n["kept"] == n["given"] else f" (not kept: {', '.join(f'{c} {r}' for r, c in lost[s].items())})"))

    n_tokens = [r["_tok"]["n_tokens"] for r in kept]
    metadata = {
        "medpeft_version": __version__, "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "input_data": str(cfg.input_data), "input_files": [str(f) for f in files], "input_sha256": _file_hash(files),
        "schema": schema.kind, "columns": schema.describe(), "group_by": cfg.group_by,
        "model_name": cfg.model_name, "max_length": cfg.max_length, "system_prompt": cfg.system_prompt,
        "split": {"train_size": cfg.train_size, "validation_share": cfg.validation_share, "seed": cfg.seed,
                  "predefined_rows": sum(r["split"] is not None for r in kept)},
        "rows": {"read": len(rows), "kept": len(kept), "dropped": sum(dropped.values()),
                 "dropped_by_reason": dict(dropped.most_common())},
        "counts": {s: len(v) for s, v in splits.items()},
        "predefined_items": items,  # per split the input defines: its rows, those kept, why the others were not
        "contexts_shortened": {"how": cfg.shorten_context,
                               **{s: sum("context_kept" in r for r in v) for s, v in splits.items()}},
        "tokens": {"total": length_stats(n_tokens),
                   "answer": length_stats([sum(lab != -100 for lab in r["_tok"]["labels"]) for r in kept]),
                   "truncated": sum(r["_tok"]["truncated"] for r in kept),
                   "padding_efficiency_at_max_length": round(
                       sum(min(n, cfg.max_length) for n in n_tokens) / (len(n_tokens) * cfg.max_length), 3)},
        "phi": {"mode": cfg.phi, "found": phi_found}, "seconds": None, "fingerprint": fingerprint,
    }
    out = Path(cfg.output_dir)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        for name, recs in splits.items():
            clean = [{k: v for k, v in r.items() if not k.startswith("_") and k != "split"} for r in recs]
            (tmp / f"{name}.json").write_text(json.dumps(clean, ensure_ascii=False, indent=1), encoding="utf-8")
        metadata["seconds"] = round(time.time() - t0, 1)
        (tmp / "metadata.json").write_text(json.dumps(metadata, indent=2, ensure_ascii=False), encoding="utf-8")
        publish_dir(tmp, out, "metadata.json")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    for rec in kept[: cfg.debug]:
        show_tokens(tokenizer, rec["_tok"])
    return metadata


def read_processed(path: Path, flag: str) -> list[dict]:
    """A split file written by prepare(): a JSON list of records with messages and answer."""
    if not path.is_file():
        raise UsageError(f"{flag}: '{path}' does not exist; run utils/prepare_dataset.py first")
    try:
        records = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise UsageError(f"{flag}: '{path}' is not valid JSON ({exc}); re-run utils/prepare_dataset.py") from exc
    if not isinstance(records, list) or any(
            not isinstance(r, dict) or "messages" not in r or "answer" not in r for r in records):
        raise UsageError(f"{flag}: '{path}' is not a list of processed records (with messages and answer); "
                         "use a file written by utils/prepare_dataset.py")
    return records


def read_metadata(data_path: str) -> dict:
    """metadata.json of a processed dataset."""
    path = Path(data_path) / "metadata.json"
    if not path.is_file():
        raise UsageError(f"--data_path: '{data_path}' is not a processed dataset (no metadata.json); "
                         "run utils/prepare_dataset.py first")
    return json.loads(path.read_text(encoding="utf-8"))


def load_split(data_path: str, split: str) -> list[dict]:
    if not (Path(data_path) / "metadata.json").is_file():
        raise UsageError(f"--data_path: '{data_path}' is not a processed dataset (no metadata.json); "
                         "run utils/prepare_dataset.py first")
    return read_processed(Path(data_path) / f"{split}.json", "--data_path")


