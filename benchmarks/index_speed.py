"""The gradient index against ordinary scoring: build and query time, agreement with full LinFAC, AP, size.

    .venv/bin/python -m benchmarks.index_speed                  # the full run (about 3 h on the slower machine)
    .venv/bin/python -m benchmarks.index_speed --hh-rows 48 --ranks 4,8 --iqs 4 --run-dir runs/index_smoke
    .venv/bin/python -m benchmarks.index_speed --table          # the README's table, from the result JSON

Model: the safety-contamination benchmark's impure model of seed 0 (runs/safety_full/seed0; run that benchmark to its
recall stage first), so that the index's AP can be read on that benchmark's rows. Training rows: --hh-rows HH-RLHF
rows of at most 192 tokens (helpful-base, then harmless-base chosen answers: ../shared/data holds the test splits
only, 1,202 helpful-base rows fit) followed by that benchmark's 360-row mix. Queries: the first --iqs of its IQs,
as a new question.
Steps, each timed and cached under --run-dir (a rerun resumes):
1. LinFAC fit on all rows (the eigenvalue correction on --lambda-rows of them).
2. Full LinFAC, the reference: one ordinary scoring pass, the IQs' normalised mean as one full-rank query
   (``Influence.normalized_mean_weights`` on 32 rows + ``combined_scores``): ``score_pass_seconds``.
3. One index per projection (eigen, random) at the largest rank (``build_seconds``; the fit is shared, and reported
   beside it); smaller ranks are read as the leading directions of the same index (``index_scores(rank=)``),
   which is the index of that rank (tests/test_index.py). With --rank-by-corrected, one more eigen index.
4. Per (projection, rank): ``query_seconds`` (query gradients, preconditioning, projection, lookup) and
   ``lookup_seconds`` (the lookup alone) for the IQs; their scores aggregated with the reference's weights;
   ``top100_overlap`` and Spearman against the reference; AP on the benchmark's rows against the reference's AP;
   ``query_energy_kept``, the share of the preconditioned queries' squared norm inside the kept blocks.
5. Size: bytes per row, MiB on disk.
Writes benchmarks/results/index_speed.json.
"""

from __future__ import annotations

import argparse
import json
import time
from functools import partial
from pathlib import Path

import torch

from benchmarks.common import RESULTS, environment, rows_that_fit, shared_data, write_result
from lancet.artifacts import atomic_write_json
from lancet.data import encode_records
from lancet.data.adapters import read_hh_rlhf
from lancet.data.readers import read_records
from lancet.influence import IndexArgs, Influence, InfluenceArgs
from lancet.influence.index import (
    bytes_per_row,
    fast_path_share,
    index_curvature,
    index_scores,
    load_projections,
    project_queries,
)
from lancet.influence.recall import average_precision, spearman, top_overlap
from lancet.models.loading import load_model

MAX_LENGTH = 192


def training_rows(shared: Path, tok, n_hh: int, mix: list) -> list:
    hh = []
    for name in ("helpful-base", "harmless-base"):
        hh += rows_that_fit(read_hh_rlhf(shared / f"hh-rlhf/{name}_test.jsonl.gz", "chosen"), tok, MAX_LENGTH)
        if len(hh) >= n_hh:
            break
    if len(hh) < n_hh:
        raise SystemExit(f"only {len(hh)} HH rows fit {MAX_LENGTH} tokens; lower --hh-rows")
    return hh[:n_hh] + mix


class Timings:
    """Seconds of each step as first measured, kept in the run directory: a resumed run reads its cached artifacts in
    seconds and must not report that as the step's cost."""

    def __init__(self, path: Path):
        self.path = path
        self.seen = json.loads(path.read_text()) if path.is_file() else {}

    def __call__(self, record: dict, key: str, fn, name: str | None = None):
        t0 = time.perf_counter()
        out = fn()
        name = name or key
        if name not in self.seen:
            self.seen[name] = round(time.perf_counter() - t0, 2)
            atomic_write_json(self.path, self.seen)
        record[key] = self.seen[name]
        return out


