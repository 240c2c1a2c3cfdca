"""Local benchmark files for lm-evaluation-harness: any layout medpeft's prepare reads (MedQA's question/options/
answer_idx, MedMCQA's opa..opd/cop, PubMedQA's QUESTION/CONTEXTS/final_decision, ...), turned into the harness's
zero-shot prompts by the same functions medpeft's own letter scoring uses (medpeft/harness.py)."""

import datasets

from medpeft.config import PrepareConfig
from medpeft.harness import doc_choices, doc_to_text as harness_text
from medpeft.records import LETTERS, detect_schema, to_record


def process_docs(dataset: datasets.Dataset) -> datasets.Dataset:
    rows = list(dataset)
    schema = detect_schema(rows, PrepareConfig(input_data="-"))
    docs = []
    for row in rows:
        rec, _ = to_record(row, schema, "")
        if rec is None or not rec.get("options"):
            continue  # rows medpeft's prepare would not score either
        docs.append({"question": rec["question"], "options": [[k, v] for k, v in rec["options"].items()],
                     "context": rec.get("context") or "", "gold": LETTERS.index(rec["label"])})
    return datasets.Dataset.from_list(docs)


def doc_to_text(doc) -> str:
    return harness_text(doc["question"], dict(map(tuple, doc["options"])), doc["context"] or None)


def doc_to_choice(doc) -> list:
    return doc_choices(dict(map(tuple, doc["options"])))


def doc_to_text_medmcqa(doc) -> str:
    """MedMCQA's harness prompt has a 'Choices:' line."""
    options = dict(map(tuple, doc["options"]))
    return f"Question: {doc['question']}\nChoices:\n" + "".join(f"{k}. {v}\n" for k, v in options.items()) + "Answer:"
