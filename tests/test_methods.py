"""One behaviour matrix over every method, through the shared training path, on a tiny random Mistral.

For each method: loss falls over 20 steps; base weights stay bitwise unchanged; only the method's weights
change; save -> load reproduces logits exactly; generation after loading runs; the trainable count equals
the formula; LoRA and adapters are the identity at initialisation.
"""

import json
from pathlib import Path

import pytest
import torch

from medpeft import methods
from medpeft.config import TrainConfig
from medpeft.errors import UsageError
from medpeft.modeling import autocast
from medpeft.outputs import load_trained
from medpeft.training import build

from conftest import within

pytestmark = pytest.mark.filterwarnings("ignore")

# id: (method, options, training overrides, names of the method's own parameters)
MATRIX = {
    "qlora-nf4": ("qlora", dict(lora_r=4, lora_alpha=8, lora_dropout=0.0), dict(load_in_4bit=True), ("lora_",)),
    "lora-16bit": ("qlora", dict(lora_r=4, lora_alpha=8, lora_dropout=0.0), dict(load_in_4bit=False), ("lora_",)),
    "qlora-dora": ("qlora", dict(lora_r=4, lora_alpha=8, lora_dropout=0.0, use_dora=True), dict(load_in_4bit=True),
                   ("lora_",)),
    "lora-rslora": ("qlora", dict(lora_r=4, lora_alpha=8, lora_dropout=0.0, use_rslora=True),
                    dict(load_in_4bit=False, learning_rate=5e-3), ("lora_",)),
    "lora-loraplus": ("qlora", dict(lora_r=4, lora_alpha=8, lora_dropout=0.0, loraplus_lr_ratio=16),
                      dict(load_in_4bit=False, learning_rate=2e-3), ("lora_",)),
    "adapter-pfeiffer": ("adapter", dict(adapter_size=16), dict(learning_rate=1e-2), ("adapters.",)),
    "adapter-houlsby": ("adapter", dict(adapter_size=8, adapter_type="houlsby"), dict(learning_rate=1e-2),
                        ("adapters.",)),
    "adapter-parallel": ("adapter", dict(adapter_size=8, adapter_type="parallel"), dict(learning_rate=1e-2),
                         ("adapters.",)),
    "adapter-nf4": ("adapter", dict(adapter_size=16), dict(learning_rate=1e-2, load_in_4bit=True), ("adapters.",)),
    "lora-packed": ("qlora", dict(lora_r=4, lora_alpha=8, lora_dropout=0.0), dict(packing="on", tokens_per_batch=512),
                    ("lora_",)),
    "adapter-packed": ("adapter", dict(adapter_size=16), dict(learning_rate=1e-2, packing="on", tokens_per_batch=512),
                       ("adapters.",)),
    "ptuning-packed": ("ptuning", dict(num_virtual_tokens=8, encoder_hidden_size=32),
                       dict(learning_rate=5e-2, packing="on", tokens_per_batch=512), ("prompt_encoder",)),
    "adapter-bf16": ("adapter", dict(adapter_size=16), dict(learning_rate=1e-2, dtype="bfloat16"), ("adapters.",)),
    "ptuning-mlp": ("ptuning", dict(num_virtual_tokens=8, encoder_hidden_size=32), dict(learning_rate=5e-2),
                    ("prompt_encoder",)),
    "ptuning-lstm": ("ptuning", dict(num_virtual_tokens=8, encoder_hidden_size=32,
                                     encoder_reparameterization_type="LSTM"), dict(learning_rate=3e-2),
                     ("prompt_encoder",)),
}


def make(tiny_model, processed, out, method, options, overrides, **kw):
    settings = dict(model_name=tiny_model, data_path=processed, output_dir=str(out), max_steps=20, batch_size=8,
                    learning_rate=1e-2, warmup_ratio=0.0, logging_steps=1, max_eval_samples=32, seed=0,
                    lr_scheduler_type="constant_with_warmup", load_in_4bit=False)
    settings.update(overrides)
    settings.update(kw)
    module = methods.get(method)
    return build(method, TrainConfig(**settings), module.Options(**options), log=lambda *a: None)


def is_method_param(name, marks):
    return any(m in name for m in marks)


