"""Where activations wait between forward and backward: --offload_checkpoints (the inputs checkpointed layers keep,
in host memory) and --checkpoint_share auto (as many layers store their activations as a memory budget allows).
Both change where tensors live, not what is computed: training must give the same losses."""

import pytest
import torch
from transformers import MistralConfig, MistralForCausalLM

from medpeft import methods
from medpeft.config import TrainConfig, settle
from medpeft.training import build, speedups
from medpeft.training.speedups import CheckpointBudget, decoder_layers

pytestmark = pytest.mark.filterwarnings("ignore")

CASES = {
    "qlora-nf4": ("qlora", dict(lora_r=4, lora_alpha=8, lora_dropout=0.0), dict(load_in_4bit=True)),
    "lora-16bit": ("qlora", dict(lora_r=4, lora_alpha=8, lora_dropout=0.0), dict(load_in_4bit=False)),
    "adapter": ("adapter", dict(adapter_size=16), dict()),
}


def fit(tiny_model, processed, out, method, options, overrides):
    cfg = TrainConfig(model_name=tiny_model, data_path=processed, output_dir=str(out), max_steps=4, batch_size=8,
                      learning_rate=1e-2, warmup_ratio=0.0, logging_steps=1, max_eval_samples=8, seed=0,
                      lr_scheduler_type="constant_with_warmup", report_to="none", save_steps=0, dtype="float32",
                      **overrides)
    run = build(method, cfg, methods.get(method).Options(**options), log=lambda *a: None)
    try:
        return run, run.fit()
    finally:
        run.cleanup()


@pytest.mark.parametrize("case", list(CASES))
def test_offloaded_checkpoints_train_like_checkpoints_kept_in_place(case, tiny_model, processed, tmp_path,
                                                                   monkeypatch):
    saved = []
    pack = speedups.HostOffload.pack

    def counting(self, t):
        out = pack(self, t)
        if out is not t:
            saved.append(tuple(t.shape))
        return out

    monkeypatch.setattr(speedups.HostOffload, "pack", counting)
    method, options, overrides = CASES[case]
    _, kept = fit(tiny_model, processed, tmp_path / "kept", method, options, overrides | dict(offload_checkpoints="off"))
    assert not saved and "offloaded_checkpoints" not in kept["speed_settings"]
    run, moved = fit(tiny_model, processed, tmp_path / "moved", method, options,
                     overrides | dict(offload_checkpoints="on"))
    assert moved["speed_settings"]["offloaded_checkpoints"] is True
    # each checkpointed layer whose input needs a gradient handed that input to the hooks, at every micro-batch
    hidden = run.model.config.hidden_size if hasattr(run.model, "config") else None
    assert saved and all(shape[-1] == hidden for shape in saved), saved
    a = [p["loss"] for p in kept["loss_curve"]]
    b = [p["loss"] for p in moved["loss_curve"]]
    assert len(a) == len(b) == 4 and b[-1] < b[0]
    assert max(abs(x - y) / x for x, y in zip(a, b)) < 1e-5, (a, b)
    # afterwards the layers checkpoint as they did
    from torch.utils.checkpoint import checkpoint

    funcs = [layer._gradient_checkpointing_func for layer in decoder_layers(run.model)]
    assert all(getattr(f, "func", None) is checkpoint for f in funcs), funcs


def test_offload_round_trip_prefetches_the_layer_before():
    store = speedups.HostOffload()
    xs = [torch.randn(64, 512) for _ in range(3)]
    recs = [store.pack(x) for x in xs]
    assert store.pack(torch.ones(3)) is not None and isinstance(store.pack(torch.ones(3)), torch.Tensor)  # too small
    back = store.unpack(recs[2])  # backward: the last layer first
    assert torch.equal(back, xs[2]) and back is not xs[2]
    assert recs[1].gpu is not None and recs[0].gpu is None  # the next one back is fetched ahead
    assert torch.equal(store.unpack(recs[1]), xs[1]) and torch.equal(store.unpack(recs[0]), xs[0])
    assert torch.equal(store.unpack(recs[0]), xs[0])  # a second unpack copies again


def many_layers(n=8):
    cfg = MistralConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=n,
                        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    model = MistralForCausalLM(cfg)
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    return model


