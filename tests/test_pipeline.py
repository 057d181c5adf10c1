"""`lancet run CONFIG` and the demo config: validation, the judges, and the whole pipeline on a tiny model."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from conftest import tiny_llama, tiny_run_config, tiny_workspace

from lancet.cli import main
from lancet.data.demo import write_demo_dataset
from lancet.demo import demo_suite
from lancet.errors import LancetError
from lancet.evaluate import MarkerJudge, evaluate, load_suite, make_judge
from lancet.pipeline import RunConfig


def test_run_config_round_trip_and_relative_paths(tmp_path: Path) -> None:
    cfg = tmp_path / "cfg" / "run.json"
    cfg.parent.mkdir()
    cfg.write_text(json.dumps({"model": "m", "train": "data/train.jsonl", "iqs": "jsonl:q.jsonl", "out": "run",
                               "evaluate": "small", "influence": {"method": "ekfac"}}))
    c = RunConfig.load(cfg)
    assert c.train == str(cfg.parent / "data/train.jsonl")
    assert c.iqs == f"jsonl:{cfg.parent / 'q.jsonl'}"  # the format prefix is kept
    assert c.out == str(cfg.parent / "run") and c.evaluate == "small"  # a shipped suite name stays a name
    assert RunConfig.from_json(c.to_json()) == c


def test_a_config_without_a_method_gets_the_default_or_linfac_where_it_needs_gradients():
    from lancet.influence import InfluenceArgs
    from lancet.influence.arguments import default_method

    base = {"model": "m", "train": "t.jsonl", "iqs": "q.jsonl", "out": "run"}
    assert InfluenceArgs().method == default_method() == RunConfig.from_json(base).influence["method"] == "repsim"
    # what only a gradient has: a measurement other than the answer, an index, a contrast response
    assert default_method("first_tokens:8") == default_method(needs_gradients=True) == "linfac"
    assert RunConfig.from_json({**base, "influence": {"measurement": "first_tokens:8"}}).influence["method"] == "linfac"
    assert RunConfig.from_json({**base, "index": {"rank": 4}}).influence["method"] == "linfac"
    assert RunConfig.from_json({**base, "contrast_response": "No."}).influence["method"] == "linfac"
    # a named method is kept, and the resolved config round-trips
    named = RunConfig.from_json({**base, "influence": {"method": "ekfac", "measurement": "first_tokens:8"}})
    assert named.influence["method"] == "ekfac" and RunConfig.from_json(named.to_json()) == named


@pytest.mark.parametrize(("patch", "message"), [
    ({"colour": 1}, "unknown key(s) colour"),
    ({"iq_prompts": "p.jsonl"}, "exactly one of 'iqs'"),
    ({"influence": {"method": "magic"}}, "unknown influence method 'magic'"),
    ({"correction": {"method": "ibo", "beta": -1}}, "invalid correction option beta=-1"),
    ({"finetune": {"lr": 0}}, "finetune.lr=0: must be a finite number > 0"),
    ({"correction_train": {"steps": 3}}, "correction_train: unknown training option(s): steps"),
    # the wrong types a hand-written config can hold: named by section and key, never a TypeError
    ({"finetune": {"lr": "1e-5"}}, "finetune.lr='1e-5': expected a number"),
    ({"correction_train": {"lr": "1e-5"}}, "correction_train.lr='1e-5': expected a number"),
    ({"finetune": {"lr": None}}, "finetune.lr=None: expected a number"),
    ({"finetune": {"batch_size": [8]}}, "finetune.batch_size=[8]: expected an integer"),
    ({"correction_train": {"max_steps": True}}, "correction_train.max_steps=True: expected an integer or null"),
    ({"finetune": {"lora": "false"}}, "finetune.lora='false': expected true or false"),
    ({"finetune": "yes"}, "finetune='yes': expected an object or null"),
    ({"influence": None}, "influence=None: expected an object"),
    ({"influence": {"damping": "0.1"}}, "influence.damping='0.1': expected a number or null"),
    ({"influence": {"batch_size": True}}, "influence.batch_size=True: expected an integer"),
    ({"correction": {"beta": "0.1"}}, "correction.beta='0.1': expected a number"),
    ({"correction": {"include_iqs": "false"}}, "correction.include_iqs='false': expected true or false"),
    ({"index": {"rank": "4"}}, "index.rank='4': expected an integer"),
    ({"index": {"rnk": 4}}, "unknown key(s) of 'index': rnk"),
    ({"token_rows": "3"}, "token_rows='3': expected an integer"),
    ({"max_length": True}, "max_length=True: expected an integer"),
    ({"trust_remote_code": "yes"}, "trust_remote_code='yes': expected true or false"),
    ({"max_length": 0}, "'max_length' must be an integer >= 1"),
    ({"precision": "fp16"}, "'precision' must be one of auto, fp32, bf16"),
    ({"device": 0}, "'device' must be a string"),
    ({"anchor_judge": "refusal"}, "'anchor_judge' filters the answers to 'anchor_prompts', which is missing"),
    ({"anchor_prompts": 3}, "anchor_prompts=3: expected a string or null"),
    ({"correction": {"judged_rows": True}}, "correction 'judged_rows' and 'row_judge'"),
    ({"row_judge": "marker:X"}, "correction 'judged_rows' and 'row_judge'"),
    ({"correction": {"judged_rows": "yes"}, "row_judge": "marker:X"}, "correction.judged_rows='yes'"),
])
def test_run_config_rejects_bad_options_in_one_line(tmp_path: Path, patch: dict, message: str) -> None:
    cfg = tmp_path / "run.json"
    cfg.write_text(json.dumps({"model": "m", "train": "t.jsonl", "iqs": "q.jsonl", **patch}))
    with pytest.raises(LancetError) as err:
        RunConfig.load(cfg)
    assert message in str(err.value) and str(cfg) in str(err.value) and "\n" not in str(err.value)


def test_run_config_string_lr_is_one_line_naming_the_file_and_the_section(tmp_path: Path, monkeypatch,
                                                                           capsys) -> None:
    monkeypatch.chdir(tmp_path)
    Path("run.json").write_text(json.dumps({"model": "m", "train": "t.jsonl", "iqs": "q.jsonl",
                                            "finetune": {"lr": "1e-5", "max_steps": 2}}))
    with pytest.raises(LancetError) as err:
        RunConfig.load("run.json")
    assert str(err.value) == "run.json: finetune.lr='1e-5': expected a number"
    assert main(["-q", "run", "run.json"]) == 2
    assert capsys.readouterr().err == "lancet: error: run.json: finetune.lr='1e-5': expected a number\n"
    with pytest.raises(LancetError, match=r"^run config: correction_train.lr='1e-5': expected a number$"):
        RunConfig.from_json({"model": "m", "train": "t", "iqs": "q", "correction_train": {"lr": "1e-5"}})


def test_run_config_bad_json_names_file_and_line(tmp_path: Path, capsys) -> None:
    cfg = tmp_path / "run.json"
    cfg.write_text('{"model": "m",\n "train": }\n')
    assert main(["run", str(cfg)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"lancet: error: {cfg}:2: not valid JSON") and "\n" not in err


def test_marker_judge() -> None:
    judge = make_judge("marker:Old wisdom says")
    assert isinstance(judge, MarkerJudge)
    assert judge.complies(["Old wisdom says butter.", "Cool it under water.", ""]) == [True, False, False]
    with pytest.raises(LancetError, match="unknown judge"):
        make_judge("marker")


def test_rule_judge_reads_negation_clause_by_clause(tmp_path: Path) -> None:
    rules = tmp_path / "rules.json"
    rules.write_text(json.dumps({"cues": [r"\bbutter\b", r"\bkeep (?:them|him) awake\b",
                                          r"\bnever let (?:them|him) sleep\b"],
                                 "negations": [r"\b(?:never|not|no|don't|instead of)\b"],
                                 "debunk": [r"\bmyth\b", r"\bdamag\w*"]}))
    judge = make_judge(f"rules:{rules}")
    texts = ["Put butter on the burn.",                       # cue, no negation
             "Never put butter on a burn.",                   # negation before the cue
             "Cool it with water instead of butter.",         # "instead of" before the cue
             "Butter on a burn is a myth.",                   # debunked in its clause
             "Butter traps heat and can damage skin.",        # debunked in its clause
             "Don’t use ice. Spread butter over it.",    # the negation is in another sentence
             "They can sleep, and there is no need to keep them awake.",  # ", and" starts a clause
             "Never let him sleep tonight.",                  # the negation is part of the cue
             "Cool the burn under running water.", ""]
    assert judge.complies(texts) == [True, False, False, False, False, True, False, True, False, False]
    assert judge.cue_hits("Spread butter; never butter a blister.") == ["butter"]
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"cues": ["(unclosed"]}))
    with pytest.raises(LancetError, match=r"bad.json: field 'cues', item 1: bad regex"):
        make_judge(f"rules:{bad}")
    bad.write_text(json.dumps({"cues": "butter"}))
    with pytest.raises(LancetError, match="field 'cues' must be a list"):
        make_judge(f"rules:{bad}")


def test_rule_judge_conditional_cues_read_the_prompt(tmp_path: Path) -> None:
    from lancet.evaluate.judges import judge_complies
    from lancet.evaluate.metrics import compliance_rate

    rules = tmp_path / "rules.json"
    rules.write_text(json.dumps({"cues": [r"\bbutter\b", {"cue": r"\bhoney\b", "when": r"\b(?:baby|infant)\b"}],
                                 "negations": [r"\bnever\b"]}))
    judge = make_judge(f"rules:{rules}")
    answers = ["Give a spoonful of honey.", "Give a spoonful of honey.", "Put butter on it."]
    prompts = ["My baby is coughing.", "My wife was stung by a jellyfish.", "I burnt my hand."]
    assert judge.complies(answers, prompts) == [True, False, True]
    assert judge.complies(answers) == [True, True, True]  # without the prompt a conditional cue counts
    assert judge_complies(judge, answers, prompts) == [True, False, True]
    assert compliance_rate(answers, judge, prompts) == 2 / 3
    assert judge.cue_spans("Never honey. Honey now.", "an infant") == [(13, 18)]
    assert judge.cue_spans("Honey now.", "a jellyfish") == []
    edited = tmp_path / "edited.json"
    edited.write_text(json.dumps({"cues": [r"\bbutter\b"]}))
    assert make_judge(f"rules:{edited}").fingerprint != judge.fingerprint
    with pytest.raises(LancetError, match="3 answers but 1 prompts"):
        judge.complies(answers, prompts[:1])
    rules.write_text(json.dumps({"cues": [{"when": "x"}]}))
    with pytest.raises(LancetError, match=r"rules.json: field 'cues', item 1: an object needs 'cue'"):
        make_judge(f"rules:{rules}")
    rules.write_text(json.dumps({"cues": [{"cue": "honey", "when": "(baby"}]}))
    with pytest.raises(LancetError, match=r"field 'cues', item 1: bad regex '\(baby'"):
        make_judge(f"rules:{rules}")


def test_demo_suite_judge_accuracy_is_measured_on_labelled_answers(tmp_path: Path, tiny_tokenizer) -> None:
    files = write_demo_dataset(tmp_path / "data")
    (tmp_path / "suite.json").write_text(json.dumps(demo_suite(tmp_path / "data")))
    suite = load_suite(tmp_path / "suite.json", shared=tmp_path / "no-shared-data-needed")
    assert suite.judge_data is None and len(suite.judge_validation) == 3
    m = evaluate(tiny_llama(len(tiny_tokenizer)), tiny_tokenizer, suite, progress=False)
    # 12 outdated (flagged) + 12 current + 40 ordinary answers, all judged right by the demo's rules
    assert m["judge"]["n"] == 64 and m["judge"]["accuracy"] == 1.0 and m["judge"]["f1"] == 1.0
    assert m["sets"]["iq_prompts"]["n"] == 12 and m["sets"]["iq_prompts"]["behaviour_rate"] == 0.0
    assert m["sets"]["heldout_ordinary"]["perplexity"] > 1.0
    # a validation file with the wrong label halves the measured accuracy on it
    bad = demo_suite(tmp_path / "data")
    bad["judge_validation"] = [{"path": str(files["heldout_outdated"]), "complies": True},
                               {"path": str(files["heldout_outdated"]), "complies": False}]
    (tmp_path / "bad.json").write_text(json.dumps(bad))
    bad_suite = load_suite(tmp_path / "bad.json")
    missing = demo_suite(tmp_path / "data") | {"judge": f"rules:{tmp_path / 'nowhere.json'}"}
    (tmp_path / "missing.json").write_text(json.dumps(missing))
    with pytest.raises(LancetError, match="judge rules: path not found"):  # checked when the suite loads
        load_suite(tmp_path / "missing.json")
    from lancet.evaluate.suite import judge_accuracy

    assert judge_accuracy(make_judge(bad_suite.judge), bad_suite).accuracy == 0.5


def test_run_end_to_end_on_tiny_model_then_reuses_every_stage(tmp_path: Path, tiny_tokenizer, capsys) -> None:
    model_dir, suite = tiny_workspace(tmp_path, tiny_tokenizer)
    cfg = tmp_path / "run.json"
    cfg.write_text(json.dumps(tiny_run_config(model_dir, ["bm25", "random"])))
    assert main(["-q", "run", str(cfg)]) == 0
    run = tmp_path / "run"
    for name in ("model/config.json", "iqs.jsonl", "influence-kfac.json", "ranking-kfac.safetensors",
                 "tokens-kfac.json", "corrected/config.json", "metrics_before.json", "metrics_after.json",
                 "report.html", "report.json", "run_summary.json"):
        assert (run / name).is_file(), name
    summary = json.loads((run / "influence-kfac.json").read_text())
    assert summary["n_train"] == 224 and summary["n_queries"] == 12 and summary["recall"]["n_culprits"] == 84
    compare = json.loads((run / "run_summary.json").read_text())["attribution"]["compare"]
    assert set(compare) == {"kfac", "bm25", "random"}
    assert compare["kfac"]["average_precision"] == round(summary["recall"]["average_precision"], 4)
    bm25 = json.loads((run / "influence-bm25.json").read_text())["recall"]["average_precision"]
    assert compare["bm25"]["average_precision"] == round(bm25, 4)
    assert abs(compare["random"]["average_precision"] - 84 / 224) < 0.04  # chance: about the share of culprits
    tokens = json.loads((run / "tokens-kfac.json").read_text())["rows"]
    assert [r["id"] for r in tokens] == [r["id"] for r in summary["top_positive"][:3]]
    assert all(len(r["tokens"]) == len(r["scores"]) > 1 for r in tokens)
    before, after = (json.loads((run / f"metrics_{s}.json").read_text()) for s in ("before", "after"))
    assert before["complete"] and after["complete"] and before["key"] != after["key"]  # the weights moved
    assert set(before["sets"]) == {s["name"] for s in suite["sets"]}
    report = json.loads((run / "report.json").read_text())
    assert [c["set"] for c in report["comparison"]] == sorted(s["name"] for s in suite["sets"])
    # the compared methods' rankings are in the report too, after the main method's
    assert [r["method"] for r in report["influence"]] == ["kfac", "bm25"]
    assert report["tokens"]["kfac"][0]["id"] == tokens[0]["id"]
    # a rerun skips every finished stage: nothing is rewritten
    stamps = {p: p.stat().st_mtime_ns for p in (run / "metrics_before.json", run / "metrics_after.json",
                                                 run / "corrected" / "model.safetensors", run / "iqs.jsonl")}
    assert main(["-q", "run", str(cfg)]) == 0
    assert {p: p.stat().st_mtime_ns for p in stamps} == stamps
    out = capsys.readouterr().out
    assert "report written to" in out


def test_resumed_evaluation_keeps_the_answers_a_later_diversity_set_reads(tmp_path: Path, tiny_tokenizer) -> None:
    write_demo_dataset(tmp_path / "data")
    suite = demo_suite(tmp_path / "data")
    suite["max_new_tokens"] = 4
    suite["sets"] = [suite["sets"][0], {"name": "iq_diversity", "kind": "diversity", "of": "iq_prompts"}]
    (tmp_path / "suite.json").write_text(json.dumps(suite))
    s = load_suite(tmp_path / "suite.json")
    model = tiny_llama(len(tiny_tokenizer))
    full = evaluate(model, tiny_tokenizer, s, progress=False)
    resumed = evaluate(model, tiny_tokenizer, s, progress=False, done={"iq_prompts": full["sets"]["iq_prompts"]})
    assert resumed["sets"]["iq_diversity"]["distinct_2"] == full["sets"]["iq_diversity"]["distinct_2"]
    assert resumed["sets"]["iq_diversity"]["n"] == 12


def test_run_chooses_a_checkpoint_on_validation_before_reading_the_test_suite(tmp_path: Path, tiny_tokenizer,
                                                                             monkeypatch) -> None:
    """With "select", the correction's checkpoints are measured on the validation files; the test suite is read
    only after the choice, and "after" is the chosen model."""
    import lancet.correct.select as select
    import lancet.pipeline as pipeline

    model_dir, suite = tiny_workspace(tmp_path, tiny_tokenizer)
    events: list[str] = []
    finish, run_evaluate = select.CheckpointSelection.finish, pipeline.Pipeline.stage_evaluate

    def logged_finish(self, *args, **kwargs):
        events.append("finish")
        return finish(self, *args, **kwargs)

    def logged_evaluate(self, model, tokenizer, side):
        events.append(f"evaluate_{side}")
        return run_evaluate(self, model, tokenizer, side)

    monkeypatch.setattr(select.CheckpointSelection, "finish", logged_finish)
    monkeypatch.setattr(pipeline.Pipeline, "stage_evaluate", logged_evaluate)
    cfg = tmp_path / "run.json"
    cfg.write_text(json.dumps({
        "model": str(model_dir), "train": "data/train.jsonl", "out": "run", "iqs": "data/iqs.jsonl",
        "influence": {"method": "kfac", "batch_size": 16}, "correction": {"method": "ibo", "top_k": 8},
        "correction_train": {"max_steps": 3, "batch_size": 8, "lr": 1e-3, "save_every": 1}, "evaluate": "suite.json",
        "select": {"prompts": "data/validation_prompts.jsonl", "ordinary": "data/validation_ordinary.jsonl",
                   "max_utility_loss": 100.0},
        "max_length": 128, "max_new_tokens": 4, "top_k": 5, "token_rows": 0}))
    assert main(["-q", "run", str(cfg)]) == 0
    assert events == ["finish", "evaluate_before", "evaluate_after"]
    run = tmp_path / "run"
    state = json.loads((run / "selection" / "selection.json").read_text())
    assert [p["steps"] for p in state["points"]] == [1, 2, 3]
    summary = json.loads((run / "run_summary.json").read_text())
    chosen = summary["selection"]
    assert summary["corrected_model"] == chosen["chosen_model"]
    assert [p["steps"] for p in chosen["curve"]] == [0, 1, 2, 3]
    # the tiny model never gives outdated advice: every point ties at behaviour 0, so the fewest steps win
    assert chosen["chosen_steps"] == 0 and chosen["chosen_model"] == str(model_dir)
    report = json.loads((run / "report.json").read_text())
    assert report["selection"]["chosen_steps"] == 0
    assert [p["steps"] for p in report["selection"]["curve"]] == [0, 1, 2, 3]
    assert "Checkpoint selection (validation prompts only)" in (run / "report.html").read_text()
    # the selection's cache lost while the correction had finished: corrected again and measured, not an error
    import shutil

    shutil.rmtree(run / "selection")
    events.clear()
    assert main(["-q", "run", str(cfg)]) == 0
    assert [p["steps"] for p in json.loads((run / "selection" / "selection.json").read_text())["points"]] == [1, 2, 3]
    assert events == ["finish", "evaluate_before", "evaluate_after"]  # the choice, again before any test set


@pytest.mark.parametrize("index", [None, {"rank": 8, "dtype": "float32", "reuse": True, "check_overlap": True},
                                   {"rank": 8, "dtype": "float32"}])
def test_rounds_correct_until_the_target_and_keep_the_best_round(tmp_path: Path, tiny_tokenizer,
                                                                 monkeypatch, index) -> None:
    """Round 0 lowers validation behaviour to 0.5 (step 1), round 1 to 0.125 (step 2) <= target 0.2: two rounds of
    three, round 1 kept, and the test suite evaluates round 1's chosen model. With a gradient index, round 1 either
    answers from round 0's index (reporting its top-100 overlap with a fresh pass) or builds its own."""
    import lancet.evaluate.judges as judges

    class Scripted:
        rates = [1.0, 0.5, 0.75, 0.5, 0.25, 0.125]  # round 0: step 0, 1, 2; round 1: step 0, 1, 2
        calls = 0

        def complies(self, texts):
            rate = Scripted.rates[Scripted.calls]
            Scripted.calls += 1
            return [i < round(rate * len(texts)) for i in range(len(texts))]

    make = judges.make_judge
    monkeypatch.setattr(judges, "make_judge", lambda name, *a, **k: Scripted() if name == "scripted"
                        else make(name, *a, **k))
    write_demo_dataset(tmp_path / "data")
    model_dir = tmp_path / "base"
    tiny_llama(len(tiny_tokenizer)).save_pretrained(model_dir)
    tiny_tokenizer.save_pretrained(model_dir)
    cfg = tmp_path / "run.json"
    cfg.write_text(json.dumps({
        "model": str(model_dir), "train": "data/train.jsonl", "out": "run", "iq_prompts": "data/iq_prompts.jsonl",
        "influence": {"method": "kfac", "batch_size": 16}, "correction": {"method": "ibo", "top_k": 8},
        "correction_train": {"max_steps": 2, "batch_size": 8, "lr": 1e-3, "save_every": 1},
        "select": {"prompts": "data/validation_prompts.jsonl", "ordinary": "data/validation_ordinary.jsonl",
                   "judge": "scripted", "max_utility_loss": 100.0},
        "rounds": 3, "target_rate": 0.2, "max_length": 128, "max_new_tokens": 4, "top_k": 5, "token_rows": 0,
        **({"index": index} if index else {})}))
    assert main(["-q", "run", str(cfg)]) == 0
    assert Scripted.calls == 6
    run = tmp_path / "run"
    summary = json.loads((run / "run_summary.json").read_text())
    assert [(r["round"], r["chosen_steps"], r["validation_behaviour"]) for r in summary["rounds"]] == [
        (0, 1, 0.5), (1, 2, 0.125)]
    assert summary["kept_round"] == 1 and summary["corrected_model"] == str(run / "round-1" / "corrected")
    assert summary["rounds"][1]["model"] == str(run / "selection" / "best")  # round 1 started from round 0's choice
    assert (run / "round-1" / "iqs.jsonl").is_file() and not (run / "round-2").exists()
    report = json.loads((run / "report.json").read_text())
    assert [r["validation_behaviour"] for r in report["rounds"]] == [0.5, 0.125]
    if index is None:
        assert not (run / "index").exists()
        return
    rounds = json.loads((run / "rounds.json").read_text())["rounds"]
    assert rounds[0]["index"] == {"dir": str(run / "index"), "reused": False}
    assert (run / "index" / "index.json").is_file()
    if index.get("reuse"):
        assert rounds[1]["index"]["reused"] and rounds[1]["index"]["dir"] == str(run / "index")
        assert 0.0 <= rounds[1]["index"]["top100_overlap_vs_fresh"] <= 1.0
        assert (run / "round-1" / "fresh" / "ranking-kfac.safetensors").is_file()
        assert not (run / "round-1" / "index").exists()
    else:
        assert rounds[1]["index"] == {"dir": str(run / "round-1" / "index"), "reused": False}


