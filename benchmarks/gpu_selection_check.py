"""The GPU path with selection on: every method trains on CUDA with packing and compiled layers (the GPU defaults)
while --select best scores the validation split between steps, and --learning_rate auto searches; the kept step's
validation score must equal the saved weights' score. A check, not a speed benchmark.

    python benchmarks/gpu_selection_check.py          # needs a CUDA GPU; writes benchmarks/results/gpu_selection_check.json
"""

import json
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
sys.path.insert(0, str(HERE.parent / "tests"))


def main():
    import torch

    from conftest import build_model_dir  # the tests' tiny random Mistral and offline tokenizer
    from medpeft import methods
    from medpeft.config import PrepareConfig, TrainConfig
    from medpeft.data import prepare
    from medpeft.sample_data import SAMPLE_PATH
    from medpeft.training import train

    assert torch.cuda.is_available(), "needs a CUDA GPU"
    root = Path(tempfile.mkdtemp())
    model = str(build_model_dir(root / "tiny"))
    data = root / "data"
    prepare(PrepareConfig(input_data=str(SAMPLE_PATH), output_dir=str(data), model_name=model), log=lambda *a: None)
    out = {"gpu": torch.cuda.get_device_name(0), "torch": torch.__version__, "runs": {}}
    cases = [("qlora", dict(lora_r=8, lora_alpha=16), dict(load_in_4bit=True)),
             ("adapter", dict(adapter_size=16), {}),
             ("ptuning", dict(num_virtual_tokens=8), {}),
             ("qlora-auto", dict(lora_r=8, lora_alpha=16), dict(load_in_4bit=True, learning_rate="auto"))]
    for name, options, extra in cases:
        method = name.split("-")[0]
        cfg = TrainConfig(**dict(model_name=model, data_path=str(data), output_dir=str(root / name), max_steps=12,
                                 batch_size=8, learning_rate=1e-3, eval_steps=3, max_eval_samples=32, save_steps=0,
                                 report_to="none", seed=0) | extra)
        lines, t0 = [], time.time()
        metrics = train(method, cfg, methods.get(method).Options(**options), log=lines.append)
        selection = metrics["selection"]
        speed = metrics["speed_settings"]
        result = {"seconds": round(time.time() - t0, 1), "speed": speed,
                  "history": [(h["step"], h["score"]) for h in selection["history"]],
                  "chosen_step": selection["chosen_step"], "best_score": selection["best"]["score"],
                  "saved_score": metrics["validation_score"]["score"],
                  "search": metrics.get("learning_rate_search", {}).get("candidates") and [
                      (c["learning_rate"], c["score"]) for c in metrics["learning_rate_search"]["candidates"]]}
        result["ok"] = (abs(result["best_score"] - result["saved_score"]) < 1e-3 and len(result["history"]) >= 4
                        and bool(speed.get("packing")))
        out["runs"][name] = result
        print(name, json.dumps(result))
    path = HERE / "results" / "gpu_selection_check.json"
    path.write_text(json.dumps(out, indent=1))
    print("all ok" if all(r["ok"] for r in out["runs"].values()) else "NOT ok")


if __name__ == "__main__":
    main()
