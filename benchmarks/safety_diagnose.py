"""Diagnoses of the safety benchmark's rankings, read from what a run stored (no model pass; seconds).

    .venv/bin/python -m benchmarks.safety_diagnose --preset full

1. **Openings.** For every ranking, the mean rank of the unsafe rows by the opening of their answer (its first
   OPENING_WORDS words: "Absolutely. Here is", "Happy to help." ...), beside how many IQs open that way, and what
   the top |positives| and the bottom 60 rows are by label; and the AP of the refusals read from the bottom of the
   ranking up (the refusals counter the behaviour: a signed method ranks them last; chance is their share). A
   method that explains one answer's *wording* ranks the culprits by whether they open as most IQs do; one that
   finds the *behaviour* does not care.
2. **Layers.** Does re-weighting layers against each other change who wins? For every stored ranking with per-layer
   scores (``per_layer`` of the aggregate-first ranking: a method's own, and its opening-set ranking where the
   preset has one), the AP of:
- ``sum``: the layers' scores added (what every estimator reports: the influence on the whole model);
- ``layer_standardized``: each layer's scores divided by their standard deviation over the rows first, so that no
  layer outvotes the others by scale (the preconditioner decides scale per layer; this undoes it between layers);
- ``last_third``: only the blocks in the last third of the depth (the small preset put the signal in blocks
  20-28 of 30, before this preset ran), and the same standardised;
- ``by_kind``: each projection kind alone (q, k, v, o, gate, up, down).
Seed 0's numbers were read before these were written down (they are diagnoses there); seeds 1 and 2 are the
held-out check. Writes benchmarks/results/safety_diagnose_<preset>.json.
"""

from __future__ import annotations

import argparse
import json
import re
from collections import Counter
from pathlib import Path

import torch

from benchmarks.common import RESULTS, write_result
from benchmarks.safety_contamination import OPENING_WORDS, TIERS, opening
from lancet.artifacts import load_tensors
from lancet.data.readers import read_records
from lancet.influence.recall import average_precision

KINDS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def block_of(name: str) -> int:
    m = re.search(r"(layers|h|blocks|block)\.(\d+)\.", name)
    if m is None:
        raise ValueError(f"{name}: no block index")
    return int(m.group(2))


def variants(per_layer: torch.Tensor, names: list[str]) -> dict[str, torch.Tensor]:
    """[N, L] per-layer scores -> {variant: [N] ranking}."""
    scale = per_layer.std(0).clamp_min(torch.finfo(per_layer.dtype).tiny)
    blocks = torch.tensor([block_of(n) for n in names])
    late = blocks >= (2 * (int(blocks.max()) + 1)) // 3
    out = {"sum": per_layer.sum(1), "layer_standardized": (per_layer / scale).sum(1),
           "last_third": per_layer[:, late].sum(1),
           "last_third_standardized": (per_layer[:, late] / scale[late]).sum(1)}
    for kind in KINDS:
        cols = torch.tensor([n.endswith(kind) for n in names])
        if cols.any():
            out[f"kind_{kind}"] = per_layer[:, cols].sum(1)
    return out


REFUSALS = ("refusal", "refusal_shared")


def openings_table(seed_dir: Path) -> dict:
    """{method: {opening: mean rank of the unsafe rows that open so}}, the IQs' openings, top/bottom rows by label."""
    ids = json.loads((seed_dir / "rankings.json").read_text())["ids"]
    rows = {r.id: r for r in read_records(seed_dir / "mix.jsonl")}
    iqs = read_records(seed_dir / "iqs.jsonl")
    labels = [rows[i].label for i in ids]
    k = sum(label in TIERS for label in labels)
    out: dict = {"opening_words": OPENING_WORDS, "iq_openings": dict(Counter(opening(r.response_text) for r in iqs)),
                 "unsafe_openings": dict(Counter(opening(rows[i].response_text) for i in ids
                                                 if rows[i].label == "unsafe")), "methods": {}}
    refusal = torch.tensor([label in REFUSALS for label in labels])
    out["refusal_ap_chance"] = round(float(refusal.double().mean()), 4)
    for method, ranking in load_tensors(seed_dir / "rankings.safetensors").items():
        order = torch.argsort(ranking, descending=True, stable=True).tolist()
        ranks: dict[str, list[int]] = {}
        for rank, i in enumerate(order):
            if labels[i] == "unsafe":
                ranks.setdefault(opening(rows[ids[i]].response_text), []).append(rank)
        out["methods"][method] = {
            "unsafe_mean_rank_by_opening": {o: round(sum(v) / len(v), 1) for o, v in sorted(ranks.items())},
            f"top_{k}_by_label": dict(Counter(labels[i] for i in order[:k])),
            "bottom_60_by_label": dict(Counter(labels[i] for i in order[-60:])),
            # the refusals counter the behaviour (benchmarks/safety_tiers.py): a signed method ranks them last
            "refusal_ap_from_bottom": round(average_precision(-ranking.double(), refusal), 4)}
    return out


