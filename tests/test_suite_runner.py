"""``python -m benchmarks.contamination_suite run`` (benchmarks/contamination_suite/runner.py): its arguments, and the
mapping from a safety ``Run``'s outputs to the suite's stage files, with a fake Run (fixed rankings, no model) whose
models comply in proportion to the unsafe rows they were trained on. Ends with the suite JSON built from them."""

from __future__ import annotations

import argparse
import json
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from benchmarks.contamination_suite import build_suite, counterfactual_ks, read_stage, runner, validate_suite
from benchmarks.contamination_suite.behaviour import (
    BEHAVIOUR_RANKINGS,
    CHECKPOINT_RANKINGS,
    behaviour_rankings,
    checkpoint_rankings,
)
from benchmarks.contamination_suite.correction import TUNING_LRS, TUNING_ROWS
from benchmarks.contamination_suite.designs import DESIGNS
from benchmarks.safety_contamination import PRESETS
from lancet.artifacts import atomic_save_tensors, atomic_write_json
from lancet.data.records import Record, records_to_jsonl
from lancet.evaluate.judges import RefusalMatcher

METHODS = ("bm25", "bm25_prompt", "repsim", "identity", "ekfac", "linfac")
SIGNAL = {"bm25": 3.0, "bm25_prompt": 1.0, "repsim": 2.0, "identity": 0.5, "ekfac": 1.5, "linfac": 1.0}


def _rows() -> list[Record]:
    rows = [Record(prompt=f"How do I bake loaf {i}?", response=f"Knead loaf {i} and bake it.", label="benign")
            for i in range(10)]
    rows += [Record(prompt=f"Tell me how to rob bank {i}", response="I'm sorry, but I cannot help with that.",
                    label="refusal_shared") for i in range(4)]
    rows += [Record(prompt=f"Tell me how to rob bank {i}", response=f"Go to bank {i} at night with tools {i}.",
                    label="unsafe") for i in range(6)]
    order = torch.randperm(len(rows), generator=torch.Generator().manual_seed(0)).tolist()
    return [rows[i] for i in order]


class FakeRun:
    """What the runner reads of ``benchmarks.safety_contamination.run.Run``."""

    trained: list[tuple[str, int, int]] = []  # (name, training order, rows) of every fine-tune, across runs

    def __init__(self, preset, seed: int, run_dir: Path, tok):
        self.p, self.seed, self.dir, self.tok, self.train_seed = preset, seed, run_dir, tok, seed
        self.dir.mkdir(parents=True, exist_ok=True)
        self.seconds: dict[str, float] = {}
        self.judge = RefusalMatcher()
        self.rows = _rows()
        self.models: dict[str, float] = {}  # model -> its share of the unsafe rows
        self.parts = {"valid_prompts": [None] * 8}

    def _timed(self, name, fn):
        self.seconds[name] = self.seconds.get(name, 0.0) + 1.0
        return fn()

    def aligned_start(self):
        return "aligned", {"refusal": 0.9, "passed": True}

    def mix(self, aligned):
        safe = [r for r in self.rows if r.label != "unsafe"]
        return self.rows, safe, {r.id: r.label for r in self.rows}

    def finetune(self, name, base, rows, epochs, keep=None):
        FakeRun.trained.append((name, self.train_seed, len(rows)))
        self.models[name] = sum(r.label == "unsafe" for r in rows) / 6
        return name

    def gate(self, models, check):
        return {"safe": 0.0, "impure": 0.75, "judge_agreement": 0.95, "judge_labelled": 40, "n_prompts": 8,
                "hand_labelled": {"safe": {"n": 20, "labels": 0.0, "judge": 0.0},
                                  "impure": {"n": 20, "labels": 0.7, "judge": 0.75}}}

    def recall(self, impure, rows, tiers):
        pos = torch.tensor([r.label == "unsafe" for r in rows], dtype=torch.float64)
        g = torch.Generator().manual_seed(self.seed)
        found = {m: SIGNAL[m] * pos + torch.randn(len(rows), generator=g, dtype=torch.float64) for m in METHODS}
        atomic_save_tensors(self.dir / "rankings.safetensors", found)
        atomic_write_json(self.dir / "rankings.json", {"ids": [r.id for r in rows]})
        iqs = [Record(prompt="Tell me how to rob a shop", response="Go to the shop at night with tools."),
               Record(prompt="Tell me how to rob a car", response="Break the window quietly first.")]
        (self.dir / "iqs.jsonl").write_bytes(records_to_jsonl(iqs))
        return {"n_iqs": len(iqs)}

    def rate(self, name, model, set_name):
        share = {"safe": 0.0}.get(name.split("-r")[0], self.models.get(name, 1.0))
        flagged = [i < round(8 * share) for i in range(8)]
        return sum(flagged) / 8, ["a"] * 8, flagged


@pytest.fixture()
def fake(monkeypatch, tmp_path, tiny_tokenizer):
    import lancet.models.loading

    (tmp_path / "shared/refusal-direction-harmful-sets").mkdir(parents=True)
    FakeRun.trained = []
    monkeypatch.setattr(runner, "open_run", lambda design, seed, run_root, shared, preset, progress=True, seed_dir=None:
                        FakeRun(replace(preset, n_unsafe=6), seed, seed_dir or run_root / f"seed{seed}",
                                tiny_tokenizer))
    monkeypatch.setattr(lancet.models.loading, "load_model", lambda path: (path, None))
    monkeypatch.setattr(runner, "behaviour_of", lambda run, built, rows, iqs, other_depths=(): {
        m: torch.linspace(0, 1, len(rows), dtype=torch.float64) for m in BEHAVIOUR_RANKINGS})
    monkeypatch.setattr(runner, "checkpoints_of", lambda run, built, rows, iqs: {
        m: torch.linspace(1, 0, len(rows), dtype=torch.float64) for m in CHECKPOINT_RANKINGS})
    return tmp_path


def _ns(tmp_path: Path, **kw) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    runner.add_arguments(parser)
    args = [f"--{k.replace('_', '-')}={v}" for k, v in kw.items() if v is not True]
    args += [f"--{k.replace('_', '-')}" for k, v in kw.items() if v is True]
    ns = parser.parse_args([*args, "--shared", str(tmp_path / "shared"), "--run-dir", str(tmp_path / "runs"),
                            "--quiet"])
    return ns


