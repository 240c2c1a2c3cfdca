"""QLoRA: LoRA on every linear layer of a 4-bit NF4 base (double quantization), or of a 16-bit one (LoRA).

Initialisation: default (Kaiming A, zero B), gaussian, or SVD-based: pissa (computed on a 16-bit copy of
the base, whose residual is then re-quantized), loftq (fits A, B to the 4-bit quantization error), olora.
PiSSA and OLoRA change the base weights, so their adapter is converted on save into a plain LoRA of twice
the rank that applies to the original base.
"""

from __future__ import annotations

import shutil
from dataclasses import dataclass
from pathlib import Path

import torch

from ..config import opt
from ..errors import UsageError
from .base import Capabilities, no_packing

NAME = "qlora"
HELP = "QLoRA: low-rank adapters on all linear layers of a 4-bit quantized base"
DEFAULTS = {"learning_rate": 2e-4, "load_in_4bit": True, "output_dir": "models/qlora"}
# compiled layers measured faster on the GPU (docs/performance.md); --fsdp shards the 4-bit base and LoRA's weights
CAPABILITIES = Capabilities(gradient_checkpointing=True, compile="always", fsdp=True, liger=True, liger_fused_ce=True)
WEIGHTS_FILE = "adapter_model.safetensors"  # what save() writes the trained weights to
SVD_INITS = ("pissa", "olora")
INITIAL_ADAPTER = "initial_adapter"  # in the run's scratch folder: the SVD init, to convert the trained adapter


@dataclass
class Options:
    lora_r: int = opt(16, "rank of the LoRA update matrices")
    lora_alpha: float = opt(32, "LoRA scaling numerator: the update is scaled by lora_alpha / lora_r")
    lora_dropout: float = opt(0.05, "dropout on the LoRA input")
    target_modules: str = opt("all-linear", "comma-separated module names to adapt, or all-linear")
    init_lora_weights: str = opt("default", "LoRA initialisation",
                                 ["default", "gaussian", "pissa", "loftq", "olora"])
    use_dora: bool = opt(False, "DoRA: the update split into a trained magnitude and a LoRA direction per output")
    use_rslora: bool = opt(False, "rsLoRA: scale the update by lora_alpha / sqrt(lora_r), steadier at high ranks")
    loraplus_lr_ratio: float = opt(0.0, "LoRA+: B matrices learn this many times faster than A (e.g. 16; 0 = off)")

    def validate(self) -> list[str]:
        problems = []
        if self.loraplus_lr_ratio and self.loraplus_lr_ratio < 1:
            problems.append(f"--loraplus_lr_ratio is the B/A learning-rate ratio: 0 (off) or at least 1, "
                            f"got {self.loraplus_lr_ratio:g}")
        if self.lora_r <= 0:
            problems.append(f"--lora_r must be positive, got {self.lora_r}")
        if self.lora_alpha <= 0:
            problems.append(f"--lora_alpha must be positive, got {self.lora_alpha}")
        if not 0 <= self.lora_dropout < 1:
            problems.append(f"--lora_dropout must be in [0, 1), got {self.lora_dropout}")
        if not self.target_modules.strip():
            problems.append("--target_modules is empty; use all-linear or names like q_proj,v_proj")
        return problems


def _lora_config(opts: Options):
    from peft import LoraConfig

    targets = opts.target_modules if opts.target_modules == "all-linear" else [
        t.strip() for t in opts.target_modules.split(",") if t.strip()]
    init = {"default": True, "gaussian": "gaussian", "pissa": "pissa_niter_16", "loftq": True,
            "olora": "olora"}[opts.init_lora_weights]
    return LoraConfig(r=opts.lora_r, lora_alpha=opts.lora_alpha, lora_dropout=opts.lora_dropout,
                      target_modules=targets, init_lora_weights=init, bias="none", task_type="CAUSAL_LM",
                      use_dora=opts.use_dora, use_rslora=opts.use_rslora)


def prepare(ctx, opts: Options):
    from peft import PeftModel, get_peft_model

    initial = ctx.work_dir / INITIAL_ADAPTER
    if opts.init_lora_weights == "pissa" and ctx.cfg.load_in_4bit:
        # PiSSA needs the exact 16-bit weights: decompose there, then quantize the residual.
        full = ctx.load_base(load_in_4bit=False, prepare_for_training=False)
        peft_model = get_peft_model(full, _lora_config(opts))
        _save_initial(peft_model, initial)
        residual = ctx.work_dir / "residual_base"
        peft_model.unload().save_pretrained(residual, safe_serialization=True)
        del full, peft_model
        model = ctx.load_base(path=str(residual))
        return PeftModel.from_pretrained(model, initial, is_trainable=True)
    model = ctx.load_base()
    peft_model = get_peft_model(model, _lora_config(opts))
    if opts.init_lora_weights == "loftq":
        loftq_initialise(peft_model, safetensors_files(ctx.resolved_model))
    if opts.init_lora_weights in SVD_INITS:
        _save_initial(peft_model, initial)
    return peft_model


