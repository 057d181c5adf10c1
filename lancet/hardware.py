"""Precision, decided in one place from the hardware (and logged with its reason).

bf16 autocast is not faster everywhere: on a 2-core CPU with native bf16 (avx512_bf16) a SmolLM2-135M
forward+backward of 8 x 128 tokens took 3.4 s against 5.6 s in fp32, and on one without it 29.3 s against 10.3 s
(emulated bf16 is about 3x slower). ``auto`` therefore picks bf16 on CUDA and on CPUs that have the instructions,
and fp32 elsewhere; ``fp32`` and ``bf16`` override.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

from lancet.errors import LancetError

log = logging.getLogger(__name__)
PRECISIONS = ("auto", "fp32", "bf16")
BF16_CPU_FLAGS = ("avx512_bf16", "amx_bf16")  # /proc/cpuinfo flags of CPUs that compute bf16 natively


@dataclass(frozen=True)
class Precision:
    name: str  # "bf16" or "fp32"
    reason: str

    @property
    def bf16(self) -> bool:
        return self.name == "bf16"


def cpu_flags(cpuinfo: str | None = None) -> frozenset[str]:
    """The CPU's feature flags (from ``cpuinfo`` text, or /proc/cpuinfo; empty where it cannot be read)."""
    if cpuinfo is None:
        try:
            cpuinfo = Path("/proc/cpuinfo").read_text()
        except OSError:
            return frozenset()
    for line in cpuinfo.splitlines():
        key, _, value = line.partition(":")
        if key.strip() in ("flags", "Features"):
            return frozenset(value.split())
    return frozenset()


def choose_precision(requested: str = "auto", device: str = "cpu", flags: frozenset[str] | None = None) -> Precision:
    """The precision to run at, with the reason (see the module docstring)."""
    if requested not in PRECISIONS:
        raise LancetError(f"unknown precision {requested!r}; choose from {', '.join(PRECISIONS)}")
    if requested != "auto":
        return Precision(requested, "requested")
    if str(device).startswith("cuda"):
        return Precision("bf16", "CUDA: bf16 autocast")
    flags = cpu_flags() if flags is None else flags
    native = [f for f in BF16_CPU_FLAGS if f in flags]
    if native:
        return Precision("bf16", f"CPU with native bf16 ({', '.join(native)})")
    return Precision("fp32", "CPU without native bf16 (no avx512_bf16/amx_bf16): emulated bf16 is slower than fp32")


def auto_bf16(device: str = "cpu") -> bool:
    """``choose_precision("auto")`` as the bf16 flag the trainers and the engine take; logs the decision."""
    p = choose_precision("auto", device)
    log.info("precision %s: %s", p.name, p.reason)
    return p.bf16
