"""Packed training rows: grouping, the collated row, and attention that stays inside each example."""

import pytest
import torch

from medpeft.data import PadCollator, answer_examples, load_split
from medpeft.errors import UsageError
from medpeft.packing import PackedCollator, enable_varlen_attention, pack_batches, restore_attention


def test_pack_batches_uses_every_example_once_within_the_budget():
    lengths = [int(x) for x in torch.randint(5, 300, (500,), generator=torch.Generator().manual_seed(0))] + [900]
    groups = pack_batches(lengths, budget=512, seed=1)
    flat = sorted(i for g in groups for i in g)
    assert flat == list(range(len(lengths)))
    for g in groups:
        assert sum(lengths[i] for i in g) <= 512 or len(g) == 1
    fill = sum(lengths) / (512 * len(groups))
    assert fill > 0.9, fill  # nearly full rows: few more rows than the token count needs
    assert pack_batches(lengths, 512, seed=1) == groups and pack_batches(lengths, 512, seed=2) != groups


def test_collated_row_restarts_positions_and_ignores_each_first_label():
    a = {"input_ids": [5, 6, 7], "labels": [-100, 6, 7]}
    b = {"input_ids": [8, 9], "labels": [8, 9]}
    row = PackedCollator()([[a, b]])
    assert row["input_ids"].tolist() == [[5, 6, 7, 8, 9]]
    assert row["position_ids"].tolist() == [[0, 1, 2, 0, 1]]
    assert row["labels"].tolist() == [[-100, 6, 7, -100, 9]]
    assert row["cu_seq_lens_q"].tolist() == [0, 3, 5] and row["max_length_q"] == 3


def _token_logprobs(model, batch):
    with torch.no_grad():
        logits = model(**{k: v for k, v in batch.items() if k != "labels"}).logits.float()
    return torch.log_softmax(logits, -1)


def test_packed_examples_score_as_they_do_alone(tiny_model, processed):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_model)
    model = AutoModelForCausalLM.from_pretrained(tiny_model, dtype=torch.float32, attn_implementation="sdpa").eval()
    examples = answer_examples(tokenizer, load_split(processed, "train"), 256)[:6]
    padded = PadCollator(tokenizer.pad_token_id)(examples)
    alone = _token_logprobs(model, padded)
    previous = enable_varlen_attention(model)
    try:
        packed = _token_logprobs(model, PackedCollator()([examples]))[0]
    finally:
        restore_attention(model, previous)
    start = 0
    for row, e in enumerate(examples):
        n = len(e["input_ids"])
        assert torch.allclose(packed[start:start + n], alone[row, :n], atol=1e-4), row
        start += n
    # Without the boundaries, later examples would see earlier ones: the check above can fail.
    row = PackedCollator()([examples])
    mixed = _token_logprobs(model, {"input_ids": row["input_ids"], "position_ids": row["position_ids"]})[0]
    n0 = len(examples[0]["input_ids"])
    assert not torch.allclose(mixed[n0:n0 + len(examples[1]["input_ids"])], alone[1, :len(examples[1]["input_ids"])],
                              atol=1e-2)
    # After restore, padded batches are scored as before.
    assert torch.allclose(_token_logprobs(model, padded), alone, atol=1e-5)


def _fit_refused(tiny_model, processed, out, method, options, match, **settings):
    from medpeft import methods
    from medpeft.config import TrainConfig
    from medpeft.training import build

    cfg = TrainConfig(model_name=tiny_model, data_path=processed, output_dir=str(out), max_steps=1, **settings)
    run = build(method, cfg, methods.get(method).Options(**options), log=lambda *a: None)
    try:
        with pytest.raises(UsageError, match=match):
            run.fit()
    finally:
        run.cleanup()


def test_packing_on_refused_for_ptuning(tiny_model, processed, tmp_path):
    _fit_refused(tiny_model, processed, tmp_path / "p", "ptuning", dict(num_virtual_tokens=4), "cannot pack",
                 packing="on")


def test_liger_on_without_a_gpu_is_a_clear_error(tiny_model, processed, tmp_path):
    _fit_refused(tiny_model, processed, tmp_path / "l", "qlora", dict(lora_r=2), "Liger kernels need a CUDA GPU",
                 liger="on")
