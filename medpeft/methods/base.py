"""What every method module provides, as a type (a module satisfies a Protocol structurally; tests check it).

    NAME, HELP          what it is
    DEFAULTS            training settings that differ from TrainConfig's defaults (learning rate, output folder)
    CAPABILITIES        what the shared training path may do with it (Capabilities below)
    WEIGHTS_FILE        the file save() writes the trained weights to
    Options             dataclass of the method's own flags; validate() returns its problems
"""

from __future__ import annotations

from contextlib import AbstractContextManager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Protocol

COMPILE_CHOICES = ("always", "packed", "never")


@dataclass(frozen=True)
class Capabilities:
    gradient_checkpointing: bool  # its training works with activations recomputed in backward
    compile: str  # when --compile auto compiles its decoder layers on one GPU: always | packed (rows only) | never
    fsdp: bool  # --fsdp may shard it over several GPUs (medpeft/distributed.py)
    liger: bool  # Liger kernels by default on the GPU (medpeft/training/speedups.py)
    liger_fused_ce: bool  # ... including Liger's fused linear cross-entropy

    def __post_init__(self):
        if self.compile not in COMPILE_CHOICES:
            raise ValueError(f"compile must be one of {COMPILE_CHOICES}, got {self.compile!r}")


class Method(Protocol):
    NAME: str
    HELP: str
    DEFAULTS: dict[str, Any]
    CAPABILITIES: Capabilities
    WEIGHTS_FILE: str
    Options: type

    def check(self, cfg, opts) -> list[str]:
        """Rules between the training settings and the method's options, checked before any model loads."""

    def prepare(self, ctx, opts) -> Any:
        """The base model (ctx.load_base) with the method attached, only the method's weights trainable."""

    def disabled(self, model) -> AbstractContextManager:
        """While inside: the bare base model's behaviour."""

    def pack(self, model) -> tuple[int, Callable[[], None]]:
        """Packed training rows (medpeft/training/packing.py): the slots at the start of each row that every example
        sees as its own prefix, for the method to fill, and what undoes the change to the model."""

    def save(self, model, out_dir: Path, ctx, state_dict: dict | None = None) -> None:
        """The method's weights in its library's own format; `state_dict`: weights gathered from FSDP shards."""

    def load(self, base_model, out_dir: Path, opts) -> Any:
        """The inverse of save, for evaluation and generation."""

    def trainable_formula(self, model, opts) -> int:
        """The number of trainable parameters, computed from the shapes (tests compare it with the count)."""

    def optimizer_groups(self, model, opts, lr: float) -> list[dict] | None:
        """Trainable parameters in groups with their own learning rates (LoRA+); None: one group at `lr`."""


def no_packing(model) -> tuple[int, Callable[[], None]]:
    """pack() for a method whose packed rows need no slots and no change to the model."""
    return 0, lambda: None


def one_group(model, opts, lr: float) -> None:
    """optimizer_groups() for a method whose weights all learn at --learning_rate."""
    return None


def no_rules(cfg, opts) -> list[str]:
    """check() for a method with no rules between settings."""
    return []
