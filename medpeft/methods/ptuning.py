"""P-Tuning: trainable virtual tokens produced by a small prompt encoder (peft PromptEncoderConfig); base frozen.

The virtual tokens are prepended to every input. Only the encoder trains; after training peft saves the
virtual-token embeddings it produces, so loading needs no encoder. Gradient checkpointing stays off: the
virtual tokens enter through inputs_embeds, which the recomputed blocks do not see as requiring grad.
"""

from __future__ import annotations

import types
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import torch

from ..config import opt
from ..modeling import autocast, load_tokenizer
from .base import Capabilities, no_rules, one_group

NAME = "ptuning"
HELP = "P-Tuning: trainable virtual-token prompt encoder in front of a frozen base"
DEFAULTS = {"learning_rate": 5e-5, "output_dir": "models/ptuning"}
# No recomputation: the virtual tokens enter as input embeddings, which recomputed blocks would not train. Compiled
# layers pay on packed rows only, whose shapes repeat; Liger's fused cross-entropy slowed padded P-Tuning down
# (both measured on an H200: docs/performance.md), so the logits are materialised.
CAPABILITIES = Capabilities(gradient_checkpointing=False, compile="packed", fsdp=False, liger=True,
                            liger_fused_ce=False)
WEIGHTS_FILE = "adapter_model.safetensors"  # what save() writes the trained weights to


@dataclass
class Options:
    num_virtual_tokens: int = opt(20, "virtual tokens prepended to every input")
    encoder_hidden_size: Optional[int] = opt(None, "hidden width of the prompt encoder (default: model hidden size)")
    encoder_reparameterization_type: str = opt("MLP", "prompt encoder architecture", ["MLP", "LSTM"])
    encoder_num_layers: int = opt(2, "LSTM layers (the MLP always has 3 linear layers)")
    encoder_dropout: float = opt(0.0, "dropout inside the prompt encoder")
    prompt_init: str = opt("random", "virtual tokens start from the encoder's random output (random) or as the "
                                     "embeddings of --prompt_init_text (text)", ["random", "text"])
    prompt_init_text: str = opt("Answer the following medical question accurately and concisely.",
                                "text whose token embeddings the virtual tokens start from (repeated to fill them)")

    def validate(self) -> list[str]:
        problems = []
        if self.num_virtual_tokens <= 0:
            problems.append(f"--num_virtual_tokens must be positive, got {self.num_virtual_tokens}")
        if self.encoder_hidden_size is not None and self.encoder_hidden_size <= 0:
            problems.append(f"--encoder_hidden_size must be positive, got {self.encoder_hidden_size}")
        if not 0 <= self.encoder_dropout < 1:
            problems.append(f"--encoder_dropout must be in [0, 1), got {self.encoder_dropout}")
        return problems


def _prompt_config(opts: Options, hidden_size: int):
    from peft import PromptEncoderConfig

    return PromptEncoderConfig(task_type="CAUSAL_LM", num_virtual_tokens=opts.num_virtual_tokens,
                               encoder_hidden_size=opts.encoder_hidden_size or hidden_size,
                               encoder_reparameterization_type=opts.encoder_reparameterization_type,
                               encoder_num_layers=opts.encoder_num_layers, encoder_dropout=opts.encoder_dropout)


def prepare(ctx, opts: Options):
    from peft import get_peft_model

    model = ctx.load_base()
    peft_model = get_peft_model(model, _prompt_config(opts, model.config.hidden_size))
    if opts.prompt_init == "text":
        tokenizer = load_tokenizer(ctx.resolved_model, ctx.cfg.trust_remote_code)
        fit_encoder_to_text(peft_model, tokenizer, opts.prompt_init_text)
    return peft_model


def text_embeddings(peft_model, tokenizer, text: str, n: int):
    ids = tokenizer(text, add_special_tokens=False)["input_ids"] or [tokenizer.eos_token_id]
    ids = (ids * (n // len(ids) + 1))[:n]
    embed = peft_model.get_input_embeddings()
    return embed(torch.tensor(ids, device=embed.weight.device)).detach().float()


def fit_encoder_to_text(peft_model, tokenizer, text: str, steps: int = 300) -> float:
    """Train the prompt encoder briefly so that its virtual tokens equal the embeddings of `text`.

    The P-Tuning analogue of prompt tuning's text initialisation. On SmolLM2-135M and MedQuAD it did not
    beat random virtual tokens at step 0 (validation loss 2.5248 vs 2.5224, base 2.5255), so it is opt-in.
    Returns the remaining mean squared error.
    """
    encoder = peft_model.prompt_encoder["default"]
    n = encoder.embedding.num_embeddings
    target = text_embeddings(peft_model, tokenizer, text, n)
    indices = torch.arange(n, device=target.device)
    params = [p for p in encoder.parameters() if p.requires_grad]
    optimizer = torch.optim.Adam(params, lr=1e-3)
    with torch.enable_grad():
        for _ in range(steps):
            loss = torch.nn.functional.mse_loss(encoder(indices).float(), target)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
    return float(loss)


def pack(model):
    """Packed training: (slots the collator reserves at the start of each row, a function that undoes this).

    peft puts the virtual tokens before a row; packed, the examples after the first would see them only through
    the examples before them. Instead the row opens with the virtual tokens and every example attends to them as
    though they stood right before it (medpeft/packing.py: positions after them, `kv_index`). That is exact:
    the virtual tokens come first, so their states never depend on the example, and they are computed once per
    row instead of once per example. While training, the forward writes the prompt encoder's output there."""
    slots = model.active_peft_config.num_virtual_tokens

    def forward(self, input_ids=None, labels=None, **kwargs):
        embeds = self.word_embeddings(input_ids[:, slots:])
        embeds = torch.cat([self.get_prompt(batch_size=1).to(embeds.dtype), embeds], dim=1)
        return self.base_model(inputs_embeds=embeds, labels=labels, **kwargs)

    model.forward = types.MethodType(forward, model)  # a method, as accelerate's mixed-precision wrapper expects

    def undo():
        for name in ("forward", "_original_forward"):  # the latter: accelerate's record of this forward
            vars(model).pop(name, None)

    return slots, undo


def disabled(model):
    return model.disable_adapter()


check = no_rules


def save(model, out_dir: Path, ctx, state_dict: dict | None = None) -> None:
    # peft saves the encoder's output as the virtual tokens: computed as training computed it (bf16 autocast on a
    # bf16 base), so that the loaded model gives the trained model's logits exactly
    with torch.no_grad(), autocast(model):
        model.save_pretrained(out_dir)


def load(base_model, out_dir: Path, opts: Options):
    from peft import PeftModel

    return PeftModel.from_pretrained(base_model, str(out_dir))


def trainable_formula(model, opts: Options) -> int:
    """Virtual-token table plus the encoder: MLP h->e->e->h with biases (LSTM: see peft's PromptEncoder)."""
    h = model.config.hidden_size
    e = opts.encoder_hidden_size or h
    table = opts.num_virtual_tokens * h
    if opts.encoder_reparameterization_type == "MLP":
        return table + (h * e + e) + (e * e + e) + (e * h + h)
    lstm = sum(p.numel() for p in model.prompt_encoder["default"].lstm_head.parameters())
    return table + lstm + (2 * e * 2 * e + 2 * e) + (2 * e * h + h)


optimizer_groups = one_group
