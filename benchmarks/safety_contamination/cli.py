"""The command line (``python -m benchmarks.safety_contamination``; the design is the package's docstring), and the
options and opening of one seed's run that the other safety scripts share."""

from __future__ import annotations

import argparse
import json
import time
from dataclasses import asdict
from pathlib import Path

from benchmarks.common import shared_data, write_result
from benchmarks.safety_contamination import config
from benchmarks.safety_contamination.config import (
    PRESETS,
    Preset,
    restrict_corrections,
    restrict_recall,
    run_environment,
    run_precision,
)
from benchmarks.safety_contamination.pipeline import run_seed, stage_plan, summarize
from benchmarks.safety_contamination.run import Run


def seed_arguments(parser: argparse.ArgumentParser, default_seed: int) -> None:
    """The options of a script that reads one seed of a run (``open_seed``)."""
    parser.add_argument("--preset", default="full", choices=sorted(PRESETS))
    parser.add_argument("--seed", type=int, default=default_seed)
    parser.add_argument("--run-dir", default=None, help="default runs/safety_<preset>")
    parser.add_argument("--shared", default=None, help="default ../shared/data")
    parser.add_argument("--quiet", action="store_true")


def open_seed(ns: argparse.Namespace) -> tuple[Preset, Path, Run]:
    """(preset, run directory, the seed's Run) for ``seed_arguments``' options, at the run directory's pinned
    precision."""
    preset = PRESETS[ns.preset]
    shared = shared_data(ns.shared, "refusal-direction-harmful-sets")
    run_dir = Path(ns.run_dir or f"runs/safety_{ns.preset}")
    config.BF16 = run_precision(run_dir)
    return preset, run_dir, Run(preset, ns.seed, run_dir / f"seed{ns.seed}", shared, progress=not ns.quiet)


def main() -> None:
    import benchmarks.safety_contamination as package  # its docstring is the design this runs

    parser = argparse.ArgumentParser(prog="python -m benchmarks.safety_contamination", description=package.__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="small", choices=sorted(PRESETS))
    parser.add_argument("--run-dir", default=None, help="default runs/safety_<preset>")
    parser.add_argument("--shared", default=None, help="default ../shared/data")
    parser.add_argument("--seeds", default=None, help="comma-separated subset of the preset's seeds")
    parser.add_argument("--stage", default="recall",
                        choices=("aligned", "gate", "recall", "counterfactual", "correction"),
                        help="stop after this stage (recall runs on every seed first; the counterfactual retraining "
                             "and the correction table on the preset's first seed)")
    parser.add_argument("--skip-counterfactual", action="store_true",
                        help="with --stage correction: do not (re)run the counterfactual retraining first (an "
                             "earlier run's counterfactual numbers, if any, are kept in the result)")
    parser.add_argument("--late-seed", type=int, default=None,
                        help="the seed of the counterfactual and correction stages (default: the preset's first; "
                             "seed 0's run directory was lost once, and rebuilding it costs about 2 h)")
    parser.add_argument("--recall-methods", default=None,
                        help="comma-separated: rank with only these of the preset's methods (plain rankings); the "
                             "others keep the seed's earlier numbers (to rebuild a lost run directory for a late "
                             "stage without the whole recall)")
    parser.add_argument("--corrections", default=None,
                        help="comma-separated: run only these correction rows, in this order (the others already "
                             "measured stay in the table)")
    parser.add_argument("--quiet", action="store_true")
    ns = parser.parse_args()
    preset = PRESETS[ns.preset]
    run_preset = restrict_recall(preset, tuple(ns.recall_methods.split(","))) if ns.recall_methods else preset
    if ns.corrections:
        run_preset = restrict_corrections(run_preset, tuple(ns.corrections.split(",")))
    shared = shared_data(ns.shared, "refusal-direction-harmful-sets")
    run = Path(ns.run_dir or f"runs/safety_{ns.preset}")
    seeds = tuple(int(s) for s in ns.seeds.split(",")) if ns.seeds else preset.seeds
    config.BF16 = run_precision(run)
    t0 = time.perf_counter()
    for seed, stage in stage_plan(seeds, preset.seeds[0] if ns.late_seed is None else ns.late_seed, ns.stage,
                                   ns.skip_counterfactual):
        run_seed(run_preset, seed, run / f"seed{seed}", shared, stage, progress=not ns.quiet)
        per_seed = [json.loads((run / f"seed{s}" / "result.json").read_text()) for s in preset.seeds
                    if (run / f"seed{s}" / "result.json").is_file()]
        write_result(f"safety_contamination_{ns.preset}",
                     {"preset": ns.preset, "settings": asdict(preset), "stage": ns.stage,
                      "seeds": [s["seed"] for s in per_seed], "env": run_environment(run, config.BF16),
                      "bf16": config.BF16,
                      "seconds": round(time.perf_counter() - t0, 1), **summarize(per_seed), "per_seed": per_seed})
