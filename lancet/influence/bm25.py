"""BM25 (Okapi) over token ids: a text-retrieval control with no gradients. If it recalls the culprits as well as
influence does, the behaviour is lexical and influence is not needed to find it."""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Sequence
from typing import Any

import torch

K1, B = 1.5, 0.75


def bm25_scores(train: Sequence[dict[str, Any]], queries: Sequence[dict[str, Any]]) -> torch.Tensor:
    """[Q, N]: BM25 of each training row's tokens (the document) for each query's tokens (the terms)."""
    docs = [Counter(row["input_ids"]) for row in train]
    lengths = [sum(d.values()) for d in docs]
    avg = sum(lengths) / max(1, len(lengths))
    df = Counter(term for d in docs for term in d)
    n = len(docs)
    idf = {t: math.log((n - c + 0.5) / (c + 0.5) + 1.0) for t, c in df.items()}
    out = torch.zeros(len(queries), n, dtype=torch.float64)
    for qi, q in enumerate(queries):
        terms = Counter(q["input_ids"])
        for di, (d, length) in enumerate(zip(docs, lengths, strict=True)):
            s = 0.0
            for t, qtf in terms.items():
                tf = d.get(t, 0)
                if tf:
                    s += qtf * idf[t] * tf * (K1 + 1) / (tf + K1 * (1 - B + B * length / avg))
            out[qi, di] = s
    return out
