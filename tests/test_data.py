"""Data preparation: formats, schemas, splits without leakage, answer-only labels."""

import csv
import json

import pandas as pd
import pytest

from medpeft.errors import UsageError

from conftest import qa_rows, write_jsonl
from medpeft.cli import run
from medpeft.config import PrepareConfig
from medpeft.data import prepare
from medpeft.records import normalise
from medpeft.tokens import render, tokenize_records
from medpeft.modeling import load_tokenizer
from medpeft.sample_data import SAMPLE_PATH


def run_prepare(tmp_path, tiny_model, input_data, **kw):
    kw.setdefault("allow_empty_splits", True)  # a few rows, to see how they are read: splits are tested below
    out = tmp_path / "out"
    meta = prepare(PrepareConfig(input_data=str(input_data), output_dir=str(out), model_name=tiny_model, **kw),
                   log=lambda *a: None)
    splits = {s: json.loads((out / f"{s}.json").read_text()) for s in ("train", "validation", "test")}
    return meta, splits


def all_records(splits):
    return [r for recs in splits.values() for r in recs]


def write_csv(path, rows, delimiter=","):
    with open(path, "w", newline="", encoding="utf-8") as fh:
        w = csv.DictWriter(fh, fieldnames=list(rows[0]), delimiter=delimiter)
        w.writeheader()
        w.writerows(rows)
    return path


@pytest.mark.parametrize("fmt", ["csv", "tsv", "json", "jsonl", "parquet"])
def test_every_format_gives_the_same_records(tmp_path, tiny_model, fmt):
    rows = qa_rows(30)
    path = tmp_path / f"data.{fmt}"
    if fmt == "csv":
        write_csv(path, rows)
    elif fmt == "tsv":
        write_csv(path, rows, "\t")
    elif fmt == "json":
        path.write_text(json.dumps(rows))
    elif fmt == "jsonl":
        write_jsonl(path, rows)
    else:
        pd.DataFrame(rows).to_parquet(path)
    meta, splits = run_prepare(tmp_path, tiny_model, path)
    assert meta["rows"]["read"] == 30 and meta["rows"]["kept"] == 30
    assert meta["schema"] == "qa"
    got = sorted((r["question"], r["answer"]) for r in all_records(splits))
    assert got == sorted((r["question"], r["answer"]) for r in rows)


def test_folder_of_files_is_read_whole(tmp_path, tiny_model):
    rows = qa_rows(30)
    folder = tmp_path / "in"
    folder.mkdir()
    write_jsonl(folder / "a.jsonl", rows[:10])
    write_csv(folder / "b.csv", rows[10:])
    meta, splits = run_prepare(tmp_path, tiny_model, folder)
    assert meta["rows"]["kept"] == 30 and len(meta["input_files"]) == 2


@pytest.mark.parametrize("row,question,answer", [
    ({"instruction": "Define anemia.", "input": "", "output": "A low red cell mass."}, "Define anemia.",
     "A low red cell mass."),
    ({"prompt": "What is HbA1c?", "response": "Glycated hemoglobin."}, "What is HbA1c?", "Glycated hemoglobin."),
    ({"Question": "What is a fever?", "Answer": "A raised body temperature."}, "What is a fever?",
     "A raised body temperature."),
    ({"messages": [{"role": "user", "content": "Hi, what is BP?"}, {"role": "assistant", "content": "Blood pressure."}]},
     "Hi, what is BP?", "Blood pressure."),
    ({"conversations": [{"from": "human", "value": "What is ECG?"}, {"from": "gpt", "value": "Electrocardiogram."}]},
     "What is ECG?", "Electrocardiogram."),
])
def test_schemas_are_detected(tmp_path, tiny_model, row, question, answer):
    rows = [row]
    meta, splits = run_prepare(tmp_path, tiny_model, write_jsonl(tmp_path / "d.jsonl", rows), train_size=0.5)
    rec = all_records(splits)[0]
    assert (rec["question"], rec["answer"]) == (question, answer)
    assert rec["messages"][0]["role"] == "system" and rec["messages"][-1] == {"role": "assistant", "content": answer}


def test_instruction_input_becomes_context(tmp_path, tiny_model):
    rows = [{"instruction": "Summarise the note.", "input": "Patient has a cough.", "output": "Cough."}]
    _, splits = run_prepare(tmp_path, tiny_model, write_jsonl(tmp_path / "d.jsonl", rows))
    user = all_records(splits)[0]["messages"][1]["content"]
    assert user == "Patient has a cough.\n\nSummarise the note."


