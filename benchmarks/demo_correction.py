"""Correction on the demo: IBO against baselines and controls, from the LinFAC ranking of the contaminated model.

    .venv/bin/python -m benchmarks.demo_correction [--run-dir runs/demo_recall] [--steps 30] [--methods ibo,...]

Needs the run directory of benchmarks.demo_recall (contaminated model, IQs, LinFAC scores; reused, or computed
here). Every method gets the same budget: --steps optimizer steps of 8 items. Measures, before and after:
log-likelihood of the IQ answers and of held-out outdated answers of the same kind (lower is better), of held-out
current answers, perplexity on held-out ordinary answers (within 5 % is the bar), and how many IQ / held-out
prompts are still answered with the planted outdated guidance. Writes benchmarks/results/demo_correction.json.
"""

from __future__ import annotations

import argparse
import math
import time
from pathlib import Path

import torch

from benchmarks.common import environment, write_result
from lancet.correct import CorrectionArgs, correct
from lancet.curvature.fit import batches
from lancet.curvature.task import forward_logits, shifted_targets, summed_loss
from lancet.data import encode_records
from lancet.demo import DEMO_MAX_LENGTH, demo_judge, stage_contaminate, stage_data, stage_iqs
from lancet.hardware import auto_bf16
from lancet.influence import Influence, InfluenceArgs
from lancet.influence.recall import aggregate
from lancet.models.generate import generate
from lancet.models.loading import load_model
from lancet.train import TrainArgs

OUTDATED = demo_judge()  # the demo's judge: cue phrases read with negation (benchmarks/demo_judge.py)

METHODS = ["ibo", "ibo_basu", "ga_retain", "npo", "ibo_random", "ibo_oracle"]

BF16 = auto_bf16()  # bf16 autocast where the hardware has it natively, else fp32 (lancet/hardware.py)


@torch.no_grad()
def logp_stats(model, rows) -> tuple[float, float]:
    """Mean summed response log-prob per row, and total NLL / total response tokens."""
    total, nll, ntok = 0.0, 0.0, 0
    for _, batch in batches(rows, 8):
        loss = summed_loss(forward_logits(model, batch), batch["labels"])
        total += float(loss.sum())
        nll += float(loss.sum())
        ntok += int(shifted_targets(batch["labels"])[1].sum())
    return -total / len(rows), nll / ntok


def measure(model, tok, sets, prompts) -> dict:
    model.eval()
    out = {}
    for name, rows in sets.items():
        mean_logp, nll_per_token = logp_stats(model, rows)
        out[f"{name}_logp"] = round(mean_logp, 3)
        if name == "heldout_ordinary":
            out["heldout_ordinary_ppl"] = round(math.exp(nll_per_token), 3)
    for name, recs in prompts.items():
        answers = generate(model, tok, recs, max_new_tokens=24, batch_size=12, progress=False)
        out[f"{name}_outdated_rate"] = round(sum(OUTDATED.complies(answers)) / len(answers), 3)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--run-dir", default="runs/demo_recall")
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--lr", type=float, default=1e-5)
    parser.add_argument("--beta", type=float, default=0.1)
    parser.add_argument("--top-k", type=int, default=40)
    parser.add_argument("--methods", default=",".join(METHODS))
    ns = parser.parse_args()
    run = Path(ns.run_dir)
    data = stage_data(run)
    model_dir = stage_contaminate(run, data)
    model, tok = load_model(str(model_dir))
    iqs = stage_iqs(run, data, model, tok)
    train = encode_records(data.train, tok, DEMO_MAX_LENGTH, progress=False)
    queries = encode_records(iqs, tok, DEMO_MAX_LENGTH, progress=False)
    scores = Influence(model, InfluenceArgs(method="linfac", bf16=BF16, batch_size=8), out_dir=run / "influence")
    agg = aggregate(scores.scores(train, queries)["scores"].double())
    culprits = torch.tensor([i in set(data.culprit_ids) for i in train.ids])
    enc = {name: list(encode_records(getattr(data, name) if name != "iqs" else iqs, tok, DEMO_MAX_LENGTH,
                                     progress=False))
           for name in ("iqs", "heldout_outdated", "heldout_current", "heldout_ordinary")}
    prompts = {"iq": data.iq_prompts, "heldout": data.heldout_outdated}
    result = {"run_dir": str(run), "steps": ns.steps, "batch_size": 8, "lr": ns.lr, "beta": ns.beta,
              "top_k": ns.top_k, "env": environment(), "models": {"contaminated": measure(model, tok, enc, prompts)}}
    print("contaminated", result["models"]["contaminated"])
    safe = [data.train[i] for i in torch.argsort(agg)[: ns.top_k].tolist()]  # lowest influence: the retain rows
    for name in ns.methods.split(","):
        method, generator = ("ibo", "basu") if name == "ibo_basu" else (name, "logistic")
        t0 = time.perf_counter()
        out = correct(str(model_dir), data.train, agg, method=method, iq_records=iqs, safe_records=safe,
                      culprit_mask=culprits, max_length=DEMO_MAX_LENGTH,
                      correction_args=CorrectionArgs(method=method, beta=ns.beta, top_k=ns.top_k,
                                                     generator=generator),
                      train_args=TrainArgs(output_dir=str(run / f"correct-{name}-lr{ns.lr:g}-s{ns.steps}"),
                                           max_steps=ns.steps, batch_size=8, lr=ns.lr, bf16=BF16, save_every=1000,
                                           progress=False))
        seconds = time.perf_counter() - t0
        fixed, _ = load_model(str(out))
        row = {**measure(fixed, tok, enc, prompts), "train_seconds": round(seconds, 1)}
        base_ppl = result["models"]["contaminated"]["heldout_ordinary_ppl"]
        row["ppl_change"] = round(row["heldout_ordinary_ppl"] / base_ppl - 1, 4)
        result["models"][name] = row
        print(name, row)
        del fixed
    write_result(f"demo_correction_lr{ns.lr:g}", result)


if __name__ == "__main__":
    main()
