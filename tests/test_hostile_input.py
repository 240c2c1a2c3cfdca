"""Hostile input to data preparation: a processed dataset with its dropped rows counted, or exit code 2 with one
line; never a traceback, a hang, or a valid row lost without a reason. Property-based (hypothesis) plus the
named cases: long fields, NULs, mixed encodings, formula-like cells, duplicate columns, 100,000 rows."""

import contextlib
import csv
import io
import json
import math
import re
import subprocess
import sys
import tempfile
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from hypothesis import HealthCheck, currently_in_test_context, event, given, settings
from hypothesis import strategies as st

from medpeft.cli import run
from medpeft.records import normalise

ROOT = Path(__file__).resolve().parents[1]
SETTINGS = settings(max_examples=40, deadline=None, suppress_health_check=list(HealthCheck))
NASTY = ["=cmd|' /C calc'!A0", "+SUM(1,1)", "@A1", "-2+3", "a\x00b", "\x00", "\ufeffq", "Ω≈ç√∫", "😷 fever",
         "line\r\nbreak", '"quoted", comma', "'", "\\", "x" * 3000, "", "   ", "\t", "nan", "None", "{}", "[1,2]"]
TEXT = st.one_of(st.text(max_size=40), st.sampled_from(NASTY))
ALLOWED_FAILURES = ("split is empty", "split would be empty", "no usable rows", "holds no data rows")


def prepare(path: Path, tiny_model: str, *extra) -> tuple[int, str, Path]:
    out = path.parent / "processed"
    err = io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
        code = run(["prepare", "--input_data", str(path), "--output_dir", str(out), "--model_name", tiny_model,
                    "--max_length", "8192", *extra])
    return code, err.getvalue(), out


def assert_clean(code: int, err: str, out: Path):
    """(`pytest --hypothesis-show-statistics` tallies the outcomes.)"""
    if currently_in_test_context():
        reason = re.sub(r"[\d'\"]+|/\S+", "", err.split("error: ")[-1]).split(";")[0].split("(")[0].strip()
        event(f"exit {code}" + (f": {reason[:50]}" if code == 2 else ""))
    assert code in (0, 2), (code, err)
    assert "Traceback" not in err
    if code == 2:
        lines = [ln for ln in err.splitlines() if ln.strip()]
        assert len(lines) == 1 and lines[0].startswith("error: "), err
        assert not out.exists(), "a failed run left an output"
    else:
        assert (out / "metadata.json").is_file()


def write(rows: list[dict], fmt: str, folder: Path) -> Path:
    path = folder / f"data.{fmt}"
    if fmt == "csv":
        columns = list(dict.fromkeys(k for r in rows for k in r))
        with open(path, "w", encoding="utf-8", newline="") as fh:
            w = csv.writer(fh)
            w.writerow(columns)
            w.writerows([["" if r.get(c) is None else str(r.get(c)) for c in columns] for r in rows])
    elif fmt == "jsonl":
        path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    elif fmt == "json":
        path.write_text(json.dumps(rows), encoding="utf-8")
    else:
        try:
            table = pa.Table.from_pylist(rows)
        except (pa.ArrowInvalid, pa.ArrowTypeError, TypeError):
            table = pa.Table.from_pylist([{k: None if v is None else str(v) for k, v in r.items()} for r in rows])
        pq.write_table(table, path)
    return path


def cell(value) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return ""
    return str(value).replace("\x00", "").strip()


row_strategy = st.fixed_dictionaries(
    {"question": TEXT, "answer": TEXT},
    optional={"note": st.one_of(TEXT, st.integers(), st.floats(allow_nan=True), st.none(), st.booleans())})


@SETTINGS
@given(rows=st.lists(row_strategy, min_size=1, max_size=30), fmt=st.sampled_from(["csv", "json", "jsonl", "parquet"]))
def test_every_valid_row_is_kept_or_counted(tiny_model, rows, fmt):
    with tempfile.TemporaryDirectory() as tmp:
        code, err, out = prepare(write(rows, fmt, Path(tmp)), tiny_model)
        assert_clean(code, err, out)
        valid = {(normalise(cell(r["question"])), normalise(cell(r["answer"])))
                 for r in rows if cell(r["question"]) and cell(r["answer"])}
        if code == 2:
            assert any(m in err for m in ALLOWED_FAILURES), err
            if "would be empty" in err:
                # rows sharing a question are one group: too few groups for three splits
                from medpeft.data import smallest_sizes

                questions = {q for q, _ in valid}
                assert len(questions) < smallest_sizes(0.8, 0.5), f"{len(questions)} questions refused: {err}"
            else:
                assert len(valid) < 10, f"{len(valid)} valid rows refused: {err}"
            return
        meta = json.loads((out / "metadata.json").read_text())
        kept = sum(len(json.loads((out / f"{s}.json").read_text())) for s in ("train", "validation", "test"))
        assert kept == meta["rows"]["kept"]
        assert meta["rows"]["kept"] + meta["rows"]["dropped"] == meta["rows"]["read"]
        assert meta["rows"]["kept"] == len({(q, a) for q, a in valid})  # the duplicate rule is on normalised text
        for reason in meta["rows"]["dropped_by_reason"]:
            assert reason in ("empty question", "empty answer", "duplicate of an earlier row"), reason


