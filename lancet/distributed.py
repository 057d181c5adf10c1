"""torch.distributed under ``torchrun``, detected from the environment (RANK, WORLD_SIZE, LOCAL_RANK).

Without WORLD_SIZE (or with WORLD_SIZE=1) every helper is a no-op: no process group is started and nothing is
communicated, so a plain ``python``/``lancet`` run is exactly the single-process code path.

Conventions every stage follows under torchrun (docs/scaling.md):
- rows are sharded in contiguous, whole-batch slices in rank order (``shard_range``), so gathering the slices in
  rank order restores the original row order (``gather_rows``);
- statistics are sums and counts, all-reduced by SUM (``all_reduce_sum_``);
- only rank 0 writes artifacts (``main_only`` / ``is_main()``), atomically, and a ``barrier()`` follows every
  write that other ranks may read.
"""

from __future__ import annotations

import functools
import os
from collections.abc import Callable, Sequence
from typing import Any, TypeVar

import torch
import torch.distributed as td

T = TypeVar("T")


def _group_active() -> bool:
    return td.is_available() and td.is_initialized()


def init_from_env() -> bool:
    """Start the process group when launched with WORLD_SIZE > 1 (torchrun, any rendezvous) and none is running.

    Backend: gloo on CPU; with CUDA, ``cpu:gloo,cuda:nccl`` (CUDA tensors over NCCL, the CPU statistics over gloo)
    and this process's device set to cuda:LOCAL_RANK. Idempotent; returns whether a group is active."""
    if _group_active():
        return True
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1 or not td.is_available():
        return False
    backend = "gloo"
    if torch.cuda.is_available():
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        backend = "cpu:gloo,cuda:nccl"
    td.init_process_group(backend=backend)
    return True


def shutdown() -> None:
    """Destroy the process group if one is running (end of a CLI command)."""
    if _group_active():
        td.destroy_process_group()


def rank() -> int:
    if _group_active():
        return td.get_rank()
    return int(os.environ.get("RANK", "0")) if int(os.environ.get("WORLD_SIZE", "1")) > 1 else 0


def world_size() -> int:
    """Processes sharing the work: 1 unless a process group is running."""
    return td.get_world_size() if _group_active() else 1


def is_main() -> bool:
    return rank() == 0


def active() -> bool:
    """True when work is really split (a process group with more than one process)."""
    return world_size() > 1


def barrier() -> None:
    if active():
        td.barrier()


def main_only(fn: Callable[..., T]) -> Callable[..., T | None]:
    """Decorator: run ``fn`` on rank 0 only (None elsewhere). Follow it with ``barrier()`` when others read what
    it wrote."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> T | None:
        return fn(*args, **kwargs) if is_main() else None

    return wrapper


def all_reduce_sum_(tensor: torch.Tensor) -> torch.Tensor:
    """In-place SUM over ranks (identity in one process)."""
    if active():
        td.all_reduce(tensor, op=td.ReduceOp.SUM)
    return tensor


def _coalesced(tensors: Sequence[torch.Tensor], op: Callable[[torch.Tensor], None]) -> None:
    """Apply a collective ``op`` to many tensors as one flat buffer per (dtype, device), then copy back."""
    groups: dict[tuple[torch.dtype, torch.device], list[torch.Tensor]] = {}
    for t in tensors:
        groups.setdefault((t.dtype, t.device), []).append(t)
    for group in groups.values():
        flat = torch.cat([t.reshape(-1) for t in group])
        op(flat)
        offset = 0
        for t in group:
            t.copy_(flat[offset : offset + t.numel()].view_as(t))
            offset += t.numel()


def all_reduce_sum_many_(tensors: Sequence[torch.Tensor]) -> None:
    """In-place SUM over ranks of many tensors (one collective per dtype)."""
    if active():
        _coalesced(tensors, lambda flat: td.all_reduce(flat, op=td.ReduceOp.SUM))


def broadcast_many_(tensors: Sequence[torch.Tensor], src: int = 0) -> None:
    """Overwrite ``tensors`` on every rank with rank ``src``'s values (one collective per dtype)."""
    if active():
        _coalesced(tensors, lambda flat: td.broadcast(flat, src=src))


def share_by_owner(local: dict[str, dict[str, torch.Tensor]]) -> dict[str, dict[str, torch.Tensor]]:
    """Each rank computed some named groups of tensors (``local``, disjoint between ranks); returns every rank's
    groups on every rank, each broadcast from the rank that computed it (rank order, then each rank's order)."""
    if not active():
        return local
    meta = {name: {key: (tuple(t.shape), t.dtype) for key, t in group.items()} for name, group in local.items()}
    everyone: list[Any] = [None] * world_size()
    td.all_gather_object(everyone, meta)
    out: dict[str, dict[str, torch.Tensor]] = {}
    for src, groups in enumerate(everyone):
        tensors = []
        for name, keys in groups.items():
            out[name] = {key: (local[name][key].contiguous() if src == rank() else torch.empty(shape, dtype=dtype))
                         for key, (shape, dtype) in keys.items()}
            tensors += out[name].values()
        broadcast_many_(tensors, src=src)
    return out


