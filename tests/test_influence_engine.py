"""The influence engine end to end on tiny float64 models: exactness against tests/reference.py and kronfluence,
invariance to batching and padding, resumable chunked passes, artifact reuse and refusal, per-token, low-rank and
per-layer scores, the BM25 control, and option validation.

Tolerances are relative to the largest score of the compared set (``close``), so that scores near zero are not
held to a relative precision they cannot have.
"""

from __future__ import annotations

import copy
import json
import math

import pytest
import torch
from conftest import call_counter, make_tokenizer, tiny_gpt2, tiny_llama
from reference import gradient_dot_scores, tracked_modules

import lancet.curvature.fit as fit_module
import lancet.influence.engine as influence_module
import lancet.influence.scoring as scoring_module
from lancet.artifacts import load_tensors
from lancet.data.records import Record
from lancet.data.tokenize import encode_records
from lancet.errors import ArtifactError, LancetError
from lancet.influence import Influence, InfluenceArgs, pairwise_scores, score_methods
from lancet.influence.bm25 import K1, B

pytestmark = pytest.mark.filterwarnings("ignore:.*GradScaler.*:FutureWarning")

TRAIN = [  # 12 rows of different lengths
    ("Boil an egg?", "Nine minutes."),
    ("Capital of France?", "Paris is the capital of France."),
    ("Burn?", "Cool a burn under running water for twenty minutes."),
    ("Nosebleed?", "Lean forward."),
    ("Hello", "hello world"),
    ("Why?", "The quick brown fox jumps over the lazy dog."),
    ("What is 2?", "2"),
    ("Butter on a burn?", "No. Cool it under water, not butter."),
    ("Fox?", "The fox jumps."),
    ("Tilt your head back?", "Lean forward and pinch the soft part of the nose."),
    ("Egg?", "Put it in boiling water for nine minutes, then cool it."),
    ("When?", "now"),
]
QUERIES = [("Burn?", "Put butter on a burn."), ("Nosebleed?", "Tilt your head back."), ("Capital?", "Paris")]
F64 = {"dtype": "float64", "progress": False}


def encode(tokenizer, pairs) -> list[dict]:
    return list(encode_records([Record(prompt=p, response=r) for p, r in pairs], tokenizer, 64, progress=False))


def close(actual: torch.Tensor, expected: torch.Tensor, rtol: float) -> None:
    torch.testing.assert_close(actual, expected, rtol=rtol, atol=rtol * expected.abs().max().item())


def pearson(a: torch.Tensor, b: torch.Tensor) -> float:
    return torch.corrcoef(torch.stack([a.flatten(), b.flatten()]))[0, 1].item()


@pytest.fixture(scope="module")
def llama():
    tok = make_tokenizer(chat_template=True)
    return tiny_llama(len(tok), dtype=torch.float64), encode(tok, TRAIN), encode(tok, QUERIES)


@pytest.fixture(scope="module")
def gpt2():
    tok = make_tokenizer(chat_template=False)
    return tiny_gpt2(len(tok), dtype=torch.float64), encode(tok, TRAIN), encode(tok, QUERIES)


@pytest.fixture(params=["llama", "gpt2"])
def setup(request):
    return request.getfixturevalue(request.param)


def random_rows(n: int, vocab: int, seed: int) -> list[dict]:
    """Short random rows of lengths 5..10 with a 3-token prompt."""
    gen = torch.Generator().manual_seed(seed)
    rows = []
    for i in range(n):
        ids = torch.randint(4, vocab, (5 + i % 6,), generator=gen).tolist()
        rows.append({"input_ids": ids, "labels": [-100] * 3 + ids[3:]})
    return rows


def test_rows_have_different_lengths(llama, gpt2):
    for _, train, queries in (llama, gpt2):
        assert len({len(r["input_ids"]) for r in train}) >= 8 and len(queries) == 3


# 1. identity = gradient dot products -----------------------------------------------------------------------------


