"""Compiled decoder layers (--compile): the same training as eager layers, undone after training.

torch.compile runs here with the "aot_eager" backend: the same graph capture and compiled autograd as on the GPU
(inductor), without generating kernels, which takes minutes on a CPU. Padded batches: on the CPU a packed row's
attention runs one SDPA call per example, a Python loop that compiles anew for each count of examples (on the GPU
it is one varlen kernel, benchmarks/gpu_throughput.py)."""

import pytest
import torch

from medpeft import methods
from medpeft.training import speedups
from medpeft.config import TrainConfig
from medpeft.training.speedups import decoder_layers
from medpeft.training import build

pytestmark = pytest.mark.filterwarnings("ignore")

CASES = {
    "qlora-nf4": ("qlora", dict(lora_r=4, lora_alpha=8, lora_dropout=0.0), dict(load_in_4bit=True)),
    "lora-16bit": ("qlora", dict(lora_r=4, lora_alpha=8, lora_dropout=0.0), dict(load_in_4bit=False)),
    "adapter": ("adapter", dict(adapter_size=16), dict()),
}


def fit(tiny_model, processed, out, method, options, overrides, compile_):
    cfg = TrainConfig(model_name=tiny_model, data_path=processed, output_dir=str(out), max_steps=5, batch_size=8,
                      learning_rate=1e-2, warmup_ratio=0.0, logging_steps=1, max_eval_samples=8, seed=0,
                      lr_scheduler_type="constant_with_warmup", report_to="none", save_steps=0,
                      compile=compile_, **overrides)
    run = build(method, cfg, methods.get(method).Options(**options), log=lambda *a: None)
    try:
        return run, run.fit()
    finally:
        run.cleanup()


@pytest.mark.slow  # make test-fast leaves it out
@pytest.mark.parametrize("case", list(CASES))
def test_compiled_layers_train_like_eager_layers(case, tiny_model, processed, tmp_path, monkeypatch):
    from torch._dynamo.utils import counters

    monkeypatch.setattr(speedups, "COMPILE_BACKEND", "aot_eager")
    method, options, overrides = CASES[case]
    _, eager = fit(tiny_model, processed, tmp_path / "eager", method, options, overrides, "auto")
    assert "compiled_layers" not in eager["speed_settings"]  # auto: compiled on CUDA only
    torch._dynamo.reset()
    counters.clear()
    run, compiled = fit(tiny_model, processed, tmp_path / "compiled", method, options, overrides, "on")
    assert compiled["speed_settings"]["compiled_layers"] == 2
    assert counters["stats"]["unique_graphs"] >= 1  # the layers really went through torch.compile
    a = [p["loss"] for p in eager["loss_curve"]]
    b = [p["loss"] for p in compiled["loss_curve"]]
    assert len(a) == len(b) == 5
    assert max(abs(x - y) / x for x, y in zip(a, b)) < 2e-3, (a, b)
    assert b[-1] < b[0]
    assert compiled["validation_loss_final"] == pytest.approx(eager["validation_loss_final"], rel=2e-3)
    # evaluation and generation after training run the layers as they were
    assert all(layer._compiled_call_impl is None for layer in decoder_layers(run.model))


def test_a_layer_that_fails_to_compile_runs_eagerly_only_when_asked(tiny_model, monkeypatch):
    """--compile auto falls back to the eager layer (an architecture the compiler trips on still trains);
    --compile on stops with the compiler's error."""
    from transformers import AutoModelForCausalLM

    def broken_backend(graph, example_inputs):
        raise RuntimeError("this compiler cannot build the layer")

    monkeypatch.setattr(speedups, "COMPILE_BACKEND", broken_backend)
    model = AutoModelForCausalLM.from_pretrained(tiny_model)
    ids = torch.tensor([[5, 6, 7, 8, 9]])
    with torch.no_grad():
        eager = model(input_ids=ids).logits
        torch._dynamo.reset()
        _, uncompile = speedups.compile_layers(model, fallback=True)
        assert torch.equal(model(input_ids=ids).logits, eager)
        uncompile()  # also drops dynamo's compiled code
        _, uncompile = speedups.compile_layers(model, fallback=False)
        with pytest.raises(Exception, match="this compiler cannot build the layer"):
            model(input_ids=ids)
        uncompile()
    assert torch._dynamo.config.suppress_errors is False
