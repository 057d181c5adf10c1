"""The README's tables of the safety-contamination benchmark, rendered from its result JSON (never copied by hand).

    .venv/bin/python -m benchmarks.safety_tables                       # full preset: recall, counterfactual, correction
    .venv/bin/python -m benchmarks.safety_tables --result benchmarks/results/safety_correction_v1.json --only correction

Recall: AP per seed, the mean ± sd over every seed with recall, and the mean over the seeds after the first (the
first seed is where ablations were designed, so only the later ones test them). Counterfactual and correction: the
first seed's numbers as measured.
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path

from benchmarks.common import RESULTS
from lancet.correct.select import DEFAULT_MAX_UTILITY_LOSS

CORRECTION_COLUMNS = (("advbench_heldout", "AdvBench held out"), ("advbench_role_play", "role play"),
                      ("advbench_prefix_injection", "prefix injection"),
                      ("advbench_refusal_suppression", "refusal suppression"), ("harmbench", "HarmBench"),
                      ("jailbreakbench", "JailbreakBench"), ("strongreject", "StrongREJECT"),
                      ("xstest_safe", "XSTest-safe over-refusal"), ("alpaca", "Alpaca over-refusal"),
                      ("alpaca_diversity", "distinct-2"), ("helpful_ppl", "helpful ppl"))
TIERS = ("unsafe", "implicit")


def _fmt(x: float | None, digits: int = 3) -> str:
    return "–" if x is None else f"{x:.{digits}f}"


def recall_table(result: dict) -> str:
    """One row per method, best mean AP first: AP per seed, mean ± sd, the later seeds' mean, recall@k, AP by tier."""
    seeds = [s for s in result["per_seed"] if s.get("recall")]
    if not seeds:
        return "(no recall yet)"
    names = [f"seed {s['seed']}" for s in seeds]
    later = seeds[1:]
    head = ["method", *(f"AP {n}" for n in names), f"AP mean ± sd ({len(seeds)})"]
    head += [f"AP mean of seeds {', '.join(str(s['seed']) for s in later)}"] if later else []
    tiers = [t for t in TIERS if any(t in row.get("ap_by_tier", {}) for s in seeds
                                     for row in s["recall"]["methods"].values())]  # a preset may lack a tier
    head += ["recall@k (mean)", *(f"AP {t} (mean)" for t in tiers)]
    lines = ["| " + " | ".join(head) + " |", "|---" * len(head) + "|"]
    methods = seeds[0]["recall"]["methods"]
    rows = []
    for method in methods:
        per = [s["recall"]["methods"].get(method) for s in seeds]
        aps = [p["average_precision"] if p else None for p in per]
        have = [a for a in aps if a is not None]
        mean = statistics.fmean(have)
        sd = statistics.stdev(have) if len(have) > 1 else 0.0
        later_aps = [a for a in aps[1:] if a is not None]
        cells = [method, *(_fmt(a) for a in aps), f"{mean:.3f} ± {sd:.3f}" if len(have) > 1 else f"{mean:.3f}"]
        cells += [_fmt(statistics.fmean(later_aps)) if later_aps else "–"] if later else []
        cells.append(_fmt(statistics.fmean(p["recall"] for p in per if p)))
        for tier in tiers:
            vals = [p["ap_by_tier"][tier] for p in per if p and tier in p.get("ap_by_tier", {})]
            cells.append(_fmt(statistics.fmean(vals)) if vals else "–")
        rows.append((mean, cells))
    lines += ["| " + " | ".join(c) + " |" for _, c in sorted(rows, key=lambda r: -r[0])]
    return "\n".join(lines)


def counterfactual_table(result: dict) -> str:
    """Rows removed, positives among them, compliance after retraining, share of the oracle's drop recovered."""
    cf = result.get("counterfactual")
    if not cf:
        return "(no counterfactual yet)"
    impure, oracle = cf["impure"]["compliance"], cf["oracle"]["compliance"]
    lines = ["| rows removed | positives among them | compliance | recovered | judge agreement (labelled) |",
             "|---|---|---|---|---|", f"| none (impure) | 0 | {impure:.3f} | 0 | |"]
    methods = sorted((m for m in cf if m not in ("impure", "oracle")), key=lambda m: cf[m]["compliance"])
    for m in methods:
        row = cf[m]
        agreement = (f"{row['judge_agreement']:.2f} ({row['judge_labelled']})"
                     if row.get("judge_agreement") is not None else "–")
        label = f"{m} k" if m == "random" else f"{m} top k"
        lines.append(f"| {label} | {row['positives_removed']} | {row['compliance']:.3f} | "
                     f"{row['recovered']:.2f} | {agreement} |")
    lines.append(f"| all positives (oracle = safe model) | | {oracle:.3f} | 1 | |")
    return "\n".join(lines)


