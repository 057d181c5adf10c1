"""Culprit recall on the demo dataset's contaminated SmolLM2-135M: every estimator, BM25 and random.

    .venv/bin/python -m benchmarks.demo_recall [--run-dir runs/demo_recall] [--methods linfac,ekfac,...] [--bf16]

Fine-tunes (or reuses) the contaminated model exactly as `lancet demo` does, takes its IQs (the contaminated
model's own answers to the 12 IQ prompts, kept when they show the planted behaviour), scores all 304 training rows
and reports average precision and recall@k of the 48 known culprit rows, and where the 16 counter rows land.
Writes benchmarks/results/demo_recall.json.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from benchmarks.common import RESULTS, environment, random_baseline, write_result
from lancet.data import encode_records
from lancet.demo import stage_contaminate, stage_data, stage_iqs
from lancet.influence import Influence, InfluenceArgs
from lancet.influence.recall import aggregate, average_precision, recall_at_k
from lancet.models.loading import load_model

METHODS = ["linfac", "ekfac", "kfac", "kfac_reduce", "diagonal", "identity", "bm25"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--run-dir", default="runs/demo_recall")
    parser.add_argument("--methods", default=",".join(METHODS))
    parser.add_argument("--bf16", action="store_true")
    ns = parser.parse_args()
    run = Path(ns.run_dir)
    data = stage_data(run)
    model_dir = stage_contaminate(run, data)
    model, tok = load_model(str(model_dir))
    iqs = stage_iqs(run, data, model, tok)
    train = encode_records(data.train, tok, 256, progress=False)
    queries = encode_records(iqs, tok, 256, progress=False)
    culprits = torch.tensor([i in set(data.culprit_ids) for i in train.ids])
    counters = torch.tensor([i in set(data.counter_ids) for i in train.ids])
    result = {"model": "smollm2-135m-instruct + demo contamination", "n_train": len(train),
              "n_culprits": int(culprits.sum()), "n_counter": int(counters.sum()), "n_iqs": len(queries),
              "bf16": ns.bf16, "env": environment(), "methods": {"random": random_baseline(culprits, key="recall@48")}}
    previous = RESULTS / ("demo_recall" + ("_bf16" if ns.bf16 else "") + ".json")
    if previous.is_file():  # keep the methods not rerun this time (each row says when it was measured)
        kept = json.loads(previous.read_text()).get("methods", {})
        result["methods"] = {**{k: v for k, v in kept.items() if k not in ns.methods.split(",")},
                             **result["methods"]}
    for method in ns.methods.split(","):
        t0 = time.perf_counter()
        args = InfluenceArgs(method=method, bf16=ns.bf16, batch_size=8)
        scores = Influence(model, args, out_dir=run / "influence").scores(train, queries)["scores"]
        seconds = time.perf_counter() - t0
        row = {"seconds": round(seconds, 1), "date": environment()["date"]}
        for how in ("normalized_mean", "sum"):
            agg = aggregate(scores.double(), how)
            row[how] = {"average_precision": round(average_precision(agg, culprits), 4),
                        **{f"recall@{k}": round(recall_at_k(agg, culprits, k), 4) for k in (10, 25, 48)},
                        "counter_rows_in_bottom_16": int(counters[torch.argsort(agg)[:16]].sum()),
                        "mean_score_culprit": float(agg[culprits].mean()),
                        "mean_score_counter": float(agg[counters].mean()),
                        "mean_score_ordinary": float(agg[~culprits & ~counters].mean())}
        result["methods"][method] = row
        print(method, row)
        write_result("demo_recall" + ("_bf16" if ns.bf16 else ""), result)  # after each method: partial is kept
    print(f"\n{'method':12s} {'AP':>6s} {'R@10':>6s} {'R@48':>6s} {'counter↓16':>10s} {'seconds':>8s}")
    for method, row in result["methods"].items():
        r = row.get("normalized_mean", row)
        print(f"{method:12s} {r['average_precision']:6.3f} {r.get('recall@10', float('nan')):6.2f} "
              f"{r['recall@48']:6.2f} {r.get('counter_rows_in_bottom_16', ''):>10} {row.get('seconds', ''):>8}")


if __name__ == "__main__":
    main()
