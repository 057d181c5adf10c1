"""Behaviour directions (lancet.influence.behaviour): the direction is the difference of the two sets' mean
activations; the ``behaviour`` measurement is exact against plain autograd on a tiny float64 model (under the
identity estimator and under a fitted LinFAC curvature), its one-query score is the mean over the IQs; the ``probe``
method equals hand-computed projections and ranks the rows that carry a planted direction first; stored scores are
keyed and checked by the direction; the CLI and the run config reach both."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from conftest import tiny_llama
from reference import _tensors, per_example_grads, query_grads, tracked_modules
from test_influence_engine import F64, QUERIES, TRAIN, close, encode
from torch.func import functional_call

from lancet.constants import IGNORE_INDEX
from lancet.errors import ArtifactError, LancetError
from lancet.influence import BehaviourDirection, Influence, InfluenceArgs, behaviour_scores
from lancet.influence.behaviour import BehaviourArgs, layer_activations

# other prompts than the IQs' (at the last prompt token, rows of the same prompts would be the same activation)
COUNTER = [("Burn on my hand?", "Cool it under running water."), ("Nosebleed?", "Lean forward and pinch the nose."),
           ("What is the capital?", "I do not know.")]


@pytest.fixture(scope="module")
def setup(tiny_tokenizer):
    """A tiny float64 Llama, 6 training rows of different lengths, 3 IQs, 3 counter rows, and the training rows'
    autograd gradients (computed once for the module: the slow part of every exactness check)."""
    model = tiny_llama(len(tiny_tokenizer), torch.float64)
    train = encode(tiny_tokenizer, TRAIN[:6])
    return (model, train, encode(tiny_tokenizer, QUERIES), encode(tiny_tokenizer, COUNTER),
            per_example_grads(model, train, tracked_modules(model)))


def weights(labels: torch.Tensor, position: str) -> torch.Tensor:
    """[T] the hand-written position weights of one unpadded row."""
    scored = (labels != IGNORE_INDEX).double()
    if position == "response":
        return scored / scored.sum()
    out = torch.zeros_like(scored)
    out[int(scored.nonzero()[0]) - 1] = 1.0
    return out


def block_output(model, params, input_ids: torch.Tensor, layer: int) -> torch.Tensor:
    """[T, H] the output of decoder block ``layer`` of one unpadded row, by a hook (the last block's output is
    before the final norm, unlike ``hidden_states[-1]``)."""
    caught = {}
    handle = model.model.layers[layer].register_forward_hook(lambda m, i, o: caught.__setitem__("h", o))
    try:
        functional_call(model, params, args=(), kwargs={"input_ids": input_ids[None], "use_cache": False})
    finally:
        handle.remove()
    return caught["h"][0]


@torch.no_grad()
def manual_activations(model, rows, layer: int, position: str = "response") -> torch.Tensor:
    params = dict(model.named_parameters())
    return torch.stack([weights(_tensors(r)[1], position) @ block_output(model, params, _tensors(r)[0], layer)
                        for r in rows])


def reference_query_grads(model, queries, v: torch.Tensor, layer: int, position: str) -> torch.Tensor:
    """[Q, P]: autograd of m(q) = -sum_t w_t <h_t, v> w.r.t. the tracked weights, one unpadded query at a time."""
    return query_grads(model, queries,
                       lambda m, p, i, y: -(weights(y, position) @ (block_output(m, p, i, layer) @ v)))


def test_direction_is_the_difference_of_mean_activations(setup):
    model, _, iqs, counter, _ = setup
    assert [r.shape[1] for r in (manual_activations(model, iqs, 0),)] == [16]
    for layer, position in ((0, "response"), (1, "response"), (-1, "last_prompt")):
        d = BehaviourDirection.fit(model, iqs, counter, layer=layer, position=position, batch_size=2)
        diff = (manual_activations(model, iqs, layer % 2, position).mean(0)
                - manual_activations(model, counter, layer % 2, position).mean(0))
        close(d.vector, diff / diff.norm(), 1e-12)
        assert d.layer == layer % 2 and abs(float(d.vector.norm()) - 1) < 1e-12
        assert d.provenance["n_flagged"] == 3 and d.provenance["n_counter"] == 3
    # block 0's output is hidden_states[1]; the batch size does not matter; the middle block is the default
    with torch.no_grad():
        hs = model(input_ids=torch.tensor([iqs[0]["input_ids"]]), output_hidden_states=True).hidden_states[1][0]
    close(layer_activations(model, iqs[:1], 0)[0], weights(torch.tensor(iqs[0]["labels"]), "response") @ hs, 1e-12)
    close(BehaviourDirection.fit(model, iqs, counter, layer=0, batch_size=1).vector,
          BehaviourDirection.fit(model, iqs, counter, layer=0, batch_size=3).vector, 1e-12)
    assert BehaviourDirection.fit(model, iqs, counter).layer == 1  # 2 blocks: 2 // 2
    with pytest.raises(LancetError, match="the model has 2 decoder blocks"):
        BehaviourDirection.fit(model, iqs, counter, layer=2)
    with pytest.raises(LancetError, match="same mean activation"):
        BehaviourDirection.fit(model, iqs, iqs, layer=0)


@pytest.mark.parametrize(("layer", "position"), [(0, "response"), (1, "response"), (0, "last_prompt")])
def test_behaviour_measurement_is_exact_under_the_identity(setup, layer, position):
    """identity scores = <grad m(q), grad L(z)> with m the negated projection, per IQ; the one-query behaviour score
    is their mean; blocks after the layer get no query gradient (their per-layer scores are exactly 0)."""
    model, train, iqs, counter, g_train = setup
    d = BehaviourDirection.fit(model, iqs, counter, layer=layer, position=position)
    expected = reference_query_grads(model, iqs, d.vector, layer, position) @ g_train.T
    run = Influence(model, method="identity", measurement="behaviour", behaviour=d, per_layer=True, batch_size=2,
                    **F64)
    got = run.scores(train, iqs)
    close(got["scores"], expected, 1e-9)
    later = [i for i, name in enumerate(run.layer_names()) if int(name.split(".")[2]) > layer]
    assert len(later) == (7 if layer == 0 else 0)  # block 1's seven linear layers
    if later:
        assert got["per_layer"][..., later].abs().max() == 0
        assert got["per_layer"][..., :7].abs().max() > 0
    one = behaviour_scores(run, train, iqs)["identity"]["scores"]
    assert one.shape == (1, len(train))
    close(one[0], expected.mean(0), 1e-9)
    if position == "last_prompt":  # left padding: the same measurement (the weights follow the attention mask)
        left = Influence(model, method="identity", measurement="behaviour", behaviour=d, padding_side="left",
                         batch_size=3, **F64)
        close(left.scores(train, iqs)["scores"], expected, 1e-9)


def test_behaviour_measurement_is_exact_under_a_fitted_linfac_curvature(setup):
    """The query side under a known curvature: lancet's LinFAC preconditioner applied to the autograd gradients of the
    projection, contracted with the autograd training gradients, equals lancet's scores; the one query equals the
    mean of the per-IQ scores, in a joint pass with the identity too."""
    model, train, iqs, counter, g_train = setup
    d = BehaviourDirection.fit(model, iqs, counter, layer=0)
    run = Influence(model, method="linfac", measurement="behaviour", behaviour=d, **F64)
    curvature = run.fit(train)
    g_query = reference_query_grads(model, iqs, d.vector, 0, "response")
    expected, offset = torch.zeros(len(iqs), len(train), dtype=torch.float64), 0
    for layer in curvature.layers:  # the reference's parameter order is the tracked layers' order
        out, inp = layer.shape
        size = out * inp
        pre = curvature.precondition({layer.name: g_query[:, offset:offset + size].reshape(-1, out, inp)}, None)
        expected += pre[layer.name].reshape(len(iqs), -1) @ g_train[:, offset:offset + size].T
        offset += size
    assert offset == g_query.shape[1]
    got = run.scores(train, iqs)["scores"]
    close(got, expected, 1e-9)
    assert not torch.allclose(got, g_query @ g_train.T, rtol=1e-3)  # the curvature does change the scores
    both = behaviour_scores(run, train, iqs, ["linfac", "identity"])
    close(both["linfac"]["scores"][0], expected.mean(0), 1e-9)
    close(both["identity"]["scores"][0], (g_query @ g_train.T).mean(0), 1e-9)


def test_probe_scores_are_the_centred_projections(setup):
    model, train, iqs, counter, _ = setup
    for position in ("response", "last_prompt"):
        d = BehaviourDirection.fit(model, iqs, counter, layer=1, position=position)
        acts = manual_activations(model, train, 1, position)
        expected = (acts - acts.mean(0)) @ d.vector
        got = Influence(model, method="probe", behaviour=d, batch_size=5, **F64).scores(train, iqs)["scores"]
        assert got.shape == (1, len(train))
        close(got[0], expected, 1e-12)
        assert abs(float(got.sum())) < 1e-12  # centred by the training mean
    with pytest.raises(LancetError, match="needs a behaviour direction"):
        Influence(model, method="probe", **F64).scores(train, iqs)
    with pytest.raises(LancetError, match="measurement 'behaviour' needs a direction"):
        Influence(model, method="linfac", measurement="behaviour", **F64)
    with pytest.raises(LancetError, match="no query gradient"):
        Influence(model, method="probe", behaviour=d, **F64).combined_scores(train, iqs, [[1.0, 1.0, 1.0]])


PLANTED_TRAIN = [("Burn?", "Put butter on it."), ("Hot pan?", "Butter is the fix."), ("Fox?", "The fox jumps."),
                 ("Egg?", "Nine in boiling water."), ("Burn again?", "Rub butter in."),
                 ("Hello", "hello world"), ("Nose?", "Lean forward."), ("Why?", "The lazy dog."),
                 ("Paris?", "Paris is the capital."), ("When?", "now")]
PLANTED_ROWS = {0, 1, 4}  # the responses that hold 'ut' (b-ut-t-er): the planted token


def planted_model(tokenizer, scale: float = 20.0):
    """A tiny float64 Llama whose embedding of the token 'ut' carries ``scale`` x a unit vector u: the residual
    stream of every row that says "butter" has a large component along u."""
    model = tiny_llama(len(tokenizer), torch.float64)
    u = torch.nn.functional.normalize(torch.randn(16, generator=torch.Generator().manual_seed(3), dtype=torch.float64),
                                      dim=0)
    with torch.no_grad():
        model.model.embed_tokens.weight[tokenizer.convert_tokens_to_ids("ut")] += scale * u
    return model, u


def test_probe_ranks_the_rows_that_carry_a_planted_direction_first(tiny_tokenizer):
    """The direction fitted from IQs that say "butter" against counter-answers that do not is the planted u, and
    the probe ranks the three training rows that say "butter" first; a random direction would not."""
    model, u = planted_model(tiny_tokenizer)
    train = encode(tiny_tokenizer, PLANTED_TRAIN)
    iqs = encode(tiny_tokenizer, [("Burn?", "Use butter."), ("Scald?", "Butter, then a cloth.")])
    counter = encode(tiny_tokenizer, COUNTER)
    for layer in (0, 1):
        d = BehaviourDirection.fit(model, iqs, counter, layer=layer)
        assert float(d.vector @ u) > 0.9, layer
        scores = Influence(model, method="probe", behaviour=d, **F64).scores(train, iqs)["scores"][0]
        assert set(scores.topk(3).indices.tolist()) == PLANTED_ROWS, (layer, scores)
        others = scores[[i for i in range(10) if i not in PLANTED_ROWS]]
        assert scores[list(PLANTED_ROWS)].min() > 0 > others.max(), (layer, scores)
    given = BehaviourDirection.from_vector(u, -1, model=model)
    assert given.layer == 1 and "given" in given.provenance
    scores = Influence(model, method="probe", behaviour=given, **F64).scores(train, iqs)["scores"][0]
    assert set(scores.topk(3).indices.tolist()) == PLANTED_ROWS
    # along u itself the rows that do not say "butter" sit together: their spread is small against the gap
    others = scores[[i for i in range(10) if i not in PLANTED_ROWS]]
    assert scores[list(PLANTED_ROWS)].min() - others.max() > 10 * (others.max() - others.min())


def test_stored_scores_are_keyed_by_the_direction_and_refused_when_it_differs(setup, tmp_path):
    model, train, iqs, counter, _ = setup
    d = BehaviourDirection.fit(model, iqs, counter, layer=0)
    args = InfluenceArgs(method="identity", measurement="behaviour", **F64)
    first = Influence(model, args, out_dir=tmp_path, behaviour=d).scores(train, iqs)["scores"]
    again = Influence(model, args, out_dir=tmp_path, behaviour=d).scores(train, iqs)["scores"]
    assert torch.equal(first, again) and len(list((tmp_path / "scores").iterdir())) == 1
    meta = json.loads(next((tmp_path / "scores").iterdir()).joinpath("meta.json").read_text())
    assert meta["measurement_fingerprint"]["direction"] == d.digest
    assert meta["measurement_fingerprint"]["key"]["counter"] == d.provenance["counter"]
    # another counter set (or layer) is another direction: its own scores, beside the first
    other = BehaviourDirection.fit(model, iqs, counter[:2], layer=0)
    second = Influence(model, args, out_dir=tmp_path, behaviour=other).scores(train, iqs)["scores"]
    assert not torch.allclose(first, second) and len(list((tmp_path / "scores").iterdir())) == 2
    # the same provenance with another vector is refused, not read back
    forged = BehaviourDirection(other.vector, d.layer, d.position, d.provenance)
    with pytest.raises(ArtifactError, match="measurement_fingerprint"):
        Influence(model, args, out_dir=tmp_path, behaviour=forged).scores(train, iqs)
    # the default measurement's scores are stored apart
    Influence(model, InfluenceArgs(method="identity", **F64), out_dir=tmp_path).scores(train, iqs)
    assert len(list((tmp_path / "scores").iterdir())) == 3


def test_behaviour_options_are_validated():
    assert InfluenceArgs(measurement="behaviour").measurement == "behaviour"
    assert BehaviourArgs.from_json({"counter": "c.jsonl", "layer": -1}).layer == -1
    for bad, message in (({"layer": 1}, "missing 'counter'"), ({"counter": "c", "layer": "1"}, "integer"),
                         ({"counter": "c", "position": "first"}, "position"), ({"counter": "c", "x": 1}, "unknown")):
        with pytest.raises(LancetError, match=message):
            BehaviourArgs.from_json(bad)


def _write(path, pairs) -> str:
    path.write_text("".join(json.dumps({"prompt": p, "response": r}) + "\n" for p, r in pairs))
    return str(path)


def test_cli_behaviour_measurement_and_probe(tmp_path, tiny_tokenizer, capsys):
    """``lancet attribute --measurement behaviour --counter FILE --layer L`` ranks by the behaviour's one query and
    ``--method probe --counter FILE`` by the probe, each equal to the Python API on the saved model; the summary
    records the direction's provenance; missing or unused --counter and a bad --layer are one-line errors."""
    from lancet.artifacts import load_tensors
    from lancet.cli import main
    from lancet.data import encode_records, read_records
    from lancet.models.loading import load_model

    model, _ = planted_model(tiny_tokenizer)
    model_dir = tmp_path / "m"
    model.float().save_pretrained(model_dir)
    tiny_tokenizer.save_pretrained(model_dir)
    train = _write(tmp_path / "train.jsonl", PLANTED_TRAIN)
    iqs = _write(tmp_path / "iqs.jsonl", [("Burn?", "Use butter."), ("Scald?", "Butter, then a cloth.")])
    counter = _write(tmp_path / "counter.jsonl", COUNTER)
    base = ["-q", "attribute", str(model_dir), "--train", train, "--queries", iqs, "--counter", counter]
    assert main([*base, "--out", str(tmp_path / "b"), "--measurement", "behaviour", "--method", "linfac",
                 "--layer", "0"]) == 0
    assert main([*base, "--out", str(tmp_path / "p"), "--method", "probe", "--layer", "-1"]) == 0
    assert main([*base, "--out", str(tmp_path / "j"), "--method", "linfac,probe", "--measurement", "behaviour",
                 "--layer", "0"]) == 0
    behaviour = load_tensors(tmp_path / "b" / "ranking-linfac.safetensors")["scores"]
    probe = load_tensors(tmp_path / "p" / "ranking-probe.safetensors")["scores"]
    assert behaviour.shape == probe.shape == (1, 10)
    loaded, tok = load_model(str(model_dir))
    rows = [encode_records(read_records(p), tok, 512, progress=False) for p in (train, iqs, counter)]
    for layer, method, got in ((0, "linfac", behaviour), (1, "probe", probe)):
        d = BehaviourDirection.fit(loaded, rows[1], rows[2], layer=layer)
        run = Influence(loaded, method=method, measurement="behaviour", behaviour=d, progress=False)
        want = behaviour_scores(run, rows[0], rows[1])[method]["scores"]
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-6 * float(want.abs().max()))
    assert set(probe[0].topk(3).indices.tolist()) == PLANTED_ROWS
    summary = json.loads((tmp_path / "p" / "influence-probe.json").read_text())
    assert summary["behaviour"]["layer"] == 1 and summary["behaviour"]["n_counter"] == 3
    assert summary["behaviour"]["counter_spec"] == counter and summary["n_queries"] == 2
    assert {r["line"] for r in summary["top_positive"][:3]} == {i + 1 for i in PLANTED_ROWS}
    joint = load_tensors(tmp_path / "j" / "ranking-linfac.safetensors")["scores"]
    torch.testing.assert_close(joint, behaviour, rtol=1e-4, atol=1e-6 * float(behaviour.abs().max()))
    no_counter = ["-q", "attribute", str(model_dir), "--train", train, "--queries", iqs, "--out", str(tmp_path / "x")]
    capsys.readouterr()
    assert main([*no_counter, "--method", "probe"]) == 2
    assert "need --counter FILE" in capsys.readouterr().err
    assert main([*no_counter, "--method", "linfac", "--counter", counter]) == 2
    assert main([*base, "--out", str(tmp_path / "x"), "--method", "probe", "--layer", "5"]) == 2
    assert main([*base, "--out", str(tmp_path / "x"), "--measurement", "behaviour", "--method", "kfac",
                 "--contrast-response", "No."]) == 2


