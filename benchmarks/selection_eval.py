"""Does selection on the validation split find settings that really help? The seed's settings against
`--learning_rate auto --select best` on a yes/no/maybe task with a skewed label prior, with the embedded model.

    python benchmarks/selection_eval.py [--epochs 2] [--methods qlora,adapter,ptuning]

The task is built from the bundled sample's facts (synthetic, not medical advice): a context of one or two
statements and a question about one fact. yes: the context states it; no: the context states another answer;
maybe: the context is about something else. Labels drawn 55/30/15 yes/no/maybe, splits by fact. Both runs go
through run_all (prepare, train, evaluate); "before" gives the seed's learning rates (2e-4 / 1e-4 / 5e-5) and keeps
the last step, "after" searches the learning rate and keeps the best checkpoint. Prints per method the validation
score each run selected, the candidates, test accuracy and macro-F1 and the predicted labels; writes
benchmarks/results/selection_eval.json.

    python benchmarks/selection_eval.py --sample --work selection_eval_sample      # the demo's settings
    python benchmarks/selection_eval.py --medquad ../shared/data/medquad.csv --work selection_eval_medquad

The same comparison on the bundled sample with the demo's settings (its hand-set learning rates replaced: the seed's
in "before", the search in "after"), and on a MedQuAD subset (free text: the validation score is minus the answer
loss); results in selection_eval_sample.json and selection_eval_medquad.json.
"""

import argparse
import json
import random
import sys
import time
from pathlib import Path

import yaml

HERE = Path(__file__).resolve().parent
METHODS = ("qlora", "adapter", "ptuning")
sys.path.insert(0, str(HERE.parent))

STATEMENT = {"treatment": "The first-line treatment of {s} is {a}.", "mechanism": "{S} works by {a}.",
             "test": "The test of choice for {s} is {a}.", "cause": "{S} is caused by {a}."}
QUESTION = {"treatment": "Is {a} the first-line treatment of {s}?", "mechanism": "Does {s} work by {a}?",
            "test": "Is {a} the test of choice for {s}?", "cause": "Is {s} caused by {a}?"}


def build(items_per_fact: int = 6, seed: int = 0) -> list[dict]:
    from medpeft.sample_data import FACTS

    rng = random.Random(seed)
    facts = [(k, s, a) for k, pairs in FACTS.items() for s, a in pairs]
    order = list(range(len(facts)))
    rng.shuffle(order)
    split_of = {i: "test" if n % 8 == 0 else "validation" if n % 8 == 1 else "train" for n, i in enumerate(order)}
    rows = []
    for i, (kind, s, a) in enumerate(facts):
        same_kind = [f for f in facts if f[0] == kind and f[1] != s]
        for _ in range(items_per_fact):
            label = rng.choices(["yes", "no", "maybe"], weights=[55, 30, 15])[0]
            other = rng.choice(same_kind)
            asked = a if label != "no" else other[2]
            about = (kind, s, a) if label != "maybe" else other
            filler = rng.choice([f for f in facts if f[1] not in (s, other[1])])
            sentences = [STATEMENT[about[0]].format(s=about[1], S=about[1][0].upper() + about[1][1:], a=about[2]),
                         STATEMENT[filler[0]].format(s=filler[1], S=filler[1][0].upper() + filler[1][1:],
                                                     a=filler[2])]
            rng.shuffle(sentences)
            rows.append({"question": QUESTION[kind].format(s=s, a=asked), "context": " ".join(sentences),
                         "final_decision": label, "split": split_of[i]})
    return rows


