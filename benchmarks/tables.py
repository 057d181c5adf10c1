"""Every results table of the README and of docs/results/*.md, rendered from the committed JSON under
benchmarks/results (never typed by hand).

    .venv/bin/python -m benchmarks.tables            # rewrite the tables in place
    .venv/bin/python -m benchmarks.tables --check    # exit 1 if any file would change (CI, tests)
    .venv/bin/python -m benchmarks.tables --list     # the table names and the JSON each one reads

A table lives between two markers in a markdown file:

    <!-- table:NAME -->
    (generated; anything here is replaced)
    <!-- /table:NAME -->

NAME is a key of ``TABLES``; the same table may appear in several files. The prose around the markers is the
lab notes' reading and is left alone. A marker with an unknown name is an error (exit 2).

The demo's tables read benchmarks/results/demo.json, written by ``python -m benchmarks.demo`` (the demo run as the
README gives it, about 10 minutes on 2 cores). Until that file exists they render a one-line note saying so, in
both modes, so ``--check`` passes on a clone without it; once it exists, the tables must be regenerated (``--check``
then fails until they are).
"""

from __future__ import annotations

import argparse
import json
import re
import statistics
import sys
from collections.abc import Callable
from functools import cache
from pathlib import Path

from benchmarks import safety_tables

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results"
FILES = ("README.md", "docs/results/*.md")
MARKERS = re.compile(r"<!-- table:(?P<name>[\w.-]+) -->\n.*?<!-- /table:(?P=name) -->", re.S)
DEMO_MISSING = ("_Not measured yet: `benchmarks/results/demo.json` is written by `.venv/bin/python -m "
                "benchmarks.demo` (the demo as the README runs it), then `.venv/bin/python -m benchmarks.tables` "
                "fills in this table._")


# name -> renderer (a marker's NAME); each renderer reads its JSON through ``load`` (Missing when absent)
TABLES: dict[str, Callable[[], str]] = {}


def table(fn: Callable[[], str]) -> Callable[[], str]:
    TABLES[fn.__name__] = fn
    return fn


class Missing(Exception):
    """A result file a table reads is not there."""


_reading: list[str] | None = None  # the result files the table being traced reads (``sources``)


def load(name: str) -> dict:
    """benchmarks/results/NAME.json (read once per process)."""
    if _reading is not None:
        _reading.append(name)
    return _load(name)


@cache
def _load(name: str) -> dict:
    path = RESULTS / f"{name}.json"
    if not path.is_file():
        raise Missing(str(path.relative_to(ROOT)) if path.is_relative_to(ROOT) else str(path))
    return json.loads(path.read_text())


def clear_cache() -> None:
    _load.cache_clear()


def sources(name: str) -> list[Path]:
    """The result files table ``name`` reads (those that exist)."""
    global _reading
    _reading = []
    try:
        TABLES[name]()
    except Missing:
        pass
    finally:
        names, _reading = _reading, None
    return [RESULTS / f"{n}.json" for n in dict.fromkeys(names) if (RESULTS / f"{n}.json").is_file()]


def md(head: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(head) + " |", "|---" * len(head) + "|"]
    return "\n".join(lines + ["| " + " | ".join(str(c) for c in row) + " |" for row in rows])


def f(x: float | None, digits: int = 3, sign: bool = False) -> str:
    if x is None:
        return "–"
    return f"{x:+.{digits}f}" if sign else f"{x:.{digits}f}"


def bold(text: str, on: bool) -> str:
    return f"**{text}**" if on else text


def made_by(command: str, result: dict, file: str, extra: str = "") -> str:
    env = result.get("env", {})
    where = ", ".join(x for x in (env.get("precision"), extra) if x)
    return (f"`{command}`, {env.get('date', 'date not recorded')}" + (f" ({where})" if where else "")
            + f"; `benchmarks/results/{file}.json`.")


# ---- the demo (benchmarks/demo.py writes demo.json) --------------------------------------------------------------

def _demo() -> dict:
    return load("demo")


