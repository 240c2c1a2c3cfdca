"""Medical records -> chat messages -> tokens with answer-only labels; leakage-free splits; statistics.

One processed record (a line of train.json / validation.json / test.json):

    {"id": "medquad-00017",
     "messages": [{"role": "system", "content": "You are a careful medical assistant..."},
                  {"role": "user", "content": "What are the symptoms of Glaucoma ?"},
                  {"role": "assistant", "content": "Open-angle glaucoma starts without symptoms..."}],
     "question": "What are the symptoms of Glaucoma ?", "answer": "Open-angle glaucoma starts...",
     "group": "Glaucoma", "options": null, "label": null}

Multiple-choice records also carry "options" ({"A": "...", ...}) and "label" ("B").
"""

from __future__ import annotations

import csv
import hashlib
import json
import os
import random
import re
import shutil
import statistics
import sys
import tempfile
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

from .errors import UsageError

SPLITS = ("train", "validation", "test")
SUPPORTED_SUFFIXES = {".csv": "csv", ".tsv": "tsv", ".json": "json", ".jsonl": "jsonl", ".ndjson": "jsonl",
                      ".parquet": "parquet"}
SPLIT_ALIASES = {"train": "train", "training": "train", "validation": "validation", "valid": "validation",
                 "val": "validation", "dev": "validation", "test": "test", "testing": "test"}
LETTERS = "ABCDEFGHIJ"
MC_INSTRUCTION = "Answer with the correct option."
YES_NO_MAYBE = ("yes", "no", "maybe")  # PubMedQA-style labels: the options when a row has none

# Column names recognised by auto-detection, most specific first.
QUESTION_COLUMNS = ("question", "query", "q", "prompt", "instruction", "input_text", "patient")
ANSWER_COLUMNS = ("answer", "response", "output", "completion", "a", "long_answer", "doctor", "target")
OPTIONS_COLUMNS = ("options", "choices")
LABEL_COLUMNS = ("answer_idx", "answer_letter", "label", "cop", "correct", "final_decision", "answer")
CONTEXT_COLUMNS = ("context", "contexts", "input", "passage", "abstract")
MESSAGES_COLUMNS = ("messages", "conversations", "conversation")


# ----------------------------------------------------------------------------------------------- reading

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
    from .modeling import _hub_endpoint_reachable

    if not _hub_endpoint_reachable():
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


# ----------------------------------------------------------------------------------------------- schemas

@dataclass
class Schema:
    kind: str  # qa | instruction | prompt_response | messages | multiple_choice
    question: str | None = None
    answer: str | None = None
    context: str | None = None
    options: str | list[str] | None = None  # one column, or one column per option
    label: str | None = None  # multiple choice: the column naming the right option (letter, index or text)
    messages: str | None = None

    def describe(self) -> dict:
        return {k: v for k, v in self.__dict__.items() if v is not None}


def _all_yes_no_maybe(rows: list[dict], column: str) -> bool:
    values = {_text(r.get(column)).lower() for r in rows[:1000]} - {""}
    return bool(values) and values <= set(YES_NO_MAYBE)


def _find(columns: dict[str, str], candidates, exclude=()) -> str | None:
    for c in candidates:
        if c in columns and columns[c] not in exclude:
            return columns[c]
    return None