def main(argv=None):
    from medpeft.cli import run

    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--work", default="selection_eval")
    p.add_argument("--epochs", type=float, default=2)
    p.add_argument("--items_per_fact", type=int, default=6)
    p.add_argument("--methods", default="qlora,adapter,ptuning")
    p.add_argument("--medquad", help="instead: MedQuAD's CSV, a subset of --max_rows rows, free-text answers")
    p.add_argument("--sample", action="store_true", help="instead: the demo's settings on the bundled sample")
    p.add_argument("--max_rows", type=int, default=1200)
    p.add_argument("--max_steps", type=int, default=40)
    p.add_argument("--model", default="smollm2-135m", help="the base model (a .gguf file works; on the GPU machine "
                                                             "the embedded package is absent)")
    p.add_argument("--name", help="results file name (default: by task)")
    args = p.parse_args(argv)
    work = Path(args.work)
    work.mkdir(exist_ok=True)
    if args.sample:
        demo = yaml.safe_load((HERE.parent / "medpeft" / "resources" / "demo.yaml").read_text())
        sections = {m: {k: v for k, v in demo.pop(m).items() if k != "learning_rate"} for m in METHODS}
        demo.pop("output_root")
        common, rows, prior, name = demo | sections | {"methods": args.methods}, None, None, "selection_eval_sample"
    elif args.medquad:
        import csv

        with open(args.medquad, newline="", encoding="utf-8") as f:
            subset = [r for _, r in zip(range(args.max_rows), csv.DictReader(f))]
        data, prior, name = work / "medquad_subset.csv", None, "selection_eval_medquad"
        with open(data, "w", newline="", encoding="utf-8") as f:
            writer = csv.DictWriter(f, fieldnames=list(subset[0]))
            writer.writeheader()
            writer.writerows(subset)
        common = {"input_data": str(data), "model_name": args.model, "max_steps": args.max_steps,
                  "batch_size": 8, "dtype": "auto", "max_samples": 40, "eval_batch_size": 16, "max_new_tokens": 16,
                  "max_length": 256, "methods": args.methods, "max_eval_samples": 48, "group_by": "focus",
                  "gradient_checkpointing": False, "eval_steps": 10}
        rows = None
    else:
        data, name = work / "ynm.jsonl", "selection_eval"
        rows = build(args.items_per_fact)
        data.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
        prior = {s: {k: sum(r["final_decision"] == k and r["split"] == s for r in rows)
                     for k in ("yes", "no", "maybe")} for s in ("train", "validation", "test")}
        common = {"input_data": str(data), "model_name": args.model, "num_epochs": args.epochs,
                  "batch_size": 16, "dtype": "auto", "system_prompt": "Answer briefly.", "max_samples": -1,
                  "eval_batch_size": 32, "max_new_tokens": 4, "max_length": 256, "methods": args.methods,
                  "max_eval_samples": 64, "gradient_checkpointing": False}
    seed_lr = {"qlora": 2e-4, "adapter": 1e-4, "ptuning": 5e-5}
    runs = {"before": common | {"select": "last"} | {m: common.get(m, {}) | {"learning_rate": seed_lr[m]}
                                                     for m in seed_lr},
            "after": common | {"select": "best"}}
    out = {"created": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "items": len(rows) if rows else None,
           "label_counts": prior, "settings": common, "runs": {}}
    for run_name, settings in runs.items():
        (work / f"{run_name}.yaml").write_text(yaml.safe_dump(settings | {"output_root": str(work / run_name)}))
        t0 = time.time()
        argv = ["--config", str(work / f"{run_name}.yaml")]
        assert run(argv, prog="run_all.py", command="run") == 0
        results = json.loads((work / run_name / "evaluation_results.json").read_text())
        entry = {"seconds": round(time.time() - t0, 1),
                 "majority": (results.get("majority_baseline") or {}).get("accuracy")}
        for method, e in results["models"].items():
            c = e.get("choice") or {}
            row = {"accuracy": c.get("accuracy_loglik"), "macro_f1": c.get("macro_f1_loglik"),
                   "predicted": c.get("picks", {}).get("loglik", {}).get("predicted"),
                   "collapsed": c.get("picks", {}).get("loglik", {}).get("collapsed"),
                   "accuracy_letter": c.get("accuracy_letter"), "macro_f1_letter": c.get("macro_f1_letter")}
            if method != "base":
                metrics = json.loads((work / run_name / "models" / method / "metrics.json").read_text())
                sel, search = metrics.get("selection") or {}, metrics.get("learning_rate_search")
                row |= {"learning_rate": json.loads((work / run_name / "models" / method / "medpeft_config.json")
                                                    .read_text())["settings"]["learning_rate"],
                        "validation_score": (metrics.get("validation_score") or {}).get("score"),
                        "chosen_step": sel.get("chosen_step"), "steps": metrics["steps"],
                        "validation_history": [(h["step"], h["score"]) for h in sel.get("history", [])],
                        "train_s": metrics["train_runtime_s"],
                        "search": search and {k: search.get(k) for k in ("candidates", "winner", "margin", "seconds",
                                                                         "cost_ratio", "steps_per_candidate", "guard")}}
            entry[method] = row
        out["runs"][run_name] = entry
    from medpeft.precision import cpu_name, explain

    import torch

    out["cpu"], out["compute"] = cpu_name(), explain("auto", "cpu")
    if torch.cuda.is_available():
        out["gpu"], out["compute"] = torch.cuda.get_device_name(0), "bfloat16 on the GPU"
    path = HERE / "results" / f"{args.name or name}.json"
    path.write_text(json.dumps(out, indent=1), encoding="utf-8")
    print(json.dumps(out, indent=1)[:6000])
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