@SETTINGS
@given(content=st.one_of(st.binary(max_size=400), st.text(max_size=400).map(str.encode)),
       suffix=st.sampled_from([".csv", ".tsv", ".json", ".jsonl", ".parquet"]))
def test_arbitrary_bytes_never_give_a_traceback(tiny_model, content, suffix):
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / f"data{suffix}"
        path.write_bytes(content)
        assert_clean(*prepare(path, tiny_model))


@pytest.mark.parametrize("name, content, needle", [
    ("deep.json", "[" * 100_000 + "]" * 100_000, "nested too deeply"),
    ("deep.jsonl", '{"question": ' + "[" * 50_000 + "]" * 50_000 + ', "answer": "a"}\n', "nested too deeply"),
    ("mixed.csv", "question,answer\nwhat is it?,caf\u00e9\n".encode() + b"and this?,caf\xe9\n", "not UTF-8 text"),
    ("dupes.csv", "question,answer,answer\nq,a,b\n", "duplicate column names ['answer']"),
    ("header_only.csv", "question,answer\n", "holds no data rows"),
    ("scalar.json", "42", "expected a JSON list of records"),
])
def test_named_hostile_files(tiny_model, tmp_path, name, content, needle):
    path = tmp_path / name
    path.write_bytes(content if isinstance(content, bytes) else content.encode())
    code, err, out = prepare(path, tiny_model)
    assert_clean(code, err, out)
    assert code == 2 and needle in err, err


def test_formula_cells_nuls_and_long_fields_are_kept_as_plain_text(tiny_model, tmp_path):
    rows = [{"question": f"Question {i}: what does =cmd|' /C calc'!A0 do?", "answer": f"+SUM(A{i}) is text"}
            for i in range(12)]
    rows += [{"question": "nul\x00inside the question?", "answer": "kept without the NUL"},
             {"question": "long " + "word " * 20_000, "answer": "a long question is truncated, not lost"}]
    code, err, out = prepare(write(rows, "csv", tmp_path), tiny_model, "--max_length", "256")
    assert code == 0, err
    records = [r for s in ("train", "validation", "test") for r in json.loads((out / f"{s}.json").read_text())]
    questions = {r["question"] for r in records}
    assert "Question 3: what does =cmd|' /C calc'!A0 do?" in questions  # verbatim: never interpreted
    assert "nulinside the question?" in questions
    meta = json.loads((out / "metadata.json").read_text())
    assert meta["rows"] == {"read": 14, "kept": 13, "dropped": 1,
                            "dropped_by_reason": {"prompt alone reaches --max_length 256": 1}}


@pytest.mark.slow  # make test-fast leaves it out
def test_a_100000_row_file_keeps_memory_bounded(tiny_model, tmp_path):
    path = tmp_path / "big.csv"
    with open(path, "w", encoding="utf-8", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["question", "answer", "focus"])
        for i in range(100_000):
            w.writerow([f"What is the normal range of marker {i} in adults?", f"Between {i} and {i + 7} units.",
                        f"marker {i % 5000}"])
    script = ("import resource, sys; from medpeft.cli import run; code = run(sys.argv[1:]); "
              "print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss); sys.exit(code)")
    done = subprocess.run([sys.executable, "-c", script, "prepare", "--input_data", str(path), "--output_dir",
                           str(tmp_path / "out"), "--model_name", tiny_model, "--group_by", "focus"],
                          capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert done.returncode == 0, done.stderr[-2000:]
    peak_mb = int(done.stdout.strip().splitlines()[-1]) / 1024
    meta = json.loads((tmp_path / "out" / "metadata.json").read_text())
    assert meta["rows"]["kept"] == 100_000
    assert peak_mb < 2000, f"peak memory {peak_mb:.0f} MB for a {path.stat().st_size / 2**20:.0f} MB file"
