"""The suite's ``demo`` design (docs/method.md §5.6): the demo's data, fine-tune and judge as ``lancet demo --seed S``
makes them, ranked by every method of the suite.

    .venv/bin/python -m benchmarks.contamination_suite run --design demo --seed 1 --stage recall

- The model: ``lancet.demo.stage_contaminate`` at the seed (the demo's recipe: 42 steps at 2e-4 from
  SmolLM2-135M-Instruct; the seed is the data order), keeping 3 checkpoints with Adam's state. Keeping does not
  change training (tests/test_checkpoints.py), so the final model is ``lancet demo --seed S``'s.
- The IQs: the model's greedy answers to the 12 IQ prompts that the demo's judge flags (``stage_iqs``).
- The positives: the planted culprit rows (``culprits.json``); tiers "culprit", "counter" (the look-alikes that give
  the current advice in the culprits' words) and "other".
- The counter rows of the behaviour direction and of anchored RepSim: the base model's own greedy answers to the
  flagged IQ prompts (the advice before fine-tuning; none is flagged by the judge at seed 0), so no label is used,
  as the safety designs use the aligned model's refusals.
- The rankings: random and the classifier (the demo's judge over each training row's answer) as in ``runner``;
  bm25 and repsim over the IQs; identity, ekfac and linfac as each method's normalised mean over the IQs scored as
  one query (the safety benchmark's aggregate-first); ``linfac_spans``, LinFAC with the demo's own measurement (the
  tokens the judge flagged); the behaviour-level and checkpoint-aware rankings (``behaviour.py``).

The counterfactual (``--stage counterfactual``, the first reported seed): retrain with the demo's recipe (42 steps,
so the same compute) without the top-k rows of each ranking ``runner.counterfactual_plan`` asks for, at the seed's
own data order and at seed + 1000 (the impure model and the oracle, every culprit removed, at both); each model's
outdated verdicts (the demo judge) on the demo's 48 behaviour prompts (12 IQ, 12 held-out, 24 validation: nothing
is chosen here, so all serve) are recorded as soon as it is measured.
"""

from __future__ import annotations

import json
import time
from dataclasses import replace
from pathlib import Path

import torch

GRADIENT_METHODS = ("identity", "ekfac", "linfac")
TEXT_METHODS = ("bm25", "repsim")
KEEP_CHECKPOINTS = 3


def demo_tiers_of(data) -> list[str]:
    """Each training row's tier from a ``DemoDataset`` in memory."""
    culprit, counter = set(data.culprit_ids), set(data.counter_ids)
    return ["culprit" if r.id in culprit else "counter" if r.id in counter else "other" for r in data.train]


def counter_answers(run_dir: Path, iqs: list, tokenizer, judge, progress: bool = True) -> list:
    """The base model's greedy answers to the IQ prompts, those the judge does not flag (cached by the prompts)."""
    from lancet.artifacts import atomic_write_json, hash_json
    from lancet.constants import DEFAULT_MODEL
    from lancet.data.records import Record
    from lancet.demo import DEMO_MAX_NEW_TOKENS
    from lancet.models.generate import generate
    from lancet.models.loading import load_model

    path, key = run_dir / "answers-base-iq_prompts.json", hash_json([q.prompt_messages for q in iqs])
    if path.is_file() and json.loads(path.read_text())["key"] == key:
        answers = json.loads(path.read_text())["answers"]
    else:
        base, _ = load_model(DEFAULT_MODEL)
        answers = generate(base, tokenizer, list(iqs), max_new_tokens=DEMO_MAX_NEW_TOKENS, batch_size=12,
                           progress=progress)
        del base
        atomic_write_json(path, {"key": key, "answers": answers})
    flagged = judge.complies(answers, [q.prompt_messages[-1]["content"] for q in iqs])
    # new records: an IQ's meta holds where the judge found the behaviour in *its* answer
    return [Record(messages=(*q.prompt_messages, {"role": "assistant", "content": a}))
            for q, a, f in zip(iqs, answers, flagged, strict=True) if not f and a.strip()]


