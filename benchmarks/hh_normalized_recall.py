"""Ablation on the HH split: does normalising each training row's influence by its own size change recall?

    .venv/bin/python -m benchmarks.hh_normalized_recall [--run-dir runs/hh_small/seed0] [--seed 0]

Reads the small preset's stored artifacts (impure model, IQs, every method's scores; run the preset first) and
computes, per training row n, its self-influence s_nn = G_n^T (F + damping)^-1 G_n under each estimator (the row's
gradient taken as a query, preconditioned, and contracted with itself). Rankings compared, by average precision
of the unsafe rows:
- raw: the score s_qn (as in the README tables);
- cosine: s_qn / sqrt(s_nn), the score of a unit-size row in the estimator's metric;
- relatif: s_qn / s_nn (RelatIF, Barshan et al. 2020): how much of the row's effect goes to the query.
Writes benchmarks/results/hh_normalized_recall.json.
"""

from __future__ import annotations

import argparse
import time
from dataclasses import replace
from pathlib import Path

import torch
from tqdm.auto import tqdm

from benchmarks.common import environment, write_result
from benchmarks.hh_reproduction import JOINT_SCORING_BYTES, PRESETS, split_data
from lancet.constants import DEFAULT_MODEL
from lancet.curvature.fit import Curvature
from lancet.data import encode_records
from lancet.data.readers import read_records
from lancet.evaluate.suite import default_shared
from lancet.hardware import auto_bf16
from lancet.influence import Influence, InfluenceArgs
from lancet.influence.recall import aggregate, average_precision, random_baseline
from lancet.influence.scoring import query_gradients
from lancet.models.loading import load_model, load_tokenizer

METHODS = ("linfac", "ekfac", "kfac", "identity")

BF16 = auto_bf16()  # bf16 autocast where the hardware has it natively, else fp32 (lancet/hardware.py)


def self_influence(run: Influence, curvature: Curvature, rows, chunk: int = 8) -> torch.Tensor:
    """[N] s_nn: each row's gradient preconditioned and contracted with itself, summed over layers."""
    out = []
    for i in tqdm(range(0, len(rows), chunk), desc=f"{run.args.method} self-influence"):
        grads = query_gradients(run.model, curvature.layers, rows[i:i + chunk], run.args)
        total = torch.zeros(len(rows[i:i + chunk]), dtype=torch.float64)
        for name in list(grads):
            g = grads.pop(name)
            p = curvature.estimator.precondition(curvature.state[name], g, run.args.damping)
            total += (p * g).sum((1, 2)).double()
        out.append(total)
    return torch.cat(out)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--run-dir", default="runs/hh_small/seed0")
    parser.add_argument("--seed", type=int, default=0)
    ns = parser.parse_args()
    run_dir = Path(ns.run_dir)
    preset = PRESETS["small"]
    parts = split_data(default_shared(), preset, ns.seed, load_tokenizer(DEFAULT_MODEL))
    model, tok = load_model(str(run_dir / "impure"))
    train = encode_records(parts["train"], tok, preset.max_length, progress=False)
    queries = encode_records(read_records(run_dir / "iqs.jsonl"), tok, preset.max_length, progress=False)
    unsafe = torch.tensor([i in set(parts["unsafe_ids"]) for i in train.ids])
    args = InfluenceArgs(bf16=BF16, batch_size=8, lambda_max_rows=preset.lambda_max_rows)
    stored = Influence(model, args, out_dir=run_dir / "influence").scores_by_method(  # the stored scores: no pass runs
        train, queries, METHODS, max_joint_bytes=JOINT_SCORING_BYTES)
    rows = list(train)
    result = {"run_dir": str(run_dir), "seed": ns.seed, "n_train": len(rows), "n_unsafe": int(unsafe.sum()),
              "n_iqs": len(queries), "env": environment(),
              "random": random_baseline(unsafe, key=f"recall@{int(unsafe.sum())}")["average_precision"],
              "methods": {}}
    for method in METHODS:
        t0 = time.perf_counter()
        run = Influence(model, replace(args, method=method), out_dir=run_dir / "influence")
        s_nn = self_influence(run, run.fit(train), rows)
        scores = stored[method]["scores"].double()
        result["methods"][method] = {
            "raw": round(average_precision(aggregate(scores), unsafe), 4),
            "cosine": round(average_precision(aggregate(scores / s_nn.clamp_min(1e-30).sqrt()), unsafe), 4),
            "relatif": round(average_precision(aggregate(scores / s_nn.clamp_min(1e-30)), unsafe), 4),
            "self_influence_ap": round(average_precision(s_nn, unsafe), 4),
            "seconds": round(time.perf_counter() - t0, 1)}
        print(method, result["methods"][method], flush=True)
    write_result("hh_normalized_recall", result)


if __name__ == "__main__":
    main()
