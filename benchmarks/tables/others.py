"""The HH reproduction's, the speed benchmarks', the contamination suite's and the correction suite's tables."""

from __future__ import annotations

from collections.abc import Callable

from benchmarks.tables.core import (
    TABLES,
    Missing,
    bold,
    f,
    load,
    made_by,
    md,
    table,
)

# ---- HH reproduction --------------------------------------------------------------------------------------------

def _hh(preset: str) -> Callable[[], str]:
    def table() -> str:
        from benchmarks.hh_reproduction import markdown  # the benchmark's own renderer

        d = load(f"hh_reproduction_{preset}")
        seeds = ", ".join(str(s["seed"]) for s in d["per_seed"])
        iqs = ", ".join(str(s["n_iqs"]) for s in d["per_seed"])
        return (f"Seeds {seeds}; IQs flagged per seed: {iqs}. "
                + made_by(f"python -m benchmarks.hh_reproduction --preset {preset}", d, f"hh_reproduction_{preset}")
                + "\n\n" + markdown(d["summary"], d["per_seed"]))
    table.__doc__ = f"The HH reproduction's {preset} preset: recall, then every model's test numbers."
    return table


@table
def hh_normalized_recall() -> str:
    d = load("hh_normalized_recall")
    rows = [[m, f(r["raw"]), f(r["cosine"]), f(r["relatif"]), f(r["self_influence_ap"])]
            for m, r in d["methods"].items()]
    rows.append(["random", f(d["random"]), "", "", ""])
    return (f"{d['n_train']} rows, {d['n_unsafe']} unsafe, {d['n_iqs']} IQs, seed {d['seed']}. "
            + made_by("python -m benchmarks.hh_normalized_recall", d, "hh_normalized_recall") + "\n\n"
            + md(["method", "AP raw", "AP cosine", "AP RelatIF", "AP of self-influence"], rows))


# ---- speed ------------------------------------------------------------------------------------------------------

def _speed(name: str, command: str) -> Callable[[], str]:
    def table() -> str:
        d = load(name)
        raw = d["raw_forward_backward_tokens_per_s"]
        labels = {"kronfluence_ekfac": "kronfluence 1.0.1 EK-FAC", "lancet_ekfac": "lancet ekfac",
                  "lancet_linfac": "lancet linfac"}
        rows = []
        for run, r in d["runs"].items():
            rank = run.removeprefix("lancet_linfac_rank")
            label = labels.get(run, f"lancet linfac, rank-{rank} queries")
            rows.append([label, f(r["fit"]["seconds"], 1), f(r.get("score_queries", {}).get("seconds"), 1),
                         f(r.get("score_rows", {}).get("seconds"), 1), f(r["fit_plus_score_s"], 1),
                         f(r.get("fraction_of_kronfluence_time"), 2) if "kronfluence_ekfac" in d["runs"] else "",
                         f(r.get("score_tokens_per_s"), 1) if run != "kronfluence_ekfac" else "–",
                         f(r.get("score_vs_raw"), 2), f(r.get("score_end_to_end_vs_raw"), 2)])
        rows.append(["raw forward+backward (ceiling)", "", "", "", "", "", f(raw, 1), "1", ""])
        head = ["run", "fit s", "queries s", "rows s", "fit + score s", "vs kronfluence", "rows: tokens/s",
                "rows / raw", "end to end / raw"]
        return (f"{d['rows']} rows ({d['tokens']} tokens), {d['queries']} queries, batch {d['batch_size']}. "
                + made_by(command, d, name) + "\n\n" + md(head, rows))
    table.__doc__ = f"Fit and scoring speed against raw forward+backward ({name}.json)."
    return table


@table
def generation_speed() -> str:
    rows = []
    for name in ("generation_speed", "generation_speed_nobf16"):
        d = load(name)
        for batch in sorted(d["batches"], key=int):
            b = d["batches"][batch]
            rows.append([name, d["env"]["precision_reason"].split(":")[0], d["prompts"], batch,
                         f(b["tokens_per_s"], 1)])
        rows.append([name, "", "", "16 over 1", f"{d['batch16_over_batch1']:.2f}×"])
    return (f"Greedy, KV cache, {load('generation_speed')['max_new_tokens']} new tokens. "
            "`PYTHONPATH=. .venv/bin/python benchmarks/generation_speed.py` (and `--precision auto --name "
            f"generation_speed_nobf16`), {load('generation_speed')['env']['date']}.\n\n"
            + md(["result file", "machine", "prompts", "batch", "new tokens/s"], rows))


