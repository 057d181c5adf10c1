"""Recall: aggregate many queries into one ranking of training rows, the top-k table, and recall metrics."""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import Any

import torch

from lancet.data.records import Record

AGGREGATIONS = ("normalized_mean", "sum")


def aggregate(scores: torch.Tensor, how: str = "normalized_mean") -> torch.Tensor:
    """[Q, N] -> [N]. ``normalized_mean`` divides each query's scores by their root mean square before averaging,
    so a query with a large gradient does not outvote the rest (sign and zero are kept: no centring); ``sum`` adds
    the raw scores, i.e. the influence on the summed loss of all queries."""
    if how == "sum":
        return scores.sum(0)
    if how != "normalized_mean":
        raise ValueError(f"unknown aggregation {how!r}; choose from {AGGREGATIONS}")
    rms = scores.pow(2).mean(1, keepdim=True).sqrt().clamp_min(torch.finfo(scores.dtype).tiny)
    return (scores / rms).mean(0)


def normalized_mean_weights(sample_scores: torch.Tensor) -> torch.Tensor:
    """[Q] weights w with w @ scores = aggregate(scores, "normalized_mean"): 1 / (Q * RMS of each query's scores),
    the RMS taken over ``sample_scores`` [Q, n] (all rows: exact; a seeded sample: an estimate, for
    ``Influence.combined_scores``, which then scores the weighted sum as one query)."""
    rms = sample_scores.pow(2).mean(1).sqrt().clamp_min(torch.finfo(sample_scores.dtype).tiny)
    return 1.0 / (rms * sample_scores.shape[0])


def spearman(a: torch.Tensor, b: torch.Tensor) -> float:
    """Spearman rank correlation of two [N] rankings (ties broken by position)."""
    ra, rb = (x.double().argsort(stable=True).argsort().double() for x in (a, b))
    return float(torch.corrcoef(torch.stack([ra, rb]))[0, 1])


def top_overlap(a: torch.Tensor, b: torch.Tensor, k: int = 100) -> float:
    """Share of the top min(k, N) rows of ranking ``a`` that are also in ``b``'s."""
    k = min(k, len(a))
    top = set(torch.argsort(a, descending=True, stable=True)[:k].tolist())
    return len(top & set(torch.argsort(b, descending=True, stable=True)[:k].tolist())) / k


def top_k(records: Sequence[Record], scores: torch.Tensor, k: int = 10, *, negative: bool = False,
          text_chars: int = 200) -> list[dict[str, Any]]:
    """The k rows with the highest aggregated score (or the lowest with ``negative``): where they came from, what
    they say, their score and its sign."""
    order = torch.argsort(scores, descending=not negative).tolist()[:k]
    rows = []
    for rank, i in enumerate(order, 1):
        r = records[i]
        text = r.response_text or r.text
        rows.append({"rank": rank, "index": i, "id": r.id, "source": r.source, "line": r.line,
                     "score": float(scores[i]), "sign": "+" if scores[i] > 0 else "-" if scores[i] < 0 else "0",
                     "prompt": (r.prompt_messages[-1]["content"] if r.prompt_messages else "")[:text_chars],
                     "response": (text or "")[:text_chars]})
    return rows


def average_precision(scores: torch.Tensor, positives: torch.Tensor) -> float:
    """AP of ranking by descending score, positives a boolean [N] mask (ties broken by index)."""
    order = torch.argsort(scores, descending=True, stable=True)
    hits = positives[order].double()
    if hits.sum() == 0:
        return float("nan")
    precision = hits.cumsum(0) / torch.arange(1, len(hits) + 1, dtype=torch.float64)
    return float((precision * hits).sum() / hits.sum())


def recall_at_k(scores: torch.Tensor, positives: torch.Tensor, k: int) -> float:
    order = torch.argsort(scores, descending=True, stable=True)[:k]
    return float(positives[order].sum() / positives.sum().clamp_min(1))


def per_block(per_layer: torch.Tensor, layer_names: Sequence[str]) -> dict[str, torch.Tensor]:
    """Sum a [Q, N, L] per-layer score tensor by transformer block ("layers.3", "h.0", ...): {block: [Q, N]}."""
    groups: dict[str, list[int]] = {}
    for i, name in enumerate(layer_names):
        m = re.search(r"(layers|h|blocks|block)\.(\d+)\.", name)
        groups.setdefault(f"block {int(m.group(2)):02d}" if m else name, []).append(i)
    return {block: per_layer[..., idx].sum(-1) for block, idx in sorted(groups.items())}


def format_table(rows: list[dict[str, Any]], width: int = 70) -> str:
    lines = [f"{'rank':>4}  {'score':>10}  {'source:line':<28} response"]
    for r in rows:
        where = f"{r['source'].rsplit('/', 1)[-1]}:{r['line']}" if r["source"] else r["id"]
        text = r["response"].replace("\n", " ")
        lines.append(f"{r['rank']:>4}  {r['score']:>+10.3g}  {where:<28} {text[:width]}")
    return "\n".join(lines)


def random_baseline(positives: torch.Tensor, draws: int = 200, key: str = "recall@k") -> dict:
    """Average precision and recall@k (k = number of positives) of a random ranking: mean of seeded draws."""
    g = torch.Generator().manual_seed(0)
    aps, recalls = [], []
    k = int(positives.sum())
    for _ in range(draws):
        s = torch.rand(len(positives), generator=g)
        aps.append(average_precision(s, positives))
        recalls.append(recall_at_k(s, positives, k))
    return {"average_precision": sum(aps) / draws, key: sum(recalls) / draws}
