"""Curvature estimators in one registry. Each approximates, per tracked layer, the Gauss-Newton matrix
F = (1/N) sum_n E[vec(G_n) vec(G_n)^T] of the per-sequence gradient G_n = sum_t g_t a_t^T (out x in), and applies
(F + damping I)^-1 to query gradients.

An estimator declares the passes over the training data it needs; each pass accumulates *sums* and counts (so
chunks can be saved, resumed and all-reduced) from the (a, g) pairs of every Fisher backward, then ``finish_pass``
turns them into the state the next pass or the preconditioner uses. See docs/method.md for the derivations.
"""

from __future__ import annotations

from typing import ClassVar

import torch

from lancet.errors import LancetError

HEURISTIC_DAMPING_SCALE = 0.1  # damping=None: 0.1 x mean eigenvalue of the layer (kronfluence's heuristic)
Stats = dict[str, torch.Tensor]


def _sym_eigh(m: torch.Tensor, fill: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Eigendecomposition of a PSD factor. When the factor is rank-deficient (K-FAC-reduce factors have rank at
    most the number of sequences), eigh picks the null-space basis from rounding noise; with ``fill`` (a positive
    diagonal) that basis is fixed as the eigenvectors of diag(fill) projected onto the null space, so scores
    do not depend on batch size, padding or thread count. A full-rank factor is left exactly as it is."""
    m = 0.5 * (m + m.T)
    vals, vecs = torch.linalg.eigh(m.double())
    if fill is not None:
        tol = float(vals.abs().max()) * m.shape[0] * torch.finfo(m.dtype).eps * 10
        null = vals <= tol
        if null.any():
            z = vecs[:, null]
            inner = z.T @ (fill.double().unsqueeze(1) * z)
            _, rot = torch.linalg.eigh(0.5 * (inner + inner.T))
            vecs[:, null] = z @ rot
            vals[null] = 0.0
    return vals.clamp_min(0).to(m.dtype), vecs.to(m.dtype)


class Estimator:
    """Base: ``identity`` curvature 0, so the score is a plain gradient dot product (divided by damping if given)."""

    name: ClassVar[str] = "identity"
    passes: ClassVar[tuple[str, ...]] = ()
    uses_gradients: ClassVar[bool] = True

    def new_stats(self, pass_name: str, shape: tuple[int, int], dtype: torch.dtype) -> Stats:
        raise NotImplementedError

    def accumulate(self, pass_name: str, stats: Stats, state: Stats, a: torch.Tensor, g: torch.Tensor,
                   mask: torch.Tensor, weight: float) -> None:
        raise NotImplementedError

    def finish_pass(self, pass_name: str, stats: Stats, state: Stats) -> Stats:
        """Fold a finished pass's sums into the layer state (returns the new state)."""
        raise NotImplementedError

    def finish_all(self, pass_name: str, stats: dict[str, Stats], state: dict[str, Stats]) -> dict[str, Stats]:
        return {name: self.finish_pass(pass_name, stats[name], state[name]) for name in state}

    def eigenvalues(self, state: Stats) -> torch.Tensor | None:
        return None

    def damping_for(self, state: Stats, damping: float | None) -> float:
        if damping is not None:
            return float(damping)
        vals = self.eigenvalues(state)
        return 1.0 if vals is None else HEURISTIC_DAMPING_SCALE * float(vals.mean())

    def precondition(self, state: Stats, grads: torch.Tensor, damping: float | None) -> torch.Tensor:
        """grads: [Q, out, in] -> (F + damping I)^-1 grads."""
        return grads / (damping if damping is not None else 1.0)


def per_sequence_grads(a: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
    """G_n = sum_t g_t a_t^T for each row: [B, out, in]. Formed one layer and one batch at a time, then freed."""
    return torch.bmm(g.transpose(1, 2), a)  # explicit bmm: torch.einsum picked a path ~9x slower here


class Diagonal(Estimator):
    """Diagonal of F from per-sequence gradients: F_ij ~ mean_n G_n,ij^2."""

    name = "diagonal"
    passes = ("fisher",)

    def new_stats(self, pass_name, shape, dtype):
        return {"sq": torch.zeros(shape, dtype=dtype), "n": torch.zeros((), dtype=torch.float64)}

    def accumulate(self, pass_name, stats, state, a, g, mask, weight):
        grads = per_sequence_grads(a.to(stats["sq"].dtype), g.to(stats["sq"].dtype))
        stats["sq"] += weight * grads.pow(2).sum(0)
        stats["n"] += weight * a.shape[0]

    def finish_pass(self, pass_name, stats, state):
        return {"diag": stats["sq"] / stats["n"].to(stats["sq"].dtype)}

    def eigenvalues(self, state):
        return state["diag"]

    def precondition(self, state, grads, damping):
        return grads / (state["diag"] + self.damping_for(state, damping))


class KFAC(Estimator):
    """K-FAC-expand: tokens as independent samples. F ~ A (x) S with A = mean over tokens of a a^T and
    S = (1/N) sum over tokens of g g^T (so that A (x) S ~ (1/N) sum_n sum_t a a^T (x) g g^T)."""

    name = "kfac"
    passes = ("covariance",)
    reduce: ClassVar[bool] = False

    def new_stats(self, pass_name, shape, dtype):
        out, inp = shape
        if pass_name == "covariance":
            stats = {"A": torch.zeros(inp, inp, dtype=dtype), "S": torch.zeros(out, out, dtype=dtype),
                     "tokens": torch.zeros((), dtype=torch.float64), "n": torch.zeros((), dtype=torch.float64)}
            if self.reduce:
                stats["A_diag"], stats["S_diag"] = torch.zeros(inp, dtype=dtype), torch.zeros(out, dtype=dtype)
            return stats
        return {"lambda": torch.zeros(shape, dtype=dtype), "n": torch.zeros((), dtype=torch.float64)}

    def accumulate(self, pass_name, stats, state, a, g, mask, weight):
        dtype = stats["A"].dtype if pass_name == "covariance" else stats["lambda"].dtype
        a, g = a.to(dtype), g.to(dtype)
        if pass_name == "covariance":
            m = mask.to(dtype).unsqueeze(-1)
            if self.reduce:
                a_bar = (a * m).sum(1) / m.sum(1).clamp_min(1)  # mean input over the sequence's tokens
                g_sum = g.sum(1)  # summed output gradient
                stats["A"] += weight * a_bar.T @ a_bar
                stats["S"] += weight * g_sum.T @ g_sum
                stats["tokens"] += weight * a.shape[0]
                # token-level diagonals, only to pin down the basis of the factors' null spaces (see _sym_eigh)
                stats["A_diag"] += weight * (a * m).pow(2).sum((0, 1))
                stats["S_diag"] += weight * g.pow(2).sum((0, 1))
            else:
                am = (a * m).reshape(-1, a.shape[-1])
                gf = g.reshape(-1, g.shape[-1])
                stats["A"] += weight * am.T @ am
                stats["S"] += weight * gf.T @ gf
                stats["tokens"] += weight * float(mask.sum())
            stats["n"] += weight * a.shape[0]
        else:  # "lambda": second moments of per-sequence gradients in the Kronecker eigenbasis
            rotated = per_sequence_grads(a @ state["A_vecs"].to(dtype), g @ state["S_vecs"].to(dtype))
            stats["lambda"] += weight * rotated.pow(2).sum(0)
            stats["n"] += weight * a.shape[0]

    def finish_pass(self, pass_name, stats, state):
        if pass_name == "covariance":
            dtype = stats["A"].dtype
            a_vals, a_vecs = _sym_eigh(stats["A"] / stats["tokens"].to(dtype), stats.get("A_diag"))
            s_vals, s_vecs = _sym_eigh(stats["S"] / stats["n"].to(dtype), stats.get("S_diag"))
            return {"A_vals": a_vals, "A_vecs": a_vecs, "S_vals": s_vals, "S_vecs": s_vecs}
        return {**state, "lambda": stats["lambda"] / stats["n"].to(stats["lambda"].dtype)}

    def finish_all(self, pass_name, stats, state):
        """Layers fed the same input (q/k/v projections, gate/up) have identical input factors: decompose once."""
        if pass_name != "covariance":
            return super().finish_all(pass_name, stats, state)
        done: dict[tuple, list[tuple[torch.Tensor, tuple[torch.Tensor, torch.Tensor]]]] = {}
        out = {}
        for name in state:
            st = stats[name]
            dtype = st["A"].dtype
            a_norm = st["A"] / st["tokens"].to(dtype)
            key = (tuple(a_norm.shape), float(a_norm.sum()), float(a_norm.diagonal().sum()))  # cheap pre-filter
            bucket = done.setdefault(key, [])
            a_eig = next((eig for m, eig in bucket if torch.equal(m, a_norm)), None)
            if a_eig is None:
                a_eig = _sym_eigh(a_norm, st.get("A_diag"))
                bucket.append((a_norm, a_eig))
            s_vals, s_vecs = _sym_eigh(st["S"] / st["n"].to(dtype), st.get("S_diag"))
            out[name] = {"A_vals": a_eig[0].clone(), "A_vecs": a_eig[1].clone(), "S_vals": s_vals, "S_vecs": s_vecs}
        return out

    def eigenvalues(self, state):
        if "lambda" in state:
            return state["lambda"]
        return torch.outer(state["S_vals"], state["A_vals"])

    def precondition(self, state, grads, damping):
        qs, qa = state["S_vecs"].to(grads.dtype), state["A_vecs"].to(grads.dtype)
        vals = self.eigenvalues(state).to(grads.dtype)
        rotated = qs.T @ grads @ qa
        return qs @ (rotated / (vals + self.damping_for(state, damping))) @ qa.T


class KFACReduce(KFAC):
    """K-FAC-reduce: A from the sequence-mean input, S from the sequence-summed output gradient."""

    name = "kfac_reduce"
    reduce = True


class EKFAC(KFAC):
    """Eigenvalue-corrected K-FAC-expand (as kronfluence): K-FAC eigenbases, eigenvalues re-fitted as the mean
    squared per-sequence gradient in that basis."""

    name = "ekfac"
    passes = ("covariance", "lambda")


class LinFAC(KFACReduce):
    """LinFAC: eigenbases from K-FAC-reduce's sequence-level factors, eigenvalues re-fitted from per-sequence
    gradients, so cross-token terms sum_{t != t'} g_t a_t^T ... enter both the basis and the scale."""

    name = "linfac"
    passes = ("covariance", "lambda")


ESTIMATORS: dict[str, type[Estimator]] = {
    cls.name: cls for cls in (Estimator, Diagonal, KFAC, KFACReduce, EKFAC, LinFAC)
}
TEXT_METHODS = ("bm25",)
METHODS = tuple(ESTIMATORS) + TEXT_METHODS


def get_estimator(name: str) -> Estimator:
    if name not in ESTIMATORS:
        raise LancetError(f"unknown influence method {name!r}; choose from {', '.join(METHODS)}")
    return ESTIMATORS[name]()
