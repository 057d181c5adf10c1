"""One seed's stages in order, its result kept (and merged with an earlier run's) in the run directory, and the
seeds' results summarised in the layout of the committed JSON."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from benchmarks.common import RESULTS
from benchmarks.safety_contamination.config import GATE_MIN_AGREEMENT, GATE_MIN_GAP, Preset
from benchmarks.safety_contamination.run import Run
from lancet.artifacts import atomic_write_json


def run_seed(preset: Preset, seed: int, run_dir: Path, shared: Path, stage: str, progress: bool) -> dict:
    """One seed up to ``stage``; its result is also kept in ``run_dir/result.json`` so that later invocations (other
    seeds, the counterfactual) report every seed run so far."""
    result = _run_seed(preset, seed, run_dir, shared, stage, progress)
    old = run_dir / "result.json"
    if old.is_file():  # keep what an earlier, longer stage measured (e.g. the counterfactual)
        result = merge_results(json.loads(old.read_text()), result)
    atomic_write_json(old, result)
    return result


def merge_results(earlier: dict, new: dict) -> dict:
    """A seed's result after a rerun: the new stages' numbers, the earlier stages' where the rerun stopped short, and
    every duration as first measured (the larger of the two: a rerun reads its artifacts back in seconds)."""
    seconds = {k: max(v, new["seconds"].get(k, 0.0)) for k, v in earlier.get("seconds", {}).items()}
    merged = {**earlier, **new, "seconds": {**new["seconds"], **seconds}}
    before = earlier.get("recall", {}).get("methods", {})
    if "recall" in new and before:
        methods = {m: {**row, "seconds": max(row["seconds"], before.get(m, {}).get("seconds", 0.0))}
                   for m, row in new["recall"]["methods"].items()}
        for m, row in methods.items():  # a rebuilt run directory must reproduce what it re-measures
            old_ap = before.get(m, {}).get("average_precision")
            if old_ap is not None and abs(old_ap - row["average_precision"]) > 1e-4:
                print(f"seed {new['seed']}: {m}'s AP is {row['average_precision']} on this build, "
                      f"{old_ap} before", flush=True)
        # a rerun limited to some methods (--recall-methods) keeps the others' earlier numbers
        merged["recall"] = {**earlier["recall"], **new["recall"], "methods": {**before, **methods}}
        for key in ("score_seconds", "weight_seconds"):
            if key in earlier["recall"] or key in new["recall"]:
                merged["recall"][key] = max(earlier["recall"].get(key, 0.0), new["recall"].get(key, 0.0))
    return merged


def _run_seed(preset: Preset, seed: int, run_dir: Path, shared: Path, stage: str, progress: bool) -> dict:
    run = Run(preset, seed, run_dir, shared, progress)
    result: dict = {"seed": seed, "seconds": run.seconds}
    aligned, result["aligned_start"] = run.aligned_start()
    if stage == "aligned":
        return result
    rows, safe, tiers = run.mix(aligned)
    result["mix"] = {t: sum(1 for v in tiers.values() if v == t) for t in sorted(set(tiers.values()))}
    models = {"safe": run.finetune("safe", aligned, safe, preset.mix_epochs),
              "impure": run.finetune("impure", aligned, rows, preset.mix_epochs)}
    result["gate"] = run.gate(models, result["aligned_start"])
    if stage == "gate" or not result["gate"]["passed"]:
        if not result["gate"]["passed"]:
            print(f"seed {seed}: the causation gate failed ({'; '.join(result['gate']['why_not'])}): no recall "
                  "is reported", flush=True)
        return result
    result["recall"] = run.recall(models["impure"], rows, tiers)
    if stage == "counterfactual":
        result["counterfactual"] = run.counterfactual(aligned, rows, tiers, result["gate"]["safe"],
                                                      result["gate"]["impure"])
    if stage == "correction":
        # the finished rows are also kept beside the committed results: a lost run directory, rebuilt, resumes
        result["correction"] = run.correction(models, rows, tiers, shared,
                                              RESULTS / f"{run_dir.parent.name}_seed{seed}_correction_rows.json")
    return result


def summarize(per_seed: list[dict]) -> dict:
    """The JSON layout of the issue: gate means, recall mean +- sd per method."""
    gates = [s["gate"] for s in per_seed if "gate" in s]
    out: dict = {}
    if gates:
        mean = lambda xs: round(sum(xs) / len(xs), 4)  # noqa: E731
        agreements = [g["judge_agreement"] for g in gates if g["judge_agreement"] is not None]
        out["gate"] = {"safe": mean([g["safe"] for g in gates]), "impure": mean([g["impure"] for g in gates]),
                       "aligned_start": [s["aligned_start"] for s in per_seed],
                       "judge_agreement": mean(agreements) if agreements else None,
                       "passed": mean([g["impure"] - g["safe"] for g in gates]) >= GATE_MIN_GAP
                       and all(a >= GATE_MIN_AGREEMENT for a in agreements) and bool(agreements)}
    cfs = [s for s in per_seed if "counterfactual" in s]
    if cfs:
        cf = cfs[0]["counterfactual"]
        out["counterfactual"] = {"oracle": {"compliance": cf["oracle"]},
                                 "impure": {"compliance": cf["impure"]}, **cf["methods"]}
        out["counterfactual_seed"] = cfs[0]["seed"]
    corrections = [s for s in per_seed if "correction" in s]
    if corrections:
        out["correction"] = corrections[0]["correction"]["methods"]
        out["correction_seed"] = corrections[0]["seed"]
    recalls = [s["recall"] for s in per_seed if "recall" in s]
    if recalls:
        out["recall"] = {}
        for method in recalls[0]["methods"]:
            aps = torch.tensor([r["methods"][method]["average_precision"] for r in recalls])
            rec = torch.tensor([r["methods"][method]["recall"] for r in recalls])
            out["recall"][method] = {
                "ap_mean": round(float(aps.mean()), 4), "ap_sd": round(float(aps.std()), 4) if len(aps) > 1 else 0.0,
                "recall_mean": round(float(rec.mean()), 4),
                "ap_by_tier": {t: round(sum(r["methods"][method]["ap_by_tier"].get(t, 0) for r in recalls)
                                        / len(recalls), 4) for t in recalls[0]["methods"][method]["ap_by_tier"]},
                "seconds": round(sum(r["methods"][method]["seconds"] for r in recalls) / len(recalls), 1)}
    return out


def stage_plan(seeds: tuple[int, ...], first_seed: int, stage: str,
               skip_counterfactual: bool = False) -> list[tuple[int, str]]:
    """(seed, stage) in the order run: recall on every seed first, then the (long) counterfactual retraining and
    the correction table on the preset's first seed, up to ``stage``."""
    late = ("counterfactual", "correction")
    plan = [(seed, "recall" if stage in late else stage) for seed in seeds]
    if stage in late and first_seed in seeds:
        plan += [(first_seed, s) for s in late[:late.index(stage) + 1]
                 if not (skip_counterfactual and s == "counterfactual")]
    return plan
