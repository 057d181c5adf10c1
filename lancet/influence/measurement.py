"""What is explained: the measurement of each influence query whose gradient is the query gradient.

kronfluence lets its users define the measurement (its ``Task``); so does lancet. A measurement is *loss-like*:
one scalar per query row that falls as the row's behaviour grows (the default is the answer's summed cross-entropy,
-log p(answer | prompt)), so that a positive score keeps its meaning: up-weighting the training row makes the
query's behaviour more likely.

- ``answer`` (default): summed cross-entropy of the answer tokens.
- ``first_tokens:K``: summed cross-entropy of the first K answer tokens only. Whether a model complies or refuses
  is decided in its opening words ("Sure, here is" / "I'm sorry"); the rest of a long answer is topic and style,
  which every row on the same topic moves.
- ``spans``: summed cross-entropy of the answer tokens inside the IQ's behaviour spans (``meta.behaviour_spans``,
  which IQs taken with a rule judge carry: "hot bath" in "Put him in a hot bath for 20 minutes, then ..."). A small
  model's flagged answer mixes the behaviour with text it learned elsewhere (a stock closing line of the current-
  advice rows); the whole answer's likelihood then explains that text as much as the behaviour. The labels are
  restricted when the queries are read (``lancet.data.tokenize.restrict_to_spans``), so the measurement itself is
  the answer loss on what is left.
- ``behaviour``: minus the IQ's activation along a behaviour direction v at a decoder block's output
  (``lancet.influence.behaviour``; the direction is passed as ``Influence(..., behaviour=...)``). It reads the
  block's output through a forward hook that ``observe`` installs around the query pass, and its fingerprint (the
  direction's provenance and digest) goes into the stored scores' key and metadata.
- any callable ``fn(logits [B, T, V], batch) -> [B]`` wrapped in ``Measurement(fn, name=..., version=...)``: a
  margin over a refusal, a classifier's logit, a token's probability. Its ``name`` and ``version`` go into the
  fingerprint of stored scores (a function cannot be hashed): bump the version when the function changes.

The margin over a fixed reference answer (``--contrast-response``) is linear in two rows' measurements and is
computed as the difference of their scores (``lancet.influence.attribute.contrast_scores``).
The built-ins are label transforms of the cross-entropy cotangent (exact, and no extra autograd through the
vocabulary); a callable is differentiated by autograd.
"""

from __future__ import annotations

from collections.abc import Callable
from contextlib import AbstractContextManager, nullcontext
from typing import Any

import torch

from lancet.constants import IGNORE_INDEX
from lancet.curvature.task import data_cotangent
from lancet.errors import LancetError

BUILTIN = ("answer", "first_tokens", "spans", "behaviour")