def check(cfg, opts: Options) -> list[str]:
    problems = []
    if opts.init_lora_weights == "loftq" and not cfg.load_in_4bit:
        problems.append("--init_lora_weights loftq fits LoRA to the 4-bit quantization error: it needs --load_in_4bit")
    if opts.use_dora and opts.init_lora_weights in SVD_INITS:
        problems.append(f"--use_dora with --init_lora_weights {opts.init_lora_weights}: its adapter is converted "
                        "on save to a plain LoRA of twice the rank, which DoRA's magnitude does not survive; "
                        "choose one")
    return problems


pack = no_packing


def safetensors_files(resolved_model: str) -> list[Path]:
    """The base model's original weights (for LoftQ), from its directory or the hub cache."""
    root = Path(resolved_model)
    if not root.is_dir():
        from huggingface_hub import snapshot_download

        root = Path(snapshot_download(resolved_model, allow_patterns=["*.safetensors", "*.json"]))
    files = sorted(root.glob("*.safetensors"))
    if not files:
        raise UsageError(f"LoftQ needs the base model's .safetensors weights; none found in {root}")
    return files


@torch.no_grad()
def loftq_initialise(peft_model, files: list[Path]) -> None:
    """LoftQ (one step): set B @ A * scaling to the best rank-r fit of W - dequantize(quantize(W)).

    peft's replace_lora_weights_loftq computes on CUDA only and leaves out the LoRA scaling.
    """
    import bitsandbytes as bnb
    from peft.tuners.lora import Linear4bit
    from safetensors import safe_open

    handles = [safe_open(str(f), "pt") for f in files]
    where = {k: h for h in handles for k in h.keys()}
    for name, module in peft_model.named_modules():
        if not isinstance(module, Linear4bit):
            continue
        key = name.removeprefix("base_model.model.") + ".weight"
        if key not in where:
            raise UsageError(f"LoftQ: weight '{key}' not found in {', '.join(map(str, files))}")
        weight = module.get_base_layer().weight
        original = where[key].get_tensor(key).to(weight.device, torch.float32)
        residual = original - bnb.functional.dequantize_4bit(weight.data, weight.quant_state).float()
        u, s, vh = torch.linalg.svd(residual, full_matrices=False)
        r, scaling = module.r["default"], module.scaling["default"]
        root = s[:r].sqrt()
        module.lora_A["default"].weight.data = (root[:, None] * vh[:r]).contiguous()
        module.lora_B["default"].weight.data = (u[:, :r] * root / scaling).contiguous()


def _save_initial(peft_model, path: Path) -> Path:
    config = peft_model.peft_config["default"]
    init = config.init_lora_weights
    config.init_lora_weights = True  # so that loading it does not run the SVD again
    peft_model.save_pretrained(path)
    config.init_lora_weights = init
    return path


def disabled(model):
    return model.disable_adapter()


def save(model, out_dir: Path, ctx, state_dict: dict | None = None) -> None:
    initial = ctx.work_dir / INITIAL_ADAPTER  # written by prepare for the inits that change the base
    gathered = {"state_dict": state_dict} if state_dict is not None else {}
    if initial.is_dir():
        model.save_pretrained(out_dir, path_initial_model_for_weight_conversion=str(initial), **gathered)
    else:
        model.save_pretrained(out_dir, **gathered)
    shutil.rmtree(out_dir / INITIAL_ADAPTER, ignore_errors=True)


def load(base_model, out_dir: Path, opts: Options):
    from peft import PeftModel

    return PeftModel.from_pretrained(base_model, str(out_dir))


def trainable_formula(model, opts: Options) -> int:
    """r x (in + out) for every adapted linear layer, and with DoRA one magnitude per output."""
    from peft.tuners.lora import LoraLayer

    total = 0
    for module in model.modules():
        if isinstance(module, LoraLayer):
            base = module.get_base_layer()
            total += module.r["default"] * (base.in_features + base.out_features)
            total += base.out_features if opts.use_dora else 0
    return total


def optimizer_groups(model, opts: Options, lr: float) -> list[dict] | None:
    """LoRA+: B matrices (and DoRA's magnitudes, as peft's create_loraplus_optimizer groups them) at
    lr x --loraplus_lr_ratio, A matrices at lr; None = one group at lr."""
    if not opts.loraplus_lr_ratio:
        return None
    fast = [p for n, p in model.named_parameters() if p.requires_grad and ("lora_B" in n or p.ndim == 1)]
    ids = {id(p) for p in fast}
    slow = [p for p in model.parameters() if p.requires_grad and id(p) not in ids]
    return [{"params": slow, "lr": lr}, {"params": fast, "lr": lr * opts.loraplus_lr_ratio}]