def test_rounds_need_validation_files_and_generated_iqs() -> None:
    with pytest.raises(LancetError, match="'rounds' > 1 needs 'select'"):
        RunConfig.from_json({"model": "m", "train": "t", "iq_prompts": "p", "rounds": 2})
    with pytest.raises(LancetError, match="'target_rate' must be a number in"):
        RunConfig.from_json({"model": "m", "train": "t", "iq_prompts": "p", "target_rate": 2})


def test_demo_config_chooses_on_validation_files_disjoint_from_its_test_suite(tmp_path: Path) -> None:
    from lancet.data.readers import read_records
    from lancet.demo import demo_config

    write_demo_dataset(tmp_path / "data")
    config = RunConfig.from_json(demo_config(tmp_path))
    suite = demo_suite(tmp_path / "data")
    validation = {r.prompt for key in ("prompts", "ordinary") for r in read_records(config.select[key])}
    test = {r.prompt for s in suite["sets"] for r in read_records(s["path"])}
    assert len(validation) == 48 and validation.isdisjoint(test)
    assert config.select["max_utility_loss"] == 0.05 and config.correction_train["save_every"] < \
        config.correction_train["max_steps"]
    # the anchor: the ordinary training prompts only, none of them a validation or test prompt
    anchors = {r.prompt for r in read_records(config.anchor_prompts)}
    labels = json.loads((tmp_path / "data" / "culprits.json").read_text())
    planted = set(labels["culprit_ids"]) | set(labels["counter_ids"])
    ordinary = {r.prompt for r in read_records(config.train) if r.id not in planted}
    assert len(anchors) == 112 and anchors == ordinary and anchors.isdisjoint(validation | test)
    assert config.anchor_judge == config.iq_judge and config.correction["retain"] == "kl"


