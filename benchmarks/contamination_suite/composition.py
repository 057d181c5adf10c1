"""What each cell of the correction factorial pushes down and up, and hypothesis R (docs/method.md §5.4): the
anchored IBO corrects through the known refusals it trains up, not through the culprits it trains down.

A cell's pairs are a function of the committed recall stage (per-row scores and tiers) and the seed, so they are
recomputed here with the correction's own ``select_rows``, not read from a run directory: the culprits (the
stage's positive tiers) and the known refusals (``REFUSAL_TIERS``) on each side. ``refusal_hypothesis`` tests the
predictions fixed before the cells ran: per seed, Spearman's ρ (ties averaged) of gap closed with the net refusals
(preferred − dispreferred) and with the culprits dispreferred, over the eight cells. ``weighted_pairs`` rebuilds
each cell's actual IBO pairs from a run directory (the IQ pairs, same-prompt partners and gap weights the counts
leave out), for the exploratory weighted refusal share. ``weight_hypothesis`` tests hypothesis W (the weight on the
IQ pairs corrects): it fails at the first comparison of ``fx_uniform`` with ``fx_random`` that goes against it.
"""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Callable
from pathlib import Path

import torch

from benchmarks.safety_contamination.config import FACTORIAL, Preset
from lancet.artifacts import hash_json, load_tensors
from lancet.correct.pairs import build_ibo_pairs, select_rows

# the mix's safe rows that refuse an unsafe prompt (``refusal_shared``: those sharing the culprits' prompts)
REFUSAL_TIERS = ("refusal", "refusal_shared")
MIN_RHO = 0.5  # prediction (1): ρ with the net refusals at least this


def _cell_rows(scores: dict, tiers: list[str], positive: set[str], seed: int, cell: str) -> tuple[list, list, dict]:
    """One factorial cell's (dispreferred, preferred) row indices as the correction selects them, and its options."""
    method, variant = FACTORIAL[cell]
    if method != "ibo":
        raise ValueError(f"{cell}: the composition is IBO's pairs, not {method!r}'s")
    culprits = torch.tensor([t in positive for t in tiers])
    ranking = torch.as_tensor(scores[variant.get("scores", Preset.correction_ranking)], dtype=torch.float64)
    marked = torch.tensor([t == variant["preferred_tier"] for t in tiers]) if "preferred_tier" in variant else None
    down, up = select_rows(ranking, int(culprits.sum()), variant.get("ranking", "influence"), culprits, seed=seed,
                           preferred=variant.get("preferred"), preferred_mask=marked)
    return down, up, variant


def pair_composition(recall: dict, seed: int) -> dict[str, dict[str, int]]:
    """Per factorial cell, the rows its IBO pairs push down (dispreferred) and up (preferred) on one seed, counted
    as culprits and known refusals, from the recall stage ``recall`` (``scores``, ``tiers``, ``positive_tiers``);
    k = the number of culprits, as the correction's ``top_k``."""
    tiers = recall["tiers"]
    positive = set(recall["positive_tiers"])
    out = {}
    for cell in FACTORIAL:
        down, up, _ = _cell_rows(recall["scores"], tiers, positive, seed, cell)
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
                       minus_main_ci: dict[str, list | None] | None = None, weighted: dict | None = None
                       ) -> dict | None:
    """Hypothesis R's predictions (1) and (2) on one seed, once every factorial cell has its gap closed (None
    before): ρ of gap closed with the net refusals and with the culprits dispreferred, whether (1) holds, and
    whether ``fx_repsim`` closes less than ``fx_default`` with its within-seed interval of the difference
    (``minus_main_ci``: repsim − default) above 0; with the seed's ``weighted_pairs`` cells, the exploratory ρ of
    gap closed with the weighted refusal share."""
    cells = list(FACTORIAL)
    if any(gap_closed.get(c) is None for c in cells):
        return None
    gaps = [gap_closed[c] for c in cells]
    rho_refusals = spearman_ties([composition[c]["net_refusals"] for c in cells], gaps)
    rho_culprits = spearman_ties([composition[c]["culprits_dispreferred"] for c in cells], gaps)
    ci = (minus_main_ci or {}).get("fx_repsim")
    rho_weighted = spearman_ties([weighted[c]["weighted_refusals"] for c in cells], gaps) if weighted else None
    return {"rho_net_refusals": rho_refusals, "rho_culprits_dispreferred": rho_culprits,
            "rho_weighted_refusals": rho_weighted,
            "prediction_1": (rho_refusals is not None and rho_refusals >= MIN_RHO
                             and (rho_culprits is None or rho_refusals > rho_culprits)),
            "prediction_2": gap_closed["fx_repsim"] < gap_closed["fx_default"] and bool(ci) and ci[0] is not None
            and ci[0] > 0}


