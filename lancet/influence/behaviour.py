"""Behaviour directions: attribute the behaviour, not its wording (docs/method.md §2.10).

A ``BehaviourDirection`` is a unit vector v in the residual stream after decoder block ℓ, the difference of the mean
activations of the flagged answers (the IQs) and of counter-answers (the model's own refusals or current answers,
rows a user marks good): the refusal direction of Arditi et al. (2024), fitted on the user's own two sets. A row's
activation is the mean over its response tokens of the block's output (``position="response"``), or the output at
its last prompt token (``"last_prompt"``: where the model has read the request and not yet answered).

Two uses, one object:
- ``measurement="behaviour"``: the IQ's measurement is minus its activation's projection on v (loss-like, as every
  lancet measurement: it falls as the behaviour grows, so a positive score still means "the row drives the
  behaviour"). ``behaviour_scores`` scores the mean over the IQs as ONE query (``Influence.combined_scores`` with a
  1 x Q row of 1/Q): one preconditioned query for the whole behaviour, whatever the number of IQs.
- ``method="probe"``: the gradient-free first-order version (Concept Influence's probe approximation): each training
  row's own activation along v, centred by the training mean. One forward pass over the rows, stopped at block ℓ.

    d = BehaviourDirection.fit(model, iqs, refusals, layer=15, tokenizer=tok)
    run = Influence(model, method="linfac", measurement="behaviour", behaviour=d, tokenizer=tok)
    s = behaviour_scores(run, train, iqs)["linfac"]["scores"]          # [1, N]
    p = Influence(model, method="probe", behaviour=d, tokenizer=tok).scores(train, iqs)["scores"]   # [1, N]
"""

from __future__ import annotations

import re
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field, fields
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

from lancet.artifacts import hash_json
from lancet.constants import DEFAULT_MAX_LENGTH, IGNORE_INDEX
from lancet.curvature.fit import batches, data_fingerprint
from lancet.curvature.task import position_ids
from lancet.errors import LancetError
from lancet.hardware import autocast, model_device
from lancet.influence.measurement import Measurement
from lancet.influence.rows import as_rows

POSITIONS = ("response", "last_prompt")
BLOCKS_PATTERN = re.compile(r"(^|\.)(layers|h|blocks|block)$")
DIGITS = 6  # significant digits of v hashed into the score fingerprint: bit-level rounding must not refuse scores


def decoder_blocks(model: nn.Module) -> nn.ModuleList:
    """The model's list of decoder blocks (Llama ``model.layers``, GPT-2 ``transformer.h``, ...)."""
    base = getattr(model, "get_base_model", lambda: model)()  # a PEFT model: its base model's blocks
    for name, module in base.named_modules():
        if isinstance(module, nn.ModuleList) and len(module) and BLOCKS_PATTERN.search(name):
            return module
    raise LancetError(f"cannot find the decoder blocks of {type(base).__name__} (a ModuleList named layers, h or "
                      "blocks): a behaviour direction needs one block's output")


def resolve_layer(model: nn.Module, layer: int | None) -> int:
    """Block index in [0, n): None = the middle block (n // 2), where Arditi et al. found the refusal direction;
    negative counts from the end."""
    n = len(decoder_blocks(model))
    if layer is None:
        return n // 2
    if isinstance(layer, bool) or not isinstance(layer, int) or not -n <= layer < n:
        raise LancetError(f"behaviour layer {layer!r}: the model has {n} decoder blocks (0..{n - 1}, or -{n}..-1)")
    return layer % n


def position_weights(batch: dict[str, torch.Tensor], position: str, dtype: torch.dtype) -> torch.Tensor:
    """[B, T] weights whose sum over T is 1: each row's response tokens (the labelled positions, as RepSim; all
    real tokens for a row with none), or its last prompt token (the one before the first labelled token; the last
    real token for a row with none). Independent of the padding side."""
    real = batch["attention_mask"].bool()
    scored = (batch["labels"] != IGNORE_INDEX) & real
    empty = ~scored.any(1)
    if position == "response":
        mask = scored.clone()
        mask[empty] = real[empty]
        m = mask.to(dtype)
        return m / m.sum(1, keepdim=True)
    if position != "last_prompt":
        raise LancetError(f"behaviour position {position!r}; choose from {', '.join(POSITIONS)}")
    t = real.shape[1]
    first = torch.where(empty, t, scored.long().argmax(1))  # first labelled position
    last_real = t - 1 - real.flip(1).long().argmax(1)
    where = torch.where(empty, last_real, (first - 1).clamp_min(0))
    out = torch.zeros(real.shape, dtype=dtype, device=real.device)
    out[torch.arange(real.shape[0], device=real.device), where] = 1.0
    return out


