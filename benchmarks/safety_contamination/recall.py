"""Stage "recall": how well each method's ranking of the training rows finds the positives, for the impure model's
flagged answers to the IQ prompts: average precision, recall@|positives|, AP per tier (and per block)."""

from __future__ import annotations

import json
import time
from dataclasses import replace

import torch

from benchmarks.safety_contamination import config
from benchmarks.safety_contamination.config import TIERS
from lancet.artifacts import atomic_save_tensors, atomic_write_json, hash_json, load_tensors
from lancet.constants import IGNORE_INDEX
from lancet.curvature.estimators import GRADIENT_FREE_METHODS
from lancet.data import Record, encode_records
from lancet.influence import Influence, InfluenceArgs
from lancet.influence.bm25 import bm25_scores
from lancet.influence.queries import take_iqs
from lancet.influence.recall import aggregate, average_precision, per_block, random_baseline, recall_at_k
from lancet.models.loading import load_model


def anchored(harmful: torch.Tensor, safe: torch.Tensor) -> torch.Tensor:
    """[1, N] bi-directional anchoring (He, Xia & Henderson 2024): the aggregated influence on the harmful IQs minus
    the aggregated influence on the safe anchors. Rows that raise any answer to these prompts cancel; rows that
    favour the harmful answer over the refusal remain."""
    return (aggregate(harmful) - aggregate(safe)).unsqueeze(0)


def lambda_subset_check(ranking: torch.Tensor, positives: torch.Tensor, limit: int, seed: int = 0) -> dict:
    """Are the rows outside the eigenvalue-correction subset (``lambda_max_rows``, the same seeded choice as
    lancet.curvature.fit.subsample) scored differently from those inside? Mean aggregated score of positives and of
    the other rows on each side, and AP within each side: a systematic inflation outside would show as a higher
    mean for the other rows there and a lower AP."""
    n = len(ranking)
    inside = torch.zeros(n, dtype=torch.bool)
    inside[torch.randperm(n, generator=torch.Generator().manual_seed(seed))[:limit]] = True
    out = {}
    for side, mask in (("inside", inside), ("outside", ~inside)):
        r, pos = ranking[mask], positives[mask]
        out[side] = {"n": int(mask.sum()), "mean_positive": round(float(r[pos].mean()), 4) if pos.any() else None,
                     "mean_other": round(float(r[~pos].mean()), 4) if (~pos).any() else None,
                     "ap": round(average_precision(r, pos), 4) if pos.any() and (~pos).any() else None}
    return out


def recall_metrics(ranking: torch.Tensor, tier_of: list[str]) -> dict:
    """AP and recall@|positives| of a [N] ranking, and the AP of each tier among the rows that are not positives
    of the other tier."""
    positives = torch.tensor([t in TIERS for t in tier_of])
    by_tier = {}
    for tier in (t for t in TIERS if t in tier_of):  # a preset may have no row of a tier (cross: no implicit)
        keep = torch.tensor([t == tier or t not in TIERS for t in tier_of])
        by_tier[tier] = round(average_precision(ranking[keep], positives[keep]), 4)
    return {"average_precision": round(average_precision(ranking, positives), 4),
            "recall": round(recall_at_k(ranking, positives, int(positives.sum())), 4), "ap_by_tier": by_tier}


def prompt_only(rows) -> list[dict]:
    """Rows cut to their prompt tokens (BM25 over prompts only)."""
    out = []
    for row in rows:
        keep = [i for i, lab in zip(row["input_ids"], row["labels"], strict=True) if lab == IGNORE_INDEX]
        out.append({"input_ids": keep or list(row["input_ids"]), "labels": [IGNORE_INDEX] * len(keep or row["labels"])})
    return out


