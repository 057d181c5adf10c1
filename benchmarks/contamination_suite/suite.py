"""benchmarks/results/contamination_suite.json from the committed stage files (docs/method.md §5.6), and the
validator of its schema.

Per design: the gate over its reported seeds (``gate.design_gate``); the method ``selected`` on its validation
seeds alone (``select_on_validation``, which refuses any other seed); every method's AP, recall@|P| and AP per
tier with paired-bootstrap intervals over the reported seeds and their rows (``stats.bootstrap``), its family,
its AP over the culprits that share no opening 4-gram with an IQ answer, and its AP difference to the selected
method with the difference's interval; the counterfactual on the first reported seed (recovered share of the
drop with its interval over retraining seeds and prompts); the best method with the methods the paired intervals
cannot tell from it; and whether lancet's default ranking is within 0.05 AP of the best. A design whose stage
files are not all committed yet is listed under ``pending`` with what it lacks, not in ``designs``; if only its
counterfactual is missing, its recall half is under ``partial`` (``recall_preview``).
"""

from __future__ import annotations

import json
from pathlib import Path

from benchmarks.common import RESULTS
from benchmarks.contamination_suite.behaviour import HYPOTHESIS_TESTS, selectable, validation_only
from benchmarks.contamination_suite.designs import (
    COUNTERFACTUAL_METHODS,
    DESIGNS,
    K_ELBOW,
    K_FULL,
    K_HALF,
    Design,
)
from benchmarks.contamination_suite.gate import GATE_KEYS, design_gate, ladder_failed
from benchmarks.contamination_suite.overlap import no_overlap_mask, overlap_check
from benchmarks.contamination_suite.stages import STAGE_DIR, openings, read_stage, seed_scores, stage_path
from benchmarks.contamination_suite.stats import N_BOOT, SeedScores, bootstrap, elbow_k, recovered_ci, seed_metrics
from lancet.artifacts import atomic_write_json

SUITE = RESULTS / "contamination_suite.json"
FAMILY_NAMES = ("random", "classifier", "text", "representation", "gradient", "behaviour")
FAMILIES = {"random": "random", "classifier": "classifier", "bm25": "text", "bm25_prompt": "text",
            "repsim": "representation", "repsim_anchored": "representation", "probe": "behaviour",
            "repsim_probe": "behaviour"}
GRADIENT = ("identity", "cosine", "diagonal", "kfac", "ekfac", "linfac")
WITHIN = 0.05  # "lancet's default is within 0.05 AP of the best method"


def family(method: str) -> str:
    """The family of a ranking's name: exact names first, then anything with the behaviour measurement, then a
    gradient estimator with a variant suffix (``linfac_opening_set``, ``kfac_reduce``, ``cosine_adam_ckpt``)."""
    if method in FAMILIES:
        return FAMILIES[method]
    if "behaviour" in method or method.startswith("probe"):
        return "behaviour"
    if method.split("_")[0] in GRADIENT:
        return "gradient"
    raise ValueError(f"no family for the ranking {method!r}: add it to FAMILIES")


def default_method() -> str:
    """What ``lancet attribute`` ranks with when no --method is given."""
    from lancet.influence.arguments import InfluenceArgs

    return InfluenceArgs().method


def select_on_validation(stages: list[dict], design: Design, candidates: list[str] | None = None) -> str:
    """The method with the highest mean AP over the design's validation seeds (ties: the first candidate). Refuses
    a stage of any other seed, and needs every validation seed: nothing chosen here may see a reported seed.
    ``candidates``: the methods to choose from (default: every ranking of the stages but ``random`` and the
    validation seeds' ablations, ``behaviour.validation_only``: they choose a setting; the reported seeds lack them)."""
    seeds = [s["seed"] for s in stages]
    outside = sorted(set(seeds) - set(design.validation_seeds))
    if outside:
        raise ValueError(f"{design.name}: select_on_validation was given seed(s) {outside}, which are not "
                         f"validation seeds ({list(design.validation_seeds)}): a method is chosen on validation only")
    lacking = sorted(set(design.validation_seeds) - set(seeds))
    if lacking:
        raise ValueError(f"{design.name}: no recall stage for validation seed(s) {lacking}")
    runs = [seed_scores(s) for s in stages]
    means = bootstrap(runs, n_boot=1).point
    pool = candidates or [m for m in runs[0].methods if m != "random" and selectable(m)]
    return max(pool, key=lambda m: (means[m]["ap"], -pool.index(m)))


