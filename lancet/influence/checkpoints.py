"""Checkpoint-aware influence (TracIn, Pruthi et al. 2020): one ``Influence`` per training checkpoint, their [Q, N]
scores averaged with learning-rate weights; optionally each checkpoint's gradients divided by its own Adam step
scale (TrackStar, Chang et al. 2024; LESS, Xia et al. 2024: lancet.influence.gradient_scale). docs/method.md §2.11.

    ck = CheckpointInfluence("ft", method="cosine", adam=True, tokenizer=tok, out_dir="attr")  # ft: finetune's --out
    s = ck.scores(train, iqs)    # {"scores": [Q, N], "per_checkpoint": [K, Q, N], "weights": [K]}
    both = ck.scores_by_method(train, iqs, ["cosine", "identity"])             # one pass per checkpoint

Why several checkpoints: after a few epochs the rows that taught a behaviour are memorised, their loss is near zero
and so is their gradient at the final model; at earlier checkpoints, while the model was still learning them, their
gradients were large and aligned with the behaviour's. TracIn sums the gradient products along training, each
checkpoint weighted by the learning rate of the steps it stands for.

Each checkpoint's model is loaded when it is scored and freed after, so K checkpoints cost K passes and the memory
of one model. With ``out_dir`` each checkpoint's curvature and scores are artifacts in ``out_dir/checkpoints/<name>``
(reused, refused on a mismatch and resumed as ``Influence``'s); the weighted average is recomputed from them.
"""

from __future__ import annotations

import gc
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch

from lancet.constants import DEFAULT_MAX_LENGTH
from lancet.errors import LancetError
from lancet.finetune import KeptCheckpoint, read_checkpoint, resolve_checkpoints
from lancet.influence.arguments import InfluenceArgs
from lancet.influence.engine import Influence
from lancet.influence.gradient_scale import GradientScale

# how checkpoint k's scores are weighted (then normalised to sum 1): "lr_sum" the sum of the learning rates of the
# optimizer steps it stands for (those since the previous kept checkpoint: TracIn's eta_i times the interval, for a
# schedule that changes within it), "lr" the learning rate of its own step, "uniform" 1/K
WEIGHTINGS = ("lr_sum", "lr", "uniform")


@dataclass
class Checkpoint:
    """One model to score at: a directory (loaded when scored) or a model object, with the learning rates it stands
    for and, for the Adam normalisation, its gradient scale (read from the directory when not given)."""

    name: str
    lr_sum: float = 1.0
    lr: float = 1.0
    path: Path | None = None
    model: Any = None
    gradient_scale: GradientScale | None = None

    @classmethod
    def from_kept(cls, kept: KeptCheckpoint) -> Checkpoint:
        return cls(name=kept.name, lr_sum=kept.lr_sum, lr=kept.lr, path=kept.path)


def as_checkpoints(checkpoints: str | Path | Sequence[Any]) -> list[Checkpoint]:
    """``Checkpoint``s from a fine-tuning run directory or comma-separated kept directories (``resolve_checkpoints``),
    or a list of ``Checkpoint``, ``KeptCheckpoint`` or kept directories."""
    if isinstance(checkpoints, str | Path):
        found = [Checkpoint.from_kept(k) for k in resolve_checkpoints(str(checkpoints))]
    else:
        found = []
        for item in checkpoints:
            if isinstance(item, Checkpoint):
                found.append(item)
            elif isinstance(item, KeptCheckpoint):
                found.append(Checkpoint.from_kept(item))
            elif isinstance(item, str | Path):
                found.append(Checkpoint.from_kept(read_checkpoint(item)))
            else:
                raise LancetError(f"a checkpoint is a Checkpoint, a KeptCheckpoint or a directory, not "
                                  f"{type(item).__name__}")
    if not found:
        raise LancetError("no checkpoints given")
    names = [c.name for c in found]
    if len(set(names)) != len(names):  # each names its artifact directory
        raise LancetError(f"checkpoint names must differ (each names its artifacts): {names}")
    return found


def checkpoint_weights(checkpoints: Sequence[Checkpoint], weights: str | Sequence[float]) -> torch.Tensor:
    """[K] float64 weights summing to 1 (``WEIGHTINGS``, or K numbers of any positive sum)."""
    if isinstance(weights, str):
        if weights not in WEIGHTINGS:
            raise LancetError(f"unknown checkpoint weighting {weights!r}; choose from {', '.join(WEIGHTINGS)}")
        raw = [1.0 if weights == "uniform" else float(getattr(c, weights)) for c in checkpoints]
    else:
        raw = [float(w) for w in weights]
        if len(raw) != len(checkpoints):
            raise LancetError(f"{len(raw)} checkpoint weights for {len(checkpoints)} checkpoints")
    w = torch.tensor(raw, dtype=torch.float64)
    if not bool(torch.isfinite(w).all()) or bool((w < 0).any()) or float(w.sum()) <= 0:
        raise LancetError(f"checkpoint weights must be finite, >= 0 and not all 0, got {raw} (a schedule that ends "
                          "at lr 0 gives its last step weight 0 under 'lr': use 'lr_sum')")
    return w / w.sum()


