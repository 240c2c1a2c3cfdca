"""GGUF export: llama.cpp's names, layout and metadata, the file read back against the model it came from, the
tokenizer's ids, the Ollama Modelfile's template against training's prompt, re-evaluation, and refusals."""

import errno
import json
import re
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from medpeft import gguf_export
from medpeft.cli import run
from medpeft.errors import UsageError
from medpeft.tokens import render

from conftest import MISTRAL_LIKE, build_model_dir, train_tiny

pytestmark = pytest.mark.filterwarnings("ignore")

LLAMA_CPP_BLOCK = {"attn_q", "attn_k", "attn_v", "attn_output", "ffn_gate", "ffn_up", "ffn_down", "attn_norm",
                   "ffn_norm"}


def read(path):
    import gguf

    reader = gguf.GGUFReader(str(path))
    fields = {}
    for key, field in reader.fields.items():
        try:
            fields[key] = field.contents()
        except Exception:  # noqa: BLE001 - a field gguf-py cannot turn into Python: not needed here
            pass
    return reader, fields


@pytest.fixture(scope="module")
def exported(tiny_model, tmp_path_factory):
    out = tmp_path_factory.mktemp("gguf") / "tiny.gguf"
    assert run(["export", "--model", tiny_model, "--quant", "f16,q8_0,q4_0", "--output", str(out)]) == 0
    return {q: out.with_name(f"tiny-{q}.gguf") for q in ("f16", "q8_0", "q4_0")} | {"dir": out.parent}


def test_the_file_has_llama_cpp_names_types_and_metadata(exported, tiny_model):
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(tiny_model)
    reader, fields = read(exported["q8_0"])
    names = {t.name for t in reader.tensors}
    expected = {"token_embd.weight", "output_norm.weight", "output.weight"} | {
        f"blk.{i}.{n}.weight" for i in range(config.num_hidden_layers) for n in LLAMA_CPP_BLOCK}
    assert names == expected
    types = {t.name: t.tensor_type.name for t in reader.tensors}
    assert all(types[n] == "F32" for n in names if "norm" in n)
    assert all(types[n] == "Q8_0" for n in names if "norm" not in n)
    q4 = {t.name: t.tensor_type.name for t in read(exported["q4_0"])[0].tensors}
    assert q4["output.weight"] == "Q8_0" and q4["blk.0.attn_q.weight"] == q4["token_embd.weight"] == "Q4_0"
    assert fields["general.architecture"] == "llama"
    assert (fields["llama.block_count"], fields["llama.attention.head_count"],
            fields["llama.attention.head_count_kv"], fields["llama.embedding_length"]) == (
        config.num_hidden_layers, config.num_attention_heads, config.num_key_value_heads, config.hidden_size)
    assert fields["llama.rope.dimension_count"] == config.hidden_size // config.num_attention_heads
    assert fields["tokenizer.ggml.model"] == "gpt2" and fields["tokenizer.ggml.pre"] == "gpt-2"
    assert len(fields["tokenizer.ggml.tokens"]) == config.vocab_size
    assert "<|im_start|>" in fields["tokenizer.chat_template"]
    assert fields["general.file_type"] == 7  # llama.cpp's MOSTLY_Q8_0
    sizes = [exported[q].stat().st_size for q in ("f16", "q8_0", "q4_0")]
    assert sizes[0] > sizes[1] > sizes[2]


def test_q_and_k_rows_are_in_llama_cpp_rotary_order(exported, tiny_model):
    """llama.cpp rotates interleaved pairs; transformers rotates halves: q/k rows are reordered per head."""
    from safetensors.torch import load_file
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(tiny_model)
    hf = load_file(str(Path(tiny_model) / "model.safetensors"))
    reader, _ = read(exported["f16"])
    stored = {t.name: t for t in reader.tensors}
    for name, heads in (("q_proj", config.num_attention_heads), ("k_proj", config.num_key_value_heads)):
        weight = hf[f"model.layers.1.self_attn.{name}.weight"].float()
        short = {"q_proj": "attn_q", "k_proj": "attn_k"}[name]
        got = torch.tensor(stored[f"blk.1.{short}.weight"].data.astype("float32"))
        half = weight.shape[0] // heads // 2
        rows = [h * 2 * half + j + k * half for h in range(heads) for j in range(half) for k in (0, 1)]
        assert torch.allclose(got, weight[rows], atol=1e-3), name  # f16 rounding
        assert not torch.allclose(got, weight, atol=1e-3)


