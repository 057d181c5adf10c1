"""Scoring: query gradients, preconditioned once, contracted with every training row's (a, g) pairs.

score(q, n) = sum over layers <P_q, G_n>, P_q = (F + damping I)^-1 G_q. With full-rank P_q the per-sequence
gradient G_n of one layer and one batch is formed transiently ([B, out, in]) and contracted at once; with
``query_rank=r`` the contraction sum_t (g_t^T U)(V^T a_t) never forms it at all.

Under torchrun each rank scores a contiguous, whole-batch slice of every chunk of training rows; the chunk's
columns are gathered in rank order (the original row order) on every rank, and rank 0 alone saves the partial
scores, so chunk boundaries and resume points are those of one process.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from lancet import distributed as dist
from lancet.artifacts import atomic_save_tensors, load_tensors
from lancet.curvature.estimators import per_sequence_grads
from lancet.curvature.fit import Curvature, batches, chunk_part, chunk_stop
from lancet.curvature.modules import Capture, TrackedLayer
from lancet.curvature.task import data_cotangent, forward_logits
from lancet.hardware import autocast, model_device
from lancet.influence.measurement import Measurement, resolve_measurement

log = logging.getLogger(__name__)


@dataclass
class PreconditionedQueries:
    """Per layer either a full [Q, out, in] tensor, or a low-rank pair stacked over queries: U [out, Q*r] and
    V [in, Q*r] with P_q ~ U[:, q*r:(q+1)*r] V[:, q*r:(q+1)*r]^T (stacked so that one GEMM serves every query)."""

    full: dict[str, torch.Tensor]
    low_rank: dict[str, tuple[torch.Tensor, torch.Tensor]]
    n_queries: int
    # [Q] bool: queries whose scores are divided by each training row's gradient norm (cosine estimators; their
    # query side is already unit-norm). None: no query needs it, and no row norm is computed.
    unit_rows: torch.Tensor | None = None
    # per layer, d^-2 of a gradient scale (lancet.influence.gradient_scale): the row norm of a cosine is then that of
    # G_n / d, sum(G_n^2 d^-2), which needs G_n itself (no token Gram shortcut for an elementwise scale)
    row_metric: dict[str, torch.Tensor] | None = None


def concat_queries(pres: list[PreconditionedQueries]) -> PreconditionedQueries:
    """One set of preconditioned queries, method after method (each method's tensors freed as they are joined)."""
    full, low = {}, {}
    for name in list(pres[0].full):
        full[name] = torch.cat([pre.full.pop(name) for pre in pres])
    for name in list(pres[0].low_rank):
        parts = [pre.low_rank.pop(name) for pre in pres]
        low[name] = (torch.cat([u for u, _ in parts], 1), torch.cat([v for _, v in parts], 1))
    n = sum(pre.n_queries for pre in pres)
    unit = None
    if any(pre.unit_rows is not None for pre in pres):
        unit = torch.cat([pre.unit_rows if pre.unit_rows is not None else torch.zeros(pre.n_queries, dtype=torch.bool)
                          for pre in pres])
    metric = next((pre.row_metric for pre in pres if pre.row_metric is not None), None)  # one Influence: one scale
    return PreconditionedQueries(full=full, low_rank=low, n_queries=n, unit_rows=unit, row_metric=metric)


def query_gradients(model, layers: Sequence[TrackedLayer], queries: Sequence[dict[str, Any]], args,
                    measurement: Measurement | None = None,
                    projections: dict[str, dict[str, torch.Tensor]] | None = None) -> dict:
    """G_q = the gradient of each query's measurement (default: its summed response cross-entropy), per layer:
    [Q, out, in]; for the layers in ``projections`` ({layer: {"S": [out, r_S], "A": [in, r_A]}}) P_S^T G_q P_A
    [Q, r_S, r_A] instead, from the projected (a, g) pairs, never forming G_q (as the gradient index stores rows)."""
    measurement = resolve_measurement(measurement if measurement is not None else args.measurement)
    dtype, device = args.stats_dtype, model_device(model)
    projections = {name: {k: v.to(device=device, dtype=dtype) for k, v in sides.items()}
                   for name, sides in (projections or {}).items()}

    def shape(layer: TrackedLayer) -> tuple[int, ...]:
        sides = projections.get(layer.name)
        return layer.shape if sides is None else (sides["S"].shape[1], sides["A"].shape[1])

    grads = {layer.name: torch.zeros(len(queries), *shape(layer), dtype=dtype, device=device) for layer in layers}
    where = {}

    def on_grad(layer, a, g):
        start = where["start"]
        a, g = a.to(dtype), g.to(dtype)
        if layer.name in projections:
            a, g = a @ projections[layer.name]["A"], g @ projections[layer.name]["S"]
        grads[layer.name][start : start + a.shape[0]] += per_sequence_grads(a, g)

    # observe: a measurement that reads a block's output (behaviour) hooks it for these passes only
    with Capture(model, layers, on_grad), measurement.observe(model):
        for start, batch in batches(queries, args.batch_size, padding_side=args.padding_side, device=device):
            where["start"] = start
            with autocast(device, args.bf16):
                logits = forward_logits(model, batch)
            measurement.backward(logits, batch)
    return grads


TRUNCATED_SVD_OVERSAMPLE = 8  # extra range-finder columns (Halko, Martinsson & Tropp 2011)
TRUNCATED_SVD_POWER_ITERATIONS = 2


def truncated_svd(p: torch.Tensor, rank: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Rank-``rank`` factors of a batch p [Q, out, in]: (U S [Q, out, r], V [Q, in, r]). A seeded randomized range
    finder with power iterations costs O(out in r) per query instead of a full SVD's O(out in min(out, in)); when
    rank + oversampling reaches min(out, in) the SVD is taken exactly."""
    k = rank + TRUNCATED_SVD_OVERSAMPLE
    if k >= min(p.shape[-2:]):
        u, s, vh = torch.linalg.svd(p, full_matrices=False)
    else:
        omega = torch.randn(p.shape[-1], k, generator=torch.Generator().manual_seed(seed), dtype=p.dtype).to(p.device)
        q, _ = torch.linalg.qr(p @ omega)
        for _ in range(TRUNCATED_SVD_POWER_ITERATIONS):  # re-orthonormalised each time: rounding would merge columns
            q, _ = torch.linalg.qr(p @ torch.linalg.qr(p.transpose(-1, -2) @ q)[0])
        small, s, vh = torch.linalg.svd(q.transpose(-1, -2) @ p, full_matrices=False)
        u = q @ small
    r = min(rank, s.shape[-1])
    return (u[..., :r] * s[..., None, :r]).contiguous(), vh[..., :r, :].transpose(-1, -2).contiguous()


def gradient_sq_norms(grads: dict[str, torch.Tensor]) -> torch.Tensor:
    """[Q] squared norm of each query's gradient over all layers together."""
    return sum(g.pow(2).sum((1, 2)) for g in grads.values())


def row_sq_norms(a: torch.Tensor, g: torch.Tensor, metric: torch.Tensor | None = None) -> torch.Tensor:
    """[B] |G_n|^2 of one layer without forming G_n = sum_t g_t a_t^T: sum_{t,t'} (g_t.g_t')(a_t.a_t'). With
    ``metric`` [out, in] (a gradient scale's d^-2): sum(G_n^2 metric), from G_n formed for the batch."""
    if metric is not None:
        return (per_sequence_grads(a, g).pow(2) * metric.to(a)).sum((1, 2))
    return ((g @ g.transpose(1, 2)) * (a @ a.transpose(1, 2))).sum((1, 2))


def _preconditioned_layers(curvature: Curvature, grads: dict[str, torch.Tensor], args,
                           divisors: dict[str, torch.Tensor] | None = None):
    """(layer name, P [Q, out, in]) one layer at a time, each raw query gradient dropped as soon as it is used (halves
    peak memory); cosine estimators' queries scaled to unit norm over all layers together. With ``divisors`` (a
    gradient scale d per layer) the query gradient is G_q / d before the norm and the preconditioner, and P is
    divided by d once more: <P / d, G_n> = <P, G_n / d>, so the rows' side of the scale costs the pass nothing."""
    if divisors is not None:
        for name in grads:
            grads[name] = grads[name] / divisors[name]
    scale = None
    if curvature.estimator.unit_gradients:
        scale = gradient_sq_norms(grads).sqrt().clamp_min(torch.finfo(args.stats_dtype).tiny).view(-1, 1, 1)
    for name in list(grads):
        p = curvature.estimator.precondition(curvature.state[name], grads.pop(name), args.damping)
        if divisors is not None:
            p = p / divisors[name]
        yield name, (p / scale if scale is not None else p)


def row_metric(curvature: Curvature, divisors: dict[str, torch.Tensor] | None) -> dict[str, torch.Tensor] | None:
    """d^-2 per layer for the rows' norms of a cosine estimator under a gradient scale; None when not needed."""
    if divisors is None or not curvature.estimator.unit_gradients:
        return None
    return {name: d.pow(-2) for name, d in divisors.items()}


def precondition_queries(curvature: Curvature, grads: dict[str, torch.Tensor], args,
                         divisors: dict[str, torch.Tensor] | None = None) -> PreconditionedQueries:
    """Precondition layer by layer (``_preconditioned_layers``); full rank, or rank ``args.query_rank`` factors."""
    full, low = {}, {}
    n = next(iter(grads.values())).shape[0]
    unit = curvature.estimator.unit_gradients
    for name, p in _preconditioned_layers(curvature, grads, args, divisors):
        if args.query_rank is None:
            full[name] = p
            continue
        u, v = truncated_svd(p, args.query_rank, args.seed)
        # [out, Q*r] and [in, Q*r]: query q owns columns q*r .. (q+1)*r
        low[name] = (u.permute(1, 0, 2).reshape(u.shape[1], -1).contiguous(),
                     v.permute(1, 0, 2).reshape(v.shape[1], -1).contiguous())
    return PreconditionedQueries(full=full, low_rank=low, n_queries=n,
                                 unit_rows=torch.ones(n, dtype=torch.bool) if unit else None,
                                 row_metric=row_metric(curvature, divisors))


def precondition_combined(curvature: Curvature, grads: dict[str, torch.Tensor], coefficients: torch.Tensor, args,
                          into: dict[str, torch.Tensor], divisors: dict[str, torch.Tensor] | None = None) -> bool:
    """Add sum_q C[k, q] P_q to ``into[name]`` ([K, out, in]) for one chunk of queries (``grads`` [c, out, in] per
    layer, ``coefficients`` [K, c]), layer by layer at full rank, each preconditioned gradient dropped as soon as it
    is folded in. Scores are linear in P_q, so scoring the K sums gives C @ (per-query scores) exactly, at the cost
    of K queries however many were folded. Returns whether the estimator uses unit query gradients."""
    for name, p in _preconditioned_layers(curvature, grads, args, divisors):
        part = (coefficients.to(p) @ p.reshape(p.shape[0], -1)).reshape(-1, *p.shape[1:])
        into[name] = into[name] + part if name in into else part
    return curvature.estimator.unit_gradients


def _contract(pre: PreconditionedQueries, name: str, a: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
    """[Q, B] scores of one layer for one batch."""
    if name in pre.low_rank:
        return _low_rank_terms(pre, name, a, g).sum((1, 3)).T
    p = pre.full[name]
    grads = per_sequence_grads(a.to(p.dtype), g.to(p.dtype))
    return p.reshape(p.shape[0], -1) @ grads.reshape(grads.shape[0], -1).T  # a matmul; einsum was ~9x slower


def _low_rank_terms(pre: PreconditionedQueries, name: str, a: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
    """[B, T, Q, r]: (g_t^T U_q)_r (V_q^T a_t)_r, whose sum over r is g_t^T U_q V_q^T a_t. Two GEMMs against the
    stacked factors serve all queries; no [out, in] matrix is formed."""
    u, v = pre.low_rank[name]
    gu = g.to(u.dtype) @ u
    av = a.to(v.dtype) @ v
    return (gu * av).reshape(*a.shape[:2], pre.n_queries, -1)


def score_rows(model, layers: Sequence[TrackedLayer], rows: Sequence[dict[str, Any]], pre: PreconditionedQueries,
               args, *, out_dir: Path | None = None) -> dict[str, torch.Tensor]:
    """Scores [Q, N] (and [Q, N, L] per layer when ``args.per_layer``), resumable by chunk under ``out_dir``."""
    dist.init_from_env()
    sharded = dist.active()
    dtype, device = args.stats_dtype, model_device(model)
    n_layers = len(layers)
    # accumulated on the model's device; moved to the host only for partial saves and at the end
    scores = torch.zeros(pre.n_queries, len(rows), dtype=dtype, device=device)
    per_layer = (torch.zeros(pre.n_queries, len(rows), n_layers, dtype=dtype, device=device) if args.per_layer
                 else None)
    unit = pre.unit_rows is not None and bool(pre.unit_rows.any())
    sq_norm = torch.zeros(len(rows), dtype=dtype, device=device) if unit else None
    index = {layer.name: i for i, layer in enumerate(layers)}
    partial = out_dir / "scores.partial.safetensors" if out_dir is not None else None
    done = 0
    if partial is not None and partial.is_file():
        saved = load_tensors(partial)
        done = int(saved["rows_done"])
        scores = saved["scores"].to(device)
        if per_layer is not None and "per_layer" in saved:
            per_layer = saved["per_layer"].to(device)
        if sq_norm is not None:
            sq_norm = saved["row_sq_norm"].to(device)
        log.info("resuming scoring at row %d of %d", done, len(rows))
    where = {}

    def on_grad(layer, a, g):
        start = where["start"]
        s = _contract(pre, layer.name, a, g).to(dtype)
        scores[:, start : start + a.shape[0]] += s
        if sq_norm is not None:
            metric = pre.row_metric.get(layer.name) if pre.row_metric is not None else None
            sq_norm[start : start + a.shape[0]] += row_sq_norms(a.to(dtype), g.to(dtype), metric)
        if per_layer is not None:
            per_layer[:, start : start + a.shape[0], index[layer.name]] += s

    model.eval()
    bar = tqdm(total=len(rows), initial=done, desc=f"{args.method} scores",
               disable=not args.progress or not dist.is_main())
    with Capture(model, layers, on_grad):
        while done < len(rows):
            stop = chunk_stop(done, args, len(rows))
            lo, hi = chunk_part(done, stop, args.batch_size) if sharded else (done, stop)
            for start, batch in batches(rows, args.batch_size, lo, hi, args.padding_side, device):
                where["start"] = start
                with autocast(device, args.bf16):
                    logits = forward_logits(model, batch)
                logits.backward(data_cotangent(logits, batch["labels"]))
                if not sharded:
                    bar.update(batch["input_ids"].shape[0])
            if sharded:
                scores[:, done:stop] = dist.gather_rows(scores[:, lo:hi], stop - done, dim=1)
                if per_layer is not None:
                    per_layer[:, done:stop] = dist.gather_rows(per_layer[:, lo:hi], stop - done, dim=1)
                if sq_norm is not None:
                    sq_norm[done:stop] = dist.gather_rows(sq_norm[lo:hi], stop - done, dim=0)
                bar.update(stop - done)
            done = stop
            if partial is not None and done < len(rows) and dist.is_main():
                tensors = {"scores": scores, "rows_done": torch.tensor(done)}
                if per_layer is not None:
                    tensors["per_layer"] = per_layer
                if sq_norm is not None:
                    tensors["row_sq_norm"] = sq_norm
                atomic_save_tensors(partial, tensors)
    bar.close()
    scores = scores.cpu()
    per_layer = per_layer.cpu() if per_layer is not None else None
    if sq_norm is not None:  # cosine: the query side is unit-norm already
        inv = 1.0 / sq_norm.cpu().sqrt().clamp_min(torch.finfo(dtype).tiny)
        scores[pre.unit_rows] *= inv
        if per_layer is not None:
            per_layer[pre.unit_rows] *= inv.unsqueeze(-1)
    result = {"scores": scores}
    if per_layer is not None:
        result["per_layer"] = per_layer
    return result


def token_scores(model, layers: Sequence[TrackedLayer], rows: Sequence[dict[str, Any]], pre: PreconditionedQueries,
                 args) -> list[torch.Tensor]:
    """Per-token scores [Q, T_n] of each row: the row's score split over the positions whose activations carry
    it, s_t = sum_layers g_t^T P_q a_t (they sum to the row's score)."""
    out: list[torch.Tensor] = []
    where = {}
    device = model_device(model)

    def on_grad(layer, a, g):
        if layer.name in pre.low_rank:
            s = _low_rank_terms(pre, layer.name, a, g).sum(-1).permute(2, 0, 1)
        else:
            p = pre.full[layer.name]
            s = ((a.to(p.dtype).unsqueeze(0) @ p.transpose(1, 2).unsqueeze(1)) * g.to(p.dtype)).sum(-1)
        where["acc"] = s if where.get("acc") is None else where["acc"] + s
        if pre.unit_rows is not None:
            metric = pre.row_metric.get(layer.name) if pre.row_metric is not None else None
            where["sq"] += row_sq_norms(a.to(s.dtype), g.to(s.dtype), metric)

    with Capture(model, layers, on_grad):
        for _, batch in batches(rows, 1, device=device):
            where["acc"], where["sq"] = None, 0.0
            with autocast(device, args.bf16):
                logits = forward_logits(model, batch)
            logits.backward(data_cotangent(logits, batch["labels"]))
            acc = where["acc"][:, 0, :].detach().cpu()
            if pre.unit_rows is not None:  # cosine: the row's share, divided by its gradient norm like its score
                acc[pre.unit_rows] /= where["sq"].cpu().sqrt().clamp_min(torch.finfo(acc.dtype).tiny)[0]
            out.append(acc)
    return out
