"""What the speed knobs of influence cost in accuracy, on the random Llama of benchmarks/distributed_speed.py (one
process, 1 thread): bf16 autocast, low-rank queries (``query_rank``), a subsampled eigenvalue fit
(``lambda_max_rows``) and small resumable chunks (``chunk_rows``), each against plain LinFAC in float32.

    .venv/bin/python -m benchmarks.influence_knobs [--rows 64] [--queries 4]

Accuracy is the agreement of the [Q, N] scores with the plain run: Pearson correlation, the overlap of each query's
top-10 rows, and the largest error relative to the largest score. A random model's scores are not a trained
model's: read the agreement as numerical, not as recall. Writes benchmarks/results/influence_knobs.json.
"""

from __future__ import annotations

import argparse
import tempfile
import time

import torch

from benchmarks.common import environment, write_result
from benchmarks.distributed_speed import CONFIG, build
from lancet.influence import Influence, InfluenceArgs


def agreement(scores: torch.Tensor, ref: torch.Tensor, k: int = 10) -> dict:
    a, b = scores.double().flatten(), ref.double().flatten()
    top = [len(set(s.topk(k).indices.tolist()) & set(r.topk(k).indices.tolist())) / k
           for s, r in zip(scores, ref, strict=True)]
    return {"pearson": round(float(torch.corrcoef(torch.stack([a, b]))[0, 1]), 5),
            "top10_overlap": round(sum(top) / len(top), 3),
            "max_error_rel": float((a - b).abs().max() / b.abs().max())}


def timed(fn):
    t0 = time.perf_counter()
    out = fn()
    return out, round(time.perf_counter() - t0, 2)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--rows", type=int, default=64)
    parser.add_argument("--queries", type=int, default=4)
    parser.add_argument("--batch-size", type=int, default=8)
    ns = parser.parse_args()
    torch.set_num_threads(1)
    model, rows, queries = build(ns.rows, ns.queries)
    opts = {"method": "linfac", "batch_size": ns.batch_size, "progress": False}
    runs: dict[str, dict] = {}

    def run(name: str, reuse: Influence | None = None, out_dir=None, **extra) -> Influence:
        if reuse is None:
            inf = Influence(model, InfluenceArgs(**opts, **extra), out_dir=out_dir)
            _, fit_s = timed(lambda: inf.fit(rows))
        else:  # same curvature, only the scoring option differs
            inf, fit_s = reuse.with_options(**extra), None
            if not inf.fitted:
                raise SystemExit(f"{name}: {extra} shapes the curvature; it cannot reuse {reuse.args.method}'s fit")
        scores, score_s = timed(lambda: inf.scores(rows, queries)["scores"])
        runs[name] = {"options": extra, "fit_s": fit_s, "score_s": score_s, "_scores": scores}
        print(name, {k: v for k, v in runs[name].items() if k != "_scores"}, flush=True)
        return inf

    base = run("float32")
    run("bf16", bf16=True)
    for rank in (1, 4, 16):
        run(f"query_rank_{rank}", reuse=base, query_rank=rank)
    run("lambda_max_rows_16", lambda_max_rows=16)
    with tempfile.TemporaryDirectory() as tmp:  # chunk size only sets how often partial sums are saved
        run("chunk_rows_256_saved", out_dir=f"{tmp}/a", chunk_rows=256)
        run("chunk_rows_8_saved", out_dir=f"{tmp}/b", chunk_rows=8)
    ref = runs["float32"]["_scores"]
    for record in runs.values():
        record.update(agreement(record.pop("_scores"), ref))
    write_result("influence_knobs", {
        "what": "LinFAC scores with each knob against plain float32 LinFAC, 1 process x 1 thread; fit_s null: the "
                "plain run's curvature reused (query_rank only changes scoring)",
        "model": {**CONFIG, "parameters": sum(p.numel() for p in model.parameters())},
        "rows": ns.rows, "queries": ns.queries, "batch_size": ns.batch_size,
        "tokens": sum(len(r["input_ids"]) for r in rows), "env": environment(), "runs": runs,
        "limits": "a random model on a shared 2-core machine: timings are noisy and agreement is numerical only",
    })


if __name__ == "__main__":
    main()
