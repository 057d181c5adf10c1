"""Evaluation: harm, over-refusal and utility metrics, each reported beside the judge's measured accuracy."""

from lancet.evaluate.judges import (
    ComplianceClassifier,
    HFClassifierJudge,
    JudgeReport,
    MarkerJudge,
    RefusalMatcher,
    RuleJudge,
    make_judge,
)
from lancet.evaluate.suite import Suite, evaluate, format_table, load_suite

__all__ = [
    "ComplianceClassifier",
    "HFClassifierJudge",
    "JudgeReport",
    "MarkerJudge",
    "RefusalMatcher",
    "RuleJudge",
    "Suite",
    "evaluate",
    "format_table",
    "load_suite",
    "make_judge",
]
