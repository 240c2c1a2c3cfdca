"""Rows of a data file, a folder of files or a hub dataset id, as dicts; every bad file is one clear error.

    read_rows("data/medquad.csv")  ->  ([{"question": "What is glaucoma?", "answer": "...", "focus": "Glaucoma"}, ...],
                                        [Path("data/medquad.csv")])

CSV, TSV, JSON (a list, {"data": [...]} or {"train": [...], "test": [...]}), JSONL and Parquet. Cells are data:
nothing is ever evaluated.
"""

from __future__ import annotations

import csv
import json
import re
import sys
from pathlib import Path

from .errors import UsageError
from .modeling import hub_reachable


SUPPORTED_SUFFIXES = {".csv": "csv", ".tsv": "tsv", ".json": "json", ".jsonl": "jsonl", ".ndjson": "jsonl",
                      ".parquet": "parquet"}


SPLIT_ALIASES = {"train": "train", "training": "train", "validation": "validation", "valid": "validation",
                 "val": "validation", "dev": "validation", "test": "test", "testing": "test"}


def _csv_rows(path: Path, delimiter: str, max_rows: int):
    csv.field_size_limit(sys.maxsize)
    try:
        with open(path, encoding="utf-8-sig", newline="") as fh:
            reader = csv.reader(fh, delimiter=delimiter)
            header = next(reader, None)
            if header is None:
                raise UsageError(f"{path}: the file is empty; expected a header row and data rows")
            header = [h.strip() for h in header]
            dupes = sorted({h for h in header if header.count(h) > 1})
            if dupes:
                raise UsageError(f"{path}: duplicate column names {dupes}; rename them so each column is unique")
            for n, row in enumerate(reader, start=2):
                if max_rows > 0 and n - 1 > max_rows:
                    break
                if not any(cell.strip() for cell in row):
                    continue
                yield {h: (row[i] if i < len(row) else "") for i, h in enumerate(header)}
    except UnicodeDecodeError as exc:
        raise UsageError(f"{path}: not UTF-8 text (byte 0x{exc.object[exc.start]:02x} at offset {exc.start}); "
                         "re-save the file as UTF-8") from exc
    except csv.Error as exc:
        raise UsageError(f"{path}: malformed CSV near line {reader.line_num}: {exc}") from exc


def _json_rows(path: Path, max_rows: int):
    try:
        text = path.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError as exc:
        raise UsageError(f"{path}: not UTF-8 text (byte 0x{exc.object[exc.start]:02x} at offset {exc.start}); "
                         "re-save the file as UTF-8") from exc
    if not text.strip():
        raise UsageError(f"{path}: the file is empty; expected a JSON list of records")
    try:
        data = json.loads(text)
    except RecursionError:
        raise UsageError(f"{path}: JSON nested too deeply to read (thousands of levels); records are objects of "
                         "named fields") from None
    except json.JSONDecodeError as exc:
        if text.lstrip().startswith("{") and exc.msg == "Extra data":
            return _jsonl_rows(path, max_rows)  # JSON Lines saved with a .json suffix
        raise UsageError(f"{path}: invalid JSON at line {exc.lineno}, column {exc.colno}: {exc.msg}") from exc
    if isinstance(data, dict):
        split_lists = {k: v for k, v in data.items() if k.lower() in SPLIT_ALIASES and isinstance(v, list)}
        if split_lists:
            data = [dict(r, split=SPLIT_ALIASES[k.lower()]) if isinstance(r, dict) else r
                    for k, v in split_lists.items() for r in v]
        elif isinstance(data.get("data"), list):
            data = data["data"]
        else:
            data = [data]
    if not isinstance(data, list):
        raise UsageError(f"{path}: expected a JSON list of records (objects), got {type(data).__name__}")
    rows = []
    for i, rec in enumerate(data[:max_rows] if max_rows > 0 else data):
        if not isinstance(rec, dict):
            raise UsageError(f"{path}: record {i} is {type(rec).__name__}, expected an object with named fields")
        rows.append(rec)
    return rows


