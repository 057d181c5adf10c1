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


RANGE_OVERSAMPLE = 8  # extra columns of the range finder beyond the rank bound (Halko, Martinsson & Tropp 2011)


RANGE_ROUNDING_FACTOR = 10  # default cut of a range: max eigenvalue x width x eps of the factor's dtype x this


def _range_eigh(m: torch.Tensor, rank_bound: int, seed: int = 0, rtol: float | None = None
                ) -> tuple[torch.Tensor, torch.Tensor]:
    """Eigenpairs of the range of a PSD factor that is a sum of at most ``rank_bound`` outer products.

    When ``rank_bound + RANGE_OVERSAMPLE`` is below the width, a seeded Gaussian range finder gives an orthonormal
    basis Q of the range (exact when the rank is at most the bound: no power iterations are needed) and the
    eigenpairs come from the small matrix Q^T M Q: O(d^2 r) instead of O(d^3). Otherwise a full eigh. Directions
    with eigenvalue at rounding level are dropped: they are the null space, which LinFAC treats as one block.
    ``rtol``: drop those below rtol x the largest instead (default: width x eps x RANGE_ROUNDING_FACTOR, which on
    SmolLM2's steep input factors also drops real directions: docs/method.md §2.3)."""
    m = 0.5 * (m + m.T)
    md, d = m.double(), m.shape[0]
    r = rank_bound + RANGE_OVERSAMPLE
    if r < d:
        omega = torch.randn(d, r, generator=torch.Generator().manual_seed(seed), dtype=torch.float64).to(m.device)
        q, _ = torch.linalg.qr(md @ omega)
        vals, small = torch.linalg.eigh(q.T @ md @ q)
        vecs = q @ small
    else:
        vals, vecs = torch.linalg.eigh(md)
    rel = d * torch.finfo(m.dtype).eps * RANGE_ROUNDING_FACTOR if rtol is None else rtol
    tol = float(vals.abs().max()) * rel
    keep = vals > tol
    return vals[keep].to(m.dtype), vecs[:, keep].contiguous().to(m.dtype)


class Estimator:
    """Base: ``identity`` curvature 0, so the score is a plain gradient dot product (divided by damping if given)."""

    name: ClassVar[str] = "identity"
    passes: ClassVar[tuple[str, ...]] = ()
    # bumped when what an estimator stores changes: stored curvature of another format is refused, not misread
    format_version: ClassVar[int] = 1
    uses_gradients: ClassVar[bool] = True
    range_rtol: float | None = None  # LinFAC's range cut (InfluenceArgs.range_rtol), set by fit_curvature
    # estimators with the same family run the same first pass and keep the same state keys from it, so a fit can
    # take that state from a finished sibling fit (fit.py: _borrow_first_pass) instead of running the pass again
    first_pass_family: ClassVar[str | None] = None
    first_pass_keys: ClassVar[tuple[str, ...]] = ()
    # unit_gradients: scores are cosines, <G_q, G_n> / (|G_q| |G_n|) over all tracked layers together (scoring.py
    # divides by the norms), so a row with a large gradient does not outrank a better-aligned small one
    unit_gradients: ClassVar[bool] = False

    def new_stats(self, pass_name: str, shape: tuple[int, int], dtype: torch.dtype, state: Stats | None = None
                  ) -> Stats:
        """Zeroed sums of a pass; ``state`` is the layer state the earlier passes left."""
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

    def new_stats(self, pass_name, shape, dtype, state=None):
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
    fill_null_space: ClassVar[bool] = True
    first_pass_family = "kfac-expand"  # kfac and ekfac share the covariance pass
    first_pass_keys = ("A_vals", "A_vecs", "S_vals", "S_vecs")

    def new_stats(self, pass_name, shape, dtype, state=None):
        out, inp = shape
        if pass_name == "covariance":
            stats = {"A": torch.zeros(inp, inp, dtype=dtype), "S": torch.zeros(out, out, dtype=dtype),
                     "tokens": torch.zeros((), dtype=torch.float64), "n": torch.zeros((), dtype=torch.float64)}
            if self.reduce and self.fill_null_space:
                stats["A_diag"], stats["S_diag"] = torch.zeros(inp, dtype=dtype), torch.zeros(out, dtype=dtype)
            if not self.fill_null_space:
                stats["outer"] = torch.zeros((), dtype=torch.float64)  # outer products summed: a rank bound
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
                if self.fill_null_space:  # token-level diagonals: they pin down the null-space basis (_sym_eigh)
                    stats["A_diag"] += weight * (a * m).pow(2).sum((0, 1))
                    stats["S_diag"] += weight * g.pow(2).sum((0, 1))
                else:
                    stats["outer"] += a.shape[0]
            else:
                am = (a * m).reshape(-1, a.shape[-1])
                gf = g.reshape(-1, g.shape[-1])
                stats["A"] += weight * am.T @ am
                stats["S"] += weight * gf.T @ gf
                stats["tokens"] += mask.sum().to(torch.float64) * weight  # a tensor: no device sync
            stats["n"] += weight * a.shape[0]
        else:  # "lambda": second moments of per-sequence gradients in the Kronecker eigenbasis
            rotated = per_sequence_grads(a @ state["A_vecs"].to(dtype), g @ state["S_vecs"].to(dtype))
            stats["lambda"] += weight * rotated.pow(2).sum(0)
            stats["n"] += weight * a.shape[0]

    def factor_eigh(self, m: torch.Tensor, stats: Stats, side: str) -> tuple[torch.Tensor, torch.Tensor]:
        return _sym_eigh(m, stats.get(f"{side}_diag"))

    def finish_pass(self, pass_name, stats, state):
        if pass_name == "covariance":
            dtype = stats["A"].dtype
            a_vals, a_vecs = self.factor_eigh(stats["A"] / stats["tokens"].to(dtype), stats, "A")
            s_vals, s_vecs = self.factor_eigh(stats["S"] / stats["n"].to(dtype), stats, "S")
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
                a_eig = self.factor_eigh(a_norm, st, "A")
                bucket.append((a_norm, a_eig))
            s_vals, s_vecs = self.factor_eigh(st["S"] / st["n"].to(dtype), st, "S")
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
    first_pass_family = "kfac-reduce"


