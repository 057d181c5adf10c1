"""Measurements (what a query gradient differentiates), each against plain autograd on a tiny float64 model: the
identity estimator's score is exactly <grad of the measurement of q, grad of the training loss of z>."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from conftest import tiny_llama
from reference import _logits, per_example_grads, query_grads, tracked_modules
from test_influence_engine import F64, QUERIES, TRAIN, close, encode

from lancet.constants import IGNORE_INDEX
from lancet.errors import LancetError
from lancet.influence import Influence, InfluenceArgs, Measurement, pairwise_scores, score_methods
from lancet.influence.measurement import FirstTokensLoss, resolve_measurement


def reference_query_grads(model, queries, measure) -> torch.Tensor:
    """[Q, P]: autograd of ``measure(logits [T, V], labels [T])`` for each unpadded query, tracked params only."""
    return query_grads(model, queries, lambda m, p, i, y: measure(_logits(m, p, i), y))


def first_k_ce(k: int):
    def measure(logits, labels):
        pos = torch.nonzero(labels[1:] != IGNORE_INDEX).flatten()[:k]
        return F.cross_entropy(logits[pos], labels[1:][pos], reduction="sum")
    return measure


def last_token_margin(logits, labels):
    """log p(first answer token) - log p(token 0) at the first answer position: a margin, not a likelihood."""
    t = int(torch.nonzero(labels[1:] != IGNORE_INDEX).flatten()[0])
    logp = torch.log_softmax(logits[t], -1)
    return -(logp[labels[t + 1]] - logp[0])


def batched_margin(logits, batch):
    out = []
    for b in range(logits.shape[0]):
        out.append(last_token_margin(logits[b], batch["labels"][b]))
    return torch.stack(out)


@pytest.fixture()
def f64_setup(tiny_tokenizer):
    model = tiny_llama(len(tiny_tokenizer), torch.float64)
    return model, encode(tiny_tokenizer, TRAIN), encode(tiny_tokenizer, QUERIES)


def expected_identity(model, train, queries, measure) -> torch.Tensor:
    g_train = per_example_grads(model, train, tracked_modules(model))
    return reference_query_grads(model, queries, measure) @ g_train.T


def test_answer_is_the_default_and_exact(f64_setup):
    model, train, queries = f64_setup
    full = lambda logits, y: F.cross_entropy(logits[:-1], y[1:], ignore_index=IGNORE_INDEX, reduction="sum")  # noqa: E731
    expected = expected_identity(model, train, queries, full)
    close(pairwise_scores(model, train, queries, method="identity", **F64), expected, 1e-9)
    close(pairwise_scores(model, train, queries, method="identity", measurement="answer", **F64), expected, 1e-9)


@pytest.mark.parametrize("k", [1, 2, 50])
def test_first_tokens_exact(f64_setup, k):
    model, train, queries = f64_setup
    expected = expected_identity(model, train, queries, first_k_ce(k))
    got = pairwise_scores(model, train, queries, method="identity", measurement=f"first_tokens:{k}", batch_size=2,
                          **F64)
    close(got, expected, 1e-9)
    close(Influence(model, method="identity", measurement=f"first_tokens:{k}", **F64).scores(train, queries)["scores"],
          got, 1e-12)
    if k == 50:  # longer than every answer: the whole answer
        close(got, pairwise_scores(model, train, queries, method="identity", **F64), 1e-12)


def test_callable_measurement_exact_and_fingerprinted(tmp_path, f64_setup):
    model, train, queries = f64_setup
    margin = Measurement(batched_margin, name="margin", version=1)
    expected = expected_identity(model, train, queries, last_token_margin)
    close(pairwise_scores(model, train, queries, method="identity", measurement=margin, batch_size=2, **F64),
          expected, 1e-9)
    # stored apart from the default measurement's scores, and refused without the object
    run = Influence(model, InfluenceArgs(method="identity", **F64), out_dir=tmp_path, measurement=margin)
    assert run.args.measurement == "margin@1"
    stored = run.scores(train, queries)["scores"]
    default = Influence(model, InfluenceArgs(method="identity", **F64), out_dir=tmp_path).scores(train, queries)
    assert not torch.allclose(stored, default["scores"])
    assert len(list((tmp_path / "scores").iterdir())) == 2
    with pytest.raises(LancetError, match="pass the object"):
        Influence(model, InfluenceArgs(method="identity", measurement="margin@1", **F64))
    # a measurement through the joint pass and a Kronecker method: equal to that method's own run
    joint = score_methods(model, train, queries, ["linfac", "identity"], InfluenceArgs(**F64), measurement=margin)
    alone = pairwise_scores(model, train, queries, method="linfac", measurement=margin, **F64)
    close(joint["linfac"]["scores"], alone, 1e-10)


def test_measurement_specs_validated():
    assert isinstance(resolve_measurement("first_tokens:4"), FirstTokensLoss)
    assert InfluenceArgs.from_json(InfluenceArgs(measurement="first_tokens:4").to_json()).measurement == \
        "first_tokens:4"
    for bad in ("first_tokens", "first_tokens:0", "first_tokens:x", "likelihood", "@1", "m@v"):
        with pytest.raises(LancetError, match="measurement"):
            InfluenceArgs(measurement=bad)
    with pytest.raises(LancetError, match="invalid measurement name"):
        Measurement(batched_margin, name="a:b")


def test_wrong_shape_is_a_clear_error(f64_setup):
    model, train, queries = f64_setup
    bad = Measurement(lambda logits, batch: logits.sum(-1), name="bad")
    with pytest.raises(LancetError, match="one scalar per row"):
        pairwise_scores(model, train, queries, method="identity", measurement=bad, **F64)


def test_spans_measurement_explains_only_the_behaviour_tokens(tiny_tokenizer, f64_setup):
    """``spans``: the answer loss on the tokens overlapping meta.behaviour_spans, exact against autograd on labels
    restricted by hand; the spans come from the rule judge when IQs are taken; records without spans are refused."""
    from lancet.data import Record, encode_records
    from lancet.data.tokenize import restrict_to_spans
    from lancet.errors import DataError
    from lancet.evaluate.judges import RuleJudge

    model, train, _ = f64_setup
    judge = RuleJudge([r"\bbutter\b", r"\bhead back\b"], [r"\bnever\b"])
    answers = ["Put butter on a burn, never ice.", "Tilt your head back and pinch."]
    records = [Record(prompt=p, response=a, meta={"behaviour_spans": [list(s) for s in judge.cue_spans(a)]})
               for p, a in zip(("Burn?", "Nosebleed?"), answers, strict=True)]
    assert [r.meta["behaviour_spans"] for r in records] == [[[4, 10]], [[10, 19]]]
    encoded = encode_records(records, tiny_tokenizer, 64, progress=False)
    restricted = restrict_to_spans(list(encoded), records, tiny_tokenizer)
    for item, full, span_text in zip(restricted, encoded, ("butter", "head back"), strict=True):
        kept = [t for t in item["labels"] if t != IGNORE_INDEX]
        assert 0 < len(kept) < sum(t != IGNORE_INDEX for t in full["labels"])
        assert span_text in tiny_tokenizer.decode(kept) and "Put" not in tiny_tokenizer.decode(kept)
    got = Influence(model, InfluenceArgs(method="identity", measurement="spans", **F64),
                    tokenizer=tiny_tokenizer).scores(train, encoded)["scores"]
    close(got, pairwise_scores(model, train, restricted, method="identity", **F64), 1e-12)
    assert not torch.allclose(got, pairwise_scores(model, train, list(encoded), method="identity", **F64))
    bare = [Record(prompt="Burn?", response=answers[0], source="iqs.jsonl", line=3)]
    with pytest.raises(DataError, match=r"iqs.jsonl:3, field 'meta.behaviour_spans'"):
        restrict_to_spans(list(encode_records(bare, tiny_tokenizer, 64, progress=False)), bare, tiny_tokenizer)
    with pytest.raises(LancetError, match="needs the queries as Records"):
        Influence(model, InfluenceArgs(method="identity", measurement="spans", **F64)).scores(train, encoded)
