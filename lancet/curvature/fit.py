"""Fitting curvature: the passes an estimator declares, over the training data, in resumable chunks.

Each pass accumulates sums over chunks of ``chunk_rows`` rows; after every chunk the running sums are saved
atomically, so a killed run resumes at the next chunk and ends bit-identical to an uninterrupted one (the label
draws of the sampled Fisher are seeded per row, not by position in the run).

Under torchrun every rank takes a contiguous, whole-batch slice of each chunk, so chunk boundaries (and resume
points) stay those of one process; the per-chunk sums of all ranks are all-reduced before they join the running
sums, and only rank 0 writes the partial and final files.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from lancet import distributed as dist
from lancet.artifacts import atomic_save_tensors, check_or_write_meta, hash_json, load_tensors
from lancet.curvature.estimators import Estimator, Stats, get_estimator
from lancet.curvature.modules import Capture, TrackedLayer, find_tracked_layers
from lancet.curvature.task import fisher_cotangent, forward_logits
from lancet.data.tokenize import collate
from lancet.errors import LancetError, NonFiniteError
from lancet.hardware import autocast, model_device

log = logging.getLogger(__name__)
PAD_ID = 0  # any id works: padded positions are masked out of attention and of every statistic


# the InfluenceArgs options that shape a fitted curvature: two runs that agree on these can share one
CURVATURE_OPTIONS = ("method", "modules", "fisher", "fisher_samples", "dtype", "bf16", "seed", "batch_size",
                     "covariance_max_rows", "lambda_max_rows", "range_rtol")


def batches(rows: Sequence[dict[str, Any]], batch_size: int, start: int = 0, stop: int | None = None,
            padding_side: str = "right", device: torch.device | None = None
            ) -> Iterator[tuple[int, dict[str, torch.Tensor]]]:
    """(first row index, padded batch on ``device``) over rows[start:stop]. ``batch["cpu_labels"]`` keeps the
    labels on the host, so that masks needed on the host (the Fisher draws) cost no device sync."""
    stop = len(rows) if stop is None else stop
    for i in range(start, stop, batch_size):
        batch = collate([rows[j] for j in range(i, min(i + batch_size, stop))], PAD_ID, padding_side)
        if device is not None and device.type != "cpu":
            labels = batch["labels"]
            batch = {k: v.to(device, non_blocking=True) for k, v in batch.items()}
            batch["cpu_labels"] = labels
        yield i, batch


def chunk_stop(done: int, args, n: int) -> int:
    """End of the chunk starting at ``done``, a whole number of batches long, so that chunked and resumed runs
    group rows into exactly the same batches as an uninterrupted one (and sum in the same order)."""
    size = -(-args.chunk_rows // args.batch_size) * args.batch_size
    return min(done + size, n)


def chunk_part(done: int, stop: int, batch_size: int) -> tuple[int, int]:
    """Under torchrun, this rank's rows of the chunk [done, stop): a contiguous run of whole batches (empty when
    there are fewer batches than ranks)."""
    lo, hi = dist.shard_range(stop - done, batch_size)
    return done + lo, done + hi


def row_seed(seed: int, pass_index: int, sample: int, row: int) -> int:
    return (seed * 1_000_003 + pass_index * 10_007 + sample) * 1_000_000_007 + row


def subsample(rows: Sequence[Any], limit: int | None, seed: int) -> Sequence[Any]:
    """A seeded subset of ``limit`` rows in their original order (all rows when limit is None or larger)."""
    if limit is None or limit >= len(rows):
        return rows
    keep = sorted(torch.randperm(len(rows), generator=torch.Generator().manual_seed(seed))[:limit].tolist())
    return [rows[i] for i in keep]


def data_fingerprint(rows: Sequence[dict[str, Any]]) -> str:
    return hash_json([[list(r["input_ids"]), list(r["labels"])] for r in rows])


class Curvature:
    """Fitted per-layer state of one estimator; ``precondition`` applies (F + damping I)^-1 per layer."""

    def __init__(self, estimator: Estimator, layers: list[TrackedLayer], state: dict[str, Stats]):
        self.estimator, self.layers, self.state = estimator, layers, state

    def precondition(self, grads: dict[str, torch.Tensor], damping: float | None) -> dict[str, torch.Tensor]:
        return {name: self.estimator.precondition(self.state[name], g, damping) for name, g in grads.items()}

    def damping_used(self, damping: float | None) -> dict[str, float]:
        return {name: self.estimator.damping_for(self.state[name], damping) for name in self.state}

    def to_tensors(self) -> dict[str, torch.Tensor]:
        return {f"{layer}::{key}": t for layer, st in self.state.items() for key, t in st.items()}


def fit_curvature(model, train: Sequence[dict[str, Any]], args, *, out_dir: str | Path | None = None,
                  model_fp: str | None = None) -> Curvature:
    """Run the estimator's passes over ``train`` (dicts with input_ids/labels). With ``out_dir``, the fitted
    state and each pass's partial sums are stored there and reused on a matching rerun."""
    dist.init_from_env()
    estimator = get_estimator(args.method)
    estimator.range_rtol = getattr(args, "range_rtol", None)
    layers = find_tracked_layers(model, args.modules)
    state: dict[str, Stats] = {layer.name: {} for layer in layers}
    out = Path(out_dir) if out_dir is not None else None
    if out is not None and estimator.passes:
        from lancet.artifacts import model_fingerprint

        meta = {"kind": "curvature", "method": args.method, "format": estimator.format_version,
                "model": model_fp or model_fingerprint(model),
                "data": data_fingerprint(train), "n_rows": len(train), "layers": [layer.name for layer in layers],
                "args": args.fingerprint_dict(CURVATURE_OPTIONS)}
        check_or_write_meta(out / "meta.json", meta, write=dist.is_main())
        final = out / "curvature.safetensors"
        found = final.is_file()
        dist.barrier()  # every rank has decided before rank 0 can write anything new
        if found:
            return Curvature(estimator, layers, _unflatten(load_tensors(final), model_device(model)))
    first = 0
    if out is not None and estimator.passes and not dist.active():
        borrowed = _borrow_first_pass(estimator, out, meta, model_device(model))
        if borrowed is not None:
            state, first = borrowed, 1
    try:
        for pass_index, pass_name in enumerate(estimator.passes):
            if pass_index < first:
                continue
            limit = args.lambda_max_rows if pass_name == "lambda" else args.covariance_max_rows
            rows = subsample(train, limit, args.seed)
            stats = _run_pass(model, layers, estimator, pass_index, pass_name, rows, state, args, out)
            state = _finish(estimator, pass_name, stats, state)
    except NonFiniteError:
        # NaN sums cannot be resumed from, and their fingerprint would refuse the rerun with repaired weights
        if out is not None and estimator.passes and dist.is_main():
            for stale in [*out.glob("pass-*.partial.safetensors"), out / "meta.json"]:
                stale.unlink(missing_ok=True)
        raise
    curvature = Curvature(estimator, layers, state)
    if out is not None and estimator.passes:
        if dist.is_main():
            atomic_save_tensors(out / "curvature.safetensors", curvature.to_tensors())
            for partial in out.glob("pass-*.partial.safetensors"):
                partial.unlink()
        dist.barrier()
    return curvature


