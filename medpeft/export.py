"""Using a trained output elsewhere: fold LoRA into a standalone model, upload an output to the hub.

    medpeft merge --adapter models/qlora --output merged/    # plain transformers model, in the base's compute dtype
"""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path

import torch

from .errors import UsageError
from .modeling import autocast
from .outputs import load_trained, read_run, write_model_card

NOT_MERGEABLE = {
    "adapter": "bottleneck adapters add new layers to every decoder block; they cannot be folded into the base "
               "weights. Serve the base model with the adapter loaded (adapters.init(model); "
               "model.load_adapter(DIR, use_safetensors=True)), or `medpeft generate --adapter DIR` / "
               "`medpeft chat --adapter DIR`",
    "ptuning": "P-Tuning adds virtual tokens before every input; there is no weight to fold them into. Serve the "
               "base model with the prompt encoder (peft's PeftModel.from_pretrained(base, DIR)), or "
               "`medpeft generate --adapter DIR` / `medpeft chat --adapter DIR`",
}


def _dequantized(module) -> torch.Tensor:
    import bitsandbytes as bnb

    weight = module.weight
    if isinstance(weight, bnb.nn.Params4bit):
        # the values the adapter was trained on: dequantized in the dtype the layer computed in
        values = bnb.functional.dequantize_4bit(weight.data, weight.quant_state)
        return values.to(module.compute_dtype or torch.bfloat16)
    return weight.data


def merged_state(model) -> tuple[dict[str, torch.Tensor], torch.dtype]:
    """Every weight the merged model needs, under the plain model's names: 4-bit layers dequantized to their compute
    dtype (the values the adapter was trained on), LoRA's update added to the layers it adapts."""
    from peft.tuners.lora import LoraLayer

    inner = model.get_base_model()
    state, lora_names = {}, []
    for name, module in inner.named_modules():
        if isinstance(module, LoraLayer):
            base = module.get_base_layer()
            weight = _dequantized(base).clone()
            for adapter in module.active_adapters:
                delta = module.get_delta_weight(adapter).to(weight.dtype)
                if module.use_dora.get(adapter):  # DoRA: a trained magnitude per output row times the direction
                    magnitude = module.lora_magnitude_vector[adapter]
                    norm = magnitude.get_weight_norm(weight, delta, scaling=1)
                    weight = (magnitude.weight / norm).view(-1, 1).to(weight.dtype) * (weight + delta)
                else:
                    weight += delta
            state[f"{name}.weight"] = weight
            if base.bias is not None:
                state[f"{name}.bias"] = base.bias.data
            lora_names.append(name + ".")
    for name, module in inner.named_modules():
        if any(name.startswith(prefix) for prefix in lora_names):
            continue
        for pname, param in module.named_parameters(recurse=False):
            state[f"{name}.{pname}"] = _dequantized(module) if pname == "weight" else param.data
    floats = {t.dtype for t in state.values() if t.is_floating_point()}
    return state, torch.float32 if floats == {torch.float32} else torch.bfloat16


def merged_model(adapter_dir: str, what: str = "merged"):
    """A LoRA/QLoRA output folded into its base, in memory, and checked against the adapter model: returns
    (the plain transformers model, the tokenizer, the run's record, the logit check)."""
    from transformers import AutoModelForCausalLM
    from transformers.modeling_utils import no_init_weights

    run = read_run(adapter_dir)
    if run["method"] in NOT_MERGEABLE:
        raise UsageError(f"'{adapter_dir}' holds the output of {run['method']}, which cannot be {what}: "
                         f"{NOT_MERGEABLE[run['method']]}")
    model, tokenizer, run = load_trained(adapter_dir)
    state, dtype = merged_state(model)
    config = model.get_base_model().config
    config_dict = {k: v for k, v in config.to_dict().items() if k != "quantization_config"}
    plain_config = type(config).from_dict(config_dict)
    plain_config.dtype = dtype
    with no_init_weights():  # every weight comes from `state`; skip the random initialisation
        merged = AutoModelForCausalLM.from_config(plain_config, dtype=dtype)
    result = merged.load_state_dict({k: v.to("cpu", dtype) if v.is_floating_point() else v.cpu()
                                     for k, v in state.items()}, strict=False)
    missing = [k for k in result.missing_keys if not (k == "lm_head.weight" and plain_config.tie_word_embeddings)]
    if missing:
        raise UsageError(f"merge: no weight found for {len(missing)} parameters (first: {missing[0]})")
    if getattr(config, "tie_word_embeddings", False):
        merged.tie_weights()
    merged.eval()
    check = _logit_check(model, merged, tokenizer)
    del model
    return merged, tokenizer, run, check


