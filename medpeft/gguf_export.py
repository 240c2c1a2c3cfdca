"""A tuned model for llama.cpp, Ollama and LM Studio: one GGUF file per quant type, read back and checked.

    medpeft export --adapter models/qlora --quant q8_0 [--output FILE] [--ollama]   # LoRA/QLoRA merged first
    medpeft export --model smollm2-135m --quant f16,q8_0,q4_0                        # a base model alone

Written with the `gguf` package (no llama.cpp build): llama.cpp's tensor names and metadata keys for the Llama
family (Llama, Mistral, SmolLM), q/k rows in llama.cpp's rotary order, the tokenizer and chat template in the file.
Each file is then loaded again by transformers (it dequantizes GGUF) and its logits compared with the merged model's.
"""

from __future__ import annotations

import errno
import json
import os
import re
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import gguf
import numpy as np
import torch
from gguf.quants import quant_shape_to_byte_shape, quantize

from .classification import paired
from .config import opt
from .errors import UsageError
from .evaluation import evaluate_model, load_test_records
from .export import merged_model
from .modeling import load_model, load_tokenizer, resolve_model
from .outputs import atomic_write, write_json
from .report import read_results, write_report
from .tokens import render

ARCHITECTURES = {"llama": "llama", "mistral": "llama"}  # transformers model_type -> llama.cpp architecture
QUANTS = ("f16", "q8_0", "q4_0")
CHECK_PROMPTS = ("What is the first-line treatment for uncomplicated type 2 diabetes?",
                 "A 54-year-old man has crushing chest pain radiating to the left arm for 40 minutes.",
                 "Metformin 500 mg twice daily; eGFR 28 mL/min/1.73 m2. Should the dose change?")
MEDICAL_PARAGRAPH = ("A 67-year-old woman with type 2 diabetes (HbA1c 8.4%) and stage 3b chronic kidney disease "
                     "(eGFR 38 mL/min/1.73 m²) presents with dyspnoea. Echocardiography shows an ejection fraction "
                     "of 35%. Start an SGLT2 inhibitor (e.g. empagliflozin 10 mg once daily), titrate "
                     "sacubitril/valsartan to 97/103 mg b.i.d., and recheck potassium (K⁺ 5.1 mmol/L) in 1–2 weeks.")


def _types():
    return {"f16": (gguf.GGMLQuantizationType.F16, gguf.LlamaFileType.MOSTLY_F16),
            "q8_0": (gguf.GGMLQuantizationType.Q8_0, gguf.LlamaFileType.MOSTLY_Q8_0),
            "q4_0": (gguf.GGMLQuantizationType.Q4_0, gguf.LlamaFileType.MOSTLY_Q4_0)}


def parse_quants(text: str) -> list[str]:
    quants = [q.strip().lower() for q in text.split(",") if q.strip()]
    if (unknown := [q for q in quants if q not in QUANTS]) or not quants:
        raise UsageError(f"--quant: unknown quant type {', '.join(unknown) or repr(text)}; known: {', '.join(QUANTS)}")
    return quants


def check_exportable(config) -> None:
    """Refuse what the writer would get wrong, before anything is written."""
    kind = getattr(config, "model_type", None)
    if kind not in ARCHITECTURES:
        raise UsageError(f"export: the architecture '{kind}' is not supported; supported: "
                         f"{', '.join(ARCHITECTURES)} (the Llama family: Llama 2, Mistral, SmolLM, TinyLlama)")
    if getattr(config, "rope_scaling", None):
        raise UsageError(f"export: rope_scaling {config.rope_scaling} is not written to GGUF yet; supported: models "
                         "without rope scaling (Llama 2, Mistral 7B v0.1-v0.3, SmolLM2)")


# ----------------------------------------------------------------------------------------------- tokenizer

