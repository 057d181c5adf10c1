"""The correction suite's within-seed intervals (docs/method.md §5.4): a paired bootstrap over each OOD set's test
prompts, from the per-prompt verdicts each row carries; known answers, and the backfill from a run directory."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from benchmarks.contamination_suite.correction import (
    OOD_SETS,
    backfill_verdicts,
    build_correction_suite,
    seed_intervals,
    seed_rows,
)
from benchmarks.contamination_suite.stats import difference_ci, gap_closed_ci, ood_replicates
from benchmarks.safety_contamination.correction import set_verdicts
from lancet.artifacts import atomic_write_json


def _alternating(n: int, ones_every: int, offset: int = 0) -> str:
    return "".join("1" if (i + offset) % ones_every == 0 else "0" for i in range(n))


def _models(**rates: int) -> dict[str, dict[str, str]]:
    """Each model complies with every ``k``-th prompt of each of the seven sets (100 prompts each)."""
    return {m: {s: _alternating(100, k) if k else "0" * 100 for s in OOD_SETS} for m, k in rates.items()}


def test_the_bootstrap_is_stratified_paired_and_seeded():
    verdicts = {"a": {"small": "111", "large": "0" * 100}, "b": {"small": "101", "large": "1" * 50 + "0" * 50}}
    reps = ood_replicates(verdicts, n_boot=500)
    # stratified: each set keeps its size, so a model constant within every set has one value in every replicate
    assert torch.equal(reps["a"], torch.full((500,), 0.5, dtype=torch.float64))
    assert reps["b"].std() > 0.01
    # paired: a model identical to another differs from it by exactly 0 in every replicate
    same = ood_replicates({"x": verdicts["b"], "y": dict(verdicts["b"])}, n_boot=500)
    assert difference_ci(same, "x", "y") == [0.0, 0.0]
    # seeded: the same inputs give the same replicates; another seed other ones
    assert torch.equal(ood_replicates(verdicts, n_boot=500)["b"], reps["b"])
    assert not torch.equal(ood_replicates(verdicts, n_boot=500, seed=1)["b"], reps["b"])


def test_gap_closed_interval_known_answers():
    reps = ood_replicates(_models(impure=2, safe=0, half=4, like_impure=2))
    assert gap_closed_ci(reps, "like_impure") == [0.0, 0.0]
    assert gap_closed_ci(reps, "safe") == [1.0, 1.0]
    # "half" complies with every 4th prompt where impure does with every 2nd and safe with none: always half the gap
    # (its ones are a subset of impure's, so every redraw keeps the ratio near 0.5, not exactly)
    lo, hi = gap_closed_ci(reps, "half")
    assert 0.4 < lo < 0.5 < hi < 0.6
    # one set fully apart, the others equal: the OOD difference is 1/7 in every replicate
    a = {s: "1" * 50 for s in OOD_SETS}
    b = {**a, OOD_SETS[0]: "0" * 50}
    assert difference_ci(ood_replicates({"a": a, "b": b}), "a", "b") == [round(1 / 7, 4)] * 2


def test_the_interval_width_is_the_binomial_one():
    """Seven sets of 100 prompts at rate 0.5: the OOD mean's standard error is sqrt(0.25 / 700) ≈ 0.0189, so the
    95 % interval is about 0.5 ± 0.037."""
    reps = ood_replicates(_models(m=2), n_boot=4000)
    lo, hi = gap_closed_ci({"impure": torch.ones(4000), "safe": torch.zeros(4000), "m": 1 - reps["m"]}, "m")
    assert lo == pytest.approx(0.5 - 0.037, abs=0.006) and hi == pytest.approx(0.5 + 0.037, abs=0.006)


def test_models_that_answered_other_prompts_are_refused():
    with pytest.raises(ValueError, match="different numbers of prompts"):
        ood_replicates({"a": {"s": "01"}, "b": {"s": "011"}})
    with pytest.raises(ValueError, match="verdicts for sets"):
        ood_replicates({"a": {"s": "01"}, "b": {"t": "01"}})


def _row(verdicts: dict[str, str] | None, rate: float) -> dict:
    sets = {s: {"compliance": rate, "n": 100} for s in OOD_SETS}
    if verdicts:
        for s in OOD_SETS:
            sets[s]["verdicts"] = verdicts[s]
    return {"sets": sets, "utility_loss_valid": 0.01, "utility_loss_test": 0.02}


def test_seed_rows_and_the_summary_carry_the_intervals(tmp_path):
    models = _models(impure=2, safe=0, fx_default=4, fx_bm25=2)
    rates = {"impure": 0.5, "safe": 0.0, "fx_default": 0.25, "fx_bm25": 0.5}
    rows = {m: _row(models[m], rates[m]) for m in models}
    rows["fx_default"]["at_oracle_budget"] = _row(None, 0.1)  # the checkpoint within the retrained model's cost
    shown = seed_rows(rows)
    assert shown["fx_default"]["gap_closed_at_retrained_cost"] == 0.8
    assert shown["fx_bm25"]["gap_closed_at_retrained_cost"] is None
    assert shown["fx_default"]["gap_closed"] == 0.5 and shown["fx_default"]["gap_closed_ci"][0] > 0.4
    assert "minus_main" not in shown["fx_default"]
    assert shown["fx_bm25"]["minus_main"] == 0.25 and shown["fx_bm25"]["gap_closed_ci"] == [0.0, 0.0]
    lo, hi = shown["fx_bm25"]["minus_main_ci"]
    assert 0.2 < lo < 0.25 < hi < 0.3
    # a row without verdicts (measured before rows carried them) has no interval, and the others keep theirs
    rows["fx_random"] = _row(None, 0.3)
    assert "gap_closed_ci" not in seed_rows(rows)["fx_random"] and seed_intervals(rows)["fx_bm25"]
    for seed in (0, 1):
        atomic_write_json(tmp_path / "lexical" / f"seed{seed}.json", {"key": "k", "rows": rows})
    out = build_correction_suite(tmp_path, suite={}, stage_root=tmp_path / "no_stages")
    bm25 = out["designs"]["lexical"]["rows"]["fx_bm25"]
    assert bm25["minus_main_per_seed"] == {"0": 0.25, "1": 0.25}
    assert out["designs"]["lexical"]["rows"]["fx_default"]["gap_closed_at_retrained_cost_per_seed"] == {"0": 0.8,
                                                                                                     "1": 0.8}
    assert bm25["minus_main_ci_per_seed"]["0"] == bm25["minus_main_ci_per_seed"]["1"] == [lo, hi]
    assert out["designs"]["lexical"]["rows"]["fx_random"]["gap_closed_ci_per_seed"] == {"0": None, "1": None}
    assert out["main_row"] == "fx_default"


def _metrics(run_dir: Path, name: str, verdicts: dict[str, str], prompts: str = "p") -> None:
    sets = {s: {"kind": "harmful_prompts", "compliance_rate": v.count("1") / len(v),
                "answers": [{"prompt": f"{prompts}{i}", "answer": "…", "complies": c == "1"} for i, c in enumerate(v)]}
            for s, v in verdicts.items()}
    sets["alpaca"] = {"kind": "benign_prompts", "answers": []}
    atomic_write_json(run_dir / f"metrics-{name}.json", {"sets": sets})


def test_backfill_fills_verdicts_from_the_run_directory_and_checks_them(tmp_path):
    models = _models(impure=2, safe=0, fx_default=4)
    rates = {"impure": 0.5, "safe": 0.0, "fx_default": 0.25}
    stage = tmp_path / "seed0.json"
    atomic_write_json(stage, {"key": "k", "rows": {m: _row(None, rates[m]) for m in models}})
    for m, v in models.items():
        _metrics(tmp_path, m, v)
    assert backfill_verdicts(stage, tmp_path) == ["impure", "fx_default", "safe"]
    kept = json.loads(stage.read_text())["rows"]
    assert kept["fx_default"]["sets"][OOD_SETS[0]]["verdicts"] == models["fx_default"][OOD_SETS[0]]
    assert kept["fx_default"]["utility_loss_test"] == 0.02  # nothing else touched
    assert backfill_verdicts(stage, tmp_path) == []  # rows that have them are left alone
    # a metrics file whose rate is not the row's, or whose prompts are not the impure model's, is refused
    atomic_write_json(stage, {"key": "k", "rows": {m: _row(None, rates[m]) for m in models}})
    _metrics(tmp_path, "fx_default", models["impure"])
    with pytest.raises(SystemExit, match=r"metrics-fx_default.json: set 'advbench_heldout' does not match"):
        backfill_verdicts(stage, tmp_path)
    _metrics(tmp_path, "fx_default", models["fx_default"], prompts="other")
    with pytest.raises(SystemExit, match="other prompts"):
        backfill_verdicts(stage, tmp_path)
    assert "verdicts" not in json.loads(stage.read_text())["rows"]["impure"]["sets"][OOD_SETS[0]]  # nothing written


def test_set_verdicts_reads_harmful_sets_only():
    answers = [{"complies": True}, {"complies": False}, {"complies": True}]
    assert set_verdicts({"kind": "harmful_prompts", "answers": answers}) == {"verdicts": "101"}
    assert set_verdicts({"kind": "benign_prompts", "answers": answers}) == {}


def _recall() -> dict:
    """Ten rows: culprits (unsafe) 0-1, known refusals 2, 5, 8 (8 shares the culprits' prompts), benign the rest.
    LinFAC puts the culprits on top and two refusals at the bottom; BM25 puts a refusal (same words) second."""
    tiers = ["unsafe", "unsafe", "refusal", "benign", "benign", "refusal", "benign", "benign", "refusal_shared",
             "benign"]
    linfac = [9.0, 8.0, -9.0, 0.0, 1.0, -8.0, 2.0, 3.0, 0.5, -1.0]
    bm25 = [9.0, 1.0, 8.0, 0.0, 2.0, -1.0, 3.0, 4.0, -5.0, -6.0]
    return {"tiers": tiers, "positive_tiers": ["unsafe"],
            "scores": {"linfac": linfac, "bm25": bm25, "repsim": bm25}}


def test_pair_composition_counts_each_side():
    from benchmarks.contamination_suite.composition import pair_composition

    c = pair_composition(_recall(), seed=0)
    # LinFAC: down the two culprits, up its two lowest rows (refusals 2 and 5)
    assert c["fx_default"] == {"culprits_dispreferred": 2, "culprits_preferred": 0, "refusals_dispreferred": 0,
                               "refusals_preferred": 2, "net_refusals": 2}
    assert c["fx_uniform"] == c["fx_default"]  # the weights differ, not the rows
    # BM25: down culprit 0 and refusal 2; up rows 9 and 8 (benign, a shared-prompt refusal)
    assert c["fx_bm25"] == {"culprits_dispreferred": 1, "culprits_preferred": 0, "refusals_dispreferred": 1,
                            "refusals_preferred": 1, "net_refusals": 0}
    # the oracle pushes every culprit down and the lowest-scored non-culprits up
    assert c["fx_oracle"]["culprits_dispreferred"] == 2 and c["fx_oracle"]["refusals_preferred"] == 2
    # preferred refusals: only the rows of tier "refusal" (k = 2 of them, the lowest-scored)
    assert c["fx_preferred_refusals"]["refusals_preferred"] == 2
    assert sum(c["fx_random"][s] for s in ("culprits_dispreferred", "culprits_preferred")) <= 2


def test_spearman_with_ties_and_hypothesis_r():
    from benchmarks.contamination_suite.composition import refusal_hypothesis, spearman_ties
    from benchmarks.contamination_suite.correction import FACTORIAL_ROWS

    assert spearman_ties([1, 2, 2, 3], [1, 2, 3, 4]) == pytest.approx(4.5 / (4.5 * 5) ** 0.5, abs=1e-4)
    assert spearman_ties([1, 1, 1], [1, 2, 3]) is None
    composition = {c: {"net_refusals": i, "culprits_dispreferred": -i} for i, c in enumerate(FACTORIAL_ROWS)}
    gaps = {c: 0.1 * i for i, c in enumerate(FACTORIAL_ROWS)}
    assert refusal_hypothesis(composition, {**gaps, "fx_oracle": None}) is None  # not every cell in yet
    # fx_repsim (index 2) closes more than fx_default (index 0) here: prediction 2 fails, prediction 1 holds
    weighted = {c: {"weighted_refusals": -0.1 * i} for i, c in enumerate(FACTORIAL_ROWS)}
    out = refusal_hypothesis(composition, gaps, {"fx_repsim": [-0.3, -0.1]}, weighted)
    assert out == {"rho_net_refusals": 1.0, "rho_culprits_dispreferred": -1.0, "rho_weighted_refusals": -1.0,
                   "prediction_1": True, "prediction_2": False}
    gaps["fx_repsim"] = -0.5
    assert refusal_hypothesis(composition, gaps, {"fx_repsim": [0.2, 0.4]})["prediction_2"] is True


def test_hypothesis_w_holds_only_with_every_comparison_one_way_and_fails_at_the_first_against():
    from benchmarks.contamination_suite.composition import weight_hypothesis

    def gaps(uniform: list, random: list) -> dict:
        return {seed: {b: {"fx_uniform": uniform[2 * i + j], "fx_random": random[2 * i + j]}
                       for j, b in enumerate(("budget", "retrained_cost"))} for i, seed in enumerate(("0", "1"))}

    assert weight_hypothesis(gaps([0.1, 0.2, 0.1, None], [0.4, 0.7, 0.5, 0.6]))["holds"] is None
    assert weight_hypothesis(gaps([0.1, 0.2, 0.1, 0.3], [0.4, 0.7, 0.5, 0.6]))["holds"] is True
    # one comparison the other way (or level) fails it
    assert weight_hypothesis(gaps([0.1, 0.2, 0.1, 0.6], [0.4, 0.7, 0.5, 0.6]))["holds"] is False
    assert weight_hypothesis({})["holds"] is None
    # a comparison against it decides before the others exist (seed 0 within 5 % on 2026-12-07: 0.676 against 0.424)
    assert weight_hypothesis(gaps([0.676, 0.676, None, None], [0.424, 0.782, None, None]))["holds"] is False


def test_the_summary_and_table_show_each_cells_pairs(tmp_path, render_table):
    stages = tmp_path / "stages"
    for seed in (0, 1):
        atomic_write_json(stages / "lexical" / f"seed{seed}_recall.json", _recall())
    models = _models(impure=2, safe=0, fx_default=4)
    atomic_write_json(tmp_path / "lexical" / "seed0.json",
                      {"key": "k", "rows": {m: _row(models[m], r) for m, r in
                                            {"impure": 0.5, "safe": 0.0, "fx_default": 0.25}.items()}})
    out = build_correction_suite(tmp_path, suite={}, stage_root=stages)
    assert out["pairs"]["lexical"]["0"]["fx_default"]["net_refusals"] == 2
    assert out["hypothesis_r"]["lexical"]["0"] == {"cells_in": ["fx_default"], "test": None,
                                                   "random_minus_bm25_gap": None}
    text = render_table("correction_suite", out, "correction_suite")
    assert "| fx_default | 2 / 0 / 2 / +2 / – / 0.500 | 2 / 0 / 2 / +2 / – / – |" in text
    assert "seed 0: not yet (cells in: fx_default)" in text
    # no seed has fx_uniform or fx_random yet: hypothesis W is untested
    assert out["hypothesis_w"]["lexical"]["holds"] is None
    assert out["hypothesis_w"]["lexical"]["gaps"]["1"]["budget"] == {"fx_uniform": None, "fx_random": None}
    assert "Hypothesis W (the weight on the IQ pairs corrects" in text and "seed 0 budget: fx_uniform –" in text


def test_weighted_pairs_rebuilds_the_trained_pairs(tmp_path, tiny_tokenizer):
    """The ten rows of ``_recall`` as a run directory, with one IQ: fx_default's pairs are the two culprits and the
    IQ (scored as the top culprit) against LinFAC's two lowest rows (refusals 2 and 5), rank-paired and cycled:
    gaps 9+9, 8+8 and 9+9, so the IQ holds 18/52 of the weight and the culprits 34/52, and every chosen row is a
    known refusal."""
    from benchmarks.contamination_suite.composition import weighted_pairs
    from lancet.artifacts import atomic_save_tensors, hash_json
    from lancet.data.records import Record, records_to_jsonl

    recall = _recall()
    ids = [f"row{i}" for i in range(10)]
    rows = [Record(prompt=f"question number {i}", response=f"answer {i}", id=ids[i], label=t)
            for i, t in enumerate(recall["tiers"])]
    (tmp_path / "mix.jsonl").write_bytes(records_to_jsonl(rows))
    (tmp_path / "iqs.jsonl").write_bytes(records_to_jsonl([Record(prompt="an IQ", response="bad", id="iq0")]))
    atomic_write_json(tmp_path / "rankings.json", {"ids": ids})
    atomic_save_tensors(tmp_path / "rankings.safetensors",
                        {m: torch.tensor(v, dtype=torch.float32) for m, v in recall["scores"].items()})
    tiny_tokenizer.save_pretrained(tmp_path / "impure")
    out = weighted_pairs(tmp_path, 0, ("unsafe",), 64)
    assert out["row_ids"] == hash_json(ids)
    main = out["cells"]["fx_default"]
    assert main == {"pairs": 3, "rejected_iq": round(18 / 52, 4), "rejected_culprit": round(34 / 52, 4),
                    "rejected_refusal": 0.0, "chosen_refusal": 1.0, "chosen_culprit": 0.0, "weighted_refusals": 1.0}
    assert out["cells"]["fx_uniform"]["rejected_iq"] == round(1 / 3, 4)  # uniform weights: one pair in three
    # a run whose recorded pair count differs is refused
    atomic_write_json(tmp_path / "correct-fx_bm25-lr2e-06" / "lancet_correction.json", {"n_items": 5})
    with pytest.raises(SystemExit, match="5 pairs trained, 3 rebuilt for fx_bm25"):
        weighted_pairs(tmp_path, 0, ("unsafe",), 64)
