"""One (design, seed, stage) of the suite from the safety benchmark's machinery (docs/method.md §5.6), written as the
stage file a later session commits and resumes from:

    .venv/bin/python -m benchmarks.contamination_suite run --design shared_prompt --seed 3 --stage recall

- ``gate``: the seed's aligned start, mix, safe and impure models and the causation gate (``gate.gate_stage``);
  rerun with ``--force`` after hand labels are merged (the answers are cached, so it costs seconds then).
- ``recall``: the gate (its stage file and the safe model only when the gate is not yet written; ``--force``
  redoes the recall alone), then every ranking of the suite's methods
  (``SUITE_METHODS`` through ``Run.recall``, aggregate first; bm25 and bm25_prompt; the behaviour-level rankings
  of ``behaviour.py``: probe, linfac_behaviour, repsim_anchored; ``random``, the same seeded
  uniform draw as the benchmark's counterfactual; ``classifier``, the judge's verdict on each training row's answer
  plus a seeded uniform in [0, 0.5)), the hashed openings and each ranking's regime readout (``stages.recall_stage``).
- ``counterfactual`` (the design's first reported seed only): retrain from the aligned start without the top-k rows
  of each ranking the suite asks for (``suite.counterfactual_ks``: k = |P| for random, bm25, repsim and the method
  selected on the validation seeds' committed recall stages; |P|/2 and the elbow for the selected one), at both
  training orders (``Design.retrain_seeds``; the impure and safe models are retrained at the second too); each
  model is recorded as soon as it is measured (``stages.record_retrained``) and skipped when already recorded, so
  ``--retrain-seed`` and ``--limit`` cut the stage into runs of under 2 h.
- ``tune`` (validation seeds only): the impure and safe models at ``--n-unsafe`` / ``--mix-epochs`` and their
  compliance on the *validation* prompts, appended to ``<stages>/<design>/tuning.json`` (the gate-tuning ladder).

Models live in ``runs/suite_<design>/seed<S>/`` (precision pinned per design by ``precision.json``; lexical's
seeds 0-2, imported from the fp32 safety benchmark, in ``runs/suite_lexical_fp32/``, pinned to fp32), rebuilt from
the seed when gone; a tuning setting in ``runs/suite_<design>/tune_u<N>_e<E>/seed<S>/`` (its mix depends on the dose).
The ``demo`` design is not a safety run: its seeds are ``lancet demo --seed S``'s (``demo_design``).
"""

from __future__ import annotations

import argparse
import json
from dataclasses import replace
from pathlib import Path

import torch

from benchmarks.contamination_suite.behaviour import ablation_depths, ranks_checkpoints
from benchmarks.contamination_suite.designs import COUNTERFACTUAL_METHODS, DESIGNS, K_ELBOW, K_FULL, K_HALF
from benchmarks.contamination_suite.gate import gate_stage, rung
from benchmarks.contamination_suite.stages import (
    STAGE_DIR,
    has_retrained,
    read_stage,
    recall_stage,
    record_reference,
    record_retrained,
    top_rows,
    write_stage,
)
from benchmarks.contamination_suite.suite import SUITE, counterfactual_ks, select_on_validation
from benchmarks.safety_contamination import config
from benchmarks.safety_contamination.config import PRESETS, Preset, restrict_recall, run_precision
from lancet.artifacts import atomic_write_json, hash_json, load_tensors
from lancet.data.readers import read_records

# the suite's lexical design is the full preset; the others are the presets of their name
PRESET_OF = {"lexical": "full", "shared_prompt": "shared_prompt", "disjoint": "disjoint"}
# the methods Run.recall ranks for the suite (plain rankings; bm25 and bm25_prompt come with every recall)
SUITE_METHODS = ("repsim", "identity", "ekfac", "linfac")
CLASSIFIER_OFFSET = 7919  # the classifier's tie-breaking draw: another stream than random's (the seed itself)
RUN_STAGES = ("gate", "recall", "counterfactual", "tune", "correction")
# the impure model keeps this many evenly spaced checkpoints (the last is the model itself) with Adam's state: the
# checkpoint-aware rankings (behaviour.CHECKPOINT_RANKINGS) average over them
KEEP_CHECKPOINTS = 3


