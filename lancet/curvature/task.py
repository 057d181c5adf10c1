"""The language-model task: what is differentiated, and the cotangents that define the curvature.

Influence needs two kinds of backward pass through the logits z (shape [B, T, V]):
- the *data* cotangent dL/dz of the summed cross-entropy over response tokens with the true labels (training and
  query gradients);
- *Fisher* cotangents whose outer products average to the Gauss-Newton matrix. For softmax cross-entropy the GGN
  equals the Fisher E_{y~p}[grad grad^T], so a cotangent p - onehot(y) with y sampled from the model's own
  prediction at each scored token gives an unbiased one-sample estimate ("sampled", the default, as kronfluence).
  "empirical" uses the true labels instead (the empirical Fisher: deterministic, but biased).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from lancet.constants import IGNORE_INDEX

FISHER_MODES = ("sampled", "empirical")


def _at_least_fp32(t: torch.Tensor) -> torch.Tensor:
    """Softmax precision: half types go up to float32, float64 stays float64 (exactness tests)."""
    return t.to(torch.promote_types(t.dtype, torch.float32))


def position_ids(attention_mask: torch.Tensor) -> torch.Tensor:
    """Positions counted over real tokens only, so left and right padding give the same model outputs."""
    return (attention_mask.long().cumsum(-1) - 1).clamp_min(0)


def forward_logits(model, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                position_ids=position_ids(batch["attention_mask"]), use_cache=False)
    return out.logits


def shifted_targets(labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Targets aligned with logits (logit t predicts label t+1) and the mask of scored positions."""
    targets = torch.full_like(labels, IGNORE_INDEX)
    targets[:, :-1] = labels[:, 1:]
    return targets, targets != IGNORE_INDEX


def summed_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Per-row summed cross-entropy over response tokens: shape [B]."""
    targets, mask = shifted_targets(labels)
    logp = torch.log_softmax(_at_least_fp32(logits), dim=-1)
    nll = -logp.gather(-1, targets.clamp_min(0).unsqueeze(-1)).squeeze(-1)
    return (nll * mask).sum(-1)


def data_cotangent(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """d(summed CE with the true labels)/d logits = (softmax - onehot(label)) on scored positions."""
    return _cotangent(logits, labels, None)


def fisher_cotangent(logits: torch.Tensor, labels: torch.Tensor, mode: str, row_seeds: Sequence[int],
                     host_labels: torch.Tensor | None = None):
    """One Fisher cotangent. Sampled labels are drawn per row from a CPU generator seeded by ``row_seeds[b]`` over
    the row's scored positions in order, so the draws depend neither on batch size, padding side and chunking nor
    on the device. ``host_labels``: a CPU copy of ``labels`` (the positions are found there: no device sync)."""
    if mode == "empirical":
        return _cotangent(logits, labels, None)
    probs = torch.softmax(_at_least_fp32(logits.detach()), dim=-1)
    _, host_mask = shifted_targets(labels if host_labels is None else host_labels)
    sampled = torch.zeros(host_mask.shape, dtype=torch.long, device=probs.device)
    for b, seed in enumerate(row_seeds):
        pos = host_mask[b].nonzero().squeeze(-1)
        if pos.numel() == 0:
            continue
        u = torch.rand(pos.numel(), 1, generator=torch.Generator().manual_seed(int(seed)), dtype=probs.dtype)
        pos, u = pos.to(probs.device, non_blocking=True), u.to(probs.device, non_blocking=True)
        cdf = probs[b, pos].cumsum(-1)
        draw = torch.searchsorted(cdf, u * cdf[:, -1:]).clamp_max(probs.shape[-1] - 1)
        sampled[b, pos] = draw.squeeze(-1)
    return _cotangent(logits, labels, sampled)


def _cotangent(logits: torch.Tensor, labels: torch.Tensor, sampled: torch.Tensor | None) -> torch.Tensor:
    targets, mask = shifted_targets(labels)
    y = targets.clamp_min(0) if sampled is None else sampled
    probs = torch.softmax(_at_least_fp32(logits.detach()), dim=-1)
    cot = probs.clone()
    cot.scatter_add_(-1, y.unsqueeze(-1), -torch.ones_like(y, dtype=cot.dtype).unsqueeze(-1))
    return (cot * mask.unsqueeze(-1)).to(logits.dtype)
