"""Correction: IBO (influence-based Bregman optimisation) and the baselines, one trainer per method.

``correct`` builds the items a method trains on (IBO pairs from influence scores, forget rows, safe rows or human
preference pairs) and runs its trainer; every method gets the same budget: the optimizer steps and batch size of
the one ``TrainArgs``.
"""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

import torch

from lancet import distributed as dist
from lancet.artifacts import atomic_write_json, load_tensors
from lancet.constants import DEFAULT_MAX_LENGTH, IGNORE_INDEX
from lancet.correct.losses import GENERATORS
from lancet.correct.pairs import PAIRINGS, build_ibo_pairs, forget_items, preference_items, select_rows
from lancet.correct.trainers import RETAIN_NORMALIZATIONS, RETAIN_TERMS
from lancet.data.records import Record
from lancet.errors import ArtifactError, LancetError
from lancet.train import TrainArgs

log = logging.getLogger(__name__)

METHODS = ("ibo", "ibo_random", "ibo_oracle", "dpo", "sft", "ga", "ga_retain", "npo")
SUMMARY_FILE = "lancet_correction.json"


@dataclass
class CorrectionArgs:
    """Options of a correction run; validated on creation and JSON round-trippable (``to_json``/``from_json``).

    ``retain_weight`` weighs the retain NLL of ``ga_retain`` and of ``npo`` when safe rows are given (NPO+RT), and
    IBO's retain term; ``ga`` is always plain gradient ascent. ``max_pairs`` caps the IBO pairs (seeded subsample).

    IBO's utility anchors (docs/method.md §3.6; off by default until the correction frontier has measured them):
    ``chosen_nll_weight`` × the preferred rows' mean token NLL (RPO); ``retain`` = ``nll`` or ``kl`` on the
    ``retain_rows`` rows the ranking calls uninvolved (smallest |score|; default ``top_k`` of them), or on the
    ``retain_records`` given to :func:`correct` (e.g. the model's own answers to ordinary prompts), all of them;
    ``retain_normalize`` = ``tokens`` (mean over their tokens) or ``rows`` (summed over each row's tokens, mean over
    rows: a sequence-level KL). ``dpo`` takes ``chosen_nll_weight`` and a retain term on given rows too.
    ``same_prompt`` pairs a dispreferred row with a lower-scored answer to its own prompt when the data has one.
    """

    method: str = "ibo"
    beta: float = 0.1
    generator: str = "logistic"
    alpha: float = 0.5
    top_k: int = 50
    pairing: str = "rank"
    target_temperature: float = 0.0
    include_iqs: bool = True
    retain_weight: float = 1.0
    max_pairs: int | None = None
    chosen_nll_weight: float = 0.0
    retain: str = "none"
    retain_rows: int | None = None
    retain_normalize: str = "tokens"
    same_prompt: bool = True
    seed: int = 0

    def __post_init__(self) -> None:
        checks = {
            "method": self.method in METHODS,
            "beta": isinstance(self.beta, int | float) and math.isfinite(self.beta) and self.beta > 0,
            "generator": self.generator in GENERATORS,
            "alpha": isinstance(self.alpha, int | float) and math.isfinite(self.alpha) and self.alpha > 0,
            "top_k": isinstance(self.top_k, int) and self.top_k >= 1,
            "pairing": self.pairing in PAIRINGS,
            "target_temperature": isinstance(self.target_temperature, int | float)
            and math.isfinite(self.target_temperature) and self.target_temperature >= 0,
            "include_iqs": isinstance(self.include_iqs, bool),
            "retain_weight": isinstance(self.retain_weight, int | float) and math.isfinite(self.retain_weight)
            and self.retain_weight >= 0,
            "max_pairs": self.max_pairs is None or (isinstance(self.max_pairs, int) and self.max_pairs >= 1),
            "chosen_nll_weight": isinstance(self.chosen_nll_weight, int | float)
            and math.isfinite(self.chosen_nll_weight) and self.chosen_nll_weight >= 0,
            "retain": self.retain in RETAIN_TERMS,
            "retain_rows": self.retain_rows is None or (isinstance(self.retain_rows, int) and self.retain_rows >= 1),
            "retain_normalize": self.retain_normalize in RETAIN_NORMALIZATIONS,
            "same_prompt": isinstance(self.same_prompt, bool),
            "seed": isinstance(self.seed, int),
        }
        bad = [k for k, ok in checks.items() if not ok]
        if bad:
            choices = {"method": METHODS, "generator": GENERATORS, "pairing": PAIRINGS,
                       "retain": RETAIN_TERMS, "retain_normalize": RETAIN_NORMALIZATIONS}.get(bad[0])
            hint = f" (choose from {', '.join(choices)})" if choices else ""
            raise LancetError(f"invalid correction option {bad[0]}={getattr(self, bad[0])!r}{hint}")

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> CorrectionArgs:
        unknown = set(data) - {f.name for f in fields(cls)}
        if unknown:
            raise LancetError(f"unknown correction option(s): {', '.join(sorted(unknown))}")
        return cls(**data)


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