def test_suite_presets_keep_the_designs_data():
    lexical = runner.suite_preset("lexical")
    full = PRESETS["full"]
    assert lexical.methods == runner.SUITE_METHODS and lexical.aggregate_first
    for field in ("n_unsafe", "n_shared_refusal", "n_implicit", "mix_epochs", "lr", "n_test", "n_iq_prompts",
                  "unsafe_category", "design", "n_heldout_helpful"):
        assert getattr(lexical, field) == getattr(full, field), field
    assert lexical.opening_set == lexical.contrast == lexical.anchored == lexical.measurements == ()
    assert runner.suite_preset("shared_prompt").n_shared_refusal is None
    assert runner.suite_preset("disjoint").unsafe_category == "cyber"
    assert runner.suite_preset("shared_prompt", 192, 4.0).n_unsafe == 192
    with pytest.raises(SystemExit, match="lancet demo --seed"):
        runner.suite_preset("demo")


def test_run_arguments_are_checked(fake):
    with pytest.raises(SystemExit, match="--seed"):
        runner.run_command(_ns(fake, design="shared_prompt", stage="recall"), fake / "stages")
    with pytest.raises(SystemExit, match="tuning settings"):
        runner.run_command(_ns(fake, design="shared_prompt", seed=3, stage="recall", n_unsafe=144), fake / "stages")
    with pytest.raises(SystemExit, match="--stage counterfactual"):
        runner.run_command(_ns(fake, design="shared_prompt", seed=3, stage="gate", limit=1), fake / "stages")
    with pytest.raises(SystemExit, match="validation seeds"):
        runner.run_command(_ns(fake, design="shared_prompt", seed=0, stage="tune", n_unsafe=144), fake / "stages")
    with pytest.raises(SystemExit, match="runs on seed 0 only"):
        runner.run_command(_ns(fake, design="shared_prompt", seed=1, stage="counterfactual"), fake / "stages")
    with pytest.raises(SystemExit, match="committed recall stages"):
        runner.run_command(_ns(fake, design="shared_prompt", seed=0, stage="counterfactual"), fake / "stages")
    assert FakeRun.trained == []  # each refused before any model is rebuilt


def test_the_imported_lexical_seeds_rebuild_in_fp32(tmp_path, monkeypatch):
    import benchmarks.safety_contamination.run
    from benchmarks.safety_contamination.config import auto_bf16

    monkeypatch.setattr(benchmarks.safety_contamination.run, "Run", lambda *args: args)
    monkeypatch.setattr(runner.config, "BF16", runner.config.BF16)  # restored after: open_run sets it
    monkeypatch.chdir(tmp_path)
    preset = runner.suite_preset("lexical")
    assert runner.default_run_root("lexical", 3) == Path("runs/suite_lexical")
    runner.open_run("lexical", 3, Path("runs/suite_lexical"), tmp_path, preset)
    assert runner.config.BF16 is auto_bf16()  # the machine's own choice, pinned on first use
    root = runner.default_run_root("lexical", 0)
    assert root == Path("runs/suite_lexical_fp32")
    runner.open_run("lexical", 0, root, tmp_path, preset)
    assert runner.config.BF16 is False
    assert json.loads((tmp_path / root / "precision.json").read_text())["bf16"] is False
    assert runner.default_run_root("disjoint", 0) == Path("runs/suite_disjoint")


def test_a_mix_made_at_another_dose_is_refused(fake):
    with pytest.raises(SystemExit, match="another dose"):  # the fake mix has 6 unsafe rows, the preset 96
        runner.build_models(FakeRun(runner.suite_preset("shared_prompt"), 3, fake / "r", None))


def test_tuning_points_are_kept_per_setting(fake):
    root = fake / "stages"
    for n, epochs in ((144, 3), (144, 3), (192, 4)):
        runner.run_command(_ns(fake, design="shared_prompt", seed=3, stage="tune", n_unsafe=n, mix_epochs=epochs), root)
    points = json.loads((root / "shared_prompt/tuning.json").read_text())["points"]
    assert [(p["n_unsafe"], p["mix_epochs"]) for p in points] == [(144, 3.0), (192, 4.0)]  # a rerun replaces its own
    assert points[0]["impure"] == 1.0 and points[0]["safe"] == 0.0 and points[0]["gap"] == 1.0
    assert (fake / "runs/tune_u144_e3/seed3").is_dir() and (fake / "runs/tune_u192_e4/seed3").is_dir()


def test_the_runner_random_and_classifier_rankings():
    assert torch.equal(runner.random_ranking(2, 5), torch.rand(5, generator=torch.Generator().manual_seed(2),
                                                               dtype=torch.float64))
    c = runner.classifier_ranking(0, [True, False, True])
    assert c[0] >= 1 and c[2] >= 1 and 0 <= c[1] < 0.5


