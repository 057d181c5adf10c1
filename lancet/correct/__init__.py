"""Correction: IBO (influence-based Bregman optimisation) and the baselines, one registered method each.

    out = Correction(model, tok, CorrectionArgs(method="ibo"), train_args).run(CorrectionData(train=rows,
                                                                                              scores=ranking))

Each method (``methods.CORRECTIONS``) builds the items it trains on (IBO pairs from a ranking, forget rows, safe
rows or human preference pairs) and its trainer (``trainers``); every method gets the same budget: the optimizer
steps and batch size of the one ``TrainArgs``. ``correct`` is the same for a model on disk, by name.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch

from lancet.artifacts import load_tensors
from lancet.constants import DEFAULT_MAX_LENGTH
from lancet.correct.arguments import METHOD_ALIASES, CorrectionArgs
from lancet.correct.methods import (
    CORRECTIONS,
    SUMMARY_FILE,
    Correction,
    CorrectionData,
    CorrectionMethod,
    check_inputs,
    get_correction,
    uninvolved_rows,
)
from lancet.data.records import Record
from lancet.errors import ArtifactError, LancetError
from lancet.train import TrainArgs

METHODS = tuple(CORRECTIONS) + tuple(METHOD_ALIASES)  # what --method accepts: the registry and two settings' names


def load_run_scores(run_dir: str | Path, train_ids: Sequence[str], scores_method: str | None = None
                    ) -> tuple[torch.Tensor, str]:
    """The aggregated influence scores [N] of a ``lancet attribute`` run directory, checked against ``train_ids``.

    Uses ``ranking-<method>.safetensors`` (tensor ``aggregate_normalized_mean``) and ``influence-<method>.json``
    (its ``ids``). With several rankings in the directory ``scores_method`` must say which.
    """
    run = Path(run_dir)
    if not run.is_dir():
        raise ArtifactError(f"{run}: no such run directory (write one with `lancet attribute`)")
    if scores_method is None:
        found = sorted(p.name[len("ranking-") : -len(".safetensors")] for p in run.glob("ranking-*.safetensors"))
        if not found:
            raise ArtifactError(f"{run}: no ranking-*.safetensors (write one with `lancet attribute`)")
        if len(found) > 1:
            raise LancetError(f"{run}: several rankings ({', '.join(found)}); choose one with --scores-method")
        scores_method = found[0]
    ranking, summary_path = run / f"ranking-{scores_method}.safetensors", run / f"influence-{scores_method}.json"
    tensors = load_tensors(ranking)
    if "aggregate_normalized_mean" not in tensors:
        raise ArtifactError(f"{ranking}: no tensor 'aggregate_normalized_mean'")
    scores = tensors["aggregate_normalized_mean"].float()
    if not torch.isfinite(scores).all():
        raise ArtifactError(f"{ranking}: {int((~torch.isfinite(scores)).sum())} of {scores.numel()} scores are NaN or "
                            "infinite; rerun `lancet attribute` into a new directory")
    try:
        ids = json.loads(summary_path.read_text())["ids"]
    except (OSError, json.JSONDecodeError, KeyError, TypeError) as exc:
        raise ArtifactError(f"{summary_path}: cannot read the row ids of the scores ({exc})") from exc
    if list(ids) != list(train_ids) or scores.numel() != len(train_ids):
        first = next((i for i, (a, b) in enumerate(zip(ids, train_ids, strict=False)) if a != b),
                     min(len(ids), len(train_ids)))
        raise LancetError(f"{summary_path}: scores are for other training rows ({len(ids)} ids vs {len(train_ids)} "
                          f"rows, first difference at row {first + 1}); pass the --train given to `lancet attribute`")
    return scores, scores_method


def correct(
    model_spec: str,
    train_records: Sequence[Record],
    scores_agg: torch.Tensor,
    *,
    method: str,
    train_args: TrainArgs,
    correction_args: CorrectionArgs | None = None,
    iq_records: Sequence[Record] | None = None,
    safe_records: Sequence[Record] | None = None,
    pref_pairs: Sequence[tuple[Record, Record]] | None = None,
    culprit_mask: torch.Tensor | None = None,
    preferred_mask: torch.Tensor | None = None,
    flagged_mask: torch.Tensor | None = None,
    retain_records: Sequence[Record] | None = None,
    max_length: int = DEFAULT_MAX_LENGTH,
    trust_remote_code: bool = False,
    on_checkpoint: Callable[[int, Any], None] | None = None,
) -> Path:
    """``Correction(...).run(...)`` for a model on disk: loads ``model_spec`` (where ``train_args.device`` says) and
    corrects it with ``method`` (a registered method or one of ``METHOD_ALIASES``). The keyword arguments are the
    fields of :class:`CorrectionData`."""
    from lancet.models.loading import load_model

    cargs = correction_args or CorrectionArgs(method=method)
    alias = METHOD_ALIASES.get(method, {})
    if cargs.method != CorrectionArgs(method=method).method or any(getattr(cargs, k) != v for k, v in alias.items()):
        raise LancetError(f"method {method!r} differs from correction_args.method {cargs.method!r}")
    data = CorrectionData(train=train_records, scores=scores_agg, iqs=iq_records or (), safe=safe_records or (),
                          pairs=pref_pairs or (), culprit_mask=culprit_mask, preferred_mask=preferred_mask,
                          flagged_mask=flagged_mask, retain=retain_records or ())
    check_inputs(cargs, data)  # before loading the model: a missing input is one line, at once
    model, tokenizer = load_model(model_spec, trust_remote_code=trust_remote_code, device=train_args.load_device)
    return Correction(model, tokenizer, cargs, train_args, max_length=max_length,
                      base_spec=model_spec).run(data, on_checkpoint)


__all__ = ["CORRECTIONS", "METHODS", "METHOD_ALIASES", "SUMMARY_FILE", "Correction", "CorrectionArgs",
           "CorrectionData", "CorrectionMethod", "check_inputs", "correct", "get_correction", "load_run_scores",
           "uninvolved_rows"]
