"""`lancet attribute`: load, tokenize, score, rank, and write the recall table of a run."""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch

from lancet import distributed as dist
from lancet.artifacts import atomic_save_tensors, atomic_write_json
from lancet.constants import DEFAULT_MAX_LENGTH, IGNORE_INDEX
from lancet.curvature.estimators import BEHAVIOUR_METHODS, GRADIENT_FREE_METHODS
from lancet.data import encode_records, load_dataset_spec
from lancet.errors import DataError, LancetError, NonFiniteError
from lancet.influence import Influence, InfluenceArgs
from lancet.influence.recall import aggregate, average_precision, format_table, recall_at_k, top_k
from lancet.influence.regime import RegimeReadout

log = logging.getLogger(__name__)


def read_culprit_labels(path: str | Path, ids: list[str], key: str = "culprit_ids") -> torch.Tensor:
    """A JSON file {"culprit_ids": [...]} (as the demo writes; another list with ``key``) -> boolean mask over
    ``ids``."""
    try:
        data = json.loads(Path(path).read_text())
    except json.JSONDecodeError as exc:
        raise DataError(f"cannot read culprit labels: invalid JSON ({exc.msg}, column {exc.colno})", path=str(path),
                        line=exc.lineno) from exc
    except (OSError, UnicodeDecodeError) as exc:
        raise DataError(f"cannot read culprit labels ({exc})", path=str(path)) from exc
    if not isinstance(data, dict) or not isinstance(data.get(key), list):
        raise DataError(f"expected an object with a list '{key}'", path=str(path), field=key)
    wanted = set(data[key])
    return torch.tensor([i in wanted for i in ids])


def contrast_scores(influence: Influence, train, queries, query_records, contrast_response: str, tokenizer,
                    max_length: int) -> torch.Tensor:
    """Scores of the margin log p(undesirable | x) - log p(contrast | x) for each IQ: the IQ's scores minus those of
    the same prompt answered with ``contrast_response`` (influence is linear in the query gradient). Rows that raise
    both answers alike (shared style, format, language) cancel; rows that favour the undesirable answer over the
    contrast remain. The contrast is one fixed text (e.g. a generic refusal), not a new label."""
    contrast = encode_records([r.with_response(contrast_response) for r in query_records], tokenizer, max_length,
                              progress=False)
    return queries_scores(influence, train, queries) - queries_scores(influence, train, contrast)


def queries_scores(influence: Influence, train, queries) -> torch.Tensor:
    return influence.scores(train, queries)["scores"]


@dataclass
class AttributionData:
    """One round's rows, read and encoded once and shared by every stage that reads them (ranking, compared
    methods, token scores, index, correction): the training and IQ Records, their encodings, the culprit mask."""

    train_spec: str
    queries_spec: str
    train_records: list
    query_records: list
    train: Any  # EncodedDataset
    queries: Any
    culprits: torch.Tensor | None
    regime: RegimeReadout | None = None  # built on first use and shared, so BM25 is scored once a round

    @classmethod
    def load(cls, tokenizer, train_spec: str, queries_spec: str, max_length: int, progress: bool = True,
             labels: str | None = None, train_records: list | None = None) -> AttributionData:
        """Read (unless ``train_records`` are given: already read) and encode; bad IQs and labels fail here,
        before any work, with the file and line."""
        train_records = list(train_records) if train_records is not None else load_dataset_spec(train_spec)
        query_records = load_dataset_spec(queries_spec)
        for r in query_records:
            if r.response_text is None:
                raise DataError("influence queries need the undesirable response", path=r.source, line=r.line,
                                field="response")
        train = encode_records(train_records, tokenizer, max_length, progress=progress)
        queries = encode_records(query_records, tokenizer, max_length, progress=progress)
        for r, item in zip(query_records, queries, strict=True):  # a query with no scored token has zero gradient
            if all(t == IGNORE_INDEX for t in item["labels"][1:]):
                raise DataError(f"no response tokens left after cutting the row to {max_length} tokens "
                                "(--max-length); shorten the prompt or raise --max-length", path=r.source,
                                line=r.line, field="response")
        culprits = read_culprit_labels(labels, train.ids) if labels else None
        return cls(train_spec, queries_spec, train_records, query_records, train, queries, culprits)

    def extra(self, **more) -> dict[str, Any]:
        # "regime": which regime am I in (lancet.influence.regime), read by _rank off each ranking
        if self.regime is None:
            self.regime = RegimeReadout(self.train_records, self.query_records, self.train, self.queries)
        return {"train": self.train_spec, "queries": self.queries_spec, "n_queries": len(self.queries),
                "regime": self.regime, **more}