@pytest.fixture(scope="module", params=list(MATRIX), ids=list(MATRIX))
def trained(request, tiny_model, processed, tmp_path_factory):
    method, options, overrides, marks = MATRIX[request.param]
    out = tmp_path_factory.mktemp("runs") / request.param
    run = make(tiny_model, processed, out, method, options, overrides)
    before = {n: p.detach().clone() for n, p in run.model.named_parameters()}
    metrics = run.fit()
    run.save(metrics)
    run.cleanup()
    return dict(run=run, out=out, before=before, metrics=metrics, marks=marks, method=method)


def test_a_run_does_not_inherit_the_precision_of_an_earlier_run_in_the_same_process(tiny_model, processed, tmp_path):
    """run_all trains three methods in one process: an fp32 P-Tuning run after a bf16 (4-bit) one once trained
    under bf16 autocast, because accelerate kept the first run's mixed precision for the whole process."""
    curves = []
    for i, name in enumerate(["ptuning-mlp", "qlora-nf4", "ptuning-mlp"]):
        method, options, overrides, _ = MATRIX[name]
        # explicit dtypes: with auto, a CPU without native bf16 would run all three in float32
        dtype = "bfloat16" if name == "qlora-nf4" else "float32"
        run = make(tiny_model, processed, tmp_path / str(i), method, options, overrides, max_steps=3, dtype=dtype)
        try:
            curves.append([p["loss"] for p in run.fit()["loss_curve"]])
        finally:
            run.cleanup()
    assert curves[0] == curves[2] != curves[1]


def test_loss_falls(trained):
    curve = [p["loss"] for p in trained["metrics"]["loss_curve"]]
    assert len(curve) == 20
    assert sum(curve[-3:]) / 3 < sum(curve[:3]) / 3 - 0.2, curve  # nats; P-Tuning on a random model is the slowest
    assert trained["metrics"]["validation_loss_final"] < trained["metrics"]["validation_loss_base"]


def test_only_the_method_weights_change(trained):
    model, before, marks = trained["run"].model, trained["before"], trained["marks"]
    params = dict(model.named_parameters())
    changed = {n for n, p in params.items() if not torch.equal(p.detach(), before[n])}
    assert changed and all(is_method_param(n, marks) for n in changed), sorted(changed)[:5]
    base = [n for n in params if not is_method_param(n, marks)]
    assert base and all(torch.equal(params[n].detach(), before[n]) for n in base)  # bitwise
    assert {n for n, p in params.items() if p.requires_grad} == {n for n in params if is_method_param(n, marks)}


def test_trainable_count_matches_formula(trained):
    run = trained["run"]
    expected = methods.get(trained["method"]).trainable_formula(run.model, run.opts)
    assert trained["metrics"]["trainable_parameters"] == expected
    assert 0 < expected < trained["metrics"]["total_parameters"]


def test_save_then_load_reproduces_logits_and_generates(trained):
    run = trained["run"]
    ids = torch.tensor([run.train_examples[0]["input_ids"]])
    run.model.eval()
    with torch.no_grad(), autocast(run.model):
        expected = run.model(input_ids=ids, attention_mask=torch.ones_like(ids)).logits
    model, tokenizer, info = load_trained(str(trained["out"]))
    with torch.no_grad(), autocast(model):
        got = model(input_ids=ids, attention_mask=torch.ones_like(ids)).logits
        generated = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=5,
                                   do_sample=False, pad_token_id=tokenizer.pad_token_id, use_cache=True)
    with torch.no_grad(), autocast(model):
        uncached = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=5,
                                  do_sample=False, pad_token_id=tokenizer.pad_token_id, use_cache=False)
    assert torch.equal(generated, uncached)  # the KV cache is used and kept right (AdapterHub needs a fix)
    assert info["method"] == trained["method"]
    if trained["run"].opts.__dict__.get("encoder_reparameterization_type") == "LSTM":
        # peft saves the virtual tokens the LSTM produced; its training and inference kernels round differently
        torch.testing.assert_close(got, expected, atol=1e-5, rtol=0)
    else:
        assert torch.equal(got, expected)
    assert generated.shape[1] > ids.shape[1]


def test_step_times_add_up_to_the_steady_rate(trained):
    m = trained["metrics"]
    times = m["step_seconds_first_100"]
    assert len(times) == 19 and all(t > 0 for t in times)  # between the ends of 20 steps
    assert m["steady_steps"] == 16  # the first 3 are warm-up
    assert abs(m["steady_step_s"] - sum(times[3:]) / 16) < 1e-3