def _pre_name(pre: dict | None) -> str:
    """llama.cpp's name for a byte-level pre-tokenizer, from the tokenizer's own definition."""
    steps = (pre or {}).get("pretokenizers", [pre] if pre else [])
    kinds = [s.get("type") for s in steps]
    if kinds == ["ByteLevel"] and steps[0].get("use_regex", True):
        return "gpt-2"
    if kinds == ["Digits", "ByteLevel"] and steps[0].get("individual_digits"):
        return "smollm"
    if kinds == ["Split", "ByteLevel"] and "(?i:'s|'t|'re|'ve|'m|'ll|'d)" in json.dumps(steps[0]):
        return "llama-bpe"
    return "default"


def tokenizer_fields(tokenizer, vocab_size: int) -> dict:
    """What llama.cpp needs to tokenize as the run did: tokens by id, their types, merges (and SentencePiece-style
    scores), the special ids, whether a BOS is prepended, the chat template. Byte-level BPE (GPT-2, SmolLM,
    Llama 3) is written as 'gpt2'; SentencePiece-converted BPE with byte fallback (Llama 2, Mistral) as 'llama'."""
    spec = json.loads(tokenizer.backend_tokenizer.to_str()) if getattr(tokenizer, "is_fast", False) else None
    model = (spec or {}).get("model", {})
    if model.get("type") != "BPE":
        raise UsageError("export: only BPE tokenizers (fast, with a tokenizer.json) are written to GGUF; this one is "
                         f"{model.get('type') or type(tokenizer).__name__}")
    # byte-level BPE maps bytes to printable characters before merging (its pre-tokenizer says ByteLevel; a
    # tokenizer transformers converted from GGUF carries byte_fallback too); SentencePiece-style BPE marks spaces
    # with '▁' and falls back to <0xNN> byte pieces
    kind = ("gpt2" if "ByteLevel" in json.dumps(spec.get("pre_tokenizer"))
            else "llama" if model.get("byte_fallback") or "▁" in json.dumps(spec.get("normalizer")) else None)
    if kind is None:
        raise UsageError("export: this BPE tokenizer is neither byte-level (GPT-2, SmolLM, Llama 3) nor "
                         "SentencePiece-style (Llama 2, Mistral); its kind is not written to GGUF")
    merges = [m if isinstance(m, str) else " ".join(m) for m in model.get("merges", [])]
    by_id = {i: t for t, i in tokenizer.get_vocab().items()}
    added = tokenizer.added_tokens_decoder
    tokens, types = [], []
    for i in range(vocab_size):
        text = by_id.get(i)
        tokens.append(f"[PAD{i}]" if text is None else text)
        if text is None:  # embedding rows past the tokenizer (padding to a multiple): llama.cpp wants a name
            types.append(gguf.TokenType.UNUSED)
        elif kind == "llama" and re.fullmatch(r"<0x[0-9A-Fa-f]{2}>", text):  # byte fallback's 256 pieces
            types.append(gguf.TokenType.BYTE)
        elif i in added:
            types.append(gguf.TokenType.CONTROL if added[i].special else gguf.TokenType.USER_DEFINED)
        else:
            types.append(gguf.TokenType.NORMAL)
    fields = {"model": kind, "tokens": tokens, "types": types, "merges": merges}
    if kind == "llama":
        # llama.cpp's SentencePiece tokenizer merges the pair whose result scores highest: a token's score is
        # minus the rank of the merge that makes it, so it merges in the order BPE does
        rank = {m.replace(" ", ""): r for r, m in reversed(list(enumerate(merges)))}
        fields["scores"] = [-float(rank.get(t, 0)) if ty == gguf.TokenType.NORMAL else 0.0
                            for t, ty in zip(tokens, types)]
        normalizer = json.dumps(spec.get("normalizer")) + json.dumps(spec.get("pre_tokenizer"))
        fields["add_space_prefix"] = '"Prepend"' in normalizer or '"prepend_scheme": "always"' in normalizer
    else:
        fields["pre"] = _pre_name(spec.get("pre_tokenizer"))
    leading = template_bos(tokenizer)
    probe = tokenizer("x")["input_ids"]
    fields["add_bos"] = leading if leading is not None else bool(
        tokenizer.bos_token_id is not None and probe and probe[0] == tokenizer.bos_token_id)
    fields["special"] = {k: getattr(tokenizer, f"{k}_token_id") for k in ("bos", "eos", "unk", "pad")}
    fields["chat_template"] = tokenizer.chat_template if isinstance(tokenizer.chat_template, str) else None
    return fields


