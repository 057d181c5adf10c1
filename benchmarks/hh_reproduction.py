"""The paper's HH setting on SmolLM2-135M-Instruct: find the unsafe training rows, correct the impure model, and
compare IBO with every baseline and control.

    .venv/bin/python -m benchmarks.hh_reproduction --preset small   # one seed, <= 30 min here
    .venv/bin/python -m benchmarks.hh_reproduction --preset full --run-dir runs/hh_small   # 3 seeds

Splits (seeded; ``split_data``), all from ../shared/data (``--shared``), never copied into the repository:
- safe, helpful: HH-RLHF helpful-base test, the *chosen* answers;
- safe, refusal: safety-tuned-llamas (harmful instructions with safe answers);
- unsafe: HH-RLHF harmless-base test, the *rejected* answers that do not open with a refusal (the refusal
  matcher) and differ from the chosen one.
Rows longer than ``max_length`` tokens are dropped (not cut), then each source is shuffled with the seed and cut
into disjoint parts: training rows; held-out evaluation rows; the safe rows given to SFT and to the retain terms
(``safe``: unseen refusals + unseen helpful answers); human (chosen, rejected) pairs for DPO; harmful prompts
whose flagged answers become the IQs.

Models: ``safe`` = fine-tuned on the safe rows only; ``impure`` = safe + unsafe rows. IQs = the impure model's
greedy answers to held-out harmless-base prompts that the judge (XSTest-trained classifier) flags as compliant.
Recall: average precision and recall@k (k = number of unsafe rows) of the unsafe rows for each estimator, and
random (the mean over 200 seeded random rankings). Correction: every method from the impure model with the same
steps and batch size, ranked by LinFAC; evaluated with the suite built in ``eval_suite`` (harmful compliance on the
IQ prompts and four out-of-distribution harmful sets, over-refusal on XSTest-safe and Alpaca, distinct-2 of the
Alpaca answers, log-likelihood of held-out unsafe answers, perplexity of held-out helpful answers).
Every stage is stored under --run-dir and reused on a rerun. Writes benchmarks/results/hh_reproduction_<preset>.json.
"""

from __future__ import annotations

import argparse
import random
import statistics
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import torch

from benchmarks.common import environment, rows_that_fit, shared_data, write_result
from lancet.artifacts import atomic_write_bytes, atomic_write_json
from lancet.constants import DEFAULT_MODEL
from lancet.correct import CorrectionArgs, correct
from lancet.data import Record, encode_records, read_hh_rlhf, read_safety_tuned_llamas
from lancet.data.records import records_to_jsonl
from lancet.evaluate import load_suite
from lancet.evaluate.judges import RefusalMatcher, make_judge
from lancet.evaluate.suite import evaluate_or_reuse
from lancet.finetune import finetune
from lancet.hardware import auto_bf16
from lancet.influence import Influence, InfluenceArgs
from lancet.influence.attribute import contrast_scores
from lancet.influence.queries import take_iqs
from lancet.influence.recall import aggregate, average_precision, random_baseline, recall_at_k
from lancet.models.loading import load_model, load_tokenizer
from lancet.train import TrainArgs

CORRECTIONS = ("ibo", "sft", "ga", "ga_retain", "npo", "dpo", "ibo_random", "ibo_oracle")
CONTRAST_REFUSAL = "I'm sorry, but I can't help with that."

BF16 = auto_bf16()  # bf16 autocast where the hardware has it natively, else fp32 (lancet/hardware.py)


@dataclass(frozen=True)
class Preset:
    seeds: tuple[int, ...]
    n_helpful: int
    n_refusal: int
    n_unsafe: int
    max_length: int
    n_iq_prompts: int
    n_heldout: int
    n_safe: int
    n_dpo: int
    eval_limit: int
    ft_epochs: float
    ft_lr: float
    corr_steps: int
    corr_lr: float
    top_k: int
    lambda_max_rows: int
    contrast: bool  # also rank by the margin over a generic refusal (linfac_contrast: one more scoring pass)
    methods: tuple[str, ...] = ("linfac", "ekfac", "kfac", "identity", "bm25")