@pytest.mark.parametrize("quant", ["f16", "q8_0", "q4_0"])
def test_read_back_gives_the_models_logits_to_the_quant_types_precision(exported, quant, tiny_model):
    summary = json.loads((exported["dir"] / "tiny.export.json").read_text())
    check = next(f for f in summary["files"] if f["quant"] == quant)["read_back"]
    assert check["same_token_ids"] and check["paragraph_tokens"] > 100
    bound = {"f16": 0.05, "q8_0": 0.5, "q4_0": 8.0}[quant]  # logits of the tiny model span about 20
    assert check["max_abs_logit_diff"] < bound, check
    assert check["greedy_agreement"] >= {"f16": 1.0, "q8_0": 0.9, "q4_0": 0.2}[quant], check


def test_the_finer_the_quant_the_closer_the_logits(exported):
    files = json.loads((exported["dir"] / "tiny.export.json").read_text())["files"]
    diffs = [f["read_back"]["max_abs_logit_diff"] for f in files]
    assert diffs[0] < diffs[1] < diffs[2], diffs  # f16, q8_0, q4_0


def spm_tokenizer():
    """A SentencePiece-style BPE (byte fallback, '▁' for spaces), as Llama 2's and Mistral's tokenizer.json are."""
    from tokenizers import Tokenizer, decoders, models, normalizers, trainers
    from transformers import PreTrainedTokenizerFast

    from conftest import _corpus

    tok = Tokenizer(models.BPE(unk_token="<unk>", byte_fallback=True, fuse_unk=True))
    tok.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
    tok.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(),
                                     decoders.Strip(" ", 1, 0)])
    bytes_ = [f"<0x{i:02X}>" for i in range(256)]
    tok.train_from_iterator(_corpus(), trainers.BpeTrainer(vocab_size=700, special_tokens=["<unk>", "<s>", "</s>"]
                                                           + bytes_))
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", bos_token="<s>", eos_token="</s>",
                                   pad_token="</s>")
    fast.chat_template = MISTRAL_LIKE
    return fast


def test_a_sentencepiece_style_tokenizer_is_written_as_llama_and_keeps_its_ids(tmp_path):
    from transformers import MistralConfig, MistralForCausalLM

    tokenizer = spm_tokenizer()
    torch.manual_seed(0)
    model = MistralForCausalLM(MistralConfig(vocab_size=len(tokenizer) + 4, hidden_size=64, intermediate_size=128,
                                             num_hidden_layers=1, num_attention_heads=4, num_key_value_heads=2)).eval()
    path = tmp_path / "spm.gguf"
    gguf_export.write_gguf(path, model, tokenizer, "f16", "spm", log=lambda *a: None)
    _, fields = read(path)
    assert fields["tokenizer.ggml.model"] == "llama" and fields["tokenizer.ggml.add_space_prefix"] is True
    tokens, types = fields["tokenizer.ggml.tokens"], fields["tokenizer.ggml.token_type"]
    assert tokens[-1] == f"[PAD{len(tokenizer) + 3}]" and types[-1] == 5  # rows past the tokenizer: unused
    assert types[tokens.index("<0x41>")] == 6 and types[tokens.index("</s>")] == 3  # byte, control
    scores = fields["tokenizer.ggml.scores"]
    merges = json.loads(tokenizer.backend_tokenizer.to_str())["model"]["merges"]
    first, later = ("".join(m) if isinstance(m, list) else m.replace(" ", "") for m in (merges[0], merges[50]))
    assert scores[tokens.index(first)] > scores[tokens.index(later)]  # an earlier merge wins in llama.cpp
    _, check = gguf_export.read_back(path, model, tokenizer)
    assert check["same_token_ids"] and check["max_abs_logit_diff"] < 0.05


