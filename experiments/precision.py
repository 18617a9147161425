"""``trainer.precision``: the numeric precision a run trains and evaluates in.

``fp32`` runs everything in float32. ``bf16`` / ``fp16`` run the forward (and the backward
it records) under ``torch.autocast`` with float32 master weights (the Trainer's mixed
precision). ``auto`` picks bf16 where the hardware computes it natively — a CUDA device with
bf16 support, or a CPU with AVX512-BF16 or AMX tiles — and fp32 elsewhere (emulated bf16 on
an older CPU is slower than fp32). results.json records the resolved precision.
"""

from __future__ import annotations

from enum import Enum
from pathlib import Path

import torch

CPUINFO = Path("/proc/cpuinfo")
CPU_BF16_FLAGS = ("avx512_bf16", "amx_bf16")


class Precision(str, Enum):
    auto = "auto"
    fp32 = "fp32"
    bf16 = "bf16"
    fp16 = "fp16"


def cpu_supports_bf16() -> bool:
    """True on a CPU with native bf16 arithmetic (AVX512-BF16 or AMX): torch's own check, or
    the flags of ``/proc/cpuinfo`` on a torch build without it."""
    checks = [getattr(torch.cpu, name, None) for name in ("_is_avx512_bf16_supported", "_is_amx_tile_supported")]
    if all(check is not None for check in checks):
        return any(check() for check in checks)
    if not CPUINFO.is_file():
        return False
    flags = set(CPUINFO.read_text().split())
    return any(flag in flags for flag in CPU_BF16_FLAGS)


def device_supports_bf16(device: torch.device) -> bool:
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    return device.type == "cpu" and cpu_supports_bf16()


def resolve_precision(requested: Precision | str, device: torch.device) -> Precision:
    """The precision a run on ``device`` uses for ``requested``; fp16 needs a CUDA device."""
    requested = Precision(requested)
    if requested is Precision.auto:
        return Precision.bf16 if device_supports_bf16(device) else Precision.fp32
    if requested is Precision.fp16 and device.type != "cuda":
        raise ValueError(f"trainer.precision=fp16 needs a CUDA device (training on {device.type}); use bf16 or fp32")
    return requested


def autocast(precision: Precision, device: torch.device) -> torch.autocast:
    """The autocast context of ``precision`` on ``device`` (disabled for fp32)."""
    dtype = {Precision.bf16: torch.bfloat16, Precision.fp16: torch.float16}.get(precision)
    return torch.autocast(device.type, dtype=dtype, enabled=dtype is not None)
