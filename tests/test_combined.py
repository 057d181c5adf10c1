"""Aggregate-first scoring: ``Influence.combined_scores`` scores K linear combinations of the queries as K
full-rank queries. It must equal C @ (per-query scores) exactly, for every estimator family, per layer, across
query chunks, from a joint pass, and from its stored artifact."""

from __future__ import annotations

import pytest
import torch
from conftest import tiny_llama
from test_influence_engine import F64, QUERIES, TRAIN, close

import lancet.influence.engine as influence_module
from lancet.data.records import Record
from lancet.errors import LancetError
from lancet.influence import Influence, InfluenceArgs
from lancet.influence.recall import aggregate, normalized_mean_weights

METHODS = ["identity", "cosine", "kfac", "ekfac", "linfac"]


@pytest.fixture()
def setup(tiny_tokenizer, monkeypatch):
    monkeypatch.setattr(influence_module, "QUERY_CHUNK", 2)  # three queries: two chunks to fold
    train = [Record(prompt=p, response=r) for p, r in TRAIN]
    queries = [Record(prompt=p, response=r) for p, r in QUERIES]
    return tiny_llama(len(tiny_tokenizer), torch.float64), tiny_tokenizer, train, queries


def test_combined_scores_equal_the_combination_of_per_query_scores(setup, tmp_path):
    model, tok, train, queries = setup
    args = InfluenceArgs(per_layer=True, lambda_max_rows=6, **F64)
    per_query = Influence(model, args, tokenizer=tok, max_length=64).scores_by_method(train, queries, METHODS)
    coefficients = torch.tensor([[1.0, 0.0, 0.0], [0.5, -2.0, 3.0]], dtype=torch.float64)
    run = Influence(model, args, tokenizer=tok, max_length=64, out_dir=tmp_path)
    combined = run.combined_scores_by_method(train, queries, coefficients, METHODS)
    for method in METHODS:
        expected = coefficients @ per_query[method]["scores"]
        assert combined[method]["scores"].shape == (2, len(train))
        close(combined[method]["scores"], expected, 1e-9)
        layers = torch.einsum("kq,qnl->knl", coefficients, per_query[method]["per_layer"])
        close(combined[method]["per_layer"], layers, 1e-9)
    # a query that no combination uses is skipped (its gradient is never formed) without changing the result
    skip = torch.tensor([[1.0, 0.0, 2.0], [0.5, 0.0, -3.0]], dtype=torch.float64)
    skipped = Influence(model, args, tokenizer=tok, max_length=64).combined_scores_by_method(train, queries, skip,
                                                                                             ["linfac"])
    close(skipped["linfac"]["scores"], skip @ per_query["linfac"]["scores"], 1e-9)
    # each method its own coefficients (and K), in one joint pass
    own = {"kfac": coefficients[:1], "linfac": coefficients}
    mixed = run.combined_scores_by_method(train, queries, own, ["kfac", "linfac"])
    close(mixed["kfac"]["scores"], coefficients[:1] @ per_query["kfac"]["scores"], 1e-9)
    close(mixed["linfac"]["scores"], coefficients @ per_query["linfac"]["scores"], 1e-9)
    # stored: a second object reads the artifact without a pass
    again = Influence(model, args, tokenizer=tok, max_length=64, out_dir=tmp_path)
    close(again.combined_scores_by_method(train, queries, coefficients, ["linfac"])["linfac"]["scores"],
          combined["linfac"]["scores"], 0.0)


def test_normalized_mean_weights_give_the_aggregate(setup):
    model, tok, train, queries = setup
    run = Influence(model, InfluenceArgs(method="linfac", **F64), tokenizer=tok, max_length=64)
    scores = run.scores(train, queries)["scores"]
    weights = normalized_mean_weights(scores)
    close(weights @ scores, aggregate(scores), 1e-12)
    close(run.combined_scores(train, queries, weights.unsqueeze(0))["scores"][0], aggregate(scores), 1e-9)


def test_sampled_weights_are_exact_on_every_row_and_close_on_a_sample(setup, tmp_path):
    model, tok, train, queries = setup
    run = Influence(model, InfluenceArgs(method="linfac", **F64), tokenizer=tok, max_length=64, out_dir=tmp_path)
    scores = run.scores(train, queries)["scores"]
    exact = run.normalized_mean_weights(train, queries, ["linfac", "identity"], sample_rows=len(train),
                                        query_rank=None)
    close(exact["linfac"], normalized_mean_weights(scores), 1e-9)
    close(run.combined_scores(train, queries, exact["linfac"][None])["scores"][0], aggregate(scores), 1e-9)
    margins = torch.tensor([[1.0, -1.0, 0.0], [0.0, 1.0, -1.0]], dtype=torch.float64)
    virtual = run.normalized_mean_weights(train, queries, ["linfac"], sample_rows=len(train), query_rank=None,
                                          virtual=margins)["linfac"]
    close(run.combined_scores(train, queries, virtual[None])["scores"][0], aggregate(margins @ scores), 1e-9)
    sampled = run.normalized_mean_weights(train, queries, ["linfac"], sample_rows=6, query_rank=2)["linfac"]
    ratio = sampled / exact["linfac"]
    assert sampled.shape == (3,) and bool((ratio > 0.3).all() and (ratio < 3).all())


def test_normalized_mean_weights_do_not_depend_on_the_query_chunk(setup, tmp_path, monkeypatch):
    """Queries held a few at a time (NORMALIZED_MEAN_QUERY_BYTES) give the weights of all queries at once."""
    import lancet.influence.engine as influence

    model, tok, train, queries = setup
    run = Influence(model, InfluenceArgs(method="linfac", **F64), tokenizer=tok, max_length=64, out_dir=tmp_path)
    margins = torch.tensor([[1.0, -1.0, 0.0], [0.0, 1.0, -1.0]], dtype=torch.float64)
    whole = run.normalized_mean_weights(train, queries, ["linfac", "identity"], sample_rows=6, query_rank=2,
                                        virtual=margins)
    monkeypatch.setattr(influence, "NORMALIZED_MEAN_QUERY_BYTES", 1)  # one query at a time
    one_by_one = run.normalized_mean_weights(train, queries, ["linfac", "identity"], sample_rows=6, query_rank=2,
                                             virtual=margins)
    for method in ("linfac", "identity"):
        close(one_by_one[method], whole[method], 1e-10)
    assert not torch.allclose(whole["linfac"], whole["identity"])


def test_combined_scores_refuse_bad_coefficients_and_gradient_free_methods(setup):
    model, tok, train, queries = setup
    run = Influence(model, InfluenceArgs(method="identity", **F64), tokenizer=tok, max_length=64)
    with pytest.raises(LancetError, match=r"coefficients must be \[K, 3\]"):
        run.combined_scores(train, queries, torch.ones(1, 2))
    with pytest.raises(LancetError, match="coefficients are all zero"):
        run.combined_scores(train, queries, torch.zeros(1, 3))
    with pytest.raises(LancetError, match="bm25 has no query gradient"):
        run.combined_scores_by_method(train, queries, torch.ones(1, 3), ["bm25"])
