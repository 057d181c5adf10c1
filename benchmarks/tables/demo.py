"""The demo's tables (benchmarks/demo.py writes demo.json) and the demo benchmarks' own."""

from __future__ import annotations

from benchmarks.tables.core import (
    Missing,
    bold,
    f,
    load,
    made_by,
    md,
    table,
)

# ---- the demo (benchmarks/demo.py writes demo.json) --------------------------------------------------------------

def _demo() -> dict:
    return load("demo")


def _count(entry: dict, side: str) -> str:
    count = entry.get(f"{side}_count")
    return f"{count}/{entry['n']}" if count is not None else f(entry[side], 3)


@table
def demo_summary() -> str:
    """The README's demo table: what the demo found, how the correction did, and how long it took."""
    return _summary(_demo(), "demo")


@table
def demo_summary_amx() -> str:
    """The same demo recorded on a machine with AMX (``benchmarks/demo.py --from-run ... --result
    benchmarks/results/demo_amx.json``): bf16 kernels differ between CPUs, and so does what the demo finds."""
    return _summary(load("demo_amx"), "demo_amx")


def _summary(d: dict, file: str) -> str:
    rec, sets = d["recall"], d["sets"]
    order = [m for m in ("linfac", "repsim", "bm25", "random") if m in rec]
    names = {"linfac": "LinFAC", "repsim": "RepSim", "bm25": "BM25", "random": "chance"}
    rows = [["IQ prompts whose answer the judge flags (the IQs)", f"{d['n_iqs']} of {d['iq_prompts']}"],
            [f"average precision of the {d['n_culprits']} culprits among {d['n_train']} rows: "
             + " / ".join(names[m] for m in order), " / ".join(f(rec[m]["average_precision"]) for m in order)]]
    if d.get("selection"):
        rows.append(["checkpoint chosen on the validation prompts", f"step {d['selection']['chosen_steps']}"])
    labels = {"iq_prompts": "IQ prompts answered with a planted practice, before → after",
              "heldout_prompts": "held-out prompts answered with one, before → after",
              "heldout_ordinary": "perplexity of held-out ordinary answers, before → after",
              # the cost the judged rate does not show: the current (correct) advice made less likely too
              "heldout_current_answers": "mean log-likelihood of held-out current answers, before → after",
              "heldout_outdated_answers": "mean log-likelihood of held-out outdated answers, before → after"}
    for name, label in labels.items():
        if name in sets:
            e = sets[name]
            rows.append([label, f"{_count(e, 'before')} → {_count(e, 'after')}" if "before_count" in e
                         else f"{f(e['before'])} → {f(e['after'])}"])
    if d.get("wall_seconds") is not None:  # None: recorded from an existing run (benchmarks/demo.py --from-run)
        rows.append(["wall time of the command, seconds", f"{d['wall_seconds']:.0f}"])
    m, precision = d["machine"], d.get("hardware", {}).get("precision", "not recorded")
    caption = (f"`{d['command']}`, {d['date']}, on {m.get('cpu') or 'an unnamed CPU'} ({m['cpu_count']} cores, "
               f"avx512_bf16 {'yes' if m.get('avx512_bf16') else 'no'}"
               + (f", amx_bf16 {'yes' if m['amx_bf16'] else 'no'}" if "amx_bf16" in m else "")
               + f", precision {precision}); "
               f"`benchmarks/results/{file}.json`.")
    return caption + "\n\n" + md(["measure", "result"], rows)


@table
def demo_recall() -> str:
    d = _demo()
    rows = [[m, f(r["average_precision"]), f(r.get("recall@50"), 2), f(r.get("seconds"), 1)]
            for m, r in sorted(d["recall"].items(), key=lambda kv: -kv[1]["average_precision"])]
    return md(["method", "average precision", "recall@50", "seconds"], rows)


@table
def demo_sets() -> str:
    d = _demo()
    rows = [[name, e["kind"], e["n"], _count(e, "before"), _count(e, "after")] for name, e in d["sets"].items()]
    judge = d.get("judge_accuracy")
    note = f"\n\nJudge accuracy on the labelled held-out answers: {f(judge)}." if judge is not None else ""
    return md(["test set", "kind", "n", "before", "after"], rows) + note


