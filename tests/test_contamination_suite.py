"""The contamination suite's infrastructure (issue 35; docs/method.md §5.6) on constructed inputs: the paired
bootstrap, the elbow, the recovered share's interval, the opening overlap check, the design gate, the selection on
validation seeds, the suite JSON and its schema, and lancet's regime readout. No model is trained."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from benchmarks.contamination_suite import (
    Design,
    SeedScores,
    ap_no_overlap,
    bootstrap,
    build_suite,
    counterfactual_ks,
    default_rule,
    design_gate,
    disjoint_openings,
    elbow_k,
    family,
    from_committed,
    gate_stage,
    hypothesis_tests,
    opening_grams,
    overlap_check,
    recall_stage,
    record_reference,
    record_retrained,
    recovered_ci,
    select_on_validation,
    validate_suite,
    write_stage,
    write_suite,
)
from benchmarks.contamination_suite.overlap import overlap
from benchmarks.contamination_suite.stats import batched_ap, batched_recall_at_p, seed_metrics
from lancet.influence.recall import average_precision, recall_at_k
from lancet.influence.regime import RegimeReadout, ngram_overlap, rank_agreement

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(autouse=True)
def _one_thread():
    """Small tensors: one thread is faster than a pool that waits on a shared, busy machine (about 25x here)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _seed(seed: int, n: int, share: float = 0.25, signal: float = 1.0, noise: float = 1.0,
          methods: dict[str, float] | None = None) -> SeedScores:
    """Rows whose positives score ``signal`` higher than the rest under Gaussian noise; ``methods`` {name:
    signal} gives several methods the same noise draw (so that they are correlated, as real rankings are)."""
    g = torch.Generator().manual_seed(seed)
    pos = torch.rand(n, generator=g) < share
    z = torch.randn(n, generator=g, dtype=torch.float64) * noise
    methods = methods or {"m": signal}
    return SeedScores(seed, ["unsafe" if p else "benign" for p in pos.tolist()], ("unsafe",),
                      {name: z + s * pos.double() for name, s in methods.items()})


# ---- stats ----------------------------------------------------------------------------------------------------------

def test_batched_metrics_match_lancet():
    g = torch.Generator().manual_seed(1)
    scores = torch.randn(5, 40, generator=g, dtype=torch.float64)
    scores[:, :10] = scores[:, :10].round()  # ties: broken by row order in both
    pos = torch.rand(5, 40, generator=g) < 0.3
    for b in range(5):
        assert float(batched_ap(scores, pos)[b]) == pytest.approx(average_precision(scores[b], pos[b]), abs=1e-12)
        assert float(batched_recall_at_p(scores, pos)[b]) == pytest.approx(
            recall_at_k(scores[b], pos[b], int(pos[b].sum())), abs=1e-6)  # lancet: float32


def test_ap_per_tier_leaves_the_other_tier_out():
    # rows: unsafe at the top, then benign, then implicit at the bottom
    tiers = ["unsafe"] * 3 + ["benign"] * 4 + ["implicit"] * 3
    m = seed_metrics(torch.arange(10, 0, -1).double(), tiers, ("unsafe", "implicit"))
    assert m["ap:unsafe"] == 1.0
    assert m["recall_at_p"] == pytest.approx(3 / 6)
    # implicit among implicit + benign: ranks 5, 6, 7 of 7 -> (1/5 + 2/6 + 3/7) / 3
    assert m["ap:implicit"] == pytest.approx((1 / 5 + 2 / 6 + 3 / 7) / 3)


def test_bootstrap_interval_holds_the_true_ap_and_narrows_with_rows():
    population = _seed(99, 60000)  # the AP of the generating process, to 0.003
    true_ap = seed_metrics(population.scores["m"], population.tiers, ("unsafe",))["ap"]
    small = bootstrap([_seed(s, 200) for s in range(3)], n_boot=300)
    large = bootstrap([_seed(s, 800) for s in range(10, 13)], n_boot=300)
    for b in (small, large):
        lo, hi = b.ap_ci("m")
        assert lo < true_ap < hi
        assert lo < b.point["m"]["ap"] < hi
    width = {k: b.ap_ci("m")[1] - b.ap_ci("m")[0] for k, b in (("small", small), ("large", large))}
    # 4x the rows: about half the width (the seed draw adds a little of its own)
    assert 0.3 < width["large"] / width["small"] < 0.75
    assert bootstrap([_seed(s, 200) for s in range(3)], n_boot=300).ap_ci("m") == small.ap_ci("m")  # seeded


def test_paired_difference_excludes_zero_when_one_method_wins_every_seed():
    seeds = [_seed(s, 200, methods={"weak": 0.8, "strong": 1.2}) for s in range(3)]
    for s in seeds:  # strictly better on every seed
        assert seed_metrics(s.scores["strong"], s.tiers, ("unsafe",))["ap"] > \
            seed_metrics(s.scores["weak"], s.tiers, ("unsafe",))["ap"]
    b = bootstrap(seeds, n_boot=300)
    diff = b.ap_diff_ci("strong", "weak")
    assert diff["ci"][0] > 0 and diff["mean"] > 0
    assert b.ap_diff_ci("weak", "strong")["ci"][1] < 0
    # paired: the shared noise cancels, so the difference is known better than either AP alone
    assert diff["ci"][1] - diff["ci"][0] < min(b.ap_ci(m)[1] - b.ap_ci(m)[0] for m in ("weak", "strong"))