def attribute(model, tokenizer, train_spec: str, queries_spec: str, out_dir: str | Path, args: InfluenceArgs, *,
              max_length: int = DEFAULT_MAX_LENGTH, labels: str | None = None, k: int = 10,
              contrast_response: str | None = None, influence: Influence | None = None,
              aggregate_first: bool = False, index: str | Path | None = None,
              index_any_model: bool = False, data: AttributionData | None = None,
              behaviour: Any = None, anchors: Any = None) -> dict[str, Any]:
    """Rank ``train_spec`` rows by influence on the IQs of ``queries_spec``; with ``contrast_response``, by
    influence on the margin over that answer (``contrast_scores``). ``influence``: an entry object on the same
    model, options and ``out_dir`` to use (and keep its curvature for the caller), instead of a new one.
    ``aggregate_first``: score the normalised mean over the IQs as one full-rank query (``combined_scores``; its
    weights estimated on a sample of rows): the cost of one IQ however many there are, and no per-IQ scores.
    ``index``: score the IQs from a gradient index (``Influence.index_scores``), no pass over the training rows;
    ``index_any_model``: also an index built on another model (a correction round reusing round 0's).
    ``data``: the rows already read and encoded (``AttributionData.load``), instead of reading the two specs.
    ``behaviour``: for ``measurement="behaviour"`` and method ``probe``, a ``BehaviourDirection`` or the
    ``BehaviourArgs`` to fit one from (the IQs against its counter rows); the measurement is then scored as one
    query, the mean over the IQs (``behaviour.behaviour_scores``), and the ranking holds that one row."""
    out = Path(out_dir)
    data = data or AttributionData.load(tokenizer, train_spec, queries_spec, max_length, args.progress, labels)
    train_records, query_records, train, queries, culprits = (data.train_records, data.query_records, data.train,
                                                              data.queries, data.culprits)
    t0 = time.perf_counter()
    if influence is None:
        influence = Influence(model, args, out_dir=out, tokenizer=tokenizer, max_length=max_length,
                              behaviour=_direction(model, tokenizer, data, args, behaviour, max_length),
                              anchors=anchors)  # repsim_anchored's anchor rows (Records or tokenised rows)
    elif influence.model is not model or influence.args != args or influence.out != out:
        raise LancetError("attribute(influence=...) must be built on the same model, options and out_dir")
    if args.measurement == "behaviour":
        if contrast_response is not None or aggregate_first:
            raise LancetError("the behaviour measurement is one query contrasted with the counter rows already: no "
                              "--contrast-response or --aggregate-first")
        if index is None and args.method not in GRADIENT_FREE_METHODS:
            from lancet.influence.behaviour import behaviour_scores

            scores = behaviour_scores(influence, train, queries)[args.method]["scores"]
            return _rank(out, args, scores, time.perf_counter() - t0, train_records, train, culprits,
                         data.extra(contrast_response=None, behaviour=_describe(influence, behaviour)), k)
    if aggregate_first:
        if args.method in GRADIENT_FREE_METHODS:
            raise LancetError(f"--aggregate-first needs a gradient method ({args.method} has no query gradient)")
        both, virtual = queries, None
        if contrast_response is not None:  # each margin IQ - contrast is one query of the normalised mean
            contrast = encode_records([r.with_response(contrast_response) for r in query_records], tokenizer,
                                      max_length, progress=False)
            both = list(queries) + list(contrast)
            virtual = torch.cat([torch.eye(len(queries)), -torch.eye(len(queries))], 1).double()
        weights = influence.normalized_mean_weights(train, both, virtual=virtual)[args.method]
        aggregated = influence.combined_scores(train, both, weights[None])["scores"][0]
        return _rank(out, args, None, time.perf_counter() - t0, train_records, train, culprits,
                     data.extra(contrast_response=contrast_response, aggregate_first=True), k, aggregated=aggregated)
    if index is not None:
        if aggregate_first or contrast_response is not None:
            raise LancetError("--index scores the IQs themselves: no --aggregate-first or --contrast-response")
        scores = influence.index_scores(queries, index, train=train, any_model=index_any_model)["scores"]
        more = {}
        if args.measurement == "behaviour":  # the mean over the IQs: the behaviour's one query (scores are linear)
            scores, more = scores.mean(0, keepdim=True), {"behaviour": _describe(influence, behaviour)}
        return _rank(out, args, scores, time.perf_counter() - t0, train_records, train, culprits,
                     data.extra(contrast_response=None, index=str(index), **more), k)
    if contrast_response is None:
        scores = queries_scores(influence, train, queries)
        if args.method in BEHAVIOUR_METHODS:
            return _rank(out, args, scores, time.perf_counter() - t0, train_records, train, culprits,
                         data.extra(contrast_response=None, behaviour=_describe(influence, behaviour)), k)
    else:
        if args.method in GRADIENT_FREE_METHODS:
            raise LancetError(f"a contrast response needs a gradient method ({args.method} has no gradients)")
        scores = contrast_scores(influence, train, queries, query_records, contrast_response, tokenizer, max_length)
    return _rank(out, args, scores, time.perf_counter() - t0, train_records, train, culprits,
                 data.extra(contrast_response=contrast_response), k)