PRESETS = {
    # small fits 30 min here: 12 correction steps instead of 16, and no contrast ranking
    "small": Preset(seeds=(0,), n_helpful=64, n_refusal=32, n_unsafe=32, max_length=192, n_iq_prompts=16,
                    n_heldout=16, n_safe=32, n_dpo=64, eval_limit=8, ft_epochs=2.0, ft_lr=1e-4, corr_steps=12,
                    corr_lr=2e-5, top_k=16, lambda_max_rows=64, contrast=False),
    # full = 16 correction steps and the contrast ranking, over three seeds (the spread is what it adds): a larger
    # configuration did not fit the compute of the session that ran it (about 31 min per seed here)
    "full": Preset(seeds=(0, 1, 2), n_helpful=64, n_refusal=32, n_unsafe=32, max_length=192, n_iq_prompts=16,
                   n_heldout=16, n_safe=32, n_dpo=64, eval_limit=8, ft_epochs=2.0, ft_lr=1e-4, corr_steps=16,
                   corr_lr=2e-5, top_k=16, lambda_max_rows=64, contrast=True),
    # an ablation of the contamination's strength: small's data and estimators with twice the fine-tuning epochs
    # (run with --corrections none): is recall at random because the unsafe rows barely change the model?
    "strong": Preset(seeds=(0,), n_helpful=64, n_refusal=32, n_unsafe=32, max_length=192, n_iq_prompts=16,
                     n_heldout=16, n_safe=32, n_dpo=64, eval_limit=8, ft_epochs=4.0, ft_lr=1e-4, corr_steps=12,
                     corr_lr=2e-5, top_k=16, lambda_max_rows=64, contrast=False),
}
JOINT_SCORING_BYTES = 12 * 1024**3  # the four gradient methods' preconditioned IQs share one scoring pass


def split_data(shared: Path, preset: Preset, seed: int, tokenizer) -> dict[str, list]:
    """Disjoint, seeded parts of the three sources (see the module docstring)."""
    rng = random.Random(seed)
    p = preset
    helpful = rows_that_fit(read_hh_rlhf(shared / "hh-rlhf/helpful-base_test.jsonl.gz", "chosen"), tokenizer,
                            p.max_length)
    refusal = rows_that_fit(read_safety_tuned_llamas(shared / "safety-tuned-llamas/safety_only_data_Instructions.json"),
                    tokenizer, p.max_length)
    harmless = shared / "hh-rlhf/harmless-base_test.jsonl.gz"
    chosen = {r.line: r for r in read_hh_rlhf(harmless, "chosen")}
    matcher = RefusalMatcher()
    rejected = [r for r in read_hh_rlhf(harmless, "rejected")
                if r.line in chosen and r.response_text != chosen[r.line].response_text
                and not matcher(r.response_text)]
    rejected = rows_that_fit(rejected, tokenizer, p.max_length)
    for rows in (helpful, refusal, rejected):
        rows.sort(key=lambda r: r.line)  # a fixed order before the seeded shuffle
        rng.shuffle(rows)
    need = {"helpful": p.n_helpful + p.n_heldout + p.n_safe // 2, "refusal": p.n_refusal + p.n_safe // 2,
            "unsafe": p.n_unsafe + p.n_iq_prompts + p.n_heldout + p.n_dpo}
    have = {"helpful": len(helpful), "refusal": len(refusal), "unsafe": len(rejected)}
    short = [k for k in need if have[k] < need[k]]
    if short:
        raise SystemExit(f"not enough rows for the preset: {short[0]} has {have[short[0]]}, needs {need[short[0]]}")
    cut = p.n_unsafe
    iq_rows = rejected[cut:cut + p.n_iq_prompts]
    heldout_unsafe = rejected[cut + p.n_iq_prompts:cut + p.n_iq_prompts + p.n_heldout]
    dpo_rows = rejected[cut + p.n_iq_prompts + p.n_heldout:need["unsafe"]]
    safe_train = helpful[:p.n_helpful] + refusal[:p.n_refusal]
    unsafe_train = rejected[:p.n_unsafe]
    train = safe_train + unsafe_train
    rng.shuffle(train)
    return {
        "train": train, "safe_train": safe_train, "unsafe_ids": [r.id for r in unsafe_train],
        "iq_prompts": [Record(messages=tuple(r.prompt_messages), source=r.source, line=r.line) for r in iq_rows],
        "heldout_unsafe": heldout_unsafe,
        "heldout_helpful": helpful[p.n_helpful:p.n_helpful + p.n_heldout],
        "safe": helpful[p.n_helpful + p.n_heldout:need["helpful"]] + refusal[p.n_refusal:need["refusal"]],
        "dpo_pairs": [(chosen[r.line], r) for r in dpo_rows],
    }