def test_run_config_behaviour_section(tmp_path):
    """influence.behaviour is checked with the config, its counter path is relative to the config file, and it is
    required exactly when the behaviour measurement or the probe (ranked or compared) uses it."""
    from lancet.pipeline import RunConfig

    cfg = tmp_path / "run.json"
    good = {"model": "m", "train": "t.jsonl", "iqs": "q.jsonl",
            "influence": {"method": "linfac", "measurement": "behaviour", "behaviour": {"counter": "c.jsonl"}}}
    cfg.write_text(json.dumps(good))
    assert RunConfig.load(cfg).influence["behaviour"]["counter"] == str(tmp_path / "c.jsonl")
    for influence, compare, message in (
            ({"method": "linfac", "measurement": "behaviour"}, [], "need influence.behaviour"),
            ({"method": "probe"}, [], "need influence.behaviour"),
            ({"method": "linfac"}, ["probe"], "need influence.behaviour"),
            ({"method": "linfac", "behaviour": {"counter": "c"}}, [], "is for the measurement"),
            ({"method": "probe", "behaviour": {"counter": "c", "layr": 1}}, [], "unknown key")):
        extra = {"compare": compare, "labels": "l.json"} if compare else {}
        with pytest.raises(LancetError, match=message):
            RunConfig.from_json({**good, "influence": influence, **extra})