def detect_schema(rows: list[dict], cfg) -> Schema:
    names = []
    for r in rows[:1000]:
        names.extend(k for k in r if k not in names)
    cols = {n.lower().strip(): n for n in names}
    forced = cfg.schema

    def need(name, flag):
        if name is not None and name not in names:
            raise UsageError(f"{flag}: column '{name}' not found; columns are: {', '.join(map(str, names))}")
        return name

    need(cfg.question_column, "--question_column")
    need(cfg.answer_column, "--answer_column")
    need(cfg.context_column, "--context_column")
    need(cfg.options_column, "--options_column")

    messages = _find(cols, MESSAGES_COLUMNS)
    if forced == "messages" or (forced == "auto" and messages and not cfg.question_column):
        if not messages:
            raise UsageError(f"--schema messages: no 'messages' column; columns are: {', '.join(names)}")
        return Schema("messages", messages=messages)

    letter_cols = [cols[c] for c in ("a", "b", "c", "d", "e") if c in cols]
    op_cols = [cols[c] for c in ("opa", "opb", "opc", "opd", "ope") if c in cols]
    options = cfg.options_column or _find(cols, OPTIONS_COLUMNS) or (
        letter_cols if len(letter_cols) >= 2 else None) or (op_cols if len(op_cols) >= 2 else None)
    if forced == "multiple_choice" or (forced == "auto" and options):
        question = cfg.question_column or _find(cols, QUESTION_COLUMNS)
        taken = [question] + (options if isinstance(options, list) else [options])
        label = cfg.answer_column or _find(cols, LABEL_COLUMNS, exclude=taken)
        answer = cfg.answer_column or _find(cols, ANSWER_COLUMNS, exclude=taken)
        missing = [n for n, v in (("options", options), ("question", question), ("answer", label)) if not v]
        if missing:
            raise UsageError(f"multiple-choice data needs {', '.join(missing)} column(s); columns are: "
                             f"{', '.join(names)}; name them with --question_column/--options_column/--answer_column")
        return Schema("multiple_choice", question=question, answer=answer, options=options, label=label,
                      context=cfg.context_column or _find(cols, CONTEXT_COLUMNS, exclude=[question, label, answer]))

    question = cfg.question_column or _find(cols, QUESTION_COLUMNS)
    decision = _find(cols, ("final_decision", "label", "decision", "answer"), exclude=[question])
    if forced in ("auto", "multiple_choice") and question and decision and _all_yes_no_maybe(rows, decision):
        return Schema("multiple_choice", question=question, options=YES_NO_MAYBE, label=decision,
                      answer=None, context=cfg.context_column or _find(cols, CONTEXT_COLUMNS,
                                                                       exclude=[question, decision]))

    if forced in ("auto", "instruction") and not cfg.question_column and "instruction" in cols and (
            "output" in cols or "response" in cols):
        return Schema("instruction", question=cols["instruction"], answer=cols.get("output") or cols["response"],
                      context=cfg.context_column or cols.get("input"))
    if forced in ("auto", "prompt_response") and not cfg.question_column and "prompt" in cols and (
            "response" in cols or "completion" in cols):
        return Schema("prompt_response", question=cols["prompt"], answer=cols.get("response") or cols["completion"])

    question = cfg.question_column or _find(cols, QUESTION_COLUMNS)
    answer = cfg.answer_column or _find(cols, ANSWER_COLUMNS, exclude=[question])
    if not question or not answer:
        raise UsageError(f"could not find question and answer columns among: {', '.join(map(str, names))}; "
                         "name them with --question_column and --answer_column (or --schema messages/"
                         "multiple_choice)")
    context = cfg.context_column or _find(cols, CONTEXT_COLUMNS, exclude=[question, answer])
    kind = forced if forced in ("qa", "instruction", "prompt_response") else "qa"
    return Schema(kind, question=question, answer=answer, context=context)


def _text(value) -> str:
    if value is None:
        return ""
    if isinstance(value, float) and value != value:  # NaN from Parquet
        return ""
    if isinstance(value, dict) and isinstance(value.get("contexts"), list):  # PubMedQA's context field
        value = value["contexts"]
    if isinstance(value, list) and all(isinstance(v, str) for v in value):
        return "\n".join(v.replace("\x00", "").strip() for v in value).strip()
    if isinstance(value, (list, dict)):
        return json.dumps(value, ensure_ascii=False)
    return str(value).replace("\x00", "").strip()


def _parse_options(row, schema) -> dict[str, str] | None:
    if schema.options == YES_NO_MAYBE:
        return {LETTERS[i]: o for i, o in enumerate(YES_NO_MAYBE)}
    if isinstance(schema.options, list):
        opts = [_text(row.get(c)) for c in schema.options]
    else:
        value = row.get(schema.options)
        if isinstance(value, str):
            try:
                value = json.loads(value)
            except json.JSONDecodeError:
                value = [v.strip() for v in re.split(r"\s*(?:\|\||;|\|)\s*", value) if v.strip()]
        if isinstance(value, dict):
            opts = [_text(value[k]) for k in sorted(value, key=str)]
        elif isinstance(value, list):
            opts = [_text(v) for v in value]
        else:
            return None
    opts = [o for o in opts if o]
    if len(opts) < 2 or len(opts) > len(LETTERS):
        return None
    return {LETTERS[i]: o for i, o in enumerate(opts)}