def default_rule(root: Path = STAGE_DIR, designs: dict[str, Design] | None = None) -> dict:
    """Issue 36 item 6's rule (docs/method.md §5.6) for the ranking ``lancet attribute`` uses without --method: the
    highest AP averaged over each counted design's validation seeds, then over the designs (each counts once). A
    design counts unless its gate failed (its tuning ladder ended below the gate, or its reported gates failed);
    candidates are the rankings every counted design has, bar ``random``, ``classifier`` (it needs the design's
    judge) and the validation-only ablations. ``method`` is None while a counted design's validation seed is
    unranked (``waiting_for`` names it): the rule is applied once, on every counted design."""
    root = Path(root)
    per_design: dict[str, dict[str, float]] = {}
    waiting, left_out = [], {}
    for name, design in (designs or DESIGNS).items():
        if design.gated:
            if ladder_failed(_tuning(root, design), design.last_rung) is not None:
                left_out[name] = "its tuning ladder ended below the gate"
                continue
            gates = [read_stage(root, name, s, "gate") for s in design.seeds]
            if all(g is not None for g in gates) and not design_gate(gates)["passed"]:
                left_out[name] = "its gate failed on the reported seeds"
                continue
        stages = [read_stage(root, name, s, "recall") for s in design.validation_seeds]
        if any(s is None for s in stages):
            waiting.append(name)
            continue
        runs = [seed_scores(s) for s in stages]
        point = bootstrap(runs, n_boot=1).point
        per_design[name] = {m: round(point[m]["ap"], 4) for m in runs[0].methods
                            if m not in ("random", "classifier") and selectable(m)}
    common = set.intersection(*(set(v) for v in per_design.values())) if per_design else set()
    mean_ap = {m: round(sum(v[m] for v in per_design.values()) / len(per_design), 4) for m in sorted(common)}
    method = max(sorted(mean_ap), key=lambda m: mean_ap[m]) if mean_ap and not waiting else None
    return {"method": method, "mean_ap": dict(sorted(mean_ap.items(), key=lambda kv: -kv[1])),
            "per_design": per_design, "waiting_for": waiting, "left_out": left_out}


