"""--cuda_graphs: checkpointed layers replayed from captured graphs over static buffers. On the CPU the graphs' stand-in
(graphs.Rerun) runs the captured function again at each replay, over the same buffers: what a CUDA graph computes.
Graphs change where tensors live and how kernels are launched, not what is computed: the same losses and gradients."""

import contextlib
import functools

import pytest
import torch
from transformers import MistralConfig, MistralForCausalLM

from medpeft import methods
from medpeft.config import TrainConfig
from medpeft.errors import UsageError
from medpeft.training import build, graphs, speedups
from medpeft.training.packing import PackedCollator, StaticRows, enable_varlen_attention
from medpeft.training.speedups import decoder_layers

pytestmark = pytest.mark.filterwarnings("ignore")


@pytest.fixture
def rerun(monkeypatch):
    monkeypatch.setattr(graphs, "RECORDER", graphs.Rerun)


def lora_model(layers=5, seed=0):
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(seed)
    cfg = MistralConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=layers,
                        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256)
    model = MistralForCausalLM(cfg)
    for p in model.parameters():
        p.requires_grad_(False)
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, target_modules="all-linear",
                                             init_lora_weights="gaussian"))
    model.train()
    return model


def examples(n, seed):
    gen = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        length = int(torch.randint(5, 30, (1,), generator=gen))
        ids = torch.randint(3, 64, (length,), generator=gen).tolist()
        out.append({"input_ids": ids, "labels": [-100] * 2 + ids[2:]})
    return out


def grads_after(model, rows, layers_hook=None):
    """Loss of each row and the LoRA gradients accumulated over all of them (gradient accumulation)."""
    undo = enable_varlen_attention(model)
    model.zero_grad(set_to_none=True)
    losses = []
    for row in rows:
        loss = model(**row).loss
        loss.backward()
        losses.append(loss.item())
    undo()
    return losses, {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}


@pytest.mark.parametrize("offload", [False, True])
def test_graphed_layers_give_the_losses_and_gradients_of_checkpointed_ones(rerun, offload):
    groups = [examples(4, s) for s in range(3)]  # three micro-batches of one optimizer step
    shape = StaticRows.of(groups, budget=96)
    plain_rows = [PackedCollator()(g) for g in groups]
    static_rows = [PackedCollator(static=shape)(g) for g in groups]
    assert all(r["input_ids"].shape[1] == shape.tokens and r["cu_seq_lens_q"].numel() == shape.segments + 1
               for r in static_rows)

    reference, graphed = lora_model(), lora_model()
    want_losses, want = grads_after(reference, plain_rows)
    shared, undo = graphs.graph_layers(decoder_layers(graphed), "cpu", log=lambda *a: None, offload=offload)
    got_losses, got = grads_after(graphed, static_rows)
    assert shared.stats["captured_layers"] == 5 and shared.stats["replayed_calls"] == 15
    assert shared.stats["eager_calls"] == {}
    assert got_losses == pytest.approx(want_losses, rel=1e-5)
    for name, g in want.items():
        assert torch.allclose(got[name], g, rtol=1e-4, atol=1e-6), name
    # offloaded: two device buffers for the hidden states instead of one per layer, and one host copy per layer
    # but the top one, whose input is still in place when its backward comes
    layers = [layer._gradient_checkpointing_func for layer in decoder_layers(graphed)]
    assert len(shared.rings["hidden"]) == (2 if offload else 6)
    assert [g.host is not None for g in layers] == ([True] * 4 + [False] if offload else [False] * 5)
    undo()
    assert all(isinstance(layer._gradient_checkpointing_func, functools.partial) for layer in decoder_layers(graphed))


def test_a_call_unlike_the_captured_one_runs_the_layers_checkpoint(rerun):
    """A micro-batch of another shape, and a forward without grad, run the layers as before, with the same result
    as the reference; the graphs replay again afterwards."""
    groups = [examples(4, s) for s in range(2)]
    shape = StaticRows.of(groups, budget=96)
    other = examples(3, 7)
    rows = [PackedCollator(static=shape)(groups[0]), PackedCollator()(other), PackedCollator(static=shape)(groups[1])]
    reference, graphed = lora_model(), lora_model()
    want_losses, want = grads_after(reference, rows)
    lines = []
    shared, undo = graphs.graph_layers(decoder_layers(graphed), "cpu", log=lines.append, offload=True)
    got_losses, got = grads_after(graphed, rows)
    assert got_losses == pytest.approx(want_losses, rel=1e-5)
    for name, g in want.items():
        assert torch.allclose(got[name], g, rtol=1e-4, atol=1e-6), name
    assert shared.stats["replayed_calls"] == 10
    assert shared.stats["eager_calls"] == {"its input differs from the captured one in shape, dtype or grad": 5}
    assert sum("ran without them" in line for line in lines) == 1  # said once, counted each time
    with torch.no_grad():  # evaluation inside training: no graph, no change
        assert torch.allclose(graphed(**rows[0]).loss, reference(**rows[0]).loss)
    undo()


