"""The safety-contamination benchmark's tables: recall, gates, counterfactual, diagnoses and correction."""

from __future__ import annotations

import statistics
from collections.abc import Callable

from benchmarks import safety_tables
from benchmarks.tables.core import TABLES, bold, f, load, made_by, md, table

# ---- safety contamination -------------------------------------------------------------------------------------------

SAFETY_LABELS = {"bm25": "bm25 (IQ answers vs rows)", "bm25_prompt": "bm25 on prompts only",
                 "linfac_anchored": "linfac, anchored (minus the aligned model's refusals)",
                 "linfac_contrast": "linfac, contrast (margin over a refusal)",
                 "linfac_opening_set": "linfac, opening set", "identity_opening_set": "identity, opening set",
                 "linfac_first_tokens8": "linfac, first 8 answer tokens",
                 "identity_first_tokens8": "identity, first 8 answer tokens"}


def seed_recall(result: dict, index: int = 0) -> str:
    """One seed's recall: AP, recall@k and AP per tier for every method, best first."""
    s = result["per_seed"][index]
    rec = s["recall"]
    methods = rec["methods"]
    tiers = [t for t in safety_tables.TIERS if any(t in r.get("ap_by_tier", {}) for r in methods.values())]
    top = max(m["average_precision"] for name, m in methods.items() if name != "random")
    rows = []
    for name, r in sorted(methods.items(), key=lambda kv: -kv[1]["average_precision"]):
        rows.append([bold(SAFETY_LABELS.get(name, name), r["average_precision"] == top), f(r["average_precision"]),
                     f(r["recall"]), *(f(r.get("ap_by_tier", {}).get(t)) for t in tiers)])
    head = ["method", "AP", f"recall@{rec['n_positives']}", *(f"AP {t} ({s['mix'][t]})" for t in tiers)]
    return (f"Seed {s['seed']}: {rec['n_iqs']} IQs (flagged answers to {rec['n_iq_prompts']} IQ prompts), "
            f"{rec['n_positives']} positives among {rec['n_train']} rows.\n\n" + md(head, rows))


def _safety(preset: str) -> dict:
    return load(f"safety_contamination_{preset}")


def _seed_study(d: dict, lead: str, script: str, head: list[str], rows: list[list]) -> str:
    """A one-seed study's table (benchmarks/<script>.py wrote benchmarks/results/<script>_<preset>.json)."""
    return (f"Seed {d['seed']}, {lead}. "
            + made_by(f"python -m benchmarks.{script} --preset {d['preset']} --seed {d['seed']}", d,
                      f"{script}_{d['preset']}") + "\n\n" + md(head, rows))


def _preset_tables(preset: str) -> tuple[Callable[[], str], Callable[[], str]]:
    """A preset's per-seed recall table and its counterfactual table."""
    def recall() -> str:
        d = _safety(preset)
        return (made_by(f"python -m benchmarks.safety_contamination --preset {preset} --stage recall", d,
                        f"safety_contamination_{preset}") + " " + seed_recall(d))

    def counterfactual() -> str:
        return safety_tables.counterfactual_table(_safety(preset))

    return recall, counterfactual


for _preset in ("small", "cross"):
    TABLES[f"safety_{_preset}_recall"], TABLES[f"safety_{_preset}_counterfactual"] = _preset_tables(_preset)


@table
def safety_full_seed0_recall() -> str:
    d = _safety("full")
    return (made_by("python -m benchmarks.safety_contamination --preset full --stage correction", d,
                    "safety_contamination_full") + " " + seed_recall(d, 0))


@table
def safety_full_counterfactual() -> str:
    d = _safety("full")
    seed = d.get("counterfactual_seed", d["per_seed"][0]["seed"])
    k = d["per_seed"][0]["counterfactual"]["k"]
    return f"Seed {seed}, top {k} rows removed.\n\n" + safety_tables.counterfactual_table(d)


