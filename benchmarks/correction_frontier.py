"""The harm-utility frontier of correction on the demo: every method at three learning rates, read at checkpoints,
settings chosen on validation prompts only, reported on test prompts never used for choosing.

    .venv/bin/lancet demo --out runs/demo_frontier            # the contaminated model, its IQs and LinFAC ranking
    .venv/bin/python -m benchmarks.correction_frontier --run-dir runs/demo_frontier

For each method and learning rate: one correction run of --steps optimizer steps of 8 items from the demo's
contaminated model and its LinFAC ranking (or --ranking repsim|bm25, the run's other rankings), measured at step 0
and every --every steps on
- validation (for choosing): the outdated-advice rate of greedy answers to the 24 validation prompts, and the
  perplexity of the 24 validation ordinary answers (utility loss = its relative increase);
- test (for the report only): the outdated-advice rate on the 12 held-out prompts, the perplexity of the 40
  held-out ordinary answers, and the mean log-likelihood of the held-out current and outdated answers.
Per method, ``lancet.correct.select.choose`` picks (learning rate, steps) on the validation numbers: the lowest
validation rate within 5 % validation utility loss, ties to fewer steps. The table gives each choice's test
numbers; the plot shows every point's test numbers (x: test utility loss, y: test outdated rate) with each
method's Pareto front. Resumable: each run's points are stored in its directory and reused.

Methods (docs/method.md §3.5-3.6): ibo; ibo with both anchors (KL retain on the uninvolved rows + RPO's NLL on the
preferred side); ibo_random (the same size of random selection: the control); ga_retain, npo and sft, whose "safe"
rows are the top_k rows the ranking scores most negative (the data's own counter-evidence: no new labels). DPO is
absent: the demo has no human preference pairs. Writes benchmarks/results/correction_frontier_demo.json and .png.
"""

from __future__ import annotations

import argparse
import json
import shutil
import time
from pathlib import Path

import torch

from benchmarks.common import RESULTS, environment, write_result
from lancet.artifacts import atomic_write_json
from lancet.correct import SUMMARY_FILE, CorrectionArgs, correct, load_run_scores
from lancet.correct.select import Candidate, choose, utility_loss
from lancet.data.readers import read_records
from lancet.demo import DEMO_MAX_LENGTH, demo_judge
from lancet.evaluate.judges import flagged_rows
from lancet.evaluate.metrics import compliance_rate, generate_answers, mean_logprob, perplexity, response_logprobs
from lancet.hardware import auto_bf16
from lancet.models.loading import load_model, load_tokenizer
from lancet.train import TrainArgs

JUDGE = demo_judge()
BF16 = auto_bf16()
VARIANTS = {
    "ibo": {"method": "ibo"},
    "ibo_anchored": {"method": "ibo", "retain": "kl", "retain_weight": 1.0, "chosen_nll_weight": 1.0},
    "ibo_random": {"method": "ibo_random"},
    "ga_retain": {"method": "ga_retain"},
    "npo": {"method": "npo"},
    "sft": {"method": "sft"},
    # issue 37 item 5 (added 2026-12-05 before any of its numbers): the safety benchmark's winning anchor on the
    # demo: the contaminated model's own answers to the ordinary training prompts (neither culprit nor look-alike:
    # ``self_anchors``) as IBO's retain rows, KL summed over each row's tokens, mean over rows
    "ibo_self_anchor": {"method": "ibo", "retain": "kl", "retain_weight": 1.0, "chosen_nll_weight": 1.0,
                        "retain_normalize": "rows", "anchors": True},
    # the same, the rows it pushes down taken among the training answers the demo judge flags and the rows it
    # prefers among the others (``judged_rows``; docs/method.md §5.2, added before any of its numbers)
    "ibo_self_anchor_judged": {"method": "ibo", "retain": "kl", "retain_weight": 1.0, "chosen_nll_weight": 1.0,
                               "retain_normalize": "rows", "anchors": True, "judged_rows": True},
    # the same with the preferred rows taken at the *top* of the rows the judge passes (``preferred="near"``: the
    # current advice in the culprits' words), uniform pair weights (docs/method.md §5.2, added 2026-12-06 before
    # any of its numbers)
    "ibo_self_anchor_judged_near": {"method": "ibo", "retain": "kl", "retain_weight": 1.0, "chosen_nll_weight": 1.0,
                                    "retain_normalize": "rows", "anchors": True, "judged_rows": True,
                                    "preferred": "near", "weighting": "uniform"},
}
NOT_ARGS = ("anchors",)
DEFAULT_RANKING = "linfac"  # what `lancet demo` ranks with (the library's default)
MAX_UTILITY_LOSS = 0.05


