"""Exactness of the Kronecker estimators in the settings their derivations target (float64, exact Fisher).

A deep linear network with a Gaussian (squared-error) loss has an output Hessian H = I, so enumerating the output
basis vectors as cotangents gives the exact GGN expectation. Each estimator is fed the (a, g) pairs those backward
passes produce through lancet's own hooks, and its Kronecker matrix is compared with the GGN block from torch.func.
"""

import pytest
import torch
from torch import nn

from lancet.curvature.estimators import get_estimator
from lancet.curvature.modules import Capture, find_tracked_layers

N, T, DIMS = 5, 4, (3, 4, 3, 2)


class DeepLinear(nn.Module):
    """Per-token deep linear network; optional fixed token mixing between layers; optional sum over tokens."""

    def __init__(self, mix: torch.Tensor | None = None, reduce: bool = False):
        super().__init__()
        self.inp = nn.Identity()
        self.layers = nn.ModuleList(nn.Linear(i, o, bias=False) for i, o in zip(DIMS[:-1], DIMS[1:], strict=True))
        self.mix, self.reduce = mix, reduce

    def get_input_embeddings(self):
        return self.inp

    def forward(self, x):
        h = self.inp(x)
        for k, layer in enumerate(self.layers):
            h = layer(h)
            if self.mix is not None and k < len(self.layers) - 1:
                h = torch.einsum("ts,bsd->btd", self.mix, h)
        return h.sum(1) if self.reduce else h


def exact_cotangents(out: torch.Tensor):
    """Rows of the identity over every output coordinate of each example (H = I): sum_k c_k c_k^T = H."""
    flat = out.reshape(out.shape[0], -1)
    for k in range(flat.shape[1]):
        c = torch.zeros_like(flat)
        c[:, k] = 1.0
        yield c.reshape(out.shape)


def fit(method: str, model: nn.Module, x: torch.Tensor):
    est = get_estimator(method)
    layers = find_tracked_layers(model, [r"layers\.\d+"])
    state = {layer.name: {} for layer in layers}
    mask = torch.ones(x.shape[:2])
    for pass_name in est.passes:
        stats = {layer.name: est.new_stats(pass_name, layer.shape, torch.float64) for layer in layers}

        def on_grad(layer, a, g, stats=stats, pass_name=pass_name, state=state):
            est.accumulate(pass_name, stats[layer.name], state[layer.name], a, g, mask, 1.0)

        with Capture(model, layers, on_grad):
            out = model(x)
            for c in exact_cotangents(out):
                out.backward(c, retain_graph=True)
        state = {n: est.finish_pass(pass_name, stats[n], state[n]) for n in state}
    return est, layers, state


def n_cotangents(model, x) -> int:
    return model(x)[0].numel()


def kronecker_matrix(est, st, k: int) -> torch.Tensor:
    """The estimator's F for one layer, in the basis vec(W) row-major (= kron(out, in)).

    The estimators count every backward pass as one label sample (weight 1 each here), but the k exact cotangents
    together make ONE exact expectation, so the estimate is k times too small; scale it back."""
    if "S_vecs" not in st:
        return k * torch.diag(st["diag"].flatten())
    if hasattr(est, "apply"):  # LinFAC: F applied to every basis matrix, block by block
        out, inp = st["S_vecs"].shape[0], st["A_vecs"].shape[0]
        basis = torch.eye(out * inp, dtype=st["S_vecs"].dtype).reshape(-1, out, inp)
        return k * est.apply(st, basis, lambda v: v).reshape(out * inp, out * inp)
    q = torch.kron(st["S_vecs"], st["A_vecs"])
    return k * q @ torch.diag(est.eigenvalues(st).flatten()) @ q.T


