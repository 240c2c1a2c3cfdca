"""Checkpoints of a training run, and resuming from them.

    OUTPUT_DIR.checkpoints/
        medpeft_checkpoint.json      what a checkpoint must share with a run to be resumed by it (settings, data)
        checkpoint-N/                the Trainer's save: trainable.safetensors (every method), optimizer, scheduler,
                                     RNG states, data position, and medpeft_complete, written once the save returned
"""

from __future__ import annotations

import errno
import json
import shutil
from pathlib import Path

import torch

from ..distributed import is_main_process
from ..errors import UsageError


CHECKPOINT_IDENTITY = "medpeft_checkpoint.json"


CHECKPOINT_COMPLETE = "medpeft_complete"


TRAINABLE_FILE = "trainable.safetensors"


def checkpoint_dir(output_dir) -> Path:
    out = Path(output_dir)
    return out.with_name(out.name + ".checkpoints")


def disk_full(exc: BaseException, folder: Path | None = None) -> bool:
    """ENOSPC however the writer reports it: OSError, safetensors' "os error 28", or torch.save's bare
    "file write failed" when the target's disk has next to nothing left."""
    while exc is not None:
        text = str(exc)
        if isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, errno.EDQUOT):
            return True
        if "No space left on device" in text or "os error 28" in text:
            return True
        if folder is not None and "write failed" in text:
            try:
                return shutil.disk_usage(folder).free < 64 * 2**20
            except OSError:
                return False
        exc = exc.__cause__ or exc.__context__
    return False


def complete_checkpoints(root: Path) -> list[Path]:
    """Checkpoint folders whose save finished (marker written after the Trainer's save returned), oldest first."""
    found = [p for p in root.glob("checkpoint-*") if p.name.split("-")[-1].isdigit()] if root.is_dir() else []
    return sorted((p for p in found if (p / CHECKPOINT_COMPLETE).is_file()), key=lambda p: int(p.name.split("-")[-1]))


def drop_incomplete_checkpoints(root: Path) -> list[Path]:
    dropped = [p for p in root.glob("checkpoint-*") if not (p / CHECKPOINT_COMPLETE).is_file()] if root.is_dir() else []
    for p in dropped:
        shutil.rmtree(p, ignore_errors=True)
    return dropped


def find_checkpoint(cfg, identity: dict, log=print, discard_stale: bool = False) -> Path | None:
    """The checkpoint --resume_from_checkpoint names ('auto': the newest complete one of this --output_dir),
    refusing one made by a run with other settings or data (or, with `discard_stale`, deleting those)."""
    if cfg.resume_from_checkpoint == "auto":
        root = checkpoint_dir(cfg.output_dir)
        if is_main_process():
            drop_incomplete_checkpoints(root)
        found = complete_checkpoints(root)
        if not found:
            return None
        path = found[-1]
    else:
        path = Path(cfg.resume_from_checkpoint)
        if not (path / CHECKPOINT_COMPLETE).is_file():
            raise UsageError(f"--resume_from_checkpoint: '{path}' is not a complete medpeft checkpoint "
                             f"(no {CHECKPOINT_COMPLETE}); pass 'auto' to take the newest complete one")
        root = path.parent
    saved_path = root / CHECKPOINT_IDENTITY
    saved = json.loads(saved_path.read_text(encoding="utf-8")) if saved_path.is_file() else {}
    differences = [f"{k} {saved.get('settings', {}).get(k)!r} vs {v!r}" for k, v in identity["settings"].items()
                   if saved.get("settings", {}).get(k) != v]
    for key in ("method", "train_examples"):
        if saved.get(key) != identity[key]:
            differences.insert(0, f"{key} {saved.get(key)!r} vs {identity[key]!r}")
    if differences and discard_stale and cfg.resume_from_checkpoint == "auto":
        log(f"checkpoints in {root} were made with other settings or data ({'; '.join(differences[:2])}): removed")
        shutil.rmtree(root, ignore_errors=True)
        return None
    if differences:
        raise UsageError(f"--resume_from_checkpoint: '{path}' was made by a run with other settings or data "
                         f"({'; '.join(differences[:4])}); use the same settings, or delete {root} to start over")
    return path


def trainable_state(model) -> dict:
    return {n: p.detach().to("cpu", copy=True).contiguous() for n, p in model.named_parameters() if p.requires_grad}


def load_trainable(model, path: Path) -> None:
    from safetensors.torch import load_file

    saved = load_file(str(path))
    params = {n: p for n, p in model.named_parameters() if p.requires_grad}
    if set(saved) != set(params):
        missing, extra = sorted(set(params) - set(saved)), sorted(set(saved) - set(params))
        raise UsageError(f"checkpoint '{path.parent}' does not fit this model (missing {missing[:3]}, "
                         f"unexpected {extra[:3]}); delete it to start over")
    with torch.no_grad():
        for name, p in params.items():
            p.copy_(saved[name].to(p.device, p.dtype))


def mark_complete_callback():
    from transformers import TrainerCallback

    class MarkComplete(TrainerCallback):
        def on_save(self, args, state, control, **kwargs):
            if state.is_world_process_zero:
                folder = Path(args.output_dir) / f"checkpoint-{state.global_step}"
                if folder.is_dir():
                    (folder / CHECKPOINT_COMPLETE).write_text("complete\n", encoding="utf-8")

    return MarkComplete()