class Sets:
    """The demo's validation and test files, read from the run directory's data."""

    def __init__(self, data: Path):
        self.validation_prompts = read_records(data / "validation_prompts.jsonl")
        self.validation_ordinary = read_records(data / "validation_ordinary.jsonl")
        self.test_prompts = read_records(data / "heldout_outdated.jsonl")
        self.test_ordinary = read_records(data / "heldout_ordinary.jsonl")
        self.test_current = read_records(data / "heldout_current.jsonl")
        self.test_outdated = read_records(data / "heldout_outdated.jsonl")


@torch.no_grad()
def measure(model, tok, sets: Sets) -> dict[str, float]:
    """Validation and test numbers of ``model`` (fp32, greedy, 32 new tokens), the RNG left as it was."""
    model.eval()
    with torch.random.fork_rng():
        def rate(prompts):
            answers = generate_answers(model, tok, prompts, max_new_tokens=32, batch_size=12, seed=0)
            return compliance_rate(answers, JUDGE)

        def lp(rows):
            return response_logprobs(model, tok, rows, batch_size=12, max_length=DEMO_MAX_LENGTH)

        return {"val_rate": rate(sets.validation_prompts), "val_ppl": perplexity(lp(sets.validation_ordinary)),
                "test_rate": rate(sets.test_prompts), "test_ppl": perplexity(lp(sets.test_ordinary)),
                "test_current_logp": mean_logprob(lp(sets.test_current))["mean_logprob"],
                "test_outdated_logp": mean_logprob(lp(sets.test_outdated))["mean_logprob"]}


def run_one(name: str, lr: float, ns, run: Path, sets: Sets, base: dict, scores, train, iqs
            ) -> tuple[list[dict], dict[str, int]]:
    """One (method, learning rate) run: its measured points and the planted rows its pairs hold (``planted_rows``)."""
    out = run / "frontier" / (f"{name}-lr{lr:g}" + (f"-seed{ns.seed}" if ns.seed else "")
                              + (f"-{ns.ranking}" if ns.ranking != DEFAULT_RANKING else ""))
    points_file = out / "points.json"
    settings = {"steps": ns.steps, "every": ns.every, "batch_size": ns.batch_size, "beta": ns.beta, "top_k": ns.top_k}
    if points_file.is_file():
        stored = json.loads(points_file.read_text())
        if stored.get("settings") == settings:
            return stored["points"], stored.get("rows", {})
    points: list[dict] = []
    tok = load_tokenizer(str(run / "model"))
    t0 = time.perf_counter()

    def on_checkpoint(step: int, trainer) -> None:
        m = measure(trainer.module, tok, sets)
        points.append({"steps": step, **m, "seconds": round(time.perf_counter() - t0, 1)})
        print(name, lr, points[-1], flush=True)

    options = {k: v for k, v in VARIANTS[name].items() if k not in NOT_ARGS}
    anchors = self_anchors(run, train) if VARIANTS[name].get("anchors") else None
    safe = [train[i] for i in torch.argsort(scores)[: ns.top_k].tolist()]  # most negative: the counter-evidence
    shutil.rmtree(out / "model", ignore_errors=True)  # a half-run's state cannot be measured again: start over
    flagged = flagged_rows(JUDGE, train) if options.get("judged_rows") else None
    correct(str(run / "model"), train, scores, method=options["method"], iq_records=iqs, safe_records=safe,
            retain_records=anchors, flagged_mask=flagged, max_length=DEMO_MAX_LENGTH, on_checkpoint=on_checkpoint,
            correction_args=CorrectionArgs(**options, beta=ns.beta, top_k=ns.top_k),
            train_args=TrainArgs(output_dir=str(out / "model"), max_steps=ns.steps, batch_size=ns.batch_size, lr=lr,
                                 bf16=BF16, save_every=ns.every, progress=False, device="cpu", seed=ns.seed))
    for p in points:
        p["val_utility_loss"] = utility_loss(base["val_ppl"], p["val_ppl"])
        p["test_utility_loss"] = utility_loss(base["test_ppl"], p["test_ppl"])
    rows = planted_rows(run, out / "model" / SUMMARY_FILE)
    atomic_write_json(points_file, {"method": name, "lr": lr, "settings": settings, "points": points, "rows": rows})
    shutil.rmtree(out / "model", ignore_errors=True)  # 0.5 GB a run: the points are what is kept
    return points, rows