def weight_hypothesis(gaps: dict[str, dict[str, dict[str, float | None]]]) -> dict:
    """Hypothesis W's prediction (docs/method.md §5.4): ``gaps[seed][budget][cell]``, the gap closed by
    ``fx_uniform`` and ``fx_random`` within 5 % (``"budget"``) and at the retrained model's cost
    (``"retrained_cost"``) on each reported seed. The prediction needs all of them one way, so one comparison
    where ``fx_uniform`` closes as much or more fails it at once; otherwise ``holds`` is None until every
    comparison exists, then True."""
    pairs = [(b["fx_uniform"], b["fx_random"]) for seed in gaps.values() for b in seed.values()]
    measured = [(u, r) for u, r in pairs if u is not None and r is not None]
    if any(u >= r for u, r in measured):
        return {"gaps": gaps, "holds": False}
    return {"gaps": gaps, "holds": True if pairs and len(measured) == len(pairs) else None}


def weighted_pairs(run_dir: Path, seed: int, positive_tiers: tuple[str, ...], max_length: int) -> dict:
    """Each factorial cell's actual IBO pairs on one seed, rebuilt from its run directory (``mix.jsonl`` with each
    row's tier as its label, ``rankings.*``, ``iqs.jsonl``, the impure model's tokenizer; no model): the number of
    pairs and the share of pair weight whose rejected side is an IQ, a culprit or a known refusal and whose chosen
    side is a known refusal or a culprit (docs/method.md §5.4). Checked against each cell's ``lancet_correction.json``
    where the run has one (its ``n_items``: the same pairs)."""
    from lancet.data.readers import read_records
    from lancet.data.tokenize import encode_records
    from lancet.models.loading import load_tokenizer

    run_dir = Path(run_dir)
    records = {r.id: r for r in read_records(run_dir / "mix.jsonl")}
    ids = json.loads((run_dir / "rankings.json").read_text())["ids"]
    tiers = [records[i].label for i in ids]
    tok = load_tokenizer(str(run_dir / "impure"))
    rows = list(encode_records([records[i] for i in ids], tok, max_length, progress=False))
    iqs = list(encode_records(read_records(run_dir / "iqs.jsonl"), tok, max_length, progress=False))
    scores = load_tensors(run_dir / "rankings.safetensors")
    tier_of = dict(zip(ids, tiers, strict=True))
    iq_ids = {r["id"] for r in iqs}
    out = {"row_ids": hash_json(ids), "seed": seed, "cells": {}}
    for cell in FACTORIAL:
        down, up, variant = _cell_rows(scores, tiers, set(positive_tiers), seed, cell)
        ranking = scores[variant.get("scores", Preset.correction_ranking)].double()
        pairs = build_ibo_pairs(ranking, rows, top_k=len(down), iq_rows=iqs, seed=seed, selection=(down, up),
                                weighting=variant.get("weighting", "gap"))
        total = sum(p["weight"] for p in pairs)

        def share(test, pairs=pairs, total=total) -> float:
            return round(sum(p["weight"] for p in pairs if test(p)) / total, 4)

        out["cells"][cell] = {
            "pairs": len(pairs), "rejected_iq": share(lambda pair: pair["rejected"]["id"] in iq_ids),
            "rejected_culprit": share(_side_in(tier_of, "rejected", positive_tiers)),
            "rejected_refusal": share(_side_in(tier_of, "rejected", REFUSAL_TIERS)),
            "chosen_refusal": share(_side_in(tier_of, "chosen", REFUSAL_TIERS)),
            "chosen_culprit": share(_side_in(tier_of, "chosen", positive_tiers))}
        out["cells"][cell]["weighted_refusals"] = round(out["cells"][cell]["chosen_refusal"]
                                                        - out["cells"][cell]["rejected_refusal"], 4)
        recorded = sorted(run_dir.glob(f"correct-{cell}-lr*/lancet_correction.json"))
        if recorded and (n := json.loads(recorded[0].read_text())["n_items"]) != len(pairs):
            raise SystemExit(f"{recorded[0]}: {n} pairs trained, {len(pairs)} rebuilt for {cell}")
    return out


def _side_in(tier_of: dict[str, str], side: str, group) -> Callable[[dict], bool]:
    """Whether a pair's ``side`` ("chosen" or "rejected") is a training row of a tier in ``group``."""
    return lambda pair: tier_of.get(pair[side]["id"]) in group
