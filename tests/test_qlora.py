"""QLoRA through the shared training path, on a tiny random Mistral (4-bit NF4 on the CPU, and 16-bit)."""

import json
from pathlib import Path

import pytest
import torch

from medpeft import methods
from medpeft.config import TrainConfig
from medpeft.methods.qlora import Options
from medpeft.training import build, load_trained

pytestmark = pytest.mark.filterwarnings("ignore")


def config(tiny_model, processed, out, **kw):
    base = dict(model_name=tiny_model, data_path=processed, output_dir=str(out), max_steps=20, batch_size=8,
                learning_rate=1e-2, warmup_ratio=0.0, logging_steps=1, max_eval_samples=32, seed=0,
                load_in_4bit=True, lr_scheduler_type="constant_with_warmup")
    base.update(kw)
    return TrainConfig(**base)


def base_state(model):
    return {n: p.detach().clone() for n, p in model.named_parameters() if "lora_" not in n}


@pytest.fixture(scope="module", params=[True, False], ids=["nf4", "16bit"])
def trained(request, tiny_model, processed, tmp_path_factory):
    """One short QLoRA run, with weight snapshots taken before and after fit()."""
    out = tmp_path_factory.mktemp("runs") / "qlora"
    run = build("qlora", config(tiny_model, processed, out, load_in_4bit=request.param),
                Options(lora_r=4, lora_alpha=8, lora_dropout=0.0), log=lambda *a: None)
    before = {n: p.detach().clone() for n, p in run.model.named_parameters()}
    quant_before = {n: b.detach().clone() for n, b in run.model.named_buffers()}
    metrics = run.fit()
    run.save(metrics)
    run.cleanup()
    return dict(run=run, out=out, before=before, quant_before=quant_before, metrics=metrics,
                four_bit=request.param)


def test_loss_falls(trained):
    curve = [p["loss"] for p in trained["metrics"]["loss_curve"]]
    assert len(curve) == 20
    assert sum(curve[-3:]) / 3 < sum(curve[:3]) / 3 - 0.5  # nats
    assert trained["metrics"]["validation_loss_final"] < trained["metrics"]["validation_loss_base"]


def test_base_weights_unchanged_and_only_lora_weights_change(trained):
    model, before = trained["run"].model, trained["before"]
    changed = {n for n, p in model.named_parameters() if not torch.equal(p.detach(), before[n])}
    assert changed, "nothing was trained"
    assert all("lora_A" in n or "lora_B" in n for n in changed), sorted(changed)[:5]
    assert {n for n, p in model.named_parameters() if p.requires_grad} == {
        n for n in before if "lora_" in n}
    # the 4-bit base is stored as packed uint8 parameters: bitwise identical
    base = [n for n in before if "lora_" not in n]
    assert base and all(torch.equal(model.get_parameter(n).detach(), before[n]) for n in base)
    for n, b in model.named_buffers():
        assert torch.equal(b, trained["quant_before"][n])


def test_base_is_nf4_with_double_quantization_exactly_when_asked(trained):
    model = trained["run"].model
    four_bit = [p for p in model.parameters() if p.__class__.__name__ == "Params4bit"]
    if not trained["four_bit"]:
        assert not four_bit and {p.dtype for p in model.parameters()} == {torch.float32}
        return
    layer = model.base_model.model.model.layers[0].self_attn.q_proj.base_layer
    state = layer.weight.quant_state
    assert len(four_bit) == 7 * model.config.num_hidden_layers
    assert state.quant_type == "nf4" and state.nested and layer.compute_dtype == torch.bfloat16