def test_output_directory(trained):
    out = Path(trained["out"])
    files = {p.name for p in out.iterdir()}
    assert {"medpeft_config.json", "metrics.json", "tokenizer.json"} <= files
    weights = methods.get(trained["method"]).WEIGHTS_FILE
    assert weights.endswith(".safetensors") and weights in files
    assert "model_head.safetensors" not in files  # no copy of the frozen LM head
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["adapter_size_bytes"] == (out / weights).stat().st_size and metrics["method"] == trained["method"]


@pytest.mark.parametrize("case", ["qlora-nf4", "lora-16bit", "qlora-dora", "lora-rslora", "adapter-pfeiffer",
                                  "adapter-houlsby", "adapter-parallel", "adapter-nf4"])
def test_identity_at_initialisation(case, tiny_model, processed, tmp_path):
    method, options, overrides, _ = MATRIX[case]
    run = make(tiny_model, processed, tmp_path / case, method, options, overrides)
    try:
        with_method = run.validation_loss()["loss"]
        with methods.get(method).disabled(run.model):
            base = run.validation_loss()["loss"]
        if options.get("use_dora"):
            # DoRA's magnitude over the weight's norm is 1 at initialisation only up to the rounding of the
            # compute dtype, in which the norm is taken
            assert within(run.model, abs(with_method - base), float32=1e-4, bfloat16=2e-3,
                          what="DoRA at initialisation: |loss with - loss without|"), (with_method, base)
        else:
            assert abs(with_method - base) < 1e-4, (with_method, base)
    finally:
        run.cleanup()


@pytest.mark.parametrize("case", ["lora-16bit", "adapter-pfeiffer", "ptuning-mlp"])
def test_loading_onto_the_wrong_base_model_is_a_clear_error(case, trained_outputs, other_model, monkeypatch):
    out = trained_outputs[case]
    config = json.loads((out / "medpeft_config.json").read_text())
    config["settings"]["model_name"] = other_model
    (out / "medpeft_config.json").write_text(json.dumps(config))
    with pytest.raises(UsageError, match="do not fit base model"):
        load_trained(str(out))


@pytest.fixture(scope="module")
def other_model(tmp_path_factory):
    """A base with another hidden size: adapters trained for the tiny model cannot fit it."""
    from transformers import MistralConfig, MistralForCausalLM

    from conftest import build_tokenizer

    path = tmp_path_factory.mktemp("other")
    tok = build_tokenizer()
    MistralForCausalLM(MistralConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                     num_attention_heads=4, num_key_value_heads=2)).save_pretrained(path)
    tok.save_pretrained(path)
    return str(path)


@pytest.fixture(scope="module")
def trained_outputs(tiny_model, processed, tmp_path_factory):
    outs = {}
    for case in ("lora-16bit", "adapter-pfeiffer", "ptuning-mlp"):
        method, options, overrides, _ = MATRIX[case]
        out = tmp_path_factory.mktemp("wrong") / case
        run = make(tiny_model, processed, out, method, options, overrides, max_steps=1)
        try:
            run.save(run.fit())
        finally:
            run.cleanup()
        outs[case] = out
    return outs


def test_the_variants_change_what_peft_builds(tiny_model, processed, tmp_path):
    """rsLoRA scales by alpha / sqrt(r), DoRA adds a magnitude per output, LoRA+ gives B its own learning rate."""
    from peft.tuners.lora import LoraLayer

    built = {}
    for case in ("lora-16bit", "lora-rslora", "qlora-dora", "lora-loraplus"):
        method, options, overrides, _ = MATRIX[case]
        run = make(tiny_model, processed, tmp_path / case, method, options, overrides)
        try:
            layer = next(m for m in run.model.modules() if isinstance(m, LoraLayer))
            groups = methods.get("qlora").optimizer_groups(run.model, run.opts, 1e-3)
            built[case] = (layer.scaling["default"], len(layer.lora_magnitude_vector), groups)
        finally:
            run.cleanup()
    assert built["lora-16bit"][0] == 8 / 4 and built["lora-rslora"][0] == 8 / 4 ** 0.5
    assert built["lora-16bit"][1] == 0 and built["qlora-dora"][1] == 1
    assert built["lora-16bit"][2] is None
    slow, fast = built["lora-loraplus"][2]
    assert (slow["lr"], fast["lr"]) == (1e-3, 16e-3) and len(slow["params"]) == len(fast["params"]) > 0


