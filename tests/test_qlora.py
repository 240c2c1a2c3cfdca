"""What only QLoRA has: the NF4 base, peft's own loader, and the SVD-based initialisations.

The behaviour every method shares (loss falls, base unchanged, save/load, counts) is in test_methods.py.
"""

import json

import pytest
import torch

from medpeft.precision import compute_dtype
from test_methods import MATRIX, make

pytestmark = pytest.mark.filterwarnings("ignore")


@pytest.fixture(scope="module")
def qlora_out(tiny_model, processed, tmp_path_factory):
    _, options, overrides, _ = MATRIX["qlora-nf4"]
    out = tmp_path_factory.mktemp("q") / "qlora"
    run = make(tiny_model, processed, out, "qlora", options, overrides, max_steps=2)
    try:
        run.save(run.fit())
    finally:
        run.cleanup()
    return run, out


def test_base_is_nf4_with_double_quantization_computing_in_the_machines_dtype(qlora_out):
    run, _ = qlora_out
    model = run.model
    four_bit = [p for p in model.parameters() if p.__class__.__name__ == "Params4bit"]
    assert len(four_bit) == 7 * model.config.num_hidden_layers  # every linear layer but lm_head
    layer = model.base_model.model.model.layers[0].self_attn.q_proj.base_layer
    assert layer.weight.quant_state.quant_type == "nf4" and layer.weight.quant_state.nested
    assert layer.compute_dtype == compute_dtype("cpu")  # bf16 where the CPU runs it natively, else float32


def test_peft_loads_the_adapter_directly(qlora_out, tiny_model):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    _, out = qlora_out
    config = json.loads((out / "adapter_config.json").read_text())
    assert config["r"] == 4 and config["peft_type"] == "LORA"
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_model), str(out))
    assert sum(p.numel() for n, p in model.named_parameters() if "lora_" in n) == \
        json.loads((out / "metrics.json").read_text())["trainable_parameters"]


@pytest.mark.parametrize("init", ["gaussian", "olora", "pissa", "loftq"])
def test_initialisations_train_save_and_load(init, tiny_model, processed, tmp_path):
    """Every init runs on a 4-bit base; PiSSA/OLoRA change the base, so they are saved as a plain LoRA of rank 2r."""
    from medpeft.outputs import load_trained

    out = tmp_path / init
    run = make(tiny_model, processed, out, "qlora", dict(lora_r=4, init_lora_weights=init), dict(load_in_4bit=True),
               max_steps=2)
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
        run = make(tiny_model, processed, tmp_path / init, "qlora", dict(lora_r=8, init_lora_weights=init),
                   dict(load_in_4bit=True))
        batch = torch.tensor([run.train_examples[0]["input_ids"]])
        with torch.no_grad():
            logits[init] = run.model(input_ids=batch).logits.float()
        run.cleanup()
    with torch.no_grad():
        reference = full(input_ids=batch).logits
    error = {k: (v - reference).abs().mean().item() for k, v in logits.items()}
    assert error["loftq"] < 0.9 * error["default"], error


def test_loftq_needs_a_4bit_base(tiny_model, processed, tmp_path):
    from medpeft.errors import UsageError

    with pytest.raises(UsageError, match="needs --load_in_4bit"):
        make(tiny_model, processed, tmp_path / "l", "qlora", dict(init_lora_weights="loftq"), dict(load_in_4bit=False))