def _count(entry: dict, side: str) -> str:
    count = entry.get(f"{side}_count")
    return f"{count}/{entry['n']}" if count is not None else f(entry[side], 3)


@table
def demo_summary() -> str:
    """The README's demo table: what the demo found, how the correction did, and how long it took."""
    d = _demo()
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
              "heldout_ordinary": "perplexity of held-out ordinary answers, before → after"}
    for name, label in labels.items():
        if name in sets:
            e = sets[name]
            rows.append([label, f"{_count(e, 'before')} → {_count(e, 'after')}" if "before_count" in e
                         else f"{f(e['before'])} → {f(e['after'])}"])
    if d.get("wall_seconds") is not None:  # None: recorded from an existing run (benchmarks/demo.py --from-run)
        rows.append(["wall time of the command, seconds", f"{d['wall_seconds']:.0f}"])
    m, precision = d["machine"], d.get("hardware", {}).get("precision", "not recorded")
    caption = (f"`{d['command']}`, {d['date']}, on {m.get('cpu') or 'an unnamed CPU'} ({m['cpu_count']} cores, "
               f"avx512_bf16 {'yes' if m.get('avx512_bf16') else 'no'}, precision {precision}); "
               "`benchmarks/results/demo.json`.")
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

@table
def demo_recall_spans() -> str:
    d = load("demo_recall_spans")
    k = d["n_culprits"]
    bottom = next(key for key in d["methods"]["linfac"]["normalized_mean"] if key.startswith("current_rows_in_bottom"))
    rows = []
    for m, r in sorted(((m, r) for m, r in d["methods"].items() if m != "random"),
                       key=lambda kv: -kv[1]["normalized_mean"]["average_precision"]):
        nm = r["normalized_mean"]
        rows.append([m, f(nm["average_precision"]), f(r["sum"]["average_precision"]), f(nm[f"recall@{k}"], 2),
                     nm[bottom]])
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
    bottom = next(key for key in d["methods"]["linfac"]["normalized_mean"] if key.startswith("counter_rows_in_bottom"))
    rows = []
    for m, r in sorted(((m, r) for m, r in d["methods"].items() if m != "random"),
                       key=lambda kv: -kv[1]["normalized_mean"]["average_precision"]):
        nm = r["normalized_mean"]
        rows.append([m, f(nm["average_precision"]), f(r["sum"]["average_precision"]), f(nm["recall@10"], 2),
                     f(nm[f"recall@{k}"], 2), nm[bottom], f(r["seconds"], 1)])
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


@table
def demo_frontier_short() -> str:
    rows = []
    for name in ("correction_frontier_demo_short", "correction_frontier_demo_short_seed1"):
        d = load(name)
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
    base = load("correction_frontier_demo_short")["contaminated"]
    head = ["method, lr, seed", "step", "validation rate", "validation utility loss", "test outdated rate",
            "test utility loss", "test log p(current)"]
    return (f"Contaminated: test outdated rate {f(base['test_rate'])}, log p(current) "
            f"{f(base['test_current_logp'], 1)}. "
            + made_by("python -m benchmarks.correction_frontier --run-dir DIR --methods ibo_anchored,ibo_random "
                      "--lrs 3e-5,1e-4 --steps 10 --every 5 --batch-size 4 --name correction_frontier_demo_short",
                      load("correction_frontier_demo_short"), "correction_frontier_demo_short")
            + " Seed 1: `--lrs 1e-4 --seed 1 --name correction_frontier_demo_short_seed1`.\n\n" + md(head, rows))


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


@table
def safety_small_recall() -> str:
    d = _safety("small")
    return (made_by("python -m benchmarks.safety_contamination --preset small --stage recall", d,
                    "safety_contamination_small") + " " + seed_recall(d))


