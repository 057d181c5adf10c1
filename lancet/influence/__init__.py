"""Influence: which training rows drive the behaviour in the influence queries (IQs).

    scores = Influence(model, method="linfac", tokenizer=tok).scores(train, iqs)["scores"]   # [n_queries, n_train]

Positive scores: up-weighting the row makes the IQ's undesirable answer more likely (the row drives it); negative:
the row counters it. ``Influence`` is the one entry point: fit curvature once (artifact), score many query sets,
several estimators in one pass, token scores. ``pairwise_scores`` and ``score_methods`` are deprecated wrappers.
"""

from __future__ import annotations

import warnings
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
from lancet.curvature.estimators import GRADIENT_FREE_METHODS, METHODS
from lancet.curvature.fit import CURVATURE_OPTIONS, Curvature, data_fingerprint, fit_curvature
from lancet.curvature.modules import find_tracked_layers
from lancet.errors import LancetError, NonFiniteError
from lancet.influence.arguments import InfluenceArgs
from lancet.influence.bm25 import bm25_scores
from lancet.influence.index import IndexArgs
from lancet.influence.measurement import Measurement, resolve_measurement
from lancet.influence.memory import estimate_memory
from lancet.influence.recall import normalized_mean_weights
from lancet.influence.repsim import repsim_scores
from lancet.influence.scoring import (
    PreconditionedQueries,
    precondition_combined,
    precondition_queries,
    query_gradients,
    score_rows,
    token_scores,
)

__all__ = ["METHODS", "IndexArgs", "Influence", "InfluenceArgs", "Measurement", "pairwise_scores", "score_methods"]


def _as_list(values: Any) -> Any:
    return values.tolist() if hasattr(values, "tolist") else values


def as_rows(data: Any, what: str, tokenizer=None, max_length: int = DEFAULT_MAX_LENGTH) -> list[dict[str, Any]]:
    """Rows for the engine, from any of the inputs ``Influence`` takes:
    - tokenised rows: an EncodedDataset, or dicts with ``input_ids`` and ``labels`` (lists, tensors or arrays:
      tensors become lists, so the same rows give the same scores and fingerprints in either form);
    - text: ``Record`` objects, or dicts with ``prompt`` (+ ``response``) or ``messages`` (a list of dicts or a
      ``datasets.Dataset``), tokenised with ``tokenizer`` (labels on the response only).
    Anything else is one clear error."""
    if isinstance(data, str | bytes | dict) or not hasattr(data, "__iter__"):
        raise LancetError(f"{what}: expected a sequence of rows (Records, prompt/response dicts or tokenised rows), "
                          f"got {type(data).__name__}")
    rows = list(data)
    if not rows:
        raise LancetError(f"{what}: no rows")
    if _is_text(rows[0]):
        if tokenizer is None:
            raise LancetError(f"{what}: rows of text need a tokenizer: Influence(model, tokenizer=...)")
        from lancet.data import Record, encode_records
        from lancet.data.readers import records_from_rows

        if all(isinstance(r, Record) for r in rows):
            records = rows
        elif all(isinstance(r, dict) for r in rows):
            records = records_from_rows(rows, what)
        else:
            raise LancetError(f"{what}: mixed row types; give all Records or all dicts")
        return list(encode_records(records, tokenizer, max_length, progress=False))
    for i, row in enumerate(rows):
        if not isinstance(row, dict) or "input_ids" not in row or "labels" not in row:
            raise LancetError(f"{what}: row {i} is a {type(row).__name__} without 'input_ids' and 'labels': give "
                              "Records, prompt/response dicts (with a tokenizer) or tokenised rows")
        if hasattr(row["input_ids"], "tolist") or hasattr(row["labels"], "tolist"):
            rows[i] = row = {**row, "input_ids": _as_list(row["input_ids"]), "labels": _as_list(row["labels"])}
        if len(row["input_ids"]) != len(row["labels"]):
            raise LancetError(f"{what}: row {i} has {len(row['input_ids'])} input_ids but {len(row['labels'])} labels")
    return rows


def _is_text(row: Any) -> bool:
    from lancet.data import Record

    return isinstance(row, Record) or (isinstance(row, dict) and "input_ids" not in row
                                       and ("prompt" in row or "messages" in row))