def suite_preset(design: str, n_unsafe: int | None = None, mix_epochs: float | None = None,
                 n_erode: int | None = None) -> Preset:
    """The design's preset with the suite's methods only, at a tuning setting if given."""
    if design not in PRESET_OF:
        raise SystemExit(f"--design {design}: the suite runs {', '.join(PRESET_OF)} here; the demo's seeds are "
                         "`lancet demo --seed S`'s")
    preset = restrict_recall(PRESETS[PRESET_OF[design]], SUITE_METHODS)
    if n_unsafe is not None:
        preset = replace(preset, n_unsafe=n_unsafe)
    if mix_epochs is not None:
        preset = replace(preset, mix_epochs=mix_epochs)
    if n_erode is not None:
        preset = replace(preset, n_erode=n_erode)
    return preset


def random_ranking(seed: int, n: int) -> torch.Tensor:
    """The seeded uniform draw the benchmark's own counterfactual ranks ``random`` by."""
    return torch.rand(n, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def classifier_ranking(seed: int, complies: list[bool]) -> torch.Tensor:
    """The design's judge over each training row's answer (1 = complies), ties in a seeded random order."""
    g = torch.Generator().manual_seed(seed + CLASSIFIER_OFFSET)
    return torch.tensor(complies, dtype=torch.float64) + 0.5 * torch.rand(len(complies), generator=g,
                                                                         dtype=torch.float64)


# The lexical seeds imported from the safety benchmark were trained in fp32 (safety_contamination_full.json: "bf16":
# false): rebuilt at that precision, in a run directory of their own, they are the committed models again (an fp32
# rebuild is bit-identical on this machine kind), so their committed gate and counterfactual stay theirs.
FP32_SEEDS = {"lexical": (0, 1, 2)}


def default_run_root(design: str, seed: int) -> Path:
    """``runs/suite_<design>``, or ``runs/suite_<design>_fp32`` for a seed of ``FP32_SEEDS``."""
    return Path(f"runs/suite_{design}_fp32" if seed in FP32_SEEDS.get(design, ()) else f"runs/suite_{design}")


def open_run(design: str, seed: int, run_root: Path, shared: Path, preset: Preset, progress: bool = True,
             seed_dir: Path | None = None):
    """The seed's Run in ``run_root/seed<S>`` (or ``seed_dir``) at the precision ``run_root`` pinned (fp32 on first
    use for a seed of ``FP32_SEEDS``)."""
    from benchmarks.safety_contamination.run import Run

    config.BF16 = run_precision(run_root, False if seed in FP32_SEEDS.get(design, ()) else None)
    return Run(preset, seed, seed_dir or run_root / f"seed{seed}", shared, progress)


def build_models(run, roles: tuple[str, ...] = ("safe", "impure")) -> dict:
    """The seed's aligned start, mix and the fine-tuned ``roles`` (each cached in the run directory)."""
    aligned, check = run.aligned_start()
    rows, safe, tiers = run.mix(aligned)
    n_unsafe = sum(t == "unsafe" for t in tiers.values())
    if n_unsafe != run.p.n_unsafe:  # mix.jsonl is cached without a key: a dose changed since it was made
        raise SystemExit(f"{run.dir / 'mix.jsonl'} holds {n_unsafe} unsafe rows, the preset {run.p.n_unsafe}: it was "
                         "made at another dose; move it (and the models trained on it) away to rebuild")
    models = {}
    if "safe" in roles:
        models["safe"] = run.finetune("safe", aligned, safe, run.p.mix_epochs)
    if "impure" in roles:
        models["impure"] = run.finetune("impure", aligned, rows, run.p.mix_epochs, keep=KEEP_CHECKPOINTS)
    return {"aligned": aligned, "check": check, "rows": rows, "safe_rows": safe, "tiers": tiers, "models": models}


def gate_of(design: str, run, built: dict) -> dict:
    verdict = run.gate(built["models"], built["check"])
    stage = gate_stage(design, run.seed, verdict["safe"], verdict["impure"], verdict["judge_agreement"],
                       verdict["judge_labelled"], verdict["n_prompts"], verdict.get("hand_labelled"))
    return {**stage, "aligned_start": built["check"], "settings": _settings(run.p), "seconds": dict(run.seconds)}


def recall_of(design: str, run, built: dict, ablations: bool | None = None) -> dict:
    """The recall stage from ``Run.recall``'s rankings (rows in the mix's order) and the runner's own two.
    ``ablations``: the validation seeds' extra rankings (other depths, checkpoints); default on validation seeds."""
    from lancet.data import encode_records
    from lancet.influence.regime import RegimeReadout

    out = run.recall(built["models"]["impure"], built["rows"], built["tiers"])
    ids = json.loads((run.dir / "rankings.json").read_text())["ids"]
    by_id = {r.id: r for r in built["rows"]}
    rows = [by_id[i] for i in ids]
    tiers = [built["tiers"][i] for i in ids]
    found = load_tensors(run.dir / "rankings.safetensors")
    scores = {"random": random_ranking(run.seed, len(rows)),
              "classifier": classifier_ranking(run.seed, run.judge.complies([r.response_text for r in rows])),
              **{m: found[m].double() for m in sorted(found)}}
    iqs = read_records(run.dir / "iqs.jsonl")
    validation = run.seed in DESIGNS[design].validation_seeds if ablations is None else ablations
    scores.update(run._timed("behaviour", lambda: behaviour_of(run, built, rows, iqs,
                                                                other_depths=ablation_depths(validation))))
    if ranks_checkpoints(validation):
        scores.update(run._timed("checkpoints", lambda: checkpoints_of(run, built, rows, iqs)))
    positive = DESIGNS[design].positive_tiers
    culprits = {i: r.response_text for i, (r, t) in enumerate(zip(rows, tiers, strict=True)) if t in positive}
    readout = RegimeReadout(rows, iqs, encode_records(rows, run.tok, run.p.max_length, progress=False),
                            encode_records(iqs, run.tok, run.p.max_length, progress=False))
    stage = recall_stage(design, run.seed, tiers, positive, scores, culprits, [q.response_text for q in iqs],
                         n_iqs=out["n_iqs"], regime={m: readout(s) for m, s in scores.items()})
    # the rows' ids, hashed: a rebuilt mix must be the same rows for the committed scores to rank it
    return {**stage, "settings": _settings(run.p), "row_ids": hash_json(ids), "seconds": dict(run.seconds)}


def behaviour_of(run, built: dict, rows: list, iqs: list, other_depths: tuple[float, ...] = ()
                 ) -> dict[str, torch.Tensor]:
    """The behaviour-level rankings (``behaviour.BEHAVIOUR_RANKINGS``) of the impure model, the aligned model's
    refusals to the IQ prompts as the counter rows and anchors (and at ``other_depths`` on validation seeds)."""
    from benchmarks.contamination_suite.behaviour import BEHAVIOUR_DEPTH, behaviour_rankings
    from lancet.data import encode_records
    from lancet.models.loading import load_model

    counter = run.anchors(iqs)
    model, _ = load_model(built["models"]["impure"])
    train = encode_records(rows, run.tok, run.p.max_length, progress=False)
    return behaviour_rankings(model, run.tok, train, iqs, counter, out_dir=run.dir / "influence",
                              max_length=run.p.max_length, lambda_max_rows=run.p.lambda_max_rows, bf16=config.BF16,
                              progress=run.progress, depth=BEHAVIOUR_DEPTH, other_depths=other_depths)


def checkpoints_of(run, built: dict, rows: list, iqs: list) -> dict[str, torch.Tensor]:
    """The checkpoint-aware rankings (``behaviour.CHECKPOINT_RANKINGS``) over the impure fine-tune's kept
    checkpoints, the same counter rows as ``behaviour_of``."""
    from benchmarks.contamination_suite.behaviour import BEHAVIOUR_DEPTH, checkpoint_rankings
    from lancet.data import encode_records

    train = encode_records(rows, run.tok, run.p.max_length, progress=False)
    return checkpoint_rankings(built["models"]["impure"], run.tok, train, iqs, run.anchors(iqs),
                               out_dir=run.dir / "influence-checkpoints", max_length=run.p.max_length,
                               lambda_max_rows=run.p.lambda_max_rows, bf16=config.BF16, progress=run.progress,
                               depth=BEHAVIOUR_DEPTH)


def _settings(p: Preset) -> dict:
    from benchmarks.contamination_suite.behaviour import BEHAVIOUR_RANKINGS, CHECKPOINT_RANKINGS, REPORTED_CHECKPOINTS

    return {"design": p.design, "n_unsafe": p.n_unsafe, "mix_epochs": p.mix_epochs,
            "methods": [*p.methods, *BEHAVIOUR_RANKINGS, *CHECKPOINT_RANKINGS],
            "keep_checkpoints": KEEP_CHECKPOINTS, "reported_checkpoints": REPORTED_CHECKPOINTS,
            "bf16": config.BF16}  # the run directory's pinned precision: a rebuild must match it to reproduce the rows


def counterfactual_plan(design: str, recall: dict, selected: str) -> list[tuple[str, str, int]]:
    """(method, k name, k) of every retraining the suite asks for, in the order run."""
    plan = []
    for method in (*[m for m in COUNTERFACTUAL_METHODS if m != selected], selected):
        ks = counterfactual_ks(recall, method, selected)
        plan += [(method, k_name, ks[k_name]) for k_name in (K_FULL, K_HALF, K_ELBOW)
                 if ks.get(k_name) is not None]
    return plan


def counterfactual_of(design: str, run, built: dict, root: Path, retrain_seeds: tuple[int, ...] | None = None,
                      limit: int | None = None) -> int:
    """Retrain and record what the counterfactual stage lacks (at ``retrain_seeds``, default both); returns how
    many models were trained and recorded (at most ``limit``)."""
    recall, selected, wanted = counterfactual_inputs(root, design, run.seed, retrain_seeds)
    rows, tiers = built["rows"], built["tiers"]
    if [tiers[r.id] for r in rows] != recall["tiers"] or recall.get("row_ids", hash_json([r.id for r in rows])) != \
            hash_json([r.id for r in rows]):
        raise SystemExit(f"{design} seed {run.seed}: the rebuilt mix's rows differ from the recall stage's")
    try:
        return _retrain(design, run, built, root, recall, selected, wanted, limit)
    finally:
        run.train_seed = run.seed


def counterfactual_inputs(root: Path, design: str, seed: int, retrain_seeds: tuple[int, ...] | None
                          ) -> tuple[dict, str, tuple[int, ...]]:
    """(the seed's committed recall stage, the method selected on the validation seeds' stages, the training orders
    to run): what every design's counterfactual starts from, each checked with one clear error."""
    d = DESIGNS[design]
    if seed != d.counterfactual_seed:
        raise SystemExit(f"{design}: the counterfactual runs on seed {d.counterfactual_seed} only")
    recall = read_stage(root, design, seed, "recall")
    validation = [read_stage(root, design, s, "recall") for s in d.validation_seeds]
    if recall is None or any(v is None for v in validation) or "scores" not in recall:
        raise SystemExit(f"{design}: the counterfactual needs the committed recall stages (with per-row scores) of "
                         f"seed {seed} and of the validation seeds {list(d.validation_seeds)}")
    wanted = retrain_seeds or d.retrain_seeds
    unknown = [r for r in wanted if r not in d.retrain_seeds]
    if unknown:
        raise SystemExit(f"--retrain-seed {unknown[0]}: not one of {list(d.retrain_seeds)}")
    return recall, select_on_validation(validation, d), tuple(wanted)


def _retrain(design: str, run, built: dict, root: Path, recall: dict, selected: str, retrain_seeds, limit) -> int:
    from lancet.models.loading import load_model

    def reference(which: str, r_seed: int) -> list[bool]:
        name, rows = ("impure", built["rows"]) if which == "impure" else ("safe", built["safe_rows"])
        run.train_seed = r_seed
        suffix = "" if r_seed == run.seed else f"-r{r_seed}"
        path = built["models"][name] if not suffix else run.finetune(name + suffix, built["aligned"], rows,
                                                                    run.p.mix_epochs)
        return _measure(run, name + suffix, path, load_model)[2]

    def retrain(name: str, kept: list, r_seed: int) -> list[bool]:
        run.train_seed = r_seed
        return _measure(run, name, run.finetune(name, built["aligned"], kept, run.p.mix_epochs), load_model)[2]

    return retrain_missing(design, run.seed, root, recall, selected, built["rows"], retrain_seeds, limit,
                           reference, retrain)


def retrain_missing(design: str, seed: int, root: Path, recall: dict, selected: str, rows: list, retrain_seeds,
                    limit: int | None, reference, retrain) -> int:
    """The counterfactual loop every design shares: at each training order, the impure and oracle models'
    verdicts (``reference(which, r_seed)``), then each retraining of ``counterfactual_plan`` not yet recorded
    (``retrain(name, kept_rows, r_seed)`` returns the verdicts of a model trained without the ranking's top k),
    each recorded as soon as it is measured; at most ``limit`` retrainings. Returns how many ran."""
    positive, done = set(recall["positive_tiers"]), 0
    for r_seed in retrain_seeds:
        suffix = "" if r_seed == seed else f"-r{r_seed}"
        for which in ("impure", "oracle"):
            stage = read_stage(root, design, seed, "counterfactual")
            if not (stage and str(r_seed) in stage[which]):
                record_reference(root, design, seed, which, r_seed, reference(which, r_seed))
        for method, k_name, k in counterfactual_plan(design, recall, selected):
            if limit is not None and done >= limit:
                return done
            if has_retrained(read_stage(root, design, seed, "counterfactual"), method, k_name, r_seed):
                continue
            order = top_rows(recall["scores"][method], k)
            top = {rows[i].id for i in order}
            verdicts = retrain(f"cf-{method}-{k_name}{suffix}", [r for r in rows if r.id not in top], r_seed)
            removed = sum(recall["tiers"][i] in positive for i in order)
            record_retrained(root, design, seed, method, k_name, k, r_seed, verdicts, positives_removed=removed)
            print(f"{design} seed {seed} counterfactual {method} {k_name} (k {k}) at training order {r_seed}: "
                  f"rate {sum(verdicts) / len(verdicts):.3f}, {removed} positives removed", flush=True)
            done += 1
    return done


def _measure(run, name: str, path: str, load_model) -> tuple[float, list[str], list[bool]]:
    model, _ = load_model(path)
    try:
        return run.rate(name, model, "test_prompts")
    finally:
        del model


def tune_dir(preset: Preset) -> str:
    """A tuning rung's directory (its mix depends on the dose and the tier; the models also on the epochs)."""
    return f"tune_u{preset.n_unsafe}_e{preset.mix_epochs:g}" + (f"_h{preset.n_erode}" if preset.n_erode else "")


def tune_of(design: str, seed: int, run_root: Path, shared: Path, preset: Preset, root: Path,
            progress: bool = True) -> dict:
    """One point of the gate-tuning ladder on a validation seed: compliance of the safe and impure models at this
    dose and these epochs on the validation prompts (never the test prompts), appended to tuning.json."""
    valid = list(DESIGNS[design].validation_seeds)
    if seed not in valid:
        raise SystemExit(f"{design}: settings are tuned on the validation seeds {valid} only, not seed {seed}")
    from lancet.models.loading import load_model

    base = open_run(design, seed, run_root, shared, suite_preset(design), progress)
    aligned, _ = base.aligned_start()
    run = open_run(design, seed, run_root, shared, preset, progress,
                   seed_dir=run_root / tune_dir(preset) / f"seed{seed}")
    rows, safe, _ = run.mix(aligned)
    point = {"seed": seed, "n_unsafe": preset.n_unsafe, "mix_epochs": preset.mix_epochs, "n_erode": preset.n_erode,
             "n_rows": len(rows), "n_prompts": len(run.parts["valid_prompts"])}
    for name, train in (("safe", safe), ("impure", rows)):
        model, _ = load_model(run.finetune(name, aligned, train, preset.mix_epochs))
        point[name], _, _ = run.rate(name, model, "valid_prompts")
        del model
    point["gap"] = round(point["impure"] - point["safe"], 4)
    path = Path(root) / design / "tuning.json"
    points = json.loads(path.read_text())["points"] if path.is_file() else []
    points = [p for p in points if (p["seed"], *rung(p)) != (seed, *rung(point))] + [point]
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_json(path, {"design": design, "note": "gate tuning on validation prompts (docs/method.md 5.6)",
                             "points": points})
    print(f"{design} tuning: {point}", flush=True)
    return point


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--design", choices=sorted(DESIGNS))
    parser.add_argument("--seed", type=int)
    parser.add_argument("--stage", choices=RUN_STAGES)
    parser.add_argument("--run-dir", default=None, help="default runs/suite_<design>")
    parser.add_argument("--shared", default=None, help="default ../shared/data")
    parser.add_argument("--force", action="store_true", help="rewrite a gate or recall stage file already there")
    parser.add_argument("--retrain-seed", type=int, action="append", default=None,
                        help="counterfactual: only this training order (repeatable; default both)")
    parser.add_argument("--limit", type=int, default=None, help="counterfactual: train at most this many models")
    parser.add_argument("--n-unsafe", type=int, default=None, help="tune: the dose")
    parser.add_argument("--mix-epochs", type=float, default=None, help="tune: the mix's epochs")
    parser.add_argument("--n-erode", type=int, default=None, help="tune: rows of the He et al. tier (default none)")
    parser.add_argument("--corrections", default=None,
                        help="correction: comma-separated rows (default: the factorial, the baselines and "
                             "filter_retrain_bm25 / filter_retrain_<selected>)")
    parser.add_argument("--quiet", action="store_true")


def run_command(ns: argparse.Namespace, root: Path = STAGE_DIR) -> list[Path]:
    """``run``: the stage files written (a stage already committed is skipped unless ``--force``)."""
    from benchmarks.common import shared_data

    missing = [f"--{k}" for k in ("design", "seed", "stage") if getattr(ns, k) is None]
    if missing:
        raise SystemExit(f"run needs {', '.join(missing)}")
    if (ns.n_unsafe is not None or ns.mix_epochs is not None or ns.n_erode is not None) and ns.stage != "tune":
        raise SystemExit("--n-unsafe, --mix-epochs and --n-erode are tuning settings (--stage tune); a chosen "
                         "setting is written into the design's preset (benchmarks/safety_contamination/config.py)")
    if ns.corrections is not None and ns.stage != "correction":
        raise SystemExit("--corrections is for --stage correction")
    if (ns.retrain_seed or ns.limit is not None) and ns.stage != "counterfactual":
        raise SystemExit("--retrain-seed and --limit are for --stage counterfactual")
    run_root = Path(ns.run_dir) if ns.run_dir else default_run_root(ns.design, ns.seed)
    if ns.design == "demo":
        return demo_command(ns, run_root, root)
    preset = suite_preset(ns.design, ns.n_unsafe, ns.mix_epochs, ns.n_erode)
    shared = shared_data(ns.shared, "refusal-direction-harmful-sets")
    if ns.stage == "tune":
        tune_of(ns.design, ns.seed, run_root, shared, preset, root, progress=not ns.quiet)
        return [Path(root) / ns.design / "tuning.json"]
    if ns.stage in ("gate", "recall") and not ns.force and read_stage(root, ns.design, ns.seed, ns.stage):
        print(f"{ns.design} seed {ns.seed} {ns.stage}: already written (--force to redo)", flush=True)
        return []
    if ns.stage == "correction":
        correction_ready(ns, root)
    if ns.stage == "counterfactual":  # its inputs checked before any model is rebuilt
        counterfactual_inputs(root, ns.design, ns.seed, tuple(ns.retrain_seed) if ns.retrain_seed else None)
    run = open_run(ns.design, ns.seed, run_root, shared, preset, progress=not ns.quiet)
    # --force on recall redoes the recall only: a committed gate stands (it needs the safe model, recall does not)
    gate_due = ns.stage == "gate" or (ns.stage == "recall" and not read_stage(root, ns.design, ns.seed, "gate"))
    built = build_models(run, ("impure",) if ns.stage == "recall" and not gate_due else ("safe", "impure"))
    written = []
    if gate_due:
        stage = gate_of(ns.design, run, built)
        earlier = read_stage(root, ns.design, ns.seed, "gate")
        if earlier:  # a refresh loads cached models and answers: the work's own timings are the first run's
            stage["seconds"] = {**stage["seconds"], **earlier.get("seconds", {})}
        written.append(write_stage(root, stage))
    if ns.stage == "recall":
        written.append(write_stage(root, recall_of(ns.design, run, built)))
    if ns.stage == "counterfactual":
        counterfactual_of(ns.design, run, built, root, tuple(ns.retrain_seed) if ns.retrain_seed else None, ns.limit)
        written.append(Path(root) / ns.design / f"seed{ns.seed}_counterfactual.json")
    if ns.stage == "correction":
        written.append(correction_command(ns, run, built, root, shared))
    for path in written:
        print(f"wrote {path}", flush=True)
    return written


def demo_command(ns: argparse.Namespace, run_root: Path, root: Path) -> list[Path]:
    """``run --design demo``: the recall and counterfactual stages (``demo_design``); no gate (planted culprits)."""
    from benchmarks.contamination_suite.demo_design import demo_counterfactual_of, demo_recall_of

    if ns.stage == "counterfactual":
        demo_counterfactual_of(ns.seed, run_root, root, tuple(ns.retrain_seed) if ns.retrain_seed else None,
                               ns.limit, progress=not ns.quiet)
        return [Path(root) / "demo" / f"seed{ns.seed}_counterfactual.json"]
    if ns.stage != "recall":
        raise SystemExit(f"--design demo --stage {ns.stage}: the demo design has recall and counterfactual stages "
                         "(its culprits are planted: no gate, no tuning)")
    if not ns.force and read_stage(root, "demo", ns.seed, "recall"):
        print(f"demo seed {ns.seed} recall: already written (--force to redo)", flush=True)
        return []
    path = write_stage(root, demo_recall_of(ns.seed, run_root, progress=not ns.quiet))
    print(f"wrote {path}", flush=True)
    return [path]


def correction_ready(ns: argparse.Namespace, root: Path) -> None:
    """Refuse a correction before any model is rebuilt (hours when the run directory is gone): a seed it does not
    run on, or a reported seed before the tuning seed's rows exist (their learning rates come from it)."""
    from benchmarks.contamination_suite.correction import CORRECTION_SEEDS, tuned_lrs

    d = DESIGNS[ns.design]
    if ns.seed not in (*d.validation_seeds, *CORRECTION_SEEDS.get(ns.design, ())):
        raise SystemExit(f"{ns.design}: the correction runs on the tuning seed {list(d.validation_seeds)} and the "
                         f"reported seeds {list(CORRECTION_SEEDS.get(ns.design, ()))}, not seed {ns.seed}")
    if ns.seed not in d.validation_seeds:
        tuned_lrs(ns.design, correction_dir(root))


def correction_dir(root: Path) -> Path:
    """Issue 37's stage folder, ``correction_suite/`` beside the contamination suite's stage folder ``root``."""
    return Path(root).parent / "correction_suite"


def correction_command(ns: argparse.Namespace, run, built: dict, root: Path, shared: Path) -> Path:
    """``run --stage correction``: issue 37's rows on this seed (``correction.py``), written to
    ``correction_suite/<design>/seed<S>.json`` beside the suite's stage folder."""
    from benchmarks.contamination_suite.correction import TUNING_ROWS, correction_of, reported_rows

    if ns.corrections:
        wanted = tuple(c.strip() for c in ns.corrections.split(",") if c.strip())
    elif ns.seed in DESIGNS[ns.design].validation_seeds:
        wanted = TUNING_ROWS
    else:
        suite = json.loads(SUITE.read_text()) if SUITE.is_file() else {}
        wanted = reported_rows(ns.design, root, suite.get("default_method"))
    return correction_of(ns.design, run, built, correction_dir(root), wanted, shared, root)