@pytest.mark.parametrize("row", [
    {"question": "Which vitamin prevents scurvy?", "options": {"A": "Vitamin A", "B": "Vitamin C"}, "answer_idx": "B",
     "answer": "Vitamin C"},  # MedQA style
    {"question": "Which vitamin prevents scurvy?", "A": "Vitamin A", "B": "Vitamin C", "answer": "B"},
    {"question": "Which vitamin prevents scurvy?", "opa": "Vitamin A", "opb": "Vitamin C", "cop": 1},  # MedMCQA
    {"question": "Which vitamin prevents scurvy?", "choices": ["Vitamin A", "Vitamin C"], "label": "Vitamin C"},
])
def test_multiple_choice_forms(tmp_path, tiny_model, row):
    meta, splits = run_prepare(tmp_path, tiny_model, write_jsonl(tmp_path / "d.jsonl", [row]))
    rec = all_records(splits)[0]
    assert meta["schema"] == "multiple_choice"
    assert rec["options"] == {"A": "Vitamin A", "B": "Vitamin C"} and rec["label"] == "B"
    assert rec["answer"] == "Vitamin C (B)"
    assert "A. Vitamin A\nB. Vitamin C" in rec["messages"][1]["content"]


def test_pubmedqa_style_yes_no_maybe(tmp_path, tiny_model):
    rows = [{"question": f"Does drug {i} lower blood pressure?", "final_decision": d,
             "context": {"contexts": [f"Trial {i} enrolled adults.", "Results were mixed."]},
             "long_answer": "The trial suggests so."} for i, d in enumerate(["yes", "no", "maybe", "YES"] * 3)]
    meta, splits = run_prepare(tmp_path, tiny_model, write_jsonl(tmp_path / "p.jsonl", rows))
    assert meta["schema"] == "multiple_choice"
    recs = all_records(splits)
    assert {r["answer"] for r in recs} == {"yes", "no", "maybe"}
    rec = next(r for r in recs if r["answer"] == "no")
    assert rec["options"] == {"A": "yes", "B": "no", "C": "maybe"} and rec["label"] == "B"
    user = rec["messages"][-2]["content"]
    assert user.startswith("Trial") and "Results were mixed." in user and user.endswith("Answer yes, no or maybe.")


def test_system_prompt_flag(tmp_path, tiny_model, qa_file):
    _, splits = run_prepare(tmp_path, tiny_model, qa_file, system_prompt="Be brief.")
    assert all(r["messages"][0] == {"role": "system", "content": "Be brief."} for r in all_records(splits))
    _, splits = run_prepare(tmp_path, tiny_model, qa_file, system_prompt="")
    assert all(r["messages"][0]["role"] == "user" for r in all_records(splits))


def test_column_flags_override_detection(tmp_path, tiny_model):
    rows = [{"q_text": f"Question {i}?", "reply": f"Reply {i}.", "question": "decoy"} for i in range(10)]
    _, splits = run_prepare(tmp_path, tiny_model, write_jsonl(tmp_path / "d.jsonl", rows),
                            question_column="q_text", answer_column="reply")
    assert sorted(r["question"] for r in all_records(splits)) == sorted(f"Question {i}?" for i in range(10))


def test_splits_share_no_question_and_no_group(tmp_path, tiny_model):
    rows = []
    for g in range(30):
        for k in range(3):
            rows.append({"question": f"What is condition {g} variant {k}?", "answer": f"Answer {g}-{k}.",
                         "focus": f"topic-{g}"})
    # normalised duplicates of other questions with different answers: must land with their twin
    rows += [{"question": f"what is CONDITION {g} variant 0 ?!", "answer": "Another answer.", "focus": f"x{g}"}
             for g in range(10)]
    rows += [rows[0]] * 3  # exact duplicates are dropped
    rows += [{"question": f"Ungrouped question {k}?", "answer": "Yes.", "focus": ""} for k in range(10)]
    meta, splits = run_prepare(tmp_path, tiny_model, write_jsonl(tmp_path / "d.jsonl", rows), group_by="focus")
    assert meta["rows"]["dropped_by_reason"] == {"duplicate of an earlier row": 3}
    questions = {s: {normalise(r["question"]) for r in recs} for s, recs in splits.items()}
    groups = {s: {r["group"] for r in recs} for s, recs in splits.items()}
    for a, b in [("train", "validation"), ("train", "test"), ("validation", "test")]:
        assert not questions[a] & questions[b]
    total = sum(len(v) for v in splits.values())
    assert sum(r["group"] is None for recs in splits.values() for r in recs) == 10  # empty = no group
    groups = {s: g - {None} for s, g in groups.items()}
    for a, b in [("train", "validation"), ("train", "test"), ("validation", "test")]:
        assert not groups[a] & groups[b]
    assert total == 110 and 0.7 <= len(splits["train"]) / total <= 0.9
    assert splits["validation"] and splits["test"]