def table(out: dict) -> str:
    """The README's table: one row per (projection, rank), against the full pass it stands in for."""
    sec = out["seconds"]
    head = ["index", "rank", "build s (fit excluded)", "build / score pass", f"query s ({out['n_iqs']} IQs)",
            "lookup s", "top-100 overlap", "Spearman", f"AP (full LinFAC: {out['reference_ap']:.3f})",
            "query energy kept", "KB per row", "layers projected first"]
    lines = ["| " + " | ".join(head) + " |", "|---" * len(head) + "|"]
    for name, built in out["indexes"].items():
        for key in sorted((k for k in built if k.startswith("rank_")), key=lambda k: int(k[5:])):
            row = built[key]
            cells = [name, key[5:], f"{built['build_seconds']:.0f}", f"{built['build_over_score_pass']:.2f}",
                     f"{row['query_seconds']:.1f}", f"{row['lookup_seconds']:.2f}", f"{row['top100_overlap']:.2f}",
                     f"{row['spearman']:.3f}", f"{row['ap']:.3f}", f"{row['query_energy_kept']:.3f}",
                     f"{row['bytes_per_row'] / 1024:.1f}",
                     f"{row['fast_path_share']:.2f}" if "fast_path_share" in row else "– (all-or-nothing run)"]
            lines.append("| " + " | ".join(cells) + " |")
    lines.append(f"\nFull LinFAC: fit {sec['fit']:.0f} s, query weights {sec['reference_weights']:.0f} s, one scoring "
                 f"pass {sec['score_pass']:.0f} s over {out['n_rows']} rows.")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--safety-run", default="runs/safety_full/seed0")
    parser.add_argument("--run-dir", default="runs/index_speed")
    parser.add_argument("--shared", default=None)
    parser.add_argument("--hh-rows", type=int, default=2000)
    parser.add_argument("--iqs", type=int, default=20)
    parser.add_argument("--ranks", default="8,16,32")
    parser.add_argument("--lambda-rows", type=int, default=512)
    parser.add_argument("--rank-by-corrected", action="store_true", help="also an eigen index ranked by corrected "
                        "eigenvalue marginals")
    parser.add_argument("--bf16", action="store_true")
    parser.add_argument("--quiet", action="store_true")
    parser.add_argument("--table", action="store_true", help="print the README's table from the result JSON and stop")
    ns = parser.parse_args()
    if ns.table:
        print(table(json.loads((RESULTS / "index_speed.json").read_text())))
        return
    safety, run_dir = Path(ns.safety_run), Path(ns.run_dir)
    shared = shared_data(ns.shared, "hh-rlhf")
    ranks = sorted(int(r) for r in ns.ranks.split(","))
    model, tok = load_model(str(safety / "impure"))
    mix = read_records(safety / "mix.jsonl")
    records = training_rows(shared, tok, ns.hh_rows, mix)
    train = list(encode_records(records, tok, MAX_LENGTH, progress=False))
    iqs = list(encode_records(read_records(safety / "iqs.jsonl")[:ns.iqs], tok, MAX_LENGTH, progress=False))
    bench = torch.zeros(len(train), dtype=torch.bool)
    bench[ns.hh_rows:] = True
    positives = torch.tensor([r.label in ("unsafe", "implicit") for r in mix])
    args = InfluenceArgs(method="linfac", bf16=ns.bf16, batch_size=8, lambda_max_rows=ns.lambda_rows,
                         progress=not ns.quiet)
    run = Influence(model, args, out_dir=run_dir / "influence")
    timed = Timings(run_dir / "timings.json")
    out: dict = {"env": environment(ns.bf16), "n_rows": len(train), "n_hh": ns.hh_rows, "n_benchmark_rows": len(mix),
                 "n_iqs": len(iqs), "max_length": MAX_LENGTH, "lambda_rows": ns.lambda_rows, "bf16": ns.bf16,
                 "seconds": {}, "indexes": {}}
    sec = out["seconds"]
    timed(sec, "fit", lambda: run.fit(train))
    weights = timed(sec, "reference_weights", lambda: run.normalized_mean_weights(train, iqs)["linfac"])
    reference = timed(sec, "score_pass", lambda: run.combined_scores(train, iqs, weights[None])["scores"][0].double())
    out["reference_ap"] = round(average_precision(reference[bench], positives), 4)
    builds = [("eigen", "factor"), ("random", "factor")] + ([("eigen", "corrected")] if ns.rank_by_corrected else [])
    for projection, rank_by in builds:
        name = projection if rank_by == "factor" else f"{projection}_{rank_by}"
        index_dir = run_dir / f"index-{name}"
        built = {}
        index_args = IndexArgs(rank=ranks[-1], projection=projection, rank_by=rank_by, bf16=ns.bf16,
                               progress=not ns.quiet)
        meta = timed(built, "build_seconds", partial(run.build_index, train, index_dir, index_args),
                     name=f"build_{name}")
        per_row = bytes_per_row(meta, load_projections(index_dir))
        built.update({"fit_seconds": sec["fit"],
                      "build_with_fit_seconds": round(built["build_seconds"] + sec["fit"], 2),
                      "build_over_score_pass": round(built["build_seconds"] / sec["score_pass"], 3),
                      "bytes_per_row_at_built_rank": per_row,
                      "mib_on_disk": round(sum(p.stat().st_size for p in index_dir.glob("shard-*")) / 2**20, 1)})
        curvature = index_curvature(index_dir, model)
        for rank in ranks:
            row: dict = {}
            # the eigen index's fast path (project the query first, divide by the kept eigenvalues) cannot see the
            # share of the full preconditioned query it keeps: that is measured after, untimed, at full size, and
            # the fast path is checked against it
            # layers answered by projecting first (project, divide by the kept eigenvalues) cannot see the share
            # of the full preconditioned query they keep: that is measured after, untimed, at full size, and the
            # fast path is checked against it
            row["fast_path_share"] = round(fast_path_share(curvature, index_dir, args, rank), 4)
            fast = row["fast_path_share"] > 0
            energy: dict[str, float] = {}
            t0 = time.perf_counter()  # queries are not cached: these two are measured on every run
            queries = project_queries(model, curvature, iqs, index_dir, args, rank=rank,
                                      kept=None if fast else energy)
            t1 = time.perf_counter()
            scores = index_scores(index_dir, queries)
            row["lookup_seconds"] = round(time.perf_counter() - t1, 2)
            row["query_seconds"] = round(time.perf_counter() - t0, 2)
            if fast:
                full = project_queries(model, curvature, iqs, index_dir, args, rank=rank, kept=energy)
                row["fast_path_max_rel_diff"] = float(max((queries[n] - full[n]).abs().max() / full[n].abs().max()
                                                          for n in full))
            agg = weights.to(scores.dtype) @ scores
            agg = agg.double()
            row.update({"top100_overlap": top_overlap(agg, reference), "spearman": round(spearman(agg, reference), 4),
                        "ap": round(average_precision(agg[bench], positives), 4),
                        "bytes_per_row": bytes_per_row(meta, load_projections(index_dir), rank)})
            row["ap_minus_reference"] = round(row["ap"] - out["reference_ap"], 4)
            # the share of the preconditioned queries' squared norm inside the kept r x r blocks (what the index
            # drops, LinFAC's null blocks included, is the rest)
            row["query_energy_kept"] = round(energy["kept"] / energy["total"], 4)
            built[f"rank_{rank}"] = row
            print(f"{name} r={rank}: {row}", flush=True)
        out["indexes"][name] = built
        write_result("index_speed", out)
    atomic_write_json(run_dir / "done.json", {"ok": True})


if __name__ == "__main__":
    main()