def attribute_methods(model, tokenizer, train_spec: str, queries_spec: str, out_dir: str | Path,
                      args: InfluenceArgs, methods: list[str], *, max_length: int = DEFAULT_MAX_LENGTH,
                      labels: str | None = None, k: int = 10, data: AttributionData | None = None,
                      influence: Influence | None = None, behaviour: Any = None, anchors: Any = None
                      ) -> dict[str, dict[str, Any]]:
    """``attribute`` for several methods with one scoring pass over the training rows
    (``Influence.scores_by_method``): the same files per method (``ranking-<method>.safetensors``,
    ``influence-<method>.json``), whose "seconds" is the whole shared run's. ``data`` and ``influence`` as in
    ``attribute`` (the influence object plans every method; its own curvature is kept), and ``behaviour`` as in
    ``attribute`` (with ``measurement="behaviour"`` every gradient method scores the behaviour's one query)."""
    out = Path(out_dir)
    data = data or AttributionData.load(tokenizer, train_spec, queries_spec, max_length, args.progress, labels)
    t0 = time.perf_counter()
    if influence is None:
        needs = args.measurement == "behaviour" or any(m in BEHAVIOUR_METHODS for m in methods)
        influence = Influence(model, args, out_dir=out, tokenizer=tokenizer, max_length=max_length,
                              behaviour=_direction(model, tokenizer, data, args, behaviour, max_length, needs),
                              anchors=anchors)
    elif influence.model is not model or influence.out != out:
        raise LancetError("attribute_methods(influence=...) must be built on the same model and out_dir")
    if influence.args.measurement == "behaviour":
        from lancet.influence.behaviour import behaviour_scores

        scores = behaviour_scores(influence, data.train, data.queries, methods)
    else:
        scores = influence.scores_by_method(data.train, data.queries, methods)
    seconds = time.perf_counter() - t0
    more = {"behaviour": _describe(influence, behaviour)} if influence.behaviour is not None else {}
    extra = data.extra(contrast_response=None, shared_pass=list(methods), **more)
    return {m: _rank(out, replace(influence.args, method=m), scores[m]["scores"], seconds, data.train_records,
                     data.train, data.culprits, extra, k)
            for m in methods}


def _direction(model, tokenizer, data: AttributionData, args: InfluenceArgs, behaviour: Any, max_length: int,
               needed: bool | None = None):
    """The behaviour direction of a run: given, fitted from ``BehaviourArgs`` (the IQs against its counter rows),
    or None when neither the measurement nor the method needs one."""
    from lancet.influence.behaviour import BehaviourArgs, fit_direction

    needed = (args.measurement == "behaviour" or args.method in BEHAVIOUR_METHODS) if needed is None else needed
    if behaviour is None:
        if needed:
            raise LancetError("the behaviour measurement and the probe method need counter rows: --counter FILE "
                              "(\"behaviour\": {\"counter\": FILE} in a run config's \"influence\")")
        return None
    if not isinstance(behaviour, BehaviourArgs):
        return behaviour  # a BehaviourDirection already
    return fit_direction(model, tokenizer, data.queries, behaviour, max_length=max_length,
                         batch_size=args.batch_size, bf16=args.bf16, progress=args.progress)


