"""Input rows -> processed records (chat messages, options, label), and leakage-free splits of them.

One processed record (a line of train.json / validation.json / test.json):

    {"id": "row-000017",
     "messages": [{"role": "system", "content": "You are a careful medical assistant..."},
                  {"role": "user", "content": "What are the symptoms of Glaucoma ?"},
                  {"role": "assistant", "content": "Open-angle glaucoma starts without symptoms..."}],
     "question": "What are the symptoms of Glaucoma ?", "answer": "Open-angle glaucoma starts...",
     "group": "Glaucoma", "options": null, "label": null}

Multiple-choice records also carry "options" ({"A": "...", ...}) and "label" ("B").
"""

from __future__ import annotations

import json
import random
import re
from collections import Counter
from dataclasses import dataclass

from .errors import UsageError


SPLITS = ("train", "validation", "test")


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
    values = {cell_text(r.get(column)).lower() for r in rows[:1000]} - {""}
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


def cell_text(value) -> str:
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
        opts = [cell_text(row.get(c)) for c in schema.options]
    else:
        value = row.get(schema.options)
        if isinstance(value, str):
            try:
                value = json.loads(value)
            except json.JSONDecodeError:
                value = [v.strip() for v in re.split(r"\s*(?:\|\||;|\|)\s*", value) if v.strip()]
        if isinstance(value, dict):
            opts = [cell_text(value[k]) for k in sorted(value, key=str)]
        elif isinstance(value, list):
            opts = [cell_text(v) for v in value]
        else:
            return None
    opts = [o for o in opts if o]
    if len(opts) < 2 or len(opts) > len(LETTERS):
        return None
    return {LETTERS[i]: o for i, o in enumerate(opts)}


def _parse_label(value, options: dict[str, str]) -> str | None:
    text = cell_text(value)
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
        content = cell_text(m.get("content", m.get("value")))
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
    question = cell_text(row.get(schema.question))
    context = cell_text(row.get(schema.context)) if schema.context else ""
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
        answer = cell_text(row.get(schema.answer)) if schema.answer else ""
        if not answer:
            return None, "options missing or fewer than 2" if schema.kind == "multiple_choice" else "empty answer"
        prompt = question
    rec.update(messages=system + [{"role": "user", "content": with_context(prompt, context)},
                                  {"role": "assistant", "content": answer}],
               question=question, answer=answer, context=context or None, _body=prompt)
    return rec, None


def with_context(body: str, context: str | None) -> str:
    """The user turn: the context (an abstract, a case) before the question and its options."""
    return f"{context}\n\n{body}" if context else body


def shorten_context(rec: dict, context: str) -> dict:
    """The record with its context replaced (the user turn rebuilt around the same question and options)."""
    messages = [dict(m) for m in rec["messages"]]
    user = max(i for i, m in enumerate(messages) if m["role"] == "user")
    messages[user]["content"] = with_context(rec["_body"], context)
    return rec | {"messages": messages, "context": context}


def sample(records: list[dict], n: int, seed: int) -> list[dict]:
    """`n` of the records drawn with `seed`, in their order; all of them when n is -1 or at least their number
    (the evaluation's test items, training's validation items)."""
    if n < 0 or n >= len(records):
        return records
    return [records[i] for i in sorted(random.Random(seed).sample(range(len(records)), n))]


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
        wanted = Counter(records[i].get("split") for i in members if records[i].get("split"))
        if not wanted:
            free.append(members)
            continue
        # A benchmark's own split is its contract: every row stays where the input put it (even a question the
        # input let straddle two splits; prepare counts those), and rows without one follow their group.
        home = wanted.most_common(1)[0][0]
        for i in members:
            fixed[records[i].get("split") or home].append(i)
    random.Random(seed).shuffle(free)
    n_free = sum(len(g) for g in free)
    targets = {"train": max(1, round(n_free * train_size)) if n_free else 0}
    targets["validation"] = round((n_free - targets["train"]) * validation_share)
    targets["test"] = n_free - targets["train"] - targets["validation"]
    out = {s: list(v) for s, v in fixed.items()}
    filled = {s: 0 for s in SPLITS}
    for k, members in enumerate(free):
        split = next((s for s in ("train", "validation") if filled[s] < targets[s]), "test")
        # targets count rows, groups can hold several: when the groups left could not give every later split
        # that wants rows one group each, this one goes to the first of them, unless its own split is still empty
        starved = [s for s in SPLITS[SPLITS.index(split) + 1:] if targets[s] > 0 and not filled[s]]
        if filled[split] and len(starved) > len(free) - k - 1:
            split = starved[0]
        out[split].extend(members)
        filled[split] += len(members)
    return {s: [records[i] for i in sorted(idx)] for s, idx in out.items()}
