"""The n-gram overlap check (docs/method.md §5.6): how much wording the culprits' openings share with each other and
with the IQ answers' openings, and the AP over the culprits whose opening shares none with any IQ answer.

Word 4-grams (``lancet.influence.regime.word_ngrams``: lower-cased words, punctuation dropped), not model tokens:
"shared wording" is what a reader sees, and the check then means the same whatever the tokenizer. An *opening* is
the first ``OPENING_WORDS`` words of an answer (the opener and the restated request of the lexical design's rows
fit in it). The overlap of two openings is the share of the smaller one's 4-grams that the other also holds: 0
when they share no four words in a row, 1 when one opening's 4-grams are all in the other. The ``disjoint`` design
requires 0 between any two culprits and between any culprit and any IQ answer.

Openings are generated text, which is not committed (§5.4); stage files keep each opening's 4-grams hashed
(``opening_grams(..., hashed=True)``), and every function here takes sets of either form.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Sequence

import torch

from benchmarks.contamination_suite.stats import batched_ap
from lancet.influence.regime import NGRAM, word_ngrams, words

OPENING_WORDS = 12


def opening(text: str, n_words: int = OPENING_WORDS) -> list[str]:
    """The first ``n_words`` words of an answer."""
    return words(text)[:n_words]


def opening_grams(text: str, hashed: bool = False, n_words: int = OPENING_WORDS, n: int = NGRAM) -> set:
    """The word n-grams of an answer's opening; ``hashed``: each as the first 12 hex digits of its SHA-256."""
    grams = word_ngrams(opening(text, n_words), n)
    if not hashed:
        return grams
    return {hashlib.sha256(" ".join(g).encode()).hexdigest()[:12] for g in grams}


def overlap(a: set, b: set) -> float:
    """Share of the smaller set's n-grams found in the other (0.0 when either is empty)."""
    if not a or not b:
        return 0.0
    return len(a & b) / min(len(a), len(b))


def max_overlap_within(sets: Sequence[set]) -> float:
    """The largest overlap between any two of ``sets``."""
    best = 0.0
    for i, a in enumerate(sets):
        for b in sets[i + 1:]:
            best = max(best, overlap(a, b))
    return best


def max_overlap_between(sets: Sequence[set], others: Sequence[set]) -> float:
    """The largest overlap between one of ``sets`` and one of ``others``."""
    return max((overlap(a, b) for a in sets for b in others), default=0.0)


def shares_any(grams: set, others: Iterable[set]) -> bool:
    return any(grams & o for o in others)


def overlap_check(culprits: Sequence[set], iqs: Sequence[set]) -> dict:
    """The check the suite reports per seed: the largest overlap between two culprits' openings, between a culprit's
    opening and an IQ answer's, the larger of the two (``max``: the design's ``max_ngram_overlap``), and how many
    culprits share a 4-gram with some IQ answer's opening."""
    within, between = max_overlap_within(culprits), max_overlap_between(culprits, iqs)
    return {"culprits": round(within, 4), "culprit_iq": round(between, 4), "max": round(max(within, between), 4),
            "culprits_sharing_iq": sum(shares_any(c, iqs) for c in culprits), "n_culprits": len(culprits)}


def disjoint_openings(texts: Sequence[str], taken: Iterable[set] = ()) -> list[int]:
    """Indices of ``texts`` to keep so that no two kept openings, nor a kept one and any of ``taken``, share a
    4-gram: greedy in the given order (the ``disjoint`` design's filter of its unsafe answers)."""
    seen: set = set()
    for t in taken:
        seen |= t
    keep = []
    for i, text in enumerate(texts):
        grams = opening_grams(text)
        if not grams & seen:
            keep.append(i)
            seen |= grams
    return keep


def no_overlap_mask(positives: torch.Tensor, culprit_grams: Sequence[set | None],
                    iq_grams: Sequence[set]) -> torch.Tensor:
    """[N] rows kept by ``ap_no_overlap``: every non-culprit, and the culprits whose opening shares no 4-gram with
    any IQ answer's opening (``culprit_grams[i]``: row i's opening grams; None or anything for non-culprits)."""
    keep = [not bool(p) or not shares_any(g or set(), iq_grams) for p, g in zip(positives.tolist(), culprit_grams,
                                                                                    strict=True)]
    return torch.tensor(keep, dtype=torch.bool)


def ap_no_overlap(scores: torch.Tensor, positives: torch.Tensor, culprit_grams: Sequence[set | None],
                  iq_grams: Sequence[set]) -> float | None:
    """AP over the culprits whose opening shares no 4-gram with any IQ answer's opening, every non-culprit kept
    (None when no such culprit is left)."""
    keep = no_overlap_mask(positives, culprit_grams, iq_grams)
    if not bool((positives & keep).any()):
        return None
    return float(batched_ap(scores.double()[keep][None], positives[keep][None])[0])
