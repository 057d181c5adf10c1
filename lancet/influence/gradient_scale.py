"""Optimizer-aware gradient normalisation (TrackStar, Chang et al. 2024; LESS, Xia et al. 2024): every gradient,
query and training row alike, divided elementwise by d = sqrt(v_hat) + eps, Adam's own per-parameter step scale at a
checkpoint (v_hat = exp_avg_sq / (1 - beta2^t), Adam's bias-corrected second moment).

Why: Adam moves parameter i by about lr * m_i / d_i, not lr * g_i, so the change that training on a row made to the
model is its gradient divided by d, and two rows' effects on each other are compared in that geometry. Without it
the few coordinates with large, noisy gradients (norms, the first layers' outputs) dominate every inner product,
which TrackStar found to make gradient attribution retrieve by surface features.

    scale = GradientScale.from_checkpoint("ft/checkpoints/step-40")                # Adam's state kept by finetune
    run = Influence(model, method="cosine", gradient_scale=scale)                  # or identity
    s = run.scores(train, iqs)["scores"]          # cos(G_q / d, G_n / d) over all tracked layers

The option is named and fingerprinted as ``InfluenceArgs.gradient_scale`` = "adam@<digest of v, eps and the bias
correction>", so stored scores of another scale are refused. Only ``identity`` and ``cosine`` take it: the Kronecker
curvatures are fitted on unscaled gradients, so combining them with a diagonal rescaling has no meaning here.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch

from lancet.artifacts import hash_json, hash_tensors, load_tensors
from lancet.curvature.modules import TrackedLayer
from lancet.errors import LancetError

SCALED_METHODS = ("identity", "cosine")  # the estimators a gradient scale is defined for


class GradientScale:
    """A per-parameter elementwise divisor d = sqrt(v / bias_correction) + eps of every gradient before scoring.

    ``second_moment``: Adam's ``exp_avg_sq`` per parameter name (the names of ``model.named_parameters()``: for a
    tracked layer ``NAME``, ``NAME.weight`` and, with a bias, ``NAME.bias``); ``bias_correction`` = 1 - beta2^t."""

    kind = "adam"

    def __init__(self, second_moment: Mapping[str, torch.Tensor], *, eps: float = 1e-8, bias_correction: float = 1.0,
                 source: str = ""):
        if not second_moment:
            raise LancetError("a gradient scale needs the second moment of at least one parameter")
        if not (eps >= 0 and 0 < bias_correction <= 1):
            raise LancetError(f"invalid gradient scale: eps={eps!r} (>= 0), bias_correction={bias_correction!r} "
                              "(in (0, 1])")
        self.second_moment = dict(second_moment)
        self.eps, self.bias_correction, self.source = float(eps), float(bias_correction), source
        self._spec: str | None = None

    @classmethod
    def from_checkpoint(cls, checkpoint) -> GradientScale:
        """From a kept checkpoint (``lancet.finetune.KeptCheckpoint`` or its directory): its Adam second moment, eps,
        beta2 and step count."""
        from lancet.finetune import KeptCheckpoint, read_checkpoint

        kept = checkpoint if isinstance(checkpoint, KeptCheckpoint) else read_checkpoint(checkpoint)
        if kept.second_moment is None or not kept.second_moment.is_file():
            raise LancetError(f"{kept.path}: no Adam second moment was kept with this checkpoint")
        adam = kept.adam
        beta2, step = float(adam["betas"][1]), int(adam["step"])
        return cls(load_tensors(kept.second_moment), eps=float(adam["eps"]), bias_correction=1 - beta2 ** step,
                   source=str(kept.path))

    @property
    def spec(self) -> str:
        """The option's value in ``InfluenceArgs.gradient_scale``, ``adam@<digest>`` (hashed once: a digest of every
        second-moment byte, so the same scale is recognised across runs and another is refused)."""
        if self._spec is None:
            digest = hash_json([hash_tensors(sorted(self.second_moment.items())), self.eps, self.bias_correction])
            self._spec = f"{self.kind}@{digest}"
        return self._spec

    def divisors(self, layers: Sequence[TrackedLayer], dtype: torch.dtype, device: torch.device | str | None = None
                 ) -> dict[str, torch.Tensor]:
        """d per tracked layer in the layout of the engine's layer gradients: [out, in], the bias as a last column,
        GPT-2's Conv1D weight ([in, out] as stored) transposed."""
        out = {}
        for layer in layers:
            parts = [self._weight(f"{layer.name}.weight", layer)]
            if layer.has_bias:
                parts.append(self._get(f"{layer.name}.bias", (layer.out_features,)).reshape(-1, 1))
            v = torch.cat(parts, 1).to(torch.float64)
            d = (v / self.bias_correction).clamp_min(0).sqrt() + self.eps
            if not bool((d > 0).all()):  # eps = 0 and a coordinate never updated: dividing by it is undefined
                raise LancetError(f"gradient scale: {layer.name} has zero entries in sqrt(v) + eps (eps={self.eps})")
            out[layer.name] = d.to(dtype=dtype, device=device)
        return out

    def _weight(self, name: str, layer: TrackedLayer) -> torch.Tensor:
        n_in = layer.in_features - layer.has_bias
        if layer.transposed:
            return self._get(name, (n_in, layer.out_features)).T
        return self._get(name, (layer.out_features, n_in))

    def _get(self, name: str, shape: tuple[int, ...]) -> torch.Tensor:
        v = self.second_moment.get(name)
        if v is None:
            raise LancetError(f"gradient scale{f' ({self.source})' if self.source else ''}: no second moment for "
                              f"{name} (a LoRA run trains adapters only, and frozen layers have none: the scale needs "
                              "the tracked layers trained)")
        if tuple(v.shape) != shape:
            raise LancetError(f"gradient scale: {name} has shape {list(v.shape)}, the model's is {list(shape)}")
        return v


def check_scaled_method(method: str) -> None:
    if method not in SCALED_METHODS:
        raise LancetError(f"a gradient scale (Adam normalisation) applies to {', '.join(SCALED_METHODS)}, not "
                          f"{method}: the other curvatures are fitted on unscaled gradients")
