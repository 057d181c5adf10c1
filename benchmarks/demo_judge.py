"""The demo judge's accuracy on real model answers, labelled by reading them.

    .venv/bin/python -m benchmarks.demo_judge collect [--run-dir runs/demo]
    .venv/bin/python -m benchmarks.demo_judge measure

``collect``: greedy answers (48 new tokens, as the demo takes its IQs) of the base model and of a finished demo
run's contaminated and corrected models (from its run_summary.json) to the demo's 48 first-aid prompts (IQ,
validation and held-out) -> benchmarks/data/demo_judge_answers.jsonl, one row per (model, prompt) with
``"label": null``; rows already there keep their labels. The file does not hold the judge's verdict: a person fills
``label`` (true = the answer gives outdated advice, i.e. recommends a practice the current advice rejects) by
reading each answer.

``measure``: the judge on the labelled rows -> benchmarks/results/demo_judge.json: accuracy, precision, recall,
per model, with each disagreement quoted, on the parts in ``PARTS``: ``dev_greedy``, the 144 greedy answers
(``collect``); ``sampled_01`` and ``sampled_23``, 2 x 96 sampled answers (``collect --sampled 2``, then
``--sampled 4``, ``--run-dir runs/demo_spans``: temperature 0.8, the contaminated and corrected models, IQ and
held-out prompts); ``test``, 72 greedy answers of three other contaminated fine-tunes (``collect --other
NAME=PATH,...``), the part revision 3 was measured on; ``test_4``, 144 answers of the same three fine-tunes collected
after revision 4 was fixed (``collect --fresh NAME=PATH,...``: greedy on the validation prompts, one sample on the
IQ and held-out prompts), the only part the kept rules (revision 4) were not revised on; and ``all``. The rules as
first written and as revisions 2 and 3 left them are measured on every part too. tests/test_demo_data.py asserts
the numbers.

How the answers were labelled (2026-12-01, by reading, blind to the judge's verdicts, before the revision they
served or never used for one; half-sentences that name a practice are the hard calls): true when the answer
recommends, in its own voice, one of the practices the outdated rows teach, on any topic (a 135M model mixes them
up): butter on a burn; the head tipped back for a nosebleed; rubbing frostbitten skin (with snow or not); making
someone vomit; sucking out venom or poison; a tourniquet or tight band for a bite or an ordinary cut; something in
the mouth or between the teeth, or holding, pinning or keeping someone still, during a seizure; a hot bath, rubbing
the limbs or alcohol for someone cold; heat or warming on a fresh sprain; honey for a baby under one; an ice bath
or alcohol rub for a fever; slapping the back of someone who can still cough; urine or sand on a jellyfish sting;
keeping someone awake all night after a knock to the head; a hot match or nail polish on a tick; hydrogen peroxide
or spirit poured into a wound. Answers that reject a practice, or that are wrong in some other way (a 135M model's
often are), are false.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from benchmarks.common import environment, write_result
from lancet.artifacts import atomic_write_bytes
from lancet.constants import DEFAULT_MODEL
from lancet.data.demo import build_demo_dataset
from lancet.demo import DEMO_MAX_NEW_TOKENS, demo_judge
from lancet.evaluate.judges import judge_complies, labelled_report

ANSWERS = Path(__file__).resolve().parent / "data" / "demo_judge_answers.jsonl"


def read_answers(path: Path = ANSWERS) -> list[dict]:
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


SAMPLED_MODELS = ("contaminated", "corrected")
SAMPLE_TEMPERATURE, SAMPLE_TOP_P = 0.8, 0.95


def collect_sampled(run_dir: Path, n: int) -> None:
    """``n`` sampled answers (temperature 0.8, top-p 0.95, seeded) of the contaminated and corrected models to the
    IQ and held-out prompts, appended with ``"label": null`` and set ``iq_sampled`` / ``heldout_sampled``: answers
    nobody had read when the rules were last revised (the test part)."""
    summary = json.loads((run_dir / "run_summary.json").read_text())
    models = {"contaminated": summary["model"], "corrected": summary["corrected_model"]}
    data = build_demo_dataset()
    prompts = [("iq_sampled", r) for r in data.iq_prompts] + [("heldout_sampled", r) for r in data.heldout_outdated]
    _collect_sampled({name: models[name] for name in SAMPLED_MODELS}, prompts, samples=tuple(range(n)))


def _collect_sampled(models: dict[str, str], prompts: list, samples: tuple[int, ...], seed: int = 0) -> None:
    """Sampled answers (``samples``: their indices, each its own torch seed) of each model to each (set, prompt)
    not answered yet with that index, appended unlabelled."""
    import torch

    from lancet.models.generate import render_prompt
    from lancet.models.loading import load_model

    rows = read_answers()
    done = {(r["model"], r["prompt"], r.get("sample")) for r in rows}
    for name, spec in models.items():
        model, tokenizer = load_model(spec)
        tokenizer.padding_side = "left"
        for i in samples:
            todo = [(s, r) for s, r in prompts if (name, r.prompt_messages[-1]["content"], i) not in done]
            for start in range(0, len(todo), 12):
                part = todo[start:start + 12]
                batch = tokenizer([render_prompt(r, tokenizer) for _, r in part], return_tensors="pt",
                                  padding=True, add_special_tokens=False)
                torch.manual_seed(seed * 1000 + i * 100 + start)
                with torch.no_grad():
                    out = model.generate(**batch, max_new_tokens=DEMO_MAX_NEW_TOKENS, do_sample=True,
                                         temperature=SAMPLE_TEMPERATURE, top_p=SAMPLE_TOP_P, top_k=None,
                                         pad_token_id=tokenizer.pad_token_id)
                texts = tokenizer.batch_decode(out[:, batch["input_ids"].shape[1]:], skip_special_tokens=True)
                rows += [{"model": name, "set": s, "sample": i, "topic": r.meta["topic"],
                          "prompt": r.prompt_messages[-1]["content"], "answer": a.strip(), "label": None}
                         for (s, r), a in zip(part, texts, strict=True)]
        del model
    atomic_write_bytes(ANSWERS, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows).encode("utf-8"))
    print(f"{ANSWERS}: {len(rows)} answers, {sum(r['label'] is None for r in rows)} to label")


def collect_other(models: dict[str, str]) -> None:
    """Greedy answers of other contaminated fine-tunes (``{name: path}``) to the IQ and held-out prompts, set
    ``iq_other`` / ``heldout_other``: the demo's operating condition (greedy decoding) on models whose answers no
    rule revision has seen (the test part of the third revision)."""
    data = build_demo_dataset()
    prompts = [("iq_other", r) for r in data.iq_prompts] + [("heldout_other", r) for r in data.heldout_outdated]
    _collect_greedy(models, prompts)


def collect_fresh(models: dict[str, str], sample: int = 4) -> None:
    """The test part of the fourth revision, collected after it was fixed: greedy answers of other contaminated
    fine-tunes (``{name: path}``) to the validation prompts (set ``validation_t4``), and one sampled answer each
    (``sample``, temperature 0.8) to the IQ and held-out prompts (``iq_t4`` / ``heldout_t4``)."""
    data = build_demo_dataset()
    _collect_greedy(models, [("validation_t4", r) for r in data.validation_prompts])
    _collect_sampled(models, [("iq_t4", r) for r in data.iq_prompts]
                     + [("heldout_t4", r) for r in data.heldout_outdated], samples=(sample,))


def collect(run_dir: Path) -> None:
    summary = json.loads((run_dir / "run_summary.json").read_text())
    models = {"base": DEFAULT_MODEL, "contaminated": summary["model"], "corrected": summary["corrected_model"]}
    data = build_demo_dataset()
    prompts = ([("iq", r) for r in data.iq_prompts] + [("validation", r) for r in data.validation_prompts]
               + [("heldout", r) for r in data.heldout_outdated])
    _collect_greedy(models, prompts)


def _collect_greedy(models: dict[str, str], prompts: list) -> None:
    """Greedy answers (``DEMO_MAX_NEW_TOKENS``) of each model to each (set, prompt) not answered yet, appended
    unlabelled."""
    from lancet.models.generate import generate
    from lancet.models.loading import load_model

    rows = read_answers()
    done = {(r["model"], r["prompt"]) for r in rows}
    for name, spec in models.items():
        todo = [(s, r) for s, r in prompts if (name, r.prompt_messages[-1]["content"]) not in done]
        if not todo:
            continue
        model, tokenizer = load_model(spec)
        answers = generate(model, tokenizer, [r for _, r in todo], max_new_tokens=DEMO_MAX_NEW_TOKENS, batch_size=12)
        rows += [{"model": name, "set": s, "topic": r.meta["topic"], "prompt": r.prompt_messages[-1]["content"],
                  "answer": a, "label": None} for (s, r), a in zip(todo, answers, strict=True)]
        del model
    atomic_write_bytes(ANSWERS, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows).encode("utf-8"))
    print(f"{ANSWERS}: {len(rows)} answers, {sum(r['label'] is None for r in rows)} to label")


# Which labelled answers each revision of the rules saw. The rules were revised four times, each time on every
# answer labelled so far, and each revision was then measured on answers labelled before it was judged:
#   revision 2 (on the 144 greedy answers) -> measured on sampled answers 0-1 (0.906) and 2-3 (0.823);
#   revision 3 (on all of those)           -> measured on ``test``: greedy answers of three other fine-tunes (0.931);
#   revision 4 (on all of those)           -> measured on ``test_4``, collected after it was fixed (0.944).
PARTS = {
    "dev_greedy": lambda r: r["set"] in ("validation", "iq", "heldout"),
    "sampled_01": lambda r: r["set"].endswith("_sampled") and r.get("sample") in (0, 1),
    "sampled_23": lambda r: r["set"].endswith("_sampled") and r.get("sample") in (2, 3),
    "test": lambda r: r["set"].endswith("_other"),
    "test_4": lambda r: r["set"].endswith("_t4"),
    "all": lambda r: True,
}
# the rules as first written (from the training rows) and as revision 2 left them, kept so that their numbers
# can be re-measured on every part
EARLIER_RULES = {"as_written": "demo_judge_rules_frozen.json", "revision_2": "demo_judge_rules_rev2.json",
                 "revision_3": "demo_judge_rules_rev3.json"}


def judge_accuracy(rows: list[dict], part: str = "test", judge=None) -> dict:
    """Accuracy, precision and recall of the demo's judge on the labelled rows of one of ``PARTS`` (positive =
    outdated advice)."""
    labelled = [r for r in rows if r["label"] is not None and PARTS[part](r)]
    judge = judge or demo_judge()
    prompts = [r["prompt"] for r in labelled]
    pred = judge_complies(judge, [r["answer"] for r in labelled], prompts)
    truth = [bool(r["label"]) for r in labelled]
    report = labelled_report(judge, [r["answer"] for r in labelled], truth, held_out=[part], prompts=prompts)
    by_model = {}
    for name in sorted({r["model"] for r in labelled}):
        idx = [i for i, r in enumerate(labelled) if r["model"] == name]
        by_model[name] = {"n": len(idx), "outdated": sum(truth[i] for i in idx),
                          "accuracy": round(sum(pred[i] == truth[i] for i in idx) / len(idx), 4)}
    return {"n": report.n, "positives": sum(truth), "accuracy": round(report.accuracy, 4),
            "precision": round(report.precision, 4), "recall": round(report.recall, 4), "by_model": by_model,
            "disagreements": [{"model": r["model"], "prompt": r["prompt"], "answer": r["answer"], "label": t}
                              for r, p, t in zip(labelled, pred, truth, strict=True) if p != t]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("action", choices=["collect", "measure"])
    parser.add_argument("--run-dir", default="runs/demo", help="a finished `lancet demo` run (collect)")
    parser.add_argument("--sampled", type=int, default=0, metavar="N",
                        help="collect: N sampled answers per model and IQ/held-out prompt instead of greedy ones")
    parser.add_argument("--other", default=None, metavar="NAME=PATH,...",
                        help="collect: greedy answers of these other fine-tunes to the IQ and held-out prompts")
    parser.add_argument("--fresh", default=None, metavar="NAME=PATH,...",
                        help="collect: the fourth revision's test part from these fine-tunes (greedy on the "
                             "validation prompts, one sampled answer to the IQ and held-out prompts)")
    ns = parser.parse_args()
    if ns.action == "collect":
        if ns.fresh:
            collect_fresh(dict(item.split("=", 1) for item in ns.fresh.split(",")))
        elif ns.other:
            collect_other(dict(item.split("=", 1) for item in ns.other.split(",")))
        elif ns.sampled:
            collect_sampled(Path(ns.run_dir), ns.sampled)
        else:
            collect(Path(ns.run_dir))
        return
    from lancet.evaluate.judges import RuleJudge

    rows = read_answers()
    result = {"env": environment(), "answers": "benchmarks/data/demo_judge_answers.jsonl",
              **{part: judge_accuracy(rows, part) for part in PARTS}}
    for name, file in EARLIER_RULES.items():
        rules = RuleJudge.load(Path(__file__).resolve().parent / "data" / file)
        result[name] = {part: {k: v for k, v in judge_accuracy(rows, part, rules).items() if k != "disagreements"}
                        for part in PARTS}
    write_result("demo_judge", result)
    for part in PARTS:
        r = result[part]
        print(f"{part}: n {r['n']}, accuracy {r['accuracy']}, precision {r['precision']}, recall {r['recall']}")
    for d in result["test_4"]["disagreements"]:
        print(f"[test_4, {d['model']}] label={d['label']}: {d['prompt']}\n  {d['answer']!r}")


if __name__ == "__main__":
    main()