def _parse_label(value, options: dict[str, str]) -> str | None:
    text = _text(value)
    if not text:
        return None
    if text.upper() in options:
        return text.upper()
    m = re.fullmatch(r"\(?([A-Ja-j])[).:]?(\s.*)?", text)
    if m and m.group(1).upper() in options:
        return m.group(1).upper()
    if text.isdigit():
        idx = int(text)
        # cop-style labels are 1-based; index-style labels 0-based: prefer 0-based unless it is out of range.
        if idx < len(options):
            return LETTERS[idx]
        if idx == len(options):
            return LETTERS[idx - 1]
    for letter, opt in options.items():
        if opt.strip().lower() == text.lower():
            return letter
    return None


def format_multiple_choice(question: str, options: dict[str, str]) -> str:
    if list(options.values()) == list(YES_NO_MAYBE):
        return f"{question}\n\nAnswer yes, no or maybe."
    lines = [question, ""] + [f"{k}. {v}" for k, v in options.items()] + ["", MC_INSTRUCTION]
    return "\n".join(lines)


def _messages_from(value) -> list[dict] | None:
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except json.JSONDecodeError:
            return None
    if not isinstance(value, list):
        return None
    roles = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant", "bot": "assistant",
             "model": "assistant", "system": "system"}
    out = []
    for m in value:
        if not isinstance(m, dict):
            return None
        role = roles.get(str(m.get("role", m.get("from", ""))).lower())
        content = _text(m.get("content", m.get("value")))
        if role is None or not content:
            return None
        out.append({"role": role, "content": content})
    return out


def to_record(row: dict, schema: Schema, system_prompt: str) -> tuple[dict | None, str | None]:
    """One input row -> one processed record, or (None, reason it was dropped)."""
    system = [{"role": "system", "content": system_prompt}] if system_prompt else []
    rec = {"options": None, "label": None}
    if schema.kind == "messages":
        msgs = _messages_from(row.get(schema.messages))
        if not msgs:
            return None, "messages not a list of {role, content} turns"
        if msgs[-1]["role"] != "assistant":
            return None, "conversation does not end with an assistant turn"
        if msgs[0]["role"] != "system":
            msgs = system + msgs
        users = [m["content"] for m in msgs if m["role"] == "user"]
        if not users:
            return None, "conversation has no user turn"
        rec.update(messages=msgs, question=users[-1], answer=msgs[-1]["content"])
        return rec, None
    question = _text(row.get(schema.question))
    context = _text(row.get(schema.context)) if schema.context else ""
    if not question:
        return None, "empty question"
    options = _parse_options(row, schema) if schema.kind == "multiple_choice" else None
    if options is not None:
        label = _parse_label(row.get(schema.label), options) or (
            _parse_label(row.get(schema.answer), options) if schema.answer else None)
        if label is None:
            return None, "answer does not name one of the options"
        prompt = format_multiple_choice(question, options)
        # The option's text first: a model that knows the answer says it, and option scoring reads that text
        # (evaluation.score_options); the letter after it serves letter-based readers.
        answer = options[label] if options == dict(zip(LETTERS, YES_NO_MAYBE)) else f"{options[label]} ({label})"
        rec.update(options=options, label=label)
    else:  # free-text answer; multiple-choice files may mix in rows without options
        answer = _text(row.get(schema.answer)) if schema.answer else ""
        if not answer:
            return None, "options missing or fewer than 2" if schema.kind == "multiple_choice" else "empty answer"
        prompt = question
    if context:
        prompt = f"{context}\n\n{prompt}"
    rec.update(messages=system + [{"role": "user", "content": prompt}, {"role": "assistant", "content": answer}],
               question=question, answer=answer)
    return rec, None


# ----------------------------------------------------------------------------------------------- splits

def normalise(text: str) -> str:
    return " ".join(re.sub(r"[^\w]+", " ", text.lower()).split())


