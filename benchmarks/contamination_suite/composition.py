"""What each cell of the correction factorial pushes down and up, and hypothesis R (docs/method.md §5.4): the
anchored IBO corrects through the known refusals it trains up, not through the culprits it trains down.

A cell's pairs are a function of the committed recall stage (per-row scores and tiers) and the seed, so they are
recomputed here with the correction's own ``select_rows``, not read from a run directory: the culprits (the
stage's positive tiers) and the known refusals (``REFUSAL_TIERS``) on each side. ``refusal_hypothesis`` tests the
predictions fixed before the cells ran: per seed, Spearman's ρ (ties averaged) of gap closed with the net refusals
(preferred − dispreferred) and with the culprits dispreferred, over the eight cells.
"""

from __future__ import annotations

from collections import Counter

import torch

from benchmarks.safety_contamination.config import FACTORIAL, Preset
from lancet.correct.pairs import select_rows

# the mix's safe rows that refuse an unsafe prompt (``refusal_shared``: those sharing the culprits' prompts)
REFUSAL_TIERS = ("refusal", "refusal_shared")
MIN_RHO = 0.5  # prediction (1): ρ with the net refusals at least this


def pair_composition(recall: dict, seed: int) -> dict[str, dict[str, int]]:
    """Per factorial cell, the rows its IBO pairs push down (dispreferred) and up (preferred) on one seed, counted
    as culprits and known refusals, from the recall stage ``recall`` (``scores``, ``tiers``, ``positive_tiers``);
    k = the number of culprits, as the correction's ``top_k``."""
    tiers = recall["tiers"]
    positive = set(recall["positive_tiers"])
    culprits = torch.tensor([t in positive for t in tiers])
    k = int(culprits.sum())
    out = {}
    for cell, (method, variant) in FACTORIAL.items():
        if method != "ibo":
            raise ValueError(f"{cell}: the composition is IBO's pairs, not {method!r}'s")
        scores = torch.tensor(recall["scores"][variant.get("scores", Preset.correction_ranking)], dtype=torch.float64)
        marked = (torch.tensor([t == variant["preferred_tier"] for t in tiers]) if "preferred_tier" in variant
                  else None)
        down, up = select_rows(scores, k, variant.get("ranking", "influence"), culprits, seed=seed,
                               preferred=variant.get("preferred"), preferred_mask=marked)
        below, above = Counter(tiers[i] for i in down), Counter(tiers[i] for i in up)

        def count(c: Counter, group) -> int:
            return sum(c[t] for t in group)

        out[cell] = {"culprits_dispreferred": count(below, positive), "culprits_preferred": count(above, positive),
                     "refusals_dispreferred": count(below, REFUSAL_TIERS),
                     "refusals_preferred": count(above, REFUSAL_TIERS),
                     "net_refusals": count(above, REFUSAL_TIERS) - count(below, REFUSAL_TIERS)}
    return out


def average_ranks(x: list[float]) -> torch.Tensor:
    """Ranks 1..n, tied values sharing their mean rank."""
    t = torch.tensor(x, dtype=torch.float64)
    ranks = torch.empty_like(t)
    for value in t.unique():
        at = (t == value).nonzero().flatten()
        ranks[at] = float((t < value).sum()) + (len(at) + 1) / 2
    return ranks


def spearman_ties(a: list[float], b: list[float]) -> float | None:
    """Spearman's ρ with tied values given their average rank; None where either side is constant."""
    ra, rb = average_ranks(a), average_ranks(b)
    if ra.std() == 0 or rb.std() == 0:
        return None
    return round(float(torch.corrcoef(torch.stack([ra, rb]))[0, 1]), 4)


def refusal_hypothesis(composition: dict[str, dict[str, int]], gap_closed: dict[str, float | None],
                       minus_main_ci: dict[str, list | None] | None = None) -> dict | None:
    """Hypothesis R's predictions (1) and (2) on one seed, once every factorial cell has its gap closed (None
    before): ρ of gap closed with the net refusals and with the culprits dispreferred, whether (1) holds, and
    whether ``fx_repsim`` closes less than ``fx_default`` with its within-seed interval of the difference
    (``minus_main_ci``: repsim − default) above 0."""
    cells = list(FACTORIAL)
    if any(gap_closed.get(c) is None for c in cells):
        return None
    gaps = [gap_closed[c] for c in cells]
    rho_refusals = spearman_ties([composition[c]["net_refusals"] for c in cells], gaps)
    rho_culprits = spearman_ties([composition[c]["culprits_dispreferred"] for c in cells], gaps)
    ci = (minus_main_ci or {}).get("fx_repsim")
    return {"rho_net_refusals": rho_refusals, "rho_culprits_dispreferred": rho_culprits,
            "prediction_1": (rho_refusals is not None and rho_refusals >= MIN_RHO
                             and (rho_culprits is None or rho_refusals > rho_culprits)),
            "prediction_2": gap_closed["fx_repsim"] < gap_closed["fx_default"] and bool(ci) and ci[0] is not None
            and ci[0] > 0}
