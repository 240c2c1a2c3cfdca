"""Packed training rows: grouping, the collated row, and attention that stays inside each example."""

import pytest
import torch

from medpeft.data import load_split
from medpeft.tokens import PadCollator, answer_examples
from medpeft.errors import UsageError
from medpeft.training.packing import PackedCollator, enable_varlen_attention, pack_batches


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
    restore_attention = enable_varlen_attention(model)
    try:
        packed = _token_logprobs(model, PackedCollator()([examples]))[0]
    finally:
        restore_attention()
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
    return run


def test_a_methods_prefix_opens_the_row_and_every_example_attends_to_it():
    a = {"input_ids": [5, 6, 7], "labels": [-100, 6, 7]}
    b = {"input_ids": [8, 9], "labels": [-100, 9]}
    collate = PackedCollator(prefix=2)
    row = collate([[a, b]])
    assert row["input_ids"].tolist() == [[0, 0, 5, 6, 7, 8, 9]]
    assert row["position_ids"].tolist() == [[0, 1, 2, 3, 4, 2, 3]]  # each example right after the prefix
    assert row["labels"].tolist() == [[-100, -100, -100, 6, 7, -100, 9]]
    assert row["cu_seq_lens_q"].tolist() == [0, 2, 5, 7] and row["max_length_q"] == 3
    assert row["kv_index"].tolist() == [0, 1, 0, 1, 2, 3, 4, 0, 1, 5, 6]  # prefix, then prefix + own tokens
    assert row["cu_seq_lens_k"].tolist() == [0, 2, 7, 11] and row["max_length_k"] == 5
    assert collate.real_tokens == collate.padded_tokens == 5  # the prefix is the method's, not the data's


def test_packed_ptuning_trains_each_example_as_peft_does_alone(tiny_model, processed):
    """peft puts the virtual tokens before a row; packed, the row's virtual tokens stand before every example, so
    its loss and the prompt encoder's gradient are what peft's forward gives for the example alone."""
    from peft import get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from medpeft.methods import ptuning

    tokenizer = AutoTokenizer.from_pretrained(tiny_model)
    base = AutoModelForCausalLM.from_pretrained(tiny_model, dtype=torch.float32, attn_implementation="sdpa")
    torch.manual_seed(0)
    model = get_peft_model(base, ptuning._prompt_config(ptuning.Options(num_virtual_tokens=4, encoder_hidden_size=16),
                                                        base.config.hidden_size))
    examples = answer_examples(tokenizer, load_split(processed, "train"), 256)[:5]
    assert all(e["labels"][0] == -100 for e in examples)  # the prompt opens each example: no loss there

    def encoder_grads(loss):
        model.zero_grad(set_to_none=True)
        loss.backward()
        return [p.grad.clone() for p in model.parameters() if p.requires_grad]

    sums, counts = [], []
    for e in examples:
        one = model(input_ids=torch.tensor([e["input_ids"]]), labels=torch.tensor([e["labels"]]))
        n = sum(label != -100 for label in e["labels"][1:])
        sums.append(one.loss * n)
        counts.append(n)
    alone = sum(sums) / sum(counts)
    expected = encoder_grads(alone)

    slots, undo = ptuning.pack(model)
    restore_attention = enable_varlen_attention(model)
    try:
        assert slots == 4
        packed = model(**PackedCollator(slots)([examples])).loss
        got = encoder_grads(packed)
    finally:
        restore_attention()
        undo()
    torch.testing.assert_close(packed, alone, atol=1e-5, rtol=1e-5)
    for g, e in zip(got, expected):
        torch.testing.assert_close(g, e, atol=1e-6, rtol=1e-4)
    assert "forward" not in vars(model)  # peft's own forward again, for evaluation and generation
    # The virtual tokens matter to that loss: with the slots left as token 0 it differs (the check can fail).
    # (Without the examples' keys reaching the prefix, the first check fails too.)
    restore_attention = enable_varlen_attention(model)
    try:
        with torch.no_grad():
            unfilled = model.base_model(**PackedCollator(slots)([examples])).loss
    finally:
        restore_attention()
    assert abs(float(unfilled) - float(alone.detach())) > 1e-3


def test_liger_on_without_a_gpu_is_a_clear_error(tiny_model, processed, tmp_path):
    _fit_refused(tiny_model, processed, tmp_path / "l", "qlora", dict(lora_r=2), "Liger kernels need a CUDA GPU",
                 liger="on")


