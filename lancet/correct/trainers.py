"""One trainer per correction method, all on the shared loop of :class:`lancet.train.Trainer`.

Pair methods (IBO, DPO) collate chosen and rejected rows into one padded batch ([chosen..., rejected...]) so one
forward pass serves both. Reference log-probs are computed once, before training, with the initial model (eval mode,
no gradient): the reference policy is the model being corrected, and a resumed run sees the same reference.

Under torchrun every loss divides by the global micro-batch's denominators (``loss_denominators``: pair weights
and counts, forget/retain token counts, forget rows), so the ranks' parts add up to the single-process loss.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from tqdm.auto import tqdm

from lancet import distributed as dist
from lancet.constants import RETAIN_KL_TOP_K
from lancet.correct.losses import GENERATORS, bregman_loss, margin, npo_loss
from lancet.curvature.task import forward_logits, shifted_targets, summed_loss
from lancet.data.tokenize import collate
from lancet.errors import LancetError
from lancet.hardware import autocast, model_device
from lancet.train import TrainArgs, Trainer

SFTTrainer = Trainer  # supervised fine-tuning on safe data is the base loop itself


def sequence_terms(model, batch: dict[str, torch.Tensor]):
    """(per-row summed log-probability of the response tokens, their count, the logits, the mask of scored
    positions) from one forward pass, the batch moved to the model's device."""
    dev = model_device(model)
    batch = {k: batch[k].to(dev) for k in ("input_ids", "attention_mask", "labels")}
    logits = forward_logits(model, batch)
    _, mask = shifted_targets(batch["labels"])
    return -summed_loss(logits, batch["labels"]), mask.sum(-1), logits, mask