def exact_ggn(model: nn.Module, x: torch.Tensor, name: str) -> torch.Tensor:
    params = dict(model.named_parameters())

    def f(w):
        return torch.func.functional_call(model, {**params, f"{name}.weight": w}, (x,))

    jac = torch.func.jacrev(f)(params[f"{name}.weight"])  # [*out, o, i]
    j = jac.reshape(-1, params[f"{name}.weight"].numel())
    return (j.T @ j / x.shape[0]).detach()


def setting(kind: str):
    torch.manual_seed(0)
    x = torch.randn(N, T, DIMS[0], dtype=torch.float64)
    mix = torch.randn(T, T, dtype=torch.float64) if kind == "mixing" else None
    model = DeepLinear(mix=mix, reduce=kind == "reduce").double()
    return model, x


def rel_err(a, b):
    return float((a - b).norm() / b.norm())


@pytest.mark.parametrize(
    ("kind", "method"),
    [("expand", "kfac"), ("expand", "ekfac"), ("reduce", "kfac_reduce"), ("reduce", "linfac")],
)
def test_kronecker_estimator_is_exact_in_its_setting(kind, method):
    model, x = setting(kind)
    est, layers, state = fit(method, model, x)
    for layer in layers:
        err = rel_err(kronecker_matrix(est, state[layer.name], n_cotangents(model, x)), exact_ggn(model, x, layer.name))
        print(f"{kind:7s} {method:12s} {layer.name}: relative error {err:.2e}")
        assert err < 1e-10


@pytest.mark.parametrize(("kind", "method"), [("reduce", "kfac"), ("expand", "kfac_reduce")])
def test_kronecker_estimator_is_not_exact_outside_its_setting(kind, method):
    """The settings are really different: expand factors are wrong for a reduced loss, and vice versa."""
    model, x = setting(kind)
    est, layers, state = fit(method, model, x)
    k = n_cotangents(model, x)
    errs = [rel_err(kronecker_matrix(est, state[ly.name], k), exact_ggn(model, x, ly.name)) for ly in layers[1:]]
    print(kind, method, errs)
    assert min(errs) > 0.05


@pytest.mark.parametrize("method", ["ekfac", "linfac"])
def test_eigenvalue_correction_is_the_exact_diagonal_in_its_basis(method):
    """With cross-token mixing no Kronecker product is exact, but the corrected eigenvalues equal
    diag(Q^T F Q) of the exact GGN in the estimator's own eigenbasis, so the estimate is the closest matrix in
    Frobenius norm among those diagonal in that basis (George et al. 2018): no worse than plain K-FAC there."""
    model, x = setting("mixing")
    est, layers, state = fit(method, model, x)
    plain, _, plain_state = fit("kfac_reduce" if method == "linfac" else "kfac", model, x)
    for layer in layers:
        st = state[layer.name]
        exact = exact_ggn(model, x, layer.name)
        q = torch.kron(st["S_vecs"], st["A_vecs"])
        k = n_cotangents(model, x)
        assert torch.allclose(k * st["lambda"].flatten(), torch.diagonal(q.T @ exact @ q), rtol=1e-9, atol=1e-12)
        corrected = rel_err(kronecker_matrix(est, st, n_cotangents(model, x)), exact)
        uncorrected = rel_err(kronecker_matrix(plain, plain_state[layer.name], n_cotangents(model, x)), exact)
        print(f"{method} {layer.name}: corrected {corrected:.3f} <= uncorrected {uncorrected:.3f}")
        assert corrected <= uncorrected + 1e-12


def test_diagonal_is_the_exact_ggn_diagonal():
    model, x = setting("mixing")
    est, layers, state = fit("diagonal", model, x)
    for layer in layers:
        exact = exact_ggn(model, x, layer.name)
        k = n_cotangents(model, x)
        assert torch.allclose(k * state[layer.name]["diag"].flatten(), torch.diagonal(exact), rtol=1e-10)