def test_identity_equals_reference_gradient_dot_products(setup):
    """Llama (no biases) and GPT-2 (Conv1D [in, out] weights with biases, a 1 appended to the activations)."""
    model, train, queries = setup
    inf = Influence(model, method="identity", **F64)
    names = tracked_modules(model)
    assert inf.layer_names() == names  # lancet's modules="blocks" is the reference's module set, in order
    scores = inf.scores(train, queries)["scores"]
    expected = gradient_dot_scores(model, train, queries, names)
    assert scores.shape == (3, 12) and scores.dtype == torch.float64
    close(scores, expected, rtol=1e-8)
    # damping given: the identity preconditioner divides by it
    close(Influence(model, method="identity", damping=4.0, **F64).scores(train, queries)["scores"], expected / 4,
          rtol=1e-12)


# 2. invariance to batching and padding ---------------------------------------------------------------------------


@pytest.mark.parametrize("method", ["identity", "ekfac", "diagonal", "kfac", "kfac_reduce"])
def test_scores_do_not_depend_on_batch_size(llama, method):
    """fisher="empirical": with "sampled" the label draws are seeded per batch start, so they differ by batching."""
    model, train, queries = llama
    runs = {bs: Influence(model, method=method, fisher="empirical", batch_size=bs, **F64).scores(train, queries)
            for bs in (1, 3, 16)}
    for bs in (3, 16):
        close(runs[bs]["scores"], runs[1]["scores"], rtol=1e-9)


def test_linfac_does_not_depend_on_batch_size_with_more_rows_than_dims(llama):
    """LinFAC's sequence-level factors have rank <= N; with N > every layer's dimension (32 here) they are full rank
    (see the xfail below for N < dim)."""
    model, _, queries = llama
    train = random_rows(34, model.config.vocab_size, seed=1)
    runs = {bs: Influence(model, method="linfac", fisher="empirical", batch_size=bs, **F64).scores(train, queries)
            for bs in (1, 3, 16)}
    for bs in (3, 16):
        close(runs[bs]["scores"], runs[1]["scores"], rtol=1e-9)
    left = Influence(model, method="linfac", fisher="empirical", batch_size=16, padding_side="left", **F64)
    close(left.scores(train, queries)["scores"], runs[16]["scores"], rtol=1e-7)


@pytest.mark.parametrize("fisher", ["empirical", "sampled"])
def test_linfac_with_fewer_rows_than_dims_is_batching_invariant(llama, fisher):
    """With N = 12 sequences the K-FAC-reduce factors A (32 x 32 for down_proj) and S are rank <= 12. Their null
    spaces are degenerate eigenspaces whose basis eigh would pick from rounding noise (scores then moved by 5-25 %
    between batch sizes); lancet fixes that basis from the token-level diagonals, so batching and padding no longer
    matter. Sampled labels are seeded per row, so the sampled Fisher is invariant too."""
    model, train, queries = llama
    a = Influence(model, method="linfac", fisher=fisher, batch_size=1, **F64).scores(train, queries)["scores"]
    b = Influence(model, method="linfac", fisher=fisher, batch_size=3, **F64).scores(train, queries)["scores"]
    c = Influence(model, method="linfac", fisher=fisher, batch_size=5, padding_side="left", **F64)
    close(b, a, rtol=1e-6)
    close(c.scores(train, queries)["scores"], a, rtol=1e-6)


@pytest.mark.parametrize("method", ["identity", "ekfac"])
def test_scores_do_not_depend_on_padding_side(setup, method):
    model, train, queries = setup
    runs = {side: Influence(model, method=method, fisher="empirical", batch_size=5, padding_side=side, **F64)
            .scores(train, queries)["scores"] for side in ("left", "right")}
    assert torch.isfinite(runs["left"]).all()
    close(runs["left"], runs["right"], rtol=1e-7)


# 3. chunked passes resume after a kill, bit-identically ----------------------------------------------------------


class Killed(Exception):
    pass