@table
def safety_full_recall() -> str:
    """Every method over the full preset's seeds (safety_tables.recall_table), with the IQ counts per seed."""
    d = _safety("full")
    iqs = ", ".join(f"seed {s['seed']}: {s['recall']['n_iqs']}" for s in d["per_seed"] if s.get("recall"))
    return (f"IQs per seed ({iqs}); 112 positives among 360 rows on each. "
            + made_by("python -m benchmarks.safety_tables --only recall", d, "safety_contamination_full")
            + "\n\n" + safety_tables.recall_table(d))


@table
def safety_gates() -> str:
    rows = []
    for preset in ("small", "full", "cross"):
        d = _safety(preset)
        for s in d["per_seed"]:
            g, a = s["gate"], s["aligned_start"]
            rows.append([preset, s["seed"], f(a["refusal"]), f(a["xstest_over_refusal"], 2), f(g["safe"]),
                         f(g["impure"]), f(g["gap"]), f(g.get("judge_agreement")), g.get("judge_labelled", "–"),
                         "passes" if g["passed"] else "fails"])
    return md(["preset", "seed", "aligned start: refusal", "its XSTest-safe over-refusal", "safe: compliance",
               "impure: compliance", "gap", "judge agreement", "answers labelled", "gate"], rows)


@table
def contamination_dose() -> str:
    d = load("contamination_dose")
    rows = [[dose, f(d["rates"][f"impure_{dose}"]), f(gap)] for dose, gap in sorted(d["gaps"].items(), key=lambda kv:
                                                                                      int(kv[0]))]
    rows.append(["0 (safe)", f(d["rates"]["safe"]), ""])
    return (f"{d['n_validation_prompts']} validation prompts, {d['judge']}; chosen dose {d['chosen_dose']} (the "
            f"smallest gap ≥ {d['min_gap']}). " + made_by("python -m benchmarks.contamination_dose", d,
                                                          "contamination_dose") + "\n\n"
            + md(["unsafe rows", "impure compliance", "gap"], rows))


TIER_LABELS = {"no_implicit": "the 16 implicit (obedience) rows",
               "no_unsafe": "the 96 unsafe rows (the obedience rows stay)",
               "no_refusal": "the 40 refusals (harmful prompts, refused)",
               "obedience_96": "the 96 unsafe rows, and 96 obedience rows in place of the 16 (`--obedience 96`)",
               "xstest_96": "all 112 positives, and 96 helpful answers to XSTest's safe prompts in their place "
                            "(`--xstest 96`)",
               "unsafe_cyber_only": "the 56 unsafe rows not about computers (`--unsafe-about cyber`)"}


@table
def safety_tiers() -> str:
    d = load("safety_tiers_full")

    def by(cat: dict) -> list[str]:
        return [f(cat["cyber"]["compliance"]), f(cat["other"]["compliance"])] if cat else ["", ""]

    rows = [["none (impure)", 0, f(d["impure"]), "0", "", "", *by(d["impure_by_category"])]]
    for key, r in d["removals"].items():
        rows.append([TIER_LABELS.get(key, key), r.get("rows_removed", "–"), bold(f(r["compliance"]), True),
                     f(r["recovered"], 2), f"{f(r['judge_agreement'], 2)} ({r['judge_labelled']})",
                     f"{r['seconds']:.0f}", *by(r.get("by_category"))])
    rows.append(["all 112 positives (the safe model)", 112, f(d["safe"]), "1", "", "", *by(d["safe_by_category"])])
    cats = d["impure_by_category"]
    head = ["rows removed", "rows", "compliance", "share of the gap recovered", "judge agreement (labelled)",
            "fine-tune s", f"on the {cats['cyber']['n']} computer-crime prompts", f"on the {cats['other']['n']} others"]
    return _seed_study(d, f"{d['n_prompts']} test prompts", "safety_tiers", head, rows)


