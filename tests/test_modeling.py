"""Model resolution: the embedded default, local directories, GGUF files, hub ids offline; shipped configs."""

import time
from pathlib import Path

import pytest

from medpeft import config, methods
from medpeft.errors import UsageError
from medpeft.modeling import hub_reachable, load_tokenizer, resolve_model

ROOT = Path(__file__).resolve().parents[1]


def test_embedded_default_is_converted_once_and_its_tokens_fixed():
    """SmolLM2's GGUF tokenizer says eos=<|im_start|>; a model trained with that never stops."""
    from transformers import AutoConfig

    path = resolve_model("smollm2-135m")
    started = time.time()
    assert resolve_model("SmolLM2-135M") == path  # second call reuses the converted copy
    assert time.time() - started < 5
    tok = load_tokenizer(path)
    cfg = AutoConfig.from_pretrained(path)
    assert tok.eos_token == "<|im_end|>" and tok.eos_token_id == cfg.eos_token_id == 2
    assert tok.pad_token is not None and tok.pad_token_id != tok.eos_token_id
    assert cfg.model_type == "llama" and cfg.num_hidden_layers == 30
    text = tok.apply_chat_template([{"role": "user", "content": "Hi"}], tokenize=False, add_generation_prompt=True)
    assert text.endswith("<|im_start|>assistant\n")


def test_local_directory_is_used_as_is(tiny_model):
    assert resolve_model(tiny_model) == tiny_model


@pytest.mark.parametrize("name,needle", [
    ("missing.gguf", "GGUF file 'missing.gguf' does not exist"),
    ("./no/such/dir", "neither a model directory"),
    ("", "--model_name is empty"),
])
def test_unusable_model_names(name, needle):
    with pytest.raises(UsageError, match=needle):
        resolve_model(name)


def test_directory_without_config_is_refused(tmp_path):
    with pytest.raises(UsageError, match="has no config.json"):
        resolve_model(str(tmp_path))


def test_hub_reachability_is_decided_quickly(monkeypatch):
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setenv("HF_ENDPOINT", "http://127.0.0.1:9")  # the discard port: refused at once
    assert hub_reachable() is False
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_ENDPOINT", "https://huggingface.co")
    assert hub_reachable() is False


@pytest.mark.parametrize("path", sorted((ROOT / "configs").glob("*.yaml")), ids=lambda p: p.name)
def test_shipped_configs_parse_and_validate(path):
    data = config.load_yaml(str(path))
    method = methods.get(data["method"])
    cfg, opts = config.parse(["--config", str(path)], "test", "", [config.TrainConfig, method.Options],
                             method.DEFAULTS)
    assert path.read_text().startswith("# python ")  # each opens with the command that runs it
    for key, value in data.items():
        if key != "method":
            assert config.as_dict(cfg, opts)[key] == value, key
