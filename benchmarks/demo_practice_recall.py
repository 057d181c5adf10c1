"""Per-IQ recall on the demo: for each IQ, the culprits of the practice it shows, not all 84.

    .venv/bin/python -m benchmarks.demo_practice_recall --run demo_out

The demo's AP counts all 84 culprit rows for every IQ, yet each IQ shows one or two practices (a 135M model also
gives them on the wrong topic: "get them into a hot bath" for a snake bite). Here each IQ's own score row (the
stored per-IQ scores of every ranking in the run: linfac, repsim, bm25) is scored against the culprits that teach
the practice the IQ shows: the rule judge's cues that fire in the IQ (with its prompt) name the practice, and a
culprit teaches it when the same cue fires in it. An IQ whose cue fires in no culprit is left out. Reads only the
run directory (no model is run). Writes benchmarks/results/demo_practice_recall.json.

Two definitions of "the culprits of the practice", both reported because both were tried, after the aggregate AP
had been seen: ``cue`` (the culprits in which one of the IQ's cues fires: that exact practice) and ``topic`` (every
culprit of the topics those culprits belong to: a topic's rows teach one practice in several parts, e.g. a hot
bath, rubbing the limbs and brandy for hypothermia). Six IQs: a diagnosis, not a result.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from benchmarks.common import environment, write_result
from lancet.artifacts import load_tensors
from lancet.data.demo import build_demo_dataset
from lancet.data.readers import read_records
from lancet.evaluate.judges import RuleJudge
from lancet.influence.recall import average_precision


def cue_indices(judge: RuleJudge, text: str, prompt: str) -> set[int]:
    """Indices of the judge's cues that count in ``text`` (answer to ``prompt``)."""
    out = set()
    for i, (cue, when) in enumerate(judge.cues):
        one = RuleJudge([(cue.pattern, when.pattern if when else None)], [n.pattern for n in judge.negations],
                        [d.pattern for d in judge.debunk])
        if one.cue_hits(text, prompt):
            out.add(i)
    return out


def practice_recall(run: Path) -> dict:
    judge = RuleJudge.load(run / "data" / "judge_rules.json")
    train = read_records(run / "data" / "train.jsonl")
    iqs = read_records(run / "iqs.jsonl")
    culprits = set(json.loads((run / "data" / "culprits.json").read_text())["culprit_ids"])
    prompt = lambda r: r.prompt_messages[-1]["content"]  # noqa: E731
    teaches = {r.id: cue_indices(judge, r.response_text, prompt(r)) for r in train if r.id in culprits}
    topic = {r.id: r.meta.get("topic") for r in build_demo_dataset().train}
    methods = sorted(p.name[len("ranking-"):-len(".safetensors")] for p in run.glob("ranking-*.safetensors"))
    scores = {m: load_tensors(run / f"ranking-{m}.safetensors")["scores"].double() for m in methods}
    out: dict = {"run": str(run), "n_iqs": len(iqs), "env": environment()}
    for by in ("cue", "topic"):
        rows = []
        for qi, q in enumerate(iqs):
            cues = cue_indices(judge, q.response_text, prompt(q))
            shown = [r.id for r in train if r.id in culprits and teaches[r.id] & cues]
            topics = {topic[i] for i in shown}
            positives = torch.tensor([r.id in shown if by == "cue" else (r.id in culprits and topic[r.id] in topics)
                                      for r in train])
            if not positives.any():
                continue
            rows.append({"iq_topic": q.meta.get("topic"), "answer": q.response_text[:120],
                         "practice_topics": sorted(topics), "n_positives": int(positives.sum()),
                         "ap": {m: round(average_precision(scores[m][qi], positives), 4) for m in methods}})
        mean = {m: round(sum(r["ap"][m] for r in rows) / len(rows), 4) for m in methods} if rows else {}
        wins = {m: sum(all(r["ap"][m] >= r["ap"][o] for o in methods) for r in rows) for m in methods}
        out[by] = {"n_scored": len(rows), "mean_ap": mean, "best_on": wins, "per_iq": rows}
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--run", default="demo_out", help="a finished `lancet demo` run directory")
    parser.add_argument("--name", default="demo_practice_recall")
    ns = parser.parse_args()
    result = practice_recall(Path(ns.run))
    write_result(ns.name, result)


if __name__ == "__main__":
    main()