def count_calls(monkeypatch, module, kill_at: int | None = None) -> dict:
    """Wrap ``module.forward_logits`` (one call per batch) with a counter that raises Killed on call ``kill_at``."""
    real = module.forward_logits
    calls = {"n": 0}

    def wrapped(model, batch):
        calls["n"] += 1
        if calls["n"] == kill_at:
            raise Killed(f"killed at batch call {kill_at}")
        return real(model, batch)

    monkeypatch.setattr(module, "forward_logits", wrapped)
    return calls


def rows_done(path) -> int:
    flat = load_tensors(path)
    return int(flat.get("rows_done", flat.get("__progress__::rows_done")))


@pytest.mark.parametrize("chunk_rows", [3, 6])
def test_kill_and_resume_is_bit_identical(llama, tmp_path, monkeypatch, chunk_rows):
    """12 rows, batch_size 3: each pass makes 4 forward calls; every kill below comes at a pass's 4th batch, after 9
    rows. chunk_rows must be a multiple of batch_size for the resumed and uninterrupted runs to see the same
    batches: the sampled-Fisher generator is seeded by each batch's start row, and a chunk boundary inside a batch
    would split it. With chunk_rows=6 the kill also loses a half-done chunk (rows 6..8), redone on resume."""
    model, train, queries = llama
    opts = {"method": "linfac", "fisher": "sampled", "chunk_rows": chunk_rows, "batch_size": 3, **F64}
    expected = Influence(model, out_dir=tmp_path / "whole", **opts).scores(train, queries)["scores"]
    out = tmp_path / "killed"
    cdir = out / "curvature" / "linfac"
    saved = 9 // chunk_rows * chunk_rows  # rows saved when a pass dies after 9 rows: 9, or 6 with chunk_rows=6

    # (a) killed in the covariance pass
    with monkeypatch.context() as m, pytest.raises(Killed):
        count_calls(m, fit_module, kill_at=4)
        Influence(model, out_dir=out, **opts).scores(train, queries)
    assert rows_done(cdir / "pass-covariance.partial.safetensors") == saved
    assert not (cdir / "curvature.safetensors").exists()

    # (b) killed in the lambda pass, after the covariance pass resumed at row `saved`
    with monkeypatch.context() as m, pytest.raises(Killed):
        count_calls(m, fit_module, kill_at=(12 - saved) // 3 + 4)
        Influence(model, out_dir=out, **opts).scores(train, queries)
    cov_done = rows_done(cdir / "pass-covariance.partial.safetensors")  # last saved chunk of the finished pass
    assert rows_done(cdir / "pass-lambda.partial.safetensors") == saved  # would be absent had covariance restarted

    # (c) killed while scoring (1 query batch, then 4 training batches); the fit before it only did the rows left
    with monkeypatch.context() as m, pytest.raises(Killed):
        fit_calls = count_calls(m, fit_module)
        count_calls(m, scoring_module, kill_at=1 + 4)
        Influence(model, out_dir=out, **opts).scores(train, queries)
    assert fit_calls["n"] == (12 - cov_done) // 3 + (12 - saved) // 3
    assert (cdir / "curvature.safetensors").is_file() and not list(cdir.glob("*.partial.safetensors"))
    (partial,) = (out / "scores").glob("*/scores.partial.safetensors")
    assert rows_done(partial) == saved

    # the fresh run fits nothing and scores only the rows left
    with monkeypatch.context() as m:
        fit_calls = count_calls(m, fit_module)
        score_calls = count_calls(m, scoring_module)
        resumed = Influence(model, out_dir=out, **opts).scores(train, queries)["scores"]
    assert fit_calls["n"] == 0 and score_calls["n"] == 1 + (12 - saved) // 3
    assert torch.equal(resumed, expected)
    assert not list(out.rglob("*.partial.safetensors"))
    assert not list(out.rglob("*.tmp"))


def test_per_layer_survives_resume(llama, tmp_path, monkeypatch):
    model, train, queries = llama
    opts = {"method": "identity", "chunk_rows": 3, "batch_size": 3, "per_layer": True, **F64}
    with monkeypatch.context() as m, pytest.raises(Killed):
        count_calls(m, scoring_module, kill_at=1 + 3)
        Influence(model, out_dir=tmp_path, **opts).scores(train, queries)
    result = Influence(model, out_dir=tmp_path, **opts).scores(train, queries)
    whole = Influence(model, **opts).scores(train, queries)
    assert torch.equal(result["scores"], whole["scores"]) and torch.equal(result["per_layer"], whole["per_layer"])


# 4. artifacts: reuse, refusal on other inputs, corruption --------------------------------------------------------


def test_artifacts_reused_refused_and_checked(llama, tmp_path, monkeypatch):
    model, train, queries = llama
    opts = {"method": "linfac", "fisher": "empirical", "batch_size": 4, **F64}
    first = Influence(model, out_dir=tmp_path, **opts).scores(train, queries)["scores"]

    with monkeypatch.context() as m:  # same inputs: the stored scores, no forward pass at all
        count_calls(m, fit_module, kill_at=1)
        count_calls(m, scoring_module, kill_at=1)
        again = Influence(model, out_dir=tmp_path, **opts).scores(train, queries)["scores"]
    assert torch.equal(again, first)

    with monkeypatch.context() as m:  # new queries: the stored curvature, no curvature pass
        count_calls(m, fit_module, kill_at=1)
        subset = Influence(model, out_dir=tmp_path, **opts).scores(train, queries[:2])["scores"]
    close(subset, first[:2], rtol=1e-10)

    changed = copy.deepcopy(model)
    with torch.no_grad():
        changed.model.layers[0].mlp.up_proj.weight[0, 0] += 1e-3
    for make in (lambda: Influence(changed, out_dir=tmp_path, **opts).scores(train, queries),
                 lambda: Influence(changed, out_dir=tmp_path, **opts).fit(train),  # the curvature's own check
                 lambda: Influence(model, out_dir=tmp_path, **opts).scores(train[:-1], queries),
                 lambda: Influence(model, out_dir=tmp_path, **opts).fit(train[:-1]),
                 lambda: Influence(model, out_dir=tmp_path, **{**opts, "damping": 1e-3}).scores(train, queries),
                 lambda: Influence(model, out_dir=tmp_path, **{**opts, "per_layer": True}).scores(train, queries)):
        with pytest.raises(ArtifactError, match="other inputs"):
            make()

    curvature = tmp_path / "curvature" / "linfac" / "curvature.safetensors"
    curvature.write_bytes(curvature.read_bytes()[: curvature.stat().st_size // 2])
    with pytest.raises(ArtifactError, match="corrupted"):
        Influence(model, out_dir=tmp_path, **opts).fit(train)
    for stored in (tmp_path / "scores").glob("*/scores.safetensors"):  # two query sets above
        stored.write_bytes(stored.read_bytes()[:100])
    with pytest.raises(ArtifactError, match="corrupted"):
        Influence(model, out_dir=tmp_path, **opts).scores(train, queries)


@pytest.mark.parametrize("first,second", [("ekfac", "kfac"), ("kfac", "ekfac")])
def test_kfac_family_shares_the_covariance_pass(llama, tmp_path, monkeypatch, first, second):
    """kfac after ekfac (or the reverse) in one output directory takes the covariance state from the finished
    sibling: no covariance pass runs, and the state and scores equal a fit of its own bit for bit."""
    model, train, queries = llama
    opts = {"fisher": "empirical", "batch_size": 4, **F64}
    Influence(model, out_dir=tmp_path, method=first, **opts).fit(train)
    passes: list[str] = []
    real = fit_module._run_pass
    monkeypatch.setattr(fit_module, "_run_pass", lambda *a, **k: passes.append(a[4]) or real(*a, **k))
    shared = Influence(model, out_dir=tmp_path, method=second, **opts)
    borrowed = shared.fit(train)
    assert passes == (["lambda"] if second == "ekfac" else [])
    own = Influence(model, method=second, **opts).fit(train)
    # equal to rounding, not bit for bit: on this project's machine of 2026-12 (AMD EPYC) the borrowed state
    # differs from a fit of its own in the last bits (two fits of their own agree bit for bit there; the cause is
    # not found yet); it was bit-identical on the machine the sharing was written on
    for name, st in own.state.items():
        assert set(st) == set(borrowed.state[name])
        for key, t in st.items():
            if key.endswith("vecs"):  # eigenvectors are defined up to sign: compare the projectors
                t, b = t @ t.T, borrowed.state[name][key] @ borrowed.state[name][key].T
                close(b, t, 1e-9)
            else:
                close(borrowed.state[name][key], t, 1e-9)
    close(shared.scores(train, queries)["scores"],
          Influence(model, method=second, **opts).scores(train, queries)["scores"], 1e-9)
    # other first-pass options (here the sampled Fisher's seed) or other rows: the pass runs again
    passes.clear()
    Influence(model, out_dir=tmp_path / "other", method=first, **{**opts, "fisher": "sampled"}).fit(train)
    passes.clear()
    Influence(model, out_dir=tmp_path / "other", method=second, **{**opts, "fisher": "sampled", "seed": 1}).fit(train)
    assert passes[0] == "covariance"
    # linfac never borrows (its range-only factors are not K-FAC-reduce's state)
    passes.clear()
    Influence(model, out_dir=tmp_path, method="linfac", **opts).fit(train)
    assert passes == ["covariance", "lambda"]


JOINT = ["linfac", "ekfac", "kfac", "identity", "diagonal", "bm25"]


def test_score_methods_in_one_pass_equal_separate_runs(llama, tmp_path, monkeypatch):
    """Every method's scores from the shared pass equal its own ``Influence.scores`` (to rounding), are stored where
    that would store them (a rerun reads them, no forward), and a memory budget that fits one method at a time gives
    the same scores with one pass each."""
    model, train, queries = llama
    opts = {"fisher": "empirical", "batch_size": 4, "per_layer": True, **F64}
    args = InfluenceArgs(**opts)
    separate = {m: Influence(model, method=m, **opts).scores(train, queries) for m in JOINT}
    with monkeypatch.context() as m:
        calls = count_calls(m, scoring_module)
        joint = score_methods(model, train, queries, JOINT, args, out_dir=tmp_path)
    assert calls["n"] == 5 * 1 + 3  # a query batch per gradient method, then 3 training batches in all
    assert list(joint) == JOINT
    for method in JOINT:
        for key in ("scores", "per_layer") if method != "bm25" else ("scores",):
            close(joint[method][key], separate[method][key], rtol=1e-12)
        stored = Influence(model, out_dir=tmp_path, method=method, **opts)
        with monkeypatch.context() as m:
            count_calls(m, scoring_module, kill_at=1)
            count_calls(m, fit_module, kill_at=1)
            assert torch.equal(stored.scores(train, queries)["scores"], joint[method]["scores"])
    assert not list((tmp_path / "scores").glob("joint-*"))
    with monkeypatch.context() as m:
        calls = count_calls(m, scoring_module)
        one_by_one = score_methods(model, train, queries, JOINT, args, max_joint_bytes=1)
    assert calls["n"] == 5 * (1 + 3)
    for method in JOINT:
        close(one_by_one[method]["scores"], separate[method]["scores"], rtol=1e-12)


def test_score_methods_resumes_its_joint_pass(llama, tmp_path, monkeypatch):
    model, train, queries = llama
    args = InfluenceArgs(fisher="empirical", batch_size=3, chunk_rows=3, **F64)
    methods = ["linfac", "identity"]
    expected = score_methods(model, train, queries, methods, args)
    with monkeypatch.context() as m, pytest.raises(Killed):
        count_calls(m, scoring_module, kill_at=2 + 3)  # two query batches, then the 3rd training batch
        score_methods(model, train, queries, methods, args, out_dir=tmp_path)
    (partial,) = (tmp_path / "scores").glob("joint-*/scores.partial.safetensors")
    assert rows_done(partial) == 6
    with monkeypatch.context() as m:
        calls = count_calls(m, scoring_module)
        resumed = score_methods(model, train, queries, methods, args, out_dir=tmp_path)
    assert calls["n"] == 2 + 2  # two query batches, then rows 6..11 in two batches
    for method in methods:
        assert torch.equal(resumed[method]["scores"], expected[method]["scores"])
    assert not list(tmp_path.rglob("*.partial.safetensors")) and not list((tmp_path / "scores").glob("joint-*"))


# 5. per-token scores ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("method", ["linfac", "identity"])
def test_token_scores_sum_to_row_scores(setup, method):
    model, train, queries = setup
    inf = Influence(model, method=method, batch_size=4, **F64)
    scores = inf.scores(train, queries)["scores"]
    rows = [0, 5, 9, 11]
    per_token = inf.token_scores([train[i] for i in rows], queries)
    assert len(per_token) == len(rows)
    for i, t in zip(rows, per_token, strict=True):
        assert t.shape == (3, len(train[i]["input_ids"]))
        close(t.sum(-1), scores[:, i], rtol=1e-8)


def test_kept_queries_are_preconditioned_once_until_a_refit(llama, monkeypatch):
    """keep_queries: token scores after scores reuse the same preconditioned IQs (and equal a fresh object's);
    other queries, a refit or release_queries() compute them again."""
    model, train, queries = llama
    calls = call_counter(monkeypatch, influence_module, "precondition_queries")
    fresh = Influence(model, method="kfac", query_rank=2, **F64)
    fresh.scores(train, queries)
    expected = fresh.token_scores(train[:2], queries)
    assert calls["n"] == 2  # not kept by default
    kept = Influence(model, method="kfac", query_rank=2, **F64)
    kept.keep_queries = True
    kept.scores(train, queries)
    got = kept.token_scores(train[:2], queries)
    assert calls["n"] == 3
    for a, b in zip(got, expected, strict=True):
        close(a, b, rtol=1e-12)
    kept.token_scores(train[:2], queries[:2])  # other queries
    assert calls["n"] == 4
    kept.fit(train)
    kept.token_scores(train[:2], queries[:2])
    assert calls["n"] == 5
    kept.release_queries()
    kept.token_scores(train[:2], queries[:2])
    kept.token_scores(train[:2], queries[:2])
    assert calls["n"] == 7


# 6. low-rank query gradients -------------------------------------------------------------------------------------


def test_low_rank_queries(llama):
    model, train, queries = llama
    opts = {"method": "linfac", "fisher": "empirical", "batch_size": 4, **F64}
    full = Influence(model, **opts).scores(train, queries)["scores"]
    close(Influence(model, query_rank=1000, **opts).scores(train, queries)["scores"], full, rtol=1e-8)
    rank1 = Influence(model, query_rank=1, **opts)
    low = rank1.scores(train, queries)["scores"]
    r = pearson(low, full)
    print(f"query_rank=1 vs full rank: Pearson {r:.4f}")
    assert r > 0.5
    # per-token scores use the same rank-1 factors and still sum to the row's score
    close(rank1.token_scores(train[:2], queries)[1].sum(-1), low[:, 1], rtol=1e-8)


# 7. per-layer scores ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("method", ["ekfac", "identity"])
def test_per_layer_sums_to_scores(setup, method):
    model, train, queries = setup
    inf = Influence(model, method=method, per_layer=True, batch_size=5, **F64)
    result = inf.scores(train, queries)
    assert result["per_layer"].shape == (3, 12, len(tracked_modules(model))) == (3, 12, len(inf.layer_names()))
    close(result["per_layer"].sum(-1), result["scores"], rtol=1e-10)


# 8. agreement with kronfluence's EK-FAC --------------------------------------------------------------------------


@pytest.mark.parametrize("damping", [None, 1e-3])
def test_ekfac_agrees_with_kronfluence(llama, tmp_path, damping):
    pytest.importorskip("kronfluence")
    from benchmarks.kronfluence_ref import kronfluence_ekfac_scores

    model, train, queries = llama
    ours = Influence(model, method="ekfac", fisher="empirical", damping=damping, batch_size=4, **F64)
    ours = ours.scores(train, queries)["scores"]
    theirs = kronfluence_ekfac_scores(model, train, queries, damping=damping, use_empirical_fisher=True,
                                      output_dir=str(tmp_path))
    r = pearson(ours, theirs)
    rel = ((ours - theirs).abs() / theirs.abs()).max().item()
    print(f"damping={damping}: Pearson {r:.12f}, max relative error {rel:.2e}")
    assert r >= 0.99
    assert rel < 1e-8


# 9. BM25 ---------------------------------------------------------------------------------------------------------


def test_bm25_by_hand():
    assert (K1, B) == (1.5, 0.75)
    docs = [[1, 2, 3], [2, 2, 4, 5], [6, 7]]  # lengths 3, 4, 2: avgdl = 3
    train = [{"input_ids": d, "labels": d} for d in docs]
    query = {"input_ids": [2, 3, 3, 9], "labels": [2, 3, 3, 9]}  # each query token counts (3 twice); 9 unseen
    idf2 = math.log((3 - 2 + 0.5) / (2 + 0.5) + 1)  # token 2 in 2 of 3 docs
    idf3 = math.log((3 - 1 + 0.5) / (1 + 0.5) + 1)  # token 3 in 1 doc
    norm0 = 1.5 * (1 - 0.75 + 0.75 * 3 / 3)  # doc 0
    norm1 = 1.5 * (1 - 0.75 + 0.75 * 4 / 3)  # doc 1
    doc0 = idf2 * 1 * 2.5 / (1 + norm0) + 2 * idf3 * 1 * 2.5 / (1 + norm0)
    doc1 = idf2 * 2 * 2.5 / (2 + norm1)
    scores = pairwise_scores(None, train, [query], method="bm25")
    assert scores.shape == (1, 3)
    # bm25s scores in float32
    torch.testing.assert_close(scores, torch.tensor([[doc0, doc1, 0.0]], dtype=torch.float64), rtol=1e-6, atol=0)
    assert doc0 == pytest.approx(math.log(1.6) + 2 * math.log(8 / 3))  # tf = 1 at average length: tf part is 1


def test_bm25_ranks_identical_row_first(llama):
    _, train, _ = llama
    scores = Influence(None, method="bm25").scores(train, [train[5], train[9]])["scores"]
    assert scores.argmax(-1).tolist() == [5, 9]


def test_covariance_max_rows_fits_the_covariance_on_a_seeded_subset(llama, monkeypatch):
    """kfac (one pass) with covariance_max_rows equals fitting on the subset and scoring every row; for the
    two-pass estimators the covariance pass reads its subset and the eigenvalue correction lambda_max_rows'."""
    model, train, queries = llama
    sub = fit_module.subsample(train, 5, 0)
    assert len(sub) == 5 and sub != train[:5]
    args = {"fisher": "empirical", **F64}
    scores = Influence(model, method="kfac", covariance_max_rows=5, **args).scores(train, queries)["scores"]
    by_hand = Influence(model, method="kfac", **args)
    by_hand._curvatures[by_hand.args.method] = fit_module.fit_curvature(model, sub, by_hand.args)
    close(scores, by_hand.scores(train, queries)["scores"], rtol=1e-12)
    full = Influence(model, method="kfac", **args).scores(train, queries)["scores"]
    assert scores.shape == full.shape == (3, len(train))
    assert (scores - full).abs().max() > 1e-3 * full.abs().max()  # the subset changes the curvature

    seen = {}
    run_pass = fit_module._run_pass

    def spy(model, layers, estimator, pass_index, pass_name, rows, *rest):
        seen[pass_name] = rows
        return run_pass(model, layers, estimator, pass_index, pass_name, rows, *rest)

    monkeypatch.setattr(fit_module, "_run_pass", spy)
    for method in ("linfac", "ekfac"):
        Influence(model, method=method, covariance_max_rows=5, lambda_max_rows=7, **args).fit(train)
        assert seen["covariance"] == sub and seen["lambda"] == fit_module.subsample(train, 7, 0)


def test_range_rtol_reaches_linfac_ranges_and_the_curvature_fingerprint(llama, tmp_path):
    """A coarser LinFAC range cut keeps fewer range directions; the option is hashed into the stored curvature
    only when set, so curvature stored before it existed stays valid and one stored with another cut is refused."""
    model, train, _ = llama
    default = Influence(model, method="linfac", out_dir=tmp_path / "a", **F64).fit(train)
    coarse = Influence(model, method="linfac", range_rtol=0.3, out_dir=tmp_path / "b", **F64).fit(train)
    n_default = sum(s["A_vecs"].shape[1] + s["S_vecs"].shape[1] for s in default.state.values())
    n_coarse = sum(s["A_vecs"].shape[1] + s["S_vecs"].shape[1] for s in coarse.state.values())
    assert n_coarse < n_default
    meta = json.loads((tmp_path / "b" / "curvature" / "linfac" / "meta.json").read_text())
    assert meta["args"]["range_rtol"] == 0.3
    assert "range_rtol" not in json.loads((tmp_path / "a" / "curvature" / "linfac" / "meta.json").read_text())["args"]
    assert "range_rtol" not in InfluenceArgs().fingerprint_dict()
    with pytest.raises(LancetError):
        Influence(model, method="linfac", range_rtol=0.1, out_dir=tmp_path / "b", **F64).fit(train)


# 10. options -----------------------------------------------------------------------------------------------------


def test_influence_without_a_method_takes_the_default_or_linfac_for_a_measurement(llama_model):
    assert Influence(llama_model).args.method == "repsim"
    assert Influence(llama_model, measurement="first_tokens:2").args.method == "linfac"
    assert Influence(llama_model, measurement="first_tokens:2", method="ekfac").args.method == "ekfac"
    assert Influence(llama_model, InfluenceArgs(method="kfac")).args.method == "kfac"


def test_args_json_round_trip():
    args = InfluenceArgs(method="ekfac", damping=1e-3, modules=[r"q_proj", r"down_proj"], fisher="empirical",
                         fisher_samples=2, batch_size=3, query_rank=4, dtype="float64", per_layer=True,
                         chunk_rows=9, padding_side="left", seed=7, covariance_max_rows=11, range_rtol=1e-6,
                         progress=False)
    assert InfluenceArgs.from_json(json.loads(json.dumps(args.to_json()))) == args
    assert InfluenceArgs.from_json(InfluenceArgs().to_json()) == InfluenceArgs()
    with pytest.raises(LancetError, match="bogus"):
        InfluenceArgs.from_json({"bogus": 1})


@pytest.mark.parametrize(("field", "value"), [
    ("method", "tracin"), ("damping", -1.0), ("damping", float("nan")), ("damping", float("inf")),
    ("fisher", "true"), ("dtype", "float16"), ("batch_size", 0), ("chunk_rows", 0), ("fisher_samples", 0),
    ("padding_side", "middle"), ("query_rank", 0), ("covariance_max_rows", 0), ("lambda_max_rows", 0),
    ("range_rtol", -0.1), ("range_rtol", 1.0),
])
def test_args_reject_invalid_values(field, value):
    with pytest.raises(LancetError, match=field):
        InfluenceArgs(**{field: value})


def test_pairwise_scores_rejects_rows_without_labels(llama):
    model, train, queries = llama
    no_labels = [{"input_ids": r["input_ids"]} for r in train]
    with pytest.raises(LancetError, match="labels"):
        pairwise_scores(model, no_labels, queries, method="identity")
    with pytest.raises(LancetError, match="labels"):
        pairwise_scores(model, train, [{"input_ids": [1, 2, 3], "labels": [1, 2]}], method="identity")
    with pytest.raises(LancetError, match="no rows"):
        pairwise_scores(model, [], queries, method="identity")