@table
def index_speed() -> str:
    from benchmarks.index_speed import table  # the benchmark's own renderer

    d = load("index_speed")
    return (made_by("python -m benchmarks.index_speed --safety-run runs/safety_full/seed1", d, "index_speed")
            + "\n\n" + table(d))


TABLES["hh_small"], TABLES["hh_full"], TABLES["hh_strong"] = _hh("small"), _hh("full"), _hh("strong")
TABLES["influence_speed"] = _speed("influence_speed", "python -m benchmarks.influence_speed --rows 32 --queries 4 "
                                   "--query-rank 32")
TABLES["influence_speed_nobf16"] = _speed("influence_speed_nobf16", "python -m benchmarks.influence_speed --rows 32 "
                                          "--queries 4 --no-kronfluence --query-rank 16 --name influence_speed_nobf16")


# ---- contamination suite (issue 35) ---------------------------------------------------------------------------------

@table
def suite_tuning() -> str:
    """Each design's gate-tuning ladder on its validation seed (contamination_suite/D/tuning.json)."""
    rows = []
    for design in ("shared_prompt", "disjoint"):
        try:
            d = load(f"contamination_suite/{design}/tuning")
        except Missing:
            continue
        rows += [[design, p["seed"], p["n_unsafe"], f"{p['mix_epochs']:g}", p["n_rows"], p["n_prompts"], f(p["impure"]),
                  f(p["safe"]), f(p["gap"])] for p in d["points"]]
    return ("`python -m benchmarks.contamination_suite run --design D --seed 3 --stage tune --n-unsafe N "
            "--mix-epochs E`; harmful compliance on the design's validation prompts; the gate needs a gap of 0.40 "
            "on held-out prompts (tuned to 0.50).\n\n"
            + md(["design", "seed", "unsafe rows", "epochs", "training rows", "prompts", "impure", "safe", "gap"],
                 rows))


def _ci(ci: list | None) -> str:
    return "–" if not ci or ci[0] is None else f"[{ci[0]:.3f}, {ci[1]:.3f}]"


@table
def suite_validation() -> str:
    """Each design's validation seeds: every ranking's AP (where the selected method and the layer are chosen)."""
    from benchmarks.contamination_suite.designs import DESIGNS
    from benchmarks.contamination_suite.stages import seed_scores
    from benchmarks.contamination_suite.stats import bootstrap

    blocks = []
    for name, design in DESIGNS.items():
        for seed in design.validation_seeds:
            try:
                stage = load(f"contamination_suite/{name}/seed{seed}_recall")
            except Missing:
                continue
            point = bootstrap([seed_scores(stage)], n_boot=1).point
            order = sorted(point, key=lambda m: -point[m]["ap"])
            rows = [[m, f(point[m]["ap"]), f(point[m]["recall_at_p"])] for m in order]
            blocks.append(f"**{name}**, validation seed {seed} ({stage.get('n_iqs')} IQs, "
                          f"{sum(t in stage['positive_tiers'] for t in stage['tiers'])} positives of "
                          f"{len(stage['tiers'])} rows)\n\n" + md(["ranking", "AP", "recall@\\|P\\|"], rows))
    if not blocks:
        return "(no validation seed ranked yet)"
    return ("`python -m benchmarks.contamination_suite run --design D --seed S --stage recall`; the rankings "
            "`_dNN` are the behaviour direction at another depth than the chosen one (three quarters of the blocks), "
            "the `_ckpt` ones the behaviour over K = 3 checkpoints (at the middle block on lexical 3 and demo 0): the "
            "ablations that chose the layer and K, never selected (docs/method.md §5.6).\n\n"
            + "\n\n".join(blocks))