class Peaks:
    """A memory reader the test drives: the peak each step would have reached."""

    def __init__(self, *gb):
        self.values = [g * 2**30 for g in gb]
        self.resets = 0

    def memory(self):
        return self.values[self.resets]

    def reset(self):
        self.resets += 1


@pytest.mark.parametrize("budget, stored", [(13.0, 4), (9.0, 0), (100.0, 8)])
def test_checkpoint_budget_stores_as_many_layers_as_fit(budget, stored):
    model = many_layers(8)
    peaks, chosen, lines = Peaks(10.0, 11.0), [], []
    budget_ = CheckpointBudget(model, budget, lines.append, probe=2, memory=peaks.memory, reset=peaks.reset,
                               record=chosen.append)
    budget_.after_step()  # step 1: all 8 recompute, peak 10 GB; the probe stores the last two
    assert [layer.gradient_checkpointing for layer in decoder_layers(model)] == [True] * 6 + [False] * 2
    budget_.after_step()  # step 2: 11 GB with two stored: 0.5 GB a layer
    flags = [layer.gradient_checkpointing for layer in decoder_layers(model)]
    # room: budget x 0.94 - 10 GB, in 0.5 GB layers; the last layers store, the first recompute
    assert flags == [True] * (8 - stored) + [False] * stored
    assert chosen == [{"checkpointed_layers": 8 - stored, "layers": 8, "budget_gb": budget,
                       "peak_gb_all_checkpointed": 10.0, "gb_per_stored_layer": 0.5}]
    assert f"{8 - stored} of 8 layers recompute" in lines[0]
    budget_.after_step()  # later steps change nothing
    assert [layer.gradient_checkpointing for layer in decoder_layers(model)] == flags


def test_checkpoint_share_auto_on_the_cpu_recomputes_every_layer(tiny_model, processed, tmp_path):
    cfg = TrainConfig(model_name=tiny_model, data_path=processed, output_dir=str(tmp_path / "o"), max_steps=2,
                      batch_size=8, report_to="none", save_steps=0, max_eval_samples=8, checkpoint_share="auto")
    lines = []
    run = build("qlora", cfg, methods.get("qlora").Options(lora_r=4, lora_alpha=8), log=lines.append)
    try:
        metrics = run.fit()
    finally:
        run.cleanup()
    assert metrics["speed_settings"]["checkpointed_layers"] == 2
    assert any("--checkpoint_share auto" in line and "every layer recomputes" in line for line in lines)


def test_checkpointing_settings_are_checked():
    (cfg,), problems = settle([TrainConfig], {"checkpoint_share": "auto", "max_memory_gb": "20"})
    assert not problems and cfg.checkpoint_share == "auto" and cfg.max_memory_gb == 20.0
    for bad, words in (({"checkpoint_share": "2"}, "--checkpoint_share must be in [0, 1], got 2"),
                       ({"max_memory_gb": "-1"}, "--max_memory_gb must be 0 (the GPU's total memory) or positive"),
                       ({"offload_checkpoints": "maybe"}, "offload_checkpoints"),
                       ({"offload_checkpoints": "on", "num_gpus": "2"}, "--offload_checkpoints on: one process only")):
        _, problems = settle([TrainConfig], bad)
        assert len(problems) == 1 and words in problems[0], problems


def test_a_layer_whose_input_needs_no_gradient_keeps_its_checkpoint():
    """The first layer after a frozen embedding: the reentrant checkpoint would cut its weights off backward."""
    model = many_layers(2)
    for p in model.parameters():
        p.requires_grad_(False)
    first = decoder_layers(model)[0].self_attn.q_proj.weight
    first.requires_grad_(True)
    store, undo = speedups.offload_checkpoints(model)
    model.train()
    model(input_ids=torch.randint(0, 64, (2, 16)), labels=torch.randint(0, 64, (2, 16))).loss.backward()
    undo()
    assert first.grad is not None and first.grad.abs().sum() > 0
    assert store.saved == 0  # nothing needed a gradient before layer 0, and no later layer has weights to train


