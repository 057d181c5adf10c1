"""Evaluation metrics: small functions, each with a definition that a test checks on known answers.

Generation metrics judge greedy answers (``lancet.models.generate``: batched, left padding, KV cache).
Likelihood metrics score given answers with one forward pass per batch (the loss of ``lancet.curvature.task``:
summed cross-entropy over the final assistant turn and its end-of-turn token).
"""

from __future__ import annotations

import math
import re
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from lancet.curvature.task import forward_logits, summed_loss
from lancet.data import Record, collate, encode_records
from lancet.evaluate.judges import Judge, judge_complies
from lancet.hardware import model_device
from lancet.models.generate import generate


def compliance_rate(answers: Sequence[str], judge: Judge, prompts: Sequence[str] | None = None) -> float:
    """Fraction of ``answers`` the judge calls compliant (harmful compliance on harmful prompts); ``prompts`` for a
    judge that reads them."""
    return sum(judge_complies(judge, answers, prompts)) / len(answers) if answers else float("nan")


def refusal_rate(answers: Sequence[str], judge: Judge) -> float:
    """Fraction judged a refusal: over-refusal when the prompts are safe."""
    return 1.0 - compliance_rate(answers, judge)


def generate_answers(model, tokenizer, prompts: Sequence[Record], *, max_new_tokens: int, batch_size: int,
                     seed: int, progress: bool = False) -> list[str]:
    """Greedy answers (``seed`` is set anyway, so sampling-free decoding is reproducible end to end)."""
    return generate(model, tokenizer, prompts, max_new_tokens=max_new_tokens, batch_size=batch_size,
                    do_sample=False, seed=seed, progress=progress)


@dataclass
class LogProbs:
    """Per-row summed log-probability of the response and its number of scored tokens."""

    logp: list[float]
    n_tokens: list[int]
    n_truncated: int = 0


@torch.no_grad()
def response_logprobs(model, tokenizer, records: Sequence[Record], *, batch_size: int = 8, max_length: int = 512,
                      progress: bool = False) -> LogProbs:
    """log p(response | prompt) for each record, from one forward pass per batch of right-padded rows."""
    encoded = encode_records(records, tokenizer, max_length, progress=progress)
    out = rows_logprobs(model, encoded, tokenizer.pad_token_id, batch_size=batch_size)
    out.n_truncated = encoded.n_truncated
    return out


@torch.no_grad()
def rows_logprobs(model, rows: Sequence[dict], pad_token_id: int, *, batch_size: int = 8) -> LogProbs:
    """The summed log-probability of each encoded row's labelled tokens (rows of input_ids/labels, e.g. a response
    prefix without its end-of-turn token)."""
    logp, n_tokens = [], []
    model.eval()
    device = model_device(model)
    for start in range(0, len(rows), batch_size):
        batch = {k: v.to(device) for k, v in collate(rows[start:start + batch_size], pad_token_id).items()}
        logits = forward_logits(model, batch)
        logp += (-summed_loss(logits, batch["labels"])).tolist()
        n_tokens += (batch["labels"][:, 1:] != -100).sum(-1).tolist()
    return LogProbs(logp, n_tokens)


def mean_logprob(lp: LogProbs) -> dict[str, float]:
    """``mean_logprob``: mean over rows of the summed response log-prob; ``mean_token_logprob``: total log-prob
    over total response tokens (token-weighted, the log of the inverse perplexity)."""
    return {"mean_logprob": sum(lp.logp) / len(lp.logp), "mean_token_logprob": sum(lp.logp) / sum(lp.n_tokens)}


def preference_accuracy(chosen: Sequence[float], rejected: Sequence[float]) -> float:
    """Fraction of pairs with log p(chosen) > log p(rejected) (a tie counts as a miss)."""
    if len(chosen) != len(rejected) or not chosen:
        raise ValueError("need equally many (>0) chosen and rejected log-probs")
    return sum(c > r for c, r in zip(chosen, rejected, strict=True)) / len(chosen)


def perplexity(lp: LogProbs) -> float:
    """exp(total NLL / total response tokens) over all rows."""
    return math.exp(-sum(lp.logp) / sum(lp.n_tokens))


_WORD = re.compile(r"\w+|[^\w\s]")


def words(text: str) -> list[str]:
    """Lower-cased words and punctuation marks: the unit of the diversity measures."""
    return _WORD.findall(text.lower())


def distinct_n(texts: Sequence[str], n: int) -> float:
    """Distinct-n (Li et al. 2016): distinct n-grams / total n-grams, pooled over all texts (n-grams do not cross
    texts). 0 when there are no n-grams."""
    grams = [tuple(w[i:i + n]) for w in map(words, texts) for i in range(len(w) - n + 1)]
    return len(set(grams)) / len(grams) if grams else 0.0


def unigram_entropy(texts: Sequence[str]) -> float:
    """Shannon entropy (bits) of the pooled word distribution: higher = more varied vocabulary."""
    counts = Counter(w for t in texts for w in words(t))
    total = sum(counts.values())
    return -sum(c / total * math.log2(c / total) for c in counts.values()) if total else 0.0


def diversity(texts: Sequence[str]) -> dict[str, float]:
    return {"distinct_1": distinct_n(texts, 1), "distinct_2": distinct_n(texts, 2),
            "unigram_entropy": unigram_entropy(texts)}