def template_bos(tokenizer) -> bool | None:
    """Whether the chat template opens with the BOS token once per conversation (Mistral's '<s>'): then the file
    says add_bos_token and a Modelfile TEMPLATE leaves it out, as llama.cpp and Ollama add it. False where the
    BOS text is the template's turn marker (a ChatML '<|im_start|>' that is also bos_token) or absent; None
    without a chat template. Training tokenized the template's text as it stands."""
    bos = tokenizer.bos_token
    if not isinstance(tokenizer.chat_template, str):
        return None
    turns = [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}, {"role": "user", "content": "c"}]
    text = render(tokenizer, turns, add_generation_prompt=True)
    return bool(bos) and text.startswith(bos) and text.count(bos) == 1


# ----------------------------------------------------------------------------------------------- tensors

def _to_llama_cpp_rows(weight: np.ndarray, heads: int) -> np.ndarray:
    """transformers keeps each head's rotary halves apart; llama.cpp (rope 'normal' mode) interleaves them."""
    return (weight.reshape(heads, 2, weight.shape[0] // heads // 2, *weight.shape[1:])
            .swapaxes(1, 2).reshape(weight.shape))


def gguf_tensors(model):
    """(GGUF name, HF name) for every weight the file holds; tied output embeddings are written once."""
    config = model.config
    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, config.num_hidden_layers)
    out = []
    for name in model.state_dict():
        if name == "lm_head.weight" and getattr(config, "tie_word_embeddings", False):
            continue
        target = names.get_name(name, try_suffixes=(".weight", ".bias"))
        if target is None:
            raise UsageError(f"export: no GGUF name for the weight '{name}' (architecture {config.model_type})")
        out.append((target, name))
    return out


def _array(model, hf_name: str, state: dict) -> np.ndarray:
    config = model.config
    values = state[hf_name].detach().to("cpu", torch.float32).numpy()
    if hf_name.endswith("q_proj.weight") or hf_name.endswith("q_proj.bias"):
        values = _to_llama_cpp_rows(values, config.num_attention_heads)
    elif hf_name.endswith("k_proj.weight") or hf_name.endswith("k_proj.bias"):
        values = _to_llama_cpp_rows(values, config.num_key_value_heads)
    return values


def _storage(quant: str, shape: tuple, target: str = "", tied: bool = False) -> "object":
    """The GGML type a tensor is stored in: norms and biases in F32; a matrix in the quant type when its rows
    split into whole blocks (32 values), else F16. Under q4_0 the output projection (the embeddings, when tied)
    stays q8_0, as llama.cpp's quantizer keeps it finer: every logit goes through it."""
    qtype = _types()[quant][0]
    if len(shape) < 2:
        return gguf.GGMLQuantizationType.F32
    if quant == "q4_0" and (target == "output.weight" or (tied and target == "token_embd.weight")):
        qtype = gguf.GGMLQuantizationType.Q8_0
    block = gguf.GGML_QUANT_SIZES[qtype][0]
    return qtype if shape[-1] % block == 0 else gguf.GGMLQuantizationType.F16


def _nbytes(qtype, shape: tuple) -> int:
    return int(np.prod(quant_shape_to_byte_shape(shape, qtype)))


