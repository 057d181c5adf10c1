"""Optimizer-aware normalisation (lancet.influence.gradient_scale) and anchored RepSim, against plain autograd and
known answers on tiny float64 models: every gradient divided elementwise by d = sqrt(v / bias_correction) + eps
before the identity / cosine scores; repsim_anchored = each query's RepSim minus the anchors' mean RepSim."""

from __future__ import annotations

import pytest
import torch
from conftest import tiny_gpt2, tiny_llama
from reference import per_example_grads, tracked_modules
from test_influence_engine import F64, QUERIES, TRAIN, close, encode
from test_similarity_methods import manual_representation

from lancet.errors import LancetError
from lancet.influence import Influence, InfluenceArgs
from lancet.influence.gradient_scale import GradientScale

EPS, BIAS_CORRECTION = 1e-3, 0.5


def random_second_moment(model, seed: int = 1) -> dict[str, torch.Tensor]:
    """A positive v per tracked parameter, spread over four orders of magnitude (as Adam's is across layers), so a
    wrong layout or a missed division shows in the scores."""
    gen = torch.Generator().manual_seed(seed)
    params = dict(model.named_parameters())
    out = {}
    for module in tracked_modules(model):
        for kind in ("weight", "bias"):
            p = params.get(f"{module}.{kind}")
            if p is not None:
                out[f"{module}.{kind}"] = 10 ** (4 * torch.rand(p.shape, generator=gen, dtype=torch.float64) - 6)
    return out


def flat_divisor(model, second: dict[str, torch.Tensor]) -> torch.Tensor:
    """d in reference.py's parameter order (per module: weight.flatten() as stored, then bias)."""
    params = dict(model.named_parameters())
    parts = []
    for module in tracked_modules(model):
        for kind in ("weight", "bias"):
            if f"{module}.{kind}" in params:
                parts.append(second[f"{module}.{kind}"].flatten())
    return (torch.cat(parts) / BIAS_CORRECTION).sqrt() + EPS


@pytest.fixture(params=["llama", "gpt2"])  # GPT-2: Conv1D weights stored [in, out], and biases
def setup(request, tiny_tokenizer, plain_tokenizer):
    tok = tiny_tokenizer if request.param == "llama" else plain_tokenizer
    make = tiny_llama if request.param == "llama" else tiny_gpt2
    model = make(len(tok), torch.float64)
    second = random_second_moment(model)
    scale = GradientScale(second, eps=EPS, bias_correction=BIAS_CORRECTION)
    names = tracked_modules(model)
    train, queries = encode(tok, TRAIN), encode(tok, QUERIES)
    d = flat_divisor(model, second)
    g_train = per_example_grads(model, train, names) / d
    g_query = per_example_grads(model, queries, names) / d
    return model, scale, train, queries, g_train, g_query


@pytest.mark.parametrize("query_rank", [None, 64])
def test_adam_identity_and_cosine_equal_autograd(setup, query_rank):
    model, scale, train, queries, g_train, g_query = setup
    dot = g_query @ g_train.T
    cos = torch.nn.functional.normalize(g_query, dim=1) @ torch.nn.functional.normalize(g_train, dim=1).T
    for method, expected in (("identity", dot), ("cosine", cos)):
        run = Influence(model, method=method, gradient_scale=scale, batch_size=5, query_rank=query_rank, **F64)
        close(run.scores(train, queries)["scores"], expected, 1e-8)
    # the scale changes the scores: without it they are another matrix
    plain = Influence(model, method="cosine", **F64).scores(train, queries)["scores"]
    assert (plain - cos).abs().max() > 1e-2


def test_adam_scores_in_joint_combined_and_token_passes(setup):
    model, scale, train, queries, g_train, g_query = setup
    cos = torch.nn.functional.normalize(g_query, dim=1) @ torch.nn.functional.normalize(g_train, dim=1).T
    run = Influence(model, method="cosine", gradient_scale=scale, batch_size=4, **F64)
    joint = run.scores_by_method(train, queries, ["cosine", "identity"])
    close(joint["cosine"]["scores"], cos, 1e-8)
    close(joint["identity"]["scores"], g_query @ g_train.T, 1e-8)
    c = torch.tensor([[1.0, -2.0, 0.5]], dtype=torch.float64)
    close(run.combined_scores(train, queries, c)["scores"], c @ cos, 1e-8)  # one folded query, same scale
    tokens = run.token_scores(train[:3], queries)
    close(torch.stack([t.sum(1) for t in tokens], 1), cos[:, :3], 1e-8)


