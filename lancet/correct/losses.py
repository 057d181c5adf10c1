"""Correction losses as pure functions of per-row sequence log-probs (summed over response tokens).

IBO scores a pair (y_w preferred, y_l dispreferred) by the margin
h = β·[(log π(y_w) − log π_ref(y_w)) − (log π(y_l) − log π_ref(y_l))], whose implied preference probability is
p = σ(h), and minimises a Bregman divergence D_φ(p* ‖ p) between a target p* and p over the two outcomes (p, 1 − p).
Every function returns per-pair (or per-row) losses; the trainers take the (weighted) mean.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

GENERATORS = ("logistic", "squared", "basu")


def margin(
    policy_chosen: torch.Tensor,
    policy_rejected: torch.Tensor,
    ref_chosen: torch.Tensor,
    ref_rejected: torch.Tensor,
    beta: float,
) -> torch.Tensor:
    """h = β·[(log π(y_w) − log π_ref(y_w)) − (log π(y_l) − log π_ref(y_l))]."""
    return beta * ((policy_chosen - ref_chosen) - (policy_rejected - ref_rejected))


def preference_prob(h: torch.Tensor) -> torch.Tensor:
    """p = σ(h): the probability that y_w is preferred, as implied by the policy against the reference."""
    return torch.sigmoid(h)


def dpo_loss(h: torch.Tensor) -> torch.Tensor:
    """DPO (Rafailov et al. 2023): −log σ(h)."""
    return -F.logsigmoid(h)


def _entropy_term(target: torch.Tensor) -> torch.Tensor:
    """p* log p* + (1 − p*) log(1 − p*), with 0 log 0 = 0."""
    return torch.special.xlogy(target, target) + torch.special.xlogy(1 - target, 1 - target)


def bregman_loss(h: torch.Tensor, target: torch.Tensor | float = 1.0, generator: str = "logistic",
                 alpha: float = 0.5) -> torch.Tensor:
    """D_φ(p* ‖ σ(h)) per pair, for the two-outcome distributions (p*, 1 − p*) and (p, 1 − p).

    - ``logistic``: φ(p) = p log p + (1 − p) log(1 − p), D = KL(p* ‖ p); DPO's −log σ(h) when p* = 1.
    - ``squared``: φ(p) = p² + (1 − p)², D = 2 (p* − p)².
    - ``basu``: Basu's density power divergence (φ(p) = (p^{1+α} + (1 − p)^{1+α}) / α),
      D = Σ_o [q_o^{1+α} − (1 + 1/α) q*_o q_o^α + (1/α) q*_o^{1+α}]; → KL as α → 0, bounded gradient for pairs
      the model strongly disagrees with.
    """
    target = torch.as_tensor(target, dtype=h.dtype, device=h.device).expand_as(h)
    if generator == "logistic":
        return -target * F.logsigmoid(h) - (1 - target) * F.logsigmoid(-h) + _entropy_term(target)
    if generator == "squared":
        return 2 * (target - torch.sigmoid(h)) ** 2
    if generator == "basu":
        if not alpha > 0:
            raise ValueError(f"basu needs alpha > 0, got {alpha}")
        total = torch.zeros_like(h)
        for log_q, q_star in ((F.logsigmoid(h), target), (F.logsigmoid(-h), 1 - target)):
            q_alpha = torch.exp(alpha * log_q)
            # −(1 + 1/α) q* q^α + (1/α) q*^{1+α} = −q* q^α + (q*/α)(q*^α − q^α); the difference of powers is
            # written with expm1 so that it stays accurate as α → 0 (no 1/α cancellation).
            power_gap = torch.expm1(alpha * torch.log(q_star)) - torch.expm1(alpha * log_q)
            total = total + q_alpha * (torch.exp(log_q) - q_star) + q_star * power_gap / alpha
        return total
    raise ValueError(f"unknown generator {generator!r}; choose from {GENERATORS}")


def bregman_grad(h: torch.Tensor, target: torch.Tensor | float = 1.0, generator: str = "logistic",
                 alpha: float = 0.5) -> torch.Tensor:
    """dD/dh in closed form: −φ''(p)·(p* − p)·p(1 − p) (documented in docs/method.md; tested against autograd)."""
    target = torch.as_tensor(target, dtype=h.dtype, device=h.device)
    p = torch.sigmoid(h)
    if generator == "logistic":
        return p - target
    if generator == "squared":
        return -4 * (target - p) * p * (1 - p)
    if generator == "basu":
        return -(1 + alpha) * (target - p) * (p.pow(alpha) * (1 - p) + (1 - p).pow(alpha) * p)
    raise ValueError(f"unknown generator {generator!r}; choose from {GENERATORS}")


def npo_loss(policy_logp: torch.Tensor, ref_logp: torch.Tensor, beta: float) -> torch.Tensor:
    """NPO (Zhang et al. 2024): (2/β)·log(1 + (π(y)/π_ref(y))^β) = (2/β)·softplus(β·(log π − log π_ref))."""
    return (2.0 / beta) * F.softplus(beta * (policy_logp - ref_logp))
