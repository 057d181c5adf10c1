"""The behaviour-level rankings of a suite recall stage (docs/method.md §2.10, §2.12, §5.6), beside the ones
``Run.recall`` makes: ``probe`` (each row's activation along the behaviour direction), ``linfac_behaviour`` (LinFAC
with the ``behaviour`` measurement: the behaviour as one query) and ``repsim_anchored`` (RepSim to the IQs minus
RepSim to the anchors). The direction is the IQs' mean activation minus the counter rows' at the middle block;
the counter rows, and the anchors, are the aligned model's refusals to the IQ prompts (``Run.anchors``, the safety
benchmark's own anchors): no label is used.

The checkpoint-aware ones (``checkpoint_rankings``, docs/method.md §2.11) average over the impure fine-tune's kept
checkpoints with their learning-rate weights (TracIn): ``linfac_behaviour_ckpt`` (the behaviour query at each
checkpoint, its direction fitted there from the same contrast rows) and ``cosine_behaviour_adam_ckpt`` /
``identity_behaviour_adam_ckpt`` (the same query, every gradient divided by that checkpoint's Adam step scale:
TrackStar's and LESS's correction; the cosine also unit-normalises each row's gradient)."""

from __future__ import annotations

import re
from dataclasses import replace
from pathlib import Path

import torch

BEHAVIOUR_RANKINGS = ("probe", "linfac_behaviour", "repsim_anchored")
# the direction's depth (a fraction of the blocks), chosen on the validation seeds lexical 3 and demo 0 (docs/method.md
# §5.6: mean AP of probe and linfac_behaviour 0.489 at a quarter, 0.565 at the middle, 0.612 at three quarters);
# validation seeds also rank at the other VALIDATION_DEPTHS (``probe_d25`` ...), never selected
VALIDATION_DEPTHS = (0.25, 0.5, 0.75)
BEHAVIOUR_DEPTH = 0.75
CHECKPOINT_RANKINGS = ("linfac_behaviour_ckpt", "cosine_behaviour_adam_ckpt", "identity_behaviour_adam_ckpt")
# K, chosen on the same seeds: True ranks every seed over the K = 3 kept checkpoints; False (K = 1: linfac_behaviour
# 0.412 mean AP against linfac_behaviour_ckpt 0.407, at a third of the cost) keeps CHECKPOINT_RANKINGS to the
# validation seeds, where they stay as the ablation that chose K
REPORTED_CHECKPOINTS = False


# rankings derived from a stage's committed scores to test a reading, never selected and never the default: each
# with the ranking it must beat and, per design, the seeds it is tested on, none of those it was formed on
# (docs/method.md §5.6, H1: formed on disjoint's seeds 3 and 0)
HYPOTHESIS_TESTS = {"repsim_probe": ("repsim", {"disjoint": (1, 2), "lexical": (0, 1, 2)})}
HYPOTHESES = tuple(HYPOTHESIS_TESTS)


def rank_percentiles(scores: torch.Tensor) -> torch.Tensor:
    """[N] each row's rank among ``scores`` as a fraction: 0 the lowest, 1 the highest (ties broken by position)."""
    ranks = torch.empty_like(scores, dtype=torch.float64)
    ranks[scores.argsort(stable=True)] = torch.arange(len(scores), dtype=torch.float64)
    return ranks / max(len(scores) - 1, 1)


