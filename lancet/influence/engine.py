"""``Influence``, the engine: fit curvature once (an artifact), score many query sets, several estimators in one
pass over the training rows, token scores, a gradient index.

One object serves every method: it keeps a fitted curvature per method (``fit(train, method=...)``), so scoring
several methods together plans them on this object instead of cloning it. Each scoring call has one return shape:
``scores`` and ``combined_scores`` give this run's method ``{"scores": [Q, N], ...}``; ``scores_by_method`` and
``combined_scores_by_method`` give ``{method: {"scores": ...}}``.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch

from lancet import distributed as dist
from lancet.artifacts import atomic_save_tensors, check_or_write_meta, hash_json, load_tensors, model_fingerprint
from lancet.constants import (
    DEFAULT_MAX_LENGTH,
    JOINT_SCORING_MAX_BYTES,
    NORMALIZED_MEAN_QUERY_BYTES,
    NORMALIZED_MEAN_QUERY_RANK,
    NORMALIZED_MEAN_SAMPLE_ROWS,
    QUERY_CHUNK,
)
from lancet.curvature.estimators import BEHAVIOUR_METHODS, GRADIENT_FREE_METHODS
from lancet.curvature.fit import CURVATURE_OPTIONS, Curvature, data_fingerprint, fit_curvature
from lancet.curvature.modules import find_tracked_layers
from lancet.errors import LancetError, NonFiniteError
from lancet.hardware import model_device
from lancet.influence.arguments import InfluenceArgs, default_method
from lancet.influence.bm25 import bm25_scores
from lancet.influence.gradient_scale import GradientScale, check_scaled_method
from lancet.influence.index import IndexArgs
from lancet.influence.measurement import Measurement, resolve_measurement
from lancet.influence.memory import estimate_memory
from lancet.influence.recall import normalized_mean_weights
from lancet.influence.repsim import anchored_repsim_scores, repsim_scores
from lancet.influence.rows import as_rows
from lancet.influence.scoring import (
    PreconditionedQueries,
    concat_queries,
    precondition_combined,
    precondition_queries,
    query_gradients,
    row_metric,
    score_rows,
    token_scores,
)


class Influence:
    """The entry object: ``fit`` the curvature of ``train`` once, then ``scores`` for any query set.

        run = Influence(model, method="linfac", tokenizer=tok, out_dir="run")      # tokenizer: rows of text
        run.fit(train)                                            # Records, prompt/response dicts or tokenised rows
        s = run.scores(train, iqs)["scores"]                      # [Q, N]; positive = the row drives the IQ
        s2 = run.scores(train, other_iqs)                         # a new query set: the curvature is reused
        both = run.scores_by_method(train, iqs, ["linfac", "ekfac", "identity", "bm25"])   # one pass, {method: ...}
        tokens = run.token_scores(top_rows, iqs)                  # [Q, T] per row: where in the row it comes from
        run.keep_queries = True   # set before scores(): token_scores on the same IQs reuse their preconditioning
        Influence(model, measurement=Measurement(fn, name="margin"))  # explain another scalar than the answer's CE
        Influence(model, measurement="behaviour", behaviour=direction)  # the IQs' activation along a direction
        Influence(model, method="probe", behaviour=direction)          # rows' own activation along it, no gradient

    With ``out_dir`` every stage is an artifact there (safetensors + JSON with a fingerprint of model weights, data
    and options): reused on a matching rerun, refused on a mismatch, resumed by chunk after a kill.

    Under torchrun (WORLD_SIZE > 1) every rank builds the same object on the same model and rows: curvature sums
    are all-reduced, training rows are scored in shards and gathered, every rank returns the same result, and only
    rank 0 writes artifacts (docs/scaling.md).
    """

    def __init__(self, model, args: InfluenceArgs | None = None, *, out_dir: str | Path | None = None,
                 measurement: Measurement | str | None = None, tokenizer=None,
                 max_length: int = DEFAULT_MAX_LENGTH, behaviour=None, gradient_scale: GradientScale | None = None,
                 anchors=None, **options):
        dist.init_from_env()
        self.model = model
        self.tokenizer, self.max_length = tokenizer, max_length
        if args is None and "method" not in options:  # a measurement or Adam's scale needs a gradient method
            spec = measurement if isinstance(measurement, str) else options.get("measurement", "answer")
            user_measurement = measurement is not None and not isinstance(measurement, str)
            options["method"] = default_method(spec, user_measurement or gradient_scale is not None)
        self.args = args or InfluenceArgs(**options)
        if isinstance(measurement, str):  # a built-in by name ("first_tokens:8")
            self.args, measurement = replace(self.args, measurement=measurement), None
        if measurement is not None:  # a user measurement: its name and version go into every fingerprint
            self.args = replace(self.args, measurement=measurement.spec)
        elif "@" in self.args.measurement:
            raise LancetError(f"measurement {self.args.measurement!r} is a user Measurement: pass the object "
                              "(Influence(..., measurement=...))")
        # behaviour: a BehaviourDirection (lancet.influence.behaviour), for measurement="behaviour" and method "probe"
        self.behaviour = behaviour if behaviour is not None else getattr(measurement, "direction", None)
        self.measurement = resolve_measurement(measurement if measurement is not None else self.args.measurement,
                                               self.behaviour)
        # gradient_scale: Adam's per-parameter step scale dividing every gradient (identity, cosine), named in the
        # args as the measurement is (lancet.influence.gradient_scale)
        self.gradient_scale = gradient_scale
        if gradient_scale is not None:
            self.args = replace(self.args, gradient_scale=gradient_scale.spec)
        elif self.args.gradient_scale != "none":
            raise LancetError(f"gradient_scale {self.args.gradient_scale!r}: pass the object "
                              "(Influence(..., gradient_scale=GradientScale.from_checkpoint(DIR)))")
        self.anchors = anchors  # rows the anchored representation methods subtract (repsim_anchored)
        self.out = Path(out_dir) if out_dir is not None else None
        self._curvatures: dict[str, Curvature] = {}  # fitted (or read) per method
        self._model_fp: str | None = None
        # keep the last preconditioned query set for the next call on the same queries (scores, then token scores of
        # their top rows); off by default: at full rank it is Q x the tracked parameters
        self.keep_queries = False
        self._kept_queries: tuple[tuple[str, str], PreconditionedQueries] | None = None

    # -- state ------------------------------------------------------------------------------------------------------

    @property
    def model_fp(self) -> str:
        if self._model_fp is None:
            self._model_fp = model_fingerprint(self.model)
        return self._model_fp

    @property
    def fitted(self) -> bool:
        return self.args.method in self._curvatures

    @property
    def _curvature(self) -> Curvature | None:
        return self._curvatures.get(self.args.method)

    def _args(self, method: str | None) -> InfluenceArgs:
        return self.args if method is None or method == self.args.method else replace(self.args, method=method)

    def _fitted(self, method: str) -> Curvature:
        if method not in self._curvatures:
            raise LancetError("call fit(train) before scoring")
        return self._curvatures[method]

    def with_options(self, **changes) -> Influence:
        """The same run with other options (``query_rank``, ``per_layer``, ...): a new ``Influence`` on the same
        model, tokenizer, measurement and out_dir that shares this one's fitted curvatures when none of the options
        that shape them (``curvature.fit.CURVATURE_OPTIONS``) changed, and fits its own on first use otherwise."""
        args = replace(self.args, **changes)
        other = Influence(self.model, args, out_dir=self.out, measurement=self.measurement, tokenizer=self.tokenizer,
                          max_length=self.max_length, behaviour=self.behaviour, gradient_scale=self.gradient_scale,
                          anchors=self.anchors)
        other._model_fp = self._model_fp
        same = [k for k in CURVATURE_OPTIONS if k != "method"]
        if self.args.fingerprint_dict(same) == args.fingerprint_dict(same):
            other._curvatures = dict(self._curvatures)
        return other

    def release_queries(self) -> None:
        """Stop keeping preconditioned queries (``keep_queries``) and free the kept set."""
        self.keep_queries, self._kept_queries = False, None

    def layer_names(self) -> list[str]:
        return [layer.name for layer in find_tracked_layers(self.model, self.args.modules)]

    def _rows(self, data, what: str) -> list[dict[str, Any]]:
        rows = as_rows(data, what, self.tokenizer, self.max_length)
        if what == "queries" and self.args.measurement == "spans" and not all(r.get("spans") for r in rows):
            from lancet.data import Record
            from lancet.data.tokenize import restrict_to_spans

            records = getattr(data, "records", None) or (list(data) if all(isinstance(r, Record) for r in data)
                                                         else None)
            if records is None or self.tokenizer is None:
                raise LancetError("measurement 'spans' needs the queries as Records (or an EncodedDataset) with "
                                  "meta.behaviour_spans, and Influence(..., tokenizer=...)")
            rows = restrict_to_spans(rows, records, self.tokenizer)
        return rows

    # -- curvature and queries --------------------------------------------------------------------------------------

    def fit(self, train, method: str | None = None) -> Curvature | None:
        """The curvature of ``train`` for ``method`` (default: this run's; None for the gradient-free methods, bm25
        and repsim: nothing to fit)."""
        args = self._args(method)
        rows = self._rows(train, "train")
        if args.method in GRADIENT_FREE_METHODS:
            return None
        if self.gradient_scale is not None:
            check_scaled_method(args.method)
        cdir = self.out / "curvature" / args.method if self.out is not None else None
        self._kept_queries = None
        curvature = fit_curvature(self.model, rows, args, out_dir=cdir,
                                  model_fp=self.model_fp if self.out is not None else None)
        self._curvatures[args.method] = curvature
        return curvature

    def preconditioned_queries(self, queries, method: str | None = None, *,
                               args: InfluenceArgs | None = None) -> PreconditionedQueries:
        """The queries' gradients preconditioned by ``method``'s fitted curvature (``args``: other scoring options,
        e.g. a query rank)."""
        args = args or self._args(method)
        curvature = self._fitted(args.method)
        rows = self._rows(queries, "queries")
        key = (args.method, data_fingerprint(rows)) if self.keep_queries else None  # hashed only when kept
        if key is not None and self._kept_queries is not None and self._kept_queries[0] == key:
            return self._kept_queries[1]
        # with low-rank queries, QUERY_CHUNK at a time: the raw gradients of all queries at once ([Q, out, in] per
        # layer) would need what the low rank saves (74 queries of SmolLM2-135M: 31 GB)
        step = QUERY_CHUNK if args.query_rank is not None else max(1, len(rows))
        parts = [precondition_queries(curvature, query_gradients(self.model, curvature.layers, rows[i:i + step],
                                                                 args, self.measurement), args,
                                      self._divisors(curvature))
                 for i in range(0, len(rows), step)]
        pre = parts[0] if len(parts) == 1 else concat_queries(parts)
        self._kept_queries = (key, pre) if key is not None else None
        return pre

    def combined_queries(self, queries, coefficients: torch.Tensor, method: str | None = None
                         ) -> PreconditionedQueries:
        """K full-rank preconditioned queries, sum_q C[k, q] P_q, folded QUERY_CHUNK queries at a time (memory: K
        dense queries plus one chunk, whatever the number of queries)."""
        curvature = self._fitted(self._args(method).method)
        rows = self._rows(queries, "queries")
        coefficients = torch.as_tensor(coefficients, dtype=self.args.stats_dtype)
        if coefficients.ndim != 2 or coefficients.shape[1] != len(rows):
            raise LancetError(f"coefficients must be [K, {len(rows)}] (one column per query), got "
                              f"{list(coefficients.shape)}")
        args = replace(self._args(method), query_rank=None)
        used = coefficients.ne(0).any(0).nonzero().flatten().tolist()  # a query no combination uses costs nothing
        if not used:
            raise LancetError("coefficients are all zero: no query to combine")
        rows, coefficients = [rows[i] for i in used], coefficients[:, used]
        full: dict[str, torch.Tensor] = {}
        divisors = self._divisors(curvature)
        for i in range(0, len(rows), QUERY_CHUNK):
            grads = query_gradients(self.model, curvature.layers, rows[i:i + QUERY_CHUNK], args, self.measurement)
            precondition_combined(curvature, grads, coefficients[:, i:i + QUERY_CHUNK], args, full, divisors)
        k = coefficients.shape[0]
        unit = curvature.estimator.unit_gradients
        return PreconditionedQueries(full=full, low_rank={}, n_queries=k,
                                     unit_rows=torch.ones(k, dtype=torch.bool) if unit else None,
                                     row_metric=row_metric(curvature, divisors))

    def _divisors(self, curvature: Curvature) -> dict[str, torch.Tensor] | None:
        """The gradient scale's d per tracked layer (None without a scale)."""
        if self.gradient_scale is None:
            return None
        check_scaled_method(curvature.estimator.name)
        return self.gradient_scale.divisors(curvature.layers, self.args.stats_dtype, model_device(self.model))

    # -- scores -----------------------------------------------------------------------------------------------------

    def scores(self, train, queries) -> dict[str, torch.Tensor]:
        """{"scores": [Q, N]} of this run's method (plus "per_layer": [Q, N, L] with per_layer=True)."""
        train_rows, query_rows = self._rows(train, "train"), self._rows(queries, "queries")
        method = self.args.method
        if method in GRADIENT_FREE_METHODS:
            return self._gradient_free(method, train_rows, query_rows)
        store = self._stored_scores(train_rows, query_rows, method)
        if store.result is not None:
            return store.result
        self._prepare_store(train_rows, store, method)
        pre = self.preconditioned_queries(query_rows)
        result = score_rows(self.model, self._fitted(method).layers, train_rows, pre, self.args, out_dir=store.dir)
        return self._keep(result, store)

    def scores_by_method(self, train, queries, methods: Sequence[str], *,
                         max_joint_bytes: int = JOINT_SCORING_MAX_BYTES) -> dict[str, dict[str, torch.Tensor]]:
        """{method: {"scores": ...}}, each equal to that method's own ``scores`` (the other options are this run's;
        to rounding: the [Q, N] matmul is blocked differently), with one pass over the training rows: each method
        fits (or reuses) its curvature and preconditions the queries; one backward per batch then gives the (a, g)
        pairs that every method's preconditioned queries are contracted with. Stored per method as ``scores``
        stores them; the joint pass resumes by chunk. Methods whose preconditioned queries together exceed
        ``max_joint_bytes`` are scored in further passes. The other methods' curvatures are freed once their queries
        are preconditioned (this run's own is kept)."""
        train_rows, query_rows = self._rows(train, "train"), self._rows(queries, "queries")
        names = list(dict.fromkeys(methods))
        out: dict[str, dict[str, torch.Tensor]] = {}
        pending: list[tuple[str, _ScoreStore]] = []
        for method in names:
            if method in GRADIENT_FREE_METHODS:
                out[method] = self._gradient_free(method, train_rows, query_rows)
                continue
            store = self._stored_scores(train_rows, query_rows, method)
            if store.result is not None:
                out[method] = store.result
            else:
                pending.append((method, store))
        per_method = estimate_memory(self.model, self.args).per_query_bytes * len(query_rows)  # the same for all
        while pending:
            group, size = [], 0
            while pending and (not group or size + per_method <= max_joint_bytes):
                group.append(pending.pop(0))
                size += per_method
            pres = []
            for method, store in group:
                self._prepare_store(train_rows, store, method)
                pres.append(self.preconditioned_queries(query_rows, method))
            out.update(self._joint_pass(train_rows, group, pres))
        return {method: out[method] for method in names}

    def combined_scores(self, train, queries, coefficients) -> dict[str, torch.Tensor]:
        """Scores of K linear combinations of the queries, C @ scores ([K, N], plus "per_layer" [K, N, L]), from
        one pass in which each combination is a single full-rank query: exact (no query_rank truncation), and its
        cost does not grow with the number of queries. ``aggregate``'s normalised mean is such a combination once
        each query's RMS is known (``normalized_mean_weights``). Stored and resumed like ``scores``."""
        return self.combined_scores_by_method(train, queries, coefficients, [self.args.method])[self.args.method]

    def combined_scores_by_method(self, train, queries, coefficients, methods: Sequence[str]
                                  ) -> dict[str, dict[str, torch.Tensor]]:
        """``combined_scores`` of several methods from one joint pass, {method: {...}}; ``coefficients`` may be
        {method: C} (each method its own weights and K)."""
        train_rows, query_rows = self._rows(train, "train"), self._rows(queries, "queries")
        names = list(dict.fromkeys(methods))
        per_method = {m: torch.as_tensor(coefficients[m] if isinstance(coefficients, Mapping) else coefficients,
                                         dtype=torch.float64) for m in names}
        out: dict[str, dict[str, torch.Tensor]] = {}
        pending = []
        for method in names:
            if method in GRADIENT_FREE_METHODS:
                raise LancetError(f"combined_scores: {method} has no query gradient to combine; use scores()")
            store = self._stored_scores(train_rows, query_rows, method,
                                        extra={"combined": hash_json(per_method[method].tolist())})
            if store.result is not None:
                out[method] = store.result
            else:
                pending.append((method, store))
        if pending:
            pres = []
            for method, store in pending:
                self._prepare_store(train_rows, store, method)
                pres.append(self.combined_queries(query_rows, per_method[method], method))
            out.update(self._joint_pass(train_rows, pending, pres))
        return out

    def normalized_mean_weights(self, train, queries, methods: Sequence[str] | None = None, *,
                                sample_rows: int = NORMALIZED_MEAN_SAMPLE_ROWS, seed: int = 0,
                                query_rank: int | None = NORMALIZED_MEAN_QUERY_RANK,
                                virtual: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        """{method: [Q] weights} such that ``combined_scores(train, queries, weights[None])`` is ``aggregate``'s
        normalised mean, with each query's RMS estimated from its scores on a seeded sample of ``sample_rows``
        training rows (all rows, ``query_rank=None``: exact). The curvature is the whole training set's (fitted or
        read from ``out_dir``); the weights only set each query's scale, so a low query rank serves. With
        ``virtual`` [V, Q]: the normalised mean over the V virtual queries ``virtual @ queries`` (e.g. margins
        IQ - contrast), still returned as [Q] coefficients of the real queries."""
        train_rows, query_rows = self._rows(train, "train"), self._rows(queries, "queries")
        order = torch.randperm(len(train_rows), generator=torch.Generator().manual_seed(seed)).tolist()
        sample = [train_rows[i] for i in sorted(order[:sample_rows])]
        args = replace(self.args, query_rank=query_rank, per_layer=False)
        names = list(dict.fromkeys(methods or [self.args.method]))
        for method in names:
            if method in GRADIENT_FREE_METHODS:
                raise LancetError(f"normalized_mean_weights: {method} has no query gradient; use scores()")
        # methods share one pass over the sample while their curvature states fit half of JOINT_SCORING_MAX_BYTES
        # together (an estimator keeps its factors' eigenbases beside them); the queries go through in chunks whose
        # preconditioned copies fit NORMALIZED_MEAN_QUERY_BYTES (360 rank-8 queries of SmolLM2-135M hold 3.5 GB a
        # method: held at once and joined, they took a 24 GB machine to 23.5 GB)
        memory = {m: estimate_memory(self.model, replace(args, method=m)) for m in names}
        groups: list[list[str]] = []
        for method in names:
            if groups and sum(memory[m].factors_bytes for m in groups[-1] + [method]) <= JOINT_SCORING_MAX_BYTES // 2:
                groups[-1].append(method)
            else:
                groups.append([method])
        weights: dict[str, torch.Tensor] = {}
        for group in groups:
            for method in group:
                self.fit(train_rows, method)
            layers = self._curvatures[group[0]].layers
            chunk = max(1, NORMALIZED_MEAN_QUERY_BYTES // max(1, sum(memory[m].per_query_bytes for m in group)))
            parts: list[list[torch.Tensor]] = [[] for _ in group]
            for start in range(0, len(query_rows), chunk):
                rows = query_rows[start:start + chunk]
                pres = [self.preconditioned_queries(rows, args=replace(args, method=m)) for m in group]
                scores = score_rows(self.model, layers, sample, concat_queries(pres), args)["scores"]
                for i in range(len(group)):
                    parts[i].append(scores[i * len(rows):(i + 1) * len(rows)])
            self._release(group)
            for method, part in zip(group, parts, strict=True):
                part = torch.cat(part).double()
                if virtual is None:
                    weights[method] = normalized_mean_weights(part)
                else:
                    v = torch.as_tensor(virtual, dtype=torch.float64)
                    weights[method] = normalized_mean_weights(v @ part) @ v
        return weights

    def token_scores(self, rows, queries) -> list[torch.Tensor]:
        """Per-token scores [Q, T] for each of ``rows`` (few rows: one backward each)."""
        pre = self.preconditioned_queries(queries)
        return token_scores(self.model, self._fitted(self.args.method).layers, self._rows(rows, "rows"), pre,
                            self.args)

    # -- gradient index ---------------------------------------------------------------------------------------------

    def build_index(self, train, index_dir: str | Path, index_args: IndexArgs | None = None) -> dict[str, Any]:
        """Store every training row's projected gradient under ``index_dir`` (lancet.influence.index), with the
        curvature (fitted here on the first build, in this run's out_dir if it has one; kept in the index). Rerun
        with more rows to append them (projected with the index's curvature); a killed build resumes at its last
        finished shard. Returns the index's metadata."""
        from lancet.influence.index import build_index, index_curvature, read_meta

        rows = self._rows(train, "train")
        if self.args.method in GRADIENT_FREE_METHODS:
            raise LancetError(f"{self.args.method} has no gradients to index")
        if self.gradient_scale is not None:
            raise LancetError("a gradient index does not take a gradient scale (Adam normalisation) yet")
        index_args = index_args or IndexArgs(bf16=self.args.bf16, batch_size=self.args.batch_size,
                                             progress=self.args.progress)
        if (Path(index_dir) / "index.json").is_file():
            if read_meta(index_dir)["curvature"] != self.args.method:
                raise LancetError(f"{index_dir}: an index of another curvature ({read_meta(index_dir)['curvature']}) "
                                  "is there; use a new --out")
            curvature = index_curvature(index_dir, self.model, self.args.modules)
        else:
            curvature = self.fit(rows)
        return build_index(self.model, rows, index_dir, index_args, curvature=curvature, model_fp=self.model_fp)

    def index_scores(self, queries, index_dir: str | Path, train=None, rank: int | None = None,
                     any_model: bool = False) -> dict[str, torch.Tensor]:
        """{"scores": [Q, N]} of new queries from a gradient index (``build_index``), with the index's own
        curvature and no pass over the training rows; ``train``, when given, is checked against the indexed rows;
        ``rank``: answer as an index of that lower rank (its leading directions); ``any_model``: accept an index
        built on another model (its rows' gradients are that model's: an approximation the caller chose)."""
        from lancet.influence.index import check_index, index_curvature, query_index

        query_rows = self._rows(queries, "queries")
        if self.gradient_scale is not None:
            raise LancetError("a gradient index does not take a gradient scale (Adam normalisation) yet")
        meta = check_index(index_dir, None if any_model else self.model_fp,
                           self._rows(train, "train") if train is not None else None)
        if meta["curvature"] != self.args.method:
            raise LancetError(f"{index_dir}: the index was built with the {meta['curvature']} curvature, this run "
                              f"uses {self.args.method}")
        curvature = index_curvature(index_dir, self.model, self.args.modules)
        self._curvatures[self.args.method] = curvature  # later token_scores precondition as the ranking did
        return {"scores": query_index(self.model, curvature, query_rows, index_dir, self.args, self.measurement,
                                      rank)}

    # -- storage ----------------------------------------------------------------------------------------------------

    def _gradient_free(self, method: str, train_rows, query_rows) -> dict[str, torch.Tensor]:
        if self.gradient_scale is not None:
            check_scaled_method(method)  # refused: a scale of gradients means nothing to a gradient-free method
        if method == "repsim_anchored":
            if self.anchors is None:
                raise LancetError("repsim_anchored needs anchor rows: Influence(..., anchors=rows) (e.g. the model's "
                                  "own answers to ordinary prompts; --anchors FILE)")
            return {"scores": anchored_repsim_scores(self.model, train_rows, query_rows,
                                                     self._rows(self.anchors, "anchors"),
                                                     batch_size=self.args.batch_size, bf16=self.args.bf16,
                                                     dtype=self.args.stats_dtype, progress=self.args.progress)}
        if method == "bm25":
            return {"scores": bm25_scores(train_rows, query_rows)}
        if method in BEHAVIOUR_METHODS:  # [1, N]: one behaviour, whatever the number of IQs
            from lancet.influence.behaviour import probe_scores

            if self.behaviour is None:
                raise LancetError(f"method {method!r} needs a behaviour direction: Influence(..., behaviour="
                                  "BehaviourDirection.fit(model, iqs, counter_rows, layer=L)), or --counter FILE")
            return {"scores": probe_scores(self.model, train_rows, self.behaviour, batch_size=self.args.batch_size,
                                           bf16=self.args.bf16, progress=self.args.progress)}
        return {"scores": repsim_scores(self.model, train_rows, query_rows, batch_size=self.args.batch_size,
                                        bf16=self.args.bf16, dtype=self.args.stats_dtype,
                                        progress=self.args.progress)}

    def _stored_scores(self, train_rows, query_rows, method: str, extra: dict[str, Any] | None = None
                       ) -> _ScoreStore:
        """Where ``method``'s scores for these rows and queries live, and the stored result if finished."""
        if self.out is None:
            return _ScoreStore(None, {}, None)
        args = self._args(method)
        # a measurement defined by more than its spec (a behaviour direction): its "key" names the scores, all of
        # its fingerprint is checked in meta.json
        measured = self.measurement.fingerprint()
        key = hash_json([args.to_json()["method"], data_fingerprint(query_rows)]
                        + ([args.measurement] if args.measurement != "answer" else [])
                        + ([extra] if extra else []) + ([measured["key"]] if "key" in measured else []))
        if args.gradient_scale != "none":  # scaled and plain scores of one method live side by side
            key = hash_json([key, args.gradient_scale])
        sdir = self.out / "scores" / f"{method}-{key}"
        meta = {"kind": "scores", "method": method, "model": self.model_fp,
                "train": data_fingerprint(train_rows), "queries": data_fingerprint(query_rows),
                "args": args.fingerprint_dict(), **(extra or {}),
                **({"measurement_fingerprint": measured} if measured else {})}
        # checked now, written once the curvature is fitted: a refused or failed fit leaves no scores directory
        check_or_write_meta(sdir / "meta.json", meta, write=False)
        final = sdir / "scores.safetensors"
        found = final.is_file()
        dist.barrier()  # every rank has decided before rank 0 can write anything new
        return _ScoreStore(sdir, meta, load_tensors(final) if found else None)

    def _prepare_store(self, train_rows, store: _ScoreStore, method: str) -> None:
        if method not in self._curvatures:
            self.fit(train_rows, method)
        if store.dir is not None:
            check_or_write_meta(store.dir / "meta.json", store.meta, write=dist.is_main())

    def _release(self, methods: Sequence[str]) -> None:
        """Free the curvature of each of ``methods`` but this run's own (its preconditioned queries are all a
        joint pass needs; the run's own serves later calls such as token scores)."""
        for method in methods:
            if method != self.args.method:
                self._curvatures.pop(method, None)

    def _joint_pass(self, train_rows, group: list[tuple[str, _ScoreStore]], pres: list[PreconditionedQueries]
                    ) -> dict[str, dict[str, torch.Tensor]]:
        """One scoring pass for several methods' preconditioned queries (in the order of ``group``): their queries
        joined, scored together (resumable under ``scores/joint-<key>/``), split back and stored per method."""
        sizes = [pre.n_queries for pre in pres]
        layers = self._curvatures[group[0][0]].layers
        self._release([method for method, _ in group])
        jdir = (None if self.out is None
                else self.out / "scores" / f"joint-{hash_json([str(store.dir) for _, store in group])}")
        result = score_rows(self.model, layers, train_rows, concat_queries(pres), self._args(group[0][0]),
                            out_dir=jdir)
        out, offset = {}, 0
        for (method, store), n in zip(group, sizes, strict=True):
            out[method] = self._keep({k: v[offset:offset + n].clone() for k, v in result.items()}, store)
            offset += n
        if jdir is not None and dist.is_main():
            (jdir / "scores.partial.safetensors").unlink(missing_ok=True)
            if jdir.is_dir():
                jdir.rmdir()
        return out

    def _keep(self, result: dict[str, torch.Tensor], store: _ScoreStore) -> dict[str, torch.Tensor]:
        """Refuse non-finite scores (storing nothing), else store them atomically."""
        sdir = store.dir
        if not torch.isfinite(result["scores"]).all():
            if sdir is not None and dist.is_main():  # not stored: a rerun with repaired weights must not be refused
                for stale in ("scores.partial.safetensors", "meta.json"):
                    (sdir / stale).unlink(missing_ok=True)
            bad = int((~torch.isfinite(result["scores"])).sum())
            raise NonFiniteError(f"{bad} of {result['scores'].numel()} influence scores are NaN or infinite "
                                 "(non-finite gradients: check the model's weights and the data); nothing was stored")
        if sdir is not None:
            if dist.is_main():
                atomic_save_tensors(sdir / "scores.safetensors", result)
                (sdir / "scores.partial.safetensors").unlink(missing_ok=True)
            dist.barrier()
        return result


@dataclass
class _ScoreStore:
    dir: Path | None
    meta: dict[str, Any]
    result: dict[str, torch.Tensor] | None
