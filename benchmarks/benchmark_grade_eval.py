"""Benchmark-grade evaluation, end to end on the embedded model: long contexts, every test item, the label prior,
and lm-eval over local task files for the base and the demo's trained outputs.

    make demo                                   # trains demo_output/models/{qlora,adapter,ptuning}
    python benchmarks/benchmark_grade_eval.py   # [--contexts ../shared/data/medquad.csv] [--limit 200]

1. Writes a PubMedQA-layout file (1,000 items with a split column: 450 train, 50 validation, 500 test) whose
   contexts run 600-1,200 tokens, built from MedQuAD answers (--contexts) or the bundled sample; labels drawn
   55/30/15 yes/no/maybe. Prepares it at --max_length 512 and evaluates the base model on every test item.
2. Writes local task files: MedQA layout from the demo's own test split (items no method trained on), PubMedQA
   layout from step 1's test items, and a general (arithmetic) set for the forgetting check; runs `medpeft bench`
   on the base and the three demo outputs.
Writes benchmarks/results/benchmark_grade_eval.json and prints the tables.
"""

import argparse
import csv
import json
import random
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))


def passages(path: str | None) -> list[str]:
    if path and Path(path).is_file():
        with open(path, newline="", encoding="utf-8") as f:
            return [r["answer"] for r in csv.DictReader(f) if len(r.get("answer") or "") > 200]
    from medpeft.sample_data import build

    return [r["answer"] for r in build() if r["options"] is None]


def long_pubmedqa(path: Path, texts: list[str], tokenizer, seed: int = 0) -> dict:
    rng = random.Random(seed)
    rows, lengths = [], []
    for i in range(1000):
        target, context = rng.randint(600, 1200), ""
        while True:
            longer = (context + " " + rng.choice(texts)).strip()
            ids = tokenizer(longer, add_special_tokens=False)["input_ids"]
            if len(ids) >= target:
                context = tokenizer.decode(ids[:target])
                break
            context = longer
        lengths.append(len(tokenizer(context, add_special_tokens=False)["input_ids"]))
        rows.append({"QUESTION": f"Does the finding reported in study {i} apply to adults?", "CONTEXTS": [context],
                     "final_decision": rng.choices(["yes", "no", "maybe"], weights=[55, 30, 15])[0],
                     "split": "train" if i < 450 else "validation" if i < 500 else "test"})
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return {"items": len(rows), "context_tokens_min": min(lengths), "context_tokens_max": max(lengths)}


def main(argv=None):
    from medpeft.cli import run
    from medpeft.modeling import load_tokenizer, resolve_model

    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--contexts", default=str(HERE.parent.parent / "shared" / "data" / "medquad.csv"))
    p.add_argument("--demo", default="demo_output", help="the demo's output root (make demo)")
    p.add_argument("--work", default="benchmark_grade_eval")
    p.add_argument("--limit", type=int, default=-1)
    args = p.parse_args(argv)
    work = Path(args.work)
    work.mkdir(exist_ok=True)
    tokenizer = load_tokenizer(resolve_model("smollm2-135m"))
    out = {"created": time.strftime("%Y-%m-%dT%H:%M:%S%z")}

    t0 = time.time()
    out["pubmedqa_file"] = long_pubmedqa(work / "pubmedqa_long.jsonl", passages(args.contexts), tokenizer)
    assert run(["prepare", "--input_data", str(work / "pubmedqa_long.jsonl"), "--output_dir", str(work / "data"),
                "--model_name", "smollm2-135m", "--max_length", "512", "--train_size", "0.8"]) == 0
    meta = json.loads((work / "data" / "metadata.json").read_text())
    out["prepare"] = {k: meta[k] for k in ("counts", "predefined_items", "contexts_shortened")} | {
        "truncated": meta["tokens"]["truncated"], "seconds": round(time.time() - t0, 1)}
    t0 = time.time()
    assert run(["evaluate", "--base_model", "smollm2-135m", "--test_data", str(work / "data" / "test.json"),
                "--output_file", str(work / "eval" / "evaluation_results.json"), "--max_samples", "-1",
                "--max_new_tokens", "4", "--batch_size", "16"]) == 0
    results = json.loads((work / "eval" / "evaluation_results.json").read_text())
    base = results["models"]["base"]["choice"]
    out["evaluate"] = {"coverage": results["coverage"]["line"], "majority": {
        k: results["majority_baseline"][k] for k in ("label", "names", "prior", "accuracy", "macro_f1")},
        "base": {k: base[k] for k in ("accuracy_loglik", "macro_f1_loglik", "accuracy_letter", "macro_f1_letter")}
        | {"predicted_loglik": base["picks"]["loglik"]["predicted"],
           "predicted_letter": base["picks"]["letter"]["predicted"]},
        "seconds": round(time.time() - t0, 1)}

    local = work / "tasks"
    local.mkdir(exist_ok=True)
    demo_test = json.loads((Path(args.demo) / "processed_data" / "test.json").read_text())
    medqa = [{"question": r["question"], "options": r["options"], "answer_idx": r["label"]} for r in demo_test
             if r.get("options")]
    (local / "medqa_test.jsonl").write_text("".join(json.dumps(r) + "\n" for r in medqa), encoding="utf-8")
    pubmed = [json.loads(line) for line in (work / "pubmedqa_long.jsonl").read_text().splitlines()]
    (local / "pubmedqa_test.jsonl").write_text("".join(json.dumps(r) + "\n" for r in pubmed if r["split"] == "test"),
                                               encoding="utf-8")
    rng = random.Random(1)
    general = []
    for _ in range(100):
        a, b = rng.randint(2, 60), rng.randint(2, 60)
        wrong = rng.sample([a + b + d for d in (-10, -2, -1, 1, 2, 10) if a + b + d > 0], 3)
        options = [a + b] + wrong
        rng.shuffle(options)
        general.append({"question": f"What is {a} plus {b}?", "options": {k: str(v) for k, v in zip("ABCD", options)},
                        "answer_idx": "ABCD"[options.index(a + b)]})
    (local / "general_test.jsonl").write_text("".join(json.dumps(r) + "\n" for r in general), encoding="utf-8")
    models = Path(args.demo) / "models"
    t0 = time.time()
    argv = ["bench", "--base_model", "smollm2-135m", "--tasks", "medqa_local,pubmedqa_local", "--general_tasks",
            "general_local", "--data_dir", str(local), "--output_file", str(work / "bench" / "evaluation_results.json"),
            "--limit", str(args.limit), "--batch_size", "16", "--max_length", "2048"]
    for name in ("qlora", "adapter", "ptuning"):
        if (models / name).is_dir():
            argv += [f"--{name}_model", str(models / name)]
    assert run(argv) == 0
    bench = json.loads((work / "bench" / "evaluation_results.json").read_text())["bench"]
    out["bench"] = {"seconds": round(time.time() - t0, 1), "items": {"medqa_local": len(medqa), "pubmedqa_local": 500,
                                                                      "general_local": 100},
                    "models": {m: {t: {k: v for k, v in r.items() if k not in ("hits", "picks")}
                                   for t, r in tasks.items()} for m, tasks in bench["models"].items()}}
    from medpeft.precision import cpu_name, explain

    out["cpu"], out["compute"] = cpu_name(), explain("auto", "cpu")
    path = HERE / "results" / "benchmark_grade_eval.json"
    path.write_text(json.dumps(out, indent=1), encoding="utf-8")
    print(json.dumps({k: out[k] for k in ("pubmedqa_file", "prepare", "evaluate")}, indent=1))
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
