"""From influence scores to training items: IBO pairs, forget sets, and human preference pairs.

Scores are the aggregated influence of each training row on the influence queries (IQs): positive rows drive the
undesirable behaviour, negative rows counter it (docs/method.md §2). IBO prefers the most negative rows over the
most positive ones (and over the IQs' own undesirable answers).
"""

from __future__ import annotations

import logging
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from lancet.constants import IGNORE_INDEX, PAIR_WEIGHTINGS, PAIRINGS, PREFERRED_ROWS, RANKINGS
from lancet.data.records import Record
from lancet.errors import DataError, LancetError

log = logging.getLogger(__name__)

SELECTIONS, PREFERRED, WEIGHTINGS = RANKINGS, PREFERRED_ROWS, PAIR_WEIGHTINGS


def _generator(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(int(seed))


def select_rows(scores_agg: torch.Tensor, k: int, mode: str = "influence", culprit_mask: torch.Tensor | None = None,
                seed: int = 0, preferred: str | None = None, preferred_mask: torch.Tensor | None = None,
                flagged: torch.Tensor | None = None) -> tuple[list[int], list[int]]:
    """(dispreferred, preferred) row indices.

    Dispreferred (``mode``, the ranking): ``influence``, the k highest aggregated scores (descending); ``random``, a
    seeded random set of k rows (the control for the ranking); ``oracle``, every true culprit (``culprit_mask``),
    in descending score order.

    Preferred, never a dispreferred row: ``bottom``, the k lowest-scored rows (ascending; under ``oracle`` the k
    lowest-scored non-culprits); ``random``, the next k rows of the same seeded permutation; ``marked``, the k
    lowest-scored rows of ``preferred_mask`` (e.g. the known refusals); ``near``, the k *highest*-scored rows that
    may be preferred: with ``flagged``, the top of the rows the judge passes (answers on the behaviour's topics
    that do not show it), under ``oracle`` the top non-culprits, so each pair contrasts the behaviour with its
    nearest counter-example (needs one of the two: else it would be the next rows of the same ranking).
    ``preferred=None``: ``random`` under the random ranking (both sides random, disjoint), else ``bottom``.

    ``flagged`` [N] (the rows whose answer a judge flags with the behaviour; docs/method.md §3.3): the dispreferred
    rows are then taken among the flagged rows only and the preferred among the others, by the same rule (the oracle
    ranking, which reads labels, ignores it).
    """
    n = scores_agg.numel()
    if k < 1:
        raise LancetError(f"top_k must be >= 1, got {k}")
    if mode not in SELECTIONS:
        raise LancetError(f"unknown selection {mode!r}; choose from {', '.join(SELECTIONS)}")
    preferred = preferred or ("random" if mode == "random" else "bottom")
    if preferred not in PREFERRED:
        raise LancetError(f"unknown preferred rows {preferred!r}; choose from {', '.join(PREFERRED)}")
    order = torch.argsort(scores_agg, descending=True, stable=True).tolist()
    perm = torch.randperm(n, generator=_generator(seed)).tolist()
    may_prefer, k_bad = None, k
    if flagged is not None:
        judged = _mask(flagged, n, "flagged")
        if mode != "oracle":
            if int(judged.sum()) == 0 or int(judged.sum()) == n:
                raise LancetError(f"the judge flags {int(judged.sum())} of {n} training rows: judged rows need some "
                                  "flagged and some not")
            order_bad = [i for i in order if judged[i]]
            perm_bad = [i for i in perm if judged[i]]
            k_bad = min(k, len(order_bad))
            order, perm = order_bad + [i for i in order if not judged[i]], perm_bad + [i for i in perm if not judged[i]]
        may_prefer = ~judged
    if mode == "oracle":
        if culprit_mask is None:
            raise LancetError("oracle selection needs the culprit labels (--labels)")
        culprit_mask = _mask(culprit_mask, n, "culprit")
        bad = [i for i in order if culprit_mask[i]]
        if not bad or len(bad) == n:
            raise LancetError("oracle selection needs at least one culprit and one non-culprit row")
    else:
        if 2 * k > n:
            raise LancetError(f"top_k={k} needs at least {2 * k} training rows (k dispreferred + k preferred), got {n}")
        bad = perm[:k_bad] if mode == "random" else order[:k_bad]
    taken = set(bad)
    if may_prefer is not None:
        taken |= {i for i in range(n) if not may_prefer[i]}
    if preferred == "random":
        good = [i for i in perm if i not in taken][:k]
    elif preferred == "near":
        if may_prefer is None and mode != "oracle":
            raise LancetError("preferred='near' needs judged rows (--row-judge) or the oracle ranking: without either "
                              "the highest-scored rows left are the next rows that drive the behaviour")
        good = [i for i in order if i not in taken][:k]
    elif preferred == "marked":
        if preferred_mask is None:
            raise LancetError("preferred='marked' needs a mask of the rows to prefer (e.g. the known refusals)")
        marked = _mask(preferred_mask, n, "preferred")
        good = [i for i in reversed(order) if marked[i] and i not in taken][:k]
    else:
        good = [i for i in reversed(order) if i not in taken][:k]
    if not good:
        raise LancetError(f"no preferred rows left ({preferred}): every candidate is dispreferred")
    return bad, good


def _mask(mask: torch.Tensor, n: int, what: str) -> torch.Tensor:
    mask = torch.as_tensor(mask, dtype=torch.bool).reshape(-1)
    if mask.numel() != n:
        raise LancetError(f"{what} mask has {mask.numel()} entries for {n} training rows")
    return mask


def prompt_key(row: dict[str, Any]) -> tuple[int, ...]:
    """The row's prompt tokens (everything before its first labelled token): rows with equal keys answer one
    prompt."""
    labels = list(row["labels"])
    start = next((i for i, t in enumerate(labels) if t != IGNORE_INDEX), len(labels))
    return tuple(int(t) for t in list(row["input_ids"])[:start])


def same_prompt_partners(scores: torch.Tensor, train_rows: Sequence[dict[str, Any]],
                         rejected: Sequence[tuple[dict[str, Any], float]], taken: set[int]) -> list[int | None]:
    """For each dispreferred row, the lowest-scored training row that answers the same prompt with a lower score
    and is not itself dispreferred (``taken``); None where there is none."""
    by_prompt: dict[tuple[int, ...], list[int]] = {}
    for j, row in enumerate(train_rows):
        if j not in taken:
            by_prompt.setdefault(prompt_key(row), []).append(j)
    partners = []
    for row, z in rejected:
        cands = [j for j in by_prompt.get(prompt_key(row), []) if float(scores[j]) < z]
        partners.append(min(cands, key=lambda j: (float(scores[j]), j)) if cands else None)
    return partners


def build_ibo_pairs(
    scores_agg: torch.Tensor,
    train_rows: Sequence[dict[str, Any]],
    *,
    top_k: int,
    pairing: str = "rank",
    iq_rows: Sequence[dict[str, Any]] | None = None,
    include_iqs: bool = True,
    target_temperature: float = 0.0,
    seed: int = 0,
    max_pairs: int | None = None,
    selection: tuple[Sequence[int], Sequence[int]] | None = None,
    weighting: str = "gap",
    same_prompt: bool = True,
) -> list[dict[str, Any]]:
    """IBO pairs ``{"chosen", "rejected", "weight", "target", "gap"}`` (chosen/rejected are encoded rows).

    Dispreferred: the ``top_k`` highest-scored rows, then the IQ rows (prompt + the model's undesirable answer) when
    ``include_iqs``, each IQ scored as the highest dispreferred row. Preferred: the ``top_k`` lowest-scored rows.
    ``selection`` = (dispreferred, preferred) indices overrides the top-k choice (see :func:`select_rows`).

    Pairing: ``rank`` pairs the i-th most positive with the i-th most negative, cycling the shorter list; ``random``
    a seeded random matching with the same multiplicities; ``all`` the cartesian product. ``max_pairs`` caps the
    count by a seeded subsample (order kept). With ``same_prompt``, a dispreferred row whose prompt is also answered
    by a lower-scored training row (not dispreferred) is paired with the lowest-scored such row instead, as DPO's
    pairs are (docs/method.md §3.6); the other dispreferred rows are paired as above.

    Gap g = z_l − z_w (z: aggregated scores). Weight w = g / mean(g), clipped at 0 (``weighting="gap"``; uniform 1
    when the mean gap is not positive, with a warning) or 1 (``"uniform"``); target p* = 1 when
    ``target_temperature`` is 0, else σ(g / target_temperature).
    """
    if pairing not in PAIRINGS:
        raise LancetError(f"unknown pairing {pairing!r}; choose from {', '.join(PAIRINGS)}")
    if weighting not in WEIGHTINGS:
        raise LancetError(f"unknown weighting {weighting!r}; choose from {', '.join(WEIGHTINGS)}")
    if target_temperature < 0:
        raise LancetError(f"target_temperature must be >= 0, got {target_temperature}")
    scores = scores_agg.detach().double().cpu()
    if scores.numel() != len(train_rows):
        raise LancetError(f"{scores.numel()} scores for {len(train_rows)} training rows")
    bad_idx, good_idx = selection if selection is not None else select_rows(scores, top_k)
    rejected = [(train_rows[i], float(scores[i])) for i in bad_idx]
    chosen = [(train_rows[i], float(scores[i])) for i in good_idx]
    if include_iqs and iq_rows:
        top = max(z for _, z in rejected) if rejected else float(scores.max())
        rejected += [(row, top) for row in iq_rows]
    if not rejected or not chosen:
        raise LancetError("no rows to pair (empty dispreferred or preferred set)")

    gen = _generator(seed)
    n_chosen = len(chosen)  # the ranking's preferred rows; same-prompt partners are appended after them
    within: list[tuple[int, int]] = []
    cross = list(range(len(rejected)))
    if same_prompt:
        partners = same_prompt_partners(scores, train_rows, rejected, set(bad_idx))
        slot: dict[int, int] = {}  # training row -> its index in ``chosen``
        for i, j in enumerate(partners):
            if j is not None:
                if j not in slot:
                    slot[j] = len(chosen)
                    chosen.append((train_rows[j], float(scores[j])))
                within.append((i, slot[j]))
        cross = [i for i, j in enumerate(partners) if j is None]
    if not cross:
        index = []
    elif pairing == "all":
        index = [(i, j) for i in cross for j in range(n_chosen)]
    else:
        n = max(len(cross), n_chosen)
        js = [j % n_chosen for j in range(n)]
        if pairing == "random":
            js = [js[p] for p in torch.randperm(n, generator=gen).tolist()]
        index = [(cross[i % len(cross)], js[i]) for i in range(n)]
    index = within + index
    if max_pairs is not None and len(index) > max_pairs:
        keep = sorted(torch.randperm(len(index), generator=gen)[:max_pairs].tolist())
        index = [index[p] for p in keep]

    gaps = torch.tensor([rejected[i][1] - chosen[j][1] for i, j in index], dtype=torch.float64)
    if weighting == "uniform":
        weights = torch.ones_like(gaps)
    elif gaps.mean() > 0:
        weights = (gaps / gaps.mean()).clamp_min(0.0)
    else:
        warnings.warn("mean influence gap of the IBO pairs is not positive; using uniform weights", stacklevel=2)
        weights = torch.ones_like(gaps)
    if target_temperature == 0:
        targets = torch.ones_like(gaps)
    else:
        targets = torch.sigmoid(gaps / target_temperature)
    return [
        {"chosen": chosen[j][0], "rejected": rejected[i][0], "weight": float(w), "target": float(t), "gap": float(g)}
        for (i, j), w, t, g in zip(index, weights, targets, gaps, strict=True)
    ]


def forget_items(forget_rows: Sequence[dict[str, Any]], retain_rows: Sequence[dict[str, Any]] | None = None
                 ) -> list[dict[str, Any]]:
    """Items ``{"forget": row, "retain": row or None}`` for gradient ascent and NPO; with retain rows, the shorter
    list is cycled so that every row of both appears."""
    if not forget_rows:
        raise LancetError("no rows to forget")
    if not retain_rows:
        return [{"forget": row, "retain": None} for row in forget_rows]
    n = max(len(forget_rows), len(retain_rows))
    return [{"forget": forget_rows[i % len(forget_rows)], "retain": retain_rows[i % len(retain_rows)]}
            for i in range(n)]


def preference_items(chosen_rows: Sequence[dict[str, Any]], rejected_rows: Sequence[dict[str, Any]]
                     ) -> list[dict[str, Any]]:
    """DPO items from aligned chosen/rejected rows: weight 1, target 1."""
    if len(chosen_rows) != len(rejected_rows):
        raise LancetError(f"{len(chosen_rows)} chosen rows for {len(rejected_rows)} rejected rows")
    return [{"chosen": c, "rejected": r, "weight": 1.0, "target": 1.0, "gap": 0.0}
            for c, r in zip(chosen_rows, rejected_rows, strict=True)]


def read_preference_pairs(path: str | Path, limit: int | None = None) -> list[tuple[Record, Record]]:
    """(chosen, rejected) Records with the same prompt.

    An HH-RLHF file (``chosen``/``rejected`` transcripts starting with "\\n\\nHuman:") is read through
    :func:`lancet.data.adapters.read_hh_rlhf` on both sides and aligned by line (rows whose two sides do not share
    the prompt, or where one side has an empty answer, are dropped with one warning). Any other JSONL/JSON/CSV file
    needs rows ``{"prompt", "chosen", "rejected"}`` (strings), as TRL's preference format.
    """
    from lancet.data.adapters import read_hh_rlhf
    from lancet.data.readers import detect_format, iter_rows, require_text

    src = str(path)
    fmt = detect_format(path)
    first = next(iter(iter_rows(path, fmt)), None)
    if first is None:
        raise DataError("empty file (no rows)", src)
    row = first[1]
    is_hh = isinstance(row, dict) and isinstance(row.get("chosen"), str) and row["chosen"].startswith("\n\nHuman:")
    pairs: list[tuple[Record, Record]] = []
    if is_hh:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            chosen = {r.line: r for r in read_hh_rlhf(path, "chosen")}
            rejected = {r.line: r for r in read_hh_rlhf(path, "rejected")}
        dropped = 0
        for line in sorted(chosen):
            c, r = chosen[line], rejected.get(line)
            if r is None or c.prompt_messages != r.prompt_messages or c.response_text == r.response_text:
                dropped += 1
                continue
            pairs.append((c, r))
            if limit is not None and len(pairs) >= limit:
                break
        dropped += len(set(rejected) - set(chosen))
        if dropped or caught:
            warnings.warn(f"{src}: dropped {dropped} rows without a usable same-prompt chosen/rejected pair",
                          stacklevel=2)
    else:
        for line, row in iter_rows(path, fmt):
            if not isinstance(row, dict):
                raise DataError(f"expected an object, got {type(row).__name__}", src, line)
            prompt = require_text(row.get("prompt"), src, line, "prompt")
            c = require_text(row.get("chosen"), src, line, "chosen")
            r = require_text(row.get("rejected"), src, line, "rejected")
            pairs.append((Record(prompt=prompt, response=c, source=src, line=line),
                          Record(prompt=prompt, response=r, source=src, line=line)))
            if limit is not None and len(pairs) >= limit:
                break
    if not pairs:
        raise DataError("no usable chosen/rejected pairs", src)
    return pairs