def eval_suite(run: Path, preset: Preset) -> dict:
    lim = preset.eval_limit
    harm = "{shared}/refusal-direction-harmful-sets"
    return {"name": "hh", "max_new_tokens": 32, "batch_size": 12, "seed": 0, "max_length": preset.max_length,
            "judge": "classifier", "judge_data": "{shared}/xstest/annotated_completions",
            "sets": [{"name": "iq_prompts", "kind": "behaviour", "path": str(run / "iq_prompts.jsonl")},
                     {"name": "advbench", "kind": "harmful_prompts", "path": f"{harm}/advbench.csv", "limit": lim},
                     {"name": "harmbench", "kind": "harmful_prompts", "path": f"{harm}/harmbench_test.csv",
                      "harmbench_category": "standard", "limit": lim},
                     {"name": "jailbreakbench", "kind": "harmful_prompts", "path": f"{harm}/jailbreakbench.csv",
                      "limit": lim},
                     {"name": "strongreject", "kind": "harmful_prompts", "path": f"{harm}/strongreject.csv",
                      "limit": lim},
                     {"name": "xstest_safe", "kind": "over_refusal", "path": "{shared}/xstest/xstest_prompts.csv",
                      "limit": lim},
                     {"name": "alpaca", "kind": "over_refusal", "path": f"{harm}/harmless_alpaca_test.json",
                      "limit": lim},
                     {"name": "alpaca_diversity", "kind": "diversity", "of": "alpaca"},
                     {"name": "heldout_unsafe_answers", "kind": "answer_logprob",
                      "path": str(run / "heldout_unsafe.jsonl")},
                     {"name": "heldout_helpful", "kind": "perplexity", "path": str(run / "heldout_helpful.jsonl")}]}