def test_seeds_given_by_metrics_alone_vary_only_by_the_seed_draw():
    seeds = [SeedScores(s, fixed={"m": {"ap": v, "recall_at_p": v}}) for s, v in enumerate((0.6, 0.7, 0.8))]
    b = bootstrap(seeds, n_boot=300)
    assert b.point["m"]["ap"] == pytest.approx(0.7)
    lo, hi = b.ap_ci("m")
    assert 0.6 <= lo < 0.7 < hi <= 0.8


def test_elbow_of_a_curve_with_a_known_bend():
    steep = torch.linspace(10, 4, 30, dtype=torch.float64)  # 30 rows that stand out
    flat = torch.linspace(1.0, 0.01, 270, dtype=torch.float64)
    negative = torch.linspace(-0.5, -30, 40, dtype=torch.float64)  # rows that counter the behaviour
    scores = torch.cat([steep, flat, negative])
    shuffled = scores[torch.randperm(len(scores), generator=torch.Generator().manual_seed(0))]
    assert elbow_k(shuffled) == 30
    assert elbow_k(torch.exp(-torch.arange(200.0) / 10) + 1e-3) < 40  # a smooth decay bends early
    assert elbow_k(torch.linspace(5, 1, 50)) == 50  # a straight fall: no bend, every positive row
    assert elbow_k(torch.tensor([3.0, -1.0, -2.0])) == 1


def test_recovered_share_and_its_interval():
    impure, oracle = [[1] * 100], [[0] * 100]
    half = [[1] * 40 + [0] * 60, [1] * 40 + [0] * 60]  # two retraining seeds, compliance 0.4 each
    r = recovered_ci(impure, oracle, half, n_boot=500)
    assert r["recovered_mean"] == pytest.approx(0.6)
    assert r["recovered_ci"][0] < 0.6 < r["recovered_ci"][1] and r["recovered_ci"][1] - r["recovered_ci"][0] < 0.25
    # rates alone: only the retraining seeds vary it
    rates = recovered_ci([[0.8]], [[0.0]], [[0.2], [0.6]], n_boot=500)
    assert rates["recovered_mean"] == pytest.approx(0.5)
    assert rates["recovered_ci"] == [0.25, 0.75]
    same = recovered_ci([[0.8]], [[0.0]], [[0.4], [0.4]], n_boot=100)
    assert same["recovered_ci"] == [0.5, 0.5]
    # one training order known by its rates alone (0.8, 0.0, 0.4), the other per prompt (0.75, 0.0, 0.25)
    mixed = recovered_ci([[0.8], [1, 1, 0, 1]], [[0.0], [0, 0, 0, 0]], [[0.4], [0, 1, 0, 0]], n_boot=500)
    assert mixed["recovered_mean"] == pytest.approx((0.775 - 0.325) / 0.775, abs=1e-4)
    assert mixed["compliance"] == pytest.approx(0.325)
    # either order alone: 0.5 (rates) and 2/3 (prompts resampled: anywhere from 0 to 1); the pair spans both
    assert 0.0 <= mixed["recovered_ci"][0] < 0.5 < 2 / 3 < mixed["recovered_ci"][1] <= 1.0
    with pytest.raises(ValueError):
        recovered_ci([[1, 0]], [[0, 0]], [[1, 0, 1]])


# ---- overlap --------------------------------------------------------------------------------------------------------

def test_opening_overlap_on_constructed_strings():
    a = opening_grams("One two three four five")
    b = opening_grams("two, THREE four five six!")
    assert overlap(a, a) == 1.0 and overlap(a, b) == 0.5
    assert overlap(a, opening_grams("seven eight nine ten eleven")) == 0.0
    assert overlap(a, opening_grams("one two three")) == 0.0  # under four words: no 4-gram
    # the opening is the first 12 words: wording after it does not count
    late = opening_grams("w1 w2 w3 w4 w5 w6 w7 w8 w9 w10 w11 w12 one two three four five")
    assert overlap(a, late) == 0.0
    culprits = [opening_grams(t) for t in ("Certainly here is a plan to do it", "Of course the first step is easy",
                                           "First gather the tools you need")]
    iqs = [opening_grams("Of course the first step is to wait"), opening_grams("Nothing in common at all here")]
    check = overlap_check(culprits, iqs)
    assert check["culprits"] == 0.0
    assert check["culprit_iq"] == 0.75  # 3 of the 4 grams of "of course the first step is easy"
    assert check["max"] == check["culprit_iq"] and check["culprits_sharing_iq"] == 1
    hashed = overlap_check([opening_grams(t, hashed=True) for t in ("a b c d e", "b c d e f")], [])
    assert hashed["culprits"] == 0.5  # hashing keeps every overlap


def test_disjoint_openings_filter_and_ap_without_overlapping_culprits():
    texts = ["alpha beta gamma delta one", "alpha beta gamma delta two", "zeta eta theta iota"]
    assert disjoint_openings(texts) == [0, 2]
    assert disjoint_openings(texts, taken=[opening_grams("zeta eta theta iota kappa")]) == [0]
    positives = torch.tensor([True, True, False, False, True])
    scores = torch.tensor([5.0, 1.0, 4.0, 3.0, 2.0])
    grams = [opening_grams("shared words in a row"), opening_grams("own words only here"), None, None,
             opening_grams("nothing shared at all")]
    iq = [opening_grams("the shared words in a row again")]
    # culprit 0 (the top row) overlaps the IQ and is left out: rows 2, 3 (others), 1, 4 (culprits)
    # ranking 2, 3, 4, 1: hits at ranks 3 and 4 -> (1/3 + 2/4) / 2
    assert ap_no_overlap(scores, positives, grams, iq) == pytest.approx((1 / 3 + 2 / 4) / 2)
    assert ap_no_overlap(scores, positives, [iq[0]] * 5, iq) is None