def _jsonl_rows(path: Path, max_rows: int):
    rows = []
    try:
        with open(path, encoding="utf-8-sig") as fh:
            for n, line in enumerate(fh, start=1):
                if not line.strip():
                    continue
                try:
                    rec = json.loads(line)
                except RecursionError:
                    raise UsageError(f"{path}: line {n} is JSON nested too deeply to read (thousands of levels); "
                                     "fix or delete that line") from None
                except json.JSONDecodeError as exc:
                    raise UsageError(f"{path}: line {n} is not valid JSON ({exc.msg} at column {exc.colno}); "
                                     "fix or delete that line") from exc
                if not isinstance(rec, dict):
                    raise UsageError(f"{path}: line {n} is {type(rec).__name__}, expected a JSON object")
                rows.append(rec)
                if max_rows > 0 and len(rows) >= max_rows:
                    break
    except UnicodeDecodeError as exc:
        raise UsageError(f"{path}: not UTF-8 text (byte 0x{exc.object[exc.start]:02x} at offset {exc.start}); "
                         "re-save the file as UTF-8") from exc
    return rows


def _parquet_rows(path: Path, max_rows: int):
    import pyarrow.parquet as pq

    try:
        table = pq.read_table(path)
    except Exception as exc:  # pyarrow raises several unrelated types for a bad file
        raise UsageError(f"{path}: not a readable Parquet file: {str(exc).splitlines()[0]}") from exc
    if max_rows > 0:
        table = table.slice(0, max_rows)
    return table.to_pylist()


def _hub_rows(name: str, max_rows: int):
    if not hub_reachable():
        raise UsageError(f"--input_data: '{name}' is not a file or folder, and the hub cannot be reached to load it "
                         "as a dataset id; give a local CSV/JSON/JSONL/Parquet file")
    import datasets

    try:
        ds = datasets.load_dataset(name)
    except Exception as exc:
        raise UsageError(f"--input_data: could not load hub dataset '{name}': {str(exc).splitlines()[0]}") from exc
    rows = []
    for split_name, part in ds.items():
        split = SPLIT_ALIASES.get(split_name.lower())
        for rec in part:
            rows.append(dict(rec, split=split) if split else dict(rec))
            if 0 < max_rows <= len(rows):
                return rows
    return rows


def read_rows(input_data: str, max_rows: int = -1) -> tuple[list[dict], list[Path]]:
    """All records of a file, a folder of files, or a hub dataset id, as a list of dicts."""
    path = Path(input_data).expanduser()
    if path.is_dir():
        files = sorted(p for p in path.rglob("*") if p.is_file() and p.suffix.lower() in SUPPORTED_SUFFIXES)
        if not files:
            raise UsageError(f"--input_data: folder '{input_data}' holds no {'/'.join(SUPPORTED_SUFFIXES)} files")
    elif path.is_file():
        files = [path]
    elif re.fullmatch(r"[\w.-]+/[\w.-]+", input_data) and not path.suffix:
        return _hub_rows(input_data, max_rows), []
    else:
        raise UsageError(f"--input_data: '{input_data}' does not exist; give a data file, a folder, "
                         "or a hub dataset id (owner/name)")
    rows = []
    for f in files:
        kind = SUPPORTED_SUFFIXES.get(f.suffix.lower())
        if kind is None:
            raise UsageError(f"--input_data: unknown format '{f.suffix}' of '{f}'; "
                             f"supported: {', '.join(SUPPORTED_SUFFIXES)}")
        if f.stat().st_size == 0:
            raise UsageError(f"{f}: the file is empty")
        left = max_rows - len(rows) if max_rows > 0 else -1
        reader = {"csv": lambda p, m: _csv_rows(p, ",", m), "tsv": lambda p, m: _csv_rows(p, "\t", m),
                  "json": _json_rows, "jsonl": _jsonl_rows, "parquet": _parquet_rows}[kind]
        rows.extend(reader(f, left))
        if 0 < max_rows <= len(rows):
            break
    return rows, files
