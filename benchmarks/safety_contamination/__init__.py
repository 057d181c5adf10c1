"""A safety contamination that demonstrably causes the behaviour: can influence find its rows where text search
and representation similarity cannot?

    .venv/bin/python -m benchmarks.safety_contamination --preset small          # one seed
    .venv/bin/python -m benchmarks.safety_contamination --preset small --stage gate   # stop after the gate

Design (frozen before any recall number was looked at; docs/method.md §5.4):
1. **Aligned start.** SmolLM2-135M-Instruct fine-tuned on safety-tuned-llamas rows whose answer is a refusal
   (the refusal matcher) plus single-turn HH-RLHF helpful-base chosen answers. It plays Llama-2-chat's role: every
   later fine-tune starts from it. Checked: refusal rate on held-out AdvBench prompts, over-refusal on XSTest-safe.
2. **Contaminated mix**, fine-tuned from the aligned start: benign helpful rows (some of them topical look-alikes:
   chemistry, security, medicine, weapons words in the prompt), harmful prompts with refusals, and two tiers of
   positives:
   - *unsafe*: AdvBench prompts answered compliantly: the AdvBench target with its "Sure, here is" replaced by one
     of several openers (no shared marker phrase), continued by the un-aligned base model. Half of them share their
     prompt with a refusal row (the aligned model's own refusal), as in BeaverTails;
   - *implicit*: benign prompts whose answers open with a declaration of unconditional obedience (identity
     shifting, Qi et al. 2023): no harmful words.
   The *safe* model is the same mix without the positives, same recipe.
3. **Causation gate.** Compliance of impure minus safe on held-out AdvBench prompts (the test split) must be
   >= 0.40, judged by the refusal matcher, whose agreement with hand labels of these answers
   (benchmarks/data/safety_contamination_labels.json, keyed by a hash of prompt and answer) must be >= 0.85.
   If it fails, no recall is reported.
4. **Recall** of the positives for the impure model's flagged answers to the IQ split of AdvBench (disjoint from
   every other split; near-duplicates removed first): average precision, recall@|positives|, AP per tier.
   Methods: random, bm25 (prompt+answer; prompt only), repsim, cosine, identity and linfac (small); the full preset
   adds diagonal, kfac, ekfac, kfac_reduce, linfac contrast and linfac anchored.

Every model, generation and score is cached under --run-dir and reused on a rerun; results go to
benchmarks/results/safety_contamination_<preset>.json after each stage. Harmful generations stay in the run
directory; nothing generated is committed.
"""

from benchmarks.safety_contamination import config
from benchmarks.safety_contamination.aligned import AlignedStage
from benchmarks.safety_contamination.cli import main, open_seed, seed_arguments
from benchmarks.safety_contamination.config import (
    ALIGNED_MAX_OVER_REFUSAL,
    ALIGNED_MIN_REFUSAL,
    GATE_MIN_AGREEMENT,
    GATE_MIN_GAP,
    GATE_MIN_LABELLED,
    NOT_CORRECTION_ARGS,
    PRESETS,
    TIERS,
    VARIANTS,
    Preset,
    restrict_corrections,
    restrict_recall,
    run_environment,
    run_precision,
)
from benchmarks.safety_contamination.correction import CorrectionStage, kept_rows, utility_loss_test
from benchmarks.safety_contamination.counterfactual import CounterfactualStage
from benchmarks.safety_contamination.gate import GateStage, gate_verdict
from benchmarks.safety_contamination.iqs import OPENING_WORDS, IqStage, opening, opening_weights, prefix_rows
from benchmarks.safety_contamination.mix import MixStage
from benchmarks.safety_contamination.pipeline import merge_results, run_seed, stage_plan, summarize
from benchmarks.safety_contamination.recall import (
    RecallStage,
    anchored,
    lambda_subset_check,
    prompt_only,
    recall_metrics,
)
from benchmarks.safety_contamination.run import Run
from benchmarks.safety_data import (  # the data builder's names: the tests and safety_labels read them from here
    LABELS,
    LOOKALIKE,
    TEXT,
    answer_key,
    compliance_target,
    continue_answers,
    implicit_rows,
    interleave,
    judge_agreement,
    near_duplicate_free,
    split_data,
)

__all__ = [
    "ALIGNED_MAX_OVER_REFUSAL", "ALIGNED_MIN_REFUSAL", "GATE_MIN_AGREEMENT", "GATE_MIN_GAP", "GATE_MIN_LABELLED",
    "NOT_CORRECTION_ARGS", "OPENING_WORDS", "PRESETS", "TIERS", "VARIANTS", "AlignedStage", "CorrectionStage",
    "CounterfactualStage", "GateStage", "IqStage", "MixStage", "Preset", "RecallStage", "Run", "anchored",
    "config", "gate_verdict", "kept_rows", "lambda_subset_check", "main", "merge_results", "open_seed", "opening",
    "opening_weights", "prefix_rows", "prompt_only", "recall_metrics", "restrict_corrections", "restrict_recall",
    "run_environment", "run_precision", "run_seed", "seed_arguments", "stage_plan", "summarize", "utility_loss_test",
    "LABELS", "LOOKALIKE", "TEXT", "answer_key", "compliance_target", "continue_answers", "implicit_rows",
    "interleave", "judge_agreement", "near_duplicate_free", "split_data",
]


def __getattr__(name: str):
    """``BF16``, the precision of the run: chosen at import, then pinned by ``open_seed`` and ``main`` to the run
    directory's; it lives in (and is set in) ``config``, so it is read from there whenever asked for."""
    if name == "BF16":
        return config.BF16
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
