"""The patient-data screen (--phi): phone numbers whatever their exchange, clinical numbers left alone, the
labelled sets, and redaction through prepare."""

import json
from pathlib import Path

import pytest

from conftest import write_jsonl
from medpeft import phi
from medpeft.cli import run

DATA = Path(__file__).parent / "data"


@pytest.mark.parametrize("text,phone", [
    ("call 555-201-7789 with questions", "555-201-7789"),  # an unassigned exchange: libphonenumber says invalid
    ("cell (555) 318-4420 after 6", "(555) 318-4420"),
    ("work 555.902.1133 x14, mornings", "555.902.1133 x14"),
    ("clinic 1-555-244-9087 ext. 302", "1-555-244-9087 ext. 302"),
    ("reached at +1 555 610 2289 today", "+1 555 610 2289"),
    ("pharmacy fax 5554031876", "5554031876"),
    ("office 617-555-0142 extension 9", "617-555-0142 extension 9"),
])
def test_phone_shaped_numbers_are_found_with_their_extension(text, phone):
    assert [(text[a:b], kind) for a, b, kind in phi.find(text)] == [(phone, "PHONE")]
    assert "[PHONE]" in phi.redact(text)[0] and phone not in phi.redact(text)[0]


@pytest.mark.parametrize("text", [
    "Titrate 100-200-400 mg over three weeks.",
    "Ferritin 120-300-450 ng/mL, platelets 150-400 x10^9/L, INR 2.0-3.0.",
    "Target 120-130 mmHg, heart rate 60-100 bpm, HbA1c 6.5-7.0%.",
    "Dose escalation 250-500-750 mg twice daily.",
    "Lot 4471029 expires 2027-03-15; NDC 0002-3227-30; ISBN 978-0-12-345678-9.",
    "CD4 count 350-500 cells/mm3 and 10,000-20,000 copies/mL.",
])
def test_clinical_values_are_not_phone_numbers(text):
    assert [k for *_, k in phi.find(text) if k == "PHONE"] == []


@pytest.mark.parametrize("name", ["phi_labelled.jsonl", "phi_holdout.jsonl"])
def test_the_labelled_sets(name):
    """No false alarm on either set (its negatives are full of clinical numbers), and every phone number found,
    the unassigned-exchange ones and extensions included."""
    rows = [json.loads(line) for line in (DATA / name).read_text().splitlines() if line.strip()]
    result = phi.score_labelled(rows)
    assert result["overall"]["false_pos"] == 0, result["false_alarms"]
    assert result["per_type"]["PHONE"]["false_neg"] == 0, result["misses"]
    assert sum(e["type"] == "PHONE" and "555-" in e["text"] for r in rows for e in r["entities"]) >= 3


def test_prepare_redacts_an_unassigned_phone_number(tmp_path, tiny_model):
    rows = [{"question": f"What should patient {i} do?", "answer": "Rest; call 555-201-7789 with questions."}
            for i in range(10)]
    out = tmp_path / "out"
    assert run(["prepare", "--input_data", str(write_jsonl(tmp_path / "d.jsonl", rows)), "--output_dir", str(out),
                "--model_name", tiny_model, "--phi", "redact"]) == 0
    written = [r for s in ("train", "validation", "test") for r in json.loads((out / f"{s}.json").read_text())]
    assert len(written) == 10 and "555-201-7789" not in json.dumps(written)
    assert all(r["answer"] == "Rest; call [PHONE] with questions." for r in written)