@table
def demo_selection() -> str:
    s = _demo().get("selection")
    if not s:
        return "(the run chose no checkpoint)"
    rows = [[bold(str(p["steps"]), p["steps"] == s["chosen_steps"]), f(p["behaviour"]), f(p["utility_loss"], 3, True)]
            for p in s["curve"]]
    return md(["step", "validation outdated rate", "validation utility loss"], rows)


@table
def demo_seconds() -> str:
    d = _demo()
    rows = [[stage, f"{s:.1f}"] for stage, s in d["seconds"].items()]
    if d.get("wall_seconds") is not None:
        rows.append(["the whole command (wall)", f"{d['wall_seconds']:.1f}"])
    return md(["stage", "seconds"], rows)


# ---- demo studies ---------------------------------------------------------------------------------------------------

def _bottom_key(d: dict, prefix: str) -> str:
    """The recall study's key that counts rows of a kind among the most negative (its size is in the key)."""
    return next(key for key in d["methods"]["linfac"]["normalized_mean"] if key.startswith(prefix))


def _by_ap(d: dict) -> list[tuple[str, dict, dict]]:
    """(method, its entry, its normalised-mean metrics) of a recall study, best average precision first."""
    ranked = sorted(((m, r) for m, r in d["methods"].items() if m != "random"),
                    key=lambda kv: -kv[1]["normalized_mean"]["average_precision"])
    return [(m, r, r["normalized_mean"]) for m, r in ranked]


@table
def demo_recall_spans() -> str:
    d = load("demo_recall_spans")
    k = d["n_culprits"]
    bottom = _bottom_key(d, "current_rows_in_bottom")
    rows = [[m, f(nm["average_precision"]), f(r["sum"]["average_precision"]), f(nm[f"recall@{k}"], 2), nm[bottom]]
            for m, r, nm in _by_ap(d)]
    rnd = d["methods"]["random"]
    rows.append(["random (200 draws)", f(rnd["average_precision"]), "", f(rnd[f"recall@{k}"], 2), ""])
    n = bottom.rsplit("_", 1)[1]
    head = ["method", "average precision (normalised mean)", "(sum)", f"recall@{k}",
            f"current-advice rows among the {n} most negative"]
    return (f"{d['n_train']} rows, {k} culprits, {d['n_iqs']} IQs, measurement `{d['measurement']}`. "
            + made_by("python -m benchmarks.demo_recall --from-run demo_out --measurement spans", d,
                      "demo_recall_spans") + "\n\n" + md(head, rows))


@table
def demo_recall_marker() -> str:
    d = load("demo_recall_bf16")
    k = d["n_culprits"]
    bottom = _bottom_key(d, "counter_rows_in_bottom")
    rows = [[m, f(nm["average_precision"]), f(r["sum"]["average_precision"]), f(nm["recall@10"], 2),
             f(nm[f"recall@{k}"], 2), nm[bottom], f(r["seconds"], 1)] for m, r, nm in _by_ap(d)]
    rnd = d["methods"]["random"]
    rows.append(["random (200 draws)", f(rnd["average_precision"]), "", "", f(rnd[f"recall@{k}"], 2), "", ""])
    n = bottom.rsplit("_", 1)[1]
    head = ["method", "average precision", "(sum)", "recall@10", f"recall@{k}", f"counter rows in the bottom {n}",
            "seconds"]
    return (f"{d['n_train']} rows, {k} culprits, {d['n_iqs']} IQs; bf16 autocast. "
            + made_by("python -m benchmarks.demo_recall --methods linfac,identity,bm25,ekfac,kfac,diagonal,"
                      "kfac_reduce --bf16", d, "demo_recall_bf16") + "\n\n" + md(head, rows))


@table
def demo_practice_recall() -> str:
    d = load("demo_practice_recall")
    methods = sorted(d["cue"]["mean_ap"])
    rows = []
    for part, label in (("cue", "culprits in which the IQ's judge cue fires"),
                        ("topic", "every culprit of the practice's topic")):
        p = d[part]
        rows.append([label, p["n_scored"], *(f(p["mean_ap"][m]) for m in methods),
                     ", ".join(f"{m} {p['best_on'][m]}" for m in methods)])
    return (made_by("python -m benchmarks.demo_practice_recall --run demo_out", d, "demo_practice_recall")
            + "\n\n" + md(["positives of each IQ", "IQs scored", *(f"mean AP {m}" for m in methods),
                           "best on (IQs)"], rows))