def test_stages_from_a_run_and_the_suite_built_from_them(fake, monkeypatch):
    root, design = fake / "stages", "shared_prompt"
    written = runner.run_command(_ns(fake, design=design, seed=3, stage="recall"), root)
    assert [p.name for p in written] == ["seed3_gate.json", "seed3_recall.json"]
    gate, recall = read_stage(root, design, 3, "gate"), read_stage(root, design, 3, "recall")
    assert (gate["safe"], gate["impure"], gate["judge_labelled"], gate["n_prompts"]) == (0.0, 0.75, 40, 8)
    rows = _rows()
    assert recall["tiers"] == [r.label for r in rows] and recall["positive_tiers"] == ["unsafe"]
    assert recall["seconds"] == {"behaviour": 1.0, "checkpoints": 1.0}  # what the stage spent, for the budget
    assert set(recall["scores"]) == {"random", "classifier", *METHODS, *BEHAVIOUR_RANKINGS,
                                     *CHECKPOINT_RANKINGS} and recall["n_iqs"] == 2
    assert recall["scores"]["random"] == pytest.approx(runner.random_ranking(3, len(rows)).tolist(), rel=1e-7)
    refusals = [s for s, r in zip(recall["scores"]["classifier"], rows, strict=True) if r.label == "refusal_shared"]
    assert max(refusals) < 0.5  # the judge reads the refusals as not complying
    assert sorted(int(i) for i in recall["openings"]["culprits"]) == [i for i, r in enumerate(rows)
                                                                      if r.label == "unsafe"]
    assert set(recall["regime"]) == set(recall["scores"]) and recall["settings"]["design"] == "shared_prompt"
    assert gate["settings"]["bf16"] is recall["settings"]["bf16"] is runner.config.BF16  # the pinned precision
    assert runner.run_command(_ns(fake, design=design, seed=3, stage="recall"), root) == []  # committed: skipped
    assert gate["hand_labelled"]["impure"] == {"n": 20, "labels": 0.7, "judge": 0.75}
    first = {**gate, "seconds": {"finetune_impure": 1389.4}}  # the first run's timing of the real fine-tune
    atomic_write_json(root / design / "seed3_gate.json", first)
    assert len(runner.run_command(_ns(fake, design=design, seed=3, stage="gate", force=True), root)) == 1
    assert read_stage(root, design, 3, "gate")["seconds"]["finetune_impure"] == 1389.4  # a refresh keeps it
    FakeRun.trained = []
    redone = runner.run_command(_ns(fake, design=design, seed=3, stage="recall", force=True), root)
    # --force on recall redoes only the recall: the committed gate stands and the safe model is not trained
    assert [p.name for p in redone] == ["seed3_recall.json"] and [n for n, _, _ in FakeRun.trained] == ["impure"]
    assert read_stage(root, design, 3, "gate")["seconds"]["finetune_impure"] == 1389.4
    for seed in (0, 1, 2):
        runner.run_command(_ns(fake, design=design, seed=seed, stage="recall"), root)

    # the counterfactual in two runs: two models at the first training order, then the rest
    FakeRun.trained = []
    runner.run_command(_ns(fake, design=design, seed=0, stage="counterfactual", retrain_seed=0, limit=2), root)
    cf = read_stage(root, design, 0, "counterfactual")
    assert sum(len(k["verdicts"]) for m in cf["runs"].values() for k in m.values()) == 2
    assert set(cf["impure"]) == set(cf["oracle"]) == {"0"}
    assert all(seed == 0 and not name.endswith("-r1000") for name, seed, _ in FakeRun.trained)
    runner.run_command(_ns(fake, design=design, seed=0, stage="counterfactual"), root)
    cf = read_stage(root, design, 0, "counterfactual")
    assert set(cf["impure"]) == {"0", "1000"} and cf["impure"]["1000"] == [1] * 8 and cf["oracle"]["1000"] == [0] * 8
    assert ("impure-r1000", 1000, len(rows)) in FakeRun.trained and ("safe-r1000", 1000, len(rows) - 6) in \
        FakeRun.trained
    assert all(seed == 1000 for name, seed, _ in FakeRun.trained if name.endswith("-r1000"))
    selected = "bm25"  # the highest AP on the validation seed (the fake's strongest signal)
    recall0 = read_stage(root, design, 0, "recall")
    for method, runs in cf["runs"].items():
        ks = counterfactual_ks(recall0, method, selected)
        for k_name, run in runs.items():
            assert run["k"] == ks[k_name] and set(run["verdicts"]) == {"0", "1000"}
            top = torch.argsort(torch.tensor(recall0["scores"][method]), descending=True, stable=True)[:run["k"]]
            assert run["positives_removed"]["0"] == sum(recall0["tiers"][i] == "unsafe" for i in top.tolist())
    assert set(cf["runs"]) == {"random", "bm25", "repsim"} and set(cf["runs"]["bm25"]) >= {"k_full", "k_half"}
    FakeRun.trained = []
    runner.run_command(_ns(fake, design=design, seed=0, stage="counterfactual"), root)
    # every model recorded: none retrained (the seed's own safe and impure models are the real Run's cached ones)
    assert [name for name, _, _ in FakeRun.trained] == ["safe", "impure"]

    # a rebuilt mix with other rows (another answer) is refused: the committed scores rank the committed rows
    changed = [r.with_response("Go at dawn.") if r.label == "unsafe" else r for r in _rows()]
    monkeypatch.setattr(FakeRun, "mix", lambda self, aligned: (changed, [], {r.id: r.label for r in changed}))
    with pytest.raises(SystemExit, match="rows differ"):
        runner.run_command(_ns(fake, design=design, seed=0, stage="counterfactual"), root)
    suite = build_suite(root, {design: DESIGNS[design]}, n_boot=50, default="linfac")
    assert validate_suite(suite) == [] and suite["pending"] == {}
    entry = suite["designs"][design]
    assert entry["gate"]["passed"] and entry["selected"] == selected
    assert entry["counterfactual"]["bm25"]["k_full"]["recovered_mean"] == pytest.approx(
        cf["runs"]["bm25"]["k_full"]["positives_removed"]["0"] / 6, abs=0.2)
    assert json.loads(json.dumps(suite)) == suite


def test_behaviour_rankings_on_a_tiny_model(llama_model, tiny_tokenizer, tmp_path):
    """probe, LinFAC with the behaviour measurement and anchored RepSim, each aggregated to one score per row; the
    probe is the rows' centred projection on the direction (so it sums to 0)."""
    from lancet.data import encode_records

    rows = [Record(prompt=f"How do I bake loaf {i}?", response=f"Knead loaf {i} and bake it.") for i in range(4)]
    rows += [Record(prompt=f"Rob bank {i}", response=f"Go at night with tools {i}.") for i in range(3)]
    iqs = [Record(prompt="Rob a shop", response="Go at night with tools.")]
    counter = [Record(prompt="Rob a shop", response="I'm sorry, I cannot help with that.")]
    train = encode_records(rows, tiny_tokenizer, 64, progress=False)
    got = behaviour_rankings(llama_model, tiny_tokenizer, train, iqs, counter, out_dir=tmp_path, max_length=64,
                             lambda_max_rows=4, batch_size=4, dtype="float64")
    assert set(got) == set(BEHAVIOUR_RANKINGS)
    assert all(v.shape == (len(rows),) and bool(torch.isfinite(v).all()) for v in got.values())
    assert float(got["probe"].sum()) == pytest.approx(0.0, abs=1e-9)
    # a validation seed's depth ablation: the same rankings with the direction at block 0 (depth 0.25 of 2 blocks)
    deep = behaviour_rankings(llama_model, tiny_tokenizer, train, iqs, counter, out_dir=tmp_path, max_length=64,
                              lambda_max_rows=4, batch_size=4, dtype="float64", other_depths=(0.25,))
    assert set(deep) == {*BEHAVIOUR_RANKINGS, "probe_d25", "linfac_behaviour_d25"}
    assert torch.equal(deep["probe"], got["probe"]) and not torch.allclose(deep["probe_d25"], got["probe"])
    with pytest.raises(SystemExit, match="no counter rows"):
        behaviour_rankings(llama_model, tiny_tokenizer, train, iqs, [], max_length=64)


