"""--fp8 on: the frozen base's linear layers multiply in e4m3 with a scale per row. On the CPU torch's FP8 matmul
(torch._scaled_mm) rounds as the GPU's does, so these tests train through the same code, with the CPU's refusal
lifted (`emulated`: users get a one-line error there, FP8 being slower than bf16 on a CPU). FP8 is an approximation:
the tolerances below are e4m3's (3 bits of mantissa: 2^-4 relative rounding per element), not bf16's."""

import pytest
import torch
from torch import nn

from medpeft import methods
from medpeft.config import TrainConfig
from medpeft.training import build, fp8, speedups
from medpeft.training.speedups import decoder_layers
from test_graphs import lora_model  # a 7-projection LoRA'd Mistral of a few layers, checkpointed

pytestmark = pytest.mark.filterwarnings("ignore")


@pytest.fixture
def emulated(monkeypatch):
    monkeypatch.setattr(fp8, "refusal", lambda device: None)


def rel(a, b):
    return float((a - b).norm() / b.norm())


def product_and_input_grad(layer, x, grad=None):
    """layer(x), the gradient it sends to x (against `grad`, random where not given), and that `grad`."""
    y = layer(x)
    grad = torch.randn_like(y) if grad is None else grad
    (y * grad).sum().backward()
    x_grad, x.grad = x.grad.clone(), None
    return y, x_grad, grad


def test_an_fp8_layer_computes_the_product_and_the_inputs_gradient_to_e4m3_rounding():
    torch.manual_seed(0)
    dense = nn.Linear(64, 48, bias=True).requires_grad_(False)
    exact = dense.weight.clone()
    x = torch.randn(3, 7, 64, requires_grad=True)
    want, want_grad, grad = product_and_input_grad(dense, x)

    n, undo = fp8.to_fp8(nn.ModuleList([dense]), layers=lambda m: list(m))
    assert n == 1 and dense.weight.dtype == fp8.E4M3  # half of bf16's bytes, the shape kept
    assert dense.weight.shape == exact.shape
    got, got_grad, _ = product_and_input_grad(dense, x, grad)
    assert got.shape == want.shape and got.dtype == want.dtype
    assert 0 < rel(got, want) < 0.05, rel(got, want)  # rounded, and only as much as e4m3 rounds
    assert 0 < rel(got_grad, want_grad) < 0.05, rel(got_grad, want_grad)
    undo()
    assert type(dense) is nn.Linear and torch.equal(dense.weight, exact) and not hasattr(dense, "fp8_scale")


def test_a_4bit_layer_keeps_its_4bit_weight_and_multiplies_to_e4m3_rounding_of_its_dequantized_weight():
    from bitsandbytes.nn import Linear4bit

    torch.manual_seed(0)
    four = Linear4bit(64, 48, bias=False, compute_dtype=torch.float32, quant_type="nf4")
    four.load_state_dict(nn.Linear(64, 48, bias=False).state_dict())
    four = four.to("cpu").requires_grad_(False)  # bitsandbytes quantizes on the move to a device
    packed = four.weight.data.clone()
    x = torch.randn(3, 7, 64, requires_grad=True)
    want, want_grad, grad = product_and_input_grad(four, x)

    n, undo = fp8.to_fp8(nn.ModuleList([four]), layers=lambda m: list(m))
    assert n == 1 and isinstance(four, fp8.Fp8Linear4bit)
    assert torch.equal(four.weight.data, packed)  # still 4-bit: nothing converted, nothing kept aside
    got, got_grad, _ = product_and_input_grad(four, x, grad)
    assert got.shape == want.shape and got.dtype == want.dtype
    assert 0 < rel(got, want) < 0.05, rel(got, want)  # bitsandbytes' own product, rounded as e4m3 rounds
    assert torch.allclose(got_grad, want_grad, rtol=1e-5, atol=1e-6)  # backward: its dequantized weight, unrounded
    undo()
    assert type(four) is Linear4bit and torch.equal(four.weight.data, packed)
    assert torch.equal(four(x), want)


def test_quantized_rows_keep_each_rows_largest_value_and_zero_rows():
    t = torch.tensor([[0.5, -3.0, 1.0, 0.0], [0.0, 0.0, 0.0, 0.0], [1e-3, 2e-3, -4e-3, 0.0]])
    q, scale = fp8.quantize_rows(t)
    back = q.float() * scale
    assert torch.equal(back[1], torch.zeros(4))  # no division by zero
    assert back[0, 1] == pytest.approx(-3.0) and back[2, 2] == pytest.approx(-4e-3)
    assert torch.allclose(back, t, rtol=2 ** -4, atol=0)