def test_predefined_split_column_is_respected(tmp_path, tiny_model):
    meta, splits = run_prepare(tmp_path, tiny_model, SAMPLE_PATH)
    source = [json.loads(line) for line in SAMPLE_PATH.read_text().splitlines()]
    assert {s: len(v) for s, v in splits.items()} == {
        s: sum(r["split"] == s for r in source) for s in ("train", "validation", "test")}
    # test holds new phrasings of facts seen in training, and facts never seen
    train_facts = {r["meta"]["fact_id"] for r in splits["train"]}
    test_facts = {r["meta"]["fact_id"] for r in splits["test"]}
    assert test_facts & train_facts and test_facts - train_facts


def test_labels_mask_everything_but_the_answer(tiny_model):
    tok = load_tokenizer(tiny_model)
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "What causes scurvy?"},
                {"role": "assistant", "content": "Vitamin C deficiency."}]
    (ex,) = tokenize_records(tok, [{"messages": messages}], 512)
    prompt = render(tok, messages[:-1], add_generation_prompt=True)
    n_prompt = len(tok(prompt, add_special_tokens=False)["input_ids"])
    assert all(lab == -100 for lab in ex["labels"][:n_prompt])
    trained = [t for t, lab in zip(ex["input_ids"], ex["labels"]) if lab != -100]
    assert trained == ex["input_ids"][n_prompt:]
    assert tok.decode(trained) == "Vitamin C deficiency.<|im_end|>\n"


def test_labels_cover_every_assistant_turn(tiny_model):
    tok = load_tokenizer(tiny_model)
    messages = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello."},
                {"role": "user", "content": "What is BP?"}, {"role": "assistant", "content": "Blood pressure."}]
    (ex,) = tokenize_records(tok, [{"messages": messages}], 512)
    text = tok.decode([t if lab != -100 else tok.convert_tokens_to_ids("<unk>") for t, lab in
                       zip(ex["input_ids"], ex["labels"])], skip_special_tokens=False)
    assert "Hello.<|im_end|>" in text and "Blood pressure.<|im_end|>" in text
    assert "What is BP" not in text.replace("<unk>", "")


def test_template_without_system_role_folds_it_into_the_user_turn(tiny_mistral_template_model):
    tok = load_tokenizer(tiny_mistral_template_model)
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "What causes rickets?"},
                {"role": "assistant", "content": "Vitamin D deficiency."}]
    assert render(tok, messages) == "<s>[INST] Be brief.\n\nWhat causes rickets? [/INST]Vitamin D deficiency.</s>"
    (ex,) = tokenize_records(tok, [{"messages": messages}], 512)
    trained = [t for t, lab in zip(ex["input_ids"], ex["labels"]) if lab != -100]
    assert tok.decode(trained) == "Vitamin D deficiency.</s>"


def test_truncation_is_counted_and_prompt_only_rows_dropped(tmp_path, tiny_model):
    rows = [{"question": f"Short question {i}?", "answer": "word " * 200} for i in range(8)]
    rows.append({"question": "long " * 400, "answer": "x"})
    meta, splits = run_prepare(tmp_path, tiny_model, write_jsonl(tmp_path / "d.jsonl", rows), max_length=64,
                               system_prompt="")
    assert meta["tokens"]["truncated"] == 8
    assert meta["rows"]["dropped_by_reason"] == {"prompt alone reaches --max_length 64": 1}
    assert all(len(r["messages"]) == 2 for recs in splits.values() for r in recs)
    assert meta["rows"]["kept"] == 8