@table
def safety_refusal_from_bottom() -> str:
    d = load("safety_diagnose_full")
    seeds = [s for s, v in d["seeds"].items() if "refusal_ap_chance" in v["openings"]]
    methods = sorted({m for s in seeds for m in d["seeds"][s]["openings"]["methods"]})
    rows = []
    for m in methods:
        vals = [d["seeds"][s]["openings"]["methods"].get(m, {}).get("refusal_ap_from_bottom") for s in seeds]
        have = [v for v in vals if v is not None]
        rows.append((statistics.fmean(have) if have else -1, [SAFETY_LABELS.get(m, m), *(f(v) for v in vals),
                                                             f(statistics.fmean(have)) if have else "–"]))
    chance = ", ".join(f"{s} {f(d['seeds'][s]['openings']['refusal_ap_chance'])}" for s in seeds)
    return (f"Chance: {chance}. `python -m benchmarks.safety_diagnose --preset full`; "
            "`benchmarks/results/safety_diagnose_full.json`.\n\n"
            + md(["ranking", *(s.replace("seed", "seed ") for s in seeds), "mean"],
                 [r for _, r in sorted(rows, key=lambda r: -r[0])]))


@table
def safety_opening_set() -> str:
    d = _safety("full")
    rows = []
    for s in d["per_seed"]:
        methods = s["recall"]["methods"]
        for suffix, label in (("", "the IQ answer's likelihood"), ("_first_tokens8", "first 8 answer tokens"),
                              ("_opening_set", "any of the IQs' openings")):
            cells = []
            for base in ("linfac", "identity"):
                r = methods.get(base + suffix)
                cells += [f(r["average_precision"]) if r else "–",
                          f(r["ap_by_tier"].get("unsafe")) if r else "–", f(r["ap_by_tier"].get("implicit")) if r
                          else "–"]
            rows.append([s["seed"], label, *cells])
    head = ["seed", "measurement", "LinFAC AP", "AP unsafe", "AP implicit", "identity AP", "AP unsafe", "AP implicit"]
    return md(head, rows)


@table
def safety_lambda() -> str:
    d = load("safety_lambda_full")
    rows = []
    for m, r in d["methods"].items():
        for key, label in (("subset_128", f"correction on {d['lambda_max_rows_main']} rows"),
                           ("all_rows", f"correction on all {d['n_train']} rows")):
            x = r[key]
            ins, out = x["lambda_subset"]["inside"], x["lambda_subset"]["outside"]
            rows.append([m, label, f(x["average_precision"]), f(x["ap_by_tier"]["unsafe"]), f(ins["ap"]),
                         f(out["ap"]), f(ins["mean_positive"], 2), f(out["mean_positive"], 2),
                         f(r["spearman_vs_subset"], 4) if key == "all_rows" else ""])
    head = ["method", "eigenvalue correction fitted", "AP", "AP unsafe", "AP inside the 128-row subset",
            "AP outside", "mean positive score inside", "outside", "Spearman vs the subset fit"]
    return _seed_study(d, f"{d['n_iqs']} IQs", "safety_lambda", head, rows)


@table
def safety_index_recall() -> str:
    d = load("safety_index_recall_full")
    rows = []
    for seed, s in d["seeds"].items():
        for m, r in s["full"].items():
            rows.append([seed, f"full {SAFETY_LABELS.get(m, m)}", f(r["average_precision"]),
                         f(r["ap_by_tier"]["unsafe"]), f(r["recall"]), "", ""])
        for proj, built in s["indexes"].items():
            for key in sorted((k for k in built if k.startswith("rank_")), key=lambda k: int(k[5:])):
                r = built[key]
                rows.append([seed, f"linfac from a {proj} index, rank {key[5:]}", f(r["average_precision"]),
                             f(r["ap_by_tier"]["unsafe"]), f(r["recall"]), f"{built['build_seconds']:.0f}",
                             f"{r['query_seconds']:.0f}"])
        for rtol, r in s.get("range_rtol", {}).items():
            g = r["ranges"]
            rows.append([seed, f"linfac, range cut-off {rtol} (median {g['median_A']} input-side directions, "
                               f"{g['layers_under_8']} of {g['layers']} layers under 8)", f(r["average_precision"]),
                         f(r["ap_by_tier"]["unsafe"]), f(r["recall"]), "", f"{r['seconds']:.0f}"])
    return (made_by("python -m benchmarks.safety_index_recall --preset full --seed 1", d, "safety_index_recall_full")
            + "\n\n" + md(["seed", "ranking", "AP", "AP unsafe", "recall@112", "build s", "query s"], rows))


