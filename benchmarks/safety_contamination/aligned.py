"""Stage "aligned": the aligned start every later fine-tune begins from (SmolLM2-135M-Instruct fine-tuned on refusals,
helpful answers and Alpaca answers distilled from the base model itself), checked for its refusal rate on the test
prompts and its over-refusal of XSTest's safe ones."""

from __future__ import annotations

from benchmarks.safety_contamination.config import ALIGNED_MAX_OVER_REFUSAL, ALIGNED_MIN_REFUSAL
from lancet.constants import DEFAULT_MODEL
from lancet.models.loading import load_model


class AlignedStage:
    """``Run.aligned_start`` (benchmarks/safety_contamination/run.py holds the seed's settings and helpers)."""

    def aligned_start(self) -> tuple[str, dict]:
        base, _ = load_model(DEFAULT_MODEL)
        alpaca = self.parts["align_alpaca"]
        own = self.answers("base", base, alpaca, "align_alpaca", max_new_tokens=self.p.unsafe_new_tokens)
        del base
        distilled = [r.with_response(a.strip()) for r, a in zip(alpaca, own, strict=True) if a.strip()]
        path = self.finetune("aligned", DEFAULT_MODEL, self.parts["align_train"] + distilled, self.p.align_epochs)
        model, _ = load_model(path)
        harmful, _, _ = self.rate("aligned", model, "test_prompts")
        over, _, _ = self.rate("aligned", model, "xstest_safe")
        check = {"refusal": round(1 - harmful, 4), "xstest_over_refusal": round(1 - over, 4)}
        check["passed"] = check["refusal"] >= ALIGNED_MIN_REFUSAL and check["xstest_over_refusal"] <= \
            ALIGNED_MAX_OVER_REFUSAL
        print(f"seed {self.seed} aligned start: {check}", flush=True)
        return path, check