def write_gguf(path: Path, model, tokenizer, quant: str, name: str, log=print) -> dict:
    """Write one GGUF file; nothing is left at `path` unless the whole file was written."""
    from tqdm import tqdm

    config = model.config
    qtype, ftype = _types()[quant]
    state = model.state_dict()
    plan = [(target, hf, tuple(state[hf].shape)) for target, hf in gguf_tensors(model)]
    tied = bool(getattr(config, "tie_word_embeddings", False))
    stored = {target: _storage(quant, shape, target, tied) for target, _, shape in plan}
    total = sum(_nbytes(stored[t], shape) for t, _, shape in plan)
    path.parent.mkdir(parents=True, exist_ok=True)
    free = shutil.disk_usage(path.parent).free
    if free < total * 1.02 + (1 << 20):
        raise UsageError(f"export: {path} needs about {total / 1e9:.2f} GB and {path.parent} has "
                         f"{free / 1e9:.2f} GB free; free space or choose another --output")
    tok = tokenizer_fields(tokenizer, config.vocab_size)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".part", dir=path.parent)
    os.close(fd)
    writer = gguf.GGUFWriter(tmp, ARCHITECTURES[config.model_type])
    try:
        writer.add_name(name)
        writer.add_context_length(config.max_position_embeddings)
        writer.add_embedding_length(config.hidden_size)
        writer.add_block_count(config.num_hidden_layers)
        writer.add_feed_forward_length(config.intermediate_size)
        writer.add_head_count(config.num_attention_heads)
        writer.add_head_count_kv(config.num_key_value_heads)
        head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
        writer.add_rope_dimension_count(head_dim)
        writer.add_key_length(head_dim)
        writer.add_value_length(head_dim)
        writer.add_rope_freq_base(float(getattr(config, "rope_theta", 10000.0)))
        writer.add_layer_norm_rms_eps(float(config.rms_norm_eps))
        writer.add_vocab_size(config.vocab_size)
        writer.add_file_type(ftype)
        writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
        writer.add_tokenizer_model(tok["model"])
        if "pre" in tok:
            writer.add_tokenizer_pre(tok["pre"])
        writer.add_token_list(tok["tokens"])
        writer.add_token_types(tok["types"])
        if tok.get("scores"):
            writer.add_token_scores(tok["scores"])
        if tok["merges"]:
            writer.add_token_merges(tok["merges"])
        for key, value in tok["special"].items():
            if value is not None:
                getattr(writer, f"add_{key}_token_id")(int(value))
        writer.add_add_bos_token(tok["add_bos"])
        writer.add_add_eos_token(False)
        if "add_space_prefix" in tok:
            writer.add_add_space_prefix(tok["add_space_prefix"])
        if tok["chat_template"]:
            writer.add_chat_template(tok["chat_template"])
        for target, _, shape in plan:
            kind = stored[target]
            dtype = {gguf.GGMLQuantizationType.F32: np.float32, gguf.GGMLQuantizationType.F16: np.float16}.get(kind)
            writer.add_tensor_info(target, shape, np.dtype(dtype or np.float32), _nbytes(kind, shape),
                                   raw_dtype=None if dtype else kind)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_ti_data_to_file()
        for target, hf, _ in tqdm(plan, desc=f"writing {quant}", unit="tensor", leave=False):
            values = _array(model, hf, state)
            writer.write_tensor_data(quantize(values, stored[target]))
        writer.close()
        os.replace(tmp, path)
    except OSError as exc:
        if exc.errno == errno.ENOSPC:
            raise UsageError(f"export: the disk filled while writing {path}; no file was left behind. Free "
                             f"{total / 1e9:.2f} GB or choose another --output") from None
        raise
    finally:
        writer.close()
        if os.path.exists(tmp):
            os.remove(tmp)
    fallback = sorted(t for t, _, shape in plan
                      if len(shape) > 1 and quant != "f16" and stored[t] == gguf.GGMLQuantizationType.F16)
    log(f"wrote {path} ({quant}, {path.stat().st_size / 1e6:.1f} MB)"
        + (f"; {len(fallback)} matrices in f16 (rows not a multiple of 32)" if fallback else ""))
    return {"quant": quant, "path": str(path), "bytes": path.stat().st_size, "f16_fallback": fallback,
            "tokenizer": {k: tok[k] for k in ("model", "pre", "add_bos") if k in tok}}


# ----------------------------------------------------------------------------------------------- read back

