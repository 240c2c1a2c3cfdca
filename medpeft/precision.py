"""The dtype a model computes in on this machine, and why: the one place that decides it.

    compute_dtype("cuda")           -> bfloat16 where the GPU supports it, else float32
    compute_dtype("cpu")            -> bfloat16 on a CPU that runs it natively (AVX512-BF16 or AMX on x86, oneDNN's
                                       bf16 on ARM), else float32
    resolve("auto" | "float32" | "bfloat16", device) -> the dtype of 16-bit bases, of 4-bit layers' compute, of
                                       autocast, of the evaluation, generate and chat
    explain(name, device)           -> one line for the log, e.g.
                                       "CPU without native bf16 (AVX2): computing in float32"

Why it matters: on a CPU without bf16 instructions, PyTorch emulates bf16 matmuls ~30x slower than float32
(docs/field-notes.md has the figures of both CPU kinds); on one with them, bf16 is ~2x faster than float32.
"""

from __future__ import annotations

import functools
import os
import platform
from dataclasses import dataclass
from pathlib import Path

import torch

NAMES = {"float32": torch.float32, "bfloat16": torch.bfloat16}
X86 = ("x86_64", "amd64", "i386", "i686")


@dataclass(frozen=True)
class CpuBf16:
    """Whether this CPU runs bf16 natively, as PyTorch will use it."""

    native: bool
    capability: str  # ATen's vector instruction set: AVX2, AVX512, ... (ATEN_CPU_CAPABILITY lowers it)
    why: str  # what decided, for the log line


def _flag(name: str) -> bool | None:
    probe = getattr(torch.cpu, name, None)  # private probes of cpuinfo; absent in some torch builds
    try:
        return bool(probe()) if probe is not None else None
    except RuntimeError:
        return None


def probe() -> dict:
    """What PyTorch reports of this CPU (read on every call; cpu_bf16 caches the verdict)."""
    return {"machine": platform.machine().lower(), "capability": torch.backends.cpu.get_cpu_capability(),
            "onednn_bf16": bool(torch.ops.mkldnn._is_mkldnn_bf16_supported()),  # honours ONEDNN_MAX_CPU_ISA
            "avx512_bf16": _flag("_is_avx512_bf16_supported"), "amx": _flag("_is_amx_tile_supported"),
            "onednn_limit": os.environ.get("ONEDNN_MAX_CPU_ISA")}


def judge(found: dict) -> CpuBf16:
    """bf16 is native when the processor has bf16 instructions *and* oneDNN, which runs PyTorch's bf16 matmuls on
    the CPU, will use them. oneDNN's own answer is not enough on x86: it reports bf16 on any AVX512 CPU, where it
    emulates bf16 at a fraction of the speed."""
    capability = found["capability"]
    if found["machine"] in X86:
        names = "+".join(n for n, key in (("AVX512-BF16", "avx512_bf16"), ("AMX", "amx")) if found.get(key))
        if names and found["onednn_bf16"]:
            return CpuBf16(True, capability, names)
        if names:
            limit = found.get("onednn_limit")
            return CpuBf16(False, capability, f"{names} present but oneDNN will not use it"
                           + (f": ONEDNN_MAX_CPU_ISA={limit}" if limit else ""))
        return CpuBf16(False, capability, "no AVX512-BF16 or AMX instructions")
    if found["onednn_bf16"]:
        return CpuBf16(True, capability, f"oneDNN bf16 on {found['machine']}")
    return CpuBf16(False, capability, f"no oneDNN bf16 on {found['machine']}")


@functools.lru_cache(maxsize=1)
def cpu_bf16() -> CpuBf16:
    """This CPU's verdict, probed once per process."""
    return judge(probe())


def cpu_name() -> str:
    """The processor's model name, as lscpu prints it."""
    try:
        for line in Path("/proc/cpuinfo").read_text(encoding="utf-8").splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def compute_dtype(device: str) -> torch.dtype:
    if device == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float32
    if device == "cpu":
        return torch.bfloat16 if cpu_bf16().native else torch.float32
    return torch.float32


def resolve(name: str, device: str) -> torch.dtype:
    """'auto' | 'float32' | 'bfloat16' -> the dtype the model computes in."""
    if name == "auto":
        return compute_dtype(device)
    if name not in NAMES:
        raise ValueError(f"unknown dtype '{name}'; known: auto, {', '.join(NAMES)}")
    return NAMES[name]


def short(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def explain(name: str, device: str) -> str:
    """One line: the dtype chosen and the reason, with a warning when an explicit bf16 will be slow here."""
    dtype = resolve(name, device)
    if device != "cpu":
        return f"{device}: computing in {short(dtype)}" + (" (--dtype auto)" if name == "auto" else "")
    probe = cpu_bf16()
    kind = f"CPU {'with' if probe.native else 'without'} native bf16 ({probe.capability}; {probe.why})"
    line = f"{kind}: computing in {short(dtype)}"
    if name != "auto":
        line += f" (--dtype {name})"
    if dtype == torch.bfloat16 and not probe.native:
        line += "; warning: bf16 is emulated on this CPU, about 30x slower than --dtype float32"
    return line