def correction_rows(result: dict) -> dict:
    """The correction rows of a benchmark result, of the first run's file, or of the kept-rows file."""
    return result.get("correction") or result.get("methods") or result.get("rows") or {}


def chosen_label(name: str, row: dict) -> str:
    """What validation chose for a correction row: "" for the two reference models, else its (lr, step)."""
    if name in ("impure", "safe"):
        return ""
    if row.get("chosen_steps") == 0:
        return "step 0 (kept the impure model)"
    return f"{row['chosen_lr']:g}, {row['chosen_steps']}" if row.get("chosen_lr") else str(row.get("chosen_steps", ""))


def correction_table(result: dict) -> str:
    """One row per model: each test set's headline number, and the (learning rate, step) chosen on validation."""
    methods = correction_rows(result)
    if not methods:
        return "(no correction yet)"
    head = ["model", "chosen (lr, step)", *(label for _, label in CORRECTION_COLUMNS)]
    lines = ["| " + " | ".join(head) + " |", "|---" * len(head) + "|"]
    order = [m for m in ("impure", "safe") if m in methods] + [m for m in methods if m not in ("impure", "safe")]
    for name in order:
        row = methods[name]
        cells = [name, chosen_label(name, row)]
        for key, _ in CORRECTION_COLUMNS:
            entry = row["sets"].get(key)
            value = None if entry is None else next(v for k, v in entry.items() if k != "n")
            cells.append(_fmt(value, 2 if key == "helpful_ppl" else 3))
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def correction_oracle_table(result: dict) -> str:
    """The correction table at the second budget: each method's (learning rate, step) chosen within the utility loss
    the safe model itself shows on validation (retraining without the culprits), where it was measured."""
    methods = correction_rows(result)
    loose = {m: row["at_oracle_budget"] for m, row in methods.items() if "at_oracle_budget" in row}
    if not loose:
        return "(no correction at the oracle's budget yet)"
    budget = next(iter(loose.values()))["budget"]
    rows = {m: methods[m] for m in ("impure", "safe") if m in methods} | loose
    return f"Budget: {budget:.4f}\n\n" + correction_table({"correction": rows})


def validation_table(result: dict) -> str:
    """Each correction run's validation curve, what the choice read: per (method, learning rate) and checkpoint,
    the compliance on the validation prompts and the utility loss (the larger of the perplexity rise and the rise
    of the benign prompts' refusal rate); * marks a checkpoint within the 5 % budget."""
    methods = correction_rows(result)
    curves = {(m, lr): curve for m, row in methods.items() for lr, curve in row.get("validation", {}).items()}
    if not curves:
        return "(no validation curves yet)"
    steps = sorted({p["steps"] for curve in curves.values() for p in curve})
    head = ["method", "lr", *(f"step {s}" for s in steps)]
    lines = ["| " + " | ".join(head) + " |", "|---" * len(head) + "|"]
    for (method, lr), curve in sorted(curves.items(), key=lambda kv: (kv[0][0], float(kv[0][1].removeprefix("lr")))):
        at = {p["steps"]: p for p in curve}
        cells = [method, lr.removeprefix("lr")]
        for step in steps:
            p = at.get(step)
            cells.append("–" if p is None else f"{p['behaviour']:.2f} / {p['utility_loss']:+.2f}"
                         + ("*" if p["utility_loss"] <= DEFAULT_MAX_UTILITY_LOSS else ""))
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


TABLES = {"recall": recall_table, "counterfactual": counterfactual_table, "correction": correction_table,
          "correction_oracle": correction_oracle_table, "validation": validation_table}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--result", default=str(RESULTS / "safety_contamination_full.json"))
    parser.add_argument("--only", choices=sorted(TABLES), default=None)
    ns = parser.parse_args()
    result = json.loads(Path(ns.result).read_text())
    for name, table in TABLES.items():
        if ns.only in (None, name):
            print(f"### {name}\n\n{table(result)}\n")


if __name__ == "__main__":
    main()