def counterfactual_ks(stage: dict, method: str, selected: str) -> dict[str, int | None]:
    """The k of each retraining of ``method`` on the counterfactual seed (its recall stage ``stage``): |P| for every
    method, and for the selected one also half of it (rounded down) and the elbow of its scores (``stats.elbow_k``;
    None when the stage kept no per-row scores). The runner and the suite both take k from here."""
    runs = seed_scores(stage)
    n_pos = int(runs.positives.sum()) if runs.scores else None
    if method != selected:
        return {K_FULL: n_pos}
    elbow = elbow_k(runs.scores[selected]) if runs.scores else None
    return {K_FULL: n_pos, K_HALF: None if n_pos is None else n_pos // 2, K_ELBOW: elbow}


def _counterfactual_missing(design: Design, stage: dict, selected: str) -> list[str]:
    """The retrainings (and references) the counterfactual stage still lacks, at each retraining seed."""
    where = f"{design.name}/seed{design.counterfactual_seed}_counterfactual.json"
    wanted = [(m, K_FULL) for m in COUNTERFACTUAL_METHODS if m != selected]
    wanted += [(selected, k) for k in (K_FULL, K_HALF, K_ELBOW)]
    out = []
    for r in map(str, design.retrain_seeds):
        out += [f"{where}: {which} at retraining seed {r}" for which in ("impure", "oracle") if r not in stage[which]]
        out += [f"{where}: {m} {k} at retraining seed {r}" for m, k in wanted
                if r not in stage["runs"].get(m, {}).get(k, {}).get("verdicts", {})]
    return out


def _missing(root: Path, design: Design) -> list[str]:
    want = [(s, "recall") for s in design.validation_seeds + design.seeds]
    if design.gated:
        want = [(s, "gate") for s in design.seeds] + want
    want.append((design.counterfactual_seed, "counterfactual"))
    return [str(stage_path(root, design.name, s, st).relative_to(root)) for s, st in want
            if read_stage(root, design.name, s, st) is None] + _lacking_methods(root, design)


def _lacking_methods(root: Path, design: Design) -> list[str]:
    """The reported recall stages that lack a ranking the validation seeds have (bar ``validation_only`` ones): every
    reported seed is ranked by every method, so a stage written before a method existed (the imported lexical
    seeds) is run again with --force."""
    validation = [read_stage(root, design.name, s, "recall") for s in design.validation_seeds]
    if any(v is None for v in validation):
        return []
    wanted = {m for v in validation for m in seed_scores(v).methods if not validation_only(m)}
    out = []
    for seed in design.seeds:
        stage = read_stage(root, design.name, seed, "recall")
        lacks = sorted(wanted - set(seed_scores(stage).methods)) if stage is not None else []
        if lacks:
            path = stage_path(root, design.name, seed, "recall").relative_to(root)
            out.append(f"{path}: lacks {', '.join(lacks)} (run it again with --force)")
    return out


def design_entry(design: Design, root: Path = STAGE_DIR, n_boot: int = N_BOOT, default: str | None = None
                 ) -> tuple[dict | None, list[str]]:
    """(the design's object of the suite JSON, or None; what it still lacks). A design whose gate failed is
    complete with its gate alone: it is reported as failed, with no recall; where its seeds were ranked anyway,
    their recall is kept apart under ``recall_gate_failed`` (shown, never counted)."""
    gate = {}
    if design.gated:
        gates = [read_stage(root, design.name, s, "gate") for s in design.seeds]
        ended = ladder_failed(_tuning(root, design), design.last_rung)
        if ended is not None:
            return {"lexical": design.lexical, "gate": ended, "validation_seeds": list(design.validation_seeds),
                    "seeds": list(design.seeds), "max_ngram_overlap": None, "selected": None, "recall": {},
                    "counterfactual": {}, "note": "the causation gate could not be made to pass: "
                    + ended["why_not"][0]}, []
        if any(g is None for g in gates):
            return None, _missing(root, design)
        gate = design_gate(gates)
    entry = {"lexical": design.lexical, "gate": gate, "validation_seeds": list(design.validation_seeds),
             "seeds": list(design.seeds)}
    if design.gated and not gate["passed"]:
        failed = {**entry, "max_ngram_overlap": None, "selected": None, "recall": {}, "counterfactual": {},
                  "note": "the causation gate failed: " + "; ".join(gate["why_not"])}
        reported = [read_stage(root, design.name, s, "recall") for s in design.seeds]
        validation = [read_stage(root, design.name, s, "recall") for s in design.validation_seeds]
        if all(r is not None for r in reported + validation):
            # shown, never counted (recall stays empty: no win, no default): what a reader of the failure asks next
            failed["recall_gate_failed"] = {"validation_seeds": list(design.validation_seeds),
                                            "seeds": list(design.seeds),
                                            **_recall_part(reported, _selected(root, design), n_boot,
                                                           default or default_method())}
        return failed, []
    missing = _missing(root, design)
    if missing:
        return None, missing
    selected = _selected(root, design)
    reported = [read_stage(root, design.name, s, "recall") for s in design.seeds]
    cf = read_stage(root, design.name, design.counterfactual_seed, "counterfactual")
    missing = _counterfactual_missing(design, cf, selected)
    if missing:
        return None, missing
    cf_recall = reported[design.seeds.index(design.counterfactual_seed)]
    for method, runs in cf["runs"].items():
        expected = counterfactual_ks(cf_recall, method, selected)
        wrong = [k for k, run in runs.items() if expected.get(k) is not None and run["k"] != expected[k]]
        if wrong:
            raise ValueError(f"{design.name} counterfactual {method} {wrong[0]}: k {runs[wrong[0]]['k']}, but "
                             f"counterfactual_ks gives {expected[wrong[0]]}")
    entry.update(_recall_part(reported, selected, n_boot, default or default_method()))
    entry["counterfactual"] = _counterfactual(cf, selected, n_boot)
    return entry, []


def _tuning(root: Path, design: Design) -> dict | None:
    path = Path(root) / design.name / "tuning.json"
    return json.loads(path.read_text()) if path.is_file() else None


def _selected(root: Path, design: Design) -> str:
    return select_on_validation([read_stage(root, design.name, s, "recall") for s in design.validation_seeds], design)


def _recall_part(reported: list[dict], selected: str, n_boot: int, default: str) -> dict:
    """The recall half of a design's object: every method's AP with intervals, the selected, best and default."""
    part = _recall(reported, selected, n_boot)
    part["selected"] = selected
    part["best"] = _best(part["recall"], part.pop("_boot"))
    rec = part["recall"]
    part["default"] = {"method": default, "best": part["best"]["method"],
                       "ap_gap": round(rec[part["best"]["method"]]["ap_mean"] - rec[default]["ap_mean"], 4)
                       if default in rec else None}
    gap = part["default"]["ap_gap"]
    part["default"][f"within_{WITHIN}"] = None if gap is None else gap <= WITHIN
    return part


def recall_preview(design: Design, root: Path = STAGE_DIR, n_boot: int = N_BOOT, default: str | None = None
                   ) -> dict | None:
    """The recall half of a design whose recall stages (and passing gates) are all committed while its
    counterfactual is not: what the reported seeds say so far, listed under the suite's ``partial`` (never in
    ``designs``). None when a recall stage or gate is missing, or when the gate failed."""
    root = Path(root)
    if design.gated:
        gates = [read_stage(root, design.name, s, "gate") for s in design.seeds]
        if any(g is None for g in gates) or not design_gate(gates)["passed"]:
            return None
    if any("counterfactual" not in m for m in _missing(root, design)):
        return None
    reported = [read_stage(root, design.name, s, "recall") for s in design.seeds]
    return {"validation_seeds": list(design.validation_seeds), "seeds": list(design.seeds),
            **_recall_part(reported, _selected(root, design), n_boot, default or default_method())}


def _recall(stages: list[dict], selected: str, n_boot: int) -> dict:
    runs = [seed_scores(s) for s in stages]
    boot = bootstrap(runs, n_boot=n_boot)
    checks = [(s, openings(s)) for s in stages]
    measured = [(s, o) for s, o in checks if o is not None]
    # AP over the culprits whose opening shares no 4-gram with an IQ answer's: the seeds that kept openings
    restricted = [r.restrict(no_overlap_mask(r.positives, *o)) for r, (_, o) in zip(runs, checks, strict=True)
                  if o is not None]
    restricted = [r for r in restricted if bool(r.positives.any())]
    clean = bootstrap(restricted, n_boot=n_boot) if restricted else None
    recall = {}
    for m in runs[0].methods:
        row = {"family": family(m), **boot.summary(m)}
        row["ap_no_overlap"] = round(clean.point[m]["ap"], 4) if clean else None
        row["ap_no_overlap_ci"] = clean.ap_ci(m) if clean else None
        row["ap_minus_selected"] = boot.ap_diff_ci(m, selected) if m in boot.point and selected in boot.point \
            else None
        recall[m] = row
    checked = [overlap_check([c for c in o[0] if c is not None], o[1]) for _, o in measured]
    return {"recall": recall, "_boot": boot,
            "max_ngram_overlap": max((c["max"] for c in checked), default=None),
            "ngram_overlap": {str(s["seed"]): c for (s, _), c in zip(measured, checked, strict=True)},
            "n_iqs": {str(s["seed"]): s.get("n_iqs") for s in stages},
            "regime": {str(s["seed"]): s["regime"] for s in stages if "regime" in s}}


def _best(recall: dict, boot) -> dict:
    """The method of highest mean AP, and those whose paired AP difference to it has an interval holding 0: the
    suite calls a method the winner of a design only when that list is empty."""
    best = max(recall, key=lambda m: recall[m]["ap_mean"])
    tied = [m for m in recall if m != best and (boot.ap_diff_ci(best, m)["ci"][0] or 0.0) <= 0]
    return {"method": best, "ap_mean": recall[best]["ap_mean"], "indistinguishable": tied}


def _counterfactual(stage: dict, selected: str, n_boot: int) -> dict:
    """{method: {k_name: {"k", "recovered_mean", "recovered_ci", ...}}} for every retraining in the stage."""
    out: dict = {}
    for method, runs in stage["runs"].items():
        for k_name, run in runs.items():
            seeds = sorted(run["verdicts"])
            lacking = [r for r in seeds if r not in stage["impure"] or r not in stage["oracle"]]
            if lacking:
                raise ValueError(f"counterfactual {method} {k_name}: no impure or oracle verdicts at retraining "
                                 f"seed(s) {lacking}")
            result = recovered_ci([stage["impure"][r] for r in seeds], [stage["oracle"][r] for r in seeds],
                                  [run["verdicts"][r] for r in seeds], n_boot=n_boot)
            out.setdefault(method, {})[k_name] = {"k": run["k"], **result, "retrain_seeds": [int(r) for r in seeds],
                                                  "positives_removed": run.get("positives_removed")}
    return out


def hypothesis_tests(root: Path = STAGE_DIR, n_boot: int = N_BOOT, tests: dict | None = None) -> dict:
    """{hypothesis: {"against": ranking, "designs": {design: {"seeds", "per_seed": {seed: {ranking: AP}},
    "missing", "verdict", "diff", "distinguishable"}}}} (docs/method.md §5.6, how H1 is read): "holds" if the
    hypothesis' ranking has the higher AP on every test seed, "fails" if not, "pending" while a test seed lacks
    either ranking; ``diff`` is the paired bootstrap of the AP difference over the test seeds and their rows."""
    out = {}
    for name, (against, plan) in (tests or HYPOTHESIS_TESTS).items():
        designs = {}
        for design, seeds in plan.items():
            runs = {}
            for s in seeds:
                stage = read_stage(Path(root), design, s, "recall")
                run = None if stage is None else seed_scores(stage)
                if run is not None and {name, against} <= set(run.scores):
                    runs[s] = SeedScores(s, run.tiers, run.positive_tiers, {m: run.scores[m] for m in (name, against)})
            per_seed = {str(s): {m: round(seed_metrics(r.scores[m], r.tiers, r.positive_tiers)["ap"], 4)
                                 for m in (name, against)} for s, r in runs.items()}
            entry = {"seeds": list(seeds), "per_seed": per_seed, "missing": [s for s in seeds if s not in runs],
                     "verdict": "pending", "diff": None, "distinguishable": None}
            if not entry["missing"]:
                diff = bootstrap([runs[s] for s in seeds], n_boot=n_boot).ap_diff_ci(name, against)
                higher = all(v[name] > v[against] for v in per_seed.values())
                entry |= {"verdict": "holds" if higher else "fails", "diff": diff,
                          "distinguishable": diff["ci"][0] is not None and diff["ci"][0] > 0}
            designs[design] = entry
        out[name] = {"against": against, "designs": designs}
    return out


def build_suite(root: Path = STAGE_DIR, designs: dict[str, Design] | None = None, n_boot: int = N_BOOT,
                default: str | None = None) -> dict:
    """The suite JSON from the stage files under ``root``: complete designs in ``designs``, the others in
    ``pending`` with their missing stage files."""
    default = default or default_method()
    out: dict = {"default_method": default, "default_rule": default_rule(root, designs), "designs": {},
                 "pending": {}, "partial": {}, "n_boot": n_boot}
    for name, design in (designs or DESIGNS).items():
        entry, missing = design_entry(design, Path(root), n_boot, default)
        if entry is None:
            out["pending"][name] = missing
            preview = recall_preview(design, Path(root), n_boot, default)
            if preview is not None:
                out["partial"][name] = preview
        else:
            out["designs"][name] = entry
    out["hypotheses"] = hypothesis_tests(root, n_boot)
    return out


def write_suite(suite: dict, path: Path = SUITE) -> Path:
    """Validate, then write atomically."""
    problems = validate_suite(suite)
    if problems:
        raise ValueError("the suite JSON does not match its schema: " + "; ".join(problems))
    atomic_write_json(path, suite)
    return path


def _number(x) -> bool:
    return isinstance(x, int | float) and not isinstance(x, bool)


def _interval(x) -> bool:
    return isinstance(x, list) and len(x) == 2 and all(_number(v) for v in x) and x[0] <= x[1]


def validate_suite(suite: dict) -> list[str]:
    """What in ``suite`` departs from issue 35's schema (empty: it matches). Extra keys are allowed; the issue's
    are required, with their types; a gate-failed design may have an empty recall and counterfactual."""
    errors: list[str] = []
    if not isinstance(suite, dict):
        return ["the suite is not an object"]
    if not isinstance(suite.get("default_method"), str):
        errors.append("default_method: a string is required")
    designs = suite.get("designs")
    if not isinstance(designs, dict):
        return errors + ["designs: an object is required"]
    for name, d in designs.items():
        errors += [f"designs.{name}.{e}" for e in _validate_design(name, d)]
    return errors


def _validate_design(name: str, d: dict) -> list[str]:
    if not isinstance(d, dict):
        return ["not an object"]
    errors = [f"{k}: missing" for k in ("lexical", "gate", "max_ngram_overlap", "validation_seeds", "seeds",
                                        "selected", "recall", "counterfactual") if k not in d]
    if errors:
        return errors
    if d["lexical"] is not (name == "lexical"):
        errors.append("lexical: true for the design 'lexical' only")
    seeds_ok = True
    for key in ("validation_seeds", "seeds"):
        if not isinstance(d[key], list) or not all(isinstance(s, int) for s in d[key]):
            errors.append(f"{key}: a list of integers is required")
            seeds_ok = False
    if seeds_ok and set(d["seeds"]) & set(d["validation_seeds"]):
        errors.append("seeds: the reported seeds must be disjoint from validation_seeds")
    gate = d["gate"]
    failed = isinstance(gate, dict) and gate.get("passed") is False
    if not isinstance(gate, dict):
        errors.append("gate: an object is required")
    elif gate:
        errors += [f"gate.{k}: missing" for k in GATE_KEYS if k not in gate]
        if "passed" in gate and not isinstance(gate["passed"], bool):
            errors.append("gate.passed: a boolean is required")
    if d["max_ngram_overlap"] is not None and not _number(d["max_ngram_overlap"]):
        errors.append("max_ngram_overlap: a number is required")
    if failed:
        return errors + ([] if isinstance(d.get("note"), str) else ["note: a failed gate needs a note"])
    if not isinstance(d["selected"], str):
        errors.append("selected: a string is required")
    errors += _validate_recall(d["recall"], d["selected"])
    errors += _validate_counterfactual(d["counterfactual"], d["selected"])
    return errors


def _validate_recall(recall, selected) -> list[str]:
    if not isinstance(recall, dict) or not recall:
        return ["recall: a non-empty object is required"]
    errors = []
    for m, row in recall.items():
        if not isinstance(row, dict):
            errors.append(f"recall.{m}: an object is required")
            continue
        if row.get("family") not in FAMILY_NAMES:
            errors.append(f"recall.{m}.family: one of {', '.join(FAMILY_NAMES)}")
        if not _number(row.get("ap_mean")):
            errors.append(f"recall.{m}.ap_mean: a number is required")
        if not _interval(row.get("ap_ci")):
            errors.append(f"recall.{m}.ap_ci: [lo, hi] is required")
    if isinstance(selected, str) and selected not in recall:
        errors.append(f"selected: {selected!r} has no recall row")
    return errors


def _validate_counterfactual(cf, selected) -> list[str]:
    if not isinstance(cf, dict) or not cf:
        return ["counterfactual: a non-empty object is required"]
    errors = []
    for m, runs in cf.items():
        if not isinstance(runs, dict) or not (set(runs) & {K_FULL, K_HALF}):
            errors.append(f"counterfactual.{m}: k_full or k_half is required")
            continue
        for k_name, r in runs.items():
            if not isinstance(r, dict) or not isinstance(r.get("k"), int):
                errors.append(f"counterfactual.{m}.{k_name}.k: an integer is required")
                continue
            if r.get("recovered_mean") is not None and not _number(r["recovered_mean"]):
                errors.append(f"counterfactual.{m}.{k_name}.recovered_mean: a number is required")
            if not _interval(r.get("recovered_ci")) and r.get("recovered_ci") != [None, None]:
                errors.append(f"counterfactual.{m}.{k_name}.recovered_ci: [lo, hi] is required")
    needed = [(m, K_FULL) for m in (*COUNTERFACTUAL_METHODS, selected)] + [(selected, K_HALF)]
    errors += [f"counterfactual.{m}.{k}: missing" for m, k in needed
               if isinstance(selected, str) and k not in cf.get(m, {})]
    return errors


__all__ = ["FAMILIES", "FAMILY_NAMES", "SUITE", "build_suite", "counterfactual_ks", "default_method", "default_rule",
           "design_entry", "family", "recall_preview", "select_on_validation", "validate_suite", "write_suite"]