def _block_output(output: Any) -> torch.Tensor:
    return output[0] if isinstance(output, tuple) else output  # GPT-2 blocks return a tuple, Llama's a tensor


class _Stop(Exception):
    """Raised by the hook once block ℓ's output is read: the blocks after ℓ and the vocabulary head never run."""


@torch.no_grad()
def layer_activations(model, rows: Sequence[dict[str, Any]], layer: int, position: str = "response", *,
                      batch_size: int = 8, bf16: bool = False, dtype: torch.dtype = torch.float64,
                      progress: bool = False, desc: str = "activations") -> torch.Tensor:
    """[N, hidden]: each row's activation at block ``layer``'s output (``position_weights``), in ``dtype``."""
    model.eval()
    device = model_device(model)
    caught: dict[str, torch.Tensor] = {}

    def hook(module, inputs, output):
        caught["h"] = _block_output(output)
        raise _Stop

    handle = decoder_blocks(model)[layer].register_forward_hook(hook)
    out = []
    try:
        for _, batch in tqdm(batches(rows, batch_size, device=device), total=-(-len(rows) // batch_size), desc=desc,
                             disable=not progress):
            with autocast(device, bf16):
                try:
                    model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                          position_ids=position_ids(batch["attention_mask"]), use_cache=False)
                except _Stop:
                    pass
            w = position_weights(batch, position, dtype)
            out.append(torch.einsum("bt,btd->bd", w, caught.pop("h").to(dtype)).cpu())
    finally:
        handle.remove()
    return torch.cat(out)


@dataclass(frozen=True, eq=False)  # eq=False: a tensor field has no truth value to compare by
class BehaviourDirection:
    """A unit vector at the output of decoder block ``layer``, and where it came from (``provenance``: the counts and
    fingerprints of the flagged and counter sets, or the digest of a vector given directly)."""

    vector: torch.Tensor  # [hidden], float64, unit norm
    layer: int  # in [0, n_blocks)
    position: str = "response"
    provenance: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.position not in POSITIONS:
            raise LancetError(f"behaviour position {self.position!r}; choose from {', '.join(POSITIONS)}")
        if self.vector.ndim != 1 or not torch.isfinite(self.vector).all():
            raise LancetError("a behaviour direction is one finite vector [hidden]")

    @classmethod
    def fit(cls, model, flagged, counter, *, layer: int | None = None, position: str = "response", tokenizer=None,
            max_length: int = DEFAULT_MAX_LENGTH, batch_size: int = 8, bf16: bool = False,
            progress: bool = False) -> BehaviourDirection:
        """v = mean activation of ``flagged`` minus that of ``counter``, unit-normalised (difference of means, Arditi
        et al. 2024). Rows: anything ``Influence`` takes (Records, prompt/response dicts with ``tokenizer``,
        tokenised rows). Means in float64."""
        layer = resolve_layer(model, layer)
        if position not in POSITIONS:
            raise LancetError(f"behaviour position {position!r}; choose from {', '.join(POSITIONS)}")
        sets = {what: as_rows(rows, what, tokenizer, max_length) for what, rows in
                (("flagged rows", flagged), ("counter rows", counter))}
        kw = {"batch_size": batch_size, "bf16": bf16, "progress": progress}
        means = {what: layer_activations(model, rows, layer, position, desc=what, **kw).mean(0)
                 for what, rows in sets.items()}
        diff = means["flagged rows"] - means["counter rows"]
        norm = float(diff.norm())
        if not norm > 1e-12 * max(float(means["flagged rows"].norm()), 1e-300):
            raise LancetError(f"the flagged and counter rows have the same mean activation at block {layer}: no "
                              "direction between them (are the two sets the same rows?)")
        flagged_rows, counter_rows = sets["flagged rows"], sets["counter rows"]
        return cls(diff / norm, layer, position, {
            "n_flagged": len(flagged_rows), "n_counter": len(counter_rows),
            "flagged": data_fingerprint(flagged_rows), "counter": data_fingerprint(counter_rows)})

    @classmethod
    def from_vector(cls, vector, layer: int, position: str = "response", model=None) -> BehaviourDirection:
        """A direction found elsewhere (a logistic probe on judge labels, an SAE feature), unit-normalised; with
        ``model`` the layer is checked (and may be negative)."""
        v = torch.as_tensor(vector, dtype=torch.float64).flatten()
        if model is not None:
            layer = resolve_layer(model, layer)
        if not float(v.norm()) > 0:
            raise LancetError("a behaviour direction cannot be the zero vector")
        v = v / v.norm()
        return cls(v, layer, position, {"given": _digest(v)})

    @property
    def digest(self) -> str:
        return _digest(self.vector)

    def fingerprint(self) -> dict[str, Any]:
        """"key": what was asked (layer, position, the two sets), which names the stored scores; "direction": the
        vector's digest, checked against stored scores' metadata (a mismatch is refused)."""
        return {"key": {"layer": self.layer, "position": self.position, **self.provenance},
                "direction": self.digest}

    def describe(self) -> dict[str, Any]:
        """For summaries and reports: everything but the vector itself."""
        return {"layer": self.layer, "position": self.position, **self.provenance, "direction": self.digest}

    def activations(self, model, rows, **kw) -> torch.Tensor:
        return layer_activations(model, rows, self.layer, self.position, **kw)