def go_parse(tokens: list[str], i: int = 0, stop=("end",)):
    """Go text/template's pieces the Modelfile uses, as a tree: text, {{ "literal" }}, {{ .Content }},
    {{ $.System }}, {{ $first := true }} / {{ $first = false }}, if / else if / else / end, range .Messages."""
    body = []
    while i < len(tokens):
        t = tokens[i]
        if not t.startswith("{{"):
            body.append(("text", t))
            i += 1
            continue
        action = t[2:-2].strip()
        if action == "end" or action == "else" or action.startswith("else if "):
            return body, i
        if action.startswith("if "):
            branches, cond = [], action[3:]
            while True:
                part, i = go_parse(tokens, i + 1)
                branches.append((cond, part))
                action = tokens[i][2:-2].strip()
                if action == "end":
                    break
                cond = action[8:] if action.startswith("else if ") else None
            body.append(("if", branches))
        elif action == "range .Messages":
            part, i = go_parse(tokens, i + 1)
            body.append(("range", part))
        else:
            body.append(("action", action))
        i += 1
    return body, i


def go_run(tree, scope, out):
    for kind, value in tree:
        if kind == "text":
            out.append(value)
        elif kind == "range":
            for message in scope["messages"]:
                go_run(value, scope | {"msg": message, "vars": scope["vars"]}, out)
        elif kind == "if":
            for cond, part in value:
                if cond is None or go_test(cond, scope):
                    go_run(part, scope, out)
                    break
        elif value.startswith('"'):
            out.append(json.loads(value))
        elif value in ("$first := true", "$first = false"):
            scope["vars"]["$first"] = value.endswith("true")
        elif value == ".Content":
            out.append(scope["msg"]["content"])
        elif value == "$.System":
            out.append(scope["system"])
        else:
            raise AssertionError(f"not in the subset: {value!r}")


def go_test(cond: str, scope) -> bool:
    if cond == "$first":
        return scope["vars"]["$first"]
    if cond == "$.System":
        return bool(scope["system"])
    role = re.fullmatch(r'eq \.Role "(\w+)"', cond)
    assert role, cond
    return scope["msg"]["role"] == role.group(1)


def go_render(template: str, system: str, messages: list[dict]) -> str:
    tree, _ = go_parse(re.split(r"({{.*?}})", template))
    out = []
    go_run(tree, {"system": system, "messages": messages, "vars": {}}, out)
    return "".join(out)


@pytest.mark.parametrize("template", ["chatml", "mistral", "chatml-bos-marker"])
def test_the_modelfile_template_prints_the_prompt_training_saw(template, tmp_path):
    from transformers import AutoTokenizer

    model_dir = build_model_dir(tmp_path / template, *([MISTRAL_LIKE] if template == "mistral" else []))
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    if template == "chatml-bos-marker":  # as the embedded SmolLM2's converted tokenizer: bos_token is the marker
        tokenizer.bos_token = "<|im_start|>"
    assert gguf_export.template_bos(tokenizer) is (template == "mistral")
    assert gguf_export.tokenizer_fields(tokenizer, len(tokenizer))["add_bos"] is (template == "mistral")
    text = gguf_export.modelfile("m.gguf", tokenizer, "Answer briefly.", 1024, "test")
    body = re.search(r'TEMPLATE """(.*?)"""', text, re.S).group(1)
    assert 'SYSTEM """Answer briefly."""' in text and "FROM ./m.gguf" in text and "PARAMETER stop" in text
    turns = [{"role": "user", "content": "What causes scurvy?"}, {"role": "assistant", "content": "Vitamin C lack."},
             {"role": "user", "content": "And rickets?"}]
    for system in ("Answer briefly.", ""):
        for upto in (1, 3):
            conversation = ([{"role": "system", "content": system}] if system else []) + turns[:upto]
            expected = render(tokenizer, conversation, add_generation_prompt=True)
            expected = expected.removeprefix(tokenizer.bos_token) if template == "mistral" else expected
            assert go_render(body, system, turns[:upto]) == expected, (system, upto)


