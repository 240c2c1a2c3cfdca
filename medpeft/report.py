"""evaluation_results.json -> report.md (+ report_files/*.png) and a self-contained report.html.

The report reads nothing but the results file:  python -m medpeft.report evaluation_results.json
"""

from __future__ import annotations

import base64
import html
import io
import json
import sys
from pathlib import Path

from .errors import UsageError
from .outputs import atomic_write, selection_lines

COLUMNS = [  # (header, getter)
    ("model", lambda e: e["name"]),
    ("status", lambda e: e["status"] if e["status"] == "ok" else f"failed: {e['error']}"),
    ("loss", lambda e: _f(e, "loss", "loss", 3)),
    ("perplexity [95% CI]", lambda e: _ppl(e)),
    ("ROUGE-L [95% CI]", lambda e: _ci(e, "generation", "rougeL", "rougeL_ci")),
    ("BLEU", lambda e: _f(e, "generation", "bleu", 2)),
    ("token F1", lambda e: _f(e, "generation", "token_f1", 3)),
    ("MC acc. option text [95% CI]", lambda e: _ci(e, "choice", "accuracy_loglik", "accuracy_loglik_ci")),
    ("MC macro-F1", lambda e: _f(e, "choice", "macro_f1_loglik", 3)),
    ("gain vs base", lambda e: _gain(e)),
    ("gain vs majority", lambda e: _gain(e, "majority")),
    ("MC acc. letters, lm-eval format [95% CI]", lambda e: _ci(e, "choice", "accuracy_letter", "accuracy_letter_ci")),
    ("MC acc. generated", lambda e: _f(e, "choice", "accuracy_generate", 3)),
    ("unparseable", lambda e: _f(e, "choice", "unparseable_rate", 3)),
    ("trainable params", lambda e: _int(e, "trainable_parameters")),
    ("size MB", lambda e: _mb(e)),
    ("train s", lambda e: _f(e, "efficiency", "train_runtime_s", 0)),
    ("train tok/s", lambda e: _f(e, "efficiency", "train_tokens_per_s", 0)),
    ("peak mem GB", lambda e: _f(e, "efficiency", "peak_memory_gb", 2)),
    ("s/answer", lambda e: _f(e, "efficiency", "latency_s_per_answer", 3)),
    ("gen tok/s", lambda e: _f(e, "efficiency", "generated_tokens_per_s", 1)),
    ("merged s/answer", lambda e: _f(e, "efficiency", "merged_latency_s_per_answer", 3)),
]


def _f(entry, group, key, digits):
    value = (entry.get(group) or {}).get(key)
    return "–" if value is None else f"{value:.{digits}f}"


def _ci(entry, group, key, ci_key):
    part = entry.get(group) or {}
    if part.get(key) is None:
        return "–"
    lo, hi = part.get(ci_key, [None, None])
    return f"{part[key]:.3f} [{lo:.3f}, {hi:.3f}]"


def _ppl(entry):
    part = entry.get("loss") or {}
    if part.get("perplexity") is None:
        return "–"
    ci = part.get("perplexity_ci")
    return f"{part['perplexity']:.2f}" + (f" [{ci[0]:.2f}, {ci[1]:.2f}]" if ci else "")


def _gain(entry, against="base", suffix=""):
    choice = entry.get("choice") or {}
    key = f"gain_vs_{against}{suffix}"
    if key not in choice:
        return "–"
    lo, hi = choice[f"{key}_ci"]
    significant = choice[_significant_key(against, suffix)]
    verdict = "outside the interval: significant" if significant else "within noise"
    return f"{choice[key]:+.3f} [{lo:+.3f}, {hi:+.3f}] {verdict}"


def _significant_key(against: str, suffix: str) -> str:
    return f"gain_significant{suffix}" if against == "base" else f"gain_vs_{against}_significant{suffix}"