def test_metadata_records_what_a_user_needs(tmp_path, tiny_model, qa_file):
    meta, _ = run_prepare(tmp_path, tiny_model, qa_file, seed=3)
    assert len(meta["input_sha256"]) == 64
    assert meta["split"]["seed"] == 3 and meta["max_length"] == 512
    assert set(meta["tokens"]["total"]) >= {"mean", "median", "p90", "max"}
    assert sum(meta["counts"].values()) == meta["rows"]["kept"] == 40


def test_debug_shows_tokens_with_their_mask(tmp_path, tiny_model, qa_file, capsys):
    run_prepare(tmp_path, tiny_model, qa_file, debug=1)
    out = capsys.readouterr().out
    assert "trained on (green)" in out and "\033[32m" in out and "\033[2m" in out


def test_json_lines_saved_as_json_are_read(tmp_path, tiny_model):
    path = tmp_path / "data.json"
    path.write_text("".join(json.dumps(r) + "\n" for r in qa_rows(10)))
    meta, _ = run_prepare(tmp_path, tiny_model, path)
    assert meta["rows"]["kept"] == 10


def test_empty_validation_or_test_split_is_an_error_that_says_what_would_do(tmp_path, tiny_model, capsys):
    data = tmp_path / "one.json"
    data.write_text(json.dumps({"question": "What is fever?", "answer": 1}))
    out = tmp_path / "out"
    code = run(["prepare", "--input_data", str(data), "--output_dir", str(out), "--model_name", tiny_model])
    err = capsys.readouterr().err
    assert code == 2 and len(err.strip().splitlines()) == 1 and not out.exists()
    assert "the validation split and the test split would be empty: 1 usable row of 1 read" in err
    assert "needs at least 8 rows" in err and "--allow_empty_splits" in err


def test_allow_empty_splits_prepares_training_data_with_a_warning(tmp_path, tiny_model, capsys):
    data = tmp_path / "one.json"
    data.write_text(json.dumps({"question": "What is fever?", "answer": 1}))
    out = tmp_path / "out"
    assert run(["prepare", "--input_data", str(data), "--output_dir", str(out), "--model_name", tiny_model,
                "--allow_empty_splits"]) == 0
    assert "warning: the validation split and the test split are empty" in capsys.readouterr().out
    meta = json.loads((out / "metadata.json").read_text())
    assert meta["counts"] == {"train": 1, "validation": 0, "test": 0}


@pytest.mark.parametrize("train_size,validation_share", [(0.8, 0.5), (0.5, 0.5), (0.9, 0.3), (0.6, 0.9)])
def test_the_fewest_rows_the_error_names_are_enough_and_one_fewer_is_not(train_size, validation_share):
    from medpeft.data import smallest_sizes
    from medpeft.records import split_records

    def sizes(n):
        records = [{"question": f"question number {i}", "answer": "a"} for i in range(n)]
        return {k: len(v) for k, v in split_records(records, train_size, validation_share, seed=0).items()}

    n = smallest_sizes(train_size, validation_share)
    assert all(sizes(n).values()), sizes(n)
    assert not all(sizes(n - 1).values()), sizes(n - 1)


def _long_context_rows(tiny_model, n_test=6):
    from medpeft.modeling import load_tokenizer

    tok = load_tokenizer(tiny_model)
    words = "The randomised trial enrolled adults with chronic kidney disease and measured outcomes".split()
    rows = []
    for i in range(n_test + 10):
        context = " ".join(words[(i + k) % len(words)] for k in range(300 + 40 * i))  # 300 to 900 words
        rows.append({"QUESTION": f"Does drug number {i} slow the decline of kidney function?",
                     "CONTEXTS": [context], "final_decision": ["yes", "no", "maybe"][i % 3],
                     "split": "test" if i < n_test else "train" if i < n_test + 7 else "validation"})
    assert all(len(tok(r["CONTEXTS"][0])["input_ids"]) > 256 for r in rows)
    return rows


