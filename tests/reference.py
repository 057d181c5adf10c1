"""A plain, slow, obviously-correct reference for influence scores on tiny models (float64, torch.func).

Independent of any ``lancet`` code, so tests can compare lancet's fast approximations against it.

Definitions (exactly these):

* Tracked parameters θ: the ``weight`` (and ``bias`` if present) of the given modules, in the given module order;
  within a module the weight comes first (flattened row-major, ``weight.flatten()``), then the bias. Everything
  else is frozen.
* Loss of an example z: L(z) = SUM of the token cross-entropies over positions whose label != -100, after the
  Hugging Face shift (logits at position t predict ``labels[t + 1]``). g_z = ∂L(z)/∂θ flattened.
* GGN: G = (1/N) Σ_n J_nᵀ H_n J_n, J_n = ∂(logits at the scored positions)/∂θ, H_n block-diagonal over scored
  positions with blocks diag(p) − p pᵀ, p = softmax of that position's logits. (= the true Fisher of L.)
* Score(q, z) = g_qᵀ (G + λ I)⁻¹ g_z; the identity score is g_qᵀ g_z.

Every function works on a float64, eval-mode deep copy of the model, so the caller's model is
never touched.
Examples are dicts with ``input_ids: list[int]`` and ``labels: list[int]`` (same length, -100 = no loss).
"""

from __future__ import annotations

import copy
import warnings
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call, grad, jacrev
from transformers.pytorch_utils import Conv1D

IGNORE_INDEX = -100
_BLOCK_PREFIXES = ("model.layers.", "transformer.h.")  # Llama-style, GPT-2


def tracked_modules(model: nn.Module, kind: str = "linear_in_blocks") -> list[str]:
    """Names of the nn.Linear / transformers Conv1D modules inside the transformer blocks, in model order."""
    if kind != "linear_in_blocks":
        raise ValueError(f"unknown kind {kind!r}")
    names = [
        name
        for name, mod in model.named_modules()
        if name.startswith(_BLOCK_PREFIXES) and isinstance(mod, nn.Linear | Conv1D)
    ]
    if not names:
        raise ValueError("no nn.Linear / Conv1D modules found under model.layers.* or transformer.h.*")
    return names


def _float64_copy(model: nn.Module) -> nn.Module:
    """A float64, eval-mode deep copy whose own parameters need no grad (torch.func differentiates).

    The attention implementation is kept as is: HF's "eager" Llama attention takes its softmax in float32, so
    switching to it would NOT be float64-exact; the default SDPA is (its vmap fallback is only slower).
    """
    model = copy.deepcopy(model).to(torch.float64).eval()
    model.requires_grad_(False)
    return model


def _param_names(model: nn.Module, module_names: Sequence[str]) -> list[str]:
    """Fully-qualified tracked parameter names: for each module, weight then bias (if present)."""
    modules = dict(model.named_modules())
    names = []
    for m in module_names:
        mod = modules[m]
        names.append(f"{m}.weight")
        if getattr(mod, "bias", None) is not None:
            names.append(f"{m}.bias")
    return names


def _params(model: nn.Module, param_names: Sequence[str]) -> dict[str, torch.Tensor]:
    all_params = dict(model.named_parameters())
    return {n: all_params[n].detach().clone() for n in param_names}


def _flatten(tensors: dict[str, torch.Tensor], param_names: Sequence[str], lead: int = 0) -> torch.Tensor:
    """Concatenate per-parameter tensors along the parameter axis (keeping ``lead`` leading dims)."""
    return torch.cat([tensors[n].reshape(*tensors[n].shape[:lead], -1) for n in param_names], dim=-1)


def _tensors(example: dict) -> tuple[torch.Tensor, torch.Tensor]:
    input_ids = torch.as_tensor(example["input_ids"], dtype=torch.long)
    labels = torch.as_tensor(example["labels"], dtype=torch.long)
    if input_ids.shape != labels.shape or input_ids.ndim != 1:
        raise ValueError("input_ids and labels must be 1-D and of the same length")
    return input_ids, labels


def _logits(model: nn.Module, params: dict[str, torch.Tensor], input_ids: torch.Tensor) -> torch.Tensor:
    """[T, V] logits of one unpadded sequence, with the tracked params substituted."""
    out = functional_call(model, params, args=(), kwargs={"input_ids": input_ids[None], "use_cache": False})
    return out.logits[0]


def _summed_ce(model, params, input_ids, labels) -> torch.Tensor:
    logits = _logits(model, params, input_ids)
    return F.cross_entropy(logits[:-1], labels[1:], ignore_index=IGNORE_INDEX, reduction="sum")


def _scored_positions(labels: torch.Tensor) -> torch.Tensor:
    """Indices t of the logits rows that are scored (labels[t + 1] != -100)."""
    return torch.nonzero(labels[1:] != IGNORE_INDEX).flatten()