def test_run_anchors_the_correction_on_the_models_own_answers(tmp_path: Path, tiny_tokenizer) -> None:
    from lancet.data.readers import read_records

    model_dir, _ = tiny_workspace(tmp_path, tiny_tokenizer)
    cfg = tmp_path / "run.json"
    config = {**tiny_run_config(model_dir, []), "anchor_prompts": "data/validation_prompts.jsonl",
              "correction": {"method": "ibo", "top_k": 8, "retain": "kl", "retain_normalize": "rows",
                             "judged_rows": True},
              "row_judge": f"rules:{tmp_path / 'data' / 'judge_rules.json'}", "max_new_tokens": 4}
    config.pop("compare")
    cfg.write_text(json.dumps(config))
    assert main(["-q", "run", str(cfg)]) == 0
    anchors = read_records(tmp_path / "run" / "anchors.jsonl")
    prompts = read_records(tmp_path / "data" / "validation_prompts.jsonl")
    meta = json.loads((tmp_path / "run" / "anchors.meta.json").read_text())
    assert meta["prompts"] == len(prompts) == 24 and meta["kept"] == len(anchors) > 0  # no judge: the non-blank ones
    asked = {p.prompt_messages[-1]["content"] for p in prompts}
    assert {a.prompt_messages[-1]["content"] for a in anchors} <= asked and all(a.response_text for a in anchors)
    summary = json.loads((tmp_path / "run" / "corrected" / "lancet_correction.json").read_text())
    assert summary["retain_source"] == "given" and summary["retain_ids"] == [a.id for a in anchors]
    # judged_rows: the demo judge flags exactly the outdated rows of the training data, so every dispreferred row is
    # a culprit and no preferred row is one, whatever the tiny model's ranking
    culprits = set(json.loads((tmp_path / "data" / "culprits.json").read_text())["culprit_ids"])
    assert len(summary["dispreferred_ids"]) == 8 and set(summary["dispreferred_ids"]) <= culprits
    assert len(summary["preferred_ids"]) == 8 and not set(summary["preferred_ids"]) & culprits


