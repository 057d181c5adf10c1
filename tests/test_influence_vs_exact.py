"""Every estimator against exact damped-GGN influence (torch.func) on a tiny random transformer LM, float64."""

import re

import pytest
import torch
from conftest import make_tokenizer, tiny_llama
from reference import exact_ggn, exact_scores, tracked_modules
from scipy.stats import pearsonr, spearmanr

from lancet.data.records import Record
from lancet.data.tokenize import encode_records
from lancet.influence import pairwise_scores

WORDS = ["burn", "butter", "water", "nose", "head", "lean", "egg", "boil", "Paris", "France", "fox", "dog"]


def _rows(tok, n, seed):
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        k = int(torch.randint(2, 6, (1,), generator=g))
        words = [WORDS[int(i)] for i in torch.randint(0, len(WORDS), (k + 3,), generator=g)]
        out.append(Record(prompt=" ".join(words[:3]) + "?", response=" ".join(words[3:]) + "."))
    return encode_records(out, tok, 64, progress=False)


@pytest.fixture(scope="module")
def setup():
    tok = make_tokenizer()
    model = tiny_llama(len(tok), dtype=torch.float64, seed=1)
    model.set_attn_implementation("eager")  # jacrev has a batching rule for eager attention, not for CPU SDPA
    train, queries = _rows(tok, 24, 0), _rows(tok, 3, 1)
    # a subset of layers of both blocks (attention and MLP) keeps the exact P x P GGN small (P = 1408)
    modules = [m for m in tracked_modules(model) if m.endswith(("0.self_attn.q_proj", "0.mlp.down_proj",
                                                                  "1.self_attn.v_proj", "1.mlp.up_proj"))]
    assert len(modules) == 4
    ggn = exact_ggn(model, list(train), modules)
    damping = 0.1 * float(torch.linalg.eigvalsh(ggn).clamp_min(0).mean())
    exact = exact_scores(model, list(train), list(queries), modules, damping)
    return model, train, queries, exact, damping, modules


METHODS = ["identity", "diagonal", "kfac", "kfac_reduce", "ekfac", "linfac"]


def test_estimators_track_exact_influence(setup):
    model, train, queries, exact, damping, modules = setup
    table = {}
    for method in METHODS:
        s = pairwise_scores(model, train, queries, method=method, damping=damping, dtype="float64",
                            fisher_samples=64, modules=[re.escape(m) + "$" for m in modules], progress=False)
        x, y = s.flatten().numpy(), exact.flatten().numpy()
        table[method] = (pearsonr(x, y)[0], spearmanr(x, y)[0])
    print("\nmethod        pearson  spearman   (vs exact damped-GGN influence, 3 queries x 24 rows)")
    for method, (p, r) in table.items():
        print(f"{method:12s}  {p:7.3f}  {r:8.3f}")
    assert table["ekfac"][0] > 0.85 and table["linfac"][0] > 0.85
    assert table["ekfac"][0] > table["identity"][0] + 0.1
    assert table["linfac"][0] > table["identity"][0] + 0.1
    assert table["linfac"][1] > table["identity"][1]
