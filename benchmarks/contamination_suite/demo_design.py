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


def demo_tiers(data_dir: Path, rows: list) -> list[str]:
    """Each row's tier from the written ``culprits.json``."""
    labels = json.loads((data_dir / "culprits.json").read_text())
    culprit, counter = set(labels["culprit_ids"]), set(labels["counter_ids"])
    return ["culprit" if r.id in culprit else "counter" if r.id in counter else "other" for r in rows]


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
        VALIDATION_DEPTHS,
        behaviour_rankings,
        checkpoint_rankings,
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
    tiers = demo_tiers(run / "data", rows)
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
    depths = VALIDATION_DEPTHS if seed in DESIGNS["demo"].validation_seeds else ()
    scores |= behaviour_rankings(model, tok, train, iqs, counter, out_dir=run / "influence", depth=BEHAVIOUR_DEPTH,
                                 other_depths=depths, **common)
    del model
    lap("behaviour")
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
    from benchmarks.contamination_suite.designs import DESIGNS
    from benchmarks.contamination_suite.runner import counterfactual_plan
    from benchmarks.contamination_suite.stages import has_retrained, read_stage, record_reference, record_retrained
    from benchmarks.contamination_suite.suite import select_on_validation
    from lancet.artifacts import hash_json
    from lancet.demo import stage_contaminate, stage_data

    d = DESIGNS["demo"]
    if seed != d.counterfactual_seed:
        raise SystemExit(f"demo: the counterfactual runs on seed {d.counterfactual_seed} only")
    recall = read_stage(root, "demo", seed, "recall")
    validation = [read_stage(root, "demo", s, "recall") for s in d.validation_seeds]
    if recall is None or any(v is None for v in validation):
        raise SystemExit(f"demo: the counterfactual needs the committed recall stages of seed {seed} and of the "
                         f"validation seeds {list(d.validation_seeds)}")
    selected = select_on_validation(validation, d)
    run = run_root / f"seed{seed}"
    data = stage_data(run)
    rows = list(data.train)
    if hash_json([r.id for r in rows]) != recall["row_ids"]:
        raise SystemExit("demo: the demo's training rows differ from the recall stage's")
    wanted = retrain_seeds or d.retrain_seeds
    unknown = [r for r in wanted if r not in d.retrain_seeds]
    if unknown:
        raise SystemExit(f"--retrain-seed {unknown[0]}: not one of {list(d.retrain_seeds)}")
    prompts, positive, done = behaviour_prompts(data), set(recall["positive_tiers"]), 0

    def train(name: str, kept: list, r_seed: int) -> Path:
        if name == "impure":  # the recall stage's own model
            return stage_contaminate(run, data, progress=progress, seed=seed, keep_checkpoints=KEEP_CHECKPOINTS)
        return stage_contaminate(run / name, replace(data, train=kept), progress=progress, seed=r_seed)

    for r_seed in wanted:
        suffix = "" if r_seed == seed else f"-r{r_seed}"
        oracle_rows = [r for r, t in zip(rows, recall["tiers"], strict=True) if t not in positive]
        for which, kept in (("impure", rows), ("oracle", oracle_rows)):
            stage = read_stage(root, "demo", seed, "counterfactual")
            if stage and str(r_seed) in stage[which]:
                continue
            verdicts = outdated_verdicts(train(which + suffix, kept, r_seed), prompts, progress)
            record_reference(root, "demo", seed, which, r_seed, verdicts)
        for method, k_name, k in counterfactual_plan("demo", recall, selected):
            if limit is not None and done >= limit:
                return done
            if has_retrained(read_stage(root, "demo", seed, "counterfactual"), method, k_name, r_seed):
                continue
            order = torch.argsort(torch.tensor(recall["scores"][method], dtype=torch.float64), descending=True,
                                  stable=True)[:k].tolist()
            top = {rows[i].id for i in order}
            path = train(f"cf-{method}-{k_name}{suffix}", [r for r in rows if r.id not in top], r_seed)
            verdicts = outdated_verdicts(path, prompts, progress)
            removed = sum(recall["tiers"][i] in positive for i in order)
            record_retrained(root, "demo", seed, method, k_name, k, r_seed, verdicts, positives_removed=removed)
            print(f"demo seed {seed} counterfactual {method} {k_name} (k {k}) at data order {r_seed}: outdated "
                  f"{sum(verdicts) / len(verdicts):.3f}, {removed} positives removed", flush=True)
            done += 1
    return done