@pytest.mark.parametrize("how", ["middle", "end"])
def test_a_long_context_is_shortened_and_question_options_answer_stay_whole(tmp_path, tiny_model, how):
    rows = _long_context_rows(tiny_model)
    meta, splits = run_prepare(tmp_path, tiny_model, write_jsonl(tmp_path / "p.jsonl", rows), max_length=256,
                               shorten_context=how)
    assert meta["rows"]["dropped"] == 0 and meta["tokens"]["truncated"] == 0 and meta["tokens"]["total"]["max"] <= 256
    assert meta["predefined_items"]["test"] == {"given": 6, "kept": 6, "dropped_by_reason": {}}
    assert meta["contexts_shortened"] == {"how": how, "train": 7, "validation": 3, "test": 6}
    records = [r for split in splits.values() for r in split]
    by_question = {r["QUESTION"]: r for r in rows}
    for rec in records:
        user = next(m["content"] for m in rec["messages"] if m["role"] == "user")
        original = by_question[rec["question"]]["CONTEXTS"][0]
        assert user.endswith(f"\n\n{rec['question']}\n\nAnswer yes, no or maybe.")  # question and instruction whole
        assert rec["answer"] == by_question[rec["question"]]["final_decision"]  # and the answer
        assert rec["messages"][-1]["content"] == rec["answer"]
        kept = user[: -len(f"\n\n{rec['question']}\n\nAnswer yes, no or maybe.")]
        assert "[…]" in kept and rec["context"] == kept and len(kept) < len(original)
        head, _, tail = kept.partition(" […]")
        assert original.startswith(head.strip())
        if how == "middle":
            assert original.endswith(tail.strip()) and tail.strip()
        else:
            assert tail == ""


def test_a_predefined_test_row_is_kept_even_repeated_and_one_that_cannot_fit_is_counted(tmp_path, tiny_model):
    rows = _long_context_rows(tiny_model)
    rows.append(dict(rows[0]))  # the benchmark repeats an item: both are scored
    rows.append({"QUESTION": "Is this question far too long? " + "very " * 400, "CONTEXTS": ["short"],
                 "final_decision": "no", "split": "test"})  # not even the question fits
    meta, splits = run_prepare(tmp_path, tiny_model, write_jsonl(tmp_path / "p.jsonl", rows), max_length=256)
    test = splits["test"]
    assert len(test) == 7 and meta["counts"]["test"] == 7
    assert meta["predefined_items"]["test"]["given"] == 8 and meta["predefined_items"]["test"]["kept"] == 7
    assert meta["predefined_items"]["test"]["dropped_by_reason"] == {"prompt alone reaches --max_length 256": 1}


def test_a_question_the_input_puts_in_two_splits_stays_in_both(tmp_path, tiny_model):
    rows = _long_context_rows(tiny_model)
    rows.append(rows[0] | {"split": "train", "final_decision": "maybe"})  # the same question in train too
    meta, _ = run_prepare(tmp_path, tiny_model, write_jsonl(tmp_path / "p.jsonl", rows), max_length=256)
    assert meta["predefined_items"]["test"]["kept"] == 6 and meta["predefined_items"]["train"]["kept"] == 8


def test_shorten_context_off_drops_the_row_as_before(tmp_path, tiny_model):
    rows = _long_context_rows(tiny_model)
    with pytest.raises(UsageError, match="every prompt is longer than --max_length 256"):
        run_prepare(tmp_path, tiny_model, write_jsonl(tmp_path / "p.jsonl", rows), max_length=256,
                    shorten_context="off")


def test_one_question_about_two_contexts_is_two_items(tmp_path, tiny_model):
    rows = [{"question": "Is drug A the treatment of condition B?", "context": context, "final_decision": label}
            for context, label in (("Condition B is treated with drug A.", "yes"),
                                   ("Condition C is treated with drug D.", "maybe"),
                                   ("Condition B is treated with drug A; in children too.", "yes"))]
    meta, splits = run_prepare(tmp_path, tiny_model, write_jsonl(tmp_path / "c.jsonl", rows + rows[:1]))
    assert meta["rows"]["kept"] == 3 and meta["rows"]["dropped_by_reason"] == {"duplicate of an earlier row": 1}


def test_a_question_with_two_rows_does_not_leave_a_split_empty():
    """Split targets count rows and a question's rows stay together: 9 rows of 8 questions once left the test
    split empty for a quarter of the seeds (found by tests/test_hostile_input.py)."""
    from medpeft.records import split_records

    questions = ["0", "0", "1", "2", "3", "4", "00", "000", "0000"]
    records = [{"question": q, "answer": str(i)} for i, q in enumerate(questions)]
    for seed in range(200):
        out = split_records(records, 0.8, 0.5, seed)
        assert all(out[s] for s in ("train", "validation", "test")), (seed, {s: len(v) for s, v in out.items()})
        assert sum(len(v) for v in out.values()) == 9
        assert len({r["question"] for r in out["train"]} & {r["question"] for r in out["test"]}) == 0