@torch.no_grad()
def read_back(path: Path, reference, tokenizer) -> dict:
    """Load the written file with transformers (which dequantizes it) and compare with the model it came from:
    logits on a few prompts, greedy next tokens, and the token ids of a medical paragraph. Returns
    (the loaded model, the comparison)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    loaded = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32).eval()
    loaded_tok = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    loaded.config.pad_token_id = tokenizer.pad_token_id
    reference = reference.float().eval()
    worst, agree, positions = 0.0, 0, 0
    for text in CHECK_PROMPTS:
        ids = tokenizer(text, return_tensors="pt", add_special_tokens=False)["input_ids"]
        a, b = reference(input_ids=ids).logits, loaded(input_ids=ids).logits
        worst = max(worst, float((a - b).abs().max()))
        agree += int((a.argmax(-1) == b.argmax(-1)).sum())
        positions += ids.shape[1]
    original = tokenizer(MEDICAL_PARAGRAPH, add_special_tokens=False)["input_ids"]
    again = loaded_tok(MEDICAL_PARAGRAPH, add_special_tokens=False)["input_ids"]
    return loaded, {"max_abs_logit_diff": round(worst, 5), "greedy_agreement": round(agree / positions, 4),
            "positions": positions, "paragraph_tokens": len(original), "same_token_ids": original == again,
            "first_token_difference": next((i for i, (x, y) in enumerate(zip(original, again)) if x != y),
                                           None if len(original) == len(again) else min(len(original), len(again)))}


# ----------------------------------------------------------------------------------------------- Ollama

def _go_literal(text: str) -> str:
    """Template text as Go's text/template prints it: verbatim, unless it holds braces it would parse."""
    return "{{ " + json.dumps(text) + " }}" if "{{" in text or "}}" in text else text


def chat_segments(tokenizer) -> dict:
    """The chat template cut at its messages: rendered (as training rendered it, tokens.render) with placeholder
    contents, the text around them is what an Ollama TEMPLATE must print."""
    S, U, R, V = "\x00SYSTEM\x00", "\x00USER\x00", "\x00REPLY\x00", "\x00NEXT\x00"
    with_system = render(tokenizer, [{"role": "system", "content": S}, {"role": "user", "content": U}], True)
    without = render(tokenizer, [{"role": "user", "content": U}], True)
    turns = render(tokenizer, [{"role": "system", "content": S}, {"role": "user", "content": U},
                               {"role": "assistant", "content": R}, {"role": "user", "content": V}], True)
    if with_system.count(S) != 1 or S not in turns or with_system.split(U)[1] != without.split(U)[1]:
        raise UsageError("export --ollama: the chat template places the system prompt in a way a Modelfile "
                         "TEMPLATE cannot reproduce; write the Modelfile by hand (the GGUF holds the template)")
    bos = tokenizer.bos_token if template_bos(tokenizer) else ""
    head_s, rest = with_system.split(S)
    between, generation = rest.split(U)
    head = without.split(U)[0]
    after_user, rest = turns.split(U)[1].split(R)
    after_reply = rest.split(V)[0]
    strip = (lambda t: t[len(bos):] if bos and t.startswith(bos) else t)  # the file's add_bos_token adds it
    return {"system_head": strip(head_s), "system_to_user": between, "head": strip(head),
            "user_to_reply": after_user, "reply_to_user": after_reply, "generation": generation}