@table
def suite_top_tiers() -> str:
    """What each ranking's top |P| rows are, tier by tier, on disjoint's ranked seeds: whether a method finds the
    compliant answers or only the harmful requests (refusals to harmful prompts are a tier of their own)."""
    import torch

    from benchmarks.contamination_suite.designs import DESIGNS

    design, methods = DESIGNS["disjoint"], ("repsim", "bm25", "probe", "ekfac", "linfac", "classifier", "random")
    rows, tier_names, seeds, n_pos = [], [], [], 0
    for seed in design.validation_seeds + design.seeds:
        try:
            stage = load(f"contamination_suite/disjoint/seed{seed}_recall")
        except Missing:
            continue
        seeds.append(seed)
        tiers = stage["tiers"]
        tier_names = tier_names or sorted(set(tiers), key=lambda t: (t != "unsafe", t))
        n_pos = sum(t in stage["positive_tiers"] for t in tiers)
        for m in methods:
            top = torch.tensor(stage["scores"][m]).argsort(descending=True)[:n_pos].tolist()
            rows.append([str(seed), m] + [str(sum(tiers[i] == t for i in top)) for t in tier_names])
    if not rows:
        return "(no disjoint seed ranked yet)"
    totals = ", ".join(f"{t} {sum(x == t for x in tiers)}" for t in tier_names)
    return (f"disjoint seeds {seeds} (validation {list(design.validation_seeds)}); each seed's rows: {totals}. "
            f"How many rows of each tier each ranking puts in its top \\|P\\| ({n_pos}), from the committed recall "
            "stages.\n\n"
            + md(["seed", "ranking", *tier_names], rows))


@table
def suite_hypotheses() -> str:
    """Each hypothesis (a derived ranking, never selected) against the ranking it must beat, on its test seeds only
    (docs/method.md §5.6, how H1 is read)."""
    suite = load("contamination_suite")
    rows, verdicts = [], []
    for name, h in suite.get("hypotheses", {}).items():
        for design, d in h["designs"].items():
            for seed in d["seeds"]:
                ap = d["per_seed"].get(str(seed))
                rows.append([name, design, str(seed), f(ap and ap[name]), f(ap and ap[h["against"]]),
                             f(ap and ap[name] - ap[h["against"]], sign=True)])
            diff = d["diff"]
            verdicts.append(f"{name} against {h['against']} on {design} (seeds {d['seeds']}): **{d['verdict']}**"
                            + (f", paired AP difference {diff['mean']:+.3f} {_ci(diff['ci'])}, "
                               f"{'' if d['distinguishable'] else 'not '}distinguishable from 0" if diff else
                               f" (not yet ranked: seeds {d['missing']})"))
    if not rows:
        return "(no hypothesis under test)"
    head = ["hypothesis", "design", "test seed", "AP", "AP of the ranking it must beat", "difference"]
    return md(head, rows) + "\n\n" + "\n".join(f"- {v}" for v in verdicts)


def _suite_design(name: str) -> Callable[[], str]:
    def render() -> str:
        suite = load("contamination_suite")
        if name in suite.get("partial", {}):
            d = suite["partial"][name]
            lacking = suite["pending"][name]
            more = f" and {len(lacking) - 2} more" if len(lacking) > 2 else ""
            return _suite_recall(d) + f"\n\n_Counterfactual pending: {'; '.join(lacking[:2])}{more}._"
        if name not in suite["designs"]:
            lacking = suite.get("pending", {}).get(name, [])
            more = " ..." if len(lacking) > 4 else ""
            return f"_Pending: {len(lacking)} stage files ({', '.join(lacking[:4])}{more})._"
        d = suite["designs"][name]
        if not d["recall"]:
            failed = f"_Reported as failed: {d.get('note', 'no recall')}._"
            if d.get("recall_gate_failed"):
                failed += ("\n\nWhat its reported seeds' rankings give all the same (not counted: no method wins "
                           "on a design whose gate failed):\n\n" + _suite_recall(d["recall_gate_failed"]))
            return failed
        def culprits(run: dict) -> str:  # the same ranking removes the same rows at every training order
            return "/".join(str(n) for n in dict.fromkeys(run.get("positives_removed", {}).values())) or "–"

        cf = [[m, k, run["k"], culprits(run),
               len(run.get("retrain_seeds", [])), f(run.get("compliance")), f(run.get("recovered_mean")),
               _ci(run.get("recovered_ci")) if len(run.get("retrain_seeds", [])) > 1 else "– (one order)"]
              for m, runs in d["counterfactual"].items() for k, run in runs.items()]
        return _suite_recall(d) + "\n\n" + md(["retrained without", "k", "rows", "culprits among them",
                                                "training orders", "compliance", "recovered", "95 % CI"], cf)
    render.__name__ = f"suite_{name}"
    return render