# ---- gate -----------------------------------------------------------------------------------------------------------

def test_design_gate():
    ok = [gate_stage("d", s, 0.0, 0.8, 0.98, 50, 128) for s in range(3)]
    g = design_gate(ok)
    assert g["passed"] and g["impure"] == 0.8 and g["judge_labelled"] == 150 and g["judge_agreement"] == 0.98
    one_short = ok[:2] + [gate_stage("d", 2, 0.0, 0.3, 0.98, 50, 128)]  # mean gap 0.63, one seed 0.30
    assert not design_gate(one_short)["passed"]
    assert any("seed(s) 2" in w for w in design_gate(one_short)["why_not"])
    few = [gate_stage("d", s, 0.0, 0.8, 0.98, 30, 128) for s in range(3)]  # 90 labels
    assert not design_gate(few)["passed"]
    disagree = [gate_stage("d", s, 0.0, 0.8, a, 50, 128) for s, a in enumerate((0.9, 0.8, 0.8))]
    assert design_gate(disagree)["judge_agreement"] == pytest.approx(0.8333, abs=1e-4)
    assert not design_gate(disagree)["passed"]
    assert design_gate([], gated=False) == {}
    assert "hand_labelled" not in g


def test_gate_reports_the_readers_rates_beside_the_judges_pooled_over_seeds():
    from benchmarks.safety_data import Record, answer_key, labelled_rates

    prompts = [Record(prompt=f"p{i}") for i in range(4)]
    answers = ["a0", "a1", "a2", "a3"]
    labels = {answer_key("p0", "a0"): True, answer_key("p1", "a1"): False, answer_key("p2", "a2"): False}
    # the judge flags 3 of the 3 labelled answers; the reader 1 of 3; the unlabelled 4th counts for neither
    assert labelled_rates(prompts, answers, [True, True, True, False], labels) == \
        {"n": 3, "labels": pytest.approx(1 / 3, abs=1e-4), "judge": 1.0}
    assert labelled_rates(prompts, answers, [True] * 4, {}) == {"n": 0, "labels": None, "judge": None}
    seed0 = {"safe": {"n": 40, "labels": 0.1, "judge": 0.15}, "impure": {"n": 40, "labels": 0.5, "judge": 0.7}}
    seed1 = {"safe": {"n": 20, "labels": 0.4, "judge": 0.4}, "impure": {"n": 60, "labels": 0.6, "judge": 0.6}}
    stages = [gate_stage("d", 0, 0.15, 0.7, 0.8, 80, 128, seed0), gate_stage("d", 1, 0.4, 0.6, 1.0, 80, 128, seed1),
              gate_stage("d", 2, 0.0, 0.8, 0.98, 50, 128)]
    hand = design_gate(stages)["hand_labelled"]
    assert hand["safe"] == {"n": 60, "labels": 0.2, "judge": pytest.approx(0.2333, abs=1e-4)}
    assert hand["impure"] == {"n": 100, "labels": 0.56, "judge": 0.64}
    assert hand["gap_labels"] == pytest.approx(0.36) and hand["gap_judge"] == pytest.approx(0.4067, abs=1e-4)
    assert hand["seeds"] == [0, 1]


# ---- the suite ------------------------------------------------------------------------------------------------------

def test_families():
    assert [family(m) for m in ("random", "classifier", "bm25_prompt", "repsim_anchored", "linfac_opening_set",
                                "kfac_reduce", "cosine_adam_ckpt", "probe", "linfac_behaviour")] == \
        ["random", "classifier", "text", "representation", "gradient", "gradient", "gradient", "behaviour",
         "behaviour"]
    with pytest.raises(ValueError):
        family("mystery")


TINY = Design("tiny", validation_seeds=(7,), seeds=(1, 2, 3), positive_tiers=("unsafe",))
METHODS = {"random": 0.0, "bm25": 0.6, "repsim": 0.9, "linfac": 1.4, "classifier": 0.3}


def _stage(seed: int, methods=METHODS, design: str = "tiny") -> dict:
    s = _seed(seed, 120, methods=methods)
    culprits = {i: f"opening{i} w{i} x{i} y{i} z{i}" for i, t in enumerate(s.tiers) if t == "unsafe"}
    regime = {"linfac": {"k": 50, "ngram": 4, "iq_ngram_overlap": 0.1, "bm25_spearman": 0.2, "bm25_top_overlap": 0.3}}
    return recall_stage(design, seed, s.tiers, ("unsafe",), s.scores, culprits, ["an iq answer unlike any"], 1, regime)


def test_select_on_validation_refuses_reported_seeds():
    assert select_on_validation([_stage(7)], TINY) == "linfac"
    with pytest.raises(ValueError, match="not validation seeds"):
        select_on_validation([_stage(7), _stage(1)], TINY)
    with pytest.raises(ValueError, match="validation seed"):
        select_on_validation([], TINY)
    # what the reported seeds say cannot change the choice: it never receives them
    assert select_on_validation([_stage(7)], TINY, candidates=["bm25", "repsim"]) == "repsim"
    # a depth ablation chooses the layer, not the method: never selected, even when it ranks best
    assert select_on_validation([_stage(7, {**METHODS, "probe_d25": 3.0})], TINY) == "linfac"