def broken_capture(self, fn):
    raise RuntimeError("operation not permitted when stream is capturing")


def test_a_failed_capture_leaves_the_layers_running_as_before(rerun, monkeypatch):
    monkeypatch.setattr(graphs.Rerun, "capture", broken_capture)
    groups = [examples(4, s) for s in range(2)]
    rows = [PackedCollator(static=StaticRows.of(groups, budget=96))(g) for g in groups]
    reference, graphed = lora_model(), lora_model()
    want_losses, want = grads_after(reference, rows)
    lines = []
    shared, undo = graphs.graph_layers(decoder_layers(graphed), "cpu", log=lines.append)
    got_losses, got = grads_after(graphed, rows)
    assert got_losses == pytest.approx(want_losses, rel=1e-5)
    assert all(torch.allclose(got[n], g, rtol=1e-4, atol=1e-6) for n, g in want.items())
    assert shared.stats["captured_layers"] == 0 and "capture failed at layer 0" in shared.stats["stopped"]
    assert any("operation not permitted" in line for line in lines)
    undo()


def test_static_rows_hold_every_group_with_padding_and_empty_segments():
    groups = [examples(5, s) for s in range(6)]
    shape = StaticRows.of(groups, budget=100)
    longest = max(len(e["input_ids"]) for g in groups for e in g)
    assert shape.tokens == max(100, max(sum(len(e["input_ids"]) for e in g) for g in groups))
    assert shape.longest == longest
    collate = PackedCollator(static=shape)
    for g in groups:
        row = collate(g)
        cu = row["cu_seq_lens_q"].tolist()
        real = sum(len(e["input_ids"]) for e in g)
        assert len(cu) == shape.segments + 1 and cu[-1] == shape.tokens == row["input_ids"].shape[1]
        assert cu[len(g)] == real and all(b - a <= longest for a, b in zip(cu, cu[1:]))
        assert (row["labels"][0, real:] == -100).all()  # padding learns nothing
        assert row["max_length_q"] == longest
    assert collate.real_tokens == sum(len(e["input_ids"]) for g in groups for e in g)
    assert collate.padded_tokens == shape.tokens * len(groups)
    with pytest.raises(ValueError, match="does not fit"):
        PackedCollator(static=StaticRows(tokens=10, segments=2, longest=512))(groups[0])


def fit(tiny_model, processed, out, method, options, overrides):
    cfg = TrainConfig(model_name=tiny_model, data_path=processed, output_dir=str(out), max_steps=4, batch_size=8,
                      learning_rate=1e-2, warmup_ratio=0.0, logging_steps=1, max_eval_samples=8, seed=0,
                      lr_scheduler_type="constant_with_warmup", report_to="none", save_steps=0, dtype="float32",
                      packing="on", tokens_per_batch=256, **overrides)
    run = build(method, cfg, methods.get(method).Options(**options), log=lambda *a: None)
    try:
        return run.fit()
    finally:
        run.cleanup()


CASES = {
    "qlora-nf4": ("qlora", dict(lora_r=4, lora_alpha=8, lora_dropout=0.0), dict(load_in_4bit=True)),
    "lora-16bit": ("qlora", dict(lora_r=4, lora_alpha=8, lora_dropout=0.0), dict(load_in_4bit=False)),
    "adapter": ("adapter", dict(adapter_size=16), dict()),
    "lora-compiled": ("qlora", dict(lora_r=4, lora_alpha=8, lora_dropout=0.0), dict(load_in_4bit=False, compile="on")),
}