def merge(adapter_dir: str, output: str, log=print) -> dict:
    """Fold a LoRA/QLoRA output into its base and save a standalone model; returns the logit check."""
    out = Path(output)
    if out.exists() and any(out.iterdir()):
        raise UsageError(f"--output '{output}' exists and is not empty; choose a new folder")
    merged, tokenizer, run, check = merged_model(adapter_dir)
    dtype = merged.dtype
    staging = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent if out.parent.exists() else None))
    try:
        merged.save_pretrained(staging, safe_serialization=True)
        tokenizer.save_pretrained(staging)
        card = dict(run, merged_from=str(adapter_dir), merged_to=str(out), merge_check=check)
        write_model_card(staging, card)
        if out.exists():
            out.rmdir()
        shutil.move(str(staging), out)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    log(f"merged {adapter_dir} into {out} ({dtype}); max |logit difference| vs the adapter model: "
        f"{check['max_abs_logit_diff']:.4g} (logits span {check['logit_range']:.3g})")
    return check


@torch.no_grad()
def _logit_check(adapted, merged, tokenizer) -> dict:
    text = "What is the first-line treatment for uncomplicated type 2 diabetes?"
    ids = tokenizer(text, return_tensors="pt")["input_ids"].to(next(adapted.parameters()).device)
    with autocast(adapted):
        a = adapted(input_ids=ids).logits.float()
    with autocast(merged):
        b = merged.to(ids.device)(input_ids=ids).logits.float()
    return {"max_abs_logit_diff": round(float((a - b).abs().max()), 6),
            "logit_range": round(float(a.max() - a.min()), 4), "tokens": int(ids.shape[1]),
            "same_greedy_next_tokens": bool(torch.equal(a.argmax(-1), b.argmax(-1)))}


# ----------------------------------------------------------------------------------------------- model card


def hub_token(repo_id: str) -> str:
    """The write token for --push_to_hub: from HF_TOKEN only (train checks it before training starts)."""
    import os

    token = os.environ.get("HF_TOKEN", "").strip()
    if not token:
        raise UsageError(f"--push_to_hub {repo_id}: set HF_TOKEN in the environment (a write token)")
    return token


def push_to_hub(out_dir: Path, repo_id: str, log=print) -> str:
    """Upload a finished output directory to a private Hugging Face repository. The token comes from the
    HF_TOKEN environment variable only (no cached login, no argument), and never appears in a message."""
    from huggingface_hub import HfApi

    token = hub_token(repo_id)
    api = HfApi(token=token)
    try:
        api.create_repo(repo_id, private=True, exist_ok=True)
        commit = api.upload_folder(folder_path=str(out_dir), repo_id=repo_id,
                                   commit_message=f"medpeft: upload {Path(out_dir).name}")
    except Exception as exc:  # network, permission, name: one line, the token scrubbed
        reason = (str(exc).strip().splitlines() or [type(exc).__name__])[0].replace(token, "***")[:300]
        raise UsageError(f"--push_to_hub {repo_id}: upload failed ({reason}); the trained output is kept in "
                         f"{out_dir}; check HF_TOKEN, the repository name and the network") from None
    url = getattr(commit, "repo_url", None) or f"https://huggingface.co/{repo_id}"
    log(f"uploaded {out_dir} to {url} (private)")
    return str(url)
