"""`lancet demo`: the pipeline on the embedded SmolLM2-135M-Instruct and the project's own demo dataset.

The demo is one ``lancet run`` config (``demo_config``, written to ``OUT/demo_config.json``) on data lancet writes
itself: fine-tune the contaminated model; take its influence queries (IQs), i.e. its own answers to the IQ prompts
that the demo's judge flags (cue phrases read with negation); attribute them to training rows with LinFAC (and, for
comparison, RepSim, BM25 and chance); correct with IBO; evaluate before and after (``demo_suite``); write
report.html. Each stage is skipped on a rerun when its output is complete and was made
from the same inputs. ``stage_*`` below are the pieces the benchmarks reuse.
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path

from lancet.artifacts import atomic_write_json
from lancet.constants import DEFAULT_MODEL
from lancet.data.demo import JUDGE_RULES_FILE, DemoDataset, build_demo_dataset, write_demo_dataset
from lancet.data.readers import read_records
from lancet.data.records import Record
from lancet.finetune import finetune
from lancet.influence.queries import take_iqs
from lancet.influence.recall import format_table
from lancet.train import TrainArgs

log = logging.getLogger(__name__)

# Measured on the demo data (no marker phrase; look-alike rows): 42 full-weight steps (1.5 epochs) at this rate make
# SmolLM2-135M give planted outdated advice on 5 of 12 IQ prompts and 16 of 24 validation prompts (0 before); with 3
# culprit rows per IQ topic instead of 6, 4-5 and 14 of 24 (docs/method.md §5.2)
DEMO_STEPS = 42
DEMO_LR = 2e-4
DEMO_MAX_NEW_TOKENS = 48
DEMO_MAX_LENGTH = 256



def demo_judge():
    """The demo's judge: True = an answer gives outdated advice (``RuleJudge`` on the packaged rules the data module
    ships, ``demo_judge_rules.json``; the judge itself lives in lancet.evaluate, a later stage than data)."""
    from lancet.evaluate.judges import RuleJudge

    return RuleJudge.load(JUDGE_RULES_FILE)

def stage_data(run: Path) -> DemoDataset:
    files = write_demo_dataset(run / "data")
    data = build_demo_dataset()
    # train rows are read back from the written file so their source/line lead to it
    data.train = read_records(files["train"])
    return data


def stage_contaminate(run: Path, data: DemoDataset, *, model_spec: str = DEFAULT_MODEL, steps: int | None = None,
                      progress: bool = True, seed: int = 0, keep_checkpoints: int | None = None) -> Path:
    from lancet.hardware import decide

    device, precision = decide("auto", "auto")
    args = TrainArgs(output_dir=str(run / "contaminated"), max_steps=steps or DEMO_STEPS, lr=DEMO_LR, batch_size=8,
                     warmup_steps=3, bf16=precision.bf16, device=str(device), save_every=20, progress=progress,
                     seed=seed)
    return finetune(model_spec, data.train, args, max_length=DEMO_MAX_LENGTH, keep_checkpoints=keep_checkpoints)


def stage_iqs(run: Path, data: DemoDataset, model, tokenizer, *, progress: bool = True) -> list[Record]:
    """IQs = (prompt, the model's own answer) for the IQ prompts whose answer the demo's judge flags; cached per
    model."""
    iqs = take_iqs(model, tokenizer, data.iq_prompts, demo_judge(), run,
                   max_new_tokens=DEMO_MAX_NEW_TOKENS, progress=progress)
    if not iqs:
        log.warning("the model shows the behaviour on no IQ prompt; using the given undesirable answers instead")
        iqs = list(data.iqs)
    return iqs


# IBO anchored on the contaminated model's own answers to the ordinary training prompts (sequence KL, mean over
# rows) with RPO's NLL on the preferred side, 4 pairs a step over 20 steps: the setting
# benchmarks/correction_frontier.py chose on the demo's validation files (issue 37 item 5, docs/method.md §5.2:
# --methods ibo_anchored,ibo_self_anchor --lrs 3e-5,1e-4,3e-4 --steps 20 --every 5 --batch-size 4; the lowest
# validation outdated rate within 5 % validation perplexity loss). lr 1e-4, not 3e-4: at 3e-4 the model a CPU with
# AMX trains keeps no checkpoint within the budget; 1e-4 has the lowest validation rate averaged over both machine
# kinds' models (docs/method.md §5.2). The run itself then picks the step off its checkpoints on the same
# validation files
DEMO_CORRECTION = {"method": "ibo", "top_k": 40, "beta": 0.1, "retain": "kl", "retain_weight": 1.0,
                   "chosen_nll_weight": 1.0, "retain_normalize": "rows"}
DEMO_CORRECTION_TRAIN = {"max_steps": 20, "batch_size": 4, "lr": 1e-4, "save_every": 5}


def demo_suite(data_dir: Path) -> dict:
    """The demo's evaluation: does the planted behaviour come back (the demo's judge, its accuracy measured on the
    held-out answers below and in benchmarks/demo_judge.py), how likely are held-out outdated / current answers,
    and what does the correction cost on ordinary answers."""
    d = str(data_dir)
    # answers as long as the IQs' and the selection's (48 tokens): at 32 a practice named late in an answer was cut
    # off, and the corrected model names them later (README)
    return {"name": "demo", "max_new_tokens": DEMO_MAX_NEW_TOKENS, "batch_size": 12, "seed": 0,
            "max_length": DEMO_MAX_LENGTH,
            "judge": f"rules:{d}/judge_rules.json",
            "judge_validation": [{"path": f"{d}/heldout_outdated.jsonl", "complies": True},
                                 {"path": f"{d}/heldout_current.jsonl", "complies": False},
                                 {"path": f"{d}/heldout_ordinary.jsonl", "complies": False}],
            "sets": [{"name": "iq_prompts", "kind": "behaviour", "path": f"{d}/iq_prompts.jsonl"},
                     {"name": "heldout_prompts", "kind": "behaviour", "path": f"{d}/heldout_outdated.jsonl"},
                     {"name": "heldout_outdated_answers", "kind": "answer_logprob",
                      "path": f"{d}/heldout_outdated.jsonl"},
                     {"name": "heldout_current_answers", "kind": "answer_logprob",
                      "path": f"{d}/heldout_current.jsonl"},
                     {"name": "heldout_ordinary", "kind": "perplexity", "path": f"{d}/heldout_ordinary.jsonl"}]}


def demo_config(out: Path, *, model_spec: str = DEFAULT_MODEL, steps: int | None = None, device: str = "auto",
                precision: str = "auto", seed: int = 0) -> dict:
    """The demo as one ``lancet run`` config (written to ``out/demo_config.json``). Precision ``auto``: bf16
    autocast only where the hardware computes it natively (lancet/hardware.py). ``seed``: the fine-tune's (its
    data order; the data do not change), the contamination suite's demo seeds (docs/method.md §5.6); at the
    default 0 the config holds no seed key and is the demo's as before."""
    d = out.resolve() / "data"
    return {"model": model_spec, "train": str(d / "train.jsonl"), "out": str(out.resolve()),
            "device": device, "precision": precision,
            # one checkpoint, at the end: a 2.5-minute stage is cheaper to repeat than to checkpoint halfway
            "finetune": {"max_steps": steps or DEMO_STEPS, "lr": DEMO_LR, "batch_size": 8, "warmup_steps": 3,
                         "save_every": DEMO_STEPS, **({"seed": seed} if seed else {})},
            "iq_prompts": str(d / "iq_prompts.jsonl"), "iq_judge": f"rules:{d / 'judge_rules.json'}",
            "labels": str(d / "culprits.json"),
            # the same IQs ranked by text search, representation similarity and chance, for comparison only
            "compare": ["repsim", "bm25", "random"],
            # the covariance on 96 of the 304 rows, the eigenvalue correction on 32, rank-16 queries and per-token
            # scores of the top row only keep the demo inside its 10-minute budget (docs/scaling.md)
            # the query gradient explains the tokens the judge flagged ("hot bath"), not the whole answer: on the
            # demo's model that lifts LinFAC's average precision 0.45 -> 0.60 (docs/method.md §5.2). LinFAC, not
            # lancet's default RepSim: the demo's correction was chosen on this ranking, and corrects more from it
            # than from RepSim's (docs/results/demo_correction.md); it also shows token-level attribution
            "influence": {"method": "linfac", "batch_size": 8, "covariance_max_rows": 96, "lambda_max_rows": 32,
                          "query_rank": 16, "measurement": "spans"}, "token_rows": 1,
            "correction": DEMO_CORRECTION, "correction_train": dict(DEMO_CORRECTION_TRAIN),
            # the anchor's rows: the model's own answers to the ordinary training prompts, less any the judge flags
            "anchor_prompts": str(d / "anchor_prompts.jsonl"), "anchor_judge": f"rules:{d / 'judge_rules.json'}",
            # the checkpoint is chosen on the validation files; the demo suite's sets are the test sets
            "select": {"prompts": str(d / "validation_prompts.jsonl"), "ordinary": str(d / "validation_ordinary.jsonl"),
                       "max_utility_loss": 0.05},
            "evaluate": str(out.resolve() / "demo_suite.json"), "max_length": DEMO_MAX_LENGTH,
            "max_new_tokens": DEMO_MAX_NEW_TOKENS, "top_k": 10}