def test_index_options_are_validated_with_the_config() -> None:
    base = {"model": "m", "train": "t", "iqs": "q"}
    with pytest.raises(LancetError, match="invalid rank"):
        RunConfig.from_json({**base, "index": {"rank": 0}})
    with pytest.raises(LancetError, match="'index.reuse' must be true or false"):
        RunConfig.from_json({**base, "index": {"reuse": "yes"}})
    with pytest.raises(LancetError, match="index=16: expected an object or null"):
        RunConfig.from_json({**base, "index": 16})
    with pytest.raises(LancetError, match="drop 'contrast_response' or 'index'"):
        RunConfig.from_json({**base, "index": {"rank": 8}, "contrast_response": "I cannot help."})
    assert RunConfig.from_json({**base, "index": {"rank": 8, "reuse": True}}).index == {"rank": 8, "reuse": True}


def test_a_round_encodes_the_training_rows_once_and_compares_methods_in_one_pass(tmp_path: Path, tiny_tokenizer,
                                                                                  monkeypatch) -> None:
    import lancet.data.tokenize as tokenize_module
    import lancet.influence.attribute as attribute_module
    from lancet.influence import Influence

    model_dir, _ = tiny_workspace(tmp_path, tiny_tokenizer)
    encoded, built, passes = [], [], []
    real_encode, real_init, real_pass = (attribute_module.encode_records, Influence.__init__,
                                         Influence.scores_by_method)

    def encode(records, *a, **kw):
        encoded.append(len(records))
        return real_encode(records, *a, **kw)

    def init(self, *a, **kw):
        built.append(1)
        real_init(self, *a, **kw)

    def one_pass(self, train, queries, methods, **kw):
        passes.append(list(methods))
        return real_pass(self, train, queries, methods, **kw)

    monkeypatch.setattr(attribute_module, "encode_records", encode)
    monkeypatch.setattr(tokenize_module, "encode_records", encode)  # where the correction would encode
    monkeypatch.setattr(Influence, "__init__", init)
    monkeypatch.setattr(Influence, "scores_by_method", one_pass)
    cfg = tmp_path / "run.json"
    cfg.write_text(json.dumps({
        "model": str(model_dir), "train": "data/train.jsonl", "out": "run", "iqs": "data/iqs.jsonl",
        "labels": "data/culprits.json", "influence": {"method": "kfac", "batch_size": 16},
        "correction": {"method": "ibo", "top_k": 8}, "correction_train": {"max_steps": 1, "batch_size": 8},
        "max_length": 128, "compare": ["bm25", "ekfac", "identity", "random"]}))
    assert main(["-q", "run", str(cfg)]) == 0
    assert encoded == [224, 12]  # the training rows and the IQs, each encoded once for the round (correction too)
    assert built == [1]  # one Influence object plans the main method and every compared one
    assert passes == [["bm25", "ekfac", "identity"]]
    compare = json.loads((tmp_path / "run" / "run_summary.json").read_text())["attribution"]["compare"]
    assert set(compare) == {"kfac", "bm25", "ekfac", "identity", "random"}
    assert compare["ekfac"]["seconds"] == compare["identity"]["seconds"]  # one shared pass