def test_only_the_frozen_bases_layers_become_fp8_and_undo_restores_them_exactly():
    model = lora_model(layers=2)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    n, undo = fp8.to_fp8(model)
    assert n == 2 * 7  # q, k, v, o, gate, up, down in each of the 2 layers
    kinds = {name: p.dtype for name, p in model.named_parameters()}
    assert all(kinds[name] == fp8.E4M3 for name in kinds if "base_layer" in name)
    assert all(kinds[name] == torch.float32 for name in kinds if "lora_" in name)  # trained in full precision
    assert kinds["base_model.model.lm_head.weight"] == torch.float32  # outside the decoder layers
    undo()
    assert all(torch.equal(p, before[name]) for name, p in model.named_parameters())
    assert not any(isinstance(m, fp8.Fp8Linear) for m in model.modules())


def test_4bit_and_other_linear_kinds_are_left_alone():
    class Custom(nn.Linear):
        def forward(self, x):  # reads its weight itself: an FP8 weight would break it
            return x @ self.weight.t()

    layer = nn.ModuleList([Custom(32, 32).requires_grad_(False), nn.Linear(32, 32),  # trainable
                           nn.Linear(30, 32).requires_grad_(False)])  # not a multiple of 16
    assert fp8.to_fp8(layer, layers=lambda m: list(m))[0] == 0


def fit(tiny_model, processed, out, method, options, overrides):
    cfg = TrainConfig(model_name=tiny_model, data_path=processed, output_dir=str(out), max_steps=5, batch_size=8,
                      learning_rate=1e-2, warmup_ratio=0.0, logging_steps=1, max_eval_samples=8, seed=0,
                      lr_scheduler_type="constant_with_warmup", report_to="none", save_steps=0, **overrides)
    run = build(method, cfg, methods.get(method).Options(**options), log=lambda *a: None)
    try:
        return run, run.fit()
    finally:
        run.cleanup()


CASES = {
    "lora-bf16-base": ("qlora", dict(lora_r=4, lora_alpha=8, lora_dropout=0.0), dict(load_in_4bit=False)),
    # QLoRA: the 4-bit weights stay; each product dequantizes them, then rounds to e4m3
    "qlora-nf4": ("qlora", dict(lora_r=4, lora_alpha=8, lora_dropout=0.0), dict()),
    # AdapterHub wraps q/k/v/o in its own LoRA class: those must be converted too (14, not 8)
    "adapter": ("adapter", dict(adapter_size=16), dict()),
    "ptuning": ("ptuning", dict(num_virtual_tokens=4), dict()),
}


@pytest.mark.slow  # make test-fast leaves it out
@pytest.mark.parametrize("case", list(CASES))
def test_training_with_fp8_follows_the_working_precision(case, emulated, tiny_model, processed, tmp_path):
    method, options, overrides = CASES[case]
    _, exact = fit(tiny_model, processed, tmp_path / "exact", method, options, overrides)
    assert "fp8_layers" not in exact["speed_settings"]  # off by default
    run, rounded = fit(tiny_model, processed, tmp_path / "fp8", method, options, dict(overrides, fp8="on"))
    assert rounded["speed_settings"]["fp8_layers"] == 2 * 7
    a = [p["loss"] for p in exact["loss_curve"]]
    b = [p["loss"] for p in rounded["loss_curve"]]
    assert len(a) == len(b) == 5 and a != b  # it ran in FP8 ...
    assert max(abs(x - y) / x for x, y in zip(a, b)) < 0.02, (a, b)  # ... within the 2% of the curve
    assert b[-1] < b[0]
    # evaluation after training sees the base as loaded: the exact weights are back
    assert not any(p.dtype == fp8.E4M3 for p in run.model.parameters())
    assert not any(isinstance(m, (fp8.Fp8Linear, fp8.Fp8Linear4bit)) for m in run.model.modules())
    assert rounded["validation_loss_final"] == pytest.approx(exact["validation_loss_final"], rel=0.02)


@pytest.mark.parametrize("case", ["lora-bf16-base", "qlora-nf4"])
def test_fp8_through_compiled_layers_follows_the_working_precision(case, emulated, tiny_model, processed, tmp_path,
                                                                   monkeypatch):
    """Compiled layers trace the FP8 matmul (the GPU's default path). Not compared to eager FP8 at bf16's tolerance:
    the compiler may compute a row's scale to a different last bit, which moves elements across e4m3's rounding
    steps (2^-4 apart); the measure is the one above, the curve of the working precision."""
    from torch._dynamo.utils import counters

    monkeypatch.setattr(speedups, "COMPILE_BACKEND", "aot_eager")
    method, options, overrides = CASES[case]
    _, exact = fit(tiny_model, processed, tmp_path / "exact", method, options, overrides)
    torch._dynamo.reset()
    counters.clear()
    run, compiled = fit(tiny_model, processed, tmp_path / "compiled", method, options,
                        dict(overrides, fp8="on", compile="on"))
    assert compiled["speed_settings"]["compiled_layers"] == 2 and compiled["speed_settings"]["fp8_layers"] == 14
    assert counters["stats"]["unique_graphs"] >= 1 and not counters["graph_break"]  # FP8 inside the graphs
    a = [p["loss"] for p in exact["loss_curve"]]
    b = [p["loss"] for p in compiled["loss_curve"]]
    assert a != b and max(abs(x - y) / x for x, y in zip(a, b)) < 0.02, (a, b)
    assert all(layer._compiled_call_impl is None for layer in decoder_layers(run.model))


