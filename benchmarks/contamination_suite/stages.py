"""The suite's stage files: one small JSON per (design, seed, stage), committed under
benchmarks/results/contamination_suite/<design>/ as each stage finishes, so that a later session resumes from them
(and rebuilds a lost model from its seed only for a stage not yet committed). Nothing generated is in them: rows
are named by their tier, answers' openings by hashed 4-grams, the judge's reading of an answer by a 0/1 verdict.

- ``seed<S>_gate.json``: the causation gate of one seed (``gate.gate_stage``).
- ``seed<S>_recall.json``: every method's ranking of the seed's training rows (``scores``: the aggregated score of
  each row, 8 significant digits), each row's ``tiers``, the culprits' and the IQ answers' opening 4-grams; or,
  for a seed whose rankings are gone, each method's ``metrics`` alone (the committed lexical seeds).
- ``seed<S>_counterfactual.json``: per retraining seed, the judge's verdict on each test prompt for the impure
  model, the oracle (the safe model) and each retrained model, with the k of each retraining.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from benchmarks.common import RESULTS
from benchmarks.contamination_suite.behaviour import derived_rankings
from benchmarks.contamination_suite.overlap import opening_grams
from benchmarks.contamination_suite.stats import SeedScores
from lancet.artifacts import atomic_write_json

STAGE_DIR = RESULTS / "contamination_suite"
STAGES = ("gate", "recall", "counterfactual")


def stage_path(root: Path, design: str, seed: int, stage: str) -> Path:
    if stage not in STAGES:
        raise ValueError(f"unknown stage {stage!r} (known: {', '.join(STAGES)})")
    return Path(root) / design / f"seed{seed}_{stage}.json"


def read_stage(root: Path, design: str, seed: int, stage: str) -> dict | None:
    path = stage_path(root, design, seed, stage)
    return json.loads(path.read_text()) if path.is_file() else None


def write_stage(root: Path, stage: dict) -> Path:
    """Write (atomically) a stage dict that names its design, seed and stage."""
    path = stage_path(root, stage["design"], stage["seed"], stage["stage"])
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_json(path, stage)
    return path


def recall_stage(design: str, seed: int, tiers: list[str], positive_tiers: tuple[str, ...],
                 scores: dict[str, torch.Tensor], culprit_answers: dict[int, str] | None = None,
                 iq_answers: list[str] | None = None, n_iqs: int | None = None,
                 regime: dict[str, dict] | None = None) -> dict:
    """The recall stage of one seed from its rankings (aggregated [N] scores per method, rows in the mix's order)
    and, for the overlap check, the culprits' answers (by row index) and the IQ answers: only their hashed opening
    4-grams are kept. ``regime``: {method: lancet.influence.regime's readout of that ranking}, the numbers the
    suite calibrates the readout with."""
    n = len(tiers)
    bad = [m for m, s in scores.items() if s.shape != (n,)]
    if bad:
        raise ValueError(f"ranking {bad[0]!r} has shape {tuple(scores[bad[0]].shape)}, not ({n},)")
    out = {"design": design, "seed": seed, "stage": "recall", "tiers": list(tiers),
           "positive_tiers": list(positive_tiers), "n_iqs": n_iqs,
           "scores": {m: [float(f"{v:.8g}") for v in s.double().tolist()] for m, s in scores.items()}}
    if regime is not None:
        out["regime"] = regime
    if culprit_answers is not None and iq_answers is not None:
        out["openings"] = {"culprits": {str(i): sorted(opening_grams(a, hashed=True))
                                        for i, a in sorted(culprit_answers.items())},
                           "iqs": [sorted(opening_grams(a, hashed=True)) for a in iq_answers]}
    return out


def seed_scores(stage: dict) -> SeedScores:
    """A recall stage as the bootstrap's input."""
    if "scores" in stage:
        scores = {m: torch.tensor(v, dtype=torch.float64) for m, v in stage["scores"].items()}
        return SeedScores(stage["seed"], stage["tiers"], tuple(stage["positive_tiers"]),
                          {**scores, **derived_rankings(scores)})
    return SeedScores(stage["seed"], positive_tiers=tuple(stage.get("positive_tiers", ())), fixed=stage["metrics"])


def openings(stage: dict) -> tuple[list[set | None], list[set]] | None:
    """(each row's opening grams, None for non-culprits; each IQ answer's), or None if the stage has none."""
    if "openings" not in stage:
        return None
    culprits = {int(i): set(g) for i, g in stage["openings"]["culprits"].items()}
    return [culprits.get(i) for i in range(len(stage["tiers"]))], [set(g) for g in stage["openings"]["iqs"]]


def counterfactual_stage(design: str, seed: int) -> dict:
    return {"design": design, "seed": seed, "stage": "counterfactual", "impure": {}, "oracle": {}, "runs": {}}


def record_reference(root: Path, design: str, seed: int, which: str, retrain_seed: int,
                     verdicts: list[int | bool]) -> dict:
    """Add the impure (``which="impure"``) or the oracle (``"oracle"``: the safe model) model's verdicts at one
    retraining seed to the counterfactual stage file, and write it."""
    if which not in ("impure", "oracle"):
        raise ValueError(f"which is 'impure' or 'oracle', not {which!r}")
    stage = read_stage(root, design, seed, "counterfactual") or counterfactual_stage(design, seed)
    stage[which][str(retrain_seed)] = [int(v) for v in verdicts]
    write_stage(root, stage)
    return stage


def record_retrained(root: Path, design: str, seed: int, method: str, k_name: str, k: int, retrain_seed: int,
                     verdicts: list[int | bool], positives_removed: int | None = None) -> dict:
    """Add one retrained model (``method``'s top ``k`` rows removed, trained at ``retrain_seed``) to the
    counterfactual stage file, and write it: each retraining is kept as soon as it is measured."""
    stage = read_stage(root, design, seed, "counterfactual") or counterfactual_stage(design, seed)
    run = stage["runs"].setdefault(method, {}).setdefault(k_name, {"k": k, "verdicts": {}, "positives_removed": {}})
    if run["k"] != k:
        raise ValueError(f"{method} {k_name}: k {k} differs from the k {run['k']} already recorded")
    run["verdicts"][str(retrain_seed)] = [int(v) for v in verdicts]
    run["positives_removed"][str(retrain_seed)] = positives_removed
    write_stage(root, stage)
    return stage


def top_rows(scores: list[float], k: int) -> list[int]:
    """The indices of the ``k`` highest-scored rows of a stage's ranking (ties: the earlier row), what a
    counterfactual or filter-and-retrain model is trained without."""
    return torch.argsort(torch.tensor(scores, dtype=torch.float64), descending=True, stable=True)[:k].tolist()


def has_retrained(stage: dict | None, method: str, k_name: str, retrain_seed: int) -> bool:
    """Is this retraining already measured (a resumed run skips it)?"""
    return bool(stage) and str(retrain_seed) in stage["runs"].get(method, {}).get(k_name, {}).get("verdicts", {})


def from_committed(result: dict, design: str = "lexical") -> list[dict]:
    """Stage files from a committed safety-contamination result (``safety_contamination_full.json``): each seed's
    gate, its recall as metrics alone (the per-row rankings were not committed), and the counterfactual's rates
    (as one-element verdict lists at the design seed's own training order: only retraining seeds vary them)."""
    out = []
    for s in result["per_seed"]:
        seed, gate = s["seed"], s.get("gate")
        if gate:
            out.append({"design": design, "seed": seed, "stage": "gate", "safe": gate["safe"],
                        "impure": gate["impure"], "judge_agreement": gate["judge_agreement"],
                        "judge_labelled": gate.get("judge_labelled", 0), "n_prompts": gate.get("n_prompts")})
        if "recall" in s:
            metrics = {m: {"ap": r["average_precision"], "recall_at_p": r["recall"],
                           **{f"ap:{t}": v for t, v in r.get("ap_by_tier", {}).items()}}
                       for m, r in s["recall"]["methods"].items()}
            out.append({"design": design, "seed": seed, "stage": "recall", "metrics": metrics,
                        "positive_tiers": sorted({t for r in metrics.values() for t in
                                                  (k.split(":", 1)[1] for k in r if k.startswith("ap:"))}),
                        "n_iqs": s["recall"].get("n_iqs"), "from_committed": True})
        if "counterfactual" in s:
            cf, r = s["counterfactual"], str(seed)
            runs = {m: {"k_full": {"k": cf["k"], "verdicts": {r: [v["compliance"]]},
                                   "positives_removed": {r: v.get("positives_removed")}}}
                    for m, v in cf["methods"].items()}
            out.append({"design": design, "seed": seed, "stage": "counterfactual", "impure": {r: [cf["impure"]]},
                        "oracle": {r: [cf["oracle"]]}, "runs": runs, "from_committed": True})
    return out
