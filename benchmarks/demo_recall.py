"""Culprit recall on the demo dataset's contaminated SmolLM2-135M: every estimator, BM25 and random.

    .venv/bin/python -m benchmarks.demo_recall [--run-dir runs/demo_recall] [--methods linfac,ekfac,...] [--bf16]
    .venv/bin/python -m benchmarks.demo_recall --from-run demo_out [--methods ...]

Fine-tunes (or reuses) the contaminated model as `lancet demo` does, or with ``--from-run`` takes a finished demo
run's model and IQs; the IQs are the contaminated model's own answers to the 12 IQ prompts that the demo's judge
flags. Scores every training row with each method in one shared pass and reports average precision and recall@k of
the 48 known culprit rows, and where the current-advice rows (look-alikes and counters) land.
Writes benchmarks/results/demo_recall.json.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch

from benchmarks.common import environment, write_result
from lancet.data import encode_records
from lancet.data.readers import read_records
from lancet.demo import stage_contaminate, stage_data, stage_iqs
from lancet.influence import Influence, InfluenceArgs
from lancet.influence.recall import aggregate, average_precision, random_baseline, recall_at_k
from lancet.models.loading import load_model

METHODS = ["linfac", "ekfac", "kfac", "kfac_reduce", "diagonal", "identity", "cosine", "repsim", "bm25"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--run-dir", default="runs/demo_recall")
    parser.add_argument("--methods", default=",".join(METHODS))
    parser.add_argument("--from-run", help="a finished `lancet demo` run: its model and IQs")
    parser.add_argument("--measurement", default="answer", help="answer, first_tokens:K or spans")
    parser.add_argument("--name", default=None, help="results file name (default demo_recall[_bf16])")
    parser.add_argument("--bf16", action="store_true")
    ns = parser.parse_args()
    name = ns.name or "demo_recall" + ("_bf16" if ns.bf16 else "")
    run = Path(ns.run_dir)
    data = stage_data(run)
    if ns.from_run:
        model, tok = load_model(str(Path(ns.from_run) / "model"))
        iqs = read_records(Path(ns.from_run) / "iqs.jsonl")
    else:
        model, tok = load_model(str(stage_contaminate(run, data)))
        iqs = stage_iqs(run, data, model, tok)
    train = encode_records(data.train, tok, 256, progress=False)
    queries = encode_records(iqs, tok, 256, progress=False)
    culprits = torch.tensor([i in set(data.culprit_ids) for i in train.ids])
    counters = torch.tensor([i in set(data.counter_ids) for i in train.ids])
    result = {"model": "smollm2-135m-instruct + demo contamination", "from_run": ns.from_run,
              "n_train": len(train), "n_culprits": int(culprits.sum()), "n_current": int(counters.sum()),
              "n_iqs": len(queries), "measurement": ns.measurement,
              "bf16": ns.bf16, "env": environment(),
              "methods": {"random": random_baseline(culprits, key=f"recall@{int(culprits.sum())}")}}
    methods = ns.methods.split(",")
    t0 = time.perf_counter()
    args = InfluenceArgs(method=methods[0], bf16=ns.bf16, batch_size=8, measurement=ns.measurement)
    every = Influence(model, args, out_dir=run / "influence", tokenizer=tok).scores_by_method(train, queries, methods)
    seconds = time.perf_counter() - t0  # one shared pass: the whole pass's seconds (a rerun reads stored scores)
    for method in methods:
        scores = every[method]["scores"]
        row = {"seconds_shared_pass": round(seconds, 1), "date": environment()["date"], "n_iqs": len(queries)}
        for how in ("normalized_mean", "sum"):
            agg = aggregate(scores.double(), how)
            row[how] = {"average_precision": round(average_precision(agg, culprits), 4),
                        **{f"recall@{k}": round(recall_at_k(agg, culprits, k), 4)
                           for k in (10, 25, 48, int(culprits.sum()))},
                        f"current_rows_in_bottom_{int(counters.sum())}":
                            int(counters[torch.argsort(agg)[:int(counters.sum())]].sum()),
                        "mean_score_culprit": float(agg[culprits].mean()),
                        "mean_score_counter": float(agg[counters].mean()),
                        "mean_score_ordinary": float(agg[~culprits & ~counters].mean())}
        result["methods"][method] = row
        print(method, row)
    write_result(name, result)
    bottom = f"current_rows_in_bottom_{int(counters.sum())}"
    k = f"recall@{int(culprits.sum())}"
    print(f"\n{'method':12s} {'AP':>6s} {'R@10':>6s} {k:>10s} {'current low':>11s}")
    for method, row in result["methods"].items():
        r = row.get("normalized_mean", row)
        print(f"{method:12s} {r['average_precision']:6.3f} {r.get('recall@10', float('nan')):6.2f} "
              f"{r[k]:10.2f} {r.get(bottom, ''):>11}")


if __name__ == "__main__":
    main()