class EKFAC(KFAC):
    """Eigenvalue-corrected K-FAC-expand (as kronfluence): K-FAC eigenbases, eigenvalues re-fitted as the mean
    squared per-sequence gradient in that basis."""

    name = "ekfac"
    passes = ("covariance", "lambda")


class LinFAC(KFACReduce):
    """LinFAC: eigenbases from K-FAC-reduce's sequence-level factors, eigenvalues re-fitted from per-sequence
    gradients, so cross-token terms sum_{t != t'} g_t a_t^T ... enter both the basis and the scale.

    The sequence-level factors have rank at most the number of sequences N, so only their ranges (r_S, r_A
    directions, found by ``_range_eigh`` in O(d^2 r)) are decomposed. F is estimated in the basis
    [range_S | null_S] x [range_A | null_A]: one corrected eigenvalue per (range, range) pair, as in EK-FAC;
    in the three blocks that touch a null space, one mean value per range row, per range column, and one for the
    null x null block, i.e. the mean squared per-sequence gradient in that block (docs/method.md §2.3). These
    values do not depend on how a null space is spanned, so no basis for it is ever formed."""

    name = "linfac"
    passes = ("covariance", "lambda")
    fill_null_space = False
    first_pass_family = None  # range-only factors: not K-FAC-reduce's state
    format_version = 2  # 1: full eigenbases with a filled null space

    def factor_eigh(self, m, stats, side):
        return _range_eigh(m, int(stats["outer"]), rtol=self.range_rtol)

    def new_stats(self, pass_name, shape, dtype, state=None):
        if pass_name == "covariance":
            return super().new_stats(pass_name, shape, dtype, state)
        r_s, r_a = (state["S_vecs"].shape[1], state["A_vecs"].shape[1]) if state else (0, 0)  # 0: sized on first use
        return {"lambda": torch.zeros(r_s, r_a, dtype=dtype), "row": torch.zeros(r_s, dtype=dtype),
                "col": torch.zeros(r_a, dtype=dtype), "total": torch.zeros((), dtype=torch.float64),
                "n": torch.zeros((), dtype=torch.float64)}

    def accumulate(self, pass_name, stats, state, a, g, mask, weight):
        if pass_name == "covariance":
            return super().accumulate(pass_name, stats, state, a, g, mask, weight)
        dtype = stats["lambda"].dtype
        a, g = a.to(dtype), g.to(dtype)
        qs, qa = state["S_vecs"].to(dtype), state["A_vecs"].to(dtype)
        if stats["lambda"].shape != (qs.shape[1], qa.shape[1]):
            stats["lambda"] = qs.new_zeros(qs.shape[1], qa.shape[1])
            stats["row"], stats["col"] = qs.new_zeros(qs.shape[1]), qa.new_zeros(qa.shape[1])
        gs, aa = g @ qs, a @ qa  # [B, T, r_S], [B, T, r_A]
        stats["lambda"] += weight * per_sequence_grads(aa, gs).pow(2).sum(0)
        # squared norms of Q_S^T G_n rows and G_n Q_A columns, and ||G_n||^2, via token Gram matrices: G_n itself
        # (out x in) is never formed. Padded positions have g = 0, so they drop out of every term.
        ka, kg = a @ a.transpose(1, 2), g @ g.transpose(1, 2)  # [B, T, T]
        stats["row"] += weight * ((ka @ gs) * gs).sum((0, 1))
        stats["col"] += weight * ((kg @ aa) * aa).sum((0, 1))
        stats["total"] += (ka * kg).sum().to(torch.float64) * weight  # a tensor: no device sync
        stats["n"] += weight * a.shape[0]

    def finish_pass(self, pass_name, stats, state):
        if pass_name == "covariance":
            return super().finish_pass(pass_name, stats, state)
        dtype = stats["lambda"].dtype
        n = stats["n"].to(dtype)
        (d_out, r_s), (d_in, r_a) = state["S_vecs"].shape, state["A_vecs"].shape
        lam = stats["lambda"] / n
        row, col, total = stats["row"] / n, stats["col"] / n, (stats["total"] / stats["n"]).to(dtype)
        null_a, null_s = d_in - r_a, d_out - r_s
        # block means; clamp: the subtractions can go a rounding error below zero
        row_null = ((row - lam.sum(1)) / max(null_a, 1)).clamp_min(0) if null_a else torch.zeros_like(row)
        col_null = ((col - lam.sum(0)) / max(null_s, 1)).clamp_min(0) if null_s else torch.zeros_like(col)
        rest = total - row.sum() - col.sum() + lam.sum()
        null_null = (rest / (null_a * null_s)).clamp_min(0) if null_a and null_s else lam.new_zeros(())
        return {**state, "lambda": lam, "row_null": row_null, "col_null": col_null, "null_null": null_null,
                "mean_eigenvalue": total / (d_out * d_in)}

    def eigenvalues(self, state):
        return state["lambda"]

    def damping_for(self, state, damping):
        # 0.1 x the mean of all d_out x d_in eigenvalues (the null blocks included) = 0.1 x trace(F) / dim
        return float(damping) if damping is not None else HEURISTIC_DAMPING_SCALE * float(state["mean_eigenvalue"])

    def apply(self, state, grads, fn) -> torch.Tensor:
        """F's eigenvalues mapped by ``fn`` (x -> 1/(x + damping) preconditions, x -> x multiplies by F) applied
        to grads [Q, out, in], block by block."""
        qs, qa = state["S_vecs"].to(grads.dtype), state["A_vecs"].to(grads.dtype)
        x = qs.T @ grads  # [Q, r_S, in]: range_S rows
        y = grads @ qa  # [Q, out, r_A]: range_A columns
        core = x @ qa  # [Q, r_S, r_A]
        x_null = x - core @ qa.T  # range_S x null_A, in input coordinates
        y_null = y - qs @ core  # null_S x range_A
        z = grads - qs @ x - y_null @ qa.T  # null_S x null_A
        f = {k: fn(state[k].to(grads.dtype)) for k in ("lambda", "row_null", "col_null", "null_null")}
        return (qs @ (core * f["lambda"]) @ qa.T + qs @ (x_null * f["row_null"].unsqueeze(-1))
                + (y_null * f["col_null"]) @ qa.T + z * f["null_null"])

    def precondition(self, state, grads, damping):
        d = self.damping_for(state, damping)
        return self.apply(state, grads, lambda v: 1.0 / (v + d))