def shard_bounds(n: int, multiple: int = 1, world: int | None = None) -> list[tuple[int, int]]:
    """Contiguous [lo, hi) slices of ``n`` rows for every rank, in rank order, each a whole number of
    ``multiple``-row units (batches) except at the end; units are split as evenly as possible."""
    world = world_size() if world is None else world
    units = -(-n // multiple)
    base, extra = divmod(units, world)
    bounds, lo = [], 0
    for r in range(world):
        hi = lo + base + (r < extra)
        bounds.append((min(lo * multiple, n), min(hi * multiple, n)))
        lo = hi
    return bounds


def shard_range(n: int, multiple: int = 1) -> tuple[int, int]:
    """This rank's [lo, hi) slice of ``n`` rows (all of them in one process), in whole batches of ``multiple``."""
    return shard_bounds(n, multiple)[rank() if active() else 0]


def gather_rows(local: torch.Tensor, n_total: int, dim: int = 0) -> torch.Tensor:
    """All-gather each rank's contiguous slice of rows (along ``dim``) and concatenate them in rank order, which is
    the original row order when the slices come from ``shard_range``. Every rank gets the whole tensor."""
    if not active():
        if local.shape[dim] != n_total:
            raise ValueError(f"gather_rows: {local.shape[dim]} local rows, expected {n_total}")
        return local
    sizes = torch.zeros(world_size(), dtype=torch.long)
    sizes[rank()] = local.shape[dim]
    all_reduce_sum_(sizes)
    if int(sizes.sum()) != n_total:
        raise ValueError(f"gather_rows: {int(sizes.sum())} rows over all ranks, expected {n_total}")
    longest = int(sizes.max())
    pad = list(local.shape)
    pad[dim] = longest - local.shape[dim]
    padded = torch.cat([local, local.new_zeros(pad)], dim=dim).contiguous()
    parts = [torch.empty_like(padded) for _ in range(world_size())]
    td.all_gather(parts, padded)
    return torch.cat([p.narrow(dim, 0, int(s)) for p, s in zip(parts, sizes, strict=True)], dim=dim)


def sum_dicts(values: dict[str, float]) -> dict[str, float]:
    """Sum small {name: number} dicts over ranks (keys may differ between ranks; a missing key counts 0)."""
    if not active():
        return dict(values)
    everyone: list[dict[str, float] | None] = [None] * world_size()
    td.all_gather_object(everyone, values)
    out: dict[str, float] = {}
    for d in everyone:
        for key, val in (d or {}).items():
            out[key] = out.get(key, 0.0) + float(val)
    order = list(values) + sorted(k for k in out if k not in values)  # this rank's key order first
    return {key: out[key] for key in order}


# ---- training: wrapping the model ------------------------------------------------------------------------------


def _block_classes(model: torch.nn.Module) -> set[str]:
    base = getattr(model, "get_base_model", lambda: model)()
    return set(getattr(base, "_no_split_modules", None) or ())


def wrap_for_training(model: torch.nn.Module, fsdp: bool = False) -> torch.nn.Module:
    """The module the training loop calls under torchrun: DistributedDataParallel (every rank holds the whole
    model, gradients averaged), or with ``fsdp`` FSDP2 ``fully_shard`` on every transformer block and the root
    (parameters, gradients and optimizer state sharded over ranks; the model is changed in place and returned).
    Both average gradients over ranks; the trainer scales its loss so the sum over ranks is the global loss."""
    if fsdp:
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import fully_shard

        device = next(model.parameters()).device
        mesh = init_device_mesh(device.type, (world_size(),))
        blocks = _block_classes(model)
        for module in list(model.modules()):
            if type(module).__name__ in blocks:
                fully_shard(module, mesh=mesh)
        fully_shard(model, mesh=mesh)
        return model
    from torch.nn.parallel import DistributedDataParallel

    device = next(model.parameters()).device
    # buffers (rotary tables) are not trained: no per-forward broadcast, so eval-mode calls stay collective-free
    return DistributedDataParallel(model, device_ids=[device] if device.type == "cuda" else None,
                                   forward_sync_buffers=False)


def is_sharded_tensor(t: torch.Tensor) -> bool:
    if not active():
        return False
    from torch.distributed.tensor import DTensor

    return isinstance(t, DTensor)


def full_tensor(t: torch.Tensor) -> torch.Tensor:
    """The whole value of an FSDP-sharded tensor (a collective: every rank must call it), else ``t`` itself."""
    return t.full_tensor() if is_sharded_tensor(t) else t


def like_sharded(value: torch.Tensor, ref: torch.Tensor) -> torch.Tensor:
    """``value`` (a whole tensor, the same on every rank) laid out like ``ref`` when ``ref`` is FSDP-sharded."""
    if not is_sharded_tensor(ref):
        return value
    from torch.distributed.tensor import distribute_tensor

    return distribute_tensor(value.to(ref.device, ref.dtype), ref.device_mesh, ref.placements)