def test_loraplus_trains_b_faster_than_a(tiny_model, processed, tmp_path):
    """After the same steps, B moved further from zero under LoRA+ than without it, at the same base rate."""
    norms = {}
    for ratio in (0, 16):
        method, options, overrides, _ = MATRIX["lora-loraplus"]
        run = make(tiny_model, processed, tmp_path / str(ratio), method, dict(options, loraplus_lr_ratio=ratio),
                   overrides, max_steps=3)
        try:
            run.fit(score_base=False)
            norms[ratio] = sum(float(p.norm()) for n, p in run.model.named_parameters() if "lora_B" in n)
        finally:
            run.cleanup()
    assert norms[16] > 4 * norms[0] > 0, norms


def test_ptuning_text_init_reproduces_the_text_embeddings(tiny_model, processed, tmp_path):
    from medpeft.methods.ptuning import text_embeddings

    method, options, overrides, _ = MATRIX["ptuning-mlp"]
    run = make(tiny_model, processed, tmp_path / "p", method, dict(options, prompt_init="text",
                                                                    prompt_init_text="What causes scurvy?"),
               overrides)
    try:
        encoder = run.model.prompt_encoder["default"]
        with torch.no_grad():
            virtual = encoder(torch.arange(encoder.embedding.num_embeddings))
        target = text_embeddings(run.model, run.tokenizer, "What causes scurvy?", virtual.shape[0])
        relative = ((virtual - target).norm() / target.norm()).item()
        assert relative < 0.05, relative
    finally:
        run.cleanup()


def test_trainer_counts_flops_as_transformers_does(tiny_model, tmp_path):
    """medpeft's Trainer keeps the parameter count instead of recounting it at every micro-batch."""
    from transformers import AutoModelForCausalLM, Trainer, TrainingArguments

    from medpeft.training.trainer import trainer_class

    model = AutoModelForCausalLM.from_pretrained(tiny_model)
    trainer = trainer_class()(model=model, args=TrainingArguments(output_dir=str(tmp_path), use_cpu=True,
                                                                   report_to=[]))
    per_token = 6 * model.num_parameters(exclude_embeddings=True)
    for shape in ((3, 7), (1, 50), (8, 1)):
        batch = {"input_ids": torch.ones(shape, dtype=torch.long)}
        assert trainer.floating_point_ops(batch) == Trainer.floating_point_ops(trainer, batch) == \
            per_token * shape[0] * shape[1]


@pytest.mark.parametrize("case", ["qlora-nf4", "lora-16bit", "adapter-pfeiffer", "ptuning-mlp"])
def test_logits_from_the_first_answer_token_on_give_the_same_loss_and_gradients(case, tiny_model, processed, tmp_path):
    """Padded batches ask the model for logits only where an answer token is predicted (PadCollator's
    answer_logits); the loss and every trainable gradient are those of the full logits."""
    from medpeft.tokens import PadCollator

    method, options, overrides, _ = MATRIX[case]
    run = make(tiny_model, processed, tmp_path / "o", method, options, overrides, dtype="float32")
    try:
        config = getattr(run.model, "active_peft_config", None)
        prefix = config.num_virtual_tokens if getattr(config, "is_prompt_learning", False) else 0
        examples = run.train_examples[:6]
        results = []
        for collator in (PadCollator(run.tokenizer.pad_token_id), PadCollator(run.tokenizer.pad_token_id, prefix)):
            batch = collator(examples)
            run.model.zero_grad(set_to_none=True)
            with autocast(run.model):
                loss = run.model(**batch).loss
            loss.backward()
            results.append((float(loss), {n: p.grad.clone() for n, p in run.model.named_parameters()
                                          if p.requires_grad}, batch))
        (full, full_grads, full_batch), (cut, cut_grads, cut_batch) = results
        width = full_batch["input_ids"].shape[1]
        assert "logits_to_keep" not in full_batch and cut_batch["logits_to_keep"] < width + prefix
        assert abs(full - cut) < 1e-5 * abs(full)
        for name, grad in full_grads.items():
            torch.testing.assert_close(cut_grads[name], grad, atol=1e-6, rtol=1e-4)
    finally:
        run.cleanup()