class Cosine(Estimator):
    """No curvature; the cosine of raw per-sequence gradients over all tracked layers (TrackStar / LESS without
    their projection and optimizer-state preconditioning)."""

    name = "cosine"
    unit_gradients = True


ESTIMATORS: dict[str, type[Estimator]] = {
    cls.name: cls for cls in (Estimator, Cosine, Diagonal, KFAC, KFACReduce, EKFAC, LinFAC)
}
TEXT_METHODS = ("bm25",)  # text retrieval over token ids: no model
# a forward pass, no gradients (lancet.influence.repsim); repsim_anchored subtracts the anchors' similarity and needs
# the anchor rows: Influence(..., anchors=...)
REPRESENTATION_METHODS = ("repsim", "repsim_anchored")
# family "behaviour": a forward pass to block l, each row's activation along a behaviour direction
# (lancet.influence.behaviour; needs the direction: Influence(..., behaviour=...))
BEHAVIOUR_METHODS = ("probe",)
GRADIENT_FREE_METHODS = TEXT_METHODS + REPRESENTATION_METHODS + BEHAVIOUR_METHODS
METHODS = tuple(ESTIMATORS) + GRADIENT_FREE_METHODS


def get_estimator(name: str) -> Estimator:
    if name not in ESTIMATORS:
        raise LancetError(f"unknown influence method {name!r}; choose from {', '.join(METHODS)}")
    return ESTIMATORS[name]()
