"""The queries beside the IQs (the impure model's flagged answers to the IQ prompts): the safe anchors (the aligned
model's refusals to the same prompts) and the opening set (each IQ measured as the log-probability of any of the
IQs' openings)."""

from __future__ import annotations

import time

import torch

from lancet.constants import IGNORE_INDEX
from lancet.data import Record, encode_records
from lancet.evaluate.judges import RefusalMatcher
from lancet.influence import Influence
from lancet.models.loading import load_model

OPENING_WORDS = 3  # "Absolutely. Here is", "Sure, here is", "Happy to help."


def opening(text: str, words: int = OPENING_WORDS) -> str:
    return " ".join(text.split()[:words])


def prefix_rows(rows, tokenizer) -> list[dict]:
    """Encoded (prompt, opening) rows without the end-of-turn token the chat template appends to every answer: an
    opening is the start of an answer, so its likelihood must not include "and then the answer ends"."""
    out = []
    for row in rows:
        ids, labels = list(row["input_ids"]), list(row["labels"])
        if ids[-1] not in tokenizer.all_special_ids or labels[-1] == IGNORE_INDEX:
            raise ValueError("prefix_rows: the row does not end with the template's end-of-turn token")
        out.append({"input_ids": ids[:-1], "labels": labels[:-1]})
    return out


def opening_weights(logp: torch.Tensor) -> torch.Tensor:
    """[n_iq, n_openings] log p(o | prompt_i) -> [n_iq, n_iq * n_openings] virtual-query matrix V with
    V @ grad log p(o | prompt) = grad log sum_o p(o | prompt_i): each IQ's gradient is the posterior-weighted mean of
    its openings' gradients (exact: d log sum_o p_o = sum_o (p_o / sum p) d log p_o)."""
    n_iq, n_o = logp.shape
    w = torch.softmax(logp.double(), 1)
    virtual = torch.zeros(n_iq, n_iq * n_o, dtype=torch.float64)
    for i in range(n_iq):
        virtual[i, i * n_o:(i + 1) * n_o] = w[i]
    return virtual


class IqStage:
    """``Run.anchors`` and the opening-set measurement of ``Run.recall`` (benchmarks/safety_contamination/run.py holds
    the seed's settings and helpers, recall.py the recall stage)."""

    def anchors(self, iqs: list[Record]) -> list[Record]:
        """Safe anchors: the aligned model's refusals to the IQ prompts (only those it refuses)."""
        model, _ = load_model(str(self.dir / "aligned"))
        prompts = [Record(messages=tuple(r.prompt_messages)) for r in iqs]
        answers = self.answers("aligned", model, prompts, "iq_anchor_prompts")
        return [p.with_response(a) for p, a in zip(prompts, answers, strict=True) if RefusalMatcher()(a) and a.strip()]

    def _opening_set(self, model, tok, run: Influence, train, iqs: list[Record], record, fit_seconds: dict,
                     out: dict) -> None:
        """Each IQ measured as log sum_o p(o | its prompt) over the openings O the IQs use (their first
        OPENING_WORDS words): a row that teaches any compliant opening raises it, where the answer's own likelihood
        pits the openings against each other (seed 0: LinFAC ranked the unsafe rows by whether their opening was
        the IQs' most common one)."""
        from lancet.evaluate.metrics import rows_logprobs

        t0 = time.perf_counter()
        openings = list(dict.fromkeys(opening(r.response_text) for r in iqs))
        pairs = [r.with_response(o) for r in iqs for o in openings]
        rows = prefix_rows(encode_records(pairs, tok, self.p.max_length, progress=False), tok)
        logp = rows_logprobs(model, rows, tok.pad_token_id, batch_size=16).logp
        virtual = opening_weights(torch.tensor(logp).view(len(iqs), len(openings)))
        methods = list(self.p.opening_set)
        weights = self._cached_weights("opening", run, train, rows, methods, virtual=virtual)
        scores = run.combined_scores_by_method(train, rows, {m: weights[m][None] for m in methods}, methods)
        for method in methods:
            record(f"{method}_opening_set", scores[method]["scores"][0], fit_seconds[method] + time.perf_counter() - t0)
        out["openings"] = openings
