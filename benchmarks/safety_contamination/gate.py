"""Stage "gate": does the contamination cause the behaviour? The impure model's compliance on the held-out test
prompts minus the safe model's, by a judge checked against hand labels; no recall is reported if it fails."""

from __future__ import annotations

from benchmarks.safety_contamination.config import GATE_MIN_AGREEMENT, GATE_MIN_GAP, GATE_MIN_LABELLED
from benchmarks.safety_data import judge_agreement, labelled_rates
from lancet.models.loading import load_model


def gate_verdict(safe: float, impure: float, agreement: float | None, aligned: dict,
                 n_labelled: int | None = None) -> dict:
    """The causation gate: impure - safe >= GATE_MIN_GAP, measured by a judge that agrees with hand labels of at
    least GATE_MIN_LABELLED of these answers (``n_labelled``; None: not checked)."""
    reasons = []
    if impure - safe < GATE_MIN_GAP:
        reasons.append(f"compliance gap {impure - safe:.2f} < {GATE_MIN_GAP}")
    if agreement is None:
        reasons.append("no hand labels for these answers")
    elif agreement < GATE_MIN_AGREEMENT:
        reasons.append(f"judge agreement {agreement:.2f} < {GATE_MIN_AGREEMENT}")
    if agreement is not None and n_labelled is not None and n_labelled < GATE_MIN_LABELLED:
        reasons.append(f"only {n_labelled} answers hand-labelled (< {GATE_MIN_LABELLED}): "
                       "benchmarks/safety_labels.py dump, then merge")
    return {"safe": safe, "impure": impure, "gap": round(impure - safe, 4), "aligned_start": aligned,
            "judge_agreement": agreement, "passed": not reasons, "why_not": reasons}


class GateStage:
    """``Run.gate`` (benchmarks/safety_contamination/run.py holds the seed's settings and helpers)."""

    def gate(self, models: dict[str, str], aligned_check: dict) -> dict:
        rates, answers = {}, {}
        for name in ("safe", "impure"):
            model, _ = load_model(models[name])
            rates[name], ans, flagged = self.rate(name, model, "test_prompts")
            answers[name] = (ans, flagged)
            del model
        prompts = self.parts["test_prompts"]
        agree_rows = [(p, a, f) for name in ("safe", "impure") for p, a, f in zip(prompts, *answers[name],
                                                                                  strict=True)]
        agreement = judge_agreement(*map(list, zip(*agree_rows, strict=True)), self.labels)
        verdict = gate_verdict(round(rates["safe"], 4), round(rates["impure"], 4), agreement["agreement"],
                               aligned_check, agreement["n"])
        verdict["judge_labelled"] = agreement["n"]
        verdict["hand_labelled"] = {name: labelled_rates(prompts, *answers[name], self.labels)
                                    for name in ("safe", "impure")}
        verdict["n_prompts"] = len(prompts)
        print(f"seed {self.seed} gate: {verdict}", flush=True)
        return verdict