def _has_response(row: dict[str, Any]) -> bool:
    return any(t != IGNORE_INDEX for t in row["labels"][1:])


def _encode(records: Sequence[Record], tokenizer, max_length: int, progress: bool, what: str) -> list[dict]:
    from lancet.data.tokenize import encode_records

    rows = list(encode_records(records, tokenizer, max_length, progress=progress))
    for record, row in zip(records, rows, strict=True):
        if not _has_response(row):
            raise LancetError(f"{record.source or what}:{record.line}: {what} row has no response tokens "
                              f"(prompt-only or truncated to {max_length} tokens)")
    return rows


def uninvolved_rows(scores: torch.Tensor, k: int, exclude: set[int]) -> list[int]:
    """The ``k`` rows with the smallest |aggregated score| outside ``exclude`` (the pairs' rows): the ones the ranking
    says neither drive nor counter the behaviour, so keeping them as they are should not undo the correction."""
    order = torch.argsort(scores.abs(), stable=True).tolist()
    keep = [i for i in order if i not in exclude][:k]
    if not keep:
        raise LancetError("no training rows left for the retain term (every row is in a pair)")
    return keep


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
    retain_records: Sequence[Record] | None = None,
    max_length: int = DEFAULT_MAX_LENGTH,
    trust_remote_code: bool = False,
    on_checkpoint: Callable[[int, Any], None] | None = None,
) -> Path:
    """Correct ``model_spec`` with ``method`` and save an HF model directory (+ ``train_log.jsonl`` and
    ``lancet_correction.json``: the rows used and the options) to ``train_args.output_dir``.

    ``scores_agg`` [N] are the aggregated influence scores of ``train_records``. Needed per method: ``ibo_oracle``
    ``culprit_mask``; ``dpo`` ``pref_pairs``; ``sft`` and ``ga_retain`` ``safe_records``. IQ records (prompt + the
    model's undesirable answer) join the dispreferred / forget rows when ``include_iqs``. ``retain_records``
    replace the uninvolved training rows as IBO's retain rows (``retain`` must be on; docs/method.md §3.6): answers
    to ordinary prompts anchor what the training rows may not cover. They are also DPO's retain rows (DPO has no
    ranking, so its retain term needs them): the same anchor on human pairs, the fair comparison. ``on_checkpoint(step,
    trainer)`` is called every ``save_every`` steps and at the end (``Trainer.train``): checkpoint selection.
    """
    from lancet.correct.trainers import DPOTrainer, GradientAscentTrainer, IBOTrainer, NPOTrainer, SFTTrainer
    from lancet.data.tokenize import encode_records
    from lancet.models.loading import load_model

    cargs = correction_args or CorrectionArgs(method=method)
    if cargs.method != method:
        raise LancetError(f"method {method!r} differs from correction_args.method {cargs.method!r}")
    if train_args.max_steps is None:
        raise LancetError("correction needs max_steps (--max-steps): every method gets the same number of steps")
    needs = {"ibo_oracle": ("culprit_mask", culprit_mask), "dpo": ("pref_pairs", pref_pairs),
             "sft": ("safe_records", safe_records), "ga_retain": ("safe_records", safe_records)}
    if method in needs and (needs[method][1] is None or len(needs[method][1]) == 0):
        flag = {"culprit_mask": "--labels", "pref_pairs": "--pairs", "safe_records": "--safe"}[needs[method][0]]
        raise LancetError(f"method {method} needs {needs[method][0]} ({flag})")
    if retain_records and not ((method.startswith("ibo") or method == "dpo") and cargs.retain != "none"):
        raise LancetError("retain rows (--retain-data) are the retain term of ibo and dpo: use one of them with "
                          "--retain nll|kl")
    if method == "dpo" and cargs.retain != "none" and not retain_records:
        raise LancetError("dpo's retain term needs retain rows (--retain-data): it has no ranking to call training "
                          "rows uninvolved")
    scores = torch.as_tensor(scores_agg).detach().double().cpu().reshape(-1)
    if scores.numel() != len(train_records):
        raise LancetError(f"{scores.numel()} scores for {len(train_records)} training rows")
    if not torch.isfinite(scores).all():
        raise LancetError("influence scores contain NaN or infinite values")

    model, tokenizer = load_model(model_spec, trust_remote_code=trust_remote_code, device=train_args.load_device)
    progress = train_args.progress
    summary: dict[str, Any] = {"method": method, "base": model_spec, "correction_args": cargs.to_json()}
    common = {"base_spec": model_spec}

    if method in ("ibo", "ibo_random", "ibo_oracle", "ga", "ga_retain", "npo"):
        train_rows = list(encode_records(train_records, tokenizer, max_length, progress=progress))
        keep = [i for i, row in enumerate(train_rows) if _has_response(row)]
        if len(keep) < len(train_rows):
            log.warning("%d training rows have no response tokens; they are not selected", len(train_rows) - len(keep))
        rows, sub = [train_rows[i] for i in keep], scores[keep]
        mask = None if culprit_mask is None else torch.as_tensor(culprit_mask, dtype=torch.bool)[keep]
        iq_rows = (_encode(iq_records, tokenizer, max_length, progress, "IQ")
                   if iq_records and cargs.include_iqs else [])
        mode = {"ibo_random": "random", "ibo_oracle": "oracle"}.get(method, "influence")
        bad, good = select_rows(sub, cargs.top_k, mode, mask, seed=cargs.seed)
        summary["dispreferred_ids"] = [rows[i]["id"] for i in bad]
        summary["iq_ids"] = [r["id"] for r in iq_rows]
        if method.startswith("ibo"):
            summary["preferred_ids"] = [rows[i]["id"] for i in good]
            pairs = build_ibo_pairs(sub, rows, top_k=cargs.top_k, pairing=cargs.pairing, iq_rows=iq_rows,
                                    include_iqs=cargs.include_iqs, seed=cargs.seed, max_pairs=cargs.max_pairs,
                                    selection=(bad, good),
                                    target_temperature=0.0 if method == "ibo_random" else cargs.target_temperature,
                                    weighting="uniform" if method == "ibo_random" else "gap",
                                    same_prompt=cargs.same_prompt)
            retain_rows = None
            if cargs.retain != "none" and retain_records:
                retain_rows = _encode(retain_records, tokenizer, max_length, progress, "retain")
                summary["retain_ids"] = [r["id"] for r in retain_rows]
                summary["retain_source"] = "given"
            elif cargs.retain != "none":
                retain_idx = uninvolved_rows(sub, cargs.retain_rows or cargs.top_k, set(bad) | set(good))
                retain_rows = [rows[i] for i in retain_idx]
                summary["retain_ids"] = [r["id"] for r in retain_rows]
            trainer = IBOTrainer(model, tokenizer, train_args, pairs, beta=cargs.beta, generator=cargs.generator,
                                 alpha=cargs.alpha, name=method, chosen_nll_weight=cargs.chosen_nll_weight,
                                 retain=cargs.retain, retain_weight=cargs.retain_weight, retain_rows=retain_rows,
                                 retain_normalize=cargs.retain_normalize,
                                 **common)
        else:
            forget = [rows[i] for i in bad] + iq_rows
            retain = (_encode(safe_records, tokenizer, max_length, progress, "safe")
                      if safe_records and method in ("ga_retain", "npo") else None)
            items = forget_items(forget, retain)
            if method == "npo":
                trainer = NPOTrainer(model, tokenizer, train_args, items, beta=cargs.beta,
                                     retain_weight=cargs.retain_weight if retain else 0.0, **common)
            else:
                weight = cargs.retain_weight if method == "ga_retain" else 0.0
                if method == "ga_retain" and weight <= 0:
                    raise LancetError("ga_retain needs retain_weight > 0")
                trainer = GradientAscentTrainer(model, tokenizer, train_args, items, retain_weight=weight,
                                                name=method, **common)
    elif method == "dpo":
        chosen = _encode([c for c, _ in pref_pairs], tokenizer, max_length, progress, "chosen")
        rejected = _encode([r for _, r in pref_pairs], tokenizer, max_length, progress, "rejected")
        retain_rows = None
        if cargs.retain != "none":
            retain_rows = _encode(retain_records, tokenizer, max_length, progress, "retain")
            summary["retain_ids"] = [r["id"] for r in retain_rows]
            summary["retain_source"] = "given"
        trainer = DPOTrainer(model, tokenizer, train_args, preference_items(chosen, rejected), beta=cargs.beta,
                             chosen_nll_weight=cargs.chosen_nll_weight, retain=cargs.retain,
                             retain_weight=cargs.retain_weight, retain_rows=retain_rows,
                             retain_normalize=cargs.retain_normalize, **common)
    else:  # sft
        trainer = SFTTrainer(model, tokenizer, train_args, _encode(safe_records, tokenizer, max_length, progress,
                                                                    "safe"), **common)
    summary["n_items"] = len(trainer.items)
    summary["steps"] = trainer.total_steps
    out = trainer.train(on_checkpoint)
    if dist.is_main():
        atomic_write_json(out / SUMMARY_FILE, summary)
    dist.barrier()
    return out


__all__ = ["METHODS", "CorrectionArgs", "correct", "load_run_scores"]