def split_records(records: list[dict], train_size: float, validation_share: float, seed: int) -> dict[str, list]:
    """Assign whole groups to splits. Records sharing a normalised question or a `group` value are one group."""
    parent = list(range(len(records)))

    def find(i):
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    first_by_key: dict[tuple, int] = {}
    for i, rec in enumerate(records):
        keys = [("q", normalise(rec["question"]))]
        if rec.get("group") not in (None, ""):
            keys.append(("g", rec["group"]))
        for key in keys:
            j = first_by_key.setdefault(key, i)
            parent[find(i)] = find(j)
    groups: dict[int, list[int]] = {}
    for i in range(len(records)):
        groups.setdefault(find(i), []).append(i)

    fixed = {s: [] for s in SPLITS}
    free = []
    for members in groups.values():
        wanted = {records[i].get("split") for i in members} - {None}
        if len(wanted) == 1:
            fixed[wanted.pop()].extend(members)
        else:  # no predefined split, or a group the input itself let straddle: we place it
            free.append(members)
    random.Random(seed).shuffle(free)
    n_free = sum(len(g) for g in free)
    targets = {"train": max(1, round(n_free * train_size)) if n_free else 0}
    targets["validation"] = round((n_free - targets["train"]) * validation_share)
    out = {s: list(v) for s, v in fixed.items()}
    filled = {s: 0 for s in SPLITS}
    for members in free:
        split = next((s for s in ("train", "validation") if filled[s] < targets[s]), "test")
        out[split].extend(members)
        filled[split] += len(members)
    return {s: [records[i] for i in sorted(idx)] for s, idx in out.items()}


# ----------------------------------------------------------------------------------------------- tokens

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


def publish_dir(tmp: Path, target: Path, marker: str) -> None:
    """Move a finished output into place; refuse to clobber a folder that is not one of ours."""
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o777 & ~umask)  # mkdtemp makes it private; the output should look like any other folder
    if target.exists():
        if any(target.iterdir()) and not (target / marker).exists():
            raise UsageError(f"output directory '{target}' exists and is not a medpeft output (no {marker}); "
                             "choose another --output_dir or empty it")
        old = target.with_name(f".{target.name}.old-{os.getpid()}")
        os.replace(target, old)
        os.replace(tmp, target)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(tmp, target)


def _screen_phi(rows: list[dict], mode: str, log) -> dict | None:
    """--phi: count likely patient identifiers per column (warn), or replace them in the rows (redact)."""
    if mode == "off":
        return None
    from . import phi

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


def prepare(cfg, log=print, fingerprint: str | None = None) -> dict:
    """Read, convert, de-duplicate, split, measure and write a processed dataset. Returns the metadata."""
    from . import __version__
    from .modeling import load_tokenizer, resolve_model

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
    records, seen = [], set()
    used = {c for v in schema.describe().values() for c in (v if isinstance(v, list) else [v])} | {"split"}
    for i, row in enumerate(rows):
        rec, reason = to_record(row, schema, cfg.system_prompt)
        if rec is None:
            dropped[reason] += 1
            continue
        key = (normalise(rec["question"]), normalise(rec["answer"]), rec["options"] and json.dumps(rec["options"]))
        if key in seen:
            dropped["duplicate of an earlier row"] += 1
            continue
        seen.add(key)
        split = row.get("split")
        rec["split"] = SPLIT_ALIASES.get(str(split).strip().lower()) if split not in (None, "") else None
        rec["group"] = (_text(row.get(cfg.group_by)) or None) if cfg.group_by else None  # empty: no group
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
    kept, too_long = [], 0
    for rec, tok in zip(records, tokens):
        if not any(lab != -100 for lab in tok["labels"]):
            too_long += 1
            continue
        rec["_tok"] = tok
        kept.append(rec)
    if too_long:
        dropped[f"prompt alone reaches --max_length {cfg.max_length}"] += too_long
    if not kept:
        raise UsageError(f"every prompt is longer than --max_length {cfg.max_length}; raise --max_length")
    splits = split_records(kept, cfg.train_size, cfg.validation_share, cfg.seed)
    for name in ("train",):
        if not splits[name]:
            raise UsageError(f"the '{name}' split is empty ({len(kept)} usable rows); add data or change --train_size")

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
            clean = [{k: v for k, v in r.items() if k not in ("_tok", "split")} for r in recs]
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


def load_split(data_path: str, split: str) -> list[dict]:
    if not (Path(data_path) / "metadata.json").is_file():
        raise UsageError(f"--data_path: '{data_path}' is not a processed dataset (no metadata.json); "
                         "run utils/prepare_dataset.py first")
    return read_processed(Path(data_path) / f"{split}.json", "--data_path")


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