def modelfile(gguf_name: str, tokenizer, system_prompt: str, context: int, source: str) -> str:
    seg = chat_segments(tokenizer)
    lit = {k: _go_literal(v) for k, v in seg.items()}
    template = ("{{ $first := true }}{{ range .Messages }}{{ if eq .Role \"user\" }}{{ if $first }}{{ if $.System }}"
                f"{lit['system_head']}{{{{ $.System }}}}{lit['system_to_user']}{{{{ else }}}}{lit['head']}{{{{ end }}}}"
                "{{ $first = false }}{{ end }}{{ .Content }}{{ else if eq .Role \"assistant\" }}"
                f"{lit['user_to_reply']}{{{{ .Content }}}}{lit['reply_to_user']}{{{{ end }}}}{{{{ end }}}}"
                f"{lit['generation']}")
    stops = sorted({t for t in (tokenizer.eos_token, "<|im_end|>", "</s>", "<|eot_id|>", "<|end|>")
                    if t and t in tokenizer.get_vocab()})
    lines = [f"# medpeft export of {source}; answers are not medical advice", f"FROM ./{gguf_name}",
             f'TEMPLATE """{template}"""']
    if system_prompt:
        lines.append(f'SYSTEM """{system_prompt}"""')
    lines += [f'PARAMETER stop "{s}"' for s in stops]
    lines += ["PARAMETER temperature 0", f"PARAMETER num_ctx {context}", ""]
    return "\n".join(lines)


# ----------------------------------------------------------------------------------------------- the command

@dataclass
class ExportConfig:
    adapter: Optional[str] = opt(None, "a QLoRA/LoRA training output: merged into its base, then exported")
    model: Optional[str] = opt(None, "instead of --adapter: a base model alone (hub id, folder, .gguf, smollm2-135m)")
    format: str = opt("gguf", "file format", ["gguf"])
    quant: str = opt("q8_0", f"quant types, comma-separated: {', '.join(QUANTS)} (norms stay float32)")
    output: Optional[str] = opt(None, "the .gguf file (with several --quant: the name each quant's suffix is added "
                                      "to); default exported/NAME-QUANT.gguf")
    ollama: bool = opt(False, "also write an Ollama Modelfile beside each file (FROM, TEMPLATE, SYSTEM, stops)")
    system_prompt: Optional[str] = opt(None, "the Modelfile's SYSTEM (default: the one the run was trained with)")
    test_data: Optional[str] = opt(None, "re-evaluate the merged model and every file on this test split "
                                         "(loss, multiple-choice accuracy)")
    max_samples: int = opt(200, "test items re-evaluated, drawn with --seed (-1 = all)")
    batch_size: int = opt(8, "sequences per forward pass")
    max_length: int = opt(512, "truncate test examples to this many tokens for the loss")
    max_new_tokens: int = opt(16, "longest generated answer in the re-evaluation")
    seed: int = opt(42, "seed for the test subset and the bootstrap intervals")
    results: Optional[str] = opt(None, "an evaluation_results.json to add the 'exported' section to (its report.md "
                                       "and report.html are written again)")
    trust_remote_code: bool = opt(False, "allow model repositories to run their own Python code")
    num_samples_shown = 0  # evaluate_model's sample answers: none here

    def validate(self) -> list[str]:
        problems = []
        if bool(self.adapter) == bool(self.model):
            problems.append("give exactly one of --adapter (a trained output) and --model (a base model)")
        try:
            parse_quants(self.quant)
        except UsageError as exc:
            problems.append(str(exc))
        if self.output and not self.output.endswith(".gguf"):
            problems.append(f"--output '{self.output}' must end in .gguf")
        if self.max_samples == 0 or self.max_samples < -1 or self.batch_size <= 0:
            problems.append("--max_samples must be positive or -1, --batch_size positive")
        return problems


def _source(cfg, log):
    """(plain model, tokenizer, what it is, the training system prompt or None, merge check or None)."""
    if cfg.adapter:
        model, tokenizer, run, check = merged_model(cfg.adapter, what="exported to GGUF")
        log(f"merged {cfg.adapter} into its base (max |logit difference| vs the adapter model "
            f"{check['max_abs_logit_diff']:.4g})")
        meta = Path(run.get("settings", {}).get("data_path", "")) / "metadata.json"
        system = json.loads(meta.read_text(encoding="utf-8")).get("system_prompt") if meta.is_file() else None
        return model, tokenizer, f"{run['method']} output {cfg.adapter}", system, check
    resolved = resolve_model(cfg.model)
    tokenizer = load_tokenizer(resolved, cfg.trust_remote_code)
    model = load_model(resolved, device="cpu", trust_remote_code=cfg.trust_remote_code, dtype=torch.float32)
    return model.eval(), tokenizer, f"base model {cfg.model}", None, None