def test_trainable_count_matches_formula(trained):
    run = trained["run"]
    # r x (in + out) for each of the 7 linear layers of each decoder layer (all-linear excludes lm_head)
    cfg = run.model.config
    h, i, kv = cfg.hidden_size, cfg.intermediate_size, cfg.num_key_value_heads * (cfg.hidden_size // cfg.num_attention_heads)
    per_layer = 4 * ((h + h) + (h + kv) + (h + kv) + (h + h) + (h + i) + (h + i) + (i + h))
    expected = cfg.num_hidden_layers * per_layer
    assert trained["metrics"]["trainable_parameters"] == expected
    assert methods.get("qlora").trainable_formula(run.model, run.opts) == expected


def test_output_files_and_metrics(trained):
    out = Path(trained["out"])
    for name in ("adapter_config.json", "adapter_model.safetensors", "tokenizer.json", "tokenizer_config.json",
                 "medpeft_config.json", "metrics.json"):
        assert (out / name).is_file(), name
    metrics = json.loads((out / "metrics.json").read_text())
    for key in ("loss_curve", "validation_loss_base", "validation_loss_final", "train_runtime_s", "tokens_per_s",
                "peak_memory_gb", "trainable_parameters", "total_parameters", "versions"):
        assert key in metrics, key
    assert metrics["versions"]["peft"] and metrics["tokens_per_s"] > 0
    config = json.loads((out / "medpeft_config.json").read_text())
    assert config["method"] == "qlora" and config["settings"]["lora_r"] == 4
    assert config["settings"]["load_in_4bit"] == trained["four_bit"]
    assert not list(out.parent.glob(".qlora.*")), "temporary folders left behind"


def test_save_load_gives_identical_logits(trained):
    run = trained["run"]
    batch = torch.tensor([run.train_examples[0]["input_ids"]])
    from medpeft.modeling import autocast

    run.model.eval()
    with torch.no_grad(), autocast(run.model):
        expected = run.model(input_ids=batch).logits
    loaded, tokenizer, info = load_trained(str(trained["out"]))
    with torch.no_grad(), autocast(loaded):
        got = loaded(input_ids=batch).logits
    assert info["method"] == "qlora"
    assert torch.equal(got, expected)
    assert tokenizer.eos_token == "<|im_end|>"


def test_peft_loads_the_adapter_directly(trained, tiny_model):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(tiny_model)
    model = PeftModel.from_pretrained(base, str(trained["out"]))
    assert any("lora_A" in n for n, _ in model.named_parameters())


def test_lora_is_identity_at_initialisation(tiny_model, processed, tmp_path):
    run = build("qlora", config(tiny_model, processed, tmp_path / "q", load_in_4bit=False), Options(lora_r=4),
                log=lambda *a: None)
    try:
        batch = torch.tensor([run.train_examples[0]["input_ids"]])
        with torch.no_grad():
            with_lora = run.model(input_ids=batch).logits
            with run.model.disable_adapter():
                without = run.model(input_ids=batch).logits
        assert torch.equal(with_lora, without)
    finally:
        run.cleanup()


@pytest.mark.parametrize("init", ["gaussian", "olora", "pissa", "loftq"])
def test_svd_initialisations_train_and_save(init, tiny_model, processed, tmp_path):
    """Every init runs on a 4-bit base and gives an adapter that loads; PiSSA/OLoRA are saved as plain LoRA."""
    out = tmp_path / init
    run = build("qlora", config(tiny_model, processed, out, max_steps=2), Options(lora_r=4, init_lora_weights=init),
                log=lambda *a: None)
    try:
        run.save(run.fit())
    finally:
        run.cleanup()
    adapter = json.loads((out / "adapter_config.json").read_text())
    assert adapter["r"] == (8 if init in ("pissa", "olora") else 4)
    model, _, _ = load_trained(str(out))
    assert any("lora_B" in n for n, _ in model.named_parameters())


def test_loftq_reduces_the_quantization_error(tiny_model, processed, tmp_path):
    from transformers import AutoModelForCausalLM

    full = AutoModelForCausalLM.from_pretrained(tiny_model)
    logits = {}
    for init in ("default", "loftq"):
        run = build("qlora", config(tiny_model, processed, tmp_path / init), Options(lora_r=8, init_lora_weights=init),
                    log=lambda *a: None)
        batch = torch.tensor([run.train_examples[0]["input_ids"]])
        with torch.no_grad():
            logits[init] = run.model(input_ids=batch).logits.float()
        run.cleanup()
    with torch.no_grad():
        reference = full(input_ids=batch).logits
    error = {k: (v - reference).abs().mean().item() for k, v in logits.items()}
    assert error["loftq"] < 0.9 * error["default"], error