class Influence:
    """The entry object: ``fit`` the curvature of ``train`` once, then ``scores`` for any query set.

        run = Influence(model, method="linfac", tokenizer=tok, out_dir="run")      # tokenizer: rows of text
        run.fit(train)                                            # Records, prompt/response dicts or tokenised rows
        s = run.scores(train, iqs)["scores"]                      # [Q, N]; positive = the row drives the IQ
        s2 = run.scores(train, other_iqs)                         # a new query set: the curvature is reused
        both = run.scores(train, iqs, methods=["linfac", "ekfac", "identity", "bm25"])   # one pass, {method: ...}
        tokens = run.token_scores(top_rows, iqs)                  # [Q, T] per row: where in the row it comes from
        run.keep_queries = True   # set before scores(): token_scores on the same IQs reuse their preconditioning
        Influence(model, measurement=Measurement(fn, name="margin"))  # explain another scalar than the answer's CE

    With ``out_dir`` every stage is an artifact there (safetensors + JSON with a fingerprint of model weights, data
    and options): reused on a matching rerun, refused on a mismatch, resumed by chunk after a kill.

    Under torchrun (WORLD_SIZE > 1) every rank builds the same object on the same model and rows: curvature sums
    are all-reduced, training rows are scored in shards and gathered, every rank returns the same result, and only
    rank 0 writes artifacts (docs/scaling.md).
    """

    def __init__(self, model, args: InfluenceArgs | None = None, *, out_dir: str | Path | None = None,
                 measurement: Measurement | str | None = None, tokenizer=None,
                 max_length: int = DEFAULT_MAX_LENGTH,
                 **options):
        dist.init_from_env()
        self.model = model
        self.tokenizer, self.max_length = tokenizer, max_length
        self.args = args or InfluenceArgs(**options)
        if isinstance(measurement, str):  # a built-in by name ("first_tokens:8")
            self.args, measurement = replace(self.args, measurement=measurement), None
        if measurement is not None:  # a user measurement: its name and version go into every fingerprint
            self.args = replace(self.args, measurement=measurement.spec)
        elif "@" in self.args.measurement:
            raise LancetError(f"measurement {self.args.measurement!r} is a user Measurement: pass the object "
                              "(Influence(..., measurement=...))")
        self.measurement = resolve_measurement(measurement if measurement is not None else self.args.measurement)
        self.out = Path(out_dir) if out_dir is not None else None
        self._curvature: Curvature | None = None
        self._model_fp: str | None = None
        # keep the last preconditioned query set for the next call on the same queries (scores, then token scores of
        # their top rows); off by default: at full rank it is Q x the tracked parameters
        self.keep_queries = False
        self._kept_queries: tuple[str, PreconditionedQueries] | None = None

    @property
    def model_fp(self) -> str:
        if self._model_fp is None:
            self._model_fp = model_fingerprint(self.model)
        return self._model_fp

    def fit(self, train) -> Curvature | None:
        """The curvature of ``train`` (None for the gradient-free methods, bm25 and repsim: nothing to fit)."""
        rows = self._rows(train, "train")
        if self.args.method in GRADIENT_FREE_METHODS:
            return None
        cdir = self.out / "curvature" / self.args.method if self.out is not None else None
        self._kept_queries = None
        self._curvature = fit_curvature(self.model, rows, self.args, out_dir=cdir,
                                        model_fp=self.model_fp if self.out is not None else None)
        return self._curvature

    def preconditioned_queries(self, queries):
        if self._curvature is None:
            raise LancetError("call fit(train) before scoring")
        layers = self._curvature.layers
        rows = self._rows(queries, "queries")
        key = data_fingerprint(rows) if self.keep_queries else None  # hashed only when something is kept
        if key is not None and self._kept_queries is not None and self._kept_queries[0] == key:
            return self._kept_queries[1]
        # with low-rank queries, QUERY_CHUNK at a time: the raw gradients of all queries at once ([Q, out, in] per
        # layer) would need what the low rank saves (74 queries of SmolLM2-135M: 31 GB)
        step = QUERY_CHUNK if self.args.query_rank is not None else max(1, len(rows))
        parts = [precondition_queries(self._curvature, query_gradients(self.model, layers, rows[i:i + step],
                                                                       self.args, self.measurement), self.args)
                 for i in range(0, len(rows), step)]
        pre = parts[0] if len(parts) == 1 else _concat(parts)
        self._kept_queries = (key, pre) if key is not None else None
        return pre

    def combined_queries(self, queries, coefficients: torch.Tensor) -> PreconditionedQueries:
        """K full-rank preconditioned queries, sum_q C[k, q] P_q, folded QUERY_CHUNK queries at a time (memory: K
        dense queries plus one chunk, whatever the number of queries)."""
        if self._curvature is None:
            raise LancetError("call fit(train) before scoring")
        rows = self._rows(queries, "queries")
        coefficients = torch.as_tensor(coefficients, dtype=self.args.stats_dtype)
        if coefficients.ndim != 2 or coefficients.shape[1] != len(rows):
            raise LancetError(f"coefficients must be [K, {len(rows)}] (one column per query), got "
                              f"{list(coefficients.shape)}")
        args = replace(self.args, query_rank=None)
        used = coefficients.ne(0).any(0).nonzero().flatten().tolist()  # a query no combination uses costs nothing
        if not used:
            raise LancetError("coefficients are all zero: no query to combine")
        rows, coefficients = [rows[i] for i in used], coefficients[:, used]
        full: dict[str, torch.Tensor] = {}
        unit = self._curvature.estimator.unit_gradients
        for i in range(0, len(rows), QUERY_CHUNK):
            grads = query_gradients(self.model, self._curvature.layers, rows[i:i + QUERY_CHUNK], args,
                                    self.measurement)
            precondition_combined(self._curvature, grads, coefficients[:, i:i + QUERY_CHUNK], args, full)
        k = coefficients.shape[0]
        return PreconditionedQueries(full=full, low_rank={}, n_queries=k,
                                     unit_rows=torch.ones(k, dtype=torch.bool) if unit else None)

    def combined_scores(self, train, queries, coefficients, methods: Sequence[str] | None = None):
        """Scores of K linear combinations of the queries, C @ scores ([K, N], plus "per_layer" [K, N, L]), from
        one pass in which each combination is a single full-rank query: exact (no query_rank truncation), and its
        cost does not grow with the number of queries. ``aggregate``'s normalised mean is such a combination once
        each query's RMS is known (``recall.normalized_mean_weights`` on a sample of rows). With ``methods``,
        {method: {...}} from one joint pass; ``coefficients`` may then be {method: C} (each method its own
        weights and K). Stored and resumed like ``scores``."""
        train_rows, query_rows = self._rows(train, "train"), self._rows(queries, "queries")
        names = list(dict.fromkeys(methods or [self.args.method]))
        per_method = {m: torch.as_tensor(coefficients[m] if isinstance(coefficients, Mapping) else coefficients,
                                         dtype=torch.float64) for m in names}
        out: dict[str, dict[str, torch.Tensor]] = {}
        pending = []
        for method in names:
            if method in GRADIENT_FREE_METHODS:
                raise LancetError(f"combined_scores: {method} has no query gradient to combine; use scores()")
            run = Influence(self.model, replace(self.args, method=method), out_dir=self.out,
                            measurement=self.measurement, tokenizer=self.tokenizer, max_length=self.max_length)
            store = run._stored_scores(train_rows, query_rows,
                                       extra={"combined": hash_json(per_method[method].tolist())})
            if store.result is not None:
                out[method] = store.result
            else:
                pending.append((method, run, store))
        if pending:
            pres = []
            for method, run, store in pending:
                run._prepare_store(train_rows, store)
                pres.append(run.combined_queries(query_rows, per_method[method]))
                layers = run._curvature.layers
                run._curvature = None
            out.update(_joint_pass(self.model, layers, train_rows, pending, pres))
        return out if methods is not None else out[self.args.method]

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
            runs = []
            for method in group:
                run = Influence(self.model, replace(args, method=method), out_dir=self.out,
                                measurement=self.measurement, tokenizer=self.tokenizer, max_length=self.max_length)
                run.fit(train_rows)
                runs.append(run)
            layers = runs[0]._curvature.layers
            chunk = max(1, NORMALIZED_MEAN_QUERY_BYTES // max(1, sum(memory[m].per_query_bytes for m in group)))
            parts: list[list[torch.Tensor]] = [[] for _ in group]
            for start in range(0, len(query_rows), chunk):
                rows = query_rows[start:start + chunk]
                scores = score_rows(self.model, layers, sample, _concat([r.preconditioned_queries(rows) for r in runs]),
                                    args)["scores"]
                for i in range(len(group)):
                    parts[i].append(scores[i * len(rows):(i + 1) * len(rows)])
            for run in runs:
                run._curvature = None
            for method, part in zip(group, parts, strict=True):
                part = torch.cat(part).double()
                if virtual is None:
                    weights[method] = normalized_mean_weights(part)
                else:
                    v = torch.as_tensor(virtual, dtype=torch.float64)
                    weights[method] = normalized_mean_weights(v @ part) @ v
        return weights

    def build_index(self, train, index_dir: str | Path, index_args: IndexArgs | None = None) -> dict[str, Any]:
        """Store every training row's projected gradient under ``index_dir`` (lancet.influence.index), with the
        curvature (fitted here on the first build, in this run's out_dir if it has one; kept in the index). Rerun
        with more rows to append them (projected with the index's curvature); a killed build resumes at its last
        finished shard. Returns the index's metadata."""
        from lancet.influence.index import build_index, index_curvature, read_meta

        rows = self._rows(train, "train")
        if self.args.method in GRADIENT_FREE_METHODS:
            raise LancetError(f"{self.args.method} has no gradients to index")
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
        meta = check_index(index_dir, None if any_model else self.model_fp,
                           self._rows(train, "train") if train is not None else None)
        if meta["curvature"] != self.args.method:
            raise LancetError(f"{index_dir}: the index was built with the {meta['curvature']} curvature, this run "
                              f"uses {self.args.method}")
        curvature = index_curvature(index_dir, self.model, self.args.modules)
        self._curvature = curvature  # later token_scores on these IQs precondition as the ranking did
        return {"scores": query_index(self.model, curvature, query_rows, index_dir, self.args, self.measurement,
                                      rank)}

    def with_options(self, **changes) -> Influence:
        """The same run with other options (``query_rank``, ``per_layer``, ...): a new ``Influence`` on the same
        model, tokenizer, measurement and out_dir that shares this one's fitted curvature when none of the options
        that shape it (``curvature.fit.CURVATURE_OPTIONS``) changed, and fits its own on first use otherwise."""
        args = replace(self.args, **changes)
        other = Influence(self.model, args, out_dir=self.out, measurement=self.measurement, tokenizer=self.tokenizer,
                          max_length=self.max_length)
        if self.args.fingerprint_dict(CURVATURE_OPTIONS) == args.fingerprint_dict(CURVATURE_OPTIONS):
            other._curvature, other._model_fp = self._curvature, self._model_fp
        return other

    @property
    def fitted(self) -> bool:
        return self._curvature is not None

    def release_queries(self) -> None:
        """Stop keeping preconditioned queries (``keep_queries``) and free the kept set."""
        self.keep_queries, self._kept_queries = False, None

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

    def scores(self, train, queries, methods: Sequence[str] | None = None, *,
               max_joint_bytes: int = JOINT_SCORING_MAX_BYTES):
        """{"scores": [Q, N]} (plus "per_layer": [Q, N, L] with per_layer=True). With ``methods``, several
        estimators with one pass over the training rows: {method: {"scores": ...}}, each equal to that method's
        own run (the other options are this run's)."""
        train_rows, query_rows = self._rows(train, "train"), self._rows(queries, "queries")
        if methods is not None:
            return _score_methods(self.model, train_rows, query_rows, methods, self.args, out_dir=self.out,
                                  measurement=self.measurement, max_joint_bytes=max_joint_bytes)
        if self.args.method == "bm25":
            return {"scores": bm25_scores(train_rows, query_rows)}
        if self.args.method == "repsim":
            return {"scores": repsim_scores(self.model, train_rows, query_rows, batch_size=self.args.batch_size,
                                            bf16=self.args.bf16, dtype=self.args.stats_dtype,
                                            progress=self.args.progress)}
        store = self._stored_scores(train_rows, query_rows)
        if store.result is not None:
            return store.result
        pre = self._prepare(train_rows, query_rows, store)
        result = score_rows(self.model, self._curvature.layers, train_rows, pre, self.args, out_dir=store.dir)
        return self._keep(result, store)

    def _stored_scores(self, train_rows, query_rows, extra: dict[str, Any] | None = None) -> _ScoreStore:
        """Where this method's scores for these rows and queries live, and the stored result if finished."""
        if self.out is None:
            return _ScoreStore(None, {}, None)
        key = hash_json([self.args.to_json()["method"], data_fingerprint(query_rows)]
                        + ([self.args.measurement] if self.args.measurement != "answer" else [])
                        + ([extra] if extra else []))
        sdir = self.out / "scores" / f"{self.args.method}-{key}"
        meta = {"kind": "scores", "method": self.args.method, "model": self.model_fp,
                "train": data_fingerprint(train_rows), "queries": data_fingerprint(query_rows),
                "args": self.args.fingerprint_dict(), **(extra or {})}
        # checked now, written once the curvature is fitted: a refused or failed fit leaves no scores directory
        check_or_write_meta(sdir / "meta.json", meta, write=False)
        final = sdir / "scores.safetensors"
        found = final.is_file()
        dist.barrier()  # every rank has decided before rank 0 can write anything new
        return _ScoreStore(sdir, meta, load_tensors(final) if found else None)

    def _prepare(self, train_rows, query_rows, store: _ScoreStore) -> PreconditionedQueries:
        self._prepare_store(train_rows, store)
        return self.preconditioned_queries(query_rows)

    def _prepare_store(self, train_rows, store: _ScoreStore) -> None:
        if self._curvature is None:
            self.fit(train_rows)
        if store.dir is not None:
            check_or_write_meta(store.dir / "meta.json", store.meta, write=dist.is_main())

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

    def token_scores(self, rows, queries) -> list[torch.Tensor]:
        """Per-token scores [Q, T] for each of ``rows`` (few rows: one backward each)."""
        pre = self.preconditioned_queries(queries)
        return token_scores(self.model, self._curvature.layers, self._rows(rows, "rows"), pre, self.args)

    def layer_names(self) -> list[str]:
        return [layer.name for layer in find_tracked_layers(self.model, self.args.modules)]


@dataclass
class _ScoreStore:
    dir: Path | None
    meta: dict[str, Any]
    result: dict[str, torch.Tensor] | None


def score_methods(model, train, queries, methods: Sequence[str], args: InfluenceArgs | None = None, *,
                  out_dir: str | Path | None = None, max_joint_bytes: int = JOINT_SCORING_MAX_BYTES,
                  measurement: Measurement | None = None) -> dict[str, dict[str, torch.Tensor]]:
    """Deprecated: ``Influence(model, args, out_dir=...).scores(train, queries, methods=[...])``."""
    warnings.warn("score_methods is deprecated; use Influence(model, args).scores(train, queries, methods=[...])",
                  DeprecationWarning, stacklevel=2)
    return _score_methods(model, train, queries, methods, args, out_dir=out_dir, max_joint_bytes=max_joint_bytes,
                          measurement=measurement)


def _score_methods(model, train, queries, methods: Sequence[str], args: InfluenceArgs | None = None, *,
                   out_dir: str | Path | None = None, max_joint_bytes: int = JOINT_SCORING_MAX_BYTES,
                   measurement: Measurement | None = None) -> dict[str, dict[str, torch.Tensor]]:
    """Scores of several estimators, ``{method: Influence(...).scores(train, queries)}``, with one pass over the
    training rows: each method fits (or reuses) its curvature and preconditions the queries; one backward per
    batch then gives the (a, g) pairs that every method's preconditioned queries are contracted with. The
    contraction is linear in the queries, so each method's scores are those of its own pass (to rounding: the
    [Q, N] matmul is blocked differently). Stored per method exactly as ``Influence.scores`` stores them; the
    joint pass resumes by chunk. Methods whose preconditioned queries together exceed ``max_joint_bytes`` are
    scored in further passes."""
    args = args or InfluenceArgs()
    train_rows, query_rows = as_rows(train, "train"), as_rows(queries, "queries")
    out: dict[str, dict[str, torch.Tensor]] = {}
    pending: list[tuple[str, Influence, _ScoreStore]] = []
    for method in dict.fromkeys(methods):
        run = Influence(model, replace(args, method=method), out_dir=out_dir, measurement=measurement)
        if method in GRADIENT_FREE_METHODS:
            out[method] = run.scores(train_rows, query_rows)
            continue
        store = run._stored_scores(train_rows, query_rows)
        if store.result is not None:
            out[method] = store.result
        else:
            pending.append((method, run, store))
    per_method = estimate_memory(model, args).per_query_bytes * len(query_rows)  # the same for every method
    while pending:
        group, size = [], 0
        while pending and (not group or size + per_method <= max_joint_bytes):
            group.append(pending.pop(0))
            size += per_method
        pres = []
        for _, run, store in group:
            pres.append(run._prepare(train_rows, query_rows, store))
            layers = run._curvature.layers
            run._curvature = None  # the preconditioned queries are all the pass needs: free the factors
        out.update(_joint_pass(model, layers, train_rows, group, pres))
    return {method: out[method] for method in dict.fromkeys(methods)}


def _joint_pass(model, layers, train_rows, group: list, pres: list[PreconditionedQueries]) -> dict:
    """One scoring pass for several methods' preconditioned queries (``group``: (method, run, store) in the order of
    ``pres``): their queries joined, scored together (resumable under ``scores/joint-<key>/``), split back and
    stored per method."""
    sizes = [pre.n_queries for pre in pres]
    first = group[0][1]
    jdir = (None if first.out is None
            else first.out / "scores" / f"joint-{hash_json([str(store.dir) for _, _, store in group])}")
    result = score_rows(model, layers, train_rows, _concat(pres), first.args, out_dir=jdir)
    out, offset = {}, 0
    for (method, run, store), n in zip(group, sizes, strict=True):
        out[method] = run._keep({k: v[offset:offset + n].clone() for k, v in result.items()}, store)
        offset += n
    if jdir is not None and dist.is_main():
        (jdir / "scores.partial.safetensors").unlink(missing_ok=True)
        if jdir.is_dir():
            jdir.rmdir()
    return out


def _concat(pres: list[PreconditionedQueries]) -> PreconditionedQueries:
    """One set of preconditioned queries, method after method (each method's tensors freed as they are joined)."""
    full, low = {}, {}
    for name in list(pres[0].full):
        full[name] = torch.cat([pre.full.pop(name) for pre in pres])
    for name in list(pres[0].low_rank):
        parts = [pre.low_rank.pop(name) for pre in pres]
        low[name] = (torch.cat([u for u, _ in parts], 1), torch.cat([v for _, v in parts], 1))
    n = sum(pre.n_queries for pre in pres)
    unit = None
    if any(pre.unit_rows is not None for pre in pres):
        unit = torch.cat([pre.unit_rows if pre.unit_rows is not None else torch.zeros(pre.n_queries, dtype=torch.bool)
                          for pre in pres])
    return PreconditionedQueries(full=full, low_rank=low, n_queries=n, unit_rows=unit)


def pairwise_scores(model, train: Sequence[dict[str, Any]], queries: Sequence[dict[str, Any]],
                    method: str = "linfac", damping: float | None = None, measurement: Measurement | None = None,
                    **options) -> torch.Tensor:
    """Deprecated: ``Influence(model, method=..., ...).scores(train, queries)["scores"]``, [n_queries, n_train]."""
    warnings.warn('pairwise_scores is deprecated; use Influence(model, method=...).scores(train, queries)["scores"]',
                  DeprecationWarning, stacklevel=2)
    if isinstance(measurement, str):
        options["measurement"], measurement = measurement, None
    args = InfluenceArgs(method=method, damping=damping, **options)
    return Influence(model, args, measurement=measurement).scores(train, queries)["scores"]
