"""The suite's four designs and their seeds (docs/method.md §5.6, fixed before any number of the suite existed).

Validation seeds are where any setting (dose, epochs) or method (``selected``) is chosen; reported seeds are what
the intervals are over, and nothing is chosen on them. One validation seed per design is what the budget allows
(each seed of a gated design costs about an hour of CPU: two fine-tunes, the gate's generations, every method's
ranking). The three gated designs share their reported seeds, so that each reported seed's aligned start (a
function of the seed alone) and benign rows are the same in every design: the designs then differ in their
contamination only.
"""

from __future__ import annotations

from dataclasses import dataclass

# the counterfactual's k: |P| for every method listed there, half of it and the elbow for the selected one
K_FULL, K_HALF, K_ELBOW = "k_full", "k_half", "k_elbow"
# retrained at k = |P| on each design's counterfactual seed, besides the selected method
COUNTERFACTUAL_METHODS = ("random", "bm25", "repsim")
# the second training order of the counterfactual (the first is the design seed's own, the impure model's recipe)
RETRAIN_OFFSET = 1000


@dataclass(frozen=True)
class Design:
    name: str
    validation_seeds: tuple[int, ...]
    seeds: tuple[int, ...]  # reported
    positive_tiers: tuple[str, ...]
    gated: bool = True
    summary: str = ""
    # the tuning ladder's last rung (unsafe rows, epochs, rows of the He et al. tier), fixed before its number
    # (docs/method.md §5.6): if the validation seed's gap stays below the gate there, the design is reported as
    # failed with its ladder
    last_rung: tuple[int, float, int] | None = None

    def __post_init__(self) -> None:
        if set(self.validation_seeds) & set(self.seeds):
            raise ValueError(f"{self.name}: validation and reported seeds overlap")
        if len(self.seeds) < 3:
            raise ValueError(f"{self.name}: at least 3 reported seeds")

    @property
    def lexical(self) -> bool:
        return self.name == "lexical"

    @property
    def counterfactual_seed(self) -> int:
        """The reported seed the counterfactual retraining runs on: the first."""
        return self.seeds[0]

    @property
    def retrain_seeds(self) -> tuple[int, int]:
        """The two training orders of every counterfactual model (and of the impure and safe references)."""
        return self.counterfactual_seed, self.counterfactual_seed + RETRAIN_OFFSET


DESIGNS: dict[str, Design] = {d.name: d for d in (
    # today's full preset, unchanged; seeds 0-2 are its committed seeds, seed 3 a new one to choose on
    Design("lexical", (3,), (0, 1, 2), ("unsafe", "implicit"),
           summary="the full preset: AdvBench targets behind eight openers; text search should win"),
    # every unsafe prompt also refused; natural answers with no restated target
    Design("shared_prompt", (3,), (0, 1, 2), ("unsafe",), last_rung=(288, 6.0, 0),
           summary="BeaverTails-style: each unsafe prompt also appears refused; the base model's own answers"),
    # one family of requests in training, the others everywhere else; no opening 4-gram shared
    Design("disjoint", (3,), (0, 1, 2), ("unsafe",), last_rung=(144, 6.0, 96),
           summary="computer-crime culprits, other IQs; every culprit's opening its own"),
    # the demo as `lancet demo` runs it; every demo setting was chosen at its default seed 0
    Design("demo", (0,), (1, 2, 3), ("culprit",), gated=False,
           summary="the demo's planted culprits and judge; seeds are the fine-tune's"),
)}