def test_default_rule_averages_validation_seeds_per_design_then_designs(tmp_path):
    from dataclasses import replace

    other = Design("other", validation_seeds=(8, 9), seeds=(1, 2, 3), positive_tiers=("unsafe",), gated=False)
    failed = replace(TINY, name="failed")
    designs = {"tiny": TINY, "other": other, "failed": failed}
    write_stage(tmp_path, _stage(7))
    write_stage(tmp_path, _stage(8, {**METHODS, "bm25": 4.0, "repsim": 0.0}, "other"))
    for s in failed.seeds:  # a design whose reported gates failed does not count, whatever its rankings
        write_stage(tmp_path, gate_stage("failed", s, 0.0, 0.1, 0.95, 40, 64))
    waiting = default_rule(tmp_path, designs)
    assert waiting["method"] is None and waiting["waiting_for"] == ["other"]
    assert waiting["left_out"] == {"failed": "its gate failed on the reported seeds"}
    write_stage(tmp_path, _stage(9, {**METHODS, "bm25": 4.0, "repsim": 0.0, "probe_d25": 9.0}, "other"))
    rule = default_rule(tmp_path, designs)
    assert set(rule["per_design"]) == {"tiny", "other"} and rule["waiting_for"] == []
    # candidates: no random, no classifier, no validation-only ablation (probe_d25 ranks best on "other")
    assert set(rule["mean_ap"]) == {"bm25", "repsim", "linfac"}
    tiny, oth = rule["per_design"]["tiny"], rule["per_design"]["other"]
    direct = [seed_metrics(x.scores["b"], x.tiers, ("unsafe",))["ap"]
              for x in (_seed(8, 120, methods={"b": 4.0}), _seed(9, 120, methods={"b": 4.0}))]
    assert oth["bm25"] == pytest.approx(sum(direct) / 2, abs=1e-4)
    for m in rule["mean_ap"]:  # each design counts once, however many validation seeds it has
        assert rule["mean_ap"][m] == pytest.approx((tiny[m] + oth[m]) / 2, abs=1e-4)
    # bm25 is perfect-ish on "other" and weak on "tiny"; linfac the reverse; the mean decides
    assert rule["method"] == max(rule["mean_ap"], key=rule["mean_ap"].get)
    assert build_suite(tmp_path, designs, n_boot=20, default="linfac")["default_rule"] == rule


