"""Precision and recall of the patient-data screen (`--phi`) on a labelled set written for it.

    python benchmarks/phi_eval.py                       # tests/data/phi_labelled.jsonl
    python benchmarks/phi_eval.py --data my_labels.jsonl

Each line: {"text": "...", "entities": [{"type": "EMAIL|PHONE|SSN|RECORD_ID|DOB|DATE|ADDRESS", "text": "..."}]};
lines with no entities are negatives (clinical numbers that must not be flagged). Prints a table, the misses and
false alarms, and writes benchmarks/results/phi_eval.json.
"""

import argparse
import json
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))


def main(argv=None):
    from medpeft.phi import score_labelled

    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--data", default=str(HERE.parent / "tests" / "data" / "phi_labelled.jsonl"))
    p.add_argument("--output", default=str(HERE / "results" / "phi_eval.json"))
    args = p.parse_args(argv)
    rows = [json.loads(line) for line in Path(args.data).read_text(encoding="utf-8").splitlines() if line.strip()]
    result = score_labelled(rows)
    print(f"{result['texts']} texts, {result['entities']} labelled identifiers\n")
    print("| type | precision | recall | found right | false alarms | missed |\n|---|---:|---:|---:|---:|---:|")
    for kind, r in [*result["per_type"].items(), ("**all**", result["overall"])]:
        print(f"| {kind} | {r['precision']} | {r['recall']} | {r['true_pos']} | {r['false_pos']} | {r['false_neg']} |")
    for title, items in (("missed", result["misses"]), ("false alarms", result["false_alarms"])):
        print(f"\n{title}:" + "".join(f"\n  {x}" for x in items) if items else f"\n{title}: none")
    Path(args.output).parent.mkdir(parents=True, exist_ok=True)
    Path(args.output).write_text(json.dumps(result, indent=1), encoding="utf-8")


if __name__ == "__main__":
    main()
