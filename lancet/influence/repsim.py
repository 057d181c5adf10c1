"""RepSim: representation similarity, the baseline that Li et al. (2024, "Do influence functions work on large
language models?") and DRA/DABUF (2025) found stronger than influence functions at finding harmful training data.

A row's representation is the mean of the model's last-layer hidden states over its response tokens (the positions
whose label is scored); training and query representations are centred by the training mean, and the score is their
cosine. Centring matters: every hidden state of a causal LM shares a large common direction, so uncentred cosines
sit near 1 and rank by that direction (the first try on the contamination benchmark: AP 0.132 uncentred against
0.490 centred). No gradients, no fit: one forward pass over the rows.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from tqdm.auto import tqdm

from lancet.constants import IGNORE_INDEX
from lancet.curvature.fit import batches
from lancet.curvature.task import position_ids
from lancet.hardware import autocast, model_device


@torch.no_grad()
def representations(model, rows: Sequence[dict[str, Any]], *, batch_size: int = 8, bf16: bool = False,
                    dtype: torch.dtype = torch.float32, progress: bool = False) -> torch.Tensor:
    """[N, hidden]: the mean last-layer hidden state over each row's response tokens (all tokens when a row has
    no scored label)."""
    model.eval()
    out = []
    device = model_device(model)
    # the decoder stack alone: its last hidden state is the full model's last (post-norm) one, without computing
    # logits over the vocabulary (a fifth of a 135M model's forward, and a [B, T, vocab] tensor per batch)
    get_decoder = getattr(model, "get_decoder", None)
    body = get_decoder() if callable(get_decoder) else None
    for _, batch in tqdm(batches(rows, batch_size, device=device), total=-(-len(rows) // batch_size), desc="repsim",
                         disable=not progress):
        inputs = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"],
                  "position_ids": position_ids(batch["attention_mask"]), "use_cache": False}
        with autocast(device, bf16):
            if body is not None:
                hidden = body(**inputs).last_hidden_state
            else:
                hidden = model(**inputs, output_hidden_states=True).hidden_states[-1]
        mask = (batch["labels"] != IGNORE_INDEX) & batch["attention_mask"].bool()
        empty = ~mask.any(1)
        mask[empty] = batch["attention_mask"][empty].bool()
        m = mask.to(dtype).unsqueeze(-1)
        out.append(((hidden.to(dtype) * m).sum(1) / m.sum(1)).cpu())
    return torch.cat(out)


def repsim_scores(model, train: Sequence[dict[str, Any]], queries: Sequence[dict[str, Any]], *, batch_size: int = 8,
                  bf16: bool = False, dtype: torch.dtype = torch.float32, progress: bool = False) -> torch.Tensor:
    """[Q, N] cosine of centred representations (centre = mean over the training rows)."""
    kw = {"batch_size": batch_size, "bf16": bf16, "dtype": dtype, "progress": progress}
    r_train = representations(model, train, **kw)
    return centred_cosines(representations(model, queries, **kw), r_train)


def anchored_repsim_scores(model, train: Sequence[dict[str, Any]], queries: Sequence[dict[str, Any]],
                           anchors: Sequence[dict[str, Any]], *, batch_size: int = 8, bf16: bool = False,
                           dtype: torch.dtype = torch.float32, progress: bool = False) -> torch.Tensor:
    """[Q, N] ``repsim_anchored``: each query's RepSim minus the anchors' mean RepSim,
    cos(r_q - c, r_n - c) - mean_a cos(r_a - c, r_n - c), c the training mean.

    The anchored trick of the gradient methods (He, Xia & Henderson 2024; docs/method.md §2.12) applied to
    representations: a row close to every answer on these prompts (the topic, the register, the chat format) is
    close to the anchors too and cancels; a row close to the flagged answers and not to the anchors keeps its score.
    The anchors are rows the caller chooses: the model's own answers to ordinary prompts, or a safe model's
    refusals to the IQ prompts. (The training mean needs no option: RepSim is centred on it already.)"""
    kw = {"batch_size": batch_size, "bf16": bf16, "dtype": dtype, "progress": progress}
    r_train = representations(model, train, **kw)
    plain = centred_cosines(representations(model, queries, **kw), r_train)
    return plain - centred_cosines(representations(model, anchors, **kw), r_train).mean(0, keepdim=True)


def centred_cosines(r_query: torch.Tensor, r_train: torch.Tensor) -> torch.Tensor:
    """[Q, N] cosines of the queries' and training rows' representations, both centred on the training mean."""
    centre = r_train.mean(0, keepdim=True)
    return torch.nn.functional.normalize(r_query - centre, dim=1) @ torch.nn.functional.normalize(
        r_train - centre, dim=1).T