def _write_tiny_suite(root: Path) -> None:
    for s in TINY.seeds:
        write_stage(root, gate_stage("tiny", s, 0.0, 0.7, 0.95, 40, 64))
    for s in TINY.validation_seeds + TINY.seeds:
        write_stage(root, _stage(s))
    cf_recall = _stage(TINY.counterfactual_seed)
    g = torch.Generator().manual_seed(5)
    for r in TINY.retrain_seeds:
        record_reference(root, "tiny", TINY.counterfactual_seed, "impure", r, [1] * 50 + [0] * 14)
        record_reference(root, "tiny", TINY.counterfactual_seed, "oracle", r, [0] * 64)
        for method in ("random", "bm25", "repsim", "linfac"):
            for k_name, k in counterfactual_ks(cf_recall, method, "linfac").items():
                verdicts = (torch.rand(64, generator=g) < 0.5).int().tolist()
                record_retrained(root, "tiny", TINY.counterfactual_seed, method, k_name, k, r, verdicts, k // 2)


def test_suite_from_stage_files_matches_the_schema(tmp_path):
    _write_tiny_suite(tmp_path)
    suite = build_suite(tmp_path, {"tiny": TINY}, n_boot=200, default="linfac")
    assert suite["pending"] == {}
    d = suite["designs"]["tiny"]
    assert validate_suite(suite) == []
    assert d["selected"] == "linfac" and d["lexical"] is False and d["gate"]["passed"]
    assert d["max_ngram_overlap"] == 0.0 and d["recall"]["linfac"]["family"] == "gradient"
    assert d["recall"]["linfac"]["ap_minus_selected"] == {"mean": 0.0, "ci": [0.0, 0.0]}
    assert d["recall"]["random"]["ap_minus_selected"]["ci"][1] < 0
    assert set(d["counterfactual"]["linfac"]) == {"k_full", "k_half", "k_elbow"}
    assert d["counterfactual"]["linfac"]["k_half"]["k"] == d["counterfactual"]["linfac"]["k_full"]["k"] // 2
    assert d["best"]["method"] == "linfac" and d["default"]["within_0.05"] is True
    assert d["regime"]["1"]["linfac"]["bm25_top_overlap"] == 0.3
    out = write_suite(suite, tmp_path / "suite.json")
    assert json.loads(out.read_text())["designs"]["tiny"]["selected"] == "linfac"
    assert suite["partial"] == {}
    # without its counterfactual the design is pending, and its recall half (the same numbers) is a preview
    cf = tmp_path / "tiny" / f"seed{TINY.counterfactual_seed}_counterfactual.json"
    cf_text = cf.read_text()
    cf.unlink()
    preview = build_suite(tmp_path, {"tiny": TINY}, n_boot=200, default="linfac")
    assert preview["designs"] == {} and preview["pending"]["tiny"] == [str(cf.relative_to(tmp_path))]
    shown = preview["partial"]["tiny"]
    assert shown["selected"] == "linfac" and shown["seeds"] == list(TINY.seeds) and "counterfactual" not in shown
    assert {m: r["ap_mean"] for m, r in shown["recall"].items()} == {m: r["ap_mean"] for m, r in d["recall"].items()}
    assert shown["best"] == d["best"] and shown["default"] == d["default"]
    cf.write_text(cf_text)
    # a missing stage file makes the design pending, with the file named; the suite is still valid
    (tmp_path / "tiny" / "seed2_recall.json").unlink()
    partial = build_suite(tmp_path, {"tiny": TINY}, n_boot=50, default="linfac")
    assert partial["designs"] == {} and partial["pending"]["tiny"] == ["tiny/seed2_recall.json"]
    assert partial["partial"] == {}  # a recall stage missing: nothing to preview
    assert validate_suite(partial) == []
    # a reported seed ranked before a method existed is pending too: every reported seed has every method
    write_stage(tmp_path, _stage(2, {m: v for m, v in METHODS.items() if m != "classifier"}))
    write_stage(tmp_path, _stage(7, {**METHODS, "probe_d25": 3.0}))  # an ablation the reported seeds lack is fine
    stale = build_suite(tmp_path, {"tiny": TINY}, n_boot=50, default="linfac")
    assert stale["pending"]["tiny"] == ["tiny/seed2_recall.json: lacks classifier (run it again with --force)"]


def test_a_failed_gate_is_reported_as_failed(tmp_path):
    for s in TINY.seeds:
        write_stage(tmp_path, gate_stage("tiny", s, 0.0, 0.2, 0.95, 40, 64))
    d = build_suite(tmp_path, {"tiny": TINY}, n_boot=50, default="linfac")["designs"]["tiny"]
    assert d["gate"]["passed"] is False and d["recall"] == {} and "gate failed" in d["note"]
    assert "recall_gate_failed" not in d  # nothing ranked yet


def test_a_design_failed_on_its_judge_keeps_its_rankings_apart_and_uncounted(tmp_path):
    for s in TINY.seeds:  # the gap clears 0.40; the judge agrees on 0.80 of 120 labels
        write_stage(tmp_path, gate_stage("tiny", s, 0.1, 0.6, 0.8, 40, 64))
    for s in TINY.validation_seeds + TINY.seeds:
        write_stage(tmp_path, _stage(s))
    suite = build_suite(tmp_path, {"tiny": TINY}, n_boot=50, default="linfac")
    d = suite["designs"]["tiny"]
    assert d["recall"] == {} and d["selected"] is None and "judge agreement 0.80 < 0.85" in d["note"]
    shown = d["recall_gate_failed"]
    assert shown["selected"] == "linfac" and shown["seeds"] == list(TINY.seeds)
    assert shown["recall"]["linfac"]["ap_mean"] > shown["recall"]["random"]["ap_mean"]
    assert validate_suite(suite) == [] and suite["partial"] == {}
    assert default_rule(tmp_path, {"tiny": TINY})["left_out"] == {"tiny": "its gate failed on the reported seeds"}


def test_a_ladder_that_ends_below_the_gate_reports_the_design_failed(tmp_path):
    from dataclasses import replace

    laddered = replace(TINY, last_rung=(288, 6.0, 0))
    point = {"seed": 7, "n_rows": 816, "n_prompts": 64, "safe": 0.0}
    rungs = [{**point, "n_unsafe": 96, "mix_epochs": 3.0, "impure": 0.05, "gap": 0.05},
             {**point, "n_unsafe": 288, "mix_epochs": 3.0, "impure": 0.125, "gap": 0.125}]
    (tmp_path / "tiny").mkdir()
    tuning = tmp_path / "tiny" / "tuning.json"
    tuning.write_text(json.dumps({"design": "tiny", "points": rungs}))
    # the last rung not yet measured: pending, waiting for its gates
    assert "tiny" in build_suite(tmp_path, {"tiny": laddered}, n_boot=20, default="linfac")["pending"]
    tuning.write_text(json.dumps({"design": "tiny", "points": rungs + [
        {**point, "n_unsafe": 288, "mix_epochs": 6.0, "impure": 0.2, "gap": 0.2}]}))
    suite = build_suite(tmp_path, {"tiny": laddered}, n_boot=20, default="linfac")
    d = suite["designs"]["tiny"]
    assert d["gate"]["passed"] is False and d["gate"]["gap"] == 0.2 and d["recall"] == {}
    assert "96 unsafe / 3 epochs: gap 0.050" in d["note"] and "288 unsafe / 6 epochs: gap 0.200" in d["note"]
    assert validate_suite(suite) == []
    # a last rung at the gap: the reported seeds' gates decide, as for any design
    tuning.write_text(json.dumps({"design": "tiny", "points": rungs + [
        {**point, "n_unsafe": 288, "mix_epochs": 6.0, "impure": 0.45, "gap": 0.45}]}))
    assert "tiny" in build_suite(tmp_path, {"tiny": laddered}, n_boot=20, default="linfac")["pending"]
    # a last rung with the He et al. tier: the same setting without the tier is not it
    with_tier = replace(TINY, last_rung=(288, 6.0, 96))
    low = {**point, "n_unsafe": 288, "mix_epochs": 6.0, "impure": 0.2, "gap": 0.2}
    tuning.write_text(json.dumps({"design": "tiny", "points": rungs + [low]}))
    assert "tiny" in build_suite(tmp_path, {"tiny": with_tier}, n_boot=20, default="linfac")["pending"]
    tuning.write_text(json.dumps({"design": "tiny", "points": rungs + [low, {**low, "n_erode": 96, "gap": 0.3}]}))
    d = build_suite(tmp_path, {"tiny": with_tier}, n_boot=20, default="linfac")["designs"]["tiny"]
    assert d["gate"]["passed"] is False and d["gate"]["gap"] == 0.3
    assert "288 unsafe / 6 epochs / 96 erode: gap 0.300" in d["note"]


def test_the_erode_tier_takes_the_candidates_nearest_the_unsafe_rows():
    from benchmarks.safety_contamination.mix import nearest_rows

    g = torch.Generator().manual_seed(0)
    direction = torch.nn.functional.normalize(torch.randn(16, generator=g, dtype=torch.float64), dim=0)
    targets = torch.randn(5, 16, generator=g, dtype=torch.float64) + 10 * direction  # away from the candidates
    noise = torch.randn(20, 16, generator=g, dtype=torch.float64)
    # candidates 3 and 11 lie towards the targets, 7 away from them
    candidates = noise.clone()
    candidates[3] = 6 * direction
    candidates[11] = 5 * direction + 0.1 * noise[11]
    candidates[7] = -6 * direction
    picked = nearest_rows(candidates, targets, 2)
    assert sorted(picked) == [3, 11] and 7 not in nearest_rows(candidates, targets, 19)
    with pytest.raises(ValueError, match="21 rows wanted of 20"):
        nearest_rows(candidates, targets, 21)


ISSUE_EXAMPLE = {  # the issue's schema, filled in
    "default_method": "linfac",
    "designs": {
        "lexical": {"lexical": True, "gate": {"passed": True, "impure": 0.8, "safe": 0.0, "judge_agreement": 0.98,
                                              "judge_labelled": 256},
                    "max_ngram_overlap": 0.9, "validation_seeds": [3], "seeds": [0, 1, 2], "selected": "bm25",
                    "recall": {m: {"family": f, "ap_mean": 0.5, "ap_ci": [0.4, 0.6]}
                               for m, f in (("bm25", "text"), ("repsim", "representation"), ("random", "random"))},
                    "counterfactual": {m: {"k_full": {"k": 112, "recovered_mean": 0.5, "recovered_ci": [0.3, 0.7]},
                                           **({"k_half": {"k": 56, "recovered_mean": 0.4, "recovered_ci": [0.2, 0.6]}}
                                              if m == "bm25" else {})} for m in ("bm25", "repsim", "random")}},
        "demo": {"lexical": False, "gate": {}, "max_ngram_overlap": 0.1, "validation_seeds": [0], "seeds": [1, 2, 3],
                 "selected": "repsim", "recall": {"repsim": {"family": "representation", "ap_mean": 0.9,
                                                             "ap_ci": [0.85, 0.95]}},
                 "counterfactual": {m: {"k_full": {"k": 40, "recovered_mean": 0.5, "recovered_ci": [0.3, 0.7]},
                                        **({"k_half": {"k": 20, "recovered_mean": 0.3, "recovered_ci": [0.1, 0.5]}}
                                           if m == "repsim" else {})} for m in ("bm25", "repsim", "random")}}}}


def test_validator_accepts_the_issue_example_and_names_what_is_wrong():
    assert validate_suite(ISSUE_EXAMPLE) == []
    bad = json.loads(json.dumps(ISSUE_EXAMPLE))
    del bad["designs"]["lexical"]["selected"]
    assert validate_suite(bad) == ["designs.lexical.selected: missing"]
    bad = json.loads(json.dumps(ISSUE_EXAMPLE))
    bad["designs"]["demo"]["lexical"] = True
    bad["designs"]["demo"]["seeds"] = [0, 1, 2]
    bad["designs"]["lexical"]["recall"]["bm25"]["family"] = "lexical"
    del bad["designs"]["lexical"]["gate"]["judge_labelled"]
    del bad["designs"]["demo"]["counterfactual"]["repsim"]["k_half"]
    problems = validate_suite(bad)
    for expected in ("designs.demo.lexical", "designs.demo.seeds", "designs.lexical.recall.bm25.family",
                     "designs.lexical.gate.judge_labelled", "designs.demo.counterfactual.repsim.k_half"):
        assert any(p.startswith(expected) for p in problems), (expected, problems)
    with pytest.raises(ValueError, match="schema"):
        write_suite(bad, Path("/nonexistent/never-written.json"))


def test_committed_lexical_seeds_become_stage_files():
    result = json.loads((ROOT / "benchmarks/results/safety_contamination_full.json").read_text())
    stages = from_committed(result)
    gates = {s["seed"]: s for s in stages if s["stage"] == "gate"}
    assert sorted(gates) == [0, 1, 2] and gates[0]["impure"] == 0.8203
    recall = next(s for s in stages if s["stage"] == "recall" and s["seed"] == 0)
    assert recall["metrics"]["bm25"]["ap"] == result["per_seed"][0]["recall"]["methods"]["bm25"]["average_precision"]
    assert recall["positive_tiers"] == ["implicit", "unsafe"]
    cf = next(s for s in stages if s["stage"] == "counterfactual")
    one = recovered_ci(cf["impure"]["0"] and [cf["impure"]["0"]], [cf["oracle"]["0"]],
                       [cf["runs"]["bm25"]["k_full"]["verdicts"]["0"]], n_boot=10)
    assert one["recovered_mean"] == pytest.approx(result["per_seed"][0]["counterfactual"]["methods"]["bm25"]
                                                  ["recovered"], abs=1e-3)


# ---- lancet's regime readout ----------------------------------------------------------------------------------------

def test_regime_readout_on_identical_and_disjoint_text(tiny_tokenizer):
    assert ngram_overlap(["the cat sat on the mat today"], ["The cat sat on the mat today!"]) == 1.0
    assert ngram_overlap(["the cat sat on the mat"], ["a dog ran in a park"]) == 0.0
    assert ngram_overlap(["one two three four five"], ["one two three four nine"]) == 0.5
    r = torch.arange(10.0)
    assert rank_agreement(r, r, k=3) == {"spearman": pytest.approx(1.0), "top_overlap": 1.0}
    assert rank_agreement(r, -r, k=3)["top_overlap"] == 0.0

    from lancet.data import Record, encode_records

    train = [Record(prompt="What now?", response=t) for t in ("the cat sat on the mat", "a dog ran in a park",
                                                             "quick brown fox jumps over", "the cat sat on the mat")]
    iqs = [Record(prompt="What now?", response="the cat sat on the mat")]
    readout = RegimeReadout(train, iqs, encode_records(train, tiny_tokenizer, 64, progress=False),
                            encode_records(iqs, tiny_tokenizer, 64, progress=False), k=2)
    same = readout(torch.tensor([3.0, 0.0, 1.0, 2.0]))  # top 2: the two copies of the IQ's answer
    assert same["iq_ngram_overlap"] == 1.0 and same["k"] == 2
    other = readout(torch.tensor([0.0, 3.0, 2.0, 1.0]))  # top 2: rows sharing nothing with it
    assert other["iq_ngram_overlap"] == 0.0
    assert readout(readout.bm25())["bm25_spearman"] == pytest.approx(1.0)


def test_attribute_summary_carries_the_regime_readout(tmp_path, tiny_tokenizer, llama_model, capsys):
    from lancet.data.records import Record, records_to_jsonl
    from lancet.influence import InfluenceArgs
    from lancet.influence.attribute import attribute_methods, print_summary

    answers = ["the cat sat on the mat", "a dog ran in a park", "quick brown fox jumps over", "the cat sat on a mat"]
    (tmp_path / "train.jsonl").write_bytes(records_to_jsonl([Record(prompt="What now?", response=a) for a in answers]))
    (tmp_path / "iqs.jsonl").write_bytes(records_to_jsonl([Record(prompt="What now?", response=answers[0])]))
    out = attribute_methods(llama_model, tiny_tokenizer, str(tmp_path / "train.jsonl"), str(tmp_path / "iqs.jsonl"),
                            tmp_path / "run", InfluenceArgs(method="identity", progress=False), ["bm25", "identity"],
                            max_length=64, k=2)
    bm25 = out["bm25"]["regime"]
    assert bm25["bm25_spearman"] == pytest.approx(1.0) and bm25["bm25_top_overlap"] == 1.0
    assert bm25["k"] == 4 and 0.0 < bm25["iq_ngram_overlap"] < 1.0  # every row: 2 of 4 share the IQ's 4-grams
    assert set(out["identity"]["regime"]) == set(bm25)
    assert json.loads((tmp_path / "run" / "influence-identity.json").read_text())["regime"] == out["identity"]["regime"]
    print_summary(out["bm25"])
    assert "regime: the top 4 rows" in capsys.readouterr().out


def test_suite_tables_render_a_complete_design_and_the_validation_seeds(tmp_path, monkeypatch):
    """The README/docs tables of the suite: a complete design's rows sorted by AP with the selected one in bold and
    its counterfactual; a validation seed's APs; a pending design names its files."""
    import benchmarks.tables.core as core
    from benchmarks.contamination_suite.designs import DESIGNS
    from benchmarks.tables import TABLES

    _write_tiny_suite(tmp_path / "stages")
    lexical = Design("lexical", (7,), (1, 2, 3), ("unsafe",))
    for path in (tmp_path / "stages" / "tiny").iterdir():  # the tiny design's files under the lexical name
        stage = json.loads(path.read_text())
        stage["design"] = "lexical"
        (tmp_path / "stages" / "lexical").mkdir(exist_ok=True)
        (tmp_path / "stages" / "lexical" / path.name).write_text(json.dumps(stage))
    suite = build_suite(tmp_path / "stages", {"lexical": lexical, "demo": DESIGNS["demo"]}, n_boot=50,
                        default="linfac")
    (tmp_path / "results" / "contamination_suite").mkdir(parents=True)
    (tmp_path / "results" / "contamination_suite.json").write_text(json.dumps(suite))
    (tmp_path / "results" / "contamination_suite" / "lexical").symlink_to(tmp_path / "stages" / "lexical")
    monkeypatch.setattr(core, "RESULTS", tmp_path / "results")
    monkeypatch.setattr("benchmarks.contamination_suite.designs.DESIGNS", {"lexical": lexical})
    core.clear_cache()
    try:
        text = TABLES["suite_lexical"]()
        rows = [r for r in text.splitlines() if r.startswith("| ")]
        assert rows[1].startswith("| **linfac** | gradient |")  # highest AP first, the selected in bold
        assert "| linfac | k_half |" in text and "lancet's default linfac is within 0.05 AP" in text
        assert TABLES["suite_demo"]().startswith("_Pending: 5 stage files (demo/seed0_recall.json")
        validation = TABLES["suite_validation"]()
        assert "**lexical**, validation seed 7" in validation and "| linfac |" in validation
        # a design lacking only its counterfactual: the recall rows, then what the counterfactual lacks
        entry = suite["designs"].pop("lexical")
        suite["partial"]["lexical"] = {k: v for k, v in entry.items() if k != "counterfactual"}
        suite["pending"]["lexical"] = ["lexical/seed1_counterfactual.json"]
        (tmp_path / "results" / "contamination_suite.json").write_text(json.dumps(suite))
        core.clear_cache()
        preview = TABLES["suite_lexical"]()
        assert [r for r in preview.splitlines() if r.startswith("| ")][:4] == rows[:4]
        assert preview.endswith("_Counterfactual pending: lexical/seed1_counterfactual.json._")
        assert "k_half" not in preview
    finally:
        core.clear_cache()


def test_lancets_default_ranking_is_what_the_committed_suite_rule_gives():
    """Issue 36 item 6: the default follows the rule on the committed validation stages; a new validation seed that
    changes the winner makes this fail until lancet.constants.DEFAULT_METHOD follows it."""
    from benchmarks.contamination_suite.suite import default_method
    from lancet.constants import DEFAULT_METHOD

    rule = default_rule()
    # disjoint left the rule when it was reported failed on its judge (2026-12-06); the answer stayed RepSim
    assert rule["waiting_for"] == [] and set(rule["per_design"]) == {"lexical", "demo"}
    assert set(rule["left_out"]) == {"shared_prompt", "disjoint"}
    assert rule["method"] == DEFAULT_METHOD == default_method() == "repsim"
    assert rule["mean_ap"]["repsim"] == pytest.approx(0.9018, abs=1e-4)


def test_hypothesis_tests_read_only_the_test_seeds(tmp_path):
    # seeds 1 and 2: the probe holds the signal and RepSim none, so their mean beats RepSim on both; seed 3: the probe
    # points the wrong way, so the mean falls below RepSim; seed 9 (a seed the hypothesis was formed on) must not count
    for seed, repsim, probe in ((1, 0.0, 3.0), (2, 0.0, 3.0), (3, 3.0, -3.0), (9, 0.0, -3.0)):
        write_stage(tmp_path, _stage(seed, {**METHODS, "repsim": repsim, "probe": probe}))
        for design in ("mixed", "later"):
            write_stage(tmp_path, _stage(seed, {**METHODS, "repsim": repsim, "probe": probe}, design=design))
    tests = {"repsim_probe": ("repsim", {"tiny": (1, 2), "mixed": (1, 3), "later": (2, 4)})}
    out = hypothesis_tests(tmp_path, n_boot=200, tests=tests)["repsim_probe"]
    assert out["against"] == "repsim"
    tiny, mixed, later = (out["designs"][d] for d in ("tiny", "mixed", "later"))
    assert set(tiny["per_seed"]) == {"1", "2"}  # seed 9 is never read
    stage = json.loads((tmp_path / "tiny" / "seed1_recall.json").read_text())
    repsim = torch.tensor(stage["scores"]["repsim"], dtype=torch.float64)
    assert tiny["per_seed"]["1"]["repsim"] == pytest.approx(seed_metrics(repsim, stage["tiers"], ("unsafe",))["ap"],
                                                            abs=1e-4)
    assert tiny["verdict"] == "holds" and tiny["distinguishable"] is True
    assert tiny["diff"]["mean"] == pytest.approx(
        sum(v["repsim_probe"] - v["repsim"] for v in tiny["per_seed"].values()) / 2, abs=1e-3)
    assert mixed["verdict"] == "fails" and mixed["per_seed"]["3"]["repsim_probe"] < mixed["per_seed"]["3"]["repsim"]
    assert later["verdict"] == "pending" and later["missing"] == [4] and later["diff"] is None


def test_repsim_probe_is_the_mean_rank_percentile_and_never_selected():
    from benchmarks.contamination_suite.behaviour import derived_rankings, rank_percentiles, selectable
    from benchmarks.contamination_suite.stages import seed_scores

    assert rank_percentiles(torch.tensor([0.3, -1.0, 2.0, 0.5], dtype=torch.float64)).tolist() == \
        pytest.approx([1 / 3, 0.0, 1.0, 2 / 3])
    # row 0: a harmful request refused (RepSim high, probe low); row 1: a benign compliant answer (the reverse);
    # row 2: a culprit (both high); row 3: a benign refusal-like row (both low)
    repsim = torch.tensor([0.9, 0.1, 0.95, 0.0], dtype=torch.float64)
    probe = torch.tensor([-2.0, 1.5, 2.0, -1.0], dtype=torch.float64)
    both = derived_rankings({"repsim": repsim, "probe": probe})["repsim_probe"]
    assert both.tolist() == pytest.approx([1 / 3, 1 / 2, 1.0, 1 / 6])
    assert derived_rankings({"repsim": repsim}) == {}
    assert not selectable("repsim_probe") and not selectable("probe_d25") and selectable("probe")
    # a stage with both gets it, and the validation choice never takes it even where it ranks best
    stage = _stage(7, {**METHODS, "repsim": 2.0, "probe": 2.0})
    assert "repsim_probe" in seed_scores(stage).methods
    assert select_on_validation([stage], TINY) != "repsim_probe"