def _verdict(entry, suffix="") -> str:
    """Better than the base model, and better than always answering the most frequent label: two questions."""
    c = entry.get("choice") or {}

    def one(against, what):
        key, significant = f"gain_vs_{against}{suffix}", c.get(_significant_key(against, suffix))
        if key not in c:
            return None
        if significant:
            return f"{'better' if c[key] > 0 else 'worse'} than {what}"
        return f"not distinguishable from {what}"

    parts = [one("base", "the base model"), one("majority", "always answering the majority label")]
    return "; ".join(p for p in parts if p) or "–"


def classification_lines(results: dict) -> list[str]:
    """The majority baseline, and per model and scoring: accuracy beside macro-F1, the predicted labels, the
    verdicts against the base and the majority, collapse; then the confusion matrices."""
    maj = results.get("majority_baseline")
    models = [e for e in results["models"].values() if e.get("status") == "ok" and e.get("choice")]
    if not maj or not models:
        return []
    names = maj.get("names") or {k: k for k in maj["prior"]}
    labels = list(names)
    shares = ", ".join(f"{names[k]} {v:.0%}" for k, v in maj["prior"].items())
    test_shares = ", ".join(f"{names[k]} {v:.0%}" for k, v in maj["test_prior"].items())
    lo, hi = maj["accuracy_ci"]
    lines = [f"Majority-class baseline: always answering '{names[maj['label']]}' (the most frequent label of "
             f"{maj['source']}: {shares}; test items: {test_shares}) scores accuracy {maj['accuracy']:.3f} "
             f"[{lo:.3f}, {hi:.3f}], macro-F1 {maj['macro_f1']:.3f}.", "",
             "| model | scoring | accuracy | macro-F1 | predicted labels | verdict | collapsed |",
             "|---|---|---:|---:|---|---|---|"]
    for e in models:
        c = e["choice"]
        for scoring, title, suffix in (("loglik", "option text", ""), ("letter", "letters (lm-eval)", "_letter")):
            p = c["picks"][scoring]
            predicted = ", ".join(f"{names.get(k, k)} {n}" for k, n in p["predicted"].items())
            collapsed = (f"yes: {p['collapsed_share']:.0%} '{names.get(p['collapsed'], p['collapsed'])}'"
                         if p["collapsed"] else "no")
            lines.append(f"| {e['name']} | {title} | {p['accuracy']:.3f} | {p['macro_f1']:.3f} | {predicted} | "
                         f"{_verdict(e, suffix)} | {collapsed} |")
    for e in models:
        confusion = e["choice"]["picks"]["loglik"]["confusion"]
        lines += ["", f"Confusion of {e['name']} (option text; rows: right label, columns: picked):", "",
                  "| right \\ picked | " + " | ".join(names[k] for k in labels) + " |",
                  "|---|" + "---:|" * len(labels)]
        lines += [f"| {names[g]} | " + " | ".join(str(confusion[g][k]) for k in labels) + " |" for g in labels]
    return lines


def _int(entry, key):
    value = (entry.get("efficiency") or {}).get(key)
    return "–" if value is None else f"{value:,}"


def _mb(entry):
    value = (entry.get("efficiency") or {}).get("size_bytes")
    return "–" if value is None else f"{value / 2**20:.1f}"


def summary_rows(results: dict) -> list[list[str]]:
    return [[get(e) for _, get in COLUMNS] for e in results["models"].values()]


