"""Choosing a correction's settings without reading its test set (docs/method.md §3.7).

The IQ prompts are split into disjoint correction, validation and test parts. A candidate (a method, its options,
a checkpoint's step count) is judged on the validation part only: its behaviour rate there, and its utility loss,
the relative perplexity increase on held-out ordinary answers. The rule: the lowest validation behaviour among the
candidates whose validation utility loss is within ``max_utility_loss``; ties go to fewer steps. Test numbers
travel with a candidate, for the report, and ``choose`` never reads them.
"""

from __future__ import annotations

import json
import random
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from lancet.errors import LancetError

DEFAULT_MAX_UTILITY_LOSS = 0.05  # 5 % more perplexity on held-out ordinary answers


def split_prompts(prompts: Sequence[Any], fractions: tuple[float, float, float] = (0.4, 0.3, 0.3), seed: int = 0
                  ) -> tuple[list[Any], list[Any], list[Any]]:
    """(correction, validation, test): a seeded shuffle cut by ``fractions``; disjoint, and together all prompts."""
    if len(fractions) != 3 or any(f <= 0 for f in fractions) or abs(sum(fractions) - 1) > 1e-9:
        raise LancetError(f"fractions must be three positive numbers summing to 1, got {fractions}")
    if len(prompts) < 3:
        raise LancetError(f"need at least 3 prompts to split into correction, validation and test, got {len(prompts)}")
    order = list(range(len(prompts)))
    random.Random(seed).shuffle(order)
    n_corr = max(1, round(fractions[0] * len(order)))
    n_val = max(1, round(fractions[1] * len(order)))
    n_corr = min(n_corr, len(order) - 2)
    n_val = min(n_val, len(order) - n_corr - 1)
    cut = [order[:n_corr], order[n_corr:n_corr + n_val], order[n_corr + n_val:]]
    return tuple([prompts[i] for i in sorted(part)] for part in cut)  # type: ignore[return-value]


def utility_loss(perplexity_before: float, perplexity_after: float) -> float:
    """Relative perplexity increase on held-out ordinary answers (0.05 = 5 % worse; negative = better)."""
    if not perplexity_before > 0:
        raise LancetError(f"perplexity before must be > 0, got {perplexity_before}")
    return perplexity_after / perplexity_before - 1.0


@dataclass(frozen=True)
class Candidate:
    """One trained point: its settings, optimizer steps, and its validation numbers. ``test`` holds whatever the
    report shows on test prompts; selection never reads it."""

    settings: dict[str, Any]
    steps: int
    validation_behaviour: float
    validation_utility_loss: float
    test: Any = field(default=None, compare=False, repr=False)


def choose(candidates: Sequence[Candidate], max_utility_loss: float = DEFAULT_MAX_UTILITY_LOSS) -> Candidate:
    """The lowest validation behaviour within the utility budget; ties: fewer steps, then the settings' JSON."""
    feasible = [c for c in candidates if c.validation_utility_loss <= max_utility_loss]
    if not feasible:
        best = min((c.validation_utility_loss for c in candidates), default=float("nan"))
        raise LancetError(f"no candidate keeps the validation utility loss within {max_utility_loss:.3f} (the "
                          f"smallest is {best:.3f}); lower the learning rate or the steps, or raise the budget")
    return min(feasible, key=lambda c: (c.validation_behaviour, c.steps, json.dumps(c.settings, sort_keys=True)))