def _targets(cfg, quants: list[str], stem: str) -> dict[str, Path]:
    if cfg.output and len(quants) == 1:
        return {quants[0]: Path(cfg.output)}
    base = Path(cfg.output) if cfg.output else Path("exported") / f"{stem}.gguf"
    return {q: base.with_name(f"{base.stem}-{q}.gguf") for q in quants}


def _scores(model, tokenizer, records, cfg, desc: str) -> dict:
    found = evaluate_model(model, tokenizer, records, cfg, desc)
    choice = found.get("choice") or {}
    return {"loss": found["loss"]["loss"], "perplexity": found["loss"]["perplexity"],
            "accuracy": choice.get("accuracy_loglik"), "macro_f1": choice.get("macro_f1_loglik"),
            "hits": choice.get("hits_loglik")}


def run_export(cfg: ExportConfig, log=print) -> dict:
    quants = parse_quants(cfg.quant)
    model, tokenizer, source, system, merge_check = _source(cfg, log)
    check_exportable(model.config)
    stem = Path(cfg.adapter).name if cfg.adapter else Path(cfg.model).stem.lower()
    targets = _targets(cfg, quants, stem)
    records = load_test_records(cfg.test_data, cfg.max_samples, cfg.seed) if cfg.test_data else None
    reference = _scores(model, tokenizer, records, cfg, "merged") if records else None
    files = []
    for quant, path in targets.items():
        written = write_gguf(path, model, tokenizer, quant, f"{stem} (medpeft)", log)
        loaded, check = read_back(path, model, tokenizer)
        entry = written | {"read_back": check}
        log(f"  read back: max |logit difference| {check['max_abs_logit_diff']:.4g}, greedy agreement "
            f"{check['greedy_agreement']:.3f}, medical paragraph token ids "
            f"{'identical' if check['same_token_ids'] else 'DIFFERENT from token ' + str(check['first_token_difference'])}")
        if records:  # in the merged model's dtype: what differs is the file's rounding alone
            scores = _scores(loaded.to(model.dtype), tokenizer, records, cfg, quant)
            entry["test"] = {k: v for k, v in scores.items() if k != "hits"}
            entry["test"]["loss_vs_merged"] = round(scores["loss"] - reference["loss"], 4)
            if scores["hits"] and reference["hits"]:
                entry["test"]["accuracy_vs_merged"] = paired(scores["hits"], reference["hits"], seed=cfg.seed)
        if cfg.ollama:
            context = min(int(model.config.max_position_embeddings), 4096)
            card = path.with_name("Modelfile" if len(targets) == 1 else f"{path.stem}.Modelfile")
            atomic_write(card, modelfile(path.name, tokenizer,
                                         cfg.system_prompt if cfg.system_prompt is not None else system or "",
                                         context, source))
            entry["modelfile"] = str(card)
            log(f"  wrote {card}: ollama create {stem}-{quant} -f {card}")
        files.append(entry)
        del loaded
    summary = {"source": source, "merge_check": merge_check, "files": files, "test_data": cfg.test_data,
               "test_items": len(records) if records else None,
               "merged": {k: v for k, v in reference.items() if k != "hits"} if reference else None,
               "how": "each file loaded back by transformers (GGUF dequantized to float32) and compared with the "
                      "merged model it was written from; test loss is the mean answer-token loss, accuracy the "
                      "option with the highest log-likelihood"}
    first = Path(files[0]["path"])
    write_json(first.with_name(f"{Path(cfg.output).stem if cfg.output else stem}.export.json"), summary)
    if cfg.results:
        _add_to_results(Path(cfg.results), summary, log)
    return summary


def _add_to_results(path: Path, summary: dict, log) -> None:
    results = read_results(path)
    results["exported"] = summary
    write_json(path, results)
    md, html = write_report(results, path.parent)
    log(f"added the exported files to {path}; report: {md}, {html}")
