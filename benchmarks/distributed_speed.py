"""Influence wall time, 1 process vs ``torchrun --nproc_per_node 2``, on a random Llama built from a config (no
download): the same rows, queries and options in every run (LinFAC, float32).

    .venv/bin/python -m benchmarks.distributed_speed [--rows 128] [--queries 4] [--threads 2]

Three runs, each a fresh process: 1 process x ``threads`` threads, 1 process x 1 thread, and 2 processes (torchrun,
gloo) x ``threads // 2`` threads each. On a 2-core machine the honest comparison is the first against the last:
the same cores, either as one process's intra-op threads or as two processes each scoring half the rows. Writes
benchmarks/results/distributed_speed.json.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from benchmarks.common import environment, write_result

CONFIG = {"vocab_size": 16384, "hidden_size": 256, "intermediate_size": 1024, "num_hidden_layers": 4,
          "num_attention_heads": 4, "num_key_value_heads": 2, "max_position_embeddings": 256,
          "tie_word_embeddings": False}


def build(n_rows: int, n_queries: int, seed: int = 0):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    model = LlamaForCausalLM(LlamaConfig(**CONFIG)).eval()
    gen = torch.Generator().manual_seed(seed)

    def rows(n: int, offset: int) -> list[dict]:
        out = []
        for i in range(n):
            length = 64 + int(torch.randint(0, 65, (1,), generator=gen))  # 64..128 tokens
            ids = torch.randint(4, CONFIG["vocab_size"], (length,), generator=gen).tolist()
            out.append({"id": f"r{offset + i}", "input_ids": ids, "labels": [-100] * 16 + ids[16:]})
        return out

    return model, rows(n_rows, 0), rows(n_queries, n_rows)


def worker(ns: argparse.Namespace) -> None:
    """One run (under torchrun: one rank of it); rank 0 writes the timings and scores to ``ns.result``."""
    from lancet import distributed as dist
    from lancet.influence import Influence, InfluenceArgs

    dist.init_from_env()
    torch.set_num_threads(ns.threads)
    model, rows, queries = build(ns.rows, ns.queries)
    run = Influence(model, InfluenceArgs(method="linfac", batch_size=ns.batch_size, progress=False))
    timings = {}
    dist.barrier()
    t0 = time.perf_counter()
    run.fit(rows)
    dist.barrier()
    timings["fit_s"] = time.perf_counter() - t0
    best = float("inf")
    for _ in range(ns.repeats):  # scoring alone (query gradients, preconditioning, the pass over the rows)
        t0 = time.perf_counter()
        scores = run.scores(rows, queries)["scores"]
        dist.barrier()
        best = min(best, time.perf_counter() - t0)
    timings["score_s"] = best
    if dist.is_main():
        torch.save({"timings": timings, "scores": scores, "world_size": dist.world_size(),
                    "threads_per_process": torch.get_num_threads()}, ns.result)
    dist.shutdown()


def launch(ns: argparse.Namespace, processes: int, threads: int, result: Path) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    env["OMP_NUM_THREADS"] = str(threads)
    args = ["--worker", "--threads", str(threads), "--rows", str(ns.rows), "--queries", str(ns.queries),
            "--batch-size", str(ns.batch_size), "--repeats", str(ns.repeats), "--result", str(result)]
    if processes == 1:
        cmd = [sys.executable, "-m", "benchmarks.distributed_speed", *args]
    else:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(processes),
               "-m", "benchmarks.distributed_speed", *args]
    t0 = time.perf_counter()
    subprocess.run(cmd, env=env, check=True, cwd=Path(__file__).resolve().parents[1])
    wall = time.perf_counter() - t0
    out = torch.load(result, weights_only=True)
    return {"processes": processes, "threads_per_process": out["threads_per_process"],
            "fit_s": round(out["timings"]["fit_s"], 2), "score_s": round(out["timings"]["score_s"], 2),
            "command_wall_s": round(wall, 1), "_scores": out["scores"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--rows", type=int, default=128)
    parser.add_argument("--queries", type=int, default=4)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--threads", type=int, default=2, help="cores to use: threads of the 1-process run")
    parser.add_argument("--repeats", type=int, default=2, help="scoring repeats (the fastest is kept)")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--result", default=None, help=argparse.SUPPRESS)
    ns = parser.parse_args()
    if ns.worker:
        worker(ns)
        return
    from transformers import LlamaConfig, LlamaForCausalLM

    n_params = sum(p.numel() for p in LlamaForCausalLM(LlamaConfig(**CONFIG)).parameters())
    _, rows, _ = build(ns.rows, ns.queries)
    runs = {}
    with tempfile.TemporaryDirectory() as tmp:
        for name, processes, threads in (
            (f"1proc_x{ns.threads}threads", 1, ns.threads),
            ("1proc_x1thread", 1, 1),
            (f"2proc_x{max(1, ns.threads // 2)}thread", 2, max(1, ns.threads // 2)),
        ):
            runs[name] = launch(ns, processes, threads, Path(tmp) / f"{name}.pt")
            print(name, {k: v for k, v in runs[name].items() if not k.startswith("_")}, flush=True)
    base, one, two = (runs[k] for k in runs)
    ref = base.pop("_scores")
    for run in (one, two):
        s = run.pop("_scores")
        run["max_rel_score_diff_vs_first"] = float((s - ref).abs().max() / ref.abs().max())
    result = {
        "what": "LinFAC influence (fit: 2 passes over the rows; score: query gradients + 1 pass over the rows), "
                "float32, random Llama from a config, wall time of each stage (scoring: fastest of the repeats)",
        "model": {**CONFIG, "parameters": n_params},
        "rows": ns.rows, "queries": ns.queries, "batch_size": ns.batch_size,
        "tokens": sum(len(r["input_ids"]) for r in rows),
        "env": environment(), "runs": runs,
        "speedup_2proc_vs_1proc_same_cores": {"fit": round(base["fit_s"] / two["fit_s"], 2),
                                              "score": round(base["score_s"] / two["score_s"], 2)},
        "speedup_2proc_vs_1proc_1thread": {"fit": round(one["fit_s"] / two["fit_s"], 2),
                                           "score": round(one["score_s"] / two["score_s"], 2)},
        "limits": ("2 processes x 1 thread against 1 process x 2 threads on the same 2 cores: it measures the "
                   "sharding overhead and whether rows-in-parallel beats intra-op threads, not scaling to more "
                   "devices. Wall times on a shared machine (other jobs running) are noisy; command_wall_s adds "
                   "process start, imports and torchrun's rendezvous."),
    }
    print(json.dumps({k: v for k, v in result.items() if k.startswith("speedup")}))
    write_result("distributed_speed", result)


if __name__ == "__main__":
    main()
