"""The kronfluence reference helper runs on a tiny float64 Llama and means what its docstring says."""

import pytest
import torch
from conftest import tiny_llama

pytest.importorskip("kronfluence")

from benchmarks.kronfluence_ref import (  # noqa: E402
    default_module_names,
    kronfluence_ekfac_scores,
    kronfluence_factors,
    pad_batch,
    summed_token_ce,
)

pytestmark = pytest.mark.filterwarnings("ignore:.*GradScaler.*:FutureWarning")

VOCAB = 64


def _examples(n: int, seed: int, prompt: int = 2) -> list[dict]:
    g = torch.Generator().manual_seed(seed)
    out = []
    for i in range(n):
        ids = torch.randint(4, VOCAB, (4 + i % 4,), generator=g).tolist()
        out.append({"input_ids": ids, "labels": [-100] * prompt + ids[prompt:]})
    return out


@pytest.fixture(scope="module")
def setup():
    model = tiny_llama(VOCAB, dtype=torch.float64, seed=0)
    return model, _examples(8, seed=1), _examples(2, seed=2, prompt=1)


def _per_example_grads(model, examples, names):
    modules = dict(model.named_modules())
    out = []
    for ex in examples:
        model.zero_grad(set_to_none=True)
        summed_token_ce(model, pad_batch([ex])).backward()
        out.append({n: modules[n].weight.grad.detach().clone() for n in names})
    model.zero_grad(set_to_none=True)
    return out


def test_shape_and_large_damping_is_gradient_dot_product(setup, tmp_path):
    model, train, queries = setup
    before = {k: v.clone() for k, v in model.state_dict().items()}
    scores = kronfluence_ekfac_scores(model, train, queries, damping=None, output_dir=str(tmp_path / "a"))
    assert scores.shape == (2, 8) and scores.dtype == torch.float64
    assert torch.isfinite(scores).all()
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())  # caller's model untouched

    big = kronfluence_ekfac_scores(model, train, queries, damping=1e6, output_dir=str(tmp_path / "b"))
    names = default_module_names(model)
    gq = _per_example_grads(model, queries, names)
    gt = _per_example_grads(model, train, names)
    dots = torch.tensor([[sum((q[n] * t[n]).sum() for n in names) for t in gt] for q in gq], dtype=torch.float64)
    corr = torch.corrcoef(torch.stack([big.flatten(), dots.flatten()]))[0, 1]
    assert corr > 0.999
    torch.testing.assert_close(big * 1e6, dots, rtol=1e-3, atol=1e-6)


def test_factors_and_scores_match_the_documented_conventions(setup, tmp_path):
    model, train, queries = setup
    names = default_module_names(model)
    assert len(names) == 14 and all(n.startswith("model.layers.") for n in names)
    factors = kronfluence_factors(model, train, output_dir=str(tmp_path / "f"))
    scores = kronfluence_ekfac_scores(model, train, queries, damping=None, output_dir=str(tmp_path / "s"))

    n_tokens = sum(len(ex["input_ids"]) for ex in train)
    gt = _per_example_grads(model, train, names)
    gq = _per_example_grads(model, queries, names)
    expected = torch.zeros(2, 8, dtype=torch.float64)
    for name in names:
        f = factors[name]
        assert int(f["num_activation_covariance_processed"]) == n_tokens  # (a) non-pad tokens
        assert int(f["num_gradient_covariance_processed"]) == n_tokens  # (b) same count
        assert int(f["num_lambda_processed"]) == len(train)  # (d) sequences
        qa, qg = f["activation_eigenvectors"], f["gradient_eigenvectors"]
        # (d) raw lambda = sum over sequences of the squared rotated summed-loss gradient.
        raw = sum((qg.T @ g[name] @ qa) ** 2 for g in gt)
        torch.testing.assert_close(f["lambda_matrix"], raw)
        # (e) heuristic damping: 0.1 * mean of the per-sequence-normalised lambda, per module.
        lam = f["lambda_matrix"] / len(train)
        denom = lam + 0.1 * lam.mean()
        # (f) the query gradient is preconditioned; no factor of N.
        for i, q in enumerate(gq):
            pre = qg @ ((qg.T @ q[name] @ qa) / denom) @ qa.T
            expected[i] += torch.stack([(pre * g[name]).sum() for g in gt])
    torch.testing.assert_close(scores, expected, rtol=1e-6, atol=1e-8)


def test_covariances_are_raw_sums_over_non_pad_tokens(setup, tmp_path):
    model, train, _ = setup
    name = "model.layers.0.mlp.down_proj"
    factors = kronfluence_factors(model, train, module_names=[name], output_dir=str(tmp_path), batch_size=8)
    captured = {}

    def hook(module, inputs, output):
        captured["a"] = inputs[0].detach()
        output.register_hook(lambda grad: captured.update(g=grad.detach()))

    handle = dict(model.named_modules())[name].register_forward_hook(hook)
    batch = pad_batch(train)
    summed_token_ce(model, batch).backward()
    handle.remove()
    model.zero_grad(set_to_none=True)
    mask = batch["attention_mask"].bool()
    a = captured["a"][mask]  # (a) non-pad rows only
    torch.testing.assert_close(factors[name]["activation_covariance"], a.T @ a)
    assert int(factors[name]["num_activation_covariance_processed"]) == a.shape[0]
    g = captured["g"].reshape(-1, captured["g"].shape[-1])  # (b) all positions, unmasked ...
    torch.testing.assert_close(factors[name]["gradient_covariance"], g.T @ g)
    assert captured["g"][~mask].abs().max() == 0  # ... pad positions just have zero gradient