# (revision, what it was revised on, the part it is measured on, what that part is)
JUDGE_ROWS = (("as_written", "as first written", "(the training rows only)", "test"),
              ("revision_2", "revision 2", "the 144 greedy answers", "sampled_01"),
              ("revision_2", "revision 2", "", "sampled_23"),
              ("revision_3", "revision 3", "+ the 192 sampled answers", "test"),
              (None, "**revision 4** (kept)", "+ those 72", "test_4"))
JUDGE_PARTS = {"dev_greedy": "the 144 greedy answers (dev)", "sampled_01": "96 sampled answers (T 0.8), samples 0–1",
               "sampled_23": "96 more sampled answers, samples 2–3",
               "test": "72 greedy answers of 3 other contaminated fine-tunes",
               "test_4": "144 answers of the same 3 fine-tunes, collected after revision 4 was fixed"}


@table
def demo_judge() -> str:
    d = load("demo_judge")
    rows = []
    for key, label, revised_on, part in JUDGE_ROWS:
        m = (d[key] if key else d)[part]
        rows.append([label, revised_on, f"{JUDGE_PARTS[part]} ({m['n']})", f(m["accuracy"]), f(m["precision"], 2),
                     f(m["recall"], 2)])
    return (made_by("python -m benchmarks.demo_judge measure", d, "demo_judge") + "\n\n"
            + md(["rules", "revised on", "measured on (never used for revising)", "accuracy", "precision", "recall"],
                 rows))


@table
def demo_judge_all_parts() -> str:
    d = load("demo_judge")
    revisions = (("as_written", "as first written"), ("revision_2", "revision 2"), ("revision_3", "revision 3"),
                 (None, "revision 4 (kept)"))
    parts = [p for p in JUDGE_PARTS if p in d]
    rows = [[label, *(f((d[key] if key else d)[p]["accuracy"]) for p in parts)] for key, label in revisions]
    return md(["rules", *(f"{p} ({d[p]['n']})" for p in parts)], rows)


# ---- correction on the demo -----------------------------------------------------------------------------------------

@table
def demo_frontier() -> str:
    d = load("correction_frontier_demo")
    b = d["contaminated"]
    rows = [["contaminated", "–", 0, f(b["val_rate"]), "0", f(b["test_rate"]), "0", f(b["test_current_logp"], 1), "–"]]
    for name, res in d["methods"].items():
        c = res["chosen"]
        rows.append([name, "–" if c["lr"] is None else f"{c['lr']:g}", c["steps"], f(c["val_rate"]),
                     f(c["val_utility_loss"], 3, True), f(c["test_rate"]), f(c["test_utility_loss"], 3, True),
                     f(c["test_current_logp"], 1), c["seconds"]])
    head = ["method", "chosen lr", "steps", "validation rate", "validation utility loss", "test rate",
            "test utility loss", "test log p(current)", "seconds"]
    return (made_by("python -m benchmarks.correction_frontier --run-dir runs/demo_frontier --lrs 3e-6,1e-5,3e-5 "
                    "--every 5", d, "correction_frontier_demo") + "\n\n" + md(head, rows))


def _frontier_points(d: dict) -> list[list]:
    """Every measured point of a frontier result, the chosen one in bold, and a row for a choice of step 0."""
    rows = []
    for method, res in d["methods"].items():
        chosen = res["chosen"]
        for p in res["points"]:
            is_chosen = p["lr"] == chosen["lr"] and p["steps"] == chosen["steps"]
            label = bold(f"{method} {p['lr']:g}, seed {d['seed']}" + (" (chosen)" if is_chosen else ""), is_chosen)
            rows.append([label, p["steps"], f(p["val_rate"]), f(p["val_utility_loss"], 3, True),
                         f(p["test_rate"]), f(p["test_utility_loss"], 3, True), f(p["test_current_logp"], 1)])
        if chosen["steps"] == 0:
            rows.append([f"{method}, seed {d['seed']}: chose step 0 (kept the contaminated model)", 0,
                         f(chosen["val_rate"]), "+0.000", f(chosen["test_rate"]), "+0.000",
                         f(chosen["test_current_logp"], 1)])
    return rows


