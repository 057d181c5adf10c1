"""``python -m benchmarks.contamination_suite {write,import-lexical,run,write-correction,backfill-verdicts}`` (the
package docstring says what each does; ``run``: benchmarks/contamination_suite/runner.py; ``write-correction``:
issue 37's correction_suite.json from the committed correction stages, benchmarks/contamination_suite/correction.py;
``backfill-verdicts --design D --seed S [--run-dir R]``: the per-prompt verdicts of that stage file's rows
measured before rows carried them, from the run directory's metrics files; ``pairs --design D --seed S``: each
factorial cell's actual IBO pairs on that seed, from its run directory, contamination_suite/composition.py)."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from benchmarks.common import RESULTS
from benchmarks.contamination_suite.runner import add_arguments, default_run_root, run_command
from benchmarks.contamination_suite.stages import STAGE_DIR, from_committed, read_stage, write_stage
from benchmarks.contamination_suite.suite import SUITE, build_suite, write_suite
from lancet.artifacts import atomic_write_json


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.contamination_suite")
    parser.add_argument("command", choices=("write", "import-lexical", "run", "write-correction",
                                                   "backfill-verdicts", "pairs"))
    parser.add_argument("--stages", default=str(STAGE_DIR), help="the stage files' folder")
    parser.add_argument("--out", default=str(SUITE))
    add_arguments(parser)  # run's options
    ns = parser.parse_args(argv)
    root = Path(ns.stages)
    if ns.command == "run":
        run_command(ns, root)
        return
    if ns.command == "write-correction":
        from benchmarks.contamination_suite.correction import CORRECTION_SUITE, build_correction_suite

        result = build_correction_suite()
        atomic_write_json(CORRECTION_SUITE, result)
        print(f"wrote {CORRECTION_SUITE}: {sorted(result['designs'])} complete; pending {sorted(result['pending'])}")
        return
    if ns.command == "backfill-verdicts":
        from benchmarks.contamination_suite.correction import CORRECTION_DIR, backfill_verdicts

        if ns.design is None or ns.seed is None:
            parser.error("backfill-verdicts needs --design and --seed")
        path = CORRECTION_DIR / ns.design / f"seed{ns.seed}.json"
        run_root = Path(ns.run_dir) if ns.run_dir else default_run_root(ns.design, ns.seed)
        filled = backfill_verdicts(path, run_root / f"seed{ns.seed}")
        print(f"{path}: verdicts filled in for {', '.join(filled) or 'no row (all had them)'}")
        return
    if ns.command == "pairs":
        from benchmarks.contamination_suite.composition import weighted_pairs
        from benchmarks.contamination_suite.correction import CORRECTION_DIR
        from benchmarks.safety_contamination.config import Preset

        if ns.design is None or ns.seed is None:
            parser.error("pairs needs --design and --seed")
        recall = read_stage(root, ns.design, ns.seed, "recall")
        run_root = Path(ns.run_dir) if ns.run_dir else default_run_root(ns.design, ns.seed)
        result = weighted_pairs(run_root / f"seed{ns.seed}", ns.seed, tuple(recall["positive_tiers"]),
                                Preset.max_length)
        if result["row_ids"] != recall.get("row_ids"):
            raise SystemExit(f"{run_root}/seed{ns.seed}: its rows are not the committed recall stage's")
        path = CORRECTION_DIR / ns.design / f"seed{ns.seed}_pairs.json"
        atomic_write_json(path, result)
        print(f"wrote {path}")
        return
    if ns.command == "import-lexical":
        result = json.loads((RESULTS / "safety_contamination_full.json").read_text())
        for stage in from_committed(result, "lexical"):
            if read_stage(root, stage["design"], stage["seed"], stage["stage"]) is None:  # never overwrite a run's
                print(f"wrote {write_stage(root, stage)}")
        return
    suite = build_suite(root)
    write_suite(suite, Path(ns.out))
    print(f"wrote {ns.out}: {sorted(suite['designs'])} complete; pending {sorted(suite['pending'])}")


if __name__ == "__main__":
    main()