def _suite_recall(d: dict) -> str:
    """A design's recall on its reported seeds: the sentence naming the selected, best and default methods, and
    every ranking's AP with its interval."""
    rows = [[bold(m, m == d["selected"]), r["family"], f(r["ap_mean"]), _ci(r["ap_ci"]),
             f(r.get("ap_no_overlap")), f(r["recall_at_p"]),
             "–" if not r.get("ap_minus_selected") else
             f"{r['ap_minus_selected']['mean']:+.3f} {_ci(r['ap_minus_selected']['ci'])}"]
            for m, r in sorted(d["recall"].items(), key=lambda kv: -kv[1]["ap_mean"])]
    best = d["best"]
    return (f"Reported seeds {d['seeds']} (selected on {d['validation_seeds']}: **{d['selected']}**); best "
            f"{best['method']} (AP {best['ap_mean']:.3f}; indistinguishable: "
            f"{', '.join(best['indistinguishable']) or 'none'}); lancet's default {d['default']['method']} "
            f"{'is' if d['default'].get('within_0.05') else 'is not'} within 0.05 AP of it.\n\n"
            + md(["ranking", "family", "AP", "95 % CI", "AP, no shared opening", "recall@\\|P\\|",
                  "AP − selected [CI]"], rows))


for _name in ("lexical", "shared_prompt", "disjoint", "demo"):
    TABLES[f"suite_{_name}"] = _suite_design(_name)


@table
def correction_suite() -> str:
    """Issue 37's correction rows per design (benchmarks/results/correction_suite.json)."""
    suite = load("correction_suite")
    blocks = [_correction_design(name, d, suite["main_row"]) for name, d in suite["designs"].items()]
    main_row = suite["main_row"]
    for name, per_seed in suite.get("partial", {}).items():
        for seed, rows in per_seed.items():
            body = [[PARTIAL_NAMES.get(r, r), f(v["ood_compliance"]), _value_ci(v.get("gap_closed"), v, "gap_closed"),
                     f(v.get("gap_closed_at_retrained_cost")),
                     _value_ci(v.get("minus_main"), v, "minus_main", sign=True),
                     f(v.get("utility_loss_valid")), f(v.get("utility_loss_test"))]
                    for r, v in sorted(rows.items(), key=_impure_safe_first)]
            blocks.append(f"**{name}, reported seed {seed} so far** (rows not yet on every reported seed: one seed's "
                          f"rows as they finish, not the design's result; [95 % interval] over this seed's test "
                          f"prompts, paired, not over seeds; at the retrained model's cost: the gap closed within "
                          f"the retrained model's own validation utility loss instead of 0.05; − {main_row}: the "
                          f"row's OOD compliance minus the main row's)\n\n"
                          + md(["row", "OOD compliance", "gap closed [CI]", "at the retrained model's cost",
                                f"− {main_row} [CI]",
                                "utility loss (valid)", "utility loss (test)"], body))
    for name, per_seed in suite.get("pairs", {}).items():
        blocks.append(_pairs_block(name, per_seed, suite))
    for name, t in suite.get("tuning", {}).items():
        rates = list(next(iter(t["best_within"].values())))
        rows = [[r, *(f"{v[lr]['validation_compliance']:.3f} (step {v[lr]['steps']})" for lr in rates)]
                for r, v in t["best_within"].items()]
        blocks.append(f"**{name}, tuning seed {t['seed']}** (not reported; it chose the reported seeds' learning "
                      f"rates {t['learning_rates']}): the impure model's validation compliance "
                      f"{t['impure_validation_compliance']:.3f}; per row and rate, the lowest within "
                      f"{t['max_utility_loss']:g} utility loss (step 0: no checkpoint within it did better)\n\n"
                      + md(["row", *(f"lr {lr}" for lr in rates)], rows))
    pending = "; ".join(f"{k}: {', '.join(v)}" for k, v in suite.get("pending", {}).items())
    return ("`python -m benchmarks.contamination_suite run --design D --seed S --stage correction`, then "
            "`write-correction`.\n\n" + ("\n\n".join(blocks) or "(no design complete yet)")
            + (f"\n\nPending: {pending}." if pending else "")
            + "".join(f"\n\nNot run on {k}: the contamination suite reports it failed ({why})."
                      for k, why in suite.get("skipped", {}).items()))