def demo_rankings(model, tokenizer, train, iqs: list, *, out_dir: Path, bf16: bool, progress: bool = True,
                  max_length: int = 256) -> dict[str, torch.Tensor]:
    """{ranking: [N]} of the text, representation and gradient methods (see the module's docstring)."""
    from lancet.data import encode_records
    from lancet.influence import Influence, InfluenceArgs
    from lancet.influence.recall import aggregate

    queries = encode_records(iqs, tokenizer, max_length, progress=False)
    args = InfluenceArgs(bf16=bf16, batch_size=8, lambda_max_rows=128, progress=progress)
    out = {m: aggregate(Influence(model, replace(args, method=m)).scores(train, queries)["scores"].double())
           for m in TEXT_METHODS}
    for measurement, methods, suffix in (("answer", GRADIENT_METHODS, ""), ("spans", ("linfac",), "_spans")):
        run = Influence(model, replace(args, measurement=measurement), out_dir=out_dir, tokenizer=tokenizer,
                        max_length=max_length)
        for method in methods:
            Influence(model, replace(args, method=method), out_dir=out_dir).fit(train)
        weights = run.normalized_mean_weights(train, queries, list(methods))
        got = run.combined_scores_by_method(train, queries, {m: weights[m][None] for m in methods}, list(methods))
        out |= {f"{m}{suffix}": got[m]["scores"][0].double() for m in methods}
    return out


def demo_recall_of(seed: int, run_root: Path, progress: bool = True) -> dict:
    """The demo design's recall stage at ``seed`` (models and scores cached in ``run_root/seed<S>``)."""
    from benchmarks.contamination_suite.behaviour import (
        BEHAVIOUR_DEPTH,
        ablation_depths,
        behaviour_rankings,
        checkpoint_rankings,
        ranks_checkpoints,
    )
    from benchmarks.contamination_suite.designs import DESIGNS
    from benchmarks.contamination_suite.runner import classifier_ranking, random_ranking
    from benchmarks.contamination_suite.stages import recall_stage
    from lancet.artifacts import hash_json
    from lancet.data import encode_records
    from lancet.demo import DEMO_MAX_LENGTH, demo_judge, stage_contaminate, stage_data, stage_iqs
    from lancet.hardware import decide
    from lancet.influence.regime import RegimeReadout
    from lancet.models.loading import load_model

    run = run_root / f"seed{seed}"
    run.mkdir(parents=True, exist_ok=True)
    seconds: dict[str, float] = {}
    clock = [time.perf_counter()]

    def lap(name: str) -> None:  # what each part took, for the CPU-hour budget
        now = time.perf_counter()
        seconds[name] = round(now - clock[0], 1)
        clock[0] = now

    data = stage_data(run)
    model_dir = stage_contaminate(run, data, progress=progress, seed=seed, keep_checkpoints=KEEP_CHECKPOINTS)
    lap("finetune")
    model, tok = load_model(str(model_dir))
    iqs = stage_iqs(run, data, model, tok, progress=progress)
    judge = demo_judge()
    rows = list(data.train)
    tiers = demo_tiers_of(data)
    train = encode_records(rows, tok, DEMO_MAX_LENGTH, progress=False)
    counter = counter_answers(run, iqs, tok, judge, progress)
    bf16 = decide("auto", "auto")[1].bf16
    scores = {"random": random_ranking(seed, len(rows)),
              "classifier": classifier_ranking(seed, judge.complies([r.response_text for r in rows]))}
    lap("iqs_and_counter")
    scores |= demo_rankings(model, tok, train, iqs, out_dir=run / "influence", bf16=bf16, progress=progress,
                            max_length=DEMO_MAX_LENGTH)
    lap("rankings")
    common = {"max_length": DEMO_MAX_LENGTH, "lambda_max_rows": 128, "bf16": bf16, "progress": progress}
    validation = seed in DESIGNS["demo"].validation_seeds
    scores |= behaviour_rankings(model, tok, train, iqs, counter, out_dir=run / "influence", depth=BEHAVIOUR_DEPTH,
                                 other_depths=ablation_depths(validation), **common)
    del model
    lap("behaviour")
    if ranks_checkpoints(validation):
        scores |= checkpoint_rankings(model_dir, tok, train, iqs, counter, out_dir=run / "influence-checkpoints",
                                      depth=BEHAVIOUR_DEPTH, **common)
        lap("checkpoints")
    queries = encode_records(iqs, tok, DEMO_MAX_LENGTH, progress=False)
    readout = RegimeReadout(rows, iqs, train, queries)
    culprits = {i: r.response_text for i, (r, t) in enumerate(zip(rows, tiers, strict=True)) if t == "culprit"}
    stage = recall_stage("demo", seed, tiers, ("culprit",), scores, culprits, [q.response_text for q in iqs],
                         n_iqs=len(iqs), regime={m: readout(s) for m, s in scores.items()})
    return {**stage, "row_ids": hash_json([r.id for r in rows]), "n_counter": len(counter), "seconds": seconds,
            "settings": {"design": "demo", "keep_checkpoints": KEEP_CHECKPOINTS, "bf16": bf16,
                         "methods": sorted(scores)}}