def test_scale_is_named_fingerprinted_and_refused_where_undefined(tmp_path, tiny_tokenizer):
    model = tiny_llama(len(tiny_tokenizer), torch.float64)
    train, queries = encode(tiny_tokenizer, TRAIN), encode(tiny_tokenizer, QUERIES)
    scale = GradientScale(random_second_moment(model), eps=EPS, bias_correction=BIAS_CORRECTION)
    other = GradientScale(random_second_moment(model, seed=2), eps=EPS, bias_correction=BIAS_CORRECTION)
    assert scale.spec.startswith("adam@") and scale.spec != other.spec
    assert GradientScale(random_second_moment(model), eps=EPS, bias_correction=BIAS_CORRECTION).spec == scale.spec
    run = Influence(model, method="cosine", gradient_scale=scale, out_dir=tmp_path, **F64)
    assert run.args.gradient_scale == scale.spec and run.args.fingerprint_dict()["gradient_scale"] == scale.spec
    assert "gradient_scale" not in InfluenceArgs().fingerprint_dict()  # older artifacts keep their fingerprint
    scaled = run.scores(train, queries)["scores"]
    plain = Influence(model, method="cosine", out_dir=tmp_path, **F64).scores(train, queries)["scores"]
    again = Influence(model, method="cosine", gradient_scale=other, out_dir=tmp_path, **F64).scores(train, queries)
    dirs = sorted(p.name for p in (tmp_path / "scores").iterdir())
    assert len(dirs) == 3  # plain and two scales side by side, none refused or reused for another
    assert (scaled - plain).abs().max() > 1e-2 and (scaled - again["scores"]).abs().max() > 1e-3
    reread = Influence(model, method="cosine", gradient_scale=scale, out_dir=tmp_path, **F64)
    assert torch.equal(reread.scores(train, queries)["scores"], scaled)
    with pytest.raises(LancetError, match="applies to identity, cosine, not linfac"):
        Influence(model, method="linfac", gradient_scale=scale, **F64).scores(train, queries)
    with pytest.raises(LancetError, match="pass the object"):
        Influence(model, InfluenceArgs(method="cosine", gradient_scale=scale.spec))
    partial = {k: v for k, v in random_second_moment(model).items() if "q_proj" not in k}
    with pytest.raises(LancetError, match=r"no second moment for model\.layers\.0\.self_attn\.q_proj\.weight"):
        Influence(model, method="cosine", gradient_scale=GradientScale(partial), **F64).scores(train, queries)


def test_repsim_anchored_known_answer(tiny_tokenizer):
    model = tiny_llama(len(tiny_tokenizer), torch.float64)
    train, queries = encode(tiny_tokenizer, TRAIN), encode(tiny_tokenizer, QUERIES)
    anchors = encode(tiny_tokenizer, [("Burn?", "Cool it under running water."), ("Hello", "Hello, how can I help?")])
    with torch.no_grad():
        r_train, r_query, r_anchor = (torch.stack([manual_representation(model, r) for r in rows])
                                      for rows in (train, queries, anchors))
    centre = r_train.mean(0)
    t = torch.nn.functional.normalize(r_train - centre, dim=1)
    plain = torch.nn.functional.normalize(r_query - centre, dim=1) @ t.T
    anchor_mean = (torch.nn.functional.normalize(r_anchor - centre, dim=1) @ t.T).mean(0)
    run = Influence(model, method="repsim_anchored", anchors=anchors, batch_size=5, **F64)
    got = run.scores(train, queries)["scores"]
    close(got, plain - anchor_mean, 1e-10)
    both = run.scores_by_method(train, queries, ["repsim", "repsim_anchored"])
    close(both["repsim"]["scores"] - both["repsim_anchored"]["scores"], anchor_mean.expand(3, -1), 1e-10)
    # a query that is its own only anchor scores 0 against every row; anchors given as text work the same
    close(Influence(model, method="repsim_anchored", anchors=queries[:1], **F64).scores(train, queries[:1])["scores"],
          torch.zeros(1, len(train), dtype=torch.float64), 1e-12)
    text = Influence(model, method="repsim_anchored", tokenizer=tiny_tokenizer, **F64,
                     anchors=[{"prompt": "Burn?", "response": "Cool it under running water."},
                              {"prompt": "Hello", "response": "Hello, how can I help?"}])
    close(text.scores(train, queries)["scores"], got, 1e-12)
    with pytest.raises(LancetError, match="repsim_anchored needs anchor rows"):
        Influence(model, method="repsim_anchored", **F64).scores(train, queries)