def _describe(influence: Influence, behaviour: Any) -> dict[str, Any]:
    """The direction's provenance for the summary, with the counter rows' data spec when known."""
    from lancet.influence.behaviour import BehaviourArgs

    out = influence.behaviour.describe()
    if isinstance(behaviour, BehaviourArgs):
        out["counter_spec"] = behaviour.counter
    return out


def _rank(out: Path, args: InfluenceArgs, scores: torch.Tensor | None, seconds: float, train_records, train, culprits,
          extra: dict[str, Any], k: int, aggregated: torch.Tensor | None = None, name: str | None = None
          ) -> dict[str, Any]:
    """Aggregate, write ``ranking-<name>.safetensors`` and ``influence-<name>.json``, return the summary.
    ``aggregated``: the normalised mean, already aggregated (``--aggregate-first``; no per-IQ ``scores``).
    ``name``: the ranking's name when it is not the method's (``cosine_adam_ckpt``: lancet.influence.checkpoints)."""
    name = name or args.method
    checked = scores if scores is not None else aggregated
    if not torch.isfinite(checked).all():
        bad = int((~torch.isfinite(checked)).sum())
        raise NonFiniteError(f"{bad} of {checked.numel()} influence scores are NaN or infinite (non-finite "
                             "gradients: check the model's weights and the data); nothing was ranked")
    if scores is not None:
        agg = {how: aggregate(scores, how) for how in ("normalized_mean", "sum")}
        tensors = {"scores": scores, **{f"aggregate_{h}": v for h, v in agg.items()}}
    else:
        agg = {"normalized_mean": aggregated}
        tensors = {"aggregate_normalized_mean": aggregated}
    if dist.is_main():
        atomic_save_tensors(out / f"ranking-{name}.safetensors", tensors)
    summary: dict[str, Any] = {
        "method": name, "train": extra["train"], "queries": extra["queries"], "n_train": len(train),
        "n_queries": extra["n_queries"], "seconds": round(seconds, 2), "ids": train.ids,
        "contrast_response": extra["contrast_response"],
        "top_positive": top_k(train_records, agg["normalized_mean"], k),
        "top_negative": top_k(train_records, agg["normalized_mean"], k, negative=True),
        "args": args.to_json(),
    }
    for key in ("shared_pass", "aggregate_first", "index", "behaviour", "checkpoints"):
        if key in extra:
            summary[key] = extra[key]
    if "regime" in extra:  # would text search do as well? IQ/top-row n-gram overlap, agreement with BM25
        summary["regime"] = extra["regime"](agg["normalized_mean"])
    if culprits is not None:
        summary["recall"] = {
            "n_culprits": int(culprits.sum()),
            "average_precision": average_precision(agg["normalized_mean"], culprits),
            **{f"recall@{n}": recall_at_k(agg["normalized_mean"], culprits, n) for n in (10, 25, 50)},
        }
    if dist.is_main():
        atomic_write_json(out / f"influence-{name}.json", summary)
    dist.barrier()
    return summary


def print_summary(summary: dict[str, Any]) -> None:
    print(f"\n{summary['method']}: {summary['n_train']} training rows x {summary['n_queries']} queries "
          f"in {summary['seconds']} s")
    print("\nrows that drive the behaviour (positive influence):")
    print(format_table(summary["top_positive"]))
    print("\nrows that counter it (negative influence):")
    print(format_table(summary["top_negative"][:5]))
    if "recall" in summary:
        r = summary["recall"]
        print(f"\nknown culprits: {r['n_culprits']}, average precision {r['average_precision']:.3f}, "
              f"recall@10 {r['recall@10']:.2f}, recall@50 {r['recall@50']:.2f}")
    if "regime" in summary:
        g = summary["regime"]
        print(f"\nregime: the top {g['k']} rows share {g['iq_ngram_overlap']:.0%} of their word 4-grams with the IQ "
              f"answers, and {g['bm25_top_overlap']:.0%} of them are BM25's top {g['k']} too (both high: text search "
              "may find them as well; lancet.influence.regime)")