FIRST_PASS_ARGS = ("modules", "fisher", "fisher_samples", "dtype", "bf16", "seed", "batch_size",
                   "covariance_max_rows")


def _borrow_first_pass(estimator: Estimator, out: Path, meta: dict, device: torch.device
                       ) -> dict[str, Stats] | None:
    """The first pass's state from a finished sibling fit (``out``'s parent holds one directory per method) of
    the same family on the same model, rows, layers and first-pass options: kfac after ekfac (or the reverse)
    skips the covariance pass. Its sums and eigendecompositions are the same computation, so the state is the
    one the pass would produce here (bit for bit on the same machine)."""
    if estimator.first_pass_family is None or not out.parent.is_dir():
        return None
    same = ("model", "data", "n_rows", "layers")
    for sibling in sorted(out.parent.iterdir()):
        final = sibling / "curvature.safetensors"
        if sibling == out or not final.is_file():
            continue
        try:
            other = json.loads((sibling / "meta.json").read_text())
            other_estimator = get_estimator(other["method"])
        except (OSError, ValueError, KeyError, LancetError):
            continue
        if (other_estimator.first_pass_family != estimator.first_pass_family
                or other.get("format") != other_estimator.format_version
                or any(other.get(k) != meta[k] for k in same)
                or any(other.get("args", {}).get(k) != meta["args"].get(k) for k in FIRST_PASS_ARGS)):
            continue
        try:
            state = _unflatten(load_tensors(final), device)
            borrowed = {name: {k: state[name][k] for k in estimator.first_pass_keys} for name in meta["layers"]}
        except (LancetError, KeyError):  # unreadable: run the pass instead
            continue
        log.info("%s: %s pass taken from %s", meta["method"], estimator.passes[0], sibling)
        return borrowed
    return None