class CheckpointInfluence:
    """Influence averaged over checkpoints: ``scores`` = sum_k w_k scores_k (``checkpoint_weights``), each scores_k an
    ``Influence`` on checkpoint k's model with this object's options. ``adam=True``: each checkpoint's gradients are
    divided by its own Adam sqrt(v_hat) + eps (identity and cosine only; the checkpoints must have kept Adam's state).
    """

    def __init__(self, checkpoints: str | Path | Sequence[Any], args: InfluenceArgs | None = None, *,
                 weights: str | Sequence[float] = "lr_sum", adam: bool = False, out_dir: str | Path | None = None,
                 tokenizer=None, max_length: int = DEFAULT_MAX_LENGTH, measurement=None,
                 model_dtype: torch.dtype | None = None, device: str | torch.device | None = None, anchors=None,
                 behaviour=None, **options):
        self.checkpoints = as_checkpoints(checkpoints)
        self.args = args or InfluenceArgs(**options)
        self.weights = checkpoint_weights(self.checkpoints, weights)  # checked before any model loads
        self.weighting = weights if isinstance(weights, str) else "given"
        self.adam = adam
        self.out = Path(out_dir) if out_dir is not None else None
        self.tokenizer, self.max_length, self.measurement = tokenizer, max_length, measurement
        # checkpoints are loaded in float64 for float64 statistics (exactness tests), else float32 as load_model does
        self.model_dtype = model_dtype or (torch.float64 if self.args.dtype == "float64" else torch.float32)
        self.device, self.anchors = device, anchors
        # a BehaviourDirection used at every checkpoint, or a function model -> BehaviourDirection fitted at each one
        # (the same contrast rows read in that checkpoint's own representation)
        self.behaviour = behaviour
        if adam:
            for c in self.checkpoints:
                if c.gradient_scale is None and c.path is None:
                    raise LancetError(f"checkpoint {c.name}: adam=True needs its gradient scale or its directory")

    def label(self, method: str | None = None) -> str:
        """The ranking's name: ``<method>_ckpt``, ``<method>_adam_ckpt`` with the Adam normalisation, and
        ``<method>_behaviour[_adam]_ckpt`` with the behaviour measurement."""
        behaviour = "_behaviour" if self.args.measurement == "behaviour" else ""
        return f"{method or self.args.method}{behaviour}{'_adam' if self.adam else ''}_ckpt"

    @contextmanager
    def influence(self, checkpoint: Checkpoint, method: str | None = None) -> Iterator[Influence]:
        """An ``Influence`` on ``checkpoint``'s model (loaded here when it is a directory, freed on exit), with its
        own artifact directory and, with ``adam``, its own gradient scale."""
        model, tokenizer = checkpoint.model, self.tokenizer
        if model is None:
            if checkpoint.path is None:
                raise LancetError(f"checkpoint {checkpoint.name}: neither a model nor a directory")
            from lancet.models.loading import load_model

            model, own = load_model(str(checkpoint.path), dtype=self.model_dtype, device=self.device)
            tokenizer = tokenizer or own
        scale = None
        if self.adam:
            scale = checkpoint.gradient_scale or GradientScale.from_checkpoint(checkpoint.path)
        args = self.args if method is None else replace(self.args, method=method)
        out = self.out / "checkpoints" / checkpoint.name if self.out is not None else None
        direction = self.behaviour(model) if callable(self.behaviour) else self.behaviour
        try:
            yield Influence(model, args, out_dir=out, measurement=self.measurement, tokenizer=tokenizer,
                            max_length=self.max_length, gradient_scale=scale, anchors=self.anchors,
                            behaviour=direction)
        finally:
            if checkpoint.model is None:  # ours to free before the next checkpoint loads
                del model
                gc.collect()
                if torch.cuda.is_available():
                    torch.cuda.empty_cache()

    def fit(self, train, method: str | None = None) -> None:
        """Fit every checkpoint's curvature (stored under ``out_dir``; without one, ``scores`` fits again, as the
        models are not kept between calls)."""
        for checkpoint in self.checkpoints:
            with self.influence(checkpoint, method) as run:
                run.fit(train)
            del run  # the model goes before the next one loads

    def scores(self, train, queries) -> dict[str, torch.Tensor]:
        """{"scores": [Q, N] weighted average, "per_checkpoint": [K, Q, N], "weights": [K]} (and "per_layer" averaged
        the same way with ``per_layer=True``)."""
        return self.scores_by_method(train, queries, [self.args.method])[self.args.method]

    def scores_by_method(self, train, queries, methods: Sequence[str]) -> dict[str, dict[str, torch.Tensor]]:
        """``scores`` of several methods, {method: {...}}: one ``Influence.scores_by_method`` pass per checkpoint."""
        return self._average(lambda run, names: run.scores_by_method(train, queries, names), methods)

    def behaviour_scores(self, train, queries, methods: Sequence[str] | None = None
                         ) -> dict[str, dict[str, torch.Tensor]]:
        """``behaviour.behaviour_scores`` at each checkpoint (the behaviour as one query there), averaged as
        ``scores``: {method: {"scores": [1, N], "per_checkpoint": [K, 1, N], "weights": [K]}}."""
        from lancet.influence.behaviour import behaviour_scores

        if self.behaviour is None:
            raise LancetError("CheckpointInfluence.behaviour_scores needs behaviour= (a BehaviourDirection or a "
                              "function of the model that fits one)")
        return self._average(lambda run, names: behaviour_scores(run, train, queries, names),
                             methods or [self.args.method])

    def _average(self, score, methods: Sequence[str]) -> dict[str, dict[str, torch.Tensor]]:
        """``score(influence, methods)`` at each checkpoint in turn (one model loaded at a time), combined."""
        names = list(dict.fromkeys(methods))
        found: dict[str, list[dict[str, torch.Tensor]]] = {m: [] for m in names}
        for checkpoint in self.checkpoints:
            with self.influence(checkpoint) as run:
                got = score(run, names)
            del run  # the model goes before the next one loads
            for method in names:
                found[method].append(got[method])
        return {method: self._combine(found[method]) for method in names}

    def _combine(self, results: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
        out: dict[str, torch.Tensor] = {}
        for key in results[0]:
            stack = torch.stack([r[key] for r in results])
            w = self.weights.to(stack.dtype).view(-1, *([1] * (stack.ndim - 1)))
            out[key] = (w * stack).sum(0)
            if key == "scores":
                out["per_checkpoint"] = stack
        out["weights"] = self.weights.clone()
        return out

    def describe(self) -> dict[str, Any]:
        """What the average is made of, for a ranking's summary."""
        return {"checkpoints": [{"name": c.name, "path": str(c.path) if c.path else None, "lr": c.lr,
                                 "lr_sum": c.lr_sum, "weight": round(float(w), 6)}
                                for c, w in zip(self.checkpoints, self.weights, strict=True)],
                "weighting": self.weighting, "adam": self.adam}


def attribute_checkpoints(tokenizer, train_spec: str, queries_spec: str, out_dir: str | Path, args: InfluenceArgs,
                          methods: Sequence[str], checkpoints: str | Path | Sequence[Any], *,
                          weights: str | Sequence[float] = "lr_sum", adam: bool = False,
                          device: str | torch.device | None = None, max_length: int = DEFAULT_MAX_LENGTH,
                          labels: str | None = None, k: int = 10, anchors=None,
                          behaviour=None) -> dict[str, dict[str, Any]]:
    """`lancet attribute --checkpoints`: rank the training rows by each method's checkpoint average and write
    ``ranking-<label>.safetensors`` and ``influence-<label>.json`` as ``attribute`` does, the label being
    ``<method>_ckpt`` or ``<method>_adam_ckpt`` (``CheckpointInfluence.label``), so that they sit beside the final
    model's own rankings in one run directory; the summary says which checkpoints and weights made the average."""
    import time

    from lancet.influence.attribute import AttributionData
    from lancet.influence.attribute import _rank as write_ranking

    out = Path(out_dir)
    data = AttributionData.load(tokenizer, train_spec, queries_spec, max_length, args.progress, labels)
    from lancet.influence.behaviour import BehaviourArgs, fit_direction

    if isinstance(behaviour, BehaviourArgs):  # fitted at each checkpoint from the IQs against its counter rows
        spec = behaviour
        behaviour = lambda model: fit_direction(model, tokenizer, data.queries, spec,  # noqa: E731
                                                max_length=max_length, batch_size=args.batch_size, bf16=args.bf16)
    ck = CheckpointInfluence(checkpoints, args, weights=weights, adam=adam, out_dir=out, tokenizer=tokenizer,
                             max_length=max_length, device=device, anchors=anchors, behaviour=behaviour)
    t0 = time.perf_counter()
    if args.measurement == "behaviour":
        scores = ck.behaviour_scores(data.train, data.queries, methods)
    else:
        scores = ck.scores_by_method(data.train, data.queries, methods)
    seconds = time.perf_counter() - t0
    extra = data.extra(contrast_response=None, checkpoints=ck.describe())
    return {m: write_ranking(out, replace(args, method=m), scores[m]["scores"], seconds, data.train_records,
                             data.train, data.culprits, extra, k, name=ck.label(m))
            for m in dict.fromkeys(methods)}