def test_fp8_is_refused_where_it_cannot_run(monkeypatch):
    assert not [p for p in TrainConfig(model_name="m", fp8="on", load_in_4bit=True).validate() if "fp8" in p]
    for several in (dict(fsdp=True, num_gpus=2), dict(num_gpus=2)):
        problems = TrainConfig(model_name="m", fp8="on", **several).validate()
        assert any(p.startswith("--fp8 on: one process only") for p in problems)
    assert not [p for p in TrainConfig(model_name="m", fp8="on").validate() if "fp8" in p]
    assert "on a CPU it is emulated and slower than bf16" in fp8.refusal("cpu")
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda *a: (8, 0))  # an A100
    assert "compute capability 8.0" in fp8.refusal("cuda")
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda *a: (9, 0))  # an H100
    assert fp8.refusal("cuda") is None


def test_training_on_a_cpu_with_fp8_stops_with_one_line_before_training(tiny_model, processed, tmp_path):
    import subprocess
    import sys

    out = tmp_path / "out"
    r = subprocess.run([sys.executable, "adapter_tuning/train_adapter.py", "--model_name", tiny_model, "--data_path",
                        processed, "--output_dir", str(out), "--max_steps", "2", "--report_to", "none", "--fp8", "on"],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 2, r.stderr[-2000:]
    assert "--fp8 on: FP8 needs a CUDA GPU" in r.stderr and "Traceback" not in r.stderr
    assert not out.exists()  # no half-written output


def test_the_peak_memory_is_read_while_the_base_is_still_fp8(emulated, tiny_model, processed, tmp_path,
                                                             monkeypatch):
    """Putting the exact weights back holds both copies for a moment: a peak read after that would report it (as the
    first GPU measurements did: 14.2 GB for the adapter at 4,096 and at 8,192 tokens alike)."""
    from medpeft.training import run as run_module

    seen = []
    original = run_module.peak_memory_gb

    def spy(device, sampler=None, speed=None):
        seen.append(any(isinstance(m, fp8.Fp8Linear) for m in model.modules()))
        return original(device, sampler, speed)

    monkeypatch.setattr(run_module, "peak_memory_gb", spy)
    method, options, overrides = CASES["lora-bf16-base"]
    cfg = TrainConfig(model_name=tiny_model, data_path=processed, output_dir=str(tmp_path / "o"), max_steps=2,
                      batch_size=8, report_to="none", save_steps=0, fp8="on", **overrides)
    run = build(method, cfg, methods.get(method).Options(**options), log=lambda *a: None)
    model = run.model
    try:
        metrics = run.fit()
    finally:
        run.cleanup()
    assert seen == [True] and metrics["peak_memory_gb"] > 0
    assert not any(isinstance(m, fp8.Fp8Linear) for m in model.modules())


def test_fp8_layers_inside_cuda_graphs_give_the_losses_and_gradients_of_checkpointed_fp8_layers(monkeypatch):
    """--fp8 on with --cuda_graphs on: the graphs (their CPU stand-in, which runs the captured function again over the
    same buffers) capture the FP8 matmuls like any other kernel."""
    from medpeft.training import graphs
    from medpeft.training.packing import PackedCollator, StaticRows
    from test_graphs import examples, grads_after

    monkeypatch.setattr(graphs, "RECORDER", graphs.Rerun)
    groups = [examples(4, s) for s in range(3)]
    shape = StaticRows.of(groups, budget=96)
    reference, graphed = lora_model(), lora_model()
    assert fp8.to_fp8(reference)[0] == fp8.to_fp8(graphed)[0] == 5 * 7
    want_losses, want = grads_after(reference, [PackedCollator()(g) for g in groups])
    shared, undo = graphs.graph_layers(decoder_layers(graphed), "cpu", log=lambda *a: None, offload=True)
    got_losses, got = grads_after(graphed, [PackedCollator(static=shape)(g) for g in groups])
    assert shared.stats["captured_layers"] == 5 and shared.stats["eager_calls"] == {}
    assert got_losses == pytest.approx(want_losses, rel=1e-5)
    for name, g in want.items():
        assert torch.allclose(got[name], g, rtol=1e-4, atol=1e-6), name
    undo()