def derived_rankings(scores: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """HYPOTHESES from the rankings they combine, where the stage has them: ``repsim_probe``, the mean of RepSim's and
    the probe's rank percentiles (a harmful request, by RepSim, *and* a compliant answer, by the probe)."""
    if "repsim" in scores and "probe" in scores:
        return {"repsim_probe": (rank_percentiles(scores["repsim"]) + rank_percentiles(scores["probe"])) / 2}
    return {}


def selectable(method: str) -> bool:
    """Whether a ranking may be selected on validation seeds or become the default: not an ablation that chose a
    setting (``validation_only``), not a hypothesis under test (HYPOTHESES)."""
    return not validation_only(method) and method not in HYPOTHESES


def ablation_depths(validation: bool) -> tuple[float, ...]:
    """The depths besides BEHAVIOUR_DEPTH that a seed's behaviour rankings are also taken at: validation seeds only."""
    return tuple(d for d in VALIDATION_DEPTHS if d != BEHAVIOUR_DEPTH) if validation else ()


def validation_only(method: str) -> bool:
    """A ranking only the validation seeds carry, to choose a setting on and never the selected method: the
    direction at another depth (``probe_d25`` ...) and, where K = 1 was chosen, the checkpoint rankings."""
    return re.search(r"_d\d\d$", method) is not None or (not REPORTED_CHECKPOINTS and method in CHECKPOINT_RANKINGS)


def ranks_checkpoints(validation: bool) -> bool:
    """Whether a seed's recall stage computes CHECKPOINT_RANKINGS (the costliest rankings: 45 min of a lexical seed)."""
    return validation or REPORTED_CHECKPOINTS


def depth_layer(model, depth: float | None) -> int | None:
    """The decoder block at ``depth`` (a fraction of the blocks, rounded down; None: the middle one)."""
    from lancet.influence.behaviour import decoder_blocks

    return None if depth is None else int(depth * len(decoder_blocks(model)))


def depth_suffix(depth: float) -> str:
    """A ranking's suffix for a direction taken at another depth than the middle: ``_d25`` for a quarter."""
    return f"_d{round(depth * 100):02d}"


def behaviour_rankings(model, tokenizer, train, iqs, counter, *, out_dir: Path | None = None, max_length: int = 192,
                       lambda_max_rows: int = 128, bf16: bool = False, batch_size: int = 8,
                       progress: bool = False, dtype: str | None = None, depth: float | None = None,
                       other_depths: tuple[float, ...] = ()) -> dict[str, torch.Tensor]:
    """{ranking: [N] aggregated scores} of ``BEHAVIOUR_RANKINGS`` for the encoded training rows ``train``, the IQ
    records ``iqs`` and the counter (refusal) records ``counter``, the direction at ``depth`` (None: the middle
    block); ``other_depths`` adds probe and linfac_behaviour at those depths (``probe_d25`` ...: the validation
    seeds' choice of the layer, issue 36 item 5)."""
    from lancet.data import encode_records
    from lancet.influence import BehaviourDirection, Influence, InfluenceArgs, behaviour_scores
    from lancet.influence.recall import aggregate

    if not counter:
        raise SystemExit("no counter rows (the aligned model refused none of the IQ prompts): no behaviour direction")
    queries = encode_records(iqs, tokenizer, max_length, progress=False)
    anchors = encode_records(counter, tokenizer, max_length, progress=False)
    args = InfluenceArgs(bf16=bf16, batch_size=batch_size, lambda_max_rows=lambda_max_rows, progress=progress,
                         **({"dtype": dtype} if dtype is not None else {}))
    out = {}
    for d in (depth, *other_depths):
        direction = BehaviourDirection.fit(model, queries, anchors, layer=depth_layer(model, d), tokenizer=tokenizer,
                                           max_length=max_length, batch_size=batch_size, bf16=bf16, progress=progress)
        probe = Influence(model, replace(args, method="probe"), behaviour=direction,
                          tokenizer=tokenizer).scores(train, queries)["scores"]
        run = Influence(model, replace(args, method="linfac", measurement="behaviour"), out_dir=out_dir,
                        behaviour=direction, tokenizer=tokenizer)
        behaviour = behaviour_scores(run, train, queries)["linfac"]["scores"]
        suffix = "" if d == depth else depth_suffix(d)
        out |= {f"probe{suffix}": aggregate(probe.double()), f"linfac_behaviour{suffix}": aggregate(behaviour.double())}
    anchored = Influence(model, replace(args, method="repsim_anchored"), anchors=anchors,
                         tokenizer=tokenizer).scores(train, queries)["scores"]
    return {**out, "repsim_anchored": aggregate(anchored.double())}


def checkpoint_rankings(checkpoints, tokenizer, train, iqs, counter, *, out_dir: Path | None = None,
                        max_length: int = 192, lambda_max_rows: int = 128, bf16: bool = False, batch_size: int = 8,
                        progress: bool = False, dtype: str | None = None, depth: float | None = None
                        ) -> dict[str, torch.Tensor]:
    """{ranking: [N]} of ``CHECKPOINT_RANKINGS`` over ``checkpoints`` (a fine-tuning run directory that kept them,
    with Adam's state), the behaviour direction refitted at each checkpoint (at ``depth``) from the IQs against
    ``counter``."""
    from lancet.data import encode_records
    from lancet.influence import BehaviourDirection, CheckpointInfluence, InfluenceArgs

    queries = encode_records(iqs, tokenizer, max_length, progress=False)
    anchors = encode_records(counter, tokenizer, max_length, progress=False)

    def direction(model):
        return BehaviourDirection.fit(model, queries, anchors, layer=depth_layer(model, depth), tokenizer=tokenizer,
                                      max_length=max_length, batch_size=batch_size, bf16=bf16, progress=False)

    args = InfluenceArgs(method="linfac", measurement="behaviour", bf16=bf16, batch_size=batch_size,
                         lambda_max_rows=lambda_max_rows, progress=progress,
                         **({"dtype": dtype} if dtype is not None else {}))
    common = {"tokenizer": tokenizer, "max_length": max_length, "behaviour": direction}
    linfac = CheckpointInfluence(checkpoints, args, out_dir=out_dir, **common).behaviour_scores(train, queries)
    adam = CheckpointInfluence(checkpoints, replace(args, method="cosine"), adam=True,
                               out_dir=None if out_dir is None else out_dir / "adam", **common
                               ).behaviour_scores(train, queries, ["cosine", "identity"])
    return {"linfac_behaviour_ckpt": linfac["linfac"]["scores"][0].double(),
            "cosine_behaviour_adam_ckpt": adam["cosine"]["scores"][0].double(),
            "identity_behaviour_adam_ckpt": adam["identity"]["scores"][0].double()}
