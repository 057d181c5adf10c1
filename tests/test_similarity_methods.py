"""The similarity baselines in the registry, against known answers on tiny float64 models: ``cosine`` (raw
per-row gradients, normalised) and ``repsim`` (centred mean last-layer hidden states over response tokens)."""

from __future__ import annotations

import pytest
import torch
from conftest import tiny_llama
from reference import per_example_grads, tracked_modules
from test_influence_engine import F64, QUERIES, TRAIN, close, encode

from lancet.constants import IGNORE_INDEX
from lancet.influence import Influence, InfluenceArgs, pairwise_scores, score_methods
from lancet.influence.repsim import representations, repsim_scores


@pytest.fixture()
def f64_setup(tiny_tokenizer):
    model = tiny_llama(len(tiny_tokenizer), torch.float64)
    return model, encode(tiny_tokenizer, TRAIN), encode(tiny_tokenizer, QUERIES)


def autograd_cosine(model, train, queries) -> torch.Tensor:
    names = tracked_modules(model)
    g_train, g_query = per_example_grads(model, train, names), per_example_grads(model, queries, names)
    return torch.nn.functional.normalize(g_query, dim=1) @ torch.nn.functional.normalize(g_train, dim=1).T


@pytest.mark.parametrize("query_rank", [None, 64])
def test_cosine_equals_autograd_cosine(f64_setup, query_rank):
    model, train, queries = f64_setup
    expected = autograd_cosine(model, train, queries)
    got = pairwise_scores(model, train, queries, method="cosine", query_rank=query_rank, batch_size=5, **F64)
    close(got, expected, 1e-8)
    assert got.abs().max() <= 1 + 1e-12
    # a row scored against itself as a query has cosine 1
    self_cos = pairwise_scores(model, train[:3], train[:3], method="cosine", **F64)
    close(torch.diagonal(self_cos), torch.ones(3, dtype=torch.float64), 1e-10)


def test_cosine_is_identity_divided_by_both_norms(f64_setup):
    model, train, queries = f64_setup
    dot = pairwise_scores(model, train, queries, method="identity", **F64)
    names = tracked_modules(model)
    n_train = per_example_grads(model, train, names).norm(dim=1)
    n_query = per_example_grads(model, queries, names).norm(dim=1)
    got = pairwise_scores(model, train, queries, method="cosine", **F64)
    close(got, dot / n_query[:, None] / n_train[None, :], 1e-9)


def test_cosine_in_a_joint_pass_and_resumed(tmp_path, f64_setup, monkeypatch):
    """Shared with other methods, cosine divides only its own queries; a pass resumed from a chunk agrees."""
    model, train, queries = f64_setup
    args = InfluenceArgs(batch_size=4, chunk_rows=4, **F64)
    joint = score_methods(model, train, queries, ["identity", "cosine", "linfac"], args)
    for method in ("identity", "cosine", "linfac"):
        alone = Influence(model, InfluenceArgs(method=method, batch_size=4, **F64)).scores(train, queries)["scores"]
        close(joint[method]["scores"], alone, 1e-10)

    import lancet.influence.scoring as scoring

    real, calls = scoring.atomic_save_tensors, {"n": 0}

    def crash_after_first_chunk(path, tensors):
        real(path, tensors)
        calls["n"] += 1
        raise KeyboardInterrupt

    monkeypatch.setattr(scoring, "atomic_save_tensors", crash_after_first_chunk)
    run = Influence(model, InfluenceArgs(method="cosine", batch_size=4, chunk_rows=4, **F64), out_dir=tmp_path)
    with pytest.raises(KeyboardInterrupt):
        run.scores(train, queries)
    monkeypatch.setattr(scoring, "atomic_save_tensors", real)
    resumed = Influence(model, InfluenceArgs(method="cosine", batch_size=4, chunk_rows=4, **F64),
                        out_dir=tmp_path).scores(train, queries)["scores"]
    assert calls["n"] == 1
    close(resumed, joint["cosine"]["scores"], 1e-12)


def test_cosine_token_scores_sum_to_row_scores(f64_setup):
    model, train, queries = f64_setup
    run = Influence(model, InfluenceArgs(method="cosine", **F64))
    run.fit(train)
    rows = run.scores(train[:4], queries)["scores"]
    tokens = run.token_scores(train[:4], queries)
    close(torch.stack([t.sum(1) for t in tokens], 1), rows, 1e-10)


def manual_representation(model, row) -> torch.Tensor:
    ids = torch.tensor([row["input_ids"]])
    hidden = model(input_ids=ids, output_hidden_states=True).hidden_states[-1][0]
    mask = torch.tensor(row["labels"]) != IGNORE_INDEX
    return hidden[mask].mean(0)


def test_repsim_known_answer(f64_setup):
    model, train, queries = f64_setup
    with torch.no_grad():
        r_train = torch.stack([manual_representation(model, r) for r in train])
        r_query = torch.stack([manual_representation(model, r) for r in queries])
    close(representations(model, train, batch_size=5, dtype=torch.float64), r_train, 1e-10)
    model.get_decoder = None  # a model without a decoder accessor: the full forward's last hidden state, the same
    close(representations(model, train, batch_size=5, dtype=torch.float64), r_train, 1e-10)
    del model.get_decoder
    centre = r_train.mean(0)
    expected = torch.nn.functional.normalize(r_query - centre, dim=1) @ torch.nn.functional.normalize(
        r_train - centre, dim=1).T
    close(repsim_scores(model, train, queries, batch_size=3, dtype=torch.float64), expected, 1e-10)
    got = pairwise_scores(model, train, queries, method="repsim", **F64)
    close(got, expected, 1e-10)
    # a training row used as a query is its own nearest neighbour (cosine 1 after the same centring)
    own = pairwise_scores(model, train, train[:4], method="repsim", **F64)
    assert torch.equal(own.argmax(1), torch.arange(4))
    close(torch.diagonal(own[:, :4]), torch.ones(4, dtype=torch.float64), 1e-10)


def test_repsim_needs_no_fit_and_shares_score_methods(f64_setup):
    model, train, queries = f64_setup
    assert Influence(model, InfluenceArgs(method="repsim", **F64)).fit(train) is None
    both = score_methods(model, train, queries, ["repsim", "bm25", "identity"], InfluenceArgs(**F64))
    close(both["repsim"]["scores"], pairwise_scores(model, train, queries, method="repsim", **F64), 1e-12)


def test_tensor_rows_give_the_same_scores(f64_setup):
    """Rows as {"input_ids": tensor, "labels": tensor} (the natural torch form) score as their list form."""
    model, train, queries = f64_setup
    as_tensors = [{"input_ids": torch.tensor(r["input_ids"]), "labels": torch.tensor(r["labels"])} for r in train]
    for method in ("linfac", "cosine", "repsim", "bm25"):
        close(pairwise_scores(model, as_tensors, queries, method=method, **F64),
              pairwise_scores(model, train, queries, method=method, **F64), 1e-12)