@table
def safety_small_counterfactual() -> str:
    return safety_tables.counterfactual_table(_safety("small"))


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
    return (f"Seed {d['seed']}, {d['n_prompts']} test prompts. "
            + made_by(f"python -m benchmarks.safety_tiers --preset {d['preset']} --seed {d['seed']}", d,
                      "safety_tiers_full") + "\n\n" + md(head, rows))


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
    return (f"Seed {d['seed']}, {d['n_iqs']} IQs. "
            + made_by(f"python -m benchmarks.safety_lambda --preset {d['preset']} --seed {d['seed']}", d,
                      "safety_lambda_full") + "\n\n" + md(head, rows))


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
def safety_cross_recall() -> str:
    d = _safety("cross")
    return (made_by("python -m benchmarks.safety_contamination --preset cross --stage recall", d,
                    "safety_contamination_cross") + " " + seed_recall(d))


@table
def safety_cross_counterfactual() -> str:
    return safety_tables.counterfactual_table(_safety("cross"))


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
        if name in ("impure", "safe"):
            chosen = ""
        elif row.get("chosen_steps") == 0:
            chosen = "step 0 (kept the impure model)"
        else:
            chosen = f"{row['chosen_lr']:g}, {row['chosen_steps']}"
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


TABLES["hh_small"], TABLES["hh_full"], TABLES["hh_strong"] = _hh("small"), _hh("full"), _hh("strong")
TABLES["influence_speed"] = _speed("influence_speed", "python -m benchmarks.influence_speed --rows 32 --queries 4 "
                                   "--query-rank 32")
TABLES["influence_speed_nobf16"] = _speed("influence_speed_nobf16", "python -m benchmarks.influence_speed --rows 32 "
                                          "--queries 4 --no-kronfluence --query-rank 16 --name influence_speed_nobf16")
# tables that may render before their result exists: the demo's, until benchmarks/demo.py has run
OPTIONAL = {"demo_summary", "demo_recall", "demo_sets", "demo_selection", "demo_seconds"}


def render_table(name: str, notes: list[str]) -> str:
    try:
        return TABLES[name]()
    except Missing as missing:
        if name not in OPTIONAL:
            raise
        notes.append(f"{missing} is missing: the demo's tables are left as a note (`python -m benchmarks.demo` "
                     "writes it)")
        return DEMO_MISSING


def render(text: str, notes: list[str]) -> str:
    """``text`` with every marked table regenerated."""
    def block(match: re.Match) -> str:
        name = match["name"]
        if name not in TABLES:
            raise KeyError(name)
        return f"<!-- table:{name} -->\n\n{render_table(name, notes)}\n\n<!-- /table:{name} -->"

    return MARKERS.sub(block, text)


def files(root: Path = ROOT) -> list[Path]:
    return [p for pattern in FILES for p in sorted(root.glob(pattern))]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--check", action="store_true", help="change nothing; exit 1 if any file would change")
    parser.add_argument("--list", action="store_true", help="print the table names and stop")
    ns = parser.parse_args(argv)
    if ns.list:
        for name, fn in TABLES.items():
            print(f"{name:<32} {(fn.__doc__ or '').strip().splitlines()[0] if fn.__doc__ else ''}")
        return 0
    notes: list[str] = []
    stale = []
    for path in files():
        old = path.read_text()
        try:
            new = render(old, notes)
        except KeyError as exc:
            print(f"{path.relative_to(ROOT)}: unknown table {exc.args[0]!r} (known: {', '.join(TABLES)})",
                  file=sys.stderr)
            return 2
        except Missing as missing:
            print(f"{path.relative_to(ROOT)}: a table reads {missing}, which is missing", file=sys.stderr)
            return 2
        if new != old:
            stale.append(path.relative_to(ROOT))
            if not ns.check:
                path.write_text(new)
    for note in dict.fromkeys(notes):
        print(f"note: {note}", file=sys.stderr)
    if ns.check:
        for path in stale:
            print(f"{path}: tables differ from benchmarks/results (run `python -m benchmarks.tables`)",
                  file=sys.stderr)
        return 1 if stale else 0
    for path in stale:
        print(f"rewrote the tables of {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