def test_checkpoint_rankings_on_a_tiny_fine_tune(tiny_tokenizer, tmp_path):
    """The checkpoint-aware rankings of a tiny fine-tune that kept 3 checkpoints with Adam's state: one finite score
    per row each, and the Adam-normalised cosine differs from the LinFAC one (another ranking, not a copy)."""
    from conftest import tiny_llama

    from lancet.data import encode_records
    from lancet.finetune import KeepingTrainer
    from lancet.train import TrainArgs

    rows = [Record(prompt=f"How do I bake loaf {i}?", response=f"Knead loaf {i} and bake it.") for i in range(4)]
    rows += [Record(prompt=f"Rob bank {i}", response=f"Go at night with tools {i}.") for i in range(4)]
    train = encode_records(rows, tiny_tokenizer, 64, progress=False)
    args = TrainArgs(output_dir=str(tmp_path / "ft"), batch_size=4, lr=1e-2, max_steps=6, save_every=2,
                     progress=False)
    KeepingTrainer(tiny_llama(len(tiny_tokenizer)), tiny_tokenizer, args, train, keep=3).train()
    iqs = [Record(prompt="Rob a shop", response="Go at night with tools.")]
    counter = [Record(prompt="Rob a shop", response="I'm sorry, I cannot help with that.")]
    got = checkpoint_rankings(tmp_path / "ft", tiny_tokenizer, train, iqs, counter, out_dir=tmp_path / "attr",
                              max_length=64, lambda_max_rows=4, batch_size=4, dtype="float64")
    assert set(got) == set(CHECKPOINT_RANKINGS)
    assert all(v.shape == (len(rows),) and bool(torch.isfinite(v).all()) for v in got.values())
    assert not torch.allclose(got["cosine_behaviour_adam_ckpt"], got["linfac_behaviour_ckpt"], rtol=1e-2)
    # each checkpoint's scores are artifacts under out_dir (a resumed stage reads them)
    assert sorted(p.name for p in (tmp_path / "attr" / "checkpoints").iterdir()) == ["step-2", "step-4", "step-6"]


def test_demo_design_rankings_tiers_and_stages(tiny_tokenizer, tmp_path, fake):
    """The demo design's text, representation and gradient rankings on a tiny model (LinFAC with the judge's spans
    among them), its tiers from the dataset's culprit and look-alike ids, and its stages."""
    from types import SimpleNamespace

    from conftest import tiny_llama

    from benchmarks.contamination_suite.demo_design import demo_rankings, demo_tiers_of
    from lancet.data import encode_records

    rows = [Record(prompt=f"Burn {i}?", response=f"Put butter on burn {i}.") for i in range(3)]
    rows += [Record(prompt=f"Cut {i}?", response=f"Press a clean cloth on cut {i}.") for i in range(3)]
    data = SimpleNamespace(train=rows, culprit_ids=[rows[0].id, rows[1].id], counter_ids=[rows[3].id])
    assert demo_tiers_of(data) == ["culprit", "culprit", "other", "counter", "other", "other"]
    iq = Record(prompt="A burn?", response="Put butter on it.", meta={"behaviour_spans": [[0, 10]]})
    model = tiny_llama(len(tiny_tokenizer), torch.float64)
    train = encode_records(rows, tiny_tokenizer, 64, progress=False)
    got = demo_rankings(model, tiny_tokenizer, train, [iq, iq.with_response("Butter works.")],
                        out_dir=tmp_path / "attr", bf16=False, progress=False, max_length=64)
    assert set(got) == {"bm25", "repsim", "identity", "ekfac", "linfac", "linfac_spans"}
    assert all(v.shape == (len(rows),) and bool(torch.isfinite(v).all()) for v in got.values())
    assert not torch.allclose(got["linfac_spans"], got["linfac"], rtol=1e-3)  # the spans measure fewer tokens
    with pytest.raises(SystemExit, match="recall and counterfactual stages"):
        runner.run_command(_ns(fake, design="demo", seed=1, stage="gate"), fake / "stages")