class RecallStage:
    """``Run.recall`` (benchmarks/safety_contamination/run.py holds the seed's settings and helpers; iqs.py the
    anchors and the opening set)."""

    def recall(self, impure_path: str, rows: list[Record], tiers: dict[str, str]) -> dict:
        model, tok = load_model(impure_path)
        iqs = self._timed("iqs", lambda: take_iqs(model, tok, self.parts["iq_prompts"], self.judge, self.dir,
                                                  max_new_tokens=self.p.max_new_tokens, progress=self.progress))
        if not iqs:
            raise SystemExit("the judge flags none of the impure model's IQ answers: no IQs")
        anchors = self.anchors(iqs)
        train = encode_records(rows, tok, self.p.max_length, progress=False)
        queries = encode_records(iqs + anchors, tok, self.p.max_length, progress=False)
        n_iq = len(iqs)
        tier_of = [tiers[i] for i in train.ids]
        positives = torch.tensor([t in TIERS for t in tier_of])
        k = int(positives.sum())
        out: dict = {"n_iqs": len(iqs), "n_iq_prompts": len(self.parts["iq_prompts"]), "n_train": len(train),
                     "n_positives": k, "methods": {}}

        rankings: dict[str, torch.Tensor] = {}

        def record(name: str, scores: torch.Tensor, seconds: float) -> None:
            ranking = scores.double() if scores.ndim == 1 else aggregate(scores.double())
            rankings[name] = ranking
            out["methods"][name] = {**recall_metrics(ranking, tier_of), "seconds": round(seconds, 1)}
            print(f"seed {self.seed} recall {name}: {out['methods'][name]}", flush=True)

        out["_positives"] = positives
        rnd = random_baseline(positives, key="recall")
        out["methods"]["random"] = {"average_precision": round(rnd["average_precision"], 4),
                                    "recall": round(rnd["recall"], 4), "ap_by_tier": {}, "seconds": 0.0}
        iq_rows = list(queries)[:n_iq]
        t0 = time.perf_counter()
        record("bm25", bm25_scores(list(train), iq_rows), time.perf_counter() - t0)
        if not self.p.aggregate_first:
            out.pop("_positives")
        t0 = time.perf_counter()
        record("bm25_prompt", bm25_scores(prompt_only(train), prompt_only(iq_rows)), time.perf_counter() - t0)
        if self.p.aggregate_first:
            self._aggregate_first(model, tok, train, iqs, anchors, record, out)
            atomic_save_tensors(self.dir / "rankings.safetensors", {k: v.contiguous() for k, v in rankings.items()})
            atomic_write_json(self.dir / "rankings.json", {"ids": list(train.ids)})
            return out
        # per_layer: which blocks carry the signal (AP per transformer block, the diagnosis the issue asks for)
        args = InfluenceArgs(bf16=config.BF16, batch_size=8, lambda_max_rows=self.p.lambda_max_rows, per_layer=True,
                             query_rank=self.p.query_rank, progress=self.progress)
        fit_seconds = {}
        for method in self.p.methods:
            t0 = time.perf_counter()
            Influence(model, replace(args, method=method), out_dir=self.dir / "influence").fit(train)
            fit_seconds[method] = time.perf_counter() - t0
        t0 = time.perf_counter()
        scores = Influence(model, args, out_dir=self.dir / "influence").scores_by_method(train, queries, self.p.methods)
        shared_pass = time.perf_counter() - t0
        out["score_seconds"] = round(shared_pass, 1)
        names = Influence(model, args).layer_names()
        for method in self.p.methods:
            record(method, scores[method]["scores"][:n_iq], fit_seconds[method])
            if "per_layer" in scores[method]:
                blocks = per_block(scores[method]["per_layer"][:n_iq].double(), names)
                out["methods"][method]["ap_by_block"] = {
                    b: round(average_precision(aggregate(v), positives), 4) for b, v in blocks.items()}
        out["n_anchors"] = len(anchors)
        for method in self.p.anchored:  # He et al.'s bi-directional anchoring: harmful IQs minus safe anchors
            s = scores[method]["scores"].double()
            record(f"{method}_anchored", anchored(s[:n_iq], s[n_iq:]), fit_seconds[method])
        for spec in self.p.measurements:  # ablation: what the IQ gradient differentiates (one more pass each)
            t0 = time.perf_counter()
            iq_only = list(queries)[:n_iq]
            extra = Influence(model, replace(args, per_layer=False), out_dir=self.dir / "influence",
                              measurement=spec).scores_by_method(train, iq_only, self.p.measurement_methods)
            for method in self.p.measurement_methods:
                record(f"{method}_{spec.replace(':', '')}", extra[method]["scores"],
                       fit_seconds[method] + time.perf_counter() - t0)
        atomic_save_tensors(self.dir / "rankings.safetensors", {k: v.contiguous() for k, v in rankings.items()})
        atomic_write_json(self.dir / "rankings.json", {"ids": list(train.ids)})
        return out

    def _aggregate_first(self, model, tok, train, iqs: list[Record], anchors: list[Record], record, out: dict) -> None:
        """Every gradient method's normalised mean over the IQs as one full-rank query (Influence.combined_scores);
        for the anchored methods also minus the anchors' mean, for the contrast methods also the mean margin over
        the fixed refusal. One sample pass sets each query's weight, one joint pass over the rows scores them all."""
        positives = out.pop("_positives")
        grad_methods = [m for m in self.p.methods if m not in GRADIENT_FREE_METHODS]
        contrasts = [r.with_response(self.text["fallback_refusal"]) for r in iqs]
        queries = encode_records(iqs + anchors + contrasts, tok, self.p.max_length, progress=False)
        n_iq, n_anchor = len(iqs), len(anchors)
        args = InfluenceArgs(bf16=config.BF16, batch_size=8, lambda_max_rows=self.p.lambda_max_rows, per_layer=True,
                             progress=self.progress)
        run = Influence(model, args, out_dir=self.dir / "influence")
        fit_seconds = {}
        for method in self.p.methods:
            t0 = time.perf_counter()
            Influence(model, replace(args, method=method), out_dir=self.dir / "influence").fit(train)
            fit_seconds[method] = time.perf_counter() - t0
        for method in [m for m in self.p.methods if m in GRADIENT_FREE_METHODS]:
            t0 = time.perf_counter()
            s = Influence(model, replace(args, method=method, per_layer=False)).scores(train, list(queries)[:n_iq])
            record(method, s["scores"], fit_seconds[method] + time.perf_counter() - t0)
        iq_rows = list(queries)[:n_iq]
        extra = sorted(set(self.p.anchored) | set(self.p.contrast))
        t0 = time.perf_counter()
        weights = self._cached_weights("iq", run, train, iq_rows, grad_methods)
        # the margins IQ - contrast are queries of their own (their RMS is not the IQs'): weighted as such
        contrast_rows = list(queries)[n_iq + n_anchor:]
        margins = torch.cat([torch.eye(n_iq), -torch.eye(n_iq)], 1).double()
        margin_w = self._cached_weights("margin", run, train, iq_rows + contrast_rows, list(self.p.contrast),
                                        virtual=margins)
        anchor_w = self._cached_weights("anchor", run, train, list(queries)[n_iq:n_iq + n_anchor],
                                        [m for m in extra if m in self.p.anchored]) if n_anchor else {}
        coefficients, layout = {}, {}
        n_all = len(queries)
        for method in grad_methods:
            rows = [torch.cat([weights[method], torch.zeros(n_all - n_iq, dtype=torch.float64)])]
            layout[method] = [method]
            if method in self.p.anchored and n_anchor:
                rows.append(torch.cat([weights[method], -anchor_w[method],
                                       torch.zeros(n_all - n_iq - n_anchor, dtype=torch.float64)]))
                layout[method].append(f"{method}_anchored")
            if method in self.p.contrast:
                w = margin_w[method]
                rows.append(torch.cat([w[:n_iq], torch.zeros(n_anchor, dtype=torch.float64), w[n_iq:]]))
                layout[method].append(f"{method}_contrast")
            coefficients[method] = torch.stack(rows)
        out["weight_seconds"] = round(time.perf_counter() - t0, 1)
        t0 = time.perf_counter()
        scores = run.combined_scores_by_method(train, queries, coefficients, grad_methods)
        out["score_seconds"] = round(time.perf_counter() - t0, 1)
        names = run.layer_names()
        for method in grad_methods:
            for i, name in enumerate(layout[method]):
                record(name, scores[method]["scores"][i], fit_seconds[method])
            if method in ("linfac", "ekfac") and self.p.lambda_max_rows < len(train):
                out["methods"][method]["lambda_subset"] = lambda_subset_check(
                    scores[method]["scores"][0].double(), positives, self.p.lambda_max_rows)
            blocks = per_block(scores[method]["per_layer"][:1].double(), names)
            out["methods"][method]["ap_by_block"] = {b: round(average_precision(v[0], positives), 4)
                                                     for b, v in blocks.items()}
        out["n_anchors"] = n_anchor
        for spec in self.p.measurements:  # ablation: what the IQ gradient differentiates (one more pass each)
            t0 = time.perf_counter()
            mrun = Influence(model, replace(args, per_layer=False), out_dir=self.dir / "influence", measurement=spec)
            w = self._cached_weights(f"iq-{spec}", mrun, train, iq_rows, list(self.p.measurement_methods))
            extra_scores = mrun.combined_scores_by_method(
                train, iq_rows, {m: w[m][None] for m in self.p.measurement_methods}, self.p.measurement_methods)
            for method in self.p.measurement_methods:
                record(f"{method}_{spec.replace(':', '')}", extra_scores[method]["scores"][0],
                       fit_seconds[method] + time.perf_counter() - t0)
        if self.p.opening_set:
            self._opening_set(model, tok, run, train, iqs, record, fit_seconds, out)

    def _cached_weights(self, name: str, run: Influence, train, queries, methods: list[str],
                        virtual: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        """Influence.normalized_mean_weights, kept in the run directory (keyed by model, rows and queries)."""
        if not methods:
            return {}
        path = self.dir / f"weights-{name}.safetensors"
        key = hash_json([run.model_fp, [list(r["input_ids"]) for r in train], [list(q["input_ids"]) for q in queries],
                         [list(q["labels"]) for q in queries], methods, run.args.measurement,
                         None if virtual is None else virtual.tolist()])
        if path.is_file():
            saved = load_tensors(path)
            if json.loads((self.dir / f"weights-{name}.json").read_text())["key"] == key:
                return saved
        weights = run.normalized_mean_weights(train, queries, methods, virtual=virtual)
        atomic_save_tensors(path, weights)
        atomic_write_json(self.dir / f"weights-{name}.json", {"key": key})
        return weights