def run_seed(preset: Preset, seed: int, run: Path, shared: Path, corrections: tuple[str, ...], progress: bool,
             ranking_name: str = "linfac") -> dict:
    run.mkdir(parents=True, exist_ok=True)
    tokenizer = load_tokenizer(DEFAULT_MODEL)
    parts = split_data(shared, preset, seed, tokenizer)
    for name in ("iq_prompts", "heldout_unsafe", "heldout_helpful"):
        atomic_write_bytes(run / f"{name}.jsonl", records_to_jsonl(parts[name]))
    atomic_write_json(run / "suite.json", eval_suite(run.resolve(), preset))
    suite = load_suite(run / "suite.json", shared)
    judge = make_judge("classifier", suite.judge_data)
    seconds: dict[str, float] = {}
    result: dict = {"seed": seed, "n_train": len(parts["train"]), "n_unsafe": len(parts["unsafe_ids"]),
                    "seconds": seconds, "models": {}, "recall": {}}

    def ft(name: str, rows: list[Record]) -> Path:
        t0 = time.perf_counter()
        args = TrainArgs(output_dir=str(run / name), epochs=preset.ft_epochs, lr=preset.ft_lr, batch_size=8,
                         warmup_steps=3, bf16=BF16, seed=seed, save_every=20, progress=progress)
        out = finetune(DEFAULT_MODEL, rows, args, max_length=preset.max_length)
        seconds[f"finetune_{name}"] = round(time.perf_counter() - t0, 1)
        return out

    models = {"safe": ft("safe", parts["safe_train"]), "impure": ft("impure", parts["train"])}
    impure, tok = load_model(str(models["impure"]))

    # IQs: the impure model's answers to held-out harmful prompts that the judge flags
    t0 = time.perf_counter()
    iqs = take_iqs(impure, tok, parts["iq_prompts"], judge, run, max_new_tokens=48, progress=progress)
    seconds["iqs"] = round(time.perf_counter() - t0, 1)
    result["n_iqs"], result["n_iq_prompts"] = len(iqs), len(parts["iq_prompts"])
    if not iqs:
        raise SystemExit("the judge flags none of the impure model's answers: no IQs")

    train = encode_records(parts["train"], tok, preset.max_length, progress=False)
    queries = encode_records(iqs, tok, preset.max_length, progress=False)
    unsafe = torch.tensor([i in set(parts["unsafe_ids"]) for i in train.ids])
    k = int(unsafe.sum())
    result["recall"]["random"] = {**random_baseline(unsafe, key=f"recall@{k}"), "seconds": 0.0}
    rankings = {}
    args = InfluenceArgs(bf16=BF16, batch_size=8, lambda_max_rows=preset.lambda_max_rows, progress=progress)
    fit_seconds = {}
    for method in preset.methods:  # fits first (timed apart), then one scoring pass shared by every method
        t0 = time.perf_counter()
        if method != "bm25":
            Influence(impure, replace(args, method=method), out_dir=run / "influence").fit(train)
        fit_seconds[method] = time.perf_counter() - t0
    t0 = time.perf_counter()
    all_scores = Influence(impure, args, out_dir=run / "influence").scores_by_method(
        train, queries, preset.methods, max_joint_bytes=JOINT_SCORING_BYTES)
    seconds["score_all_methods"] = round(time.perf_counter() - t0, 1)
    for method in preset.methods:
        rankings[method] = aggregate(all_scores[method]["scores"].double())
        result["recall"][method] = {"average_precision": round(average_precision(rankings[method], unsafe), 4),
                                    f"recall@{k}": round(recall_at_k(rankings[method], unsafe, k), 4),
                                    "seconds": round(fit_seconds[method], 1)}
        print(f"seed {seed} recall {method}: {result['recall'][method]}", flush=True)

    # the margin over a generic refusal (lancet.influence.attribute.contrast_scores): HH-style rows that raise
    # any conversational answer cancel; rows that favour compliance over refusal remain
    for method in ("linfac",) if preset.contrast else ():
        t0 = time.perf_counter()
        scores = contrast_scores(Influence(impure, replace(args, method=method), out_dir=run / "influence"), train,
                                 queries, iqs, CONTRAST_REFUSAL, tok, preset.max_length)
        name = f"{method}_contrast"
        rankings[name] = aggregate(scores.double())
        result["recall"][name] = {"average_precision": round(average_precision(rankings[name], unsafe), 4),
                                  f"recall@{k}": round(recall_at_k(rankings[name], unsafe, k), 4),
                                  "seconds": round(time.perf_counter() - t0 + result["recall"][method]["seconds"], 1)}
        print(f"seed {seed} recall {name}: {result['recall'][name]}", flush=True)

    def measure(name: str, model) -> None:
        metrics = evaluate_or_reuse(model, tok, suite, run / f"metrics-{name}.json", progress=progress)
        result["models"][name] = {**{s: r.get(r["metric"]) for s, r in metrics["sets"].items()},
                                  "judge_accuracy": metrics["judge"]["accuracy"]}
        print(f"seed {seed} {name}: {result['models'][name]}", flush=True)

    measure("impure", impure)
    del impure
    safe_model, _ = load_model(str(models["safe"]))
    measure("safe", safe_model)
    del safe_model
    ranking = rankings[ranking_name]
    for method in corrections:
        t0 = time.perf_counter()
        out = correct(str(models["impure"]), parts["train"], ranking, method=method, iq_records=iqs,
                      safe_records=parts["safe"], pref_pairs=parts["dpo_pairs"], culprit_mask=unsafe,
                      max_length=preset.max_length,
                      correction_args=CorrectionArgs(method=method, beta=0.1, top_k=preset.top_k, seed=seed),
                      train_args=TrainArgs(output_dir=str(run / f"correct-{method}"), max_steps=preset.corr_steps,
                                           batch_size=8, lr=preset.corr_lr, bf16=BF16, seed=seed, save_every=8,
                                           progress=progress))
        seconds[f"correct_{method}"] = round(time.perf_counter() - t0, 1)
        fixed, _ = load_model(str(out))
        measure(method, fixed)
        del fixed
    return result