PARTIAL_NAMES = {"safe": "safe (retrained without the culprits)"}


def _pairs_block(name: str, per_seed: dict, suite: dict) -> str:
    """Each factorial cell's pairs per reported seed (culprits and known refusals pushed down and up) beside the gap
    it closed where measured, and hypothesis R's test (docs/method.md §5.4)."""
    def gap(seed: str, cell: str) -> float | None:
        done = suite["designs"].get(name, {}).get("rows", {}).get(cell, {}).get("gap_closed_per_seed", {})
        return done.get(seed, suite.get("partial", {}).get(name, {}).get(seed, {}).get(cell, {}).get("gap_closed"))

    seeds = list(per_seed)
    weighted = suite.get("weighted_pairs", {}).get(name, {})

    def weight(seed: str, cell: str) -> str:
        w = weighted.get(seed, {}).get(cell)
        return "–" if w is None else f"{w['weighted_refusals']:+.2f} ({w['rejected_iq']:.2f})"

    rows = [[cell, *(f"{c['culprits_dispreferred']} / {c['refusals_dispreferred']} / {c['refusals_preferred']} / "
                     f"{c['net_refusals']:+d} / {weight(seed, cell)} / {f(gap(seed, cell))}"
                     for seed in seeds for c in [per_seed[seed][cell]])]
            for cell in per_seed[seeds[0]]]
    tests = []
    for seed, h in suite.get("hypothesis_r", {}).get(name, {}).items():
        t = h["test"]
        tests.append(f"seed {seed}: " + ("not yet (cells in: " + (", ".join(h["cells_in"]) or "none") + ")"
                                         if t is None else
                                         f"ρ(gap, net refusals) {f(t['rho_net_refusals'])}, ρ(gap, culprits down) "
                                         f"{f(t['rho_culprits_dispreferred'])}, ρ(gap, weighted refusals; "
                                         f"exploratory) {f(t.get('rho_weighted_refusals'))}; prediction 1 "
                                         f"{'holds' if t['prediction_1'] else 'fails'}, prediction 2 "
                                         f"{'holds' if t['prediction_2'] else 'fails'}")
                     + (f"; fx_random − fx_bm25 gap closed {f(h['random_minus_bm25_gap'], sign=True)}"
                        if h.get("random_minus_bm25_gap") is not None else ""))
    return (f"**{name}, what each cell pushes down and up** (from the committed recall stage: culprits down / "
            "known refusals down / known refusals up / net refusals; then, from the rebuilt pairs, the share of "
            "pair weight on known refusals chosen minus rejected (the share on the IQ pairs) / gap closed; "
            "hypothesis R, docs/method.md §5.4: the correction follows the refusals, not the culprits down)\n\n"
            + md(["cell", *(f"seed {s}" for s in seeds)], rows)
            + ("\n\nHypothesis R so far: " + "; ".join(tests) + "." if tests else "")
            + _weight_test(suite.get("hypothesis_w", {}).get(name)))


