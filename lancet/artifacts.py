"""Artifacts on disk: atomic writes, fingerprints of model/data/config, checked reuse."""

from __future__ import annotations

import glob
import hashlib
import json
import os
import re
import tempfile
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from lancet.errors import ArtifactError


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    """Write to a temp file in the same directory, fsync, then rename over ``path``."""
    path = Path(path)
    tmp = _temp_for(path)
    try:
        with open(tmp, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException as exc:
        Path(tmp).unlink(missing_ok=True)
        named = _io_error_naming(exc, path)
        if named is exc:
            raise
        raise named from exc


def _io_error_naming(exc: BaseException, path: Path) -> BaseException:
    """An I/O failure as an OSError that names ``path`` (the CLI prints the name): fsync and safetensors' writer
    report none, and safetensors wraps a full disk in its own error type ("... (os error 28)"). Others: ``exc``."""
    if isinstance(exc, OSError):
        return exc if exc.filename is not None else OSError(exc.errno, exc.strerror or str(exc), str(path))
    code = re.search(r"\(os error (\d+)\)", str(exc)) if isinstance(exc, Exception) else None
    return OSError(int(code[1]), os.strerror(int(code[1])), str(path)) if code else exc


def _temp_for(path: Path) -> str:
    """A new temp file beside ``path``, after removing the temps of ``path`` that a killed writer left behind
    (each artifact has one writer at a time, so another live writer's temp is never among them)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    for stale in path.parent.glob(f".{glob.escape(path.name)}.*.tmp"):
        stale.unlink(missing_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    return tmp


def atomic_write_json(path: str | os.PathLike, obj: Any) -> None:
    atomic_write_bytes(path, (json.dumps(obj, indent=2, sort_keys=True, default=str) + "\n").encode("utf-8"))


def atomic_save_tensors(
    path: str | os.PathLike, tensors: dict[str, torch.Tensor], metadata: dict[str, str] | None = None
) -> None:
    path = Path(path)
    tmp = _temp_for(path)
    try:
        save_file({k: v.detach().contiguous().cpu() for k, v in tensors.items()}, tmp, metadata=metadata)
        os.replace(tmp, path)
    except BaseException as exc:
        Path(tmp).unlink(missing_ok=True)
        named = _io_error_naming(exc, path)
        if named is exc:
            raise
        raise named from exc


def load_tensors(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """Load a safetensors file; a truncated or corrupted file gives a clear error, not a crash."""
    try:
        return load_file(str(path))
    except FileNotFoundError as exc:
        raise ArtifactError(f"{path}: artifact not found") from exc
    except Exception as exc:  # safetensors raises its own error types for bad headers
        raise ArtifactError(f"{path}: corrupted or truncated safetensors file ({exc})") from exc


def hash_tensors(tensors: Iterable[tuple[str, torch.Tensor]]) -> str:
    """Fingerprint of named tensors (model weights): exact bytes, order-independent over names."""
    h = hashlib.sha256()
    for name, t in sorted(tensors, key=lambda kv: kv[0]):
        h.update(name.encode())
        h.update(str(tuple(t.shape)).encode())
        h.update(str(t.dtype).encode())
        h.update(t.detach().contiguous().cpu().view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()[:16]


def model_fingerprint(model: torch.nn.Module) -> str:
    return hash_tensors(model.state_dict().items())


def hash_json(obj: Any) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:16]


def check_or_write_meta(path: str | os.PathLike, meta: dict[str, Any], write: bool = True) -> bool:
    """Reuse rule for a stage directory: returns True if ``path`` holds the same fingerprint.

    Writes ``meta`` if there is none (only checks with ``write=False``: the ranks other than 0 under torchrun);
    raises ArtifactError naming the differing keys if it was made from other inputs, so a stale artifact is never
    silently believed.
    """
    path = Path(path)
    if not path.exists():
        if write:
            atomic_write_json(path, meta)
        return False
    try:
        old = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ArtifactError(f"{path}: corrupted metadata ({exc})") from exc
    diff = sorted(k for k in set(old) | set(meta) if old.get(k) != meta.get(k))
    if diff:
        raise ArtifactError(
            f"{path}: artifact was made from other inputs (differs in {', '.join(diff)}); "
            "use a new output directory (or delete this one)"
        )
    return True
