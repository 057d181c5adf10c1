"""The one entry point, ``Influence``: every input form gives the same scores, several estimators share one pass
through ``scores_by_method``, bad input is one clear error, and the old functions are deprecated wrappers."""

from __future__ import annotations

import datasets
import pytest
import torch
from conftest import tiny_llama
from test_influence_engine import F64, QUERIES, TRAIN, close, encode

from lancet.data.records import Record
from lancet.errors import LancetError
from lancet.influence import Influence, InfluenceArgs, pairwise_scores, score_methods


@pytest.fixture()
def setup(tiny_tokenizer):
    return tiny_llama(len(tiny_tokenizer), torch.float64), tiny_tokenizer


# identity first: as the first computation of a fresh process, linfac's scores differed by up to 3e-5 relative from
# a second run in about 1 run of 10 (float64; the first matrix products of a process round differently, and
# LinFAC's correction amplifies it; found 2026-12-01, not yet explained). The input forms are what is tested here.
@pytest.mark.parametrize("method", ["identity", "kfac", "linfac"])
def test_every_input_form_gives_the_same_scores(setup, method):
    model, tok = setup
    encoded = encode(tok, TRAIN), encode(tok, QUERIES)
    expected = Influence(model, method=method, **F64).scores(*encoded)["scores"]
    as_records = [[Record(prompt=p, response=r) for p, r in pairs] for pairs in (TRAIN, QUERIES)]
    as_dicts = [[{"prompt": p, "response": r} for p, r in pairs] for pairs in (TRAIN, QUERIES)]
    as_chat = [[{"messages": [{"role": "user", "content": p}, {"role": "assistant", "content": r}]}
                for p, r in pairs] for pairs in (TRAIN, QUERIES)]
    as_dataset = [datasets.Dataset.from_list(rows) for rows in as_dicts]
    as_tensors = [[{"input_ids": torch.tensor(r["input_ids"]), "labels": torch.tensor(r["labels"])} for r in rows]
                  for rows in encoded]
    for form in (as_records, as_dicts, as_chat, as_dataset, as_tensors):
        run = Influence(model, method=method, tokenizer=tok, max_length=64, **F64)
        close(run.scores(*form)["scores"], expected, 1e-12)


def test_fit_once_score_many_and_several_methods_in_one_pass(setup, tmp_path):
    model, tok = setup
    run = Influence(model, InfluenceArgs(method="linfac", **F64), tokenizer=tok, max_length=64, out_dir=tmp_path)
    train = [Record(prompt=p, response=r) for p, r in TRAIN]
    curvature = run.fit(train)
    first = run.scores(train, [Record(prompt=p, response=r) for p, r in QUERIES[:2]])["scores"]
    second = run.scores(train, [Record(prompt=p, response=r) for p, r in QUERIES[2:]])["scores"]
    assert run._curvature is curvature and first.shape == (2, 12) and second.shape == (1, 12)
    both = run.scores_by_method(train, [Record(prompt=p, response=r) for p, r in QUERIES], ["linfac", "identity",
                                                                                           "bm25", "repsim"])
    assert set(both) == {"linfac", "identity", "bm25", "repsim"}
    close(both["linfac"]["scores"][:2], first, 1e-10)
    tokens = run.token_scores(train[:2], [Record(prompt=p, response=r) for p, r in QUERIES])
    assert [t.shape[0] for t in tokens] == [3, 3]


@pytest.mark.parametrize(("data", "match"), [
    ("a string", "expected a sequence of rows"),
    ({"prompt": "one dict"}, "expected a sequence of rows"),
    (42, "expected a sequence of rows"),
    ([], "no rows"),
    ([1, 2], "row 0 is a int without 'input_ids'"),
    ([{"text": "no prompt"}], "without 'input_ids'"),
    ([{"input_ids": [1, 2], "labels": [1]}], "2 input_ids but 1 labels"),
    ([Record(prompt="a", response="b"), {"prompt": "c"}], "mixed row types"),
])
def test_bad_input_is_one_clear_error(setup, data, match):
    model, tok = setup
    with pytest.raises(LancetError, match=match):
        Influence(model, method="identity", tokenizer=tok, **F64).scores(data, encode(tok, QUERIES))


def test_text_needs_a_tokenizer(setup):
    model, tok = setup
    with pytest.raises(LancetError, match="need a tokenizer"):
        Influence(model, method="identity", **F64).scores([Record(prompt="a", response="b")], encode(tok, QUERIES))


def test_old_functions_are_deprecated_wrappers(setup):
    model, tok = setup
    train, queries = encode(tok, TRAIN), encode(tok, QUERIES)
    new = Influence(model, method="kfac", **F64).scores_by_method(train, queries, ["kfac", "identity"])
    with pytest.deprecated_call():
        old = pairwise_scores(model, train, queries, method="kfac", **F64)
    close(old, new["kfac"]["scores"], 1e-12)
    with pytest.deprecated_call():
        joint = score_methods(model, train, queries, ["kfac", "identity"], InfluenceArgs(**F64))
    close(joint["identity"]["scores"], new["identity"]["scores"], 1e-12)


def test_scores_unchanged_by_the_refactor(tiny_tokenizer):
    """tests/data/scores_before_refactor.json holds the scores of this setup computed by the tree before the API,
    measurement, packaging and BM25 changes (commit 44e674d): the same rows give the same scores."""
    import json
    from pathlib import Path

    pinned = json.loads((Path(__file__).parent / "data" / "scores_before_refactor.json").read_text())
    model = tiny_llama(len(tiny_tokenizer), torch.float64)
    train, queries = encode(tiny_tokenizer, TRAIN), encode(tiny_tokenizer, QUERIES)
    run = Influence(model, InfluenceArgs(**F64))
    every = run.scores_by_method(train, queries, list(pinned))
    for method, expected in pinned.items():
        close(every[method]["scores"], torch.tensor(expected, dtype=torch.float64), 1e-6)


def test_low_rank_queries_formed_in_chunks_equal_one_pass(monkeypatch, tiny_tokenizer):
    """With query_rank set, queries are differentiated QUERY_CHUNK at a time; the scores do not depend on it."""
    from conftest import tiny_llama

    import lancet.influence.engine as influence_module
    from lancet.influence import Influence, InfluenceArgs

    g = torch.Generator().manual_seed(0)
    rows = [{"input_ids": (ids := torch.randint(3, 64, (9,), generator=g).tolist()), "labels": [-100] * 3 + ids[3:]}
            for _ in range(10)]
    model = tiny_llama(64, dtype=torch.float64)
    for method in ("linfac", "cosine"):
        args = InfluenceArgs(method=method, dtype="float64", query_rank=4, batch_size=4, progress=False)
        monkeypatch.setattr(influence_module, "QUERY_CHUNK", 100)
        whole = Influence(model, args).scores(rows, rows[:7])["scores"]
        monkeypatch.setattr(influence_module, "QUERY_CHUNK", 3)
        chunked = Influence(model, args).scores(rows, rows[:7])["scores"]
        assert torch.allclose(whole, chunked, rtol=1e-10, atol=1e-12), method