def test_a_run_stopped_while_setting_up_packing_leaves_the_model_as_it_was(tiny_model, processed, tmp_path):
    run = _fit_refused(tiny_model, processed, tmp_path / "p", "ptuning", dict(num_virtual_tokens=4),
                       "Liger kernels need a CUDA GPU", liger="on", packing="on")
    assert "forward" not in vars(run.model)  # P-Tuning's packed forward undone
    assert run.model.config._attn_implementation != "medpeft_varlen"  # and the attention restored


def bench_one(method, tiny_model, steps, padded=False, env=None, **overrides) -> dict:
    """One run of benchmarks/gpu_throughput.py --one (its own process, as on the GPU) on the tiny model: its
    RESULT line."""
    import json
    import os
    import subprocess
    import sys
    from pathlib import Path

    script = Path(__file__).resolve().parent.parent / "benchmarks" / "gpu_throughput.py"
    spec = {"name": method, "ckpt": tiny_model, "steps": steps, "tokens_per_batch": 512, "seed": 1,
            "padded_groups": padded, "overrides": {"packing": "on", "dtype": "float32", "liger": "off",
                                                   "compile": "off", **overrides}}
    proc = subprocess.run([sys.executable, str(script), "--one", json.dumps(spec)], capture_output=True, text=True,
                          timeout=600, env={**os.environ, **(env or {})})
    line = next((x for x in proc.stdout.splitlines() if x.startswith("RESULT ")), None)
    assert line, proc.stderr[-2000:]
    return json.loads(line[len("RESULT "):])


@pytest.mark.parametrize("method", ["lora", "ptuning"])
def test_the_gpu_benchmarks_padded_reference_trains_like_packing(method, tiny_model):
    """benchmarks/gpu_throughput.py's correctness check compares packed training with the same micro-batches padded
    (the model's own attention); each side runs in its own process, as on the GPU. On the CPU both must agree."""
    curves = {}
    for padded in (False, True):
        result = bench_one(method, tiny_model, 3, padded=padded, logging_steps=1)
        assert result["speed_settings"].get("padded_groups", False) is padded
        curves[padded] = [p["loss"] for p in result["loss_curve"]]
    assert len(curves[True]) == 3
    assert max(abs(a - b) / b for a, b in zip(curves[False], curves[True])) < 1e-3, curves


def test_the_gpu_benchmarks_profile_records_the_steps_asked_for(tiny_model, tmp_path):
    """gpu_throughput --profile FIRST:COUNT hooks a callback into the Trainer the training run builds; it once
    patched a name the run no longer read, and the profile was silently never taken."""
    bench_one("lora", tiny_model, 4, env={"BENCH_PROFILE": "1:2", "OUT": str(tmp_path)})
    summary = tmp_path / "profile_lora_1gpu_ga1_rank0.txt"
    assert summary.read_text().startswith("steps 2-3: wall "), sorted(p.name for p in tmp_path.iterdir())
    assert (tmp_path / "profile_lora_1gpu_ga1_rank0.json.gz").stat().st_size > 1000


def test_the_unsloth_peers_batches_hold_every_token_once_with_prompt_and_padding_masked():
    """benchmarks/unsloth_peer.py's rate counts the tokens its batches hold: each batch has --batch_size distinct
    examples of similar length, every example token once, the prompt and the padding out of the loss."""
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benchmarks"))
    from gpu_throughput import synthetic_examples
    from unsloth_peer import collate, length_grouped_batches, word_tokenizer

    examples = synthetic_examples(200, seed=3)
    batches = length_grouped_batches(examples, 16, seed=3)
    assert len(batches) == 200 // 16 and all(len(set(b)) == 16 for b in batches)
    assert len({j for b in batches for j in b}) == 16 * len(batches)
    spread = [max(len(examples[j]["input_ids"]) for j in b) - min(len(examples[j]["input_ids"]) for j in b)
              for b in batches]
    everything = [len(e["input_ids"]) for e in examples]
    assert sum(spread) / len(spread) < (max(everything) - min(everything)) / 2  # grouped, not random
    ids, labels, mask = collate(examples, batches[0])
    for row, j in enumerate(batches[0]):
        n = len(examples[j]["input_ids"])
        assert ids[row, :n].tolist() == examples[j]["input_ids"] and mask[row].sum() == n
        assert labels[row, :n].tolist() == examples[j]["labels"] and (labels[row, n:] == -100).all()
    assert word_tokenizer()("t5 t31999").input_ids == [5, 31999]
