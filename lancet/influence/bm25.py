"""BM25 over token ids: a text-retrieval control with no gradients. If it recalls the culprits as well as
influence does, the behaviour is lexical and influence is not needed to find it.

Scored by bm25s (Lucene's variant: idf = log(1 + (N - df + 0.5) / (df + 0.5)), k1 = 1.5, b = 0.75), every query
token counting (a token twice in the query counts twice), times Okapi's (k1 + 1), which Lucene drops: a constant
factor that leaves every ranking as it is and keeps scores equal to those of lancet's earlier pure-Python scorer.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

K1, B = 1.5, 0.75


def bm25_scores(train: Sequence[dict[str, Any]], queries: Sequence[dict[str, Any]]) -> torch.Tensor:
    """[Q, N]: BM25 of each training row's tokens (the document) for each query's tokens (the terms)."""
    import bm25s

    vocab: dict[int, int] = {}  # token id -> dense index (bm25s wants 0..V-1)
    docs = [[vocab.setdefault(int(t), len(vocab)) for t in row["input_ids"]] for row in train]
    index = bm25s.BM25(method="lucene", k1=K1, b=B)
    index.index(bm25s.tokenization.Tokenized(ids=docs, vocab={str(t): i for t, i in vocab.items()}),
                show_progress=False)
    out = torch.zeros(len(queries), len(docs), dtype=torch.float64)
    for qi, q in enumerate(queries):
        terms = [vocab[int(t)] for t in q["input_ids"] if int(t) in vocab]  # a token no row holds scores nothing
        if terms:
            out[qi] = torch.from_numpy(index.get_scores(terms).astype("float64"))
    return out * (K1 + 1)