FRONTIER_HEAD = ["method, lr, seed", "step", "validation rate", "validation utility loss", "test outdated rate",
                 "test utility loss", "test log p(current)"]


@table
def demo_frontier_short() -> str:
    rows = [r for name in ("correction_frontier_demo_short", "correction_frontier_demo_short_seed1")
            for r in _frontier_points(load(name))]
    base = load("correction_frontier_demo_short")["contaminated"]
    return (f"Contaminated: test outdated rate {f(base['test_rate'])}, log p(current) "
            f"{f(base['test_current_logp'], 1)}. "
            + made_by("python -m benchmarks.correction_frontier --run-dir DIR --methods ibo_anchored,ibo_random "
                      "--lrs 3e-5,1e-4 --steps 10 --every 5 --batch-size 4 --name correction_frontier_demo_short",
                      load("correction_frontier_demo_short"), "correction_frontier_demo_short")
            + " Seed 1: `--lrs 1e-4 --seed 1 --name correction_frontier_demo_short_seed1`.\n\n"
            + md(FRONTIER_HEAD, rows))


@table
def demo_rechoice() -> str:
    d = load("demo_correction_rechoice")
    base = d["contaminated"]
    return (f"Contaminated: validation rate {f(base['val_rate'])}, test outdated rate {f(base['test_rate'])}, "
            f"log p(current) {f(base['test_current_logp'], 1)}. "
            + made_by("python -m benchmarks.correction_frontier --run-dir runs/demo_frontier --methods "
                      "ibo_anchored,ibo_self_anchor --lrs 3e-5,1e-4,3e-4 --steps 20 --every 5 --batch-size 4 "
                      "--name demo_correction_rechoice", d, "demo_correction_rechoice")
            + "\n\n" + md(FRONTIER_HEAD, _frontier_points(d)))


@table
def demo_ranking() -> str:
    """The demo's correction on each ranking of the same run (docs/method.md §5.2, "Which ranking the correction
    reads"): each ranking's choice on validation among lr 1e-4 and 3e-4, its test numbers beside it."""
    from lancet.correct.select import Candidate, choose

    rechoice = load("demo_correction_rechoice")
    base = rechoice["contaminated"]
    rows = []
    runs = [("linfac", rechoice, "ibo_self_anchor"), ("repsim", load("demo_correction_ranking_repsim"),
             "ibo_self_anchor"), ("bm25", load("demo_correction_ranking_bm25"), "ibo_self_anchor")]
    try:  # judged rows (docs/method.md §5.2), once measured
        runs.append(("linfac, judged rows", load("demo_correction_judged"), "ibo_self_anchor_judged"))
    except Missing:
        pass
    for ranking, d, method in runs:
        points = [p for p in d["methods"][method]["points"] if p["lr"] in (1e-4, 3e-4)]
        step0 = {**base, "steps": 0, "lr": None, "val_utility_loss": 0.0, "test_utility_loss": 0.0}
        c = choose([Candidate(settings={"lr": p["lr"]}, steps=p["steps"], validation_behaviour=p["val_rate"],
                              validation_utility_loss=p["val_utility_loss"], test=p) for p in [step0, *points]],
                   0.05).test
        rows.append([ranking, "–" if c["lr"] is None else f"{c['lr']:g}", c["steps"], f(c["val_rate"]),
                     f(c["val_utility_loss"], 3, True), f(c["test_rate"]), f(c["test_utility_loss"], 3, True),
                     f(c["test_current_logp"], 1), f(c["test_outdated_logp"], 1)])
    return (f"Contaminated: validation rate {f(base['val_rate'])}, test outdated rate {f(base['test_rate'])}, "
            f"log p(current) {f(base['test_current_logp'], 1)}, log p(outdated) "
            f"{f(base['test_outdated_logp'], 1)}. "
            + made_by("python -m benchmarks.correction_frontier --run-dir runs/demo_frontier --methods "
                      "ibo_self_anchor --lrs 1e-4,3e-4 --steps 20 --every 5 --batch-size 4 --ranking R --name "
                      "demo_correction_ranking_R", load("demo_correction_ranking_repsim"),
                      "demo_correction_ranking_*")
            + " LinFAC's row: the same points of `demo_correction_rechoice`; judged rows: `--methods "
            "ibo_self_anchor_judged --name demo_correction_judged`.\n\n"
            + md(["ranking", "chosen lr", "step", "validation rate", "validation utility loss", "test outdated rate",
                  "test utility loss", "test log p(current)", "test log p(outdated)"], rows))


