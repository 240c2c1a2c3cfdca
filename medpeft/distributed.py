"""Several GPUs: the processes of a data-parallel or FSDP run, and launching one.

    launch(num_gpus, argv, fsdp=False)  -> run `medpeft <argv>` in num_gpus processes through accelerate launch
    local_rank() / is_main_process() / process_count() -> this process's role, from what accelerate launch /
                                          torchrun set (local_rank() is None outside a launched run)
    sharded()                           -> True inside an FSDP run (the base is split over the GPUs)
"""

from __future__ import annotations

import os
import subprocess
import sys

from .errors import UsageError

# FSDP for QLoRA as in peft's and bitsandbytes' FSDP-QLoRA guides: 4-bit weights stored in bf16 so they shard,
# frozen and trainable weights in separate units (use_orig_params false; Trainer applies peft's wrap policy),
# the base read from disk once, on the first process, and sent to the others. Each key is both
# `accelerate launch --fsdp_<key>` and the variable FSDP_<KEY> that flag sets.
FSDP_SETTINGS = {
    "version": "1",
    "sharding_strategy": "FULL_SHARD",
    "auto_wrap_policy": "TRANSFORMER_BASED_WRAP",
    "backward_prefetch": "BACKWARD_PRE",
    "use_orig_params": "false",
    "cpu_ram_efficient_loading": "true",
    "sync_module_states": "true",
    "offload_params": "false",
    "state_dict_type": "FULL_STATE_DICT",
}


def fsdp_environment() -> dict[str, str]:
    """The variables `accelerate launch --use_fsdp` gives each process (for launchers such as torchrun)."""
    return {"ACCELERATE_USE_FSDP": "true", **{f"FSDP_{k.upper()}": v for k, v in FSDP_SETTINGS.items()}}


def sharded() -> bool:
    """accelerate applies FSDP on accelerators only (on CPUs the same variables give plain data parallelism)."""
    import torch

    return os.environ.get("ACCELERATE_USE_FSDP", "false").lower() in ("1", "true") and torch.cuda.is_available()


def local_rank() -> int | None:
    """This process's GPU index when it is one of a launched run's processes, else None."""
    return int(os.environ["LOCAL_RANK"]) if "LOCAL_RANK" in os.environ else None


def is_main_process() -> bool:
    return int(os.environ.get("RANK", "0")) == 0


def process_count() -> int:
    """Processes of this run (set by accelerate launch / torchrun)."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def sum_over_processes(values: list[float]) -> list[float]:
    """Totals over the processes (each counts only its own share of the tokens)."""
    import torch
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()):
        return values
    t = torch.tensor(values, dtype=torch.float64, device="cuda" if torch.cuda.is_available() else "cpu")
    dist.all_reduce(t)
    return t.tolist()


def launch(num_gpus: int, argv: list[str], fsdp: bool = False, env: dict | None = None) -> int:
    """Run `python -m medpeft.cli <argv>` again in `num_gpus` processes, one per GPU, with `env` added to their
    environment; returns the exit code."""
    import torch

    found = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if found < num_gpus:
        raise UsageError(f"--num_gpus {num_gpus}: {found} CUDA GPU(s) visible; lower --num_gpus or run on a "
                         "machine with more GPUs")
    env = {"NCCL_NVLS_ENABLE": "0", **os.environ, **(env or {})}  # NVLink multicast off: fails on some machines
    return subprocess.run(launch_command(num_gpus, argv, fsdp), env=env).returncode


def launch_command(num_gpus: int, argv: list[str], fsdp: bool = False) -> list[str]:
    mode = ["--use_fsdp", *[a for k, v in FSDP_SETTINGS.items() for a in (f"--fsdp_{k}", v)]] if fsdp else \
        ["--multi_gpu"]
    return [sys.executable, "-m", "accelerate.commands.launch", *mode, "--num_processes", str(num_gpus),
            "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", "-m", "medpeft.cli", *argv]