def _figures(results: dict) -> dict[str, bytes]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    models = [e for e in results["models"].values() if e["status"] == "ok"]
    names = [e["name"] for e in models]
    figures = {}

    def png(fig):
        buf = io.BytesIO()
        fig.savefig(buf, format="png", dpi=110, bbox_inches="tight")
        plt.close(fig)
        return buf.getvalue()

    panels = [(g, k, c, t) for g, k, c, t in (("choice", "accuracy_loglik", "accuracy_loglik_ci", "MC accuracy"),
                                              ("generation", "rougeL", "rougeL_ci", "ROUGE-L"))
              if any(e.get(g) for e in models)]
    if panels:
        fig, axes = plt.subplots(1, len(panels), figsize=(5 * len(panels), 3.2), squeeze=False)
        for ax, (group, key, ci_key, title) in zip(axes[0], panels):
            vals = [(e.get(group) or {}).get(key, 0) for e in models]
            cis = [(e.get(group) or {}).get(ci_key, [v, v]) for e, v in zip(models, vals)]
            err = [[v - lo for v, (lo, _) in zip(vals, cis)], [hi - v for v, (_, hi) in zip(vals, cis)]]
            ax.bar(names, vals, yerr=err, capsize=4, color="#4c72b0")
            ax.set_title(f"{title} (95% bootstrap CI)")
            ax.set_ylim(0, 1)
        figures["metrics"] = png(fig)
    curves = [e for e in models if (e.get("training") or {}).get("loss_curve")]
    if curves:
        fig, ax = plt.subplots(figsize=(6, 3.2))
        for e in curves:
            points = e["training"]["loss_curve"]
            ax.plot([p["step"] for p in points], [p["loss"] for p in points], label=e["name"])
        ax.set_xlabel("step")
        ax.set_ylabel("training loss")
        ax.set_title("Training loss")
        ax.legend()
        figures["loss_curves"] = png(fig)
    trained = [e for e in models if (e.get("efficiency") or {}).get("train_runtime_s") is not None]
    if trained:
        fig, axes = plt.subplots(1, 2, figsize=(9, 3.2))
        axes[0].bar([e["name"] for e in trained], [e["efficiency"]["train_runtime_s"] for e in trained], color="#55a868")
        axes[0].set_title("training time (s)")
        axes[1].bar([e["name"] for e in trained], [e["efficiency"]["peak_memory_gb"] or 0 for e in trained],
                    color="#c44e52")
        axes[1].set_title("peak memory (GB)")
        figures["time_memory"] = png(fig)
    return figures


def _samples(results: dict) -> list[dict]:
    models = [e for e in results["models"].values() if e["status"] == "ok" and e.get("samples")]
    if not models:
        return []
    rows = []
    for i, sample in enumerate(models[0]["samples"]):
        row = {"question": sample["question"], "reference": sample["reference"]}
        for e in models:
            if i < len(e["samples"]):
                row[e["name"]] = e["samples"][i]["answer"]
        rows.append(row)
    return rows


def _quality(entry: dict) -> tuple[str, float] | None:
    """The measure methods are ranked by: MC accuracy where there are choice items, else ROUGE-L, else
    minus the perplexity."""
    if entry.get("choice"):
        return "MC accuracy", entry["choice"]["accuracy_loglik"]
    if entry.get("generation"):
        return "ROUGE-L", entry["generation"]["rougeL"]
    if entry.get("loss"):
        return "-perplexity", -entry["loss"]["perplexity"]
    return None


def _selected(training: dict) -> str:
    """How the ranked weights were chosen: the searched learning rate and the checkpoint kept."""
    parts = []
    if training.get("learning_rate_search"):
        search = training["learning_rate_search"]
        guard = search.get("guard") or {}
        parts.append(f"lr {guard['default']:.2g}, the default, kept over the searched {search['winner']:.2g}"
                     if guard.get("kept") == "default" else f"lr {search['winner']:.2g} searched")
        parts[-1] += f" ({search['seconds'] + guard.get('seconds', 0):.0f} s)"
    chosen = training.get("selection")
    if chosen and chosen.get("chosen_step") is not None:
        parts.append(f"step {chosen['chosen_step']} of {chosen['last_step']} ({chosen['select']})")
    return "; ".join(parts) or "as given, last step"