@pytest.mark.slow
@pytest.mark.parametrize("case", list(CASES))
def test_training_with_graphs_gives_the_loss_curve_of_training_without(case, rerun, tiny_model, processed, tmp_path,
                                                                        monkeypatch):
    monkeypatch.setattr(speedups, "COMPILE_BACKEND", "aot_eager")  # the compiled layers' case: as tests/test_compile.py
    method, options, overrides = CASES[case]
    without = fit(tiny_model, processed, tmp_path / "a", method, options, overrides | dict(cuda_graphs="off"))
    with_ = fit(tiny_model, processed, tmp_path / "b", method, options,
                overrides | dict(cuda_graphs="on", offload_checkpoints="on"))
    stats = with_["speed_settings"]["cuda_graphs"]
    assert without["speed_settings"]["cuda_graphs"] == "off (--cuda_graphs off)"
    assert stats["captured_layers"] == 2 and stats["replayed_calls"] == 2 * 16 // 4 and stats["eager_calls"] == {}
    a = [p["loss"] for p in without["loss_curve"]]
    b = [p["loss"] for p in with_["loss_curve"]]
    assert len(a) == len(b) == 4 and b[-1] < b[0]
    assert max(abs(x - y) / x for x, y in zip(a, b)) < 1e-5, (a, b)
    assert with_["train_tokens"] == without["train_tokens"]  # useful tokens: the examples', not the padding


def test_graphs_are_refused_where_a_replay_would_compute_something_else(rerun, tiny_model, processed, tmp_path):
    with pytest.raises(UsageError, match="dropout 0.05 in the layers.*--lora_dropout 0"):
        fit(tiny_model, processed, tmp_path / "a", "qlora", dict(lora_r=4, lora_dropout=0.05), dict(cuda_graphs="on"))
    # the default leaves them off even where they could run (opt-in: docs/performance.md, fourth round)
    auto = fit(tiny_model, processed, tmp_path / "b", "qlora", dict(lora_r=4, lora_dropout=0.0), dict())
    assert auto["speed_settings"]["cuda_graphs"] == "off (--cuda_graphs auto: opt-in, --cuda_graphs on)"


def test_graphs_need_a_gpu_and_say_so(tiny_model, processed, tmp_path):
    with pytest.raises(UsageError, match="--cuda_graphs on: no CUDA GPU"):
        fit(tiny_model, processed, tmp_path / "a", "qlora", dict(lora_r=4, lora_dropout=0.0), dict(cuda_graphs="on"))
    cfg = TrainConfig(cuda_graphs="on", num_gpus=2, checkpoint_share="auto")
    problems = cfg.validate()
    assert "--cuda_graphs on needs one process (not --num_gpus or --fsdp)" in problems
    assert any(p.startswith("--cuda_graphs on needs a fixed --checkpoint_share") for p in problems)


def test_layers_the_graphs_do_not_replay_still_offload_their_inputs(rerun, monkeypatch):
    """--offload_checkpoints under --cuda_graphs: a layer whose capture failed runs its checkpoint with its input
    offloaded, as it would without graphs (on the CPU the host copy is a clone, counted by the hooks)."""
    monkeypatch.setattr(graphs.Rerun, "capture", broken_capture)
    monkeypatch.setattr(speedups.HostOffload, "MIN_BYTES", 0)
    packed = []
    pack = speedups.HostOffload.pack
    monkeypatch.setattr(speedups.HostOffload, "pack", lambda self, t: packed.append(1) or pack(self, t))
    groups = [examples(4, s) for s in range(2)]
    rows = [PackedCollator(static=StaticRows.of(groups, budget=96))(g) for g in groups]
    reference, graphed = lora_model(), lora_model()
    want_losses, want = grads_after(reference, rows)
    cfg = TrainConfig(cuda_graphs="on", offload_checkpoints="on", checkpoint_share=1.0)
    speed = {}
    with contextlib.ExitStack() as undo:
        speedups.plan_checkpointing(graphed, cfg, "cpu", speed, undo, log=lambda *a: None, graphs_refused=None)
        got_losses, got = grads_after(graphed, rows)
        assert speed["offloaded_checkpoints"] is True and "capture failed" in speed["cuda_graphs"]["stopped"]
        assert len(packed) >= 2 * 4  # every layer above the first, in each micro-batch
    assert got_losses == pytest.approx(want_losses, rel=1e-5)
    assert all(torch.allclose(got[n], g, rtol=1e-4, atol=1e-6) for n, g in want.items())
    assert all(not isinstance(m._gradient_checkpointing_func, graphs.LayerGraph) for m in decoder_layers(graphed))
