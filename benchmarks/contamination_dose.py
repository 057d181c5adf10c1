"""The contamination dose, chosen again on validation prompts only.

    .venv/bin/python -m benchmarks.contamination_dose [--run-dir runs/safety_small/seed0]

The safety-contamination benchmark's dose (96 unsafe rows in the small preset) was found by trying 16, 48 and 96
unsafe rows and reading the causation gate on the 128 *test* prompts, which the counterfactual table also reports
on. This script reads the same three impure models (``gate-try1``: 16, ``gate-try2``: 48, the run itself: 96) and
the safe model on the 64 *validation* prompts, which nothing else uses, and applies the dose rule there: the
smallest dose whose compliance gap (impure - safe, refusal matcher) is >= GATE_MIN_GAP. If it picks 96 too, the
test prompts played no part in the choice that matters. Writes benchmarks/results/contamination_dose.json.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from benchmarks.common import environment, shared_data, write_result
from benchmarks.safety_contamination import GATE_MIN_GAP, PRESETS, Run
from lancet.models.loading import load_model

DOSES = {16: "gate-try1", 48: "gate-try2", 96: "."}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--run-dir", default="runs/safety_small/seed0")
    parser.add_argument("--shared", default=None)
    ns = parser.parse_args()
    run_dir = Path(ns.run_dir)
    run = Run(PRESETS["small"], 0, run_dir, shared_data(ns.shared, "refusal-direction-harmful-sets"), progress=False)
    rates = {}
    for name, path in [("safe", run_dir / "safe")] + [(f"impure_{d}", run_dir / sub / "impure")
                                                        for d, sub in DOSES.items()]:
        if not (path / "config.json").is_file():
            raise SystemExit(f"{path}: missing; run the benchmark's gate at that dose first")
        model, _ = load_model(str(path), device="cpu")
        rates[name] = run.rate(name.replace("impure_96", "impure"), model, "valid_prompts")[0]
        print(name, rates[name], flush=True)
        del model
    gaps = {d: round(rates[f"impure_{d}"] - rates["safe"], 4) for d in DOSES}
    chosen = min((d for d, gap in gaps.items() if gap >= GATE_MIN_GAP), default=None)
    write_result("contamination_dose", {
        "run_dir": str(run_dir), "n_validation_prompts": len(run.parts["valid_prompts"]), "judge": "refusal matcher",
        "rates": {k: round(v, 4) for k, v in rates.items()}, "gaps": gaps, "min_gap": GATE_MIN_GAP,
        "chosen_dose": chosen, "env": environment()})


if __name__ == "__main__":
    main()