def test_a_trained_qlora_output_is_merged_exported_and_re_evaluated(tiny_model, processed, tmp_path, monkeypatch):
    monkeypatch.setenv("MEDPEFT_CACHE", str(tmp_path / "cache"))
    adapter = train_tiny(tiny_model, processed, tmp_path / "qlora", "qlora", dict(lora_r=4, lora_alpha=8),
                         load_in_4bit=True)
    results = tmp_path / "eval" / "evaluation_results.json"
    assert run(["evaluate", "--base_model", tiny_model, "--qlora_model", adapter, "--test_data",
                f"{processed}/test.json", "--output_file", str(results), "--max_samples", "8",
                "--max_new_tokens", "2"]) == 0
    out = tmp_path / "exp" / "q.gguf"
    assert run(["export", "--adapter", adapter, "--quant", "q8_0", "--output", str(out), "--ollama",
                "--test_data", f"{processed}/test.json", "--max_samples", "8", "--max_new_tokens", "2",
                "--results", str(results)]) == 0
    summary = json.loads((out.parent / "q.export.json").read_text())
    assert summary["source"].startswith("qlora output") and summary["merge_check"]["max_abs_logit_diff"] < 0.5
    test = summary["files"][0]["test"]
    assert summary["test_items"] == 8 and abs(test["loss_vs_merged"]) < 0.2
    assert test["loss_vs_merged"] == round(test["loss"] - summary["merged"]["loss"], 4)
    modelfile = (out.parent / "Modelfile").read_text()
    assert "FROM ./q.gguf" in modelfile and "SYSTEM" in modelfile  # the system prompt of the training data
    report = (results.parent / "report.md").read_text()
    assert "## Exported (GGUF)" in report and "| `q.gguf` | q8_0 |" in report
    # the file itself, as the base model of an evaluation
    again = tmp_path / "eval2" / "r.json"
    assert run(["evaluate", "--base_model", str(out), "--test_data", f"{processed}/test.json", "--output_file",
                str(again), "--max_samples", "8", "--max_new_tokens", "2"]) == 0
    base = json.loads(again.read_text())["models"]["base"]
    assert base["status"] == "ok" and abs(base["loss"]["loss"] - test["loss"]) < 0.05


@pytest.mark.parametrize("method,options", [("adapter", dict(adapter_size=8)), ("ptuning", dict(num_virtual_tokens=4))])
def test_methods_that_cannot_merge_are_refused_with_what_to_do(method, options, tiny_model, processed, tmp_path,
                                                               capsys):
    out = train_tiny(tiny_model, processed, tmp_path / method, method, options, max_steps=1)
    assert run(["export", "--adapter", out, "--output", str(tmp_path / "x.gguf")]) == 2
    err = capsys.readouterr().err
    assert "cannot be exported to GGUF" in err and "medpeft generate --adapter" in err
    assert not (tmp_path / "x.gguf").exists()


def test_bad_requests_get_one_line_naming_what_is_known(tiny_model, tmp_path, capsys):
    assert run(["export", "--model", tiny_model, "--quant", "q3_k"]) == 2
    assert "unknown quant type q3_k; known: f16, q8_0, q4_0" in capsys.readouterr().err
    assert run(["export", "--quant", "f16"]) == 2
    assert "exactly one of --adapter" in capsys.readouterr().err
    with pytest.raises(UsageError, match="architecture 'gpt2' is not supported; supported: llama, mistral"):
        gguf_export.check_exportable(SimpleNamespace(model_type="gpt2"))
    with pytest.raises(UsageError, match="rope_scaling"):
        gguf_export.check_exportable(SimpleNamespace(model_type="llama", rope_scaling={"rope_type": "llama3"}))


