"""The correction methods, one class each in a registry (as the influence estimators are): each checks the data it
needs, builds its own training items and returns its trainer.

    data = CorrectionData(train=rows, scores=ranking, iqs=iqs)
    out = Correction(model, tokenizer, CorrectionArgs(method="ibo"), train_args).run(data)

``CorrectionData`` holds every input a method may read (Records and tensors over the training rows); each method
names the fields it needs (``needs``) and a missing one is one clear error naming the CLI flag that gives it.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import torch

from lancet import distributed as dist
from lancet.artifacts import atomic_write_json
from lancet.constants import DEFAULT_MAX_LENGTH
from lancet.correct.arguments import CorrectionArgs
from lancet.correct.pairs import build_ibo_pairs, forget_items, preference_items, select_rows
from lancet.correct.trainers import DPOTrainer, GradientAscentTrainer, IBOTrainer, NPOTrainer, SFTTrainer
from lancet.data.records import Record
from lancet.data.tokenize import has_response_tokens
from lancet.errors import LancetError
from lancet.train import TrainArgs, Trainer

log = logging.getLogger(__name__)

SUMMARY_FILE = "lancet_correction.json"
# the CLI flag that gives each input, for the error when a method lacks it
FLAGS = {"train": "--train", "scores": "--scores", "iqs": "--iqs", "safe": "--safe", "pairs": "--pairs",
         "culprit_mask": "--labels", "preferred_mask": "--preferred-ids", "retain": "--retain-data",
         "flagged_mask": "--row-judge"}


@dataclass
class CorrectionData:
    """What a correction may train on. ``scores`` [N] rank ``train`` (any attribution method's aggregated scores:
    positive drives the behaviour); ``culprit_mask`` and ``preferred_mask`` [N] mark training rows (the oracle
    ranking's true culprits; the rows ``preferred="marked"`` prefers); ``flagged_mask`` [N] the rows whose answer a
    judge flags (``judged_rows`` takes the dispreferred rows among them, the preferred among the rest); ``iqs``
    are prompt + undesirable answer rows; ``safe`` the rows SFT and the retain NLLs train on; ``pairs`` human
    (chosen, rejected) pairs; ``retain`` the rows IBO's, DPO's and NPO's retain term keeps (e.g. the model's own
    answers to ordinary prompts); ``train_rows`` and ``iq_rows`` the same rows already encoded (by the caller that
    ranked them), so they are not encoded twice."""

    train: Sequence[Record] = ()
    scores: torch.Tensor | None = None
    iqs: Sequence[Record] = ()
    safe: Sequence[Record] = ()
    pairs: Sequence[tuple[Record, Record]] = ()
    culprit_mask: torch.Tensor | None = None
    preferred_mask: torch.Tensor | None = None
    flagged_mask: torch.Tensor | None = None
    retain: Sequence[Record] = ()
    train_rows: Sequence[dict] | None = None  # ``train`` already encoded with this tokenizer and max_length
    iq_rows: Sequence[dict] | None = None  # ``iqs`` already encoded (each with response tokens)

    def require(self, method: str, *names: str) -> None:
        for name in names:
            value = getattr(self, name)
            if value is None or len(value) == 0:
                raise LancetError(f"method {method} needs {name} ({FLAGS[name]})")


class Build:
    """One correction's items in the making: the model and options, the rows encoded once, the summary written
    beside the corrected model."""

    def __init__(self, model, tokenizer, args: CorrectionArgs, train_args: TrainArgs, max_length: int,
                 base_spec: str):
        self.model, self.tokenizer, self.args, self.train_args = model, tokenizer, args, train_args
        self.max_length, self.base_spec = max_length, base_spec
        self.summary: dict[str, Any] = {"method": args.method, "base": base_spec, "correction_args": args.to_json()}

    def encode(self, records: Sequence[Record], what: str) -> list[dict]:
        """Encoded rows, each with response tokens (else one error naming the first bad row's file and line)."""
        from lancet.data.tokenize import encode_records, require_response_tokens

        encoded = encode_records(records, self.tokenizer, self.max_length, progress=self.train_args.progress)
        require_response_tokens(encoded, what)
        return list(encoded)

    def trainer(self, cls: type[Trainer], items: Sequence[Any], **options) -> Trainer:
        return cls(self.model, self.tokenizer, self.train_args, items, base_spec=self.base_spec, **options)


class CorrectionMethod:
    """A registered correction: ``needs`` names the ``CorrectionData`` fields it reads; ``build`` returns its
    trainer with its items."""

    name: ClassVar[str]
    needs: ClassVar[tuple[str, ...]] = ()
    takes_retain: ClassVar[bool] = False  # a retain term on given rows (IBO, DPO, NPO)
    # only given rows can feed the retain term (DPO, NPO: no ranking to call training rows uninvolved)
    retain_needs_rows: ClassVar[bool] = False

    def check(self, data: CorrectionData, args: CorrectionArgs) -> None:
        data.require(self.name, *self.needs)
        if data.retain and not (self.takes_retain and args.retain != "none"):
            raise LancetError("retain rows (--retain-data) are the retain term of ibo, dpo and npo: use one of them "
                              "with --retain nll|kl")
        if self.retain_needs_rows and args.retain != "none" and not data.retain:
            raise LancetError(f"{self.name}'s retain term needs retain rows (--retain-data): it has no ranking to call "
                              "training rows uninvolved")

    def build(self, b: Build, data: CorrectionData) -> Trainer:
        raise NotImplementedError


class _Ranked(CorrectionMethod):
    """Methods that read the training rows through a ranking: the rows with response tokens, their scores, and the
    (dispreferred, preferred) choice of ``args.ranking`` and ``args.preferred``."""

    needs = ("train", "scores")

    def check(self, data: CorrectionData, args: CorrectionArgs) -> None:
        super().check(data, args)
        if args.ranking == "oracle":
            data.require(f"{self.name} with ranking oracle (ibo_oracle)", "culprit_mask")
        if args.preferred == "marked":
            data.require(f"{self.name} with preferred marked", "preferred_mask")
        if args.judged_rows:
            data.require(f"{self.name} with judged_rows", "flagged_mask")

    def ranked_rows(self, b: Build, data: CorrectionData):
        from lancet.data.tokenize import encode_records

        scores = _checked_scores(data.scores, len(data.train))
        train_rows = (list(data.train_rows) if data.train_rows is not None
                      else list(encode_records(data.train, b.tokenizer, b.max_length, progress=b.train_args.progress)))
        if len(train_rows) != len(data.train):
            raise LancetError(f"{len(train_rows)} encoded rows for {len(data.train)} training rows")
        keep = [i for i, row in enumerate(train_rows) if has_response_tokens(row)]
        if len(keep) < len(train_rows):
            log.warning("%d training rows have no response tokens; they are not selected", len(train_rows) - len(keep))
        rows, sub = [train_rows[i] for i in keep], scores[keep]
        masks = [None if m is None else torch.as_tensor(m, dtype=torch.bool)[keep]
                 for m in (data.culprit_mask, data.preferred_mask, data.flagged_mask)]
        iq_rows = []
        if data.iqs and b.args.include_iqs:
            iq_rows = list(data.iq_rows) if data.iq_rows is not None else b.encode(data.iqs, "IQ")
        bad, good = select_rows(sub, b.args.top_k, b.args.ranking, masks[0], seed=b.args.seed,
                                preferred=b.args.preferred, preferred_mask=masks[1],
                                flagged=masks[2] if b.args.judged_rows else None)
        b.summary["dispreferred_ids"] = [rows[i]["id"] for i in bad]
        b.summary["iq_ids"] = [r["id"] for r in iq_rows]
        return rows, sub, iq_rows, bad, good


class IBO(_Ranked):
    """Influence-driven Bregman optimisation: the preferred rows over the dispreferred ones and the IQs, against
    the model being corrected as reference, with optional anchors (docs/method.md §3)."""

    name = "ibo"
    takes_retain = True

    def build(self, b: Build, data: CorrectionData) -> Trainer:
        a = b.args
        rows, sub, iq_rows, bad, good = self.ranked_rows(b, data)
        b.summary["method"] = _ibo_name(a)
        b.summary["preferred_ids"] = [rows[i]["id"] for i in good]
        pairs = build_ibo_pairs(sub, rows, top_k=a.top_k, pairing=a.pairing, iq_rows=iq_rows,
                                include_iqs=a.include_iqs, seed=a.seed, max_pairs=a.max_pairs, selection=(bad, good),
                                target_temperature=a.target_temperature, weighting=a.weighting,
                                same_prompt=a.same_prompt)
        retain_rows = None
        if a.retain != "none" and data.retain:
            retain_rows = b.encode(data.retain, "retain")
            b.summary["retain_ids"] = [r["id"] for r in retain_rows]
            b.summary["retain_source"] = "given"
        elif a.retain != "none":
            retain_idx = uninvolved_rows(sub, a.retain_rows or a.top_k, set(bad) | set(good))
            retain_rows = [rows[i] for i in retain_idx]
            b.summary["retain_ids"] = [r["id"] for r in retain_rows]
        return b.trainer(IBOTrainer, pairs, beta=a.beta, generator=a.generator, alpha=a.alpha, name=_ibo_name(a),
                         chosen_nll_weight=a.chosen_nll_weight, retain=a.retain, retain_weight=a.retain_weight,
                         retain_rows=retain_rows, retain_normalize=a.retain_normalize)


def _ibo_name(args: CorrectionArgs) -> str:
    """The trainer's name in its log and fingerprint: the old method names for the two controls that had one."""
    if args.ranking == "random" and args.preferred == "random" and args.weighting == "uniform":
        return "ibo_random"
    if args.ranking == "oracle":
        return "ibo_oracle"
    return "ibo"


class _Forget(_Ranked):
    """Gradient ascent and NPO: the dispreferred rows and the IQs are forgotten, ``safe`` rows (if any) retained."""

    retain_from_safe: ClassVar[bool] = True

    def items(self, b: Build, data: CorrectionData) -> tuple[list[dict], bool]:
        """The forget items, and whether they carry retain rows: the given anchor rows when the retain term is on
        (NPO with IBO's anchor), else the safe rows (NPO+RT, GA+retain)."""
        rows, _, iq_rows, bad, _ = self.ranked_rows(b, data)
        if self.anchored(b.args, data):
            retain = b.encode(data.retain, "retain")
            b.summary["retain_ids"] = [r["id"] for r in retain]
            b.summary["retain_source"] = "given"
        else:
            retain = b.encode(data.safe, "safe") if data.safe and self.retain_from_safe else None
        return forget_items([rows[i] for i in bad] + iq_rows, retain), bool(retain)

    def anchored(self, args: CorrectionArgs, data: CorrectionData) -> bool:
        return self.takes_retain and args.retain != "none" and bool(data.retain)

    def retain_options(self, args: CorrectionArgs, data: CorrectionData) -> dict[str, str]:
        if self.anchored(args, data):
            return {"retain": args.retain, "retain_normalize": args.retain_normalize}
        return {}


class GradientAscent(_Forget):
    name = "ga"
    retain_from_safe = False

    def build(self, b: Build, data: CorrectionData) -> Trainer:
        items, _ = self.items(b, data)
        return b.trainer(GradientAscentTrainer, items, retain_weight=0.0, name=self.name)


class GradientAscentRetain(_Forget):
    name = "ga_retain"
    needs = ("train", "scores", "safe")

    def build(self, b: Build, data: CorrectionData) -> Trainer:
        if b.args.retain_weight <= 0:
            raise LancetError("ga_retain needs retain_weight > 0")
        items, _ = self.items(b, data)
        return b.trainer(GradientAscentTrainer, items, retain_weight=b.args.retain_weight, name=self.name)


class NPO(_Forget):
    """Negative preference optimisation; with ``safe`` rows, NPO+RT (their NLL weighted by ``retain_weight``); with
    ``retain`` on and given retain rows, NPO with IBO's anchor (``npo_anchored``: the KL to the starting model on
    the model's own answers to ordinary prompts)."""

    name = "npo"
    takes_retain = retain_needs_rows = True

    def build(self, b: Build, data: CorrectionData) -> Trainer:
        items, retained = self.items(b, data)
        return b.trainer(NPOTrainer, items, beta=b.args.beta, retain_weight=b.args.retain_weight if retained else 0.0,
                         **self.retain_options(b.args, data))


class DPO(CorrectionMethod):
    """DPO on human (chosen, rejected) pairs; takes IBO's chosen NLL and retain term on given rows."""

    name = "dpo"
    needs = ("pairs",)
    takes_retain = retain_needs_rows = True

    def build(self, b: Build, data: CorrectionData) -> Trainer:
        a = b.args
        chosen = b.encode([c for c, _ in data.pairs], "chosen")
        rejected = b.encode([r for _, r in data.pairs], "rejected")
        retain_rows = None
        if a.retain != "none":
            retain_rows = b.encode(data.retain, "retain")
            b.summary["retain_ids"] = [r["id"] for r in retain_rows]
            b.summary["retain_source"] = "given"
        return b.trainer(DPOTrainer, preference_items(chosen, rejected), beta=a.beta,
                         chosen_nll_weight=a.chosen_nll_weight, retain=a.retain, retain_weight=a.retain_weight,
                         retain_rows=retain_rows, retain_normalize=a.retain_normalize)


class SFT(CorrectionMethod):
    """Supervised fine-tuning on ``safe`` rows (e.g. curated refusals)."""

    name = "sft"
    needs = ("safe",)

    def build(self, b: Build, data: CorrectionData) -> Trainer:
        return b.trainer(SFTTrainer, b.encode(data.safe, "safe"))


CORRECTIONS: dict[str, type[CorrectionMethod]] = {
    cls.name: cls for cls in (IBO, DPO, SFT, GradientAscent, GradientAscentRetain, NPO)}


def get_correction(name: str) -> CorrectionMethod:
    if name not in CORRECTIONS:
        raise LancetError(f"unknown correction method {name!r}; choose from {', '.join(CORRECTIONS)}")
    return CORRECTIONS[name]()


def check_inputs(args: CorrectionArgs, data: CorrectionData) -> None:
    """One clear error when ``data`` lacks what ``args.method`` needs (cheap: call it before loading a model)."""
    get_correction(args.method).check(data, args)


class Correction:
    """The entry object: a model object (and its tokenizer) corrected with one registered method.

        out = Correction(model, tok, CorrectionArgs(method="ibo", top_k=50), train_args).run(data)

    ``run`` saves an HF model directory to ``train_args.output_dir`` with ``train_log.jsonl`` and
    ``lancet_correction.json`` (the rows used and the options). ``base_spec`` names the model in that summary (and
    as a LoRA adapter's base): pass where it came from.
    """

    def __init__(self, model, tokenizer, args: CorrectionArgs, train_args: TrainArgs, *,
                 max_length: int = DEFAULT_MAX_LENGTH, base_spec: str = ""):
        if train_args.max_steps is None:
            raise LancetError("correction needs max_steps (--max-steps): every method gets the same number of steps")
        self.model, self.tokenizer, self.args, self.train_args = model, tokenizer, args, train_args
        self.max_length, self.base_spec = max_length, base_spec
        self.method = get_correction(args.method)

    def trainer(self, data: CorrectionData) -> tuple[Trainer, dict[str, Any]]:
        """The method's trainer with its items built, and the summary of what it trains on."""
        self.method.check(data, self.args)
        b = Build(self.model, self.tokenizer, self.args, self.train_args, self.max_length, self.base_spec)
        trainer = self.method.build(b, data)
        b.summary["n_items"] = len(trainer.items)
        b.summary["steps"] = trainer.total_steps
        return trainer, b.summary

    def run(self, data: CorrectionData, on_checkpoint: Callable[[int, Any], None] | None = None) -> Path:
        """Train and save; ``on_checkpoint(step, trainer)`` is called every ``save_every`` steps and at the end
        (checkpoint selection, ``lancet.correct.select``)."""
        trainer, summary = self.trainer(data)
        out = trainer.train(on_checkpoint)
        if dist.is_main():
            atomic_write_json(out / SUMMARY_FILE, summary)
        dist.barrier()
        return out


def _checked_scores(scores: torch.Tensor, n: int) -> torch.Tensor:
    scores = torch.as_tensor(scores).detach().double().cpu().reshape(-1)
    if scores.numel() != n:
        raise LancetError(f"{scores.numel()} scores for {n} training rows")
    if not torch.isfinite(scores).all():
        raise LancetError("influence scores contain NaN or infinite values")
    return scores


def uninvolved_rows(scores: torch.Tensor, k: int, exclude: set[int]) -> list[int]:
    """The ``k`` rows with the smallest |aggregated score| outside ``exclude`` (the pairs' rows): the ones the ranking
    says neither drive nor counter the behaviour, so keeping them as they are should not undo the correction."""
    order = torch.argsort(scores.abs(), stable=True).tolist()
    keep = [i for i in order if i not in exclude][:k]
    if not keep:
        raise LancetError("no training rows left for the retain term (every row is in a pair)")
    return keep