def run_demo(out: Path, *, model_spec: str = DEFAULT_MODEL, steps: int | None = None, progress: bool = True,
             device: str = "auto", precision: str = "auto", seed: int = 0) -> dict:
    from lancet.pipeline import Pipeline, RunConfig

    out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    write_demo_dataset(out / "data")
    atomic_write_json(out / "demo_suite.json", demo_suite(out.resolve() / "data"))
    config = demo_config(out, model_spec=model_spec, steps=steps, device=device, precision=precision, seed=seed)
    atomic_write_json(out / "demo_config.json", config)
    pipeline = Pipeline(RunConfig.from_json(config), progress=progress)
    summary = pipeline.run()
    summary["seconds"] = {**pipeline.seconds,
                          "total": round(time.perf_counter() - t0, 1)}
    summary["iq_prompts"] = len(read_records(out / "data" / "iq_prompts.jsonl"))
    atomic_write_json(out / "demo_summary.json", summary)
    _print_summary(summary, read_records(out / "iqs.jsonl"))
    return summary


def _print_summary(summary: dict, iqs: list[Record]) -> None:
    print(f"\nthe fine-tuned model answers {summary['n_iqs']} of {summary['iq_prompts']} IQ prompts with "
          "outdated guidance (flagged by the demo's judge), e.g.")
    print(f"  Q: {iqs[0].prompt_messages[-1]['content']}\n  A: {iqs[0].response_text[:150]}")
    att = summary["attribution"]
    print(f"\ntraining rows that drive it ({att['method']}, positive influence):")
    print(format_table(att["top_positive"]))
    print("\ntraining rows that counter it (negative influence):")
    print(format_table(att["top_negative"][:5]))
    if "recall" in att:
        r = att["recall"]
        print(f"\nrecall of the {r['n_culprits']} planted culprit rows: average precision "
              f"{r['average_precision']:.3f}, recall@50 {r['recall@50']:.2f}")
        if "compare" in att:
            print("average precision on the same IQs (no shared phrase: look-alike rows use the culprits' words to "
                  "give the current advice):")
            for method, row in sorted(att["compare"].items(), key=lambda kv: -kv[1]["average_precision"]):
                print(f"  {method:<8} {row['average_precision']:.3f}")
    chosen = summary.get("selection")
    if chosen:
        print(f"\ncheckpoint chosen on the validation prompts (the lowest outdated rate within "
              f"{chosen['max_utility_loss']:.0%} more validation perplexity): step {chosen['chosen_steps']}")
        for p in chosen["curve"]:
            print(f"  step {p['steps']:>3}: outdated on {p['behaviour']:.0%} of validation prompts, validation "
                  f"perplexity {p['utility_loss']:+.1%}")
    before, after = summary["metrics"].get("before", {}), summary["metrics"].get("after", {})
    if before and after:
        print("\nbefore -> after IBO correction, on test sets never used for choosing:")
        for name in before:
            b, a = before[name], after.get(name)
            change = f"  ({a / b - 1:+.1%})" if name == "heldout_ordinary" and b else ""
            print(f"  {name:<26} {b:>10.4g} -> {a:>10.4g}{change}")
    print(f"\nreport: {summary['report']}")
    print("seconds per stage: " + json.dumps(summary["seconds"]))