class Measurement:
    """A loss-like scalar per query row. Subclass and override ``__call__``, or wrap a function."""

    def __init__(self, fn: Callable[[torch.Tensor, dict[str, torch.Tensor]], torch.Tensor] | None = None, *,
                 name: str, version: int = 1):
        if not name or any(c in name for c in ":@ "):
            raise LancetError(f"invalid measurement name {name!r}: a non-empty name without ':', '@' or spaces")
        self.fn, self.name, self.version = fn, name, int(version)

    @property
    def spec(self) -> str:
        """The string stored in InfluenceArgs.measurement and hashed into the score fingerprint."""
        return f"{self.name}@{self.version}"

    def __call__(self, logits: torch.Tensor, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        if self.fn is None:
            raise NotImplementedError
        return self.fn(logits, batch)

    def observe(self, model) -> AbstractContextManager[Any]:
        """A context held around the query forward and backward passes: a measurement that reads more than the
        logits (a block's output: ``BehaviourMeasurement``) installs its hooks here. Nothing by default."""
        return nullcontext()

    def fingerprint(self) -> dict[str, Any]:
        """What identifies this measurement beyond ``spec`` ({} for most): its "key" entry names the stored scores
        (a directory per value, as a query set does); all of it is written to the scores' meta.json and checked
        there, so stored scores of another direction are refused."""
        return {}

    def backward(self, logits: torch.Tensor, batch: dict[str, torch.Tensor]) -> None:
        """Backpropagate the measurement of every row (rows are independent, so per-row gradients stay apart)."""
        values = self(logits, batch)
        if values.shape != (logits.shape[0],):
            raise LancetError(f"measurement {self.spec} returned shape {tuple(values.shape)}; expected one scalar per "
                              f"row ({logits.shape[0]},)")
        values.sum().backward()


class AnswerLoss(Measurement):
    """Summed cross-entropy of the answer tokens (the default)."""

    def __init__(self):
        super().__init__(name="answer", version=1)

    @property
    def spec(self) -> str:
        return "answer"

    def labels(self, labels: torch.Tensor) -> torch.Tensor:
        return labels

    def __call__(self, logits, batch):
        from lancet.curvature.task import summed_loss

        return summed_loss(logits, self.labels(batch["labels"]))

    def backward(self, logits, batch):
        logits.backward(data_cotangent(logits, self.labels(batch["labels"])))


class FirstTokensLoss(AnswerLoss):
    """Summed cross-entropy of the first ``k`` answer tokens of each row."""

    def __init__(self, k: int):
        if k < 1:
            raise LancetError(f"invalid measurement first_tokens:{k}: K must be >= 1")
        Measurement.__init__(self, name="first_tokens", version=1)
        self.k = k

    @property
    def spec(self) -> str:
        return f"first_tokens:{self.k}"

    def labels(self, labels: torch.Tensor) -> torch.Tensor:
        scored = labels != IGNORE_INDEX
        scored[:, 0] = False  # label 0 is never a target (nothing predicts it)
        keep = scored & (scored.long().cumsum(1) <= self.k)
        out = torch.full_like(labels, IGNORE_INDEX)
        out[keep] = labels[keep]
        out[:, 0] = labels[:, 0]
        return out


class SpansLoss(AnswerLoss):
    """Summed cross-entropy of the answer tokens inside the behaviour spans (labels restricted on reading)."""

    def __init__(self):
        Measurement.__init__(self, name="spans", version=1)

    @property
    def spec(self) -> str:
        return "spans"


def resolve_measurement(spec: str | Measurement | None, behaviour=None) -> Measurement:
    """A built-in by its spec ("answer", "first_tokens:K", "behaviour" with its ``BehaviourDirection``) or a
    Measurement as given."""
    if spec is None:
        return AnswerLoss()
    if isinstance(spec, Measurement):
        return spec
    name, _, arg = str(spec).partition(":")
    if name == "answer" and not arg:
        return AnswerLoss()
    if name == "first_tokens" and arg.isdigit():
        return FirstTokensLoss(int(arg))
    if name == "spans" and not arg:
        return SpansLoss()
    if name == "behaviour" and not arg:
        if behaviour is None:
            raise LancetError("measurement 'behaviour' needs a direction: Influence(..., behaviour="
                              "BehaviourDirection.fit(model, iqs, counter_rows, layer=L)), or --counter FILE")
        from lancet.influence.behaviour import BehaviourMeasurement

        return BehaviourMeasurement(behaviour)
    raise LancetError(f"unknown measurement {spec!r}; choose 'answer', 'first_tokens:K', 'spans' or 'behaviour', "
                      "or pass a Measurement object from Python")


def check_spec(spec: Any) -> None:
    """Validate InfluenceArgs.measurement: a built-in spec, or NAME@VERSION of a user Measurement."""
    if not isinstance(spec, str):
        raise LancetError(f"invalid measurement {spec!r}: a string")
    if "@" in spec:
        name, _, version = spec.partition("@")
        if not name or not version.isdigit():
            raise LancetError(f"invalid measurement {spec!r}: NAME@VERSION")
        return
    if spec == "behaviour":  # its direction is an object, passed beside the options (Influence(..., behaviour=...))
        return
    resolve_measurement(spec)
