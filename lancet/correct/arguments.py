"""``CorrectionArgs``: the options of a correction run, validated on creation, JSON round-trippable.

Which rows are dispreferred (``ranking``), how IBO's pairs are weighted (``weighting``) and which rows are preferred
(``preferred``) are plain options, so the controls of a ranked correction are settings of the same method:
``ibo_random`` and ``ibo_oracle`` are names for two of them (``METHOD_ALIASES``), kept for the CLI and old configs.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any

from lancet.constants import CORRECTION_ALIASES, CORRECTION_METHODS
from lancet.correct.losses import GENERATORS
from lancet.correct.pairs import PAIRINGS, PREFERRED, SELECTIONS, WEIGHTINGS
from lancet.correct.trainers import RETAIN_NORMALIZATIONS, RETAIN_TERMS
from lancet.errors import LancetError
from lancet.options import check_option_types, options_from_json

# the registered methods (lancet.correct.methods.CORRECTIONS; a test checks the two agree)
METHOD_NAMES = CORRECTION_METHODS
# old method names that are settings of IBO: the random-row control (random rows on both sides, uniform weights,
# hard targets) and the oracle (every true culprit dispreferred)
METHOD_ALIASES: dict[str, dict[str, Any]] = {
    "ibo_random": {"ranking": "random", "preferred": "random", "weighting": "uniform", "target_temperature": 0.0},
    "ibo_oracle": {"ranking": "oracle"},
}
assert tuple(METHOD_ALIASES) == CORRECTION_ALIASES


@dataclass
class CorrectionArgs:
    """Options of a correction run.

    ``retain_weight`` weighs the retain NLL of ``ga_retain`` and of ``npo`` when safe rows are given (NPO+RT), and
    IBO's retain term; ``ga`` is always plain gradient ascent. ``max_pairs`` caps the IBO pairs (seeded subsample).

    Rows (IBO, GA, NPO): ``ranking`` = ``influence`` (the ``top_k`` highest of the given scores, whichever method
    made them: LinFAC, BM25, RepSim...), ``random`` (a seeded random set) or ``oracle`` (every true culprit);
    ``preferred`` (IBO) = ``bottom`` (the ``top_k`` lowest-scored rows), ``random`` (a seeded random set),
    ``marked`` (the lowest-scored rows of a given mask, e.g. the known refusals) or ``near`` (with ``judged_rows``
    or the oracle: the highest-scored rows that may be preferred, the behaviour's nearest counter-examples);
    ``weighting`` (IBO) = ``gap`` (pair weight ∝ score gap) or ``uniform``.

    IBO's utility anchors (docs/method.md §3.6): ``chosen_nll_weight`` × the preferred rows' mean token NLL (RPO);
    ``retain`` = ``nll`` or ``kl`` on the ``retain_rows`` rows the ranking calls uninvolved (smallest |score|;
    default ``top_k`` of them), or on given retain rows (e.g. the model's own answers to ordinary prompts), all of
    them; ``retain_normalize`` = ``tokens`` (mean over their tokens) or ``rows`` (summed over each row's tokens, mean
    over rows: a sequence-level KL). ``dpo`` takes ``chosen_nll_weight`` and a retain term on given rows too.
    ``same_prompt`` pairs a dispreferred row with a lower-scored answer to its own prompt when the data has one.
    ``judged_rows`` (IBO, GA, NPO): take the dispreferred rows among the training rows a judge flags with the
    behaviour and the preferred among the others (``CorrectionData.flagged_mask``; docs/method.md §3.3).
    """

    method: str = "ibo"
    beta: float = 0.1
    generator: str = "logistic"
    alpha: float = 0.5
    top_k: int = 50
    pairing: str = "rank"
    target_temperature: float = 0.0
    include_iqs: bool = True
    retain_weight: float = 1.0
    max_pairs: int | None = None
    chosen_nll_weight: float = 0.0
    retain: str = "none"
    retain_rows: int | None = None
    retain_normalize: str = "tokens"
    same_prompt: bool = True
    ranking: str = "influence"
    preferred: str = "bottom"
    weighting: str = "gap"
    judged_rows: bool = False
    seed: int = 0

    def __post_init__(self) -> None:
        if isinstance(self.method, str) and self.method in METHOD_ALIASES:
            for key, value in METHOD_ALIASES[self.method].items():
                setattr(self, key, value)
            self.method = "ibo"
        check_option_types(self, "correction")
        checks = {
            "method": isinstance(self.method, str) and self.method in METHOD_NAMES,
            "beta": _number(self.beta) and self.beta > 0,
            "generator": self.generator in GENERATORS,
            "alpha": _number(self.alpha) and self.alpha > 0,
            "top_k": _integer(self.top_k) and self.top_k >= 1,
            "pairing": self.pairing in PAIRINGS,
            "target_temperature": _number(self.target_temperature) and self.target_temperature >= 0,
            "include_iqs": isinstance(self.include_iqs, bool),
            "retain_weight": _number(self.retain_weight) and self.retain_weight >= 0,
            "max_pairs": self.max_pairs is None or (_integer(self.max_pairs) and self.max_pairs >= 1),
            "chosen_nll_weight": _number(self.chosen_nll_weight) and self.chosen_nll_weight >= 0,
            "retain": self.retain in RETAIN_TERMS,
            "retain_rows": self.retain_rows is None or (_integer(self.retain_rows) and self.retain_rows >= 1),
            "retain_normalize": self.retain_normalize in RETAIN_NORMALIZATIONS,
            "same_prompt": isinstance(self.same_prompt, bool),
            "ranking": self.ranking in SELECTIONS,
            "preferred": self.preferred in PREFERRED,
            "weighting": self.weighting in WEIGHTINGS,
            "judged_rows": isinstance(self.judged_rows, bool),
            "seed": _integer(self.seed),
        }
        bad = [k for k, ok in checks.items() if not ok]
        if bad:
            choices = {"method": METHOD_NAMES + tuple(METHOD_ALIASES), "generator": GENERATORS, "pairing": PAIRINGS,
                       "retain": RETAIN_TERMS, "retain_normalize": RETAIN_NORMALIZATIONS, "ranking": SELECTIONS,
                       "preferred": PREFERRED, "weighting": WEIGHTINGS}.get(bad[0])
            hint = f" (choose from {', '.join(choices)})" if choices else ""
            raise LancetError(f"invalid correction option {bad[0]}={getattr(self, bad[0])!r}{hint}")
        if self.preferred == "near" and not (self.judged_rows or self.ranking == "oracle"):
            raise LancetError("invalid correction option preferred='near': it needs judged_rows (--row-judge) or "
                              "ranking='oracle' (else the preferred rows are the next rows that drive the behaviour)")

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> CorrectionArgs:
        return options_from_json(cls, data, "correction")


def _number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


def _integer(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)