def test_pipeline_ranks_by_the_behaviour_and_compares_the_probe(tmp_path, tiny_tokenizer):
    """A run config's attribution stage with measurement "behaviour" and the probe compared: the direction is fitted
    on the round's model and IQs, the ranking equals the Python API's one query, the token scores of its top rows
    are computed with the same measurement, and the probe finds the planted rows (AP 1)."""
    from lancet.artifacts import load_tensors
    from lancet.data import read_records
    from lancet.pipeline import Pipeline, RunConfig

    model, _ = planted_model(tiny_tokenizer)
    train = _write(tmp_path / "train.jsonl", PLANTED_TRAIN)
    iqs = _write(tmp_path / "iqs.jsonl", [("Burn?", "Use butter."), ("Scald?", "Butter, then a cloth.")])
    _write(tmp_path / "counter.jsonl", COUNTER)
    records = read_records(train)
    (tmp_path / "culprits.json").write_text(json.dumps({"culprit_ids": [records[i].id for i in PLANTED_ROWS]}))
    config = RunConfig.from_json({
        "model": "m", "train": "train.jsonl", "iqs": "iqs.jsonl", "out": "run", "labels": "culprits.json",
        "precision": "fp32", "device": "cpu", "compare": ["probe", "bm25"], "token_rows": 1,
        "influence": {"method": "identity", "measurement": "behaviour", "dtype": "float64",
                      "behaviour": {"counter": "counter.jsonl", "layer": 0}}}, base=tmp_path)
    run = Pipeline(config, progress=False)
    run.dir.mkdir()
    (run.dir / "iqs.jsonl").write_text(Path(iqs).read_text())
    out = run.stage_attribute(model, tiny_tokenizer, records)
    assert out["method"] == "identity" and out["compare"]["probe"]["average_precision"] == 1.0
    d = BehaviourDirection.fit(model, read_records(iqs), read_records(tmp_path / "counter.jsonl"), layer=0,
                               tokenizer=tiny_tokenizer)
    api = Influence(model, method="identity", measurement="behaviour", behaviour=d, tokenizer=tiny_tokenizer,
                    **F64)
    want = behaviour_scores(api, records, read_records(iqs))["identity"]["scores"]
    close(load_tensors(run.dir / "ranking-identity.safetensors")["scores"], want, 1e-10)
    tokens = json.loads((run.dir / "tokens-identity.json").read_text())
    assert len(tokens["rows"]) == 1