def sequence_logps(model, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-row summed log-probability of the response tokens (labels != -100) and the number of those tokens."""
    return sequence_terms(model, batch)[:2]


def _row_key(row: dict[str, Any]) -> tuple:
    return (row.get("id"), tuple(row["input_ids"]), tuple(row["labels"]))


def reference_logps(model, rows: Sequence[dict[str, Any]], *, batch_size: int, pad_token_id: int, bf16: bool = False,
                    progress: bool = False, desc: str = "reference") -> list[float]:
    """Summed response log-probs of ``rows`` under ``model`` as it is now (eval mode, no gradient), each distinct
    row computed once (under torchrun each rank computes a whole-batch slice and the values are gathered)."""
    dist.init_from_env()
    unique: dict[tuple, int] = {}
    for row in rows:
        unique.setdefault(_row_key(row), len(unique))
    distinct = [None] * len(unique)
    for row in rows:
        distinct[unique[_row_key(row)]] = row
    lo, hi = dist.shard_range(len(distinct), batch_size)
    values: list[float] = []
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad(), autocast(model_device(model), bf16):
            for start in tqdm(range(lo, hi, batch_size), desc=desc, disable=not progress or not dist.is_main()):
                batch = collate(distinct[start : min(start + batch_size, hi)], pad_token_id=pad_token_id)
                values += sequence_logps(model, batch)[0].float().tolist()
    finally:
        model.train(was_training)
    if dist.active():
        values = dist.gather_rows(torch.tensor(values, dtype=torch.float64), len(distinct)).tolist()
    return [values[unique[_row_key(row)]] for row in rows]


def _fingerprint_value(value: Any) -> Any:
    if isinstance(value, dict) and "input_ids" in value:
        return [value.get("id"), len(value["input_ids"])]
    return value


class _CorrectionTrainer(Trainer):
    """Items are dicts of encoded rows and numbers; reference values (``ref_*``) are derived, not fingerprinted."""

    def __init__(self, model, tokenizer, args: TrainArgs, items: Sequence[Any], *, base_spec: str = "",
                 name: str | None = None):
        if name:
            self.name = name
        super().__init__(model, tokenizer, args, items, base_spec=base_spec)

    def data_fingerprint(self) -> str:
        from lancet.artifacts import hash_json

        return hash_json([{k: _fingerprint_value(v) for k, v in item.items() if not k.startswith("ref_")}
                          for item in self.items])

    def _reference(self, model, rows, args: TrainArgs, tokenizer) -> list[float]:
        return reference_logps(model, rows, batch_size=args.batch_size, pad_token_id=tokenizer.pad_token_id,
                               bf16=args.bf16, progress=args.progress, desc=f"{self.name} reference")


RETAIN_TERMS = ("none", "nll", "kl")
RETAIN_NORMALIZATIONS = ("tokens", "rows")


@torch.no_grad()
def reference_topk(model, rows: Sequence[dict[str, Any]], *, pad_token_id: int, k: int = RETAIN_KL_TOP_K,
                   bf16: bool = False) -> list[dict[str, torch.Tensor]]:
    """Per row, the reference's next-token distribution at each scored position (targets of §1), coarsened to its
    top-``k`` tokens and one bucket for the rest: ``ids`` [T, k], ``logp`` [T, k] and ``rest`` [T] (log of the
    remaining mass), zero at unscored positions. Stored with the row, so no reference model stays in memory."""
    out = []
    was_training = model.training
    model.eval()
    try:
        with autocast(model_device(model), bf16):
            for row in rows:
                batch = {key: v.to(model_device(model)) for key, v in collate([row], pad_token_id).items()}
                lp = torch.log_softmax(forward_logits(model, batch)[0].float(), -1)
                top, ids = lp.topk(min(k, lp.shape[-1]), -1)
                _, mask = shifted_targets(batch["labels"])
                m = mask[0].unsqueeze(-1)
                rest = _log_rest(top)
                out.append({"ids": (ids * m).cpu(), "logp": (top * m).cpu(), "rest": (rest * mask[0]).cpu()})
    finally:
        model.train(was_training)
    return out


def _log_rest(top_logp: torch.Tensor) -> torch.Tensor:
    """log(1 - sum exp(top_logp)) over the last axis, clamped away from log 0 (the top-k can hold all the mass)."""
    return torch.log1p(-torch.logsumexp(top_logp, -1).exp().clamp_max(1 - 1e-6))


def stack_reference_topk(parts: Sequence[dict[str, torch.Tensor]], width: int) -> dict[str, torch.Tensor]:
    """The retain rows' ``reference_topk`` entries padded to the batch's ``width`` and stacked, as
    ``ref_retain_ids`` / ``ref_retain_logp`` / ``ref_retain_rest``."""
    out = {}
    for key in ("ids", "logp", "rest"):
        out[f"ref_retain_{key}"] = torch.stack([torch.nn.functional.pad(
            p[key], (0, 0, 0, width - p[key].shape[0]) if p[key].dim() == 2 else (0, width - p[key].shape[0]))
            for p in parts])
    return out


def check_retain(retain: str, retain_normalize: str, weight: float) -> None:
    if retain not in RETAIN_TERMS:
        raise LancetError(f"unknown retain term {retain!r}; choose from {', '.join(RETAIN_TERMS)}")
    if retain_normalize not in RETAIN_NORMALIZATIONS:
        raise LancetError(f"unknown retain normalisation {retain_normalize!r}; choose from "
                          f"{', '.join(RETAIN_NORMALIZATIONS)}")
    if weight < 0:
        raise LancetError(f"retain_weight must be >= 0, got {weight}")


def coarse_kl(logits: torch.Tensor, ref: dict[str, torch.Tensor], mask: torch.Tensor) -> torch.Tensor:
    """Summed over scored positions: KL(reference || policy) between the two next-token distributions coarsened to
    the reference's top-k tokens plus one bucket for the rest (a lower bound of the full KL, exact when the top-k
    holds all the mass; zero iff the policy agrees with the reference on that partition)."""
    lp = torch.log_softmax(logits.float(), -1)
    top = lp.gather(-1, ref["ids"])
    rest = _log_rest(top)
    p_ref = ref["logp"].exp()
    kl = (p_ref * (ref["logp"] - top)).sum(-1) + ref["rest"].exp() * (ref["rest"] - rest)
    return (kl * mask).sum()


class IBOTrainer(_CorrectionTrainer):
    """Influence-based Bregman optimisation: weighted mean of D_φ(p* ‖ σ(h)) over pairs (lancet.correct.losses),
    plus the utility anchors of docs/method.md §3.6: ``chosen_nll_weight`` × the mean token NLL of the preferred
    rows (RPO), and ``retain_weight`` × a retain term on ``retain_rows`` (``retain="nll"``: their mean token NLL;
    ``"kl"``: the mean token KL from the reference's next-token distributions). ``retain_normalize="rows"`` divides
    the retain term's sum by the retain rows instead of their tokens: per row, the summed token KL is the KL between
    the two sequence distributions along the row (docs/method.md §3.6), and an answer's opening token weighs as
    much as in any one row's sequence, not 1/length of a mean."""

    name = "ibo"

    def __init__(self, model, tokenizer, args: TrainArgs, pairs: Sequence[dict[str, Any]], *, beta: float = 0.1,
                 generator: str = "logistic", alpha: float = 0.5, base_spec: str = "", name: str | None = None,
                 chosen_nll_weight: float = 0.0, retain: str = "none", retain_weight: float = 1.0,
                 retain_rows: Sequence[dict[str, Any]] | None = None, retain_normalize: str = "tokens"):
        if generator not in GENERATORS:
            raise LancetError(f"unknown generator {generator!r}; choose from {', '.join(GENERATORS)}")
        if not beta > 0:
            raise LancetError(f"beta must be > 0, got {beta}")
        if generator == "basu" and not alpha > 0:
            raise LancetError(f"alpha must be > 0 for the basu generator, got {alpha}")
        check_retain(retain, retain_normalize, retain_weight)
        if retain != "none" and not retain_rows:
            raise LancetError(f"retain={retain!r} needs retain rows")
        if chosen_nll_weight < 0:
            raise LancetError("chosen_nll_weight must be >= 0")
        self.retain_normalize = retain_normalize
        self.beta, self.generator, self.alpha = float(beta), generator, float(alpha)
        self.chosen_nll_weight, self.retain = float(chosen_nll_weight), retain
        self.retain_weight = float(retain_weight) if retain != "none" else 0.0
        if name:
            self.name = name
        refs = self._reference(model, [p["chosen"] for p in pairs] + [p["rejected"] for p in pairs], args, tokenizer)
        n = len(pairs)
        items = [{**p, "ref_chosen": refs[i], "ref_rejected": refs[n + i]} for i, p in enumerate(pairs)]
        if self.retain_weight > 0:  # the shorter list is cycled, so every pair and every retain row appears
            retain_rows = list(retain_rows)
            tops = (reference_topk(model, retain_rows, pad_token_id=tokenizer.pad_token_id, bf16=args.bf16)
                    if retain == "kl" else [None] * len(retain_rows))
            m = max(len(items), len(retain_rows))
            items = [{**items[i % len(items)], "retain": retain_rows[i % len(retain_rows)],
                      "ref_retain": tops[i % len(retain_rows)]} for i in range(m)]
        super().__init__(model, tokenizer, args, items, base_spec=base_spec, name=name)

    def extra_fingerprint(self) -> dict[str, Any]:
        return {"beta": self.beta, "generator": self.generator,
                "alpha": self.alpha if self.generator == "basu" else None,
                **({"chosen_nll_weight": self.chosen_nll_weight} if self.chosen_nll_weight else {}),
                **({"retain": self.retain, "retain_weight": self.retain_weight} if self.retain_weight else {}),
                **({"retain_normalize": "rows"} if self.retain_weight and self.retain_normalize == "rows" else {})}

    def collate(self, items: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        retain = [it["retain"] for it in items] if self.retain_weight > 0 else []
        batch = collate([it["chosen"] for it in items] + [it["rejected"] for it in items] + retain,
                        pad_token_id=self.tokenizer.pad_token_id)
        for key in ("weight", "target", "ref_chosen", "ref_rejected"):
            batch[key] = torch.tensor([float(it[key]) for it in items], dtype=torch.float32)
        if self.retain == "kl" and retain:
            batch.update(stack_reference_topk([it["ref_retain"] for it in items], batch["input_ids"].shape[1]))
        return batch

    def pair_terms(self, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(h, per-pair loss, policy log-probs of chosen and rejected rows [2B]) of a collated batch."""
        h, per_pair, logp, _, _ = self._terms(batch)
        return h, per_pair, logp[: 2 * h.numel()]

    def _terms(self, batch: dict[str, torch.Tensor]):
        n = batch["weight"].numel()
        logp, ntok, logits, mask = sequence_terms(self.model, batch)
        ref_c, ref_r, target = (batch[k].to(logp) for k in ("ref_chosen", "ref_rejected", "target"))
        h = margin(logp[:n], logp[n : 2 * n], ref_c, ref_r, self.beta)
        return h, bregman_loss(h, target, self.generator, self.alpha), logp, ntok, (logits, mask)

    def loss_denominators(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        n = batch["weight"].numel()
        ntok = shifted_targets(batch["labels"])[1].sum(-1).double()
        return {"weight": batch["weight"].double().sum(), "pairs": torch.tensor(float(n)),
                "chosen_tokens": ntok[:n].sum(), "retain_tokens": ntok[2 * n:].sum(),
                "retain_rows": torch.tensor(float(ntok.numel() - 2 * n))}

    def compute_loss(self, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, dict[str, float]]:
        h, per_pair, logp, ntok, (logits, mask) = self._terms(batch)
        w = batch["weight"].to(per_pair)
        loss = (w * per_pair).sum() / self.denominator("weight", w.sum()).clamp_min(1e-12)
        n = h.numel()
        logs = {
            "margin": self.batch_mean(h, "pairs").item(),
            "accuracy": self.batch_mean((h > 0).float(), "pairs").item(),
            "logp_chosen": self.batch_mean(logp[:n], "pairs").item(),
            "logp_rejected": self.batch_mean(logp[n : 2 * n], "pairs").item(),
        }
        if self.chosen_nll_weight > 0:
            nll = _mean_nll(-logp[:n], self.denominator("chosen_tokens", ntok[:n].sum()))
            logs["chosen_nll"] = nll.item()
            loss = loss + self.chosen_nll_weight * nll
        if self.retain_weight > 0:
            denom = (self.denominator("retain_rows", torch.tensor(float(ntok.numel() - 2 * n)))
                     if self.retain_normalize == "rows" else self.denominator("retain_tokens", ntok[2 * n:].sum()))
            denom = denom.clamp_min(1)
            if self.retain == "nll":
                term = -logp[2 * n:].sum() / denom
            else:
                ref = {k: batch[f"ref_retain_{k}"] for k in ("ids", "logp", "rest")}
                term = coarse_kl(logits[2 * n:], ref, mask[2 * n:]) / denom
            logs[f"retain_{self.retain}"] = term.item()
            loss = loss + self.retain_weight * term
        return loss, {"loss": loss.item(), **logs}


class DPOTrainer(IBOTrainer):
    """DPO: IBO with the logistic generator, uniform weights and target 1, on human chosen/rejected pairs; the same
    optional anchors as IBO (``chosen_nll_weight``: RPO; a retain term on given rows), so a comparison can hold the
    anchor fixed and change only the preference signal."""

    name = "dpo"

    def __init__(self, model, tokenizer, args: TrainArgs, pairs: Sequence[dict[str, Any]], *, beta: float = 0.1,
                 base_spec: str = "", chosen_nll_weight: float = 0.0, retain: str = "none",
                 retain_weight: float = 1.0, retain_rows: Sequence[dict[str, Any]] | None = None,
                 retain_normalize: str = "tokens"):
        pairs = [{**p, "weight": 1.0, "target": 1.0} for p in pairs]
        super().__init__(model, tokenizer, args, pairs, beta=beta, generator="logistic", base_spec=base_spec,
                         chosen_nll_weight=chosen_nll_weight, retain=retain, retain_weight=retain_weight,
                         retain_rows=retain_rows, retain_normalize=retain_normalize)


def _mean_nll(nll: torch.Tensor, ntok: torch.Tensor) -> torch.Tensor:
    """Mean token NLL of a group of rows: summed NLL over summed token count (``ntok``: the count, or per-row
    counts)."""
    return nll.sum() / ntok.sum().clamp_min(1)


class _ForgetTrainer(_CorrectionTrainer):
    """Items ``{"forget": row, "retain": row or None}``; retain rows are only batched when ``retain_weight > 0``.

    The retain term is the mean token NLL of the retain rows (NPO+RT, GA+retain: ``retain="nll"``, the default), or
    IBO's anchor (docs/method.md §3.6): ``retain="kl"``, the KL from the starting model's own next-token
    distributions on them, and ``retain_normalize="rows"``, summed over each row's tokens and averaged over rows
    (the sequence-level KL of ``ibo_benign_seq``): NPO and GA with the same anchor as IBO."""

    retain_weight = 0.0
    retain = "nll"
    retain_normalize = "tokens"

    def _anchor(self, model, tokenizer, args: TrainArgs, items: Sequence[dict[str, Any]], retain: str,
                retain_weight: float, retain_normalize: str) -> list[dict[str, Any]]:
        check_retain(retain, retain_normalize, retain_weight)
        self.retain = "nll" if retain == "none" else retain
        self.retain_weight, self.retain_normalize = float(retain_weight), retain_normalize
        items = list(items)
        if self.retain == "kl" and self.retain_weight > 0:
            rows = [it["retain"] for it in items if it.get("retain") is not None]
            if not rows:
                raise LancetError("retain='kl' needs retain rows")
            tops = reference_topk(model, rows, pad_token_id=tokenizer.pad_token_id, bf16=args.bf16)
            it_tops = iter(tops)
            items = [{**it, "ref_retain": next(it_tops)} if it.get("retain") is not None else it for it in items]
        return items

    def retain_fingerprint(self) -> dict[str, Any]:
        """The anchor's options, only where they differ from NPO+RT's (fingerprints of earlier runs stay valid)."""
        return {**({"retain": "kl"} if self.retain == "kl" and self.retain_weight else {}),
                **({"retain_normalize": "rows"} if self.retain_weight and self.retain_normalize == "rows" else {})}

    def loss_denominators(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        n = int(batch["n_forget"])
        ntok = shifted_targets(batch["labels"])[1].sum(-1).double()
        return {"forget_rows": torch.tensor(float(n)), "forget_tokens": ntok[:n].sum(), "retain_tokens": ntok[n:].sum(),
                "retain_rows": torch.tensor(float(ntok.numel() - n))}

    def collate(self, items: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        forget = [it["forget"] for it in items]
        kept = [it for it in items if it.get("retain") is not None] if self.retain_weight > 0 else []
        batch = collate(forget + [it["retain"] for it in kept], pad_token_id=self.tokenizer.pad_token_id)
        batch["n_forget"] = torch.tensor(len(forget))
        if "ref_forget" in items[0]:
            batch["ref_forget"] = torch.tensor([float(it["ref_forget"]) for it in items], dtype=torch.float32)
        if self.retain == "kl" and kept:
            batch.update(stack_reference_topk([it["ref_retain"] for it in kept], batch["input_ids"].shape[1]))
        return batch

    def _retain_term(self, terms, n: int, logs: dict[str, float], batch: dict[str, torch.Tensor]) -> torch.Tensor:
        logp, ntok, logits, mask = terms
        if not (self.retain_weight > 0 and logp.numel() > n):
            return logp.new_zeros(())
        denom = (self.denominator("retain_rows", torch.tensor(float(ntok.numel() - n)))
                 if self.retain_normalize == "rows" else self.denominator("retain_tokens", ntok[n:].sum()))
        denom = denom.clamp_min(1)
        if self.retain == "kl":
            ref = {k: batch[f"ref_retain_{k}"] for k in ("ids", "logp", "rest")}
            term = coarse_kl(logits[n:], ref, mask[n:]) / denom
        else:
            term = -logp[n:].sum() / denom
        logs[f"retain_{self.retain}"] = term.item()
        return self.retain_weight * term


class GradientAscentTrainer(_ForgetTrainer):
    """Gradient ascent on the forget rows: loss = −(mean token NLL of forget rows) + λ·(the retain term)."""

    name = "ga"

    def __init__(self, model, tokenizer, args: TrainArgs, items: Sequence[dict[str, Any]], *,
                 retain_weight: float = 0.0, base_spec: str = "", name: str | None = None, retain: str = "nll",
                 retain_normalize: str = "tokens"):
        items = self._anchor(model, tokenizer, args, items, retain, retain_weight, retain_normalize)
        super().__init__(model, tokenizer, args, items, base_spec=base_spec, name=name)

    def extra_fingerprint(self) -> dict[str, Any]:
        return {"retain_weight": self.retain_weight, **self.retain_fingerprint()}

    def compute_loss(self, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, dict[str, float]]:
        n = int(batch["n_forget"])
        terms = sequence_terms(self.model, batch)
        logp, ntok = terms[:2]
        forget = _mean_nll(-logp[:n], self.denominator("forget_tokens", ntok[:n].sum()))
        logs = {"forget_nll": forget.item()}
        loss = -forget + self._retain_term(terms, n, logs, batch)
        return loss, {"loss": loss.item(), **logs}


class NPOTrainer(_ForgetTrainer):
    """Negative preference optimisation on the forget rows (mean over rows) + λ·(the retain term): NPO+RT with the
    NLL of safe rows, or with IBO's anchor (``retain="kl"`` on given rows, ``npo_anchored``)."""

    name = "npo"

    def __init__(self, model, tokenizer, args: TrainArgs, items: Sequence[dict[str, Any]], *, beta: float = 0.1,
                 retain_weight: float = 0.0, base_spec: str = "", name: str | None = None, retain: str = "nll",
                 retain_normalize: str = "tokens"):
        if not beta > 0:
            raise LancetError(f"beta must be > 0, got {beta}")
        self.beta = float(beta)
        if name:
            self.name = name
        items = self._anchor(model, tokenizer, args, items, retain, retain_weight, retain_normalize)
        refs = self._reference(model, [it["forget"] for it in items], args, tokenizer)
        items = [{**it, "ref_forget": ref} for it, ref in zip(items, refs, strict=True)]
        super().__init__(model, tokenizer, args, items, base_spec=base_spec, name=name)

    def extra_fingerprint(self) -> dict[str, Any]:
        return {"beta": self.beta, "retain_weight": self.retain_weight, **self.retain_fingerprint()}

    def compute_loss(self, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, dict[str, float]]:
        n = int(batch["n_forget"])
        terms = sequence_terms(self.model, batch)
        logp = terms[0]
        ref = batch["ref_forget"].to(logp)
        npo = self.batch_mean(npo_loss(logp[:n], ref, self.beta), "forget_rows")
        logs = {"npo": npo.item(), "logratio": self.batch_mean(logp[:n] - ref, "forget_rows").item()}
        loss = npo + self._retain_term(terms, n, logs, batch)
        return loss, {"loss": loss.item(), **logs}


def objective(trainer: Trainer, items: Sequence[Any] | None = None) -> float:
    """The trainer's own loss on ``items`` (default: its training items) in one batch, eval mode, no gradient,
    under the same autocast as training (computed by each rank alone, without communication)."""
    model = trainer.model
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad(), autocast(trainer.device, trainer.args.bf16):
            batch = trainer._on_device(trainer.collate(list(items if items is not None else trainer.items)))
            return float(trainer.compute_loss(batch)[0])
    finally:
        model.train(was_training)
