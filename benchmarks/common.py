"""Helpers shared by the benchmark scripts: peak-RSS sampling, timing, JSON output."""

from __future__ import annotations

import copy
import json
import os
import platform
import threading
import time
from contextlib import contextmanager
from datetime import UTC, datetime
from pathlib import Path

import torch

from lancet.artifacts import atomic_write_json

RESULTS = Path(__file__).resolve().parent / "results"


def rss_bytes() -> int:
    with open("/proc/self/statm") as fh:
        return int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


@contextmanager
def measure(record: dict, key: str):
    """Wall seconds and peak resident memory above the starting point, sampled every 20 ms."""
    start_rss, peak = rss_bytes(), [0]
    stop = threading.Event()

    def sample():
        while not stop.is_set():
            peak[0] = max(peak[0], rss_bytes())
            time.sleep(0.02)

    thread = threading.Thread(target=sample, daemon=True)
    thread.start()
    t0 = time.perf_counter()
    try:
        yield
    finally:
        seconds = time.perf_counter() - t0
        stop.set()
        thread.join()
        peak[0] = max(peak[0], rss_bytes())
        record[key] = {"seconds": round(seconds, 2), "peak_rss_gib": round(peak[0] / 1024**3, 3),
                       "peak_above_start_gib": round((peak[0] - start_rss) / 1024**3, 3)}


def environment(bf16: bool | None = None) -> dict:
    """The machine and library versions; "precision" is this machine's own choice, or with ``bf16`` the one the
    benchmark was told to use (the machine's choice then kept beside it)."""
    from lancet.hardware import choose_precision

    precision = choose_precision("auto")
    env = {"date": datetime.now(UTC).strftime("%Y-%m-%d"), "torch": torch.__version__,
           "threads": torch.get_num_threads(), "cpu_count": os.cpu_count(), "machine": platform.machine(),
           "precision": precision.name, "precision_reason": precision.reason}
    return env if bf16 is None else with_precision(env, bf16, "set by the benchmark's options")


def with_precision(env: dict, bf16: bool, why: str) -> dict:
    """``env`` reporting the precision a run used, where that is not the machine's own choice (kept in the reason)."""
    used = "bf16" if bf16 else "fp32"
    if env["precision"] != used:
        env = {**env, "precision": used, "precision_reason": f"{why}; this machine alone would choose "
                                                              f"{env['precision']} ({env['precision_reason']})"}
    return env


def write_result(name: str, payload: dict) -> Path:
    path = RESULTS / f"{name}.json"
    atomic_write_json(path, payload)
    print(json.dumps(payload, indent=2))
    return path


def shared_data(arg: str | None, must_hold: str) -> Path:
    """The shared data directory (``--shared`` or ../shared/data), checked to hold ``must_hold``."""
    from lancet.evaluate.suite import default_shared

    shared = Path(arg) if arg else default_shared()
    if not (shared / must_hold).is_dir():
        raise SystemExit(f"{shared}: shared data directory not found (pass --shared)")
    return shared


def rows_that_fit(records: list, tokenizer, max_length: int) -> list:
    """The records whose rendered row fits ``max_length`` tokens with response tokens left (dropped, not cut)."""
    import warnings

    from lancet.constants import IGNORE_INDEX
    from lancet.data import encode_records

    with warnings.catch_warnings():  # the cut rows are the ones dropped here
        warnings.simplefilter("ignore")
        encoded = encode_records(records, tokenizer, max_length + 1, progress=False)
    return [r for r, row in zip(records, encoded, strict=True)
            if len(row["input_ids"]) <= max_length and any(t != IGNORE_INDEX for t in row["labels"][1:])]


def sync_clock(device: torch.device | None = None) -> float:
    """perf_counter after the device's queued work has finished (CUDA runs asynchronously)."""
    if device is not None and device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter()


def raw_forward_backward(model, rows, batch_size: int, device: torch.device | None = None, bf16: bool = False
                         ) -> float:
    """Seconds of a plain training step's forward+backward (every weight gradient), no optimizer, on a copy of the
    model: the ceiling scoring is compared with."""
    from lancet.curvature.fit import batches
    from lancet.curvature.task import data_cotangent, forward_logits
    from lancet.hardware import autocast

    model = copy.deepcopy(model).train()
    t0 = sync_clock(device)
    for _, batch in batches(rows, batch_size, device=device):
        with autocast(device or "cpu", bf16):
            logits = forward_logits(model, batch)
        logits.backward(data_cotangent(logits, batch["labels"]))
        model.zero_grad(set_to_none=True)
    return sync_clock(device) - t0
