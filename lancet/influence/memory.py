"""A memory estimate printed before a run, from the tracked layers' shapes alone (nothing is allocated)."""

from __future__ import annotations

from dataclasses import dataclass

from lancet.curvature.estimators import GRADIENT_FREE_METHODS, get_estimator
from lancet.curvature.modules import find_tracked_layers


@dataclass
class MemoryEstimate:
    method: str
    n_layers: int
    factors_bytes: int  # curvature state kept for scoring
    per_query_bytes: int  # one preconditioned query gradient
    transient_bytes: int  # per-row gradients of the largest layer for one batch

    def total(self, n_queries: int) -> int:
        return self.factors_bytes + n_queries * self.per_query_bytes + self.transient_bytes

    def describe(self, n_queries: int = 16) -> str:
        gib = 1024**3
        return (f"memory estimate ({self.method}, {self.n_layers} layers): curvature {self.factors_bytes / gib:.2f} "
                f"GiB + {self.per_query_bytes / gib:.2f} GiB per query + {self.transient_bytes / gib:.2f} GiB per "
                f"batch = {self.total(n_queries) / gib:.2f} GiB for {n_queries} queries (plus the model and its "
                "activations)")


def estimate_memory(model, args) -> MemoryEstimate:
    itemsize = 8 if args.dtype == "float64" else 4
    est = get_estimator(args.method) if args.method not in GRADIENT_FREE_METHODS else None
    layers = find_tracked_layers(model, args.modules)
    factors = per_query = biggest = 0
    for layer in layers:
        out, inp = layer.shape
        if est is not None and "covariance" in est.passes:
            factors += out * out + inp * inp
        if est is not None and ("lambda" in est.passes or "fisher" in est.passes):
            factors += out * inp
        rank = args.query_rank
        per_query += (out + inp) * rank if rank else out * inp
        biggest = max(biggest, out * inp)
    return MemoryEstimate(args.method, len(layers), factors * itemsize, per_query * itemsize,
                          args.batch_size * biggest * itemsize)
