"""The three methods. Each is a module that satisfies `Method` (medpeft/methods/base.py): the same names, the
same signatures, its capabilities in one `Capabilities` value. Adding a method is one module, one entry in NAMES
and one row in the test matrix (tests/test_methods.py)."""

from importlib import import_module

from ..distributed import local_rank
from ..errors import UsageError
from .base import Capabilities, Method, no_packing

NAMES = ("qlora", "adapter", "ptuning")

__all__ = ["NAMES", "Capabilities", "Method", "get", "no_packing", "training_rules"]


def get(name: str) -> Method:
    if name not in NAMES:
        raise UsageError(f"unknown method '{name}'; known methods: {', '.join(NAMES)}")
    return import_module(f"{__name__}.{name}")


def training_rules(method: Method):
    """The rules between training settings and `method` (config.settle's `rules`), checked before any model loads."""

    def check(cfg, opts) -> list[str]:
        problems = []
        if cfg.fsdp and not method.CAPABILITIES.fsdp:
            problems.append(f"--fsdp shards LoRA training (method qlora); {method.NAME} trains on several GPUs "
                            "data-parallel: drop --fsdp and keep --num_gpus")
        if cfg.fsdp and cfg.compile == "on":
            problems.append("--compile on cannot run with --fsdp (FSDP gathers each layer's shards around its call); "
                            "use --compile auto, which leaves sharded layers uncompiled")
        if cfg.fsdp and cfg.num_gpus < 2 and local_rank() is None:
            problems.append("--fsdp splits the base over several GPUs: add --num_gpus N (N >= 2)")
        if cfg.fsdp and cfg.optim == "paged_adamw_8bit":  # peft's FSDP notes: bitsandbytes' optimizers fail there
            problems.append("--optim paged_adamw_8bit does not work with --fsdp; use --optim auto")
        return problems + method.check(cfg, opts)

    return check
