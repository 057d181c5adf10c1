"""Device and precision, decided in one place from the hardware (and logged with their reasons).

The device: ``auto`` is CUDA when it is available, else the CPU. Everything downstream follows the model's own
device (``model_device``), as in transformers and kronfluence: move the model, and batches, statistics, factors
and scores go with it.

bf16 autocast is not faster everywhere: on a 2-core CPU with native bf16 (avx512_bf16) a SmolLM2-135M
forward+backward of 8 x 128 tokens took 3.4 s against 5.6 s in fp32, and on one without it 29.3 s against 10.3 s
(emulated bf16 is about 3x slower). ``auto`` therefore picks bf16 on CUDA and on CPUs that have the instructions,
and fp32 elsewhere; ``fp32`` and ``bf16`` override.
"""

from __future__ import annotations

import logging
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path

import torch

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


def resolve_device(requested: str | torch.device = "auto") -> torch.device:
    """``auto`` (CUDA when available, else CPU), ``cpu``, ``cuda`` or ``cuda:N``; a one-line error when the
    requested CUDA device does not exist. On CPU the thread count is logged (it sets the speed)."""
    name = str(requested)
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        device = torch.device(name)
    except RuntimeError:
        raise LancetError(f"unknown device {requested!r}; use auto, cpu, cuda or cuda:N") from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise LancetError(f"device {requested!r} requested but CUDA is not available (torch "
                              f"{torch.__version__}); use --device cpu")
        if device.index is None:  # under torchrun, lancet.distributed has set this rank's cuda:LOCAL_RANK
            device = torch.device("cuda", torch.cuda.current_device())
        index = device.index
        if index >= torch.cuda.device_count():
            raise LancetError(f"device {requested!r} requested but only {torch.cuda.device_count()} CUDA "
                              "device(s) exist")
        # TF32 matmuls: fp32 statistics keep their accumulation; exactness tests set fp64, which TF32 never touches
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
        log.info("device %s (%s)", device, torch.cuda.get_device_name(index))
    elif device.type == "cpu":
        log.info("device cpu, %d threads", torch.get_num_threads())
    else:
        raise LancetError(f"unsupported device {requested!r}; use auto, cpu, cuda or cuda:N")
    return device


def model_device(model) -> torch.device:
    """The device of the model's first parameter: where its batches and statistics belong."""
    try:
        return next(model.parameters()).device
    except StopIteration:
        return torch.device("cpu")


def autocast(device: torch.device | str, enabled: bool):
    """bf16 autocast on ``device``'s type when ``enabled`` (weights stay in their dtype), else a no-op."""
    kind = torch.device(device).type
    return torch.autocast(kind, dtype=torch.bfloat16) if enabled else nullcontext()


def settings(device: torch.device | str, precision: Precision) -> dict[str, str]:
    """What a run records about where and how it computed."""
    return {"device": str(device), "precision": precision.name, "precision_reason": precision.reason}


def decide(device: str = "auto", precision: str = "auto") -> tuple[torch.device, Precision]:
    """The device and precision of a run, decided once (CLI, config, demo, benchmarks) and logged."""
    dev = resolve_device(device)
    prec = choose_precision(precision, str(dev))
    log.info("precision %s: %s", prec.name, prec.reason)
    return dev, prec