def recommend(results: dict, memory_gb: float | None = None) -> list[dict]:
    """Fine-tuned methods ranked by measured quality; `fits` = peak training memory within `memory_gb`;
    `pareto` = no other fitting method is at least as good in quality, memory and training time and better in one."""
    rows = []
    for name, entry in results["models"].items():
        if name == "base" or entry.get("status") != "ok" or _quality(entry) is None:
            continue
        eff = entry.get("efficiency", {})
        measure, value = _quality(entry)
        rows.append({"method": name, "measure": measure, "quality": value, "memory_gb": eff.get("peak_memory_gb"),
                     "train_s": eff.get("train_runtime_s"), "size_mb": round((eff.get("size_bytes") or 0) / 1e6, 2),
                     "fits": memory_gb is None or (eff.get("peak_memory_gb") or 0) <= memory_gb,
                     "selected": _selected(entry.get("training") or {})})
    fitting = [r for r in rows if r["fits"]]
    for r in rows:
        keys = ("quality", "memory_gb", "train_s")

        def better_or_equal(o, r=r):
            return (o["quality"] >= r["quality"] and (o["memory_gb"] or 0) <= (r["memory_gb"] or 0)
                    and (o["train_s"] or 0) <= (r["train_s"] or 0))

        r["pareto"] = r["fits"] and not any(
            o is not r and better_or_equal(o) and any(o[k] != r[k] for k in keys) for o in fitting)
    return sorted(rows, key=lambda r: (not r["fits"], -r["quality"]))


def recommend_lines(results: dict, memory_gb: float | None = None) -> list[str]:
    rows = recommend(results, memory_gb)
    budget = f"a {memory_gb:g} GB memory budget" if memory_gb is not None else "no memory budget"
    if not rows:
        return ["no fine-tuned method with results to rank"]
    lines = [f"methods ranked by {rows[0]['measure']} under {budget} (memory = peak during training, as measured):",
             "| rank | method | " + rows[0]["measure"] + " | peak memory GB | train s | weights MB | fits | Pareto "
             "| settings selected |", "|---:|---|---:|---:|---:|---:|---|---|---|"]
    for i, r in enumerate(rows, start=1):
        lines.append(f"| {i if r['fits'] else '-'} | {r['method']} | {r['quality']:.4g} | {r['memory_gb']} | "
                     f"{r['train_s']} | {r['size_mb']} | {'yes' if r['fits'] else 'no'} | "
                     f"{'yes' if r['pareto'] else ''} | {r['selected']} |")
    best = next((r for r in rows if r["fits"]), None)
    lines.append(f"recommended: {best['method']}" if best else "recommended: none fits; lower the memory need "
                 "(4-bit base, smaller --batch_size, shorter --max_length) or raise the budget")
    return lines


def _lines_html(lines: list[str]) -> str:
    """Markdown table rows as an HTML table, other lines as paragraphs."""
    esc, out, rows = html.escape, [], []
    for line in lines + [""]:
        if line.startswith("|"):
            if not set(line) <= set("|-: "):
                rows.append([c.strip() for c in line.strip("|").split("|")])
            continue
        if rows:
            out.append("<table><tr>" + "".join(f"<th>{esc(c)}</th>" for c in rows[0]) + "</tr>" + "".join(
                "<tr>" + "".join(f"<td>{esc(c)}</td>" for c in r) + "</tr>" for r in rows[1:]) + "</table>")
            rows = []
        if line:
            out.append(f"<p>{esc(line)}</p>")
    return "".join(out)


def bench_lines(results: dict) -> list[str]:
    """lm-eval's figures per task and model, the paired intervals against the base, the forgetting tasks apart."""
    bench = results.get("bench")
    if not bench:
        return []
    lines = [f"lm-eval {bench['lm_eval_version']}, zero-shot, `--limit {bench['limit']}`; accuracy ± lm-eval's "
             "stderr; gain vs base: paired bootstrap (95%) over the items both scored."]
    for title, tasks in (("Medical tasks", bench["tasks"]), ("Forgetting check: general tasks", bench["general"])):
        if not tasks:
            continue
        models = list(bench["models"])
        lines += ["", f"{title}:", "", "| task | items | majority | " + " | ".join(models) + " |",
                  "|---|---:|---:|" + "---|" * len(models)]
        for task in tasks:
            cells = []
            for m in models:
                r = bench["models"][m].get(task)
                if not r:
                    cells.append("failed" if bench["models"][m].get("_error") else "–")
                    continue
                cell = f"{r['acc']:.3f} ± {r['acc_stderr']:.3f}" if r.get("acc_stderr") is not None else f"{r['acc']:.3f}"
                if "gain_vs_base" in r:
                    lo, hi = r["gain_vs_base_ci"]
                    cell += f" ({r['gain_vs_base']:+.3f} [{lo:+.3f}, {hi:+.3f}]{' *' if r['significant'] else ''})"
                cells.append(cell)
            first = next((bench["models"][m][task] for m in models if bench["models"][m].get(task)), {})
            majority = f"{first['majority_acc']:.3f}" if first.get("majority_acc") is not None else "–"
            lines.append(f"| {task} | {first.get('items', 0)} | {majority} | " + " | ".join(cells) + " |")
    lines += ["", "* outside the paired interval: significant. majority: always giving the task's most frequent "
              "right answer (its prior on these items), the baseline an accuracy must beat to mean more than that."]
    errors = [f"{m}: {v['_error']}" for m, v in bench["models"].items() if v.get("_error")]
    return lines + [f"failed: {e}" for e in errors]


