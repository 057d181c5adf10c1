"""Checks of the float64 influence reference in tests/reference.py (itself independent of lancet)."""

from __future__ import annotations

import warnings

import torch
import torch.nn.functional as F
from conftest import tiny_gpt2, tiny_llama
from reference import (
    exact_ggn,
    exact_scores,
    ggn_block,
    gradient_dot_scores,
    per_example_grads,
    tracked_modules,
)
from torch.func import functional_call, grad, vmap

TEXTS = [
    "The quick brown fox jumps over the lazy dog.",
    "How do I boil an egg?",
    "What is the capital of France?",
    "Put butter on a burn.",
]


def text_examples(tokenizer, texts=TEXTS, max_len: int = 8) -> list[dict]:
    """Short tokenized examples with only the second half of each sequence labelled."""
    out = []
    for text in texts:
        ids = tokenizer(text)["input_ids"][:max_len]
        half = len(ids) // 2
        out.append({"input_ids": ids, "labels": [-100] * half + ids[half:]})
    return out


def random_examples(vocab_size: int, n: int, length: int = 8, n_prompt: int = 5, seed: int = 0) -> list[dict]:
    gen = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        ids = torch.randint(0, vocab_size, (length,), generator=gen).tolist()
        out.append({"input_ids": ids, "labels": [-100] * n_prompt + ids[n_prompt:]})
    return out


def test_tracked_modules():
    llama = tracked_modules(tiny_llama(20))
    assert len(llama) == 14 and llama[0] == "model.layers.0.self_attn.q_proj"
    assert llama[-1] == "model.layers.1.mlp.down_proj"
    gpt2 = tracked_modules(tiny_gpt2(20))
    kinds = ("attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj")
    assert gpt2 == [f"transformer.h.{i}.{m}" for i in range(2) for m in kinds]


def test_ggn_symmetric_psd(tiny_tokenizer):
    model = tiny_llama(len(tiny_tokenizer), torch.float64)
    examples = text_examples(tiny_tokenizer)
    assert all(len(ex["input_ids"]) == 8 for ex in examples)
    modules = [m for m in tracked_modules(model) if "self_attn" in m]  # both layers; keeps P = 1536 small
    G = exact_ggn(model, examples, modules)
    P = sum(dict(model.named_modules())[m].weight.numel() for m in modules)
    assert G.shape == (P, P) and G.dtype == torch.float64
    assert torch.equal(G, G.T)
    eig = torch.linalg.eigvalsh(G)
    assert eig.min().item() >= -1e-10
    assert eig.max().item() > 1e-3  # not trivially zero
    # ggn_block is exactly the weight's diagonal block of the full G (no biases in Llama)
    name = modules[1]
    start = sum(dict(model.named_modules())[m].weight.numel() for m in modules[:1])
    n = dict(model.named_modules())[name].weight.numel()
    block = ggn_block(model, examples, name)
    torch.testing.assert_close(block, G[start : start + n, start : start + n], rtol=1e-12, atol=1e-14)


def test_ggn_equals_monte_carlo_fisher():
    """G == E over labels sampled from the model's softmax of g gᵀ, g = gradient of the summed CE."""
    V, S = 20, 4000
    model = tiny_llama(V, torch.float64, seed=1)
    model.requires_grad_(False)
    examples = random_examples(V, n=2)
    modules = ["model.layers.0.self_attn.q_proj", "model.layers.1.self_attn.o_proj", "model.layers.1.mlp.down_proj"]
    G = exact_ggn(model, examples, modules)

    names = [f"{m}.weight" for m in modules]
    params = {n: p.detach().clone() for n, p in model.named_parameters() if n in names}
    gen = torch.Generator().manual_seed(0)
    fisher = torch.zeros_like(G)
    for ex in examples:
        ids = torch.tensor(ex["input_ids"])[None]
        pos = torch.nonzero(torch.tensor(ex["labels"][1:]) != -100).flatten()
        with torch.no_grad():
            probs = torch.softmax(model(input_ids=ids).logits[0, :-1][pos], dim=-1)  # [T_s, V]
        sampled = torch.multinomial(probs, S, replacement=True, generator=gen).T  # [S, T_s]

        def summed_ce(p, y, ids=ids, pos=pos):
            logits = functional_call(model, p, args=(), kwargs={"input_ids": ids, "use_cache": False}).logits
            return F.cross_entropy(logits[0, :-1][pos], y, reduction="sum")

        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="There is a performance drop")
            g = vmap(grad(summed_ce), in_dims=(None, 0), chunk_size=1000)(params, sampled)
        g = torch.cat([g[n].reshape(S, -1) for n in names], dim=1)
        fisher += g.T @ g / S
    fisher /= len(examples)
    rel = ((fisher - G).norm() / G.norm()).item()
    assert rel < 0.1, rel


def test_huge_damping_scores_match_gradient_dot(plain_tokenizer):
    model = tiny_gpt2(len(plain_tokenizer), torch.float64)
    examples = text_examples(plain_tokenizer, max_len=6)
    train, queries = examples[:3], examples[3:] + examples[:1]
    modules = ["transformer.h.0.attn.c_attn", "transformer.h.1.mlp.c_proj"]  # Conv1D, with biases
    lam = 1e6
    scores = exact_scores(model, train, queries, modules, damping=lam)
    dots = gradient_dot_scores(model, train, queries, modules)
    assert scores.shape == dots.shape == (2, 3)
    rel = ((lam * scores - dots).norm() / dots.norm()).item()
    assert rel < 1e-4, rel
    assert rel > 0  # the GGN really entered


def _autograd_grad(model, example, module_names) -> torch.Tensor:
    """Gradient of the summed CE (HF shift) with a plain forward and torch.autograd.grad."""
    ids = torch.tensor(example["input_ids"])[None]
    labels = torch.tensor(example["labels"])[None]
    out = model(input_ids=ids, labels=labels)
    loss = F.cross_entropy(out.logits[0, :-1], labels[0, 1:], ignore_index=-100, reduction="sum")
    # same shift convention as HF's own loss (a mean, computed by HF in float32)
    n_scored = int((labels[0, 1:] != -100).sum())
    torch.testing.assert_close(out.loss.double() * n_scored, loss.detach(), rtol=1e-5, atol=0)
    modules = dict(model.named_modules())
    params = []
    for m in module_names:
        params.append(modules[m].weight)
        if modules[m].bias is not None:
            params.append(modules[m].bias)
    return torch.cat([g.flatten() for g in torch.autograd.grad(loss, params)])


def test_per_example_grads_match_autograd(tiny_tokenizer, plain_tokenizer):
    for model, tok in ((tiny_llama(len(tiny_tokenizer), torch.float64), tiny_tokenizer),
                       (tiny_gpt2(len(plain_tokenizer), torch.float64), plain_tokenizer)):
        examples = text_examples(tok)[:2]
        modules = tracked_modules(model)
        grads = per_example_grads(model, examples, modules)
        assert grads.dtype == torch.float64 and grads.shape[0] == 2
        for i, ex in enumerate(examples):
            expected = _autograd_grad(model, ex, modules)
            assert grads.shape[1] == expected.numel()
            torch.testing.assert_close(grads[i], expected, rtol=0, atol=1e-12)
            assert expected.abs().max() > 1e-6
