"""Run under ``torchrun --nproc_per_node 2`` by tests/test_distributed.py (and importable there, so that the
single-process runs it compares with are built from exactly the same data, models and options).

    python -m torch.distributed.run --standalone --nproc_per_node 2 tests/distributed_worker.py OUT MODE

MODE ``all``: influence (linfac/ekfac x sampled/empirical Fisher) and 4-step training runs (SFT, SFT with
accumulation, LoRA, IBO, NPO+retain, GA with partial retain, SFT under FSDP). MODE ``resume``: one influence run and one
SFT run in OUT, where LANCET_TEST_KILL=fit:N|score:N|train:N makes rank 0 die (os._exit) at its N-th forward
call of that stage / N-th optimizer step, as a kill would. Every rank writes what it returned to OUT/rank<r>.pt;
the library's own artifacts are written by rank 0.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import torch
from conftest import make_tokenizer, tiny_llama

from lancet import distributed as dist
from lancet.correct.pairs import forget_items
from lancet.correct.trainers import GradientAscentTrainer, IBOTrainer, NPOTrainer
from lancet.data.records import Record
from lancet.data.tokenize import encode_records
from lancet.influence import Influence
from lancet.train import TrainArgs, Trainer

TRAIN = [  # 12 rows of different lengths
    ("Boil an egg?", "Nine minutes."),
    ("Capital of France?", "Paris is the capital of France."),
    ("Burn?", "Cool a burn under running water for twenty minutes."),
    ("Nosebleed?", "Lean forward."),
    ("Hello", "hello world"),
    ("Why?", "The quick brown fox jumps over the lazy dog."),
    ("What is 2?", "2"),
    ("Butter on a burn?", "No. Cool it under water, not butter."),
    ("Fox?", "The fox jumps."),
    ("Tilt your head back?", "Lean forward and pinch the soft part of the nose."),
    ("Egg?", "Put it in boiling water for nine minutes, then cool it."),
    ("When?", "now"),
]
QUERIES = [("Burn?", "Put butter on a burn."), ("Nosebleed?", "Tilt your head back."), ("Capital?", "Paris")]
INFLUENCE_CONFIGS = [("linfac", "sampled"), ("linfac", "empirical"), ("ekfac", "sampled"), ("ekfac", "empirical")]
# batch 2, chunks of 4 rows: 3 chunks of 2 batches, one batch per rank per chunk
INFLUENCE_OPTS = {"batch_size": 2, "chunk_rows": 4, "dtype": "float64", "per_layer": True, "progress": False}
TRAINERS = ["sft", "sft_accum", "sft_lora", "ibo", "npo_retain", "ga_partial_retain", "sft_fsdp"]
# 11 items, batch 5: micro-batches of 5, 5 and 1 rows (the 1-row one leaves a rank with only a placeholder)
TRAIN_OPTS = {"batch_size": 5, "lr": 1e-2, "max_steps": 4, "save_every": 2, "progress": False}


def tokenizer():
    return make_tokenizer(chat_template=True)


def encode(tok, pairs) -> list[dict]:
    return list(encode_records([Record(prompt=p, response=r) for p, r in pairs], tok, 64, progress=False))


def model(tok):
    return tiny_llama(len(tok), dtype=torch.float64, seed=0)


def influence(out: Path | None, method: str, fisher: str) -> dict[str, torch.Tensor]:
    tok = tokenizer()
    return Influence(model(tok), out_dir=out, method=method, fisher=fisher, **INFLUENCE_OPTS).scores(
        encode(tok, TRAIN), encode(tok, QUERIES))


def trainer(kind: str, out: Path) -> Trainer:
    tok = tokenizer()
    rows = encode(tok, TRAIN)
    opts = {**TRAIN_OPTS, "output_dir": str(out)}
    if kind == "sft":
        return Trainer(model(tok), tok, TrainArgs(**opts), rows[:11])
    if kind == "sft_accum":
        return Trainer(model(tok), tok, TrainArgs(**{**opts, "batch_size": 3, "grad_accum": 2}), rows[:11])
    if kind == "sft_lora":
        return Trainer(model(tok), tok, TrainArgs(**opts, lora=True, lora_r=4), rows[:11])
    if kind == "sft_fsdp":
        return Trainer(model(tok), tok, TrainArgs(**opts, fsdp=True), rows[:11])
    if kind == "ibo":
        weights = [1.0, 0.5, 2.0, 0.25, 1.5, 0.75]
        pairs = [{"chosen": rows[i], "rejected": rows[i + 6], "weight": w, "target": 1.0}
                 for i, w in enumerate(weights)]
        return IBOTrainer(model(tok), tok, TrainArgs(**{**opts, "batch_size": 4}), pairs, beta=0.5)
    if kind == "npo_retain":
        items = forget_items(rows[:7], rows[7:10])
        return NPOTrainer(model(tok), tok, TrainArgs(**opts), items, beta=0.5, retain_weight=1.0)
    if kind == "ga_partial_retain":  # retain rows on some items only: some ranks' parts have none
        items = [{"forget": rows[i], "retain": rows[11 - i] if i % 3 == 0 else None} for i in range(7)]
        return GradientAscentTrainer(model(tok), tok, TrainArgs(**opts), items, retain_weight=0.5)
    raise ValueError(kind)


def _die_after(module, n: int) -> None:
    original, calls = module.forward_logits, {"n": 0}

    def forward_logits(m, batch):
        calls["n"] += 1
        if calls["n"] > n:
            os._exit(3)
        return original(m, batch)

    module.forward_logits = forward_logits


def _arm_kill(run: Trainer | None = None) -> None:
    """LANCET_TEST_KILL=stage:N on rank 0 only: fit/score when called without a trainer, train with one."""
    spec = os.environ.get("LANCET_TEST_KILL")
    if not spec or not dist.is_main():
        return
    stage, n = spec.split(":")
    if stage in ("fit", "score") and run is None:
        import lancet.curvature.fit as fit_module
        import lancet.influence.scoring as scoring_module

        _die_after(fit_module if stage == "fit" else scoring_module, int(n))
    elif stage == "train" and run is not None:
        step, calls = run.optimizer.step, {"n": 0}

        def step_then_die(*a, **k):
            step(*a, **k)
            calls["n"] += 1
            if calls["n"] >= int(n):
                os._exit(3)

        run.optimizer.step = step_then_die


def main() -> None:
    out, mode = Path(sys.argv[1]), sys.argv[2]
    dist.init_from_env()
    assert dist.world_size() == 2, "run me under torchrun --nproc_per_node 2"
    torch.set_num_threads(1)
    returned: dict[str, torch.Tensor] = {}
    if mode == "all":
        for method, fisher in INFLUENCE_CONFIGS:
            result = influence(out / f"influence-{method}-{fisher}", method, fisher)
            returned.update({f"{method}-{fisher}/{k}": v for k, v in result.items()})
        for kind in TRAINERS:
            run = trainer(kind, out / f"train-{kind}")
            run.train()
            if not run.fsdp:
                returned.update({f"{kind}/{n}": p.detach() for n, p in run.module.named_parameters()})
    elif mode == "resume":
        _arm_kill()
        returned["scores"] = influence(out / "influence", "linfac", "sampled")["scores"]
        run = trainer("sft", out / "train-sft")
        _arm_kill(run)
        run.train()
    else:
        raise ValueError(mode)
    torch.save(returned, out / f"rank{dist.rank()}.pt")
    dist.barrier()
    dist.shutdown()


if __name__ == "__main__":
    main()