def read_results(path: Path) -> dict:
    """An evaluation results file (evaluate_models / run_all), or one line saying what it is not."""
    try:
        results = json.loads(Path(path).read_text(encoding="utf-8"))
        results["models"]
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise UsageError(f"--results: '{path}' is not a medpeft evaluation results file ({type(exc).__name__}); "
                         "run utils/evaluate_models.py first") from exc
    return results


def exported_lines(results: dict) -> list[str]:
    """`medpeft export --results`: each GGUF file against the merged model it was written from."""
    ex = results.get("exported")
    if not ex:
        return []
    merged = ex.get("merged") or {}
    lines = [f"{ex['source']}, merged and written to GGUF; each file loaded back (dequantized) and compared with the "
             "merged model" + (f" on {ex['test_items']} items of `{ex['test_data']}`." if ex.get("test_items") else "."),
             "", "| file | quant | size MB | max abs logit diff | greedy agreement | same token ids | test loss | "
             "loss vs merged | accuracy | accuracy vs merged [95% CI] |", "|---|---|---:|---:|---:|---|---:|---:|---:|---:|"]
    if merged:
        lines.append(f"| merged model | {'–'} | – | 0 | 1 | yes | {merged['loss']:.4f} | 0 | "
                     f"{merged.get('accuracy', '–')} | – |")
    for f in ex["files"]:
        t, rb = f.get("test") or {}, f["read_back"]
        vs = t.get("accuracy_vs_merged")
        row = (f"| `{Path(f['path']).name}` | {f['quant']} | {f['bytes'] / 1e6:.1f} | {rb['max_abs_logit_diff']:.4g} "
               f"| {rb['greedy_agreement']:.3f} | {'yes' if rb['same_token_ids'] else 'NO'} | ")
        if t:
            row += (f"{t['loss']:.4f} | {t['loss_vs_merged']:+.4f} | {t.get('accuracy', '–')} | "
                    + (f"{vs['gain']:+.4f} [{vs['ci'][0]:+.3f}, {vs['ci'][1]:+.3f}] |" if vs else "– |"))
        lines.append(row if t else row + "– | – | – | – |")
    return lines + ["", ex["how"] + "."]