def _grads(model: nn.Module, examples: Sequence[dict], param_names: Sequence[str]) -> torch.Tensor:
    params = _params(model, param_names)
    rows = []
    for ex in examples:
        input_ids, labels = _tensors(ex)
        g = grad(lambda p, i=input_ids, y=labels: _summed_ce(model, p, i, y))(params)
        rows.append(_flatten(g, param_names))
    return torch.stack(rows)


def per_example_grads(model: nn.Module, examples: Sequence[dict], module_names: Sequence[str]) -> torch.Tensor:
    """[n, P] gradients of the summed CE of each example w.r.t. the tracked params (float64)."""
    model = _float64_copy(model)
    return _grads(model, examples, _param_names(model, module_names))


def _ggn(model: nn.Module, examples: Sequence[dict], param_names: Sequence[str]) -> torch.Tensor:
    params = _params(model, param_names)
    P = sum(p.numel() for p in params.values())
    G = torch.zeros(P, P, dtype=torch.float64)
    for ex in examples:
        input_ids, labels = _tensors(ex)
        pos = _scored_positions(labels)
        if pos.numel() == 0:
            continue

        def scored_logits(p, i=input_ids, pos=pos):
            return _logits(model, p, i)[pos]  # [T_s, V]

        logits = scored_logits(params).detach()
        with warnings.catch_warnings():  # SDPA's CPU backward has no vmap batching rule: slower, still exact
            warnings.filterwarnings("ignore", message="There is a performance drop")
            jac = jacrev(scored_logits)(params)  # name -> [T_s, V, *param.shape]
        J = _flatten(jac, param_names, lead=2)  # [T_s, V, P]
        p = torch.softmax(logits, dim=-1)  # [T_s, V]
        H = torch.diag_embed(p) - p[:, :, None] * p[:, None, :]  # [T_s, V, V]
        HJ = H @ J  # [T_s, V, P]
        G += J.reshape(-1, P).T @ HJ.reshape(-1, P)  # Σ_t J_tᵀ H_t J_t
    G /= len(examples)
    return (G + G.T) / 2  # exact up to rounding; remove the rounding asymmetry


def exact_ggn(model: nn.Module, examples: Sequence[dict], module_names: Sequence[str]) -> torch.Tensor:
    """[P, P] GGN (= Fisher of the summed CE) averaged over the examples, float64, via torch.func.jacrev."""
    model = _float64_copy(model)
    return _ggn(model, examples, _param_names(model, module_names))


def ggn_block(model: nn.Module, examples: Sequence[dict], module_name: str) -> torch.Tensor:
    """Diagonal block of G for one module's weight only, indexed like ``weight.flatten()`` (row-major).

    For nn.Linear the weight is [out, in]; for transformers Conv1D it is [in, out] (flattened as stored).
    """
    model = _float64_copy(model)
    return _ggn(model, examples, [f"{module_name}.weight"])


def exact_scores(
    model: nn.Module,
    train: Sequence[dict],
    queries: Sequence[dict],
    module_names: Sequence[str],
    damping: float,
) -> torch.Tensor:
    """[n_queries, n_train] scores g_qᵀ (G + λ I)⁻¹ g_z, with G the GGN over ``train``."""
    if damping <= 0:
        raise ValueError("damping must be > 0")
    model = _float64_copy(model)
    names = _param_names(model, module_names)
    G = _ggn(model, train, names)
    g_train = _grads(model, train, names)  # [n_train, P]
    g_query = _grads(model, queries, names)  # [n_q, P]
    A = G + damping * torch.eye(G.shape[0], dtype=G.dtype)
    L = torch.linalg.cholesky(A)
    return g_query @ torch.cholesky_solve(g_train.T, L)


def gradient_dot_scores(
    model: nn.Module,
    train: Sequence[dict],
    queries: Sequence[dict],
    module_names: Sequence[str],
) -> torch.Tensor:
    """[n_queries, n_train] identity scores g_qᵀ g_z."""
    model = _float64_copy(model)
    names = _param_names(model, module_names)
    return _grads(model, queries, names) @ _grads(model, train, names).T


def query_grads(model: nn.Module, queries: Sequence[dict], scalar) -> torch.Tensor:
    """[Q, P]: plain autograd of ``scalar(model, params, input_ids, labels)`` for each unpadded query, over the
    tracked weights in float64: the reference any measurement's query gradient is checked against."""
    model = _float64_copy(model)
    names = _param_names(model, tracked_modules(model))
    params = _params(model, names)
    out = []
    for q in queries:
        input_ids, labels = _tensors(q)
        g = grad(lambda p, i=input_ids, y=labels: scalar(model, p, i, y))(params)
        out.append(torch.cat([g[n].reshape(-1) for n in names]))
    return torch.stack(out)
