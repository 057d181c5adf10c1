"""The contamination suite (issue 35; the design is docs/method.md §5.6): which attribution method finds the rows
that cause a behaviour, on designs where text search must win (``lexical``), where prompts are shared with
refusals (``shared_prompt``), where culprits and IQs share no wording (``disjoint``), and on the demo (``demo``),
with intervals that can tell methods apart.

    .venv/bin/python -m benchmarks.contamination_suite write          # the suite JSON from the committed stages
    .venv/bin/python -m benchmarks.contamination_suite import-lexical  # stage files of the committed lexical seeds
    .venv/bin/python -m benchmarks.contamination_suite run --design D --seed S --stage gate|recall|counterfactual|tune
    .venv/bin/python -m benchmarks.contamination_suite run --design lexical --seed S --stage correction  # issue 37
    .venv/bin/python -m benchmarks.contamination_suite write-correction  # correction_suite.json from its rows

- ``designs``: the four designs, their validation and reported seeds;
- ``stats``: the paired bootstrap (AP, recall@|P|, AP per tier), the elbow k, the recovered share's interval;
- ``overlap``: the opening 4-gram check and the AP without overlapping culprits;
- ``gate``: a design's causation gate over its reported seeds;
- ``stages``: the committed per-(design, seed, stage) JSON files a later session resumes from;
- ``suite``: the selection on validation seeds, the suite JSON and its schema's validator;
- ``runner``: one (design, seed, stage) from the safety benchmark's ``Run``, written as its stage file;
- ``behaviour``: the behaviour-level rankings (probe, linfac_behaviour, repsim_anchored, the checkpoint ones) and
  the derived ``repsim_probe`` with its hypothesis test;
- ``demo_design``: the demo as a design (``lancet demo --seed S``'s fine-tune, planted culprits, no gate);
- ``correction``: issue 37's ranking factorial and baselines on the suite's own models and committed rankings.
"""

from benchmarks.contamination_suite.designs import DESIGNS, Design
from benchmarks.contamination_suite.gate import design_gate, gate_stage
from benchmarks.contamination_suite.overlap import ap_no_overlap, disjoint_openings, opening_grams, overlap_check
from benchmarks.contamination_suite.stages import (
    from_committed,
    read_stage,
    recall_stage,
    record_reference,
    record_retrained,
    write_stage,
)
from benchmarks.contamination_suite.stats import SeedScores, bootstrap, elbow_k, recovered_ci
from benchmarks.contamination_suite.suite import (
    build_suite,
    counterfactual_ks,
    default_rule,
    family,
    hypothesis_tests,
    select_on_validation,
    validate_suite,
    write_suite,
)

__all__ = ["DESIGNS", "Design", "SeedScores", "ap_no_overlap", "bootstrap", "build_suite", "counterfactual_ks",
           "default_rule", "design_gate", "disjoint_openings", "elbow_k", "family", "from_committed", "gate_stage",
           "hypothesis_tests", "opening_grams", "overlap_check", "read_stage", "recall_stage", "record_reference",
           "record_retrained", "recovered_ci", "select_on_validation", "validate_suite", "write_stage", "write_suite"]