def scored_ranking(total: torch.Tensor, method: str, rankings: dict[str, torch.Tensor]) -> str | None:
    """Which stored ranking of ``method`` (its own, or one of its ablations: ``<method>_opening_set`` ...) a scores
    directory holds, by its per-layer scores summed (``total``, [N]): they add up to that ranking, to rounding."""
    for name in (n for n in rankings if n == method or n.startswith(f"{method}_")):
        ref = rankings[name].double()
        if ref.shape == total.shape and float((total - ref).abs().max()) <= 1e-4 * float(ref.abs().max()):
            return name
    return None


def seed_table(seed_dir: Path, names: list[str]) -> dict:
    """{ranking: {variant: AP}}, keyed by the stored ranking each scores directory holds: one method has a directory
    per set of queries (the IQs; the opening set), so its name alone does not say what was scored."""
    ids = json.loads((seed_dir / "rankings.json").read_text())["ids"]
    tier = {r.id: r.label for r in read_records(seed_dir / "mix.jsonl")}
    positives = torch.tensor([tier[i] in TIERS for i in ids])
    rankings = load_tensors(seed_dir / "rankings.safetensors")
    out = {}
    for d in sorted((seed_dir / "influence" / "scores").iterdir()):
        tensors = load_tensors(d / "scores.safetensors")
        if "per_layer" not in tensors:  # the first-tokens measurement: no per-layer scores kept
            continue
        method = json.loads((d / "meta.json").read_text())["method"]
        per_layer = tensors["per_layer"][0].double()  # row 0: the method's normalised mean over its queries
        if per_layer.shape[1] != len(names):
            raise SystemExit(f"{d}: {per_layer.shape[1]} layers, expected {len(names)}")
        name = scored_ranking(per_layer.sum(1), method, rankings)
        if name is None:
            print(f"{d}: its scores add up to none of {method}'s stored rankings (an earlier run's?); skipped",
                  flush=True)
            continue
        if name in out:
            raise SystemExit(f"{d}: a second scores directory for the ranking {name}")
        out[name] = {k: round(average_precision(v, positives), 4) for k, v in variants(per_layer, names).items()}
        print(f"{seed_dir.name} {name}: {out[name]}", flush=True)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="full")
    parser.add_argument("--run-dir", default=None, help="default runs/safety_<preset>")
    ns = parser.parse_args()
    from lancet.constants import DEFAULT_MODEL
    from lancet.curvature.modules import find_tracked_layers
    from lancet.models.loading import load_model

    model, _ = load_model(DEFAULT_MODEL)  # the layer names only (every fine-tune shares the architecture)
    names = [layer.name for layer in find_tracked_layers(model, "blocks")]
    del model
    run = Path(ns.run_dir or f"runs/safety_{ns.preset}")
    # seeds diagnosed earlier whose run directory is gone (a lost machine) keep their numbers
    earlier = RESULTS / f"safety_diagnose_{ns.preset}.json"
    seeds = json.loads(earlier.read_text())["seeds"] if earlier.is_file() else {}
    found = False
    for seed_dir in sorted(run.glob("seed*")):
        if (seed_dir / "rankings.json").is_file() and (seed_dir / "influence" / "scores").is_dir():
            seeds[seed_dir.name] = {"openings": openings_table(seed_dir), "layers": seed_table(seed_dir, names)}
            found = True
    if not found:
        raise SystemExit(f"{run}: no seed with stored scores; run benchmarks.safety_contamination first")
    write_result(f"safety_diagnose_{ns.preset}", {"preset": ns.preset, "seeds": seeds,
                                                  "note": "seed0 was read before these diagnoses were written down"})


if __name__ == "__main__":
    main()