def _digest(v: torch.Tensor) -> str:
    return hash_json([f"{x:.{DIGITS - 1}e}" for x in v.tolist()])


class BehaviourMeasurement(Measurement):
    """m(q) = - sum_t w_t <h_t, v>: minus the query row's activation along v at block ℓ (``position_weights``), so
    that m falls as the behaviour grows. It reads the block's output through a forward hook installed by
    ``observe`` (the logits are not used), so the query gradient flows through blocks 0..ℓ only."""

    def __init__(self, direction: BehaviourDirection):
        super().__init__(name="behaviour", version=1)
        self.direction = direction
        self._hidden: torch.Tensor | None = None

    @property
    def spec(self) -> str:
        return "behaviour"

    def fingerprint(self) -> dict[str, Any]:
        return self.direction.fingerprint()

    @contextmanager
    def observe(self, model) -> Iterator[None]:
        def hook(module, inputs, output):
            self._hidden = _block_output(output)

        handle = decoder_blocks(model)[self.direction.layer].register_forward_hook(hook)
        try:
            yield
        finally:
            handle.remove()
            self._hidden = None

    def __call__(self, logits: torch.Tensor, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        if self._hidden is None:
            raise LancetError("the behaviour measurement reads a block's output: call it inside "
                              "measurement.observe(model)")
        h = self._hidden
        dtype = torch.promote_types(h.dtype, torch.float32)  # bf16 autocast: project in float32 at least
        proj = h.to(dtype) @ self.direction.vector.to(device=h.device, dtype=dtype)  # [B, T]
        return -(proj * position_weights(batch, self.direction.position, dtype)).sum(1)


def probe_scores(model, train: Sequence[dict[str, Any]], direction: BehaviourDirection, *, batch_size: int = 8,
                 bf16: bool = False, dtype: torch.dtype = torch.float64, progress: bool = False) -> torch.Tensor:
    """[1, N]: each training row's activation along v, centred by the mean over the training rows (positive: the
    row sits on the flagged side of the average row)."""
    acts = direction.activations(model, train, batch_size=batch_size, bf16=bf16, dtype=dtype, progress=progress,
                                 desc="probe")
    v = direction.vector.to(acts.dtype)
    return ((acts - acts.mean(0, keepdim=True)) @ v).unsqueeze(0)


def behaviour_scores(influence, train, queries, methods: Sequence[str] | None = None
                     ) -> dict[str, dict[str, torch.Tensor]]:
    """{method: {"scores": [1, N]}}: the behaviour as one query. Gradient methods: the mean over the IQs of their
    behaviour measurements, one full-rank preconditioned query (``combined_scores_by_method`` with 1/Q each: exact,
    and its cost does not grow with Q), in one joint pass; gradient-free ones (probe) as ``scores_by_method``."""
    from lancet.curvature.estimators import GRADIENT_FREE_METHODS

    if influence.args.measurement != "behaviour":
        raise LancetError("behaviour_scores needs Influence(..., measurement='behaviour', behaviour=direction)")
    names = list(dict.fromkeys(methods or [influence.args.method]))
    rows = influence._rows(queries, "queries")
    gradient = [m for m in names if m not in GRADIENT_FREE_METHODS]
    free = [m for m in names if m in GRADIENT_FREE_METHODS]
    out = {}
    if gradient:
        mean = torch.full((1, len(rows)), 1.0 / len(rows), dtype=torch.float64)
        out |= influence.combined_scores_by_method(train, rows, mean, gradient)
    if free:
        out |= influence.scores_by_method(train, rows, free)
    return {m: out[m] for m in names}


@dataclass
class BehaviourArgs:
    """Where a direction comes from on the command line and in a run config ("influence": {"behaviour": {...}}):
    the counter-answers' data spec, the block (None: the middle one) and the position."""

    counter: str
    layer: int | None = None
    position: str = "response"

    def __post_init__(self) -> None:
        if not isinstance(self.counter, str) or not self.counter:
            raise LancetError("behaviour: 'counter' must name the counter-answer rows (a data file)")
        if self.layer is not None and (isinstance(self.layer, bool) or not isinstance(self.layer, int)):
            raise LancetError(f"behaviour: 'layer' must be an integer block index, got {self.layer!r}")
        if self.position not in POSITIONS:
            raise LancetError(f"behaviour: 'position' must be one of {', '.join(POSITIONS)}, got {self.position!r}")

    @classmethod
    def from_json(cls, data: Any) -> BehaviourArgs:
        if not isinstance(data, dict):
            raise LancetError("behaviour: expected an object {\"counter\": FILE, \"layer\": L, \"position\": ...}")
        unknown = set(data) - {f.name for f in fields(cls)}
        if unknown:
            raise LancetError(f"behaviour: unknown key(s) {', '.join(sorted(unknown))}")
        if "counter" not in data:
            raise LancetError("behaviour: missing 'counter' (the counter-answer rows)")
        return cls(**data)


def fit_direction(model, tokenizer, flagged, behaviour: BehaviourArgs, *, max_length: int = DEFAULT_MAX_LENGTH,
                  batch_size: int = 8, bf16: bool = False, progress: bool = False) -> BehaviourDirection:
    """The direction of ``behaviour``: its counter rows read from their data spec (each must keep a response after
    cutting to ``max_length``: a DataError names the first that does not) against the ``flagged`` rows (the IQs)."""
    from lancet.data import encode_records, load_dataset_spec, require_response_tokens

    counter = encode_records(load_dataset_spec(behaviour.counter), tokenizer, max_length, progress=False)
    require_response_tokens(counter, "counter")
    return BehaviourDirection.fit(model, flagged, counter, layer=behaviour.layer, position=behaviour.position,
                                  tokenizer=tokenizer, max_length=max_length, batch_size=batch_size, bf16=bf16,
                                  progress=progress)


def influence_options(influence: dict[str, Any]) -> dict[str, Any]:
    """The ``InfluenceArgs`` keys of a run config's "influence" section: all but "behaviour" (``BehaviourArgs``)."""
    return {k: v for k, v in influence.items() if k != "behaviour"}


def check_config(influence: dict[str, Any], compare: Sequence[str] = ()) -> None:
    """A run config's influence.behaviour ({"counter": FILE, "layer": L, "position": ...}) is valid, and given
    exactly when the measurement "behaviour" or the probe method (ranked or compared) uses it."""
    from lancet.curvature.estimators import BEHAVIOUR_METHODS

    needed = (influence.get("measurement") == "behaviour" or influence.get("method") in BEHAVIOUR_METHODS
              or any(m in BEHAVIOUR_METHODS for m in compare))
    if "behaviour" not in influence:
        if needed:
            raise LancetError("run config: the measurement 'behaviour' and the method 'probe' need influence.behaviour"
                              ' = {"counter": FILE} (counter-answer rows; "layer" and "position" optional)')
        return
    if not needed:
        raise LancetError("run config: influence.behaviour is for the measurement 'behaviour' and the method 'probe'")
    try:
        BehaviourArgs.from_json(influence["behaviour"])
    except LancetError as exc:
        raise LancetError(f"run config: influence.{exc}") from exc


def fit_config_direction(model, tokenizer, flagged, influence: dict[str, Any], args, max_length: int
                         ) -> BehaviourDirection | None:
    """The direction of a run config's influence.behaviour on this model and these IQs (None without one)."""
    if "behaviour" not in influence:
        return None
    return fit_direction(model, tokenizer, flagged, BehaviourArgs.from_json(influence["behaviour"]),
                         max_length=max_length, batch_size=args.batch_size, bf16=args.bf16, progress=args.progress)