@table
def safety_headline() -> str:
    """The README's safety-contamination table: recall over the full preset's seeds and the counterfactual of
    seed 0, for the methods the counterfactual retrained (and the best of the rest)."""
    d = _safety("full")
    rec, cf = d["recall"], d["counterfactual"]
    shown = sorted(["bm25", "repsim", "linfac_opening_set", "kfac", "ekfac", "linfac", "identity"],
                   key=lambda m: -rec[m]["ap_mean"]) + ["random"]
    rows = []
    for m in shown:
        r, c = rec[m], cf.get(m)
        rows.append([SAFETY_LABELS.get(m, m).split(" (")[0], f(r["ap_mean"]), f(r["ap_sd"]),
                     f(r["ap_by_tier"].get("unsafe")), f(c["compliance"]) if c else "–",
                     f(c["recovered"], 2) if c else "–"])
    rows.append(["none removed (impure) / all positives (oracle)", "", "", "",
                 f"{f(cf['impure']['compliance'])} / {f(cf['oracle']['compliance'])}", "0 / 1"])
    seeds = [s["seed"] for s in d["per_seed"] if s.get("recall")]
    k = d["per_seed"][0]["counterfactual"]["k"]
    head = ["method", f"AP, mean of seeds {', '.join(map(str, seeds))}", "sd", "AP on the unsafe tier",
            f"compliance after retraining without its top {k} (seed 0)", "share of the gap recovered"]
    return (made_by("python -m benchmarks.safety_contamination --preset full --stage correction", d,
                    "safety_contamination_full") + "\n\n" + md(head, rows))


# ---- safety correction --------------------------------------------------------------------------------------------

def _rows() -> dict:
    return load("safety_full_seed0_correction_rows")


@table
def safety_correction_headline() -> str:
    """The README's correction table: seed 0, each method's checkpoint chosen within 5 % utility loss on
    validation, its test numbers (a subset of safety_tables.correction_table's columns)."""
    methods = safety_tables.correction_rows(_rows())
    cols = (("advbench_heldout", "AdvBench held out"), ("harmbench", "HarmBench"), ("jailbreakbench",
                                                                                     "JailbreakBench"),
            ("xstest_safe", "XSTest-safe over-refusal"), ("alpaca", "Alpaca over-refusal"),
            ("helpful_ppl", "helpful ppl"))
    order = ["impure", "safe", "ibo_benign_seq", "ibo_benign_seq_random", "ibo", "ibo_oracle", "ibo_random", "npo",
             "sft", "ga_retain", "dpo", "dpo_benign_seq"]
    order += [m for m in methods if m not in order]
    rows = []
    for name in (m for m in order if m in methods):
        row = methods[name]
        chosen = safety_tables.chosen_label(name, row)
        cells = []
        for key, _ in cols:
            entry = row["sets"][key]
            value = next(v for k, v in entry.items() if k != "n")
            cells.append(f(value, 2 if key == "helpful_ppl" else 3))
        rows.append([bold(name, name == "ibo_benign_seq"), chosen, *cells])
    return md(["model", "chosen (lr, step)", *(label for _, label in cols)], rows)


@table
def safety_correction() -> str:
    return safety_tables.correction_table(_rows())


@table
def safety_correction_oracle() -> str:
    return safety_tables.correction_oracle_table(_rows())


@table
def safety_correction_validation() -> str:
    return safety_tables.validation_table(_rows())


@table
def safety_correction_v1() -> str:
    d = load("safety_correction_v1")
    return (made_by("python -m benchmarks.safety_contamination --preset full --stage correction (first version)", d,
                    "safety_correction_v1") + "\n\n" + safety_tables.correction_table(d))