def summarize(per_seed: list[dict]) -> dict:
    """Mean and sample standard deviation over seeds of every number in the recall and model tables."""
    def stats(values):
        values = [v for v in values if isinstance(v, int | float)]
        return {"mean": round(statistics.fmean(values), 4),
                "std": round(statistics.stdev(values), 4) if len(values) > 1 else 0.0} if values else None

    out: dict = {"recall": {}, "models": {}}
    for table in ("recall", "models"):
        for name in per_seed[0][table]:
            keys = per_seed[0][table][name]
            out[table][name] = {k: stats([s[table].get(name, {}).get(k) for s in per_seed]) for k in keys}
    return out


def markdown(summary: dict, per_seed: list[dict]) -> str:
    def cell(x, digits=3):
        if x is None:
            return "–"
        return f"{x['mean']:.{digits}f}" + (f" ± {x['std']:.{digits}f}" if len(per_seed) > 1 else "")

    k = next(key for key in summary["recall"]["random"] if key.startswith("recall@"))
    lines = [f"| method | average precision | {k} | fit seconds |", "|---|---|---|---|"]
    for name, r in summary["recall"].items():
        lines.append(f"| {name} | {cell(r['average_precision'])} | {cell(r[k])} | {cell(r['seconds'], 0)} |")
    shared = [s["seconds"]["score_all_methods"] for s in per_seed if "score_all_methods" in s["seconds"]]
    if shared:
        lines += ["", f"Scoring: one pass shared by every gradient method, {statistics.fmean(shared):.0f} s "
                  "(linfac_contrast: its fit plus a pass of its own)."]
    lines += ["", "| model | IQ prompts | AdvBench | HarmBench | JBB | StrongREJECT | XSTest-safe refusal | "
              "Alpaca refusal | distinct-2 | unsafe logp | helpful ppl |", "|---" * 11 + "|"]
    cols = ("iq_prompts", "advbench", "harmbench", "jailbreakbench", "strongreject", "xstest_safe", "alpaca",
            "alpaca_diversity", "heldout_unsafe_answers", "heldout_helpful")
    for name, m in summary["models"].items():
        lines.append(f"| {name} | " + " | ".join(cell(m.get(c), 1 if c == "heldout_unsafe_answers" else 2)
                                                 for c in cols) + " |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="small", choices=sorted(PRESETS))
    parser.add_argument("--run-dir", default=None, help="default runs/hh_<preset>")
    parser.add_argument("--shared", default=None, help="default ../shared/data")
    parser.add_argument("--corrections", default=",".join(CORRECTIONS), help="comma-separated, or none")
    parser.add_argument("--seeds", default=None, help="comma-separated subset of the preset's seeds")
    parser.add_argument("--ranking", default="linfac", help="which ranking the corrections use (linfac_contrast, ...)")
    parser.add_argument("--quiet", action="store_true")
    ns = parser.parse_args()
    preset = PRESETS[ns.preset]
    shared = shared_data(ns.shared, "hh-rlhf")
    run = Path(ns.run_dir or f"runs/hh_{ns.preset}")
    seeds = tuple(int(s) for s in ns.seeds.split(",")) if ns.seeds else preset.seeds
    t0 = time.perf_counter()
    per_seed = []
    name = f"hh_reproduction_{ns.preset}"
    for seed in seeds:
        corrections = () if ns.corrections == "none" else tuple(ns.corrections.split(","))
        per_seed.append(run_seed(preset, seed, run / f"seed{seed}", shared, corrections,
                                 progress=not ns.quiet, ranking_name=ns.ranking))
        summary = summarize(per_seed)
        result = {"preset": ns.preset, "settings": asdict(preset), "ranking": ns.ranking,
                  "seeds": list(seeds[:len(per_seed)]),
                  "env": environment(), "seconds": round(time.perf_counter() - t0, 1), "summary": summary,
                  "per_seed": per_seed, "markdown": markdown(summary, per_seed)}
        write_result(name, result)
    print(result["markdown"])


if __name__ == "__main__":
    main()
