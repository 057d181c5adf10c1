"""Influence speed on SmolLM2-135M-Instruct: lancet linfac, lancet ekfac and kronfluence ekfac, same process, same
data and queries; plus the raw forward+backward throughput on the same rows (the ceiling for scoring).

    .venv/bin/python -m benchmarks.influence_speed [--rows 64] [--queries 4] [--no-kronfluence] [--bf16]
        [--query-rank 32]

Scoring is timed in two parts: the fixed cost of a query set (query gradients and preconditioning) and the loop
over training rows; ``score_tokens_per_s`` is the loop's (it is what grows with the training set) and
``score_end_to_end_tokens_per_s`` includes the fixed part. The loop and the raw forward+backward are timed alike,
each run twice: once under the peak-memory sampler, then on a plain clock (the time reported).

``--query-rank R`` adds lancet linfac with rank-R preconditioned queries (the contraction never forms a per-row
gradient) and its Pearson/Spearman correlation with full-rank linfac scores on the same rows.

Writes benchmarks/results/influence_speed.json.
"""

from __future__ import annotations

import argparse
import copy
import logging
import tempfile
import time

import torch

from benchmarks.common import environment, measure, raw_forward_backward, write_result
from lancet.data import encode_records
from lancet.data.demo import build_demo_dataset
from lancet.influence import Influence, InfluenceArgs
from lancet.influence.scoring import score_rows
from lancet.models.loading import load_model


def correlations(a: torch.Tensor, b: torch.Tensor) -> dict[str, float]:
    """Pearson and Spearman over all (query, row) scores, and the mean per-query Spearman."""
    def rank(x):
        return x.argsort(-1).argsort(-1).double()

    a, b = a.double(), b.double()
    pearson = float(torch.corrcoef(torch.stack([a.flatten(), b.flatten()]))[0, 1])
    spearman = float(torch.corrcoef(torch.stack([rank(a.flatten()), rank(b.flatten())]))[0, 1])
    per_query = [float(torch.corrcoef(torch.stack([rank(x), rank(y)]))[0, 1]) for x, y in zip(a, b, strict=True)]
    return {"pearson": round(pearson, 4), "spearman": round(spearman, 4),
            "per_query_spearman_mean": round(sum(per_query) / len(per_query), 4)}