def test_a_disk_too_small_leaves_no_file_behind(tiny_model, tmp_path, monkeypatch, capsys):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model, tokenizer = AutoModelForCausalLM.from_pretrained(tiny_model), AutoTokenizer.from_pretrained(tiny_model)
    target = tmp_path / "out" / "m.gguf"
    real = gguf_export.shutil.disk_usage
    monkeypatch.setattr(gguf_export.shutil, "disk_usage", lambda p: real(p)._replace(free=1000))
    with pytest.raises(UsageError, match="needs about .* GB and .* has 0.00 GB free"):
        gguf_export.write_gguf(target, model, tokenizer, "f16", "m", log=lambda *a: None)
    monkeypatch.setattr(gguf_export.shutil, "disk_usage", real)
    import gguf

    written = []

    def fills_up(self, tensor, *a, **kw):  # the disk fills after two tensors
        if len(written) == 2:
            raise OSError(errno.ENOSPC, "No space left on device")
        written.append(tensor.nbytes)
        return real_write(self, tensor, *a, **kw)

    real_write = gguf.GGUFWriter.write_tensor_data
    monkeypatch.setattr(gguf.GGUFWriter, "write_tensor_data", fills_up)
    with pytest.raises(UsageError, match="the disk filled while writing .*no file was left behind"):
        gguf_export.write_gguf(target, model, tokenizer, "q8_0", "m", log=lambda *a: None)
    assert list(target.parent.iterdir()) == []  # neither the file nor its partial copy


def test_a_byte_level_tokenizer_with_byte_fallback_is_written_as_gpt2(tiny_model, tmp_path):
    """transformers' own GGUF reader gives a byte-level tokenizer byte_fallback (the embedded SmolLM2's is such):
    it is still GPT-2-style, and written as such keeps its ids."""
    from tokenizers import Tokenizer
    from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedTokenizerFast

    tokenizer = AutoTokenizer.from_pretrained(tiny_model)
    spec = json.loads(tokenizer.backend_tokenizer.to_str())
    spec["model"]["byte_fallback"] = True
    fallback = PreTrainedTokenizerFast(tokenizer_object=Tokenizer.from_str(json.dumps(spec)), unk_token="<unk>",
                                       bos_token="<s>", eos_token="<|im_end|>", pad_token="<pad>")
    fallback.chat_template = tokenizer.chat_template
    model = AutoModelForCausalLM.from_pretrained(tiny_model)
    path = tmp_path / "fb.gguf"
    gguf_export.write_gguf(path, model, fallback, "f16", "fb", log=lambda *a: None)
    _, fields = read(path)
    assert fields["tokenizer.ggml.model"] == "gpt2"
    _, check = gguf_export.read_back(path, model, fallback)
    assert check["same_token_ids"], check


def test_rows_that_do_not_split_into_blocks_stay_f16(tmp_path):
    """A quant type stores rows in blocks of 32 values: a matrix whose rows are 48 long is written in f16."""
    from transformers import MistralConfig, MistralForCausalLM

    from conftest import build_tokenizer

    tokenizer = build_tokenizer()
    torch.manual_seed(0)
    model = MistralForCausalLM(MistralConfig(vocab_size=len(tokenizer), hidden_size=48, intermediate_size=96,
                                             num_hidden_layers=1, num_attention_heads=4, num_key_value_heads=2)).eval()
    path = tmp_path / "odd.gguf"
    info = gguf_export.write_gguf(path, model, tokenizer, "q8_0", "odd", log=lambda *a: None)
    reader, _ = read(path)
    types = {t.name: t.tensor_type.name for t in reader.tensors}
    assert types["blk.0.ffn_down.weight"] == "Q8_0"  # rows of 96
    assert types["blk.0.attn_q.weight"] == types["token_embd.weight"] == "F16"  # rows of 48
    assert "blk.0.attn_q.weight" in info["f16_fallback"] and "blk.0.ffn_down.weight" not in info["f16_fallback"]
    _, check = gguf_export.read_back(path, model, tokenizer)
    assert check["same_token_ids"] and check["max_abs_logit_diff"] < 0.5