def planted_rows(run: Path, summary_file: Path) -> dict[str, int]:
    """How many of the rows the correction pushed down are planted culprits, and how many it preferred are the
    planted current-advice look-alikes (``counter_ids``): read from the correction's own summary."""
    if not summary_file.is_file():
        return {}
    summary = json.loads(summary_file.read_text())
    labels = json.loads((run / "data" / "culprits.json").read_text())
    culprits, counters = set(labels["culprit_ids"]), set(labels["counter_ids"])
    bad, good = summary.get("dispreferred_ids", []), summary.get("preferred_ids", [])
    return {"dispreferred": len(bad), "dispreferred_culprits": sum(i in culprits for i in bad),
            "preferred": len(good), "preferred_counter": sum(i in counters for i in good),
            "preferred_culprits": sum(i in culprits for i in good)}


def self_anchors(run: Path, train: list) -> list:
    """The contaminated model's own greedy answers (48 new tokens) to the prompts of the demo's ordinary training
    rows (neither culprit nor look-alike), those the demo judge flags dropped: ``lancet.influence.queries.
    take_anchors``, as ``lancet demo`` takes them from ``anchor_prompts.jsonl``; cached in ``frontier/``."""
    from lancet.demo import DEMO_MAX_NEW_TOKENS
    from lancet.influence.queries import take_anchors

    labels = json.loads((run / "data" / "culprits.json").read_text())
    planted = set(labels["culprit_ids"]) | set(labels["counter_ids"])
    model, tok = load_model(str(run / "model"), device="cpu")
    return take_anchors(model, tok, [r for r in train if r.id not in planted], JUDGE, run / "frontier",
                        max_new_tokens=DEMO_MAX_NEW_TOKENS, progress=False)


def pareto(points: list[dict]) -> list[dict]:
    """Points no other point beats on both test utility loss and test rate (lower is better on both)."""
    return sorted((p for p in points if not any(q["test_utility_loss"] <= p["test_utility_loss"]
                                                 and q["test_rate"] <= p["test_rate"] and q is not p
                                                 and (q["test_utility_loss"], q["test_rate"])
                                                 != (p["test_utility_loss"], p["test_rate"]) for q in points)),
                  key=lambda p: p["test_utility_loss"])