@table
def demo_near() -> str:
    """The demo's correction with its preferred rows at the top of the rows the judge passes (``preferred="near"``,
    docs/method.md §5.2), beside ``ibo_self_anchor`` rerun on the same rebuilt demo: each (lr, step) chosen on
    validation, test numbers beside it, and which planted rows each side of the pairs holds."""
    d = load("demo_correction_near")
    base = d["contaminated"]
    rows = []
    for name, res in d["methods"].items():
        c, r = res["chosen"], res.get("rows", {})
        rows.append([name, "–" if c["lr"] is None else f"{c['lr']:g}", c["steps"], f(c["val_rate"]),
                     f(c["val_utility_loss"], 3, True), f(c["test_rate"]), f(c["test_utility_loss"], 3, True),
                     f(c["test_current_logp"], 1), f(c["test_outdated_logp"], 1),
                     f"{r.get('dispreferred_culprits', '–')} / {r.get('dispreferred', '–')}",
                     f"{r.get('preferred_counter', '–')} / {r.get('preferred', '–')}"])
    return (f"Contaminated: validation rate {f(base['val_rate'])}, test outdated rate {f(base['test_rate'])}, "
            f"log p(current) {f(base['test_current_logp'], 1)}, log p(outdated) "
            f"{f(base['test_outdated_logp'], 1)}. "
            + made_by("lancet demo --out runs/demo_frontier --precision bf16` then `python -m "
                      "benchmarks.correction_frontier --run-dir runs/demo_frontier --methods "
                      "ibo_self_anchor,ibo_self_anchor_judged_near --lrs 1e-4,3e-4 --steps 20 --every 5 "
                      "--batch-size 4 --name demo_correction_near", d, "demo_correction_near")
            + "\n\n" + md(["method", "chosen lr", "step", "validation rate", "validation utility loss",
                            "test outdated rate", "test utility loss", "test log p(current)", "test log p(outdated)",
                            "pushed down: culprits", "preferred: current-advice rows"], rows))


@table
def demo_correction_lr() -> str:
    rows, names = [], {"contaminated": "contaminated", "ibo": "IBO", "ibo_random": "IBO, random selection",
                       "ga_retain": "GA + retain"}
    first = None
    for lr in ("5e-06", "1e-05", "3e-05"):
        d = load(f"demo_correction_lr{lr}")
        first = first or d
        for name, m in d["models"].items():
            if name == "contaminated" and rows:
                continue
            ppl = f(m["heldout_ordinary_ppl"]) + (f" ({m['ppl_change']:+.1%})" if "ppl_change" in m else "")
            rows.append([names.get(name, name), "–" if name == "contaminated" else f"{d['lr']:g}",
                         f(m["iqs_logp"], 1), f(m["heldout_outdated_logp"], 1), f(m["heldout_current_logp"], 1),
                         ppl, f(m["iq_outdated_rate"]), f(m["heldout_outdated_rate"])])
    head = ["model", "lr", "IQ answers (log p)", "held-out outdated", "held-out current", "ordinary ppl",
            "IQ prompts still outdated (rate)", "held-out prompts still outdated (rate)"]
    return (made_by("python -m benchmarks.demo_correction --methods ibo,ga_retain,ibo_random --steps 30 --lr 1e-5",
                    first, "demo_correction_lr*") + " The other rates: `--methods ibo,ibo_random --lr 5e-6` and "
            "`--lr 3e-5`.\n\n" + md(head, rows))