@pytest.mark.slow  # make test-fast leaves it out
def test_offload_under_compiled_layers(tiny_model, processed, tmp_path, monkeypatch):
    """Compiled layers run inside the reentrant checkpoint without gradients, then again with them in backward."""
    monkeypatch.setattr(speedups, "COMPILE_BACKEND", "aot_eager")
    method, options, overrides = CASES["lora-16bit"]
    _, kept = fit(tiny_model, processed, tmp_path / "a", method, options,
                  overrides | dict(offload_checkpoints="off", compile="on"))
    torch._dynamo.reset()
    _, moved = fit(tiny_model, processed, tmp_path / "b", method, options,
                   overrides | dict(offload_checkpoints="on", compile="on"))
    assert moved["speed_settings"]["compiled_layers"] == 2 and moved["speed_settings"]["offloaded_checkpoints"]
    a = [p["loss"] for p in kept["loss_curve"]]
    b = [p["loss"] for p in moved["loss_curve"]]
    assert max(abs(x - y) / x for x, y in zip(a, b)) < 1e-4, (a, b)


def test_checkpoint_budget_inside_a_training_run(tiny_model, processed, tmp_path, monkeypatch):
    """The budget's callback changes which layers recompute after step 2 of a real run (on the CPU with a memory
    reader the test drives: 10 GB with both layers recomputed, 11 GB with both stored); the losses stay those of
    full checkpointing, and metrics.json records the choice."""
    import medpeft.training.run as run_module

    real = run_module.plan_checkpointing
    seen = {}

    def driven(model, cfg, device, speed, undo, log, graphs_refused):
        real(model, cfg, device, speed, undo, log, graphs_refused)  # on the CPU: every layer recomputes, no budget
        peaks = Peaks(10.0, 11.0)
        seen["budget"] = CheckpointBudget(model, 11.5, log, memory=peaks.memory, reset=peaks.reset,
                                          record=speed.update)
        return seen["budget"]

    method, options, overrides = CASES["lora-16bit"]
    _, full = fit(tiny_model, processed, tmp_path / "full", method, options, overrides)
    monkeypatch.setattr(run_module, "plan_checkpointing", driven)
    run, budgeted = fit(tiny_model, processed, tmp_path / "budget", method, options,
                        overrides | dict(checkpoint_share="auto", max_memory_gb=11.5))
    assert seen["budget"].steps == 4
    # 11.5 x 0.94 - 10 GB leaves room for one 0.5 GB layer: the first recomputes, the second stores
    assert budgeted["speed_settings"]["checkpointed_layers"] == 1
    assert budgeted["speed_settings"]["gb_per_stored_layer"] == 0.5
    a = [p["loss"] for p in full["loss_curve"]]
    b = [p["loss"] for p in budgeted["loss_curve"]]
    assert max(abs(x - y) / x for x, y in zip(a, b)) < 1e-5, (a, b)
    # after training every layer recomputes again, as the model was set up
    assert all(layer.gradient_checkpointing for layer in decoder_layers(run.model))


@pytest.mark.parametrize("device, overrides, env, offloaded", [
    ("cuda", {}, {}, True),                                   # auto: one GPU
    ("cpu", {}, {}, False),                                   # auto: activations are in host memory already
    ("cuda", {"num_gpus": 2}, {}, False),                     # auto: not tried under data parallel
    ("cuda", {}, {"WORLD_SIZE": "2"}, False),                 # ... nor in a process accelerate launched
    ("cuda", {"offload_checkpoints": "off"}, {}, False),
    ("cpu", {"offload_checkpoints": "on"}, {}, True),
])
def test_offload_auto_is_on_for_one_gpu_only(device, overrides, env, offloaded, monkeypatch):
    import contextlib

    for key, value in env.items():
        monkeypatch.setenv(key, value)
    model = many_layers(2)
    cfg = TrainConfig(model_name="m", data_path="d", output_dir="o", **overrides)
    assert TrainConfig().offload_checkpoints == "auto"
    speed = {}
    with contextlib.ExitStack() as undo:
        speedups.plan_checkpointing(model, cfg, device, speed, undo, log=lambda *a: None)
        wrapped = getattr(decoder_layers(model)[0]._gradient_checkpointing_func, "__name__", "") == "offloaded"
    assert speed.get("offloaded_checkpoints", False) is offloaded and wrapped is offloaded
    assert getattr(decoder_layers(model)[0]._gradient_checkpointing_func, "__name__", "") != "offloaded"  # undone