def write_report(results: dict, out_dir: Path) -> tuple[Path, Path]:
    out_dir.mkdir(parents=True, exist_ok=True)
    figures = _figures(results)
    headers = [h for h, _ in COLUMNS]
    rows = summary_rows(results)
    cover = (results.get("coverage") or {}).get("line")
    intro = (f"{results['test_items']} test items from `{results['test_data']}` "
             f"({results['choice_items']} multiple choice), created {results['created']}."
             + (f" Coverage: {cover}." if cover else "")) if results.get("models") else (
        f"Standard benchmarks only (medpeft bench), created {results['created']}; run utils/evaluate_models.py "
        "with the same --output_file for the test-split comparison.")

    files = out_dir / "report_files"
    files.mkdir(exist_ok=True)
    md = ["# medpeft evaluation report", "", intro]
    if rows:
        md += ["", "| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
        md += ["| " + " | ".join(c.replace("|", "/") for c in row) + " |" for row in rows]
    for name, data in figures.items():
        atomic_write(files / f"{name}.png", data)
        md += ["", f"![{name}](report_files/{name}.png)"]
    classes = classification_lines(results)
    if classes:
        md += ["", "## Classification: against the base and the label prior", ""] + classes
    selected = [line for e in results["models"].values() if (e.get("training") or {})
                for line in ([f"**{e['name']}**", ""] + selection_lines(e["training"])
                             if selection_lines(e["training"]) else [])]
    if selected:
        md += ["", "## How each method's settings were chosen", ""] + selected
    choosing = recommend_lines(results)
    md += ["", "## Choosing a method", ""] + choosing
    bench = bench_lines(results)
    if bench:
        md += ["", "## Standard benchmarks (lm-evaluation-harness)", ""] + bench
    exported = exported_lines(results)
    if exported:
        md += ["", "## Exported (GGUF)", ""] + exported
    how = [f"- **{k}**: {v}" for k, v in (results.get("scoring") or {}).items()]
    if how:
        md += ["", "## How the numbers were computed", ""] + how
    samples = _samples(results)
    if samples:
        md += ["", "## Answers side by side", ""]
        for row in samples:
            md += [f"**Q:** {row['question']}", "", f"- *reference*: {row['reference']}"]
            md += [f"- *{k}*: {v}" for k, v in row.items() if k not in ("question", "reference")] + [""]
    md_path = out_dir / "report.md"
    atomic_write(md_path, "\n".join(md) + "\n")

    esc = html.escape
    table = "<table><tr>" + "".join(f"<th>{esc(h)}</th>" for h in headers) + "</tr>" + "".join(
        "<tr>" + "".join(f"<td>{esc(c)}</td>" for c in row) + "</tr>" for row in rows) + "</table>" if rows else ""
    images = "".join(f'<figure><img alt="{esc(n)}" src="data:image/png;base64,{base64.b64encode(d).decode()}">'
                     f"</figure>" for n, d in figures.items())
    sample_html = "".join(
        f"<div class='qa'><p><b>Q:</b> {esc(r['question'])}</p><ul>" + "".join(
            f"<li><i>{esc(k)}</i>: {esc(v)}</li>" for k, v in r.items() if k != "question") + "</ul></div>"
        for r in samples)
    page = f"""<!doctype html><html lang="en"><head><meta charset="utf-8"><title>medpeft evaluation report</title>
<style>body{{font-family:sans-serif;margin:2em;max-width:1400px}}table{{border-collapse:collapse;font-size:13px}}
td,th{{border:1px solid #ccc;padding:4px 6px;text-align:right}}td:first-child,th:first-child{{text-align:left}}
img{{max-width:100%}}.qa{{border-top:1px solid #eee}}</style></head><body>
<h1>medpeft evaluation report</h1><p>{esc(intro)}</p>{table}{images}
{"<h2>Classification: against the base and the label prior</h2>" + _lines_html(classes) if classes else ""}
{"<h2>How each method's settings were chosen</h2>" + _lines_html(selected) if selected else ""}
<h2>Choosing a method</h2>{_lines_html(choosing)}
{"<h2>Standard benchmarks (lm-evaluation-harness)</h2>" + _lines_html(bench) if bench else ""}
{"<h2>Exported (GGUF)</h2>" + _lines_html(exported) if exported else ""}
{"<h2>How the numbers were computed</h2><ul>" + "".join(f"<li><b>{esc(k)}</b>: {esc(v)}</li>" for k, v in
 (results.get("scoring") or {}).items()) + "</ul>" if results.get("scoring") else ""}
<h2>Answers side by side</h2>{sample_html}
<p><small>Synthetic or research data; not medical advice.</small></p></body></html>"""
    html_path = out_dir / "report.html"
    atomic_write(html_path, page)  # last: a report.html is there only once every part of it is
    return md_path, html_path


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) != 1 or not Path(argv[0]).is_file():
        print("usage: python -m medpeft.report evaluation_results.json", file=sys.stderr)
        return 2
    path = Path(argv[0])
    md, page = write_report(json.loads(path.read_text(encoding="utf-8")), path.parent)
    print(f"wrote {md} and {page}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
