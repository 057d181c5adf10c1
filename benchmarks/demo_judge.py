"""The demo judge's accuracy on real model answers, labelled by reading them.

    .venv/bin/python -m benchmarks.demo_judge collect [--run-dir runs/demo]
    .venv/bin/python -m benchmarks.demo_judge measure

``collect``: greedy answers (48 new tokens, as the demo takes its IQs) of the base model and of a finished demo
run's contaminated and corrected models (from its run_summary.json) to the demo's 48 first-aid prompts (IQ,
validation and held-out) -> benchmarks/data/demo_judge_answers.jsonl, one row per (model, prompt) with
``"label": null``; rows already there keep their labels. The file does not hold the judge's verdict: a person fills
``label`` (true = the answer gives outdated advice, i.e. recommends a practice the current advice rejects) by
reading each answer.

``measure``: the judge on every labelled row -> benchmarks/results/demo_judge.json: accuracy, precision, recall,
per model, with each disagreement quoted. tests/test_demo_data.py asserts the same accuracy.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from benchmarks.common import environment, write_result
from lancet.artifacts import atomic_write_bytes
from lancet.constants import DEFAULT_MODEL
from lancet.data.demo import build_demo_dataset, demo_judge
from lancet.demo import DEMO_MAX_NEW_TOKENS

ANSWERS = Path(__file__).resolve().parent / "data" / "demo_judge_answers.jsonl"


def read_answers(path: Path = ANSWERS) -> list[dict]:
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def collect(run_dir: Path) -> None:
    from lancet.models.generate import generate
    from lancet.models.loading import load_model

    summary = json.loads((run_dir / "run_summary.json").read_text())
    models = {"base": DEFAULT_MODEL, "contaminated": summary["model"], "corrected": summary["corrected_model"]}
    data = build_demo_dataset()
    prompts = ([("iq", r) for r in data.iq_prompts] + [("validation", r) for r in data.validation_prompts]
               + [("heldout", r) for r in data.heldout_outdated])
    rows = read_answers()
    done = {(r["model"], r["prompt"]) for r in rows}
    for name, spec in models.items():
        todo = [(s, r) for s, r in prompts if (name, r.prompt_messages[-1]["content"]) not in done]
        if not todo:
            continue
        model, tokenizer = load_model(spec)
        answers = generate(model, tokenizer, [r for _, r in todo],
                           max_new_tokens=DEMO_MAX_NEW_TOKENS, batch_size=12)
        rows += [{"model": name, "set": s, "topic": r.meta["topic"], "prompt": r.prompt_messages[-1]["content"],
                  "answer": a, "label": None} for (s, r), a in zip(todo, answers, strict=True)]
        del model
    atomic_write_bytes(ANSWERS, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows).encode("utf-8"))
    print(f"{ANSWERS}: {len(rows)} answers, {sum(r['label'] is None for r in rows)} to label")


def judge_accuracy(rows: list[dict]) -> dict:
    """Accuracy, precision and recall of the demo's judge on labelled rows (positive = outdated advice)."""
    labelled = [r for r in rows if r["label"] is not None]
    pred = demo_judge().complies([r["answer"] for r in labelled])
    truth = [bool(r["label"]) for r in labelled]
    tp = sum(p and t for p, t in zip(pred, truth, strict=True))
    fp = sum(p and not t for p, t in zip(pred, truth, strict=True))
    fn = sum(t and not p for p, t in zip(pred, truth, strict=True))
    by_model = {}
    for name in sorted({r["model"] for r in labelled}):
        idx = [i for i, r in enumerate(labelled) if r["model"] == name]
        by_model[name] = {"n": len(idx), "outdated": sum(truth[i] for i in idx),
                          "accuracy": round(sum(pred[i] == truth[i] for i in idx) / len(idx), 4)}
    return {"n": len(labelled), "positives": sum(truth),
            "accuracy": round(sum(p == t for p, t in zip(pred, truth, strict=True)) / max(len(labelled), 1), 4),
            "precision": round(tp / max(tp + fp, 1), 4), "recall": round(tp / max(tp + fn, 1), 4),
            "by_model": by_model,
            "disagreements": [{"model": r["model"], "prompt": r["prompt"], "answer": r["answer"], "label": t}
                              for r, p, t in zip(labelled, pred, truth, strict=True) if p != t]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("action", choices=["collect", "measure"])
    parser.add_argument("--run-dir", default="runs/demo", help="a finished `lancet demo` run (collect)")
    ns = parser.parse_args()
    if ns.action == "collect":
        collect(Path(ns.run_dir))
        return
    result = {"env": environment(), "answers": str(ANSWERS.relative_to(Path.cwd().resolve()))
              if ANSWERS.is_relative_to(Path.cwd().resolve()) else str(ANSWERS), **judge_accuracy(read_answers())}
    write_result("demo_judge", result)
    print(json.dumps({k: v for k, v in result.items() if k != "disagreements"}, indent=1))
    for d in result["disagreements"]:
        print(f"[{d['model']}] label={d['label']}: {d['prompt']}\n  {d['answer']!r}")


if __name__ == "__main__":
    main()
