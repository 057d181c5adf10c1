"""Which regime am I in? Two numbers, read beside a ranking, that tell a user when text search would find the rows
as well as influence does (docs/method.md §5.6):

- ``iq_ngram_overlap``: the mean, over the ranking's top k rows, of the share of the row's answer word 4-grams
  that occur in some IQ answer. 1: the top rows repeat the IQs' wording (identical text); 0: they share no four
  words in a row with any IQ.
- ``bm25_spearman`` and ``bm25_top_overlap``: the rank agreement of the ranking with BM25 on the same IQs
  (lancet.influence.bm25): Spearman over every row, and the share of the top k rows the two rankings share.

High values of both say the behaviour's text is its culprits' text: BM25 (seconds, no gradients) is then likely to
do as well as influence. Low values say the wording does not lead to the rows, which is where influence is needed.
The thresholds of "high" are measured by the contamination suite (benchmarks/contamination_suite/), not assumed
here. Words, not model tokens: what a reader calls shared wording, and the same for every tokenizer.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import Any

import torch

from lancet.influence.recall import aggregate, spearman, top_overlap

NGRAM = 4
TOP_K = 50
_WORD = re.compile(r"[a-z0-9']+")


def words(text: str) -> list[str]:
    """Lower-cased words (letters, digits, apostrophes); punctuation and spacing dropped."""
    return _WORD.findall(text.lower())


def word_ngrams(text: str | Sequence[str], n: int = NGRAM) -> set[tuple[str, ...]]:
    """The set of word ``n``-grams of a text (or of an already split word list); empty if it has fewer words."""
    w = words(text) if isinstance(text, str) else list(text)
    return {tuple(w[i:i + n]) for i in range(len(w) - n + 1)}


def ngram_overlap(iq_texts: Sequence[str], row_texts: Sequence[str], n: int = NGRAM) -> float:
    """Mean over ``row_texts`` of the share of each row's word n-grams found in any of ``iq_texts`` (rows with
    fewer than n words are left out; 0.0 if none is left)."""
    pool: set[tuple[str, ...]] = set()
    for t in iq_texts:
        pool |= word_ngrams(t, n)
    shares = [len(g & pool) / len(g) for g in (word_ngrams(t, n) for t in row_texts) if g]
    return sum(shares) / len(shares) if shares else 0.0


def rank_agreement(reference: torch.Tensor, ranking: torch.Tensor, k: int = TOP_K) -> dict[str, float | None]:
    """Spearman correlation of two [N] rankings (None below 2 rows) and the share of their top min(k, N) rows they
    have in common."""
    rho = spearman(reference, ranking) if len(ranking) > 1 else None
    return {"spearman": rho, "top_overlap": top_overlap(ranking, reference, k)}


def _answer(record) -> str:
    return record.response_text or record.text or ""


class RegimeReadout:
    """The readout for rankings of one set of rows and IQs (``AttributionData``): call it with a [N] ranking. BM25
    is scored once, on first use, and shared by every ranking read (``attribute_methods``)."""

    def __init__(self, train_records: Sequence[Any], query_records: Sequence[Any], train, queries,
                 k: int = TOP_K) -> None:
        self.train_records, self.query_records = train_records, query_records
        self.train, self.queries, self.k = train, queries, k
        self._bm25: torch.Tensor | None = None

    def bm25(self) -> torch.Tensor:
        if self._bm25 is None:
            from lancet.influence.bm25 import bm25_scores

            self._bm25 = aggregate(bm25_scores(list(self.train), list(self.queries)).double())
        return self._bm25

    def __call__(self, ranking: torch.Tensor) -> dict[str, Any]:
        k = min(self.k, len(ranking))
        top = torch.argsort(ranking.double(), descending=True, stable=True)[:k].tolist()
        overlap = ngram_overlap([_answer(r) for r in self.query_records], [_answer(self.train_records[i]) for i in top])
        agreement = rank_agreement(self.bm25(), ranking.double(), k)
        rho = agreement["spearman"]
        return {"k": k, "ngram": NGRAM, "iq_ngram_overlap": round(overlap, 4),
                "bm25_spearman": None if rho is None else round(rho, 4),
                "bm25_top_overlap": round(agreement["top_overlap"], 4)}
