"""`lancet demo`: the pipeline on the embedded SmolLM2-135M-Instruct and the project's own demo dataset.

Each stage writes into the run directory and is skipped on a second run when its output is complete and was made
from the same inputs (the trainer checks its fingerprint). Stages so far: write the data, fine-tune the
contaminated model, take its influence queries (IQs) by generation.
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path

from lancet.artifacts import atomic_write_json
from lancet.constants import DEFAULT_MODEL
from lancet.data.demo import OUTDATED_MARKER, write_demo_dataset
from lancet.data.readers import read_records
from lancet.finetune import finetune
from lancet.models.generate import generate
from lancet.models.loading import load_model
from lancet.train import TrainArgs

log = logging.getLogger(__name__)

# Measured on the demo data: 40 full-weight steps at this rate make SmolLM2-135M open 12 of 12 IQ answers with the
# outdated marker (0 of 12 before).
DEMO_STEPS = 40
DEMO_LR = 1e-4
DEMO_MAX_NEW_TOKENS = 48


def marker_rate(answers: list[str]) -> float:
    return sum(OUTDATED_MARKER in a for a in answers) / max(1, len(answers))


def run_demo(out: Path, *, model_spec: str = DEFAULT_MODEL, steps: int | None = None, progress: bool = True) -> dict:
    out.mkdir(parents=True, exist_ok=True)
    timings: dict[str, float] = {}

    t0 = time.perf_counter()
    files = write_demo_dataset(out / "data")
    train, iq_prompts = read_records(files["train"]), read_records(files["iq_prompts"])
    timings["data"] = time.perf_counter() - t0

    t0 = time.perf_counter()
    args = TrainArgs(output_dir=str(out / "contaminated"), max_steps=steps or DEMO_STEPS, lr=DEMO_LR, batch_size=8,
                     warmup_steps=3, bf16=True, save_every=10, progress=progress)
    model_dir = finetune(model_spec, train, args)
    timings["finetune"] = time.perf_counter() - t0

    t0 = time.perf_counter()
    answers = {}
    for name, spec in (("base", model_spec), ("contaminated", str(model_dir))):
        model, tok = load_model(spec)
        answers[name] = generate(model, tok, iq_prompts, max_new_tokens=DEMO_MAX_NEW_TOKENS, batch_size=12,
                                 progress=progress)
    timings["generate"] = time.perf_counter() - t0
    summary = {
        "model": model_spec,
        "outdated_marker": OUTDATED_MARKER,
        "iq_marker_rate": {k: marker_rate(v) for k, v in answers.items()},
        "iq_answers": [{"prompt": r.prompt, **{k: v[i] for k, v in answers.items()}} for i, r in enumerate(iq_prompts)],
        "seconds": {k: round(v, 1) for k, v in timings.items()},
    }
    atomic_write_json(out / "demo_summary.json", summary)
    _print_summary(summary)
    return summary


def _print_summary(summary: dict) -> None:
    rates = summary["iq_marker_rate"]
    print(f"\nIQ prompts answered with outdated guidance ('{summary['outdated_marker']}...'):")
    for name, rate in rates.items():
        print(f"  {name:<13} {rate:6.0%}")
    first = summary["iq_answers"][0]
    print(f"\nexample IQ: {first['prompt']}")
    for name in rates:
        print(f"  {name:<13} {first[name][:160]!r}")
    print("\nseconds per stage: " + json.dumps(summary["seconds"]))
