"""Precision and recall of the patient-data screen (`--phi`) on a labelled set written for it.

    python benchmarks/phi_eval.py                       # tests/data/phi_labelled.jsonl
    python benchmarks/phi_eval.py --data my_labels.jsonl
    python benchmarks/phi_eval.py --corpus ../shared/data/medquad.csv --column answer   # what it flags in a corpus

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
    p.add_argument("--output", default=None, help="default: results/phi_eval.json, or phi_corpus.json with --corpus")
    p.add_argument("--corpus", help="a CSV file to screen instead of the labelled set")
    p.add_argument("--column", default="answer", help="the --corpus column to screen")
    args = p.parse_args(argv)
    if args.corpus:
        return corpus(args)
    args.output = args.output or str(HERE / "results" / "phi_eval.json")
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


def corpus(args):
    import csv
    from collections import Counter

    import phonenumbers

    from medpeft.phi import find

    with open(args.corpus, newline="", encoding="utf-8") as f:
        texts = [row.get(args.column) or "" for row in csv.DictReader(f)]
    counts, shape_only = Counter(), []
    for text in texts:
        spans = find(text)
        counts.update(k for *_, k in spans)
        known = [(m.start, m.end) for m in phonenumbers.PhoneNumberMatcher(text, "US", leniency=phonenumbers.Leniency.VALID)]
        shape_only += [text[max(0, a - 30):b + 10].replace("\n", " ") for a, b, k in spans
                       if k == "PHONE" and not any(x < b and a < y for x, y in known)]
    print(f"{len(texts)} texts in {args.corpus} ({args.column}); spans flagged: {dict(counts.most_common())}")
    print(f"phone numbers only the shape rules found: {len(shape_only)}" + "".join(f"\n  ...{t}..." for t in shape_only[:40]))
    out = Path(args.output or HERE / "results" / "phi_corpus.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"corpus": Path(args.corpus).name, "column": args.column, "texts": len(texts),
                               "spans": dict(counts), "shape_only_phones": shape_only}, indent=1), encoding="utf-8")


if __name__ == "__main__":
    main()