def _orthonormal(d: int, r: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.linalg.qr(torch.randn(d, r, generator=g, dtype=torch.float64))[0]


def test_range_eigh_recovers_the_range_of_a_low_rank_factor():
    from lancet.curvature.estimators import _range_eigh

    x = torch.randn(40, 5, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    m = x @ x.T  # rank 5, width 40: the range finder path
    vals, vecs = _range_eigh(m, rank_bound=5)
    full_vals, full_vecs = torch.linalg.eigh(m)
    assert vals.shape == (5,) and torch.allclose(vals, full_vals[-5:], rtol=1e-10)
    top = full_vecs[:, -5:]
    assert torch.allclose(vecs @ vecs.T, top @ top.T, atol=1e-10)  # the same subspace
    assert torch.allclose(vecs @ torch.diag(vals) @ vecs.T, m, atol=1e-9)


@pytest.mark.parametrize("rank_bound", [3, 64])  # the range finder path, and a full eigh
def test_range_eigh_cut_default_and_rtol(rank_bound):
    """Eigenvalues 1, 1e-4, 1e-6 in float32 at width 64: the default cut (64 x eps32 x 10 = 7.6e-5 of the largest)
    keeps two directions, rtol=1e-7 all three, rtol=1e-3 one."""
    from lancet.curvature.estimators import _range_eigh

    q = _orthonormal(64, 3, 1)
    m = (q @ torch.diag(torch.tensor([1.0, 1e-4, 1e-6], dtype=torch.float64)) @ q.T).float()
    for rtol, kept in ((None, 2), (1e-7, 3), (1e-3, 1)):
        vals, vecs = _range_eigh(m, rank_bound=rank_bound, rtol=rtol)
        assert vals.shape == (kept,) and vecs.shape == (64, kept)
        assert torch.allclose(vals.double(), torch.tensor([1e-6, 1e-4, 1.0], dtype=torch.float64)[-kept:],
                              rtol=1e-3)


def test_truncated_svd_is_exact_on_low_rank_and_near_optimal_otherwise():
    """The randomized path (rank + oversampling < min(out, in)): an exactly rank-5 batch is recovered to rounding;
    on a decaying spectrum its rank-5 error is within 1 % of the optimal (Eckart-Young) error."""
    from lancet.influence.scoring import truncated_svd

    g = torch.Generator().manual_seed(0)
    low = torch.randn(3, 200, 5, generator=g, dtype=torch.float64) @ torch.randn(3, 5, 120, generator=g,
                                                                                 dtype=torch.float64)
    us, v = truncated_svd(low, 5)
    assert us.shape == (3, 200, 5) and v.shape == (3, 120, 5)
    assert torch.allclose(us @ v.transpose(1, 2), low, atol=1e-9)
    decay = torch.diag(0.7 ** torch.arange(120, dtype=torch.float64))
    p = _orthonormal(200, 120, 4) @ decay @ _orthonormal(120, 120, 5).T
    us, v = truncated_svd(p.unsqueeze(0), 5)
    err = torch.linalg.matrix_norm(p - (us @ v.transpose(1, 2))[0])
    best = torch.linalg.matrix_norm(p - _best_rank(p, 5))
    assert err <= 1.01 * best, (float(err), float(best))


def _best_rank(p: torch.Tensor, r: int) -> torch.Tensor:
    u, s, vh = torch.linalg.svd(p, full_matrices=False)
    return (u[:, :r] * s[:r]) @ vh[:r]


def test_linfac_block_means_are_the_dense_estimate_in_any_completing_basis():
    """LinFAC's F is diagonal in [range | null] x [range | null] with block-mean eigenvalues in the null blocks;
    applying it block by block equals the dense matrix built with an explicit (arbitrary) null basis."""
    est = get_estimator("linfac")
    d_out, d_in, r_s, r_a = 6, 5, 2, 3
    g = torch.Generator().manual_seed(1)
    state = {"S_vecs": _orthonormal(d_out, r_s, 2), "A_vecs": _orthonormal(d_in, r_a, 3),
             "lambda": torch.rand(r_s, r_a, generator=g, dtype=torch.float64) + 0.1,
             "row_null": torch.rand(r_s, generator=g, dtype=torch.float64), "null_null": torch.tensor(0.3,
             dtype=torch.float64), "col_null": torch.rand(r_a, generator=g, dtype=torch.float64),
             "mean_eigenvalue": torch.tensor(0.5, dtype=torch.float64)}
    grads = torch.randn(3, d_out, d_in, generator=g, dtype=torch.float64)
    for seed in (4, 5):  # two different completions of the ranges: the same matrix
        qs = torch.linalg.qr(torch.cat([state["S_vecs"], _orthonormal(d_out, d_out - r_s, seed)], 1))[0]
        qa = torch.linalg.qr(torch.cat([state["A_vecs"], _orthonormal(d_in, d_in - r_a, seed + 10)], 1))[0]
        qs[:, :r_s], qa[:, :r_a] = state["S_vecs"], state["A_vecs"]  # QR may flip signs of the range columns
        vals = torch.full((d_out, d_in), float(state["null_null"]), dtype=torch.float64)
        vals[:r_s, :r_a] = state["lambda"]
        vals[:r_s, r_a:] = state["row_null"].unsqueeze(1)
        vals[r_s:, :r_a] = state["col_null"]
        dense = torch.kron(qs, qa) @ torch.diag(vals.flatten()) @ torch.kron(qs, qa).T
        applied = est.apply(state, grads, lambda v: v).reshape(3, -1)
        assert torch.allclose(applied, grads.reshape(3, -1) @ dense, atol=1e-12)
        pre = est.precondition(state, grads, 0.2).reshape(3, -1)
        assert torch.allclose(pre, grads.reshape(3, -1) @ torch.linalg.inv(dense + 0.2 * torch.eye(d_out * d_in,
                                                                                                   dtype=dense.dtype)),
                              atol=1e-10)


def test_linfac_correction_pass_sums_match_explicit_per_sequence_gradients():
    est = get_estimator("linfac")
    d_out, d_in, r_s, r_a, b, t = 6, 5, 2, 3, 4, 7
    state = {"S_vecs": _orthonormal(d_out, r_s, 2), "A_vecs": _orthonormal(d_in, r_a, 3)}
    gen = torch.Generator().manual_seed(6)
    a = torch.randn(b, t, d_in, generator=gen, dtype=torch.float64)
    g = torch.randn(b, t, d_out, generator=gen, dtype=torch.float64)
    stats = est.new_stats("lambda", (d_out, d_in), torch.float64, state)
    est.accumulate("lambda", stats, state, a, g, torch.ones(b, t), 1.0)
    grads = torch.einsum("bto,bti->boi", g, a)  # G_n, formed here only to check the sums
    qs, qa = state["S_vecs"], state["A_vecs"]
    assert torch.allclose(stats["lambda"], (qs.T @ grads @ qa).pow(2).sum(0), atol=1e-10)
    assert torch.allclose(stats["row"], (qs.T @ grads).pow(2).sum((0, 2)), atol=1e-10)
    assert torch.allclose(stats["col"], (grads @ qa).pow(2).sum((0, 1)), atol=1e-10)
    assert abs(float(stats["total"]) - float(grads.pow(2).sum())) < 1e-9
    st = est.finish_pass("lambda", stats, state)
    # the mean over all d_out x d_in eigenvalues equals E||G_n||^2 / dim (the damping heuristic's base)
    total_mass = (st["lambda"].sum() + st["row_null"].sum() * (d_in - r_a) + st["col_null"].sum() * (d_out - r_s)
                  + st["null_null"] * (d_out - r_s) * (d_in - r_a))
    assert torch.allclose(total_mass / (d_out * d_in), st["mean_eigenvalue"].to(total_mass.dtype), rtol=1e-10)
