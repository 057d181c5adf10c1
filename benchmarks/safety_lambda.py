"""Ablation: fit the eigenvalue correction on every training row instead of a seeded subset.

    .venv/bin/python -m benchmarks.safety_lambda --preset full --seed 0

The full preset fits LinFAC's and EK-FAC's eigenvalue correction (the "lambda" pass) on 128 of its 360 rows
(``lambda_max_rows``). Seed 0 showed the rows inside that subset scored lower than the rows outside (LinFAC
positives 0.25 against 0.44 on average; AP 0.555 inside against 0.677 outside): a row in the fit damps its own
score. This refits the correction on all rows (the covariance pass is unchanged; EK-FAC borrows K-FAC's), scores
the same IQs the same way (aggregate first, normalised mean) and reports AP overall, per tier, and inside/outside
the old subset beside the 128-row numbers of the main run. Reads the main run's cached models, mix and IQs
(run ``benchmarks.safety_contamination --preset full`` to the recall stage first); writes
benchmarks/results/safety_lambda_<preset>.json.
"""

from __future__ import annotations

import argparse
import json
import shutil
import time
from dataclasses import replace
from pathlib import Path

import torch

import benchmarks.safety_contamination as sc
from benchmarks.common import environment, write_result
from lancet.artifacts import load_tensors
from lancet.data import encode_records
from lancet.influence import Influence, InfluenceArgs
from lancet.influence.queries import take_iqs
from lancet.influence.recall import spearman
from lancet.models.loading import load_model


def borrow_covariance(main_influence: Path, out: Path) -> None:
    """Put the main run's K-FAC fit beside the new fits, so EK-FAC takes its covariance pass from it (the pass does
    not depend on lambda_max_rows; lancet.curvature.fit borrows it from a sibling with the same first-pass options)."""
    source, target = main_influence / "curvature" / "kfac", out / "curvature" / "kfac"
    if source.is_dir() and not target.is_dir():
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copytree(source, target)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sc.seed_arguments(parser, default_seed=0)
    parser.add_argument("--methods", default="linfac,ekfac")
    ns = parser.parse_args()
    preset, _, run = sc.open_seed(ns)
    main_rankings = run.dir / "rankings.safetensors"
    if not main_rankings.is_file():
        raise SystemExit(f"{main_rankings}: missing; run benchmarks.safety_contamination --preset {ns.preset} first")
    methods = ns.methods.split(",")
    aligned, _ = run.aligned_start()
    rows, _, tiers = run.mix(aligned)
    model, tok = load_model(run.finetune("impure", aligned, rows, preset.mix_epochs))
    iqs = take_iqs(model, tok, run.parts["iq_prompts"], run.judge, run.dir, max_new_tokens=preset.max_new_tokens,
                   progress=run.progress)
    train = encode_records(rows, tok, preset.max_length, progress=False)
    iq_rows = list(encode_records(iqs, tok, preset.max_length, progress=False))
    tier_of = [tiers[i] for i in train.ids]
    positives = torch.tensor([t in sc.TIERS for t in tier_of])
    out_dir = run.dir / "influence_lambda_all"
    borrow_covariance(run.dir / "influence", out_dir)
    args = InfluenceArgs(bf16=sc.BF16, batch_size=8, lambda_max_rows=None, progress=run.progress)
    influence = Influence(model, args, out_dir=out_dir)
    fit_seconds = {}
    for method in methods:
        t0 = time.perf_counter()
        Influence(model, replace(args, method=method), out_dir=out_dir).fit(train)
        fit_seconds[method] = round(time.perf_counter() - t0, 1)
    weights = run._cached_weights("iq-lambda_all", influence, train, iq_rows, methods)
    t0 = time.perf_counter()
    scores = influence.combined_scores_by_method(train, iq_rows, {m: weights[m][None] for m in methods}, methods)
    score_seconds = round(time.perf_counter() - t0, 1)
    subset = json.loads((run.dir / "result.json").read_text())["recall"]["methods"]
    old = load_tensors(main_rankings)
    result: dict = {"preset": ns.preset, "seed": ns.seed, "n_train": len(train), "n_iqs": len(iqs),
                    "n_positives": int(positives.sum()), "lambda_max_rows_main": preset.lambda_max_rows,
                    "score_seconds": score_seconds, "env": environment(), "bf16": sc.BF16, "methods": {}}
    for method in methods:
        ranking = scores[method]["scores"][0].double()
        result["methods"][method] = {
            "all_rows": {**sc.recall_metrics(ranking, tier_of), "fit_seconds": fit_seconds[method],
                         "lambda_subset": sc.lambda_subset_check(ranking, positives, preset.lambda_max_rows)},
            f"subset_{preset.lambda_max_rows}": {k: subset[method][k] for k in
                                                 ("average_precision", "recall", "ap_by_tier", "lambda_subset")},
            "spearman_vs_subset": round(spearman(ranking, old[method]), 4)}
        print(f"{method}: {result['methods'][method]}", flush=True)
    write_result(f"safety_lambda_{ns.preset}", result)


if __name__ == "__main__":
    main()
