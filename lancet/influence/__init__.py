"""Influence: which training rows drive the behaviour in the influence queries (IQs).

    scores = Influence(model, method="linfac", tokenizer=tok).scores(train, iqs)["scores"]   # [n_queries, n_train]

Positive scores: up-weighting the row makes the IQ's undesirable answer more likely (the row drives it); negative:
the row counters it. ``Influence`` (lancet.influence.engine) is the one entry point: fit curvature once
(artifact), score many query sets, several estimators in one pass (``scores_by_method``), token scores.
``pairwise_scores`` and ``score_methods`` are deprecated wrappers.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from lancet.constants import JOINT_SCORING_MAX_BYTES
from lancet.curvature.estimators import METHODS
from lancet.influence.arguments import InfluenceArgs
from lancet.influence.behaviour import BehaviourDirection, behaviour_scores
from lancet.influence.checkpoints import CheckpointInfluence
from lancet.influence.engine import Influence
from lancet.influence.gradient_scale import GradientScale
from lancet.influence.index import IndexArgs
from lancet.influence.measurement import Measurement
from lancet.influence.rows import as_rows

__all__ = ["METHODS", "BehaviourDirection", "CheckpointInfluence", "GradientScale", "IndexArgs", "Influence",
           "InfluenceArgs", "Measurement", "as_rows", "behaviour_scores", "pairwise_scores", "score_methods"]


def score_methods(model, train, queries, methods: Sequence[str], args: InfluenceArgs | None = None, *,
                  out_dir: str | Path | None = None, max_joint_bytes: int = JOINT_SCORING_MAX_BYTES,
                  measurement: Measurement | None = None) -> dict[str, dict[str, torch.Tensor]]:
    """Deprecated: ``Influence(model, args, out_dir=...).scores_by_method(train, queries, methods)``."""
    warnings.warn("score_methods is deprecated; use Influence(model, args).scores_by_method(train, queries, methods)",
                  DeprecationWarning, stacklevel=2)
    run = Influence(model, args or InfluenceArgs(), out_dir=out_dir, measurement=measurement)
    return run.scores_by_method(train, queries, methods, max_joint_bytes=max_joint_bytes)


def pairwise_scores(model, train: Sequence[dict[str, Any]], queries: Sequence[dict[str, Any]],
                    method: str = "linfac", damping: float | None = None, measurement: Measurement | None = None,
                    **options) -> torch.Tensor:
    """Deprecated: ``Influence(model, method=..., ...).scores(train, queries)["scores"]``, [n_queries, n_train]."""
    warnings.warn('pairwise_scores is deprecated; use Influence(model, method=...).scores(train, queries)["scores"]',
                  DeprecationWarning, stacklevel=2)
    if isinstance(measurement, str):
        options["measurement"], measurement = measurement, None
    args = InfluenceArgs(method=method, damping=damping, **options)
    return Influence(model, args, measurement=measurement).scores(train, queries)["scores"]