def kronfluence_run(model, rows, queries, batch_size: int, record: dict) -> torch.Tensor:
    from kronfluence.analyzer import Analyzer, prepare_model
    from kronfluence.arguments import FactorArguments, ScoreArguments
    from kronfluence.utils.dataset import DataLoaderKwargs

    from benchmarks.kronfluence_ref import ListDataset, default_module_names, make_task, pad_batch

    task = make_task(default_module_names(model))
    wrapped = prepare_model(copy.deepcopy(model).eval(), task)
    with tempfile.TemporaryDirectory() as tmp:
        analyzer = Analyzer(analysis_name="speed", model=wrapped, task=task, cpu=True, disable_tqdm=False,
                            output_dir=tmp, log_level=logging.WARNING)
        analyzer.set_dataloader_kwargs(DataLoaderKwargs(collate_fn=pad_batch))
        with measure(record, "fit"):
            analyzer.fit_all_factors(factors_name="f", dataset=ListDataset(rows), per_device_batch_size=batch_size,
                                     factor_args=FactorArguments(strategy="ekfac"), overwrite_output_dir=True)
        with measure(record, "score"):
            analyzer.compute_pairwise_scores(scores_name="s", factors_name="f", query_dataset=ListDataset(queries),
                                             train_dataset=ListDataset(rows), per_device_query_batch_size=batch_size,
                                             per_device_train_batch_size=batch_size, score_args=ScoreArguments(),
                                             overwrite_output_dir=True)
        return analyzer.load_pairwise_scores(scores_name="s")["all_modules"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--rows", type=int, default=64)
    parser.add_argument("--queries", type=int, default=4)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--no-kronfluence", action="store_true")
    parser.add_argument("--bf16", action="store_true", help="also time lancet linfac with bf16 autocast")
    parser.add_argument("--query-rank", type=int, default=None, help="also time linfac with rank-R queries")
    parser.add_argument("--name", default="influence_speed",
                        help="result file under benchmarks/results (one per machine sort)")
    ns = parser.parse_args()
    torch.manual_seed(0)
    model, tok = load_model("smollm2-135m-instruct")
    demo = build_demo_dataset()
    rows = list(encode_records(demo.train[: ns.rows], tok, 128, progress=False))
    queries = list(encode_records(demo.iqs[: ns.queries], tok, 128, progress=False))
    n_tokens = sum(len(r["input_ids"]) for r in rows)
    result: dict = {"model": "smollm2-135m-instruct", "rows": len(rows), "queries": len(queries),
                    "tokens": n_tokens, "batch_size": ns.batch_size, "env": environment(), "runs": {}}

    # raw and the scoring loop are timed the same way: one run under measure() for peak memory (its sampling thread
    # slows a 2-core machine by a few %), then one on a plain clock, whose time is the one reported
    with measure(result, "raw_memory"):
        raw_forward_backward(model, rows, ns.batch_size)
    raw = n_tokens / raw_forward_backward(model, rows, ns.batch_size)
    result["raw_forward_backward_tokens_per_s"] = round(raw, 1)
    print(f"raw forward+backward: {raw:.1f} tokens/s")

    variants = [("lancet_linfac", {"method": "linfac"}), ("lancet_ekfac", {"method": "ekfac"})]
    if ns.bf16:
        variants.append(("lancet_linfac_bf16", {"method": "linfac", "bf16": True}))
    if ns.query_rank:
        variants.append((f"lancet_linfac_rank{ns.query_rank}", {"method": "linfac", "query_rank": ns.query_rank}))
    scores = {}
    for name, opts in variants:
        record: dict = {}
        run = Influence(model, InfluenceArgs(batch_size=ns.batch_size, **opts))
        with measure(record, "fit"):
            curvature = run.fit(rows)
        # scoring = a fixed cost per query set (query gradients, preconditioning) + the per-row loop; the loop is
        # what scales with the training set, so its throughput is the one set against raw forward+backward
        with measure(record, "score_queries"):
            pre = run.preconditioned_queries(queries)
        with measure(record, "score_rows_memory"):
            score_rows(model, curvature.layers, rows, pre, run.args)
        t0 = time.perf_counter()
        scores[name] = score_rows(model, curvature.layers, rows, pre, run.args)["scores"]
        seconds = time.perf_counter() - t0
        record["score_rows"] = {"seconds": round(seconds, 2), **{k: v for k, v in record["score_rows_memory"].items()
                                                                   if k != "seconds"}}
        parts = (record["score_queries"], record["score_rows"])
        record["score"] = {"seconds": round(sum(x["seconds"] for x in parts), 2),
                           "peak_rss_gib": max(x["peak_rss_gib"] for x in parts)}
        record["score_tokens_per_s"] = round(n_tokens / record["score_rows"]["seconds"], 1)
        record["score_vs_raw"] = round(record["score_tokens_per_s"] / raw, 3)
        record["score_end_to_end_tokens_per_s"] = round(n_tokens / record["score"]["seconds"], 1)
        record["score_end_to_end_vs_raw"] = round(record["score_end_to_end_tokens_per_s"] / raw, 3)
        record["fit_plus_score_s"] = round(record["fit"]["seconds"] + record["score"]["seconds"], 1)
        if name != "lancet_linfac" and opts["method"] == "linfac":
            record["vs_full_linfac"] = correlations(scores[name], scores["lancet_linfac"])
        result["runs"][name] = record
        print(name, record)

    if not ns.no_kronfluence:
        record = {}
        scores["kronfluence_ekfac"] = kronfluence_run(model, rows, queries, ns.batch_size, record)
        record["score_tokens_per_s"] = round(n_tokens / record["score"]["seconds"], 1)
        record["fit_plus_score_s"] = round(record["fit"]["seconds"] + record["score"]["seconds"], 1)
        result["runs"]["kronfluence_ekfac"] = record
        kf = record["fit_plus_score_s"]
        for name, run_record in result["runs"].items():
            if name.startswith("lancet"):
                run_record["fraction_of_kronfluence_time"] = round(run_record["fit_plus_score_s"] / kf, 3)
        a, b = scores["lancet_ekfac"].flatten().double(), scores["kronfluence_ekfac"].flatten().double()
        result["ekfac_pearson_lancet_vs_kronfluence"] = round(float(torch.corrcoef(torch.stack([a, b]))[0, 1]), 4)
    write_result(ns.name, result)


if __name__ == "__main__":
    main()