def _weight_test(w: dict | None) -> str:
    """Hypothesis W's line (docs/method.md §5.4): fx_uniform against fx_random per seed and budget."""
    if not w:
        return ""
    cells = "; ".join(f"seed {seed} {budget.replace('_', ' ')}: fx_uniform {f(g['fx_uniform'])}, fx_random "
                      f"{f(g['fx_random'])}" for seed, b in w["gaps"].items() for budget, g in b.items())
    verdict = {None: "not yet", True: "holds", False: "fails"}[w["holds"]]
    return (f"\n\nHypothesis W (the weight on the IQ pairs corrects: fx_uniform closes less than fx_random in "
            f"every comparison): {verdict} ({cells}).")


def _value_ci(value: float | None, v: dict, key: str, sign: bool = False) -> str:
    """``value`` and, where ``v`` has one, its within-seed interval ``v[key + "_ci"]``."""
    return f(value, sign=sign) + (f" {_ci(v[key + '_ci'])}" if v.get(f"{key}_ci") and value is not None else "")


def _impure_safe_first(kv: tuple[str, dict]) -> tuple[int, float]:
    return ({"impure": 0, "safe": 1}.get(kv[0], 2), kv[1]["ood_compliance"])


def _correction_design(name: str, d: dict, main_row: str) -> str:
    """One complete design's rows, best OOD compliance first, with the gap each closes per seed."""
    rows = [[r, v["ranking"], v["weighting"], v["preferred"], f(v["ood_compliance_mean"]), f(v["ood_compliance_sd"]),
             " / ".join(_value_ci(g, {"gap_closed_ci": v.get("gap_closed_ci_per_seed", {}).get(seed)}, "gap_closed")
                        for seed, g in v.get("gap_closed_per_seed", {}).items()),
             " / ".join(f(g) for g in v.get("gap_closed_at_retrained_cost_per_seed", {}).values()) or "–",
             " / ".join(_value_ci(m, {"minus_main_ci": v.get("minus_main_ci_per_seed", {}).get(seed)}, "minus_main",
                                  sign=True) for seed, m in v.get("minus_main_per_seed", {}).items() if m is not None)
             or "–",
             *(_per_seed(v, key) for key in ("utility_loss_valid", "utility_loss_test"))]
            for r, v in sorted(d["rows"].items(), key=lambda kv: kv[1]["ood_compliance_mean"])]
    return (f"**{name}** (seeds {d['seeds']}, learning rates {d.get('learning_rates')} chosen on seed "
            f"{d['tuning_seed']}): OOD compliance, mean of {len(d['seeds'])} seeds: impure "
            f"{d['impure']['ood_compliance_mean']:.3f}, retrained {d['retrained']['ood_compliance_mean']:.3f} "
            f"(its own utility loss on test {d['retrained']['utility_loss_test']:.3f}); the goal closes ≥ 0.9 of "
            f"that gap on each seed within 0.05 utility loss on validation; [95 % interval] over each seed's test "
            f"prompts, paired, not over seeds; at the retrained model's cost: the gap closed by the checkpoint chosen "
            f"within the retrained model's own validation utility loss instead of 0.05; − {main_row}: the row's OOD "
            f"compliance minus the main row's\n\n"
            + md(["row", "ranking", "weighting", "preferred", "OOD compliance", "sd", "gap closed (per seed) [CI]",
                  "at the retrained model's cost", f"− {main_row} (per seed) [CI]", "utility loss (valid, per seed)",
                  "utility loss (test, per seed)"], rows))


def _per_seed(v: dict, key: str) -> str:
    """``v[key + "_per_seed"]`` as "a / b"."""
    return " / ".join(f(x) for x in v[f"{key}_per_seed"].values())


@table
def correction_suite_headline() -> str:
    """The README's short correction table: each complete design's rows (issue 37), or what is still pending."""
    suite = load("correction_suite")
    if not suite["designs"]:
        pending = "; ".join(f"{k}: {', '.join(v)}" for k, v in suite.get("pending", {}).items())
        return f"_No design complete yet (pending: {pending})._"
    return "\n\n".join(_correction_design(name, d, suite["main_row"])
                       + ("" if d["rows"] else "\n\n_No row on every reported seed yet (pending: "
                          + ", ".join(suite.get("pending", {}).get(name, [])) + ")._")
                       for name, d in suite["designs"].items())