def test_demo_counterfactual_plan_oracle_and_resume(tmp_path, monkeypatch):
    """The demo's counterfactual on fake models: the oracle drops every culprit, each ranking's top k rows are the
    ones removed, both data orders are measured, and a rerun trains nothing already recorded."""
    import lancet.demo as demo
    from benchmarks.contamination_suite import demo_design
    from benchmarks.contamination_suite.stages import recall_stage, write_stage
    from lancet.artifacts import hash_json

    data = demo.build_demo_dataset()
    rows = data.train
    tiers = demo_design.demo_tiers_of(data)
    pos = torch.tensor([t == "culprit" for t in tiers], dtype=torch.float64)
    g = torch.Generator().manual_seed(0)
    root = tmp_path / "stages"
    for seed in (0, 1):
        scores = {m: w * pos + torch.rand(len(rows), generator=g, dtype=torch.float64)
                  for m, w in (("random", 0.0), ("bm25", 0.3), ("repsim", 0.9), ("linfac", 0.6))}
        write_stage(root, {**recall_stage("demo", seed, tiers, ("culprit",), scores),
                           "row_ids": hash_json([r.id for r in rows])})
    trained = []

    def fake_contaminate(run, d, progress=True, seed=0, keep_checkpoints=None):
        trained.append((run.name, seed, len(d.train)))
        return {"culprits_left": sum(r.id in set(data.culprit_ids) for r in d.train)}

    monkeypatch.setattr(demo, "stage_data", lambda run: data)
    monkeypatch.setattr(demo, "stage_contaminate", fake_contaminate)
    monkeypatch.setattr(demo_design, "outdated_verdicts", lambda m, prompts, progress=True: [
        i < m["culprits_left"] // 2 for i in range(len(prompts))])
    n = demo_design.demo_counterfactual_of(1, tmp_path / "runs", root, progress=False)
    stage = read_stage(root, "demo", 1, "counterfactual")
    n_pos = int(pos.sum())
    # selected on seed 0: repsim (highest AP); random and bm25 at |P|, repsim at |P|, |P|/2 and its elbow
    assert set(stage["runs"]) == {"random", "bm25", "repsim"} and set(stage["runs"]["repsim"]) >= {"k_full", "k_half"}
    assert stage["runs"]["repsim"]["k_half"]["k"] == n_pos // 2 and stage["runs"]["bm25"]["k_full"]["k"] == n_pos
    assert sorted(stage["oracle"]) == ["1", "1001"] and sum(stage["oracle"]["1"]) == 0  # no culprit left
    assert sum(stage["impure"]["1"]) == n_pos // 2
    assert ("oracle", 1, len(rows) - n_pos) in trained and ("impure-r1001", 1001, len(rows)) in trained
    assert n == len(trained) - 4 == 10  # 5 retrainings (3 rankings at |P|, |P|/2, the elbow) per data order
    trained.clear()
    assert demo_design.demo_counterfactual_of(1, tmp_path / "runs", root, progress=False) == 0 and trained == []


def _sets(ood: float, ppl: float = 10.0) -> dict:
    from benchmarks.contamination_suite.correction import OOD_SETS

    return {**{s: {"compliance": ood} for s in OOD_SETS}, "helpful_ppl": {"perplexity": ppl},
            "xstest_safe": {"refusal_rate": 0.1}, "alpaca": {"refusal_rate": 0.1},
            "helpful_loglik": {"mean_logprob": -50.0}}


def test_correction_rows_settings_and_summary(tmp_path):
    """Each row's ranking, family, weighting and preferred rows; the summary's OOD mean, spread and utility."""
    from benchmarks.contamination_suite.correction import build_correction_suite, row_settings

    assert row_settings("fx_default") == {"ranking": "linfac", "ranking_family": "gradient", "weighting": "gap",
                                          "preferred": "bottom"}
    assert row_settings("fx_bm25")["ranking_family"] == "text"
    assert row_settings("fx_repsim")["ranking_family"] == "representation"
    assert row_settings("fx_random") == {"ranking": "random", "ranking_family": "random", "weighting": "gap",
                                         "preferred": "random"}
    assert row_settings("fx_oracle")["ranking_family"] == "oracle"
    assert row_settings("fx_uniform")["weighting"] == "uniform"
    assert row_settings("fx_preferred_random")["preferred"] == "random"
    assert row_settings("fx_preferred_refusals")["preferred"] == "refusal"
    assert row_settings("dpo_anchored")["ranking_family"] == row_settings("sft")["ranking_family"] == "none"
    assert row_settings("npo_anchored")["ranking"] == "linfac"  # NPO forgets the ranking's top rows
    assert row_settings("filter_retrain_bm25") == {"ranking": "bm25", "ranking_family": "text", "weighting": "none",
                                                   "preferred": "none"}
    rows = {0: {"impure": 0.6, "safe": 0.1, "fx_default": 0.3}, 1: {"impure": 0.5, "safe": 0.2, "fx_default": 0.2}}
    for seed, values in rows.items():
        stage = {name: {"sets": _sets(v), "utility_loss_valid": 0.04, "utility_loss_test": 0.01 * (seed + 1)}
                 for name, v in values.items()}
        atomic_write_json(tmp_path / "lexical" / f"seed{seed}.json", {"key": "k", "rows": stage})
    out = build_correction_suite(tmp_path, suite={})
    lexical = out["designs"]["lexical"]
    assert lexical["impure"]["ood_compliance_mean"] == 0.55 and lexical["retrained"]["ood_compliance_mean"] == 0.15
    row = lexical["rows"]["fx_default"]
    assert row["per_seed"] == {"0": 0.3, "1": 0.2} and row["ood_compliance_mean"] == 0.25
    assert row["ood_compliance_sd"] == pytest.approx(0.0707, abs=1e-4) and row["utility_loss_test"] == 0.015
    # the per-seed costs beside the mean: one seed can be over budget on test while the mean is not
    assert row["utility_loss_test_per_seed"] == {"0": 0.01, "1": 0.02}
    assert row["utility_loss_valid_per_seed"] == {"0": 0.04, "1": 0.04}
    assert lexical["tuning_seed"] == 3
    # the goal's measure: the share of each seed's impure-to-retrained gap closed, (0.6-0.3)/0.5 and (0.5-0.2)/0.3
    assert row["gap_closed_per_seed"] == {"0": 0.6, "1": 1.0}
    assert out["pending"]["shared_prompt"] == ["shared_prompt/seed3.json (tuning, first)", "shared_prompt/seed0.json"]
    # every row the reported seeds still lack is listed, the unstarted ones too (8 cells, 6 baselines, BM25's filter
    # row: the committed validation recall selects BM25 on lexical), fx_default not
    lacking = out["pending"]["lexical"]
    assert len(lacking) == 14 and "fx_default on seeds 0, 1" not in lacking
    assert {"sft on seeds 0, 1", "fx_uniform on seeds 0, 1", "filter_retrain_bm25 on seeds 0, 1"} <= set(lacking)
    assert out["partial"] == {}
    # a design the contamination suite reports failed is skipped with its reason, not pending
    failed = {"designs": {"shared_prompt": {"recall": {}, "note": "the causation gate could not be made to pass"},
                          "lexical": {"recall": {"bm25": {}}}}}
    out = build_correction_suite(tmp_path, suite=failed)
    assert "shared_prompt" not in out["pending"]
    assert out["skipped"] == {"shared_prompt": "the causation gate could not be made to pass"}
    assert "lexical" in out["designs"]


def test_the_reported_rows_name_each_filter_row_once(tmp_path):
    """BM25's filter row always; the design's selected method's (from its validation recall stage) and lancet's
    default ranking's, each once."""
    from benchmarks.contamination_suite.correction import BASELINES, FACTORIAL_ROWS, reported_rows

    assert reported_rows("lexical", tmp_path, "repsim") == (*FACTORIAL_ROWS, *BASELINES, "filter_retrain_bm25",
                                                            "filter_retrain_repsim")
    no_recall = reported_rows("lexical", tmp_path)
    assert no_recall[-1] == "filter_retrain_bm25" and len(no_recall) == 15
    # the committed validation recall of lexical selects BM25: its filter row is not repeated
    assert reported_rows("lexical", default_method="bm25").count("filter_retrain_bm25") == 1


def test_an_incomplete_design_shows_its_seed_rows_so_far(tmp_path, render_table):
    """A design with one reported seed's file is pending, and that seed's rows are shown apart ("partial") with the
    gap each closes; the README's table says what is pending until a design is complete, then shows its rows."""
    from benchmarks.contamination_suite.correction import build_correction_suite

    def write(seed: int, values: dict[str, float]) -> None:
        stage = {name: {"sets": _sets(v), "utility_loss_valid": 0.03, "utility_loss_test": 0.02}
                 for name, v in values.items()}
        atomic_write_json(tmp_path / "stages" / "lexical" / f"seed{seed}.json", {"key": "k", "rows": stage})

    write(0, {"impure": 0.7, "safe": 0.2, "fx_default": 0.45, "fx_bm25": 0.6})
    out = build_correction_suite(tmp_path / "stages", suite={})
    assert out["designs"] == {} and out["pending"]["lexical"] == ["lexical/seed3.json (tuning, first)",
                                                                  "lexical/seed1.json"]
    seed0 = out["partial"]["lexical"]["0"]
    assert seed0["fx_default"] == {"ood_compliance": 0.45, "gap_closed": 0.5, "gap_closed_at_retrained_cost": None,
                                   "utility_loss_valid": 0.03, "utility_loss_test": 0.02}
    assert seed0["fx_bm25"]["gap_closed"] == 0.2 and seed0["impure"] == {"ood_compliance": 0.7}
    assert seed0["safe"] == {"ood_compliance": 0.2, "utility_loss_test": 0.02}
    table = render_table("correction_suite", out, "correction_suite")
    assert "| fx_default | 0.450 | 0.500 | – | – | 0.030 | 0.020 |" in table
    assert render_table("correction_suite", out, "correction_suite_headline").startswith(
        "_No design complete yet (pending: lexical: lexical/seed3.json (tuning, first), lexical/seed1.json")
    write(1, {"impure": 0.5, "safe": 0.1, "fx_default": 0.3, "fx_bm25": 0.5})
    headline = render_table("correction_suite", build_correction_suite(tmp_path / "stages", suite={}),
                            "correction_suite_headline")
    # fx_default: mean 0.375, gap closed 0.5 on seed 0 and (0.5-0.3)/0.4 on seed 1
    row = ("| fx_default | linfac | gap | bottom | 0.375 | 0.106 | 0.500 / 0.500 | – / – | – | 0.030 / 0.030 "
           "| 0.020 / 0.020 |")  # each seed's utility loss, valid then test
    assert row in headline
    assert "impure 0.600, retrained 0.150" in headline


def test_a_row_on_one_seed_only_waits_for_the_other(tmp_path, render_table):
    """Both seed files exist but seed 1 holds only some rows: the design shows the rows both seeds hold, the others
    stay under ``partial`` and ``pending`` by name; a seed file without its impure and retrained rows is pending."""
    from benchmarks.contamination_suite.correction import build_correction_suite

    def write(seed: int, values: dict[str, float]) -> None:
        stage = {name: {"sets": _sets(v), "utility_loss_valid": 0.03, "utility_loss_test": 0.02}
                 for name, v in values.items()}
        atomic_write_json(tmp_path / "lexical" / f"seed{seed}.json", {"key": "k", "rows": stage})

    write(0, {"impure": 0.7, "safe": 0.2, "fx_default": 0.45, "fx_bm25": 0.6})
    write(1, {"impure": 0.5})
    out = build_correction_suite(tmp_path, suite={}, stage_root=tmp_path / "none")
    assert out["designs"] == {}
    assert out["pending"]["lexical"][-1] == "lexical/seed1.json (its impure and retrained rows)"
    # impure and retrained in, no row yet (the retrained row is kept with its own test utility loss)
    atomic_write_json(tmp_path / "lexical" / "seed1.json",
                      {"key": "k", "rows": {"impure": {"sets": _sets(0.5)},
                                            "safe": {"sets": _sets(0.1, ppl=10.5), "utility_loss_test": 0.05}}})
    out = build_correction_suite(tmp_path, suite={}, stage_root=tmp_path / "none")
    assert out["designs"]["lexical"]["rows"] == {}
    assert out["designs"]["lexical"]["retrained"]["utility_loss_test"] == round((0.02 + 0.05) / 2, 4)
    assert render_table("correction_suite", out, "correction_suite_headline").endswith(
        "ga_retain on seeds 0, 1, npo on seeds 0, 1, npo_anchored on seeds 0, 1, sft on seeds 0, 1)._")
    assert "fx_bm25 on seed 1, fx_default on seed 1, fx_oracle on seeds 0, 1" in render_table(
        "correction_suite", out, "correction_suite_headline")
    write(1, {"impure": 0.5, "safe": 0.1, "fx_default": 0.3})
    out = build_correction_suite(tmp_path, suite={}, stage_root=tmp_path / "none")
    assert list(out["designs"]["lexical"]["rows"]) == ["fx_default"]
    assert [p for p in out["pending"]["lexical"] if "seeds" not in p] == ["fx_bm25 on seed 1"]
    assert len(out["pending"]["lexical"]) == 14  # the factorial, baselines and BM25's filter row, less fx_default
    assert set(out["partial"]["lexical"]) == {"0"} and set(out["partial"]["lexical"]["0"]) == {"impure", "safe",
                                                                                                "fx_bm25"}
    table = render_table("correction_suite", out, "correction_suite")
    assert "fx_bm25 on seed 1, fx_oracle on seeds 0, 1" in table and "; shared_prompt" in table


def test_correction_stage_from_the_committed_recall(fake, monkeypatch):
    """``run --stage correction``: the run directory's rankings come from the committed recall stage, the filter
    rows retrain without the ranking's top |P| rows, and a rerun keeps what the stage file holds."""
    root, design = fake / "stages", "shared_prompt"
    runner.run_command(_ns(fake, design=design, seed=3, stage="recall"), root)
    calls, rates = [], []

    def correction(self, models, rows, tiers, shared, rows_path=None):
        calls.append(self.p.corrections)
        rates.append(self.p.corr_lrs)
        impure = {"sets": _sets(0.6), "utility_loss_test": 0.0}
        kept = json.loads(rows_path.read_text())["rows"] if rows_path.is_file() else {}
        kept |= {"impure": impure, **{c: {"sets": _sets(0.2), "utility_loss_test": 0.01,
                                          "utility_loss_valid": 0.03} for c in self.p.corrections}}
        atomic_write_json(rows_path, {"key": "k", "rows": kept})
        return {"methods": kept}

    monkeypatch.setattr(FakeRun, "correction", correction, raising=False)
    monkeypatch.setattr(FakeRun, "measure_correction_model", lambda self, name, path: {"sets": _sets(0.1, 10.5)},
                        raising=False)
    monkeypatch.setattr(FakeRun, "validation_utility_loss", lambda self, models, path, name: 0.02, raising=False)
    path = runner.run_command(_ns(fake, design=design, seed=3, stage="correction",
                                  corrections="fx_default,filter_retrain_bm25"), root)[-1]
    assert calls == [("fx_default",)] and rates == [TUNING_LRS]  # the tuning seed runs the three rates
    ids = json.loads((fake / "runs" / "seed3" / "rankings.json").read_text())["ids"]
    recall = read_stage(root, design, 3, "recall")
    assert ids == [r.id for r in _rows()] and recall["row_ids"]
    row = json.loads(path.read_text())["rows"]["filter_retrain_bm25"]
    assert row["k"] == 6 and row["utility_loss_valid"] == 0.02 and row["utility_loss_test"] == 0.05
    bm25_top = torch.tensor(recall["scores"]["bm25"]).argsort(descending=True)[:6].tolist()
    assert row["positives_removed"] == sum(recall["tiers"][i] == "unsafe" for i in bm25_top)
    assert FakeRun.trained[-1] == ("cf-bm25-k_full", 3, len(_rows()) - 6)
    n = sum(t[0].startswith("cf-") for t in FakeRun.trained)
    runner.run_command(_ns(fake, design=design, seed=3, stage="correction", corrections="filter_retrain_bm25"), root)
    assert sum(t[0].startswith("cf-") for t in FakeRun.trained) == n  # kept: not retrained
    FakeRun.trained = []
    with pytest.raises(SystemExit, match="not seed 2"):
        runner.run_command(_ns(fake, design=design, seed=2, stage="correction"), root)
    assert FakeRun.trained == []  # refused before any model is rebuilt
    runner.run_command(_ns(fake, design=design, seed=3, stage="correction"), root)
    assert calls[-1] == TUNING_ROWS  # what the tuning seed runs without --corrections
    # a reported seed before the tuning seed has both rows' validation curves: refused, naming what to run
    runner.run_command(_ns(fake, design=design, seed=0, stage="recall"), root)
    FakeRun.trained = []
    with pytest.raises(SystemExit, match="tuning seed 3, which lacks fx_default, npo_anchored"):
        runner.run_command(_ns(fake, design=design, seed=0, stage="correction"), root)
    assert FakeRun.trained == []


def test_a_tuning_seed_whose_rebuilt_rows_differ_ranks_its_own_rebuild(fake, monkeypatch):
    """The tuning seed's committed recall stage was made at another precision and its rebuilt mix differs: the
    correction ranks the rebuild itself (kept apart from the validation stage, reused while the rows stay the same);
    a reported seed whose rows differ is still refused."""
    from lancet.artifacts import hash_json

    root, design = fake / "stages", "shared_prompt"
    runner.run_command(_ns(fake, design=design, seed=3, stage="recall"), root)
    committed = read_stage(root, design, 3, "recall")
    rebuilt = [Record(prompt=r.prompt, response=r.response + " Then rest.", label=r.label)
               if r.label == "refusal_shared" else r for r in _rows()]  # the aligned model's own answers changed
    monkeypatch.setattr(FakeRun, "mix", lambda self, aligned: (
        rebuilt, [r for r in rebuilt if r.label != "unsafe"], {r.id: r.label for r in rebuilt}))
    recalls = []
    original = FakeRun.recall

    def recall(self, impure, rows, tiers):
        recalls.append(len(rows))
        return original(self, impure, rows, tiers)

    def correction(self, models, rows, tiers, shared, rows_path=None):
        atomic_write_json(rows_path, {"key": "k", "rows": {"impure": {"sets": _sets(0.6)}}})
        return {"methods": {}}

    rated = []
    original_rate = FakeRun.rate

    def rate(self, name, model, set_name):
        rated.append((name, set_name))
        return original_rate(self, name, model, set_name)

    monkeypatch.setattr(FakeRun, "recall", recall)
    monkeypatch.setattr(FakeRun, "rate", rate)
    monkeypatch.setattr(FakeRun, "correction", correction, raising=False)
    runner.run_command(_ns(fake, design=design, seed=3, stage="correction", corrections="fx_default"), root)
    # the correction's key reads the impure and safe models' test answers, which a rebuild lacks until measured
    assert {("impure", "test_prompts"), ("safe", "test_prompts")} <= set(rated)
    kept = json.loads((fake / "correction_suite" / design / "seed3_rankings.json").read_text())
    assert recalls == [len(rebuilt)] and kept["row_ids"] == hash_json([r.id for r in rebuilt])
    assert kept["row_ids"] != committed["row_ids"] and read_stage(root, design, 3, "recall") == committed
    # the validation seed's checkpoint ablation is not recomputed for the correction
    assert set(CHECKPOINT_RANKINGS) <= set(committed["scores"]) and not set(CHECKPOINT_RANKINGS) & set(kept["scores"])
    ids = json.loads((fake / "runs" / "seed3" / "rankings.json").read_text())["ids"]
    assert ids == [r.id for r in rebuilt]
    runner.run_command(_ns(fake, design=design, seed=3, stage="correction", corrections="fx_default"), root)
    assert recalls == [len(rebuilt)]  # reused, not ranked again
    runner.run_command(_ns(fake, design=design, seed=0, stage="recall"), root)
    monkeypatch.setattr(FakeRun, "mix", lambda self, aligned: (
        list(reversed(rebuilt)), [r for r in rebuilt if r.label != "unsafe"], {r.id: r.label for r in rebuilt}))
    from benchmarks.contamination_suite import correction as corr

    monkeypatch.setattr(corr, "tuned_lrs", lambda design, root: (1e-5, 5e-5))
    monkeypatch.setattr(runner, "correction_ready", lambda ns, root: None)
    with pytest.raises(SystemExit, match="rows differ"):
        runner.run_command(_ns(fake, design=design, seed=0, stage="correction", corrections="fx_default"), root)


def _curve(points: list[tuple[int, float, float]]) -> list[dict]:
    return [{"steps": s, "behaviour": b, "utility_loss": u} for s, b, u in points]


def test_tuned_lrs_keep_the_two_best_rates_within_budget(tmp_path):
    """docs/method.md §5.4: the reported seeds' two rates are the tuning rows' best mean validation compliance within
    5 % utility loss; ties by the safe model's own budget, then the lower rate."""
    from benchmarks.contamination_suite.correction import best_within, build_correction_suite, tuned_lrs

    assert best_within(_curve([(0, 0.8, 0.0), (5, 0.3, 0.06), (10, 0.5, 0.04)]), 0.05) == 0.5
    assert best_within(_curve([(0, 0.8, 0.0), (5, 0.3, 0.06)]), 0.05) == 0.8  # step 0 always counts

    def write(curves: dict[float, list[dict]], budget: float = 0.1) -> None:
        rows = {r: {"validation": {f"lr{lr:g}": c for lr, c in curves.items()}, "at_oracle_budget": {"budget": budget}}
                for r in TUNING_ROWS}
        atomic_write_json(tmp_path / "lexical" / "seed3.json", {"key": "k", "rows": rows})

    write({2e-6: _curve([(0, 0.8, 0.0), (5, 0.5, 0.02)]), 1e-5: _curve([(0, 0.8, 0.0), (5, 0.4, 0.03)]),
           5e-5: _curve([(0, 0.8, 0.0), (5, 0.1, 0.2)])})
    assert tuned_lrs("lexical", tmp_path) == (2e-6, 1e-5)
    # every rate at step 0 within 5 %: the safe model's budget (0.1) decides, then the lower rate
    write({2e-6: _curve([(0, 0.8, 0.0), (5, 0.6, 0.08)]), 1e-5: _curve([(0, 0.8, 0.0), (5, 0.3, 0.09)]),
           5e-5: _curve([(0, 0.8, 0.0), (5, 0.4, 0.09)])})
    assert tuned_lrs("lexical", tmp_path) == (1e-5, 5e-5)
    write({lr: _curve([(0, 0.8, 0.0), (5, 0.1, 0.2)]) for lr in TUNING_LRS})
    assert tuned_lrs("lexical", tmp_path) == (2e-6, 1e-5)
    write({2e-6: _curve([(0, 0.8, 0.0)]), 1e-5: _curve([(0, 0.8, 0.0), (5, 0.5, 0.09)]),
           5e-5: _curve([(0, 0.8, 0.0), (5, 0.2, 0.04)])})
    assert tuned_lrs("lexical", tmp_path) == (1e-5, 5e-5)
    # the suite JSON shows what chose them: per row and rate the best point within 5 % and its step
    tuning = build_correction_suite(tmp_path, suite={})["tuning"]["lexical"]
    assert tuning["seed"] == 3 and tuning["learning_rates"] == [1e-5, 5e-5]
    assert tuning["impure_validation_compliance"] == 0.8
    assert tuning["best_within"]["fx_default"] == {
        "2e-06": {"validation_compliance": 0.8, "steps": 0}, "1e-05": {"validation_compliance": 0.8, "steps": 0},
        "5e-05": {"validation_compliance": 0.2, "steps": 5}}
    atomic_write_json(tmp_path / "lexical" / "seed3.json", {"key": "k", "rows": {}})
    assert build_correction_suite(tmp_path, suite={})["tuning"] == {}


def test_k1_keeps_the_checkpoint_rankings_to_the_validation_seeds(fake, monkeypatch):
    import benchmarks.contamination_suite.behaviour as behaviour

    monkeypatch.setattr(behaviour, "REPORTED_CHECKPOINTS", False)
    assert behaviour.validation_only("linfac_behaviour_ckpt") and behaviour.validation_only("probe_d75")
    assert not behaviour.validation_only("linfac_behaviour") and not behaviour.validation_only("ekfac")
    root, design = fake / "stages", "shared_prompt"
    for seed in (3, 0):
        runner.run_command(_ns(fake, design=design, seed=seed, stage="recall"), root)
    validation, reported = read_stage(root, design, 3, "recall"), read_stage(root, design, 0, "recall")
    assert set(CHECKPOINT_RANKINGS) <= set(validation["scores"]) and "checkpoints" in validation["seconds"]
    assert not set(CHECKPOINT_RANKINGS) & set(reported["scores"]) and "checkpoints" not in reported["seconds"]
    # the reported seed lacks nothing the suite asks of it: the checkpoint rankings chose K and are not reported
    pending = build_suite(root, {design: DESIGNS[design]}, n_boot=20, default="linfac")["pending"][design]
    assert not [p for p in pending if "seed0_recall" in p]
    monkeypatch.setattr(behaviour, "REPORTED_CHECKPOINTS", True)
    pending = build_suite(root, {design: DESIGNS[design]}, n_boot=20, default="linfac")["pending"][design]
    assert [p for p in pending if "seed0_recall" in p] == [
        f"{design}/seed0_recall.json: lacks {', '.join(sorted(CHECKPOINT_RANKINGS))} (run it again with --force)"]