def _finish(estimator: Estimator, pass_name: str, stats: dict[str, Stats], state: dict[str, Stats]
            ) -> dict[str, Stats]:
    """Turn a pass's sums into layer state. Under torchrun each rank finishes a contiguous share of the layers (the
    eigendecompositions) and the results are broadcast from their owners, so every rank holds the same factors,
    each computed once."""
    for name, layer_stats in stats.items():  # NaN/inf activations or gradients would poison every score silently
        bad = [k for k, v in layer_stats.items() if isinstance(v, torch.Tensor) and not torch.isfinite(v).all()]
        if bad:
            raise NonFiniteError(f"{pass_name} pass: non-finite {bad[0]} statistics in layer {name} (NaN or inf in "
                                 "the model's activations or gradients; check the weights and the data)")
    if not dist.active():
        return estimator.finish_all(pass_name, stats, state)
    names = list(state)
    lo, hi = dist.shard_range(len(names))
    mine = names[lo:hi]
    done = estimator.finish_all(pass_name, {n: stats[n] for n in mine}, {n: state[n] for n in mine}) if mine else {}
    shared = dist.share_by_owner(done)
    return {name: shared[name] for name in names}


def _unflatten(flat: dict[str, torch.Tensor], device: torch.device | None = None) -> dict[str, Stats]:
    state: dict[str, Stats] = {}
    for key, t in flat.items():
        layer, name = key.rsplit("::", 1)
        state.setdefault(layer, {})[name] = t if device is None else t.to(device)
    return state


def _on(stats: Stats, device: torch.device) -> Stats:
    return {k: v.to(device) for k, v in stats.items()}


def _run_pass(model, layers, estimator, pass_index, pass_name, train, state, args, out) -> dict[str, Stats]:
    dtype, device = args.stats_dtype, model_device(model)
    stats = {layer.name: _on(estimator.new_stats(pass_name, layer.shape, dtype, state[layer.name]), device)
             for layer in layers}
    partial = out / f"pass-{pass_name}.partial.safetensors" if out is not None else None
    done = 0
    if partial is not None and partial.is_file():
        saved = _unflatten(load_tensors(partial), device)
        done = int(saved.pop("__progress__")["rows_done"])
        stats = saved
        log.info("resuming %s pass at row %d of %d", pass_name, done, len(train))
    mask_holder: dict[str, torch.Tensor] = {}
    weight = 1.0 / args.fisher_samples
    sharded = dist.active()
    # one process adds straight into the running sums; under torchrun each chunk is summed apart, then all-reduced
    acc = stats if not sharded else {
        layer.name: _on(estimator.new_stats(pass_name, layer.shape, dtype, state[layer.name]), device)
        for layer in layers}

    def on_grad(layer: TrackedLayer, a: torch.Tensor, g: torch.Tensor) -> None:
        estimator.accumulate(pass_name, acc[layer.name], state[layer.name], a, g, mask_holder["mask"], weight)

    model.eval()
    bar = tqdm(total=len(train), initial=done, desc=f"{args.method} {pass_name}",
               disable=not args.progress or not dist.is_main())
    with Capture(model, layers, on_grad):
        while done < len(train):
            stop = chunk_stop(done, args, len(train))
            lo, hi = chunk_part(done, stop, args.batch_size) if sharded else (done, stop)
            for start, batch in batches(train, args.batch_size, lo, hi, args.padding_side, device):
                mask_holder["mask"] = batch["attention_mask"]
                with autocast(device, args.bf16):
                    logits = forward_logits(model, batch)
                for k in range(args.fisher_samples):
                    seeds = [row_seed(args.seed, pass_index, k, start + b) for b in range(logits.shape[0])]
                    cot = fisher_cotangent(logits, batch["labels"], args.fisher, seeds, batch.get("cpu_labels"))
                    logits.backward(cot, retain_graph=k < args.fisher_samples - 1)
                if not sharded:
                    bar.update(batch["input_ids"].shape[0])
            if sharded:
                chunk = [t for st in acc.values() for t in st.values()]
                dist.all_reduce_sum_many_(chunk)
                for name, st in acc.items():
                    for key, t in st.items():
                        stats[name][key] += t
                        t.zero_()
                bar.update(stop - done)
            done = stop
            if partial is not None and done < len(train) and dist.is_main():
                flat = {f"{n}::{k}": t for n, st in stats.items() for k, t in st.items()}
                flat["__progress__::rows_done"] = torch.tensor(done)
                atomic_save_tensors(partial, flat)
    bar.close()
    return stats