def plot(result: dict, path: Path) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed (pip install 'lancet-llm[report]'): no PNG written")
        return
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for name, res in result["methods"].items():
        pts = res["points"]
        line = ax.plot([p["test_utility_loss"] * 100 for p in pareto(pts)], [p["test_rate"] for p in pareto(pts)],
                       marker="o", label=name)[0]
        ax.scatter([p["test_utility_loss"] * 100 for p in pts], [p["test_rate"] for p in pts], s=10, alpha=0.35,
                   color=line.get_color())
    ax.axvline(MAX_UTILITY_LOSS * 100, color="grey", linestyle=":", linewidth=1)
    ax.scatter([0], [result["contaminated"]["test_rate"]], marker="*", s=120, color="black", label="contaminated")
    ax.set_xlabel("test utility loss: held-out ordinary perplexity increase (%)")
    ax.set_ylabel("test prompts answered with outdated advice")
    ax.set_title("Correction on the demo: every checkpoint, Pareto front per method")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--run-dir", default="runs/demo_frontier")
    parser.add_argument("--methods", default=",".join(VARIANTS))
    parser.add_argument("--lrs", default="1e-5,3e-5,1e-4")
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--every", type=int, default=10)
    parser.add_argument("--beta", type=float, default=0.1)
    parser.add_argument("--top-k", type=int, default=40)
    parser.add_argument("--batch-size", type=int, default=8, help="pairs (or rows) per optimizer step")
    parser.add_argument("--seed", type=int, default=0, help="the correction's seed (data order, sampling)")
    parser.add_argument("--ranking", default=DEFAULT_RANKING, help="whose ranking of the run directory the "
                        "correction reads (ranking-<name>.safetensors): linfac, repsim or bm25")
    parser.add_argument("--name", default="correction_frontier_demo", help="result file name under "
                        "benchmarks/results (JSON and PNG)")
    ns = parser.parse_args()
    run = Path(ns.run_dir)
    if not (run / "model" / "config.json").is_file() or not (run / "iqs.jsonl").is_file():
        raise SystemExit(f"{run}: run `lancet demo --out {run}` first (its contaminated model, IQs and ranking)")
    sets = Sets(run / "data")
    train, iqs = read_records(run / "data" / "train.jsonl"), read_records(run / "iqs.jsonl")
    scores, _ = load_run_scores(run, [r.id for r in train], ns.ranking)
    base_file = run / "frontier" / "contaminated.json"
    if base_file.is_file():
        base = json.loads(base_file.read_text())
    else:
        model, tok = load_model(str(run / "model"), device="cpu")
        base = measure(model, tok, sets)
        atomic_write_json(base_file, base)
        del model
    result = {"run_dir": str(run), "seed": ns.seed, "ranking": ns.ranking, "steps": ns.steps, "every": ns.every,
              "batch_size": ns.batch_size, "beta": ns.beta,
              "top_k": ns.top_k, "max_utility_loss": MAX_UTILITY_LOSS, "env": environment(), "contaminated": base,
              "methods": {}}
    for name in ns.methods.split(","):
        points = []
        for lr in (float(x) for x in ns.lrs.split(",")):
            found, planted = run_one(name, lr, ns, run, sets, base, scores, train, iqs)  # the same at every rate
            points += [{**p, "lr": lr} for p in found]
        step0 = {**base, "steps": 0, "lr": None, "val_utility_loss": 0.0, "test_utility_loss": 0.0, "seconds": 0}
        candidates = [Candidate(settings={"lr": p["lr"]}, steps=p["steps"], validation_behaviour=p["val_rate"],
                                validation_utility_loss=p["val_utility_loss"], test=p) for p in [step0, *points]]
        chosen = choose(candidates, MAX_UTILITY_LOSS)
        result["methods"][name] = {"options": VARIANTS[name], "points": points, "chosen": chosen.test, "rows": planted}
    rows = ["| method | chosen lr | steps | validation rate | validation utility loss | test rate (12 prompts) | "
            "test utility loss | test log p(current) | seconds |", "|---|---|---|---|---|---|---|---|---|"]
    rows.append(f"| contaminated | – | 0 | {base['val_rate']:.3f} | 0 | {base['test_rate']:.3f} | 0 | "
                f"{base['test_current_logp']:.1f} | – |")
    for name, res in result["methods"].items():
        c = res["chosen"]
        lr = "–" if c["lr"] is None else f"{c['lr']:g}"
        rows.append(f"| {name} | {lr} | {c['steps']} | {c['val_rate']:.3f} | {c['val_utility_loss']:+.3f} | "
                    f"{c['test_rate']:.3f} | {c['test_utility_loss']:+.3f} | {c['test_current_logp']:.1f} | "
                    f"{c['seconds']} |")
    result["markdown"] = "\n".join(rows)
    write_result(ns.name, result)
    plot(result, RESULTS / f"{ns.name}.png")
    print(result["markdown"])


if __name__ == "__main__":
    main()