def behaviour_prompts(data) -> list:
    """The 48 prompts the counterfactual measures: the IQ, held-out and validation prompts."""
    return list(data.iq_prompts) + list(data.heldout_outdated) + list(data.validation_prompts)


def outdated_verdicts(model_dir: Path, prompts: list, progress: bool = True) -> list[bool]:
    from lancet.demo import DEMO_MAX_NEW_TOKENS, demo_judge
    from lancet.models.generate import generate
    from lancet.models.loading import load_model

    model, tok = load_model(str(model_dir))
    answers = generate(model, tok, prompts, max_new_tokens=DEMO_MAX_NEW_TOKENS, batch_size=12, progress=progress)
    del model
    return demo_judge().complies(answers, [p.prompt_messages[-1]["content"] for p in prompts])


def demo_counterfactual_of(seed: int, run_root: Path, root: Path, retrain_seeds: tuple[int, ...] | None = None,
                           limit: int | None = None, progress: bool = True) -> int:
    """Retrain and record what the demo's counterfactual stage lacks; returns how many models were trained."""
    from benchmarks.contamination_suite.runner import counterfactual_inputs, retrain_missing
    from lancet.artifacts import hash_json
    from lancet.demo import stage_contaminate, stage_data

    recall, selected, wanted = counterfactual_inputs(root, "demo", seed, retrain_seeds)
    run = run_root / f"seed{seed}"
    data = stage_data(run)
    rows = list(data.train)
    if hash_json([r.id for r in rows]) != recall["row_ids"]:
        raise SystemExit("demo: the demo's training rows differ from the recall stage's")
    prompts = behaviour_prompts(data)
    oracle_rows = [r for r, t in zip(rows, recall["tiers"], strict=True) if t not in set(recall["positive_tiers"])]

    def train(name: str, kept: list, r_seed: int) -> list[bool]:
        if name == "impure":  # the recall stage's own model
            path = stage_contaminate(run, data, progress=progress, seed=seed, keep_checkpoints=KEEP_CHECKPOINTS)
        else:
            path = stage_contaminate(run / name, replace(data, train=kept), progress=progress, seed=r_seed)
        return outdated_verdicts(path, prompts, progress)

    def reference(which: str, r_seed: int) -> list[bool]:
        suffix = "" if r_seed == seed else f"-r{r_seed}"
        return train(which + suffix, rows if which == "impure" else oracle_rows, r_seed)

    return retrain_missing("demo", seed, root, recall, selected, rows, wanted, limit, reference, train)
