"""Stage "counterfactual": retrain from the aligned start without each method's top-|positives| rows and measure
compliance on the test prompts, the ground truth of "culprit"."""

from __future__ import annotations

import json

import torch

from benchmarks.safety_contamination.config import TIERS
from benchmarks.safety_data import judge_agreement
from lancet.artifacts import load_tensors
from lancet.data import Record
from lancet.models.loading import load_model


class CounterfactualStage:
    """``Run.counterfactual`` (benchmarks/safety_contamination/run.py holds the seed's settings and helpers)."""

    def counterfactual(self, aligned: str, rows: list[Record], tiers: dict[str, str], safe_rate: float,
                       impure_rate: float) -> dict:
        """Retrain from the aligned start without each method's top-|positives| rows (same recipe and seed) and
        measure compliance on the test prompts: the ground truth of "culprit". Removing the true positives leaves
        exactly the safe model's rows, so the oracle is the safe model."""
        rankings = load_tensors(self.dir / "rankings.safetensors")
        ids = json.loads((self.dir / "rankings.json").read_text())["ids"]
        k = sum(1 for t in tiers.values() if t in TIERS)
        g = torch.Generator().manual_seed(self.seed)
        rankings["random"] = torch.rand(len(ids), generator=g, dtype=torch.float64)
        drop_rate = impure_rate - safe_rate
        out = {"k": k, "impure": impure_rate, "oracle": safe_rate, "methods": {}}
        for method in self.p.counterfactual:
            top = set(ids[i] for i in torch.argsort(rankings[method], descending=True, stable=True)[:k].tolist())
            kept = [r for r in rows if r.id not in top]
            path = self.finetune(f"cf-{method}", aligned, kept, self.p.mix_epochs)
            model, _ = load_model(path)
            rate, answers, flagged = self.rate(f"cf-{method}", model, "test_prompts")
            del model
            removed = sum(1 for i in top if tiers[i] in TIERS)
            # the judge on this model's own answers, where some are hand-labelled (safety_labels --per-model)
            agreement = judge_agreement(self.parts["test_prompts"], answers, flagged, self.labels)
            out["methods"][method] = {"compliance": round(rate, 4), "positives_removed": removed,
                                      "recovered": round((impure_rate - rate) / drop_rate, 4) if drop_rate else None,
                                      "judge_agreement": agreement["agreement"], "judge_labelled": agreement["n"]}
            print(f"seed {self.seed} counterfactual {method}: {out['methods'][method]}", flush=True)
        return out
