"""Options of an influence run: a validated dataclass with JSON round-trip (kronfluence-style)."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any

import torch

from lancet.constants import DEFAULT_METHOD, GRADIENT_DEFAULT_METHOD
from lancet.curvature.estimators import METHODS
from lancet.curvature.task import FISHER_MODES
from lancet.errors import LancetError
from lancet.options import check_option_types, options_from_json

DTYPES = {"float32": torch.float32, "float64": torch.float64, "bfloat16": torch.bfloat16}


def default_method(measurement: str = "answer", needs_gradients: bool = False) -> str:
    """The method a run uses when it names none: ``DEFAULT_METHOD`` (RepSim: chosen by the contamination suite's
    rule, docs/method.md 5.6), or ``GRADIENT_DEFAULT_METHOD`` (LinFAC) when the run asks for something only a gradient
    method has: a query ``measurement`` other than the whole answer, or (``needs_gradients``) an index, a contrast
    response, checkpoints or Adam's normalisation."""
    return GRADIENT_DEFAULT_METHOD if needs_gradients or measurement != "answer" else DEFAULT_METHOD


@dataclass
class InfluenceArgs:
    method: str = DEFAULT_METHOD  # lancet.constants: chosen by the contamination suite's rule
    damping: float | None = None  # None: 0.1 x the mean eigenvalue of each layer
    modules: str | list[str] = "blocks"  # "blocks", "blocks+lm_head", or regexes over module names
    fisher: str = "sampled"  # "sampled" (true Fisher = GGN, one label draw per token) or "empirical"
    fisher_samples: int = 1  # label draws per token in curvature passes
    batch_size: int = 8
    query_rank: int | None = None  # keep this many singular directions of each preconditioned query gradient
    bf16: bool = False  # bf16 autocast for forward/backward; statistics stay in `dtype`
    dtype: str = "float32"  # dtype of statistics, factors and scores ("float64" in exactness tests)
    per_layer: bool = False  # also keep scores per tracked layer
    chunk_rows: int = 256  # rows per resumable chunk of a pass over the training data
    covariance_max_rows: int | None = None  # fit the covariance pass on a seeded subset of this many rows
    lambda_max_rows: int | None = None  # fit the eigenvalue correction on a seeded subset of this many rows
    padding_side: str = "right"  # scores do not depend on it (positions are counted over real tokens)
    # LinFAC: drop range directions with eigenvalue below this fraction of the largest (None: rounding level,
    # width x eps x 10, which also drops real directions of steep factors; docs/method.md §2.3)
    range_rtol: float | None = None
    # what the query gradient differentiates (lancet.influence.measurement): "answer", "first_tokens:K", or the
    # NAME@VERSION of a user Measurement passed to Influence(..., measurement=...)
    measurement: str = "answer"
    # optimizer-aware normalisation (lancet.influence.gradient_scale): "none", or "adam@<digest>" of the GradientScale
    # passed to Influence(..., gradient_scale=...): every gradient divided by Adam's sqrt(v_hat) + eps
    gradient_scale: str = "none"
    seed: int = 0
    progress: bool = True

    # per_layer is hashed: a stored scores artifact (or a partial one) made without it has no per-layer tensor
    _UNHASHED = ("progress", "chunk_rows", "padding_side")

    def __post_init__(self) -> None:
        check_option_types(self, "influence")  # before the range checks: "0.1" >= 0 is a TypeError
        if self.method not in METHODS:
            raise LancetError(f"unknown influence method {self.method!r}; choose from {', '.join(METHODS)}")
        if self.damping is not None and not (self.damping >= 0 and math.isfinite(self.damping)):
            raise LancetError(f"invalid damping={self.damping!r}: use a number >= 0, or None for the heuristic")
        if self.fisher not in FISHER_MODES:
            raise LancetError(f"invalid fisher={self.fisher!r}; choose from {', '.join(FISHER_MODES)}")
        if self.dtype not in DTYPES:
            raise LancetError(f"invalid dtype={self.dtype!r}; choose from {', '.join(DTYPES)}")
        for key in ("covariance_max_rows", "lambda_max_rows"):
            if getattr(self, key) is not None and getattr(self, key) < 1:
                raise LancetError(f"invalid {key}={getattr(self, key)!r}: must be >= 1 or None")
        for key in ("fisher_samples", "batch_size", "chunk_rows"):
            if getattr(self, key) < 1:
                raise LancetError(f"invalid {key}={getattr(self, key)!r}: must be >= 1")
        if self.padding_side not in ("left", "right"):
            raise LancetError(f"invalid padding_side={self.padding_side!r}; choose left or right")
        if self.range_rtol is not None and not (0 <= self.range_rtol < 1):
            raise LancetError(f"invalid range_rtol={self.range_rtol!r}: use 0 <= range_rtol < 1, or None")
        if self.query_rank is not None and self.query_rank < 1:
            raise LancetError(f"invalid query_rank={self.query_rank!r}: must be >= 1 or None")
        from lancet.influence.measurement import check_spec

        check_spec(self.measurement)
        if self.gradient_scale != "none" and not self.gradient_scale.startswith("adam@"):
            raise LancetError(f"invalid gradient_scale={self.gradient_scale!r}: 'none', or set by "
                              "Influence(..., gradient_scale=GradientScale.from_checkpoint(DIR))")

    @property
    def torch_dtype(self) -> torch.dtype:
        return DTYPES[self.dtype]

    @property
    def stats_dtype(self) -> torch.dtype:
        """Sums and scores are never accumulated in bf16 (too few mantissa bits): float32 at least."""
        return torch.float32 if self.torch_dtype == torch.bfloat16 else self.torch_dtype

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> InfluenceArgs:
        return options_from_json(cls, data, "influence")

    def fingerprint_dict(self, keys: tuple[str, ...] | None = None) -> dict[str, Any]:
        data = {k: v for k, v in self.to_json().items() if k not in self._UNHASHED}
        # defaults of options added later are not hashed: artifacts stored before they existed stay valid
        if data["measurement"] == "answer":
            del data["measurement"]
        if data["gradient_scale"] == "none":
            del data["gradient_scale"]
        for key in ("covariance_max_rows", "range_rtol"):
            if data[key] is None:
                del data[key]
        return data if keys is None else {k: data[k] for k in keys if k in data}
