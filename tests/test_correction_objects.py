"""Correction as objects: the method registry, ranking / preferred rows / weighting as plain options, model objects
in, and the CLI flags for them (tiny models)."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import tiny_llama
from test_correct import SAFE, SCORES, TRAIN  # the same tiny rows and ranking as the trainers' tests

from lancet.constants import CORRECTION_METHODS
from lancet.correct import (
    CORRECTIONS,
    Correction,
    CorrectionArgs,
    CorrectionData,
    check_inputs,
    get_correction,
)
from lancet.correct.pairs import select_rows
from lancet.errors import LancetError
from lancet.train import TrainArgs


def test_registry_matches_the_cli_names_and_aliases_are_settings():
    assert tuple(CORRECTIONS) == CORRECTION_METHODS
    assert all(get_correction(name).name == name for name in CORRECTIONS)
    with pytest.raises(LancetError, match="unknown correction method 'nope'"):
        get_correction("nope")
    random_ctrl, oracle = CorrectionArgs(method="ibo_random"), CorrectionArgs(method="ibo_oracle")
    assert (random_ctrl.method, random_ctrl.ranking, random_ctrl.preferred, random_ctrl.weighting) == (
        "ibo", "random", "random", "uniform")
    assert (oracle.method, oracle.ranking, oracle.preferred, oracle.weighting) == ("ibo", "oracle", "bottom", "gap")
    assert CorrectionArgs.from_json(random_ctrl.to_json()) == random_ctrl  # JSON round trip keeps the setting


@pytest.mark.parametrize("field,value", [("method", ["ibo"]), ("ranking", "bm25"), ("preferred", "top"),
                                         ("weighting", "rank"), ("top_k", "3"), ("beta", True), ("seed", 1.5)])
def test_correction_options_are_checked_in_one_line(field, value):
    with pytest.raises(LancetError, match=f"invalid correction option {field}=") as err:
        CorrectionArgs(**{field: value})
    assert "\n" not in str(err.value)


def test_row_choice_factors_one_at_a_time():
    marked = torch.zeros(12, dtype=torch.bool)
    marked[[4, 6, 9]] = True
    # the ranking's bottom is the default; the same bottom under the random ranking excludes its random rows
    assert select_rows(SCORES, 2) == ([0, 1], [11, 10])
    bad, good = select_rows(SCORES, 2, "random", seed=3, preferred="bottom")
    assert good == [i for i in [11, 10, 9, 8, 5] if i not in bad][:2]
    # random preferred rows with the influence ranking: never a dispreferred row, seeded
    bad, good = select_rows(SCORES, 3, "influence", preferred="random", seed=1)
    assert bad == [0, 1, 2] and not set(good) & set(bad) and len(good) == 3
    assert good == select_rows(SCORES, 3, "influence", preferred="random", seed=1)[1]
    # marked: the lowest-scored marked rows, at most k
    assert select_rows(SCORES, 2, preferred="marked", preferred_mask=marked) == ([0, 1], [9, 6])
    with pytest.raises(LancetError, match="needs a mask"):
        select_rows(SCORES, 2, preferred="marked")
    with pytest.raises(LancetError, match="preferred mask has 3 entries"):
        select_rows(SCORES, 2, preferred="marked", preferred_mask=torch.ones(3, dtype=torch.bool))


FLAGGED = torch.tensor([False, True, False, True] + [False] * 5 + [True, False, False])  # rows 1, 3 and 9


def test_judged_rows_take_the_dispreferred_among_flagged_rows_and_the_preferred_among_the_rest():
    # dispreferred: the flagged rows by descending score (1: 3.0, 3: 2.0, 9: -1.5); preferred: unflagged, ascending
    assert select_rows(SCORES, 2, flagged=FLAGGED) == ([1, 3], [11, 10])
    # fewer flagged rows than k: all of them, and still k preferred
    assert select_rows(SCORES, 4, flagged=FLAGGED) == ([1, 3, 9], [11, 10, 8, 5])
    bad, good = select_rows(SCORES, 2, "random", seed=3, flagged=FLAGGED)
    assert set(bad) <= {1, 3, 9} and len(bad) == 2 and not set(good) & {1, 3, 9} and len(good) == 2
    # the oracle reads labels: every culprit dispreferred, the preferred still unflagged
    culprits = torch.tensor([True] * 4 + [False] * 8)
    assert select_rows(SCORES, 2, "oracle", culprit_mask=culprits, flagged=FLAGGED) == ([0, 1, 2, 3], [11, 10])
    with pytest.raises(LancetError, match="the judge flags 12 of 12 training rows"):
        select_rows(SCORES, 2, flagged=torch.ones(12, dtype=torch.bool))
    with pytest.raises(LancetError, match="the judge flags 0 of 12"):
        select_rows(SCORES, 2, flagged=torch.zeros(12, dtype=torch.bool))
    with pytest.raises(LancetError, match="flagged mask has 3 entries"):
        select_rows(SCORES, 2, flagged=torch.ones(3, dtype=torch.bool))


def test_near_preferred_rows_are_the_top_of_the_rows_that_may_be_preferred():
    # judged: the dispreferred are the flagged rows' top (1, 3); the preferred the highest-scored unflagged rows
    # (0: 4.0, 2: 2.5), the behaviour's nearest counter-examples, not the bottom (11, 10)
    assert select_rows(SCORES, 2, flagged=FLAGGED, preferred="near") == ([1, 3], [0, 2])
    assert select_rows(SCORES, 4, flagged=FLAGGED, preferred="near") == ([1, 3, 9], [0, 2, 4, 6])
    # the oracle: every culprit down, the top non-culprits up
    culprits = torch.zeros(12, dtype=torch.bool)
    culprits[:4] = True
    assert select_rows(SCORES, 2, "oracle", culprit_mask=culprits, preferred="near") == ([0, 1, 2, 3], [4, 6])
    # neither: the next rows of the ranking would be preferred, which drive the behaviour too
    with pytest.raises(LancetError, match="preferred='near' needs judged rows"):
        select_rows(SCORES, 2, preferred="near")
    with pytest.raises(LancetError, match="invalid correction option preferred='near': it needs judged_rows"):
        CorrectionArgs(preferred="near")
    assert CorrectionArgs(preferred="near", judged_rows=True).preferred == "near"
    assert CorrectionArgs(preferred="near", ranking="oracle").preferred == "near"


def test_flagged_rows_reads_each_training_answer():
    from lancet.evaluate.judges import MarkerJudge, flagged_rows

    assert flagged_rows(MarkerJudge("Tilt"), TRAIN).tolist() == [True] * 4 + [False] * 8
    assert flagged_rows(MarkerJudge("plus"), TRAIN).tolist() == [False] * 4 + [True] * 4 + [False] * 4
    with pytest.raises(LancetError, match="^train.jsonl: the judge marker:Zebra flags 0 of 12 training answers"):
        flagged_rows(MarkerJudge("Zebra"), TRAIN, "train.jsonl")


def test_check_inputs_names_the_flag_before_any_model_loads():
    data = CorrectionData(train=TRAIN, scores=SCORES)
    with pytest.raises(LancetError, match="needs preferred_mask \\(--preferred-ids\\)"):
        check_inputs(CorrectionArgs(preferred="marked"), data)
    with pytest.raises(LancetError, match="needs culprit_mask \\(--labels\\)"):
        check_inputs(CorrectionArgs(method="ibo_oracle"), data)
    with pytest.raises(LancetError, match="needs flagged_mask \\(--row-judge\\)"):
        check_inputs(CorrectionArgs(judged_rows=True), data)
    with pytest.raises(LancetError, match="needs pairs \\(--pairs\\)"):
        check_inputs(CorrectionArgs(method="dpo"), data)
    with pytest.raises(LancetError, match="retain term of ibo, dpo and npo"):
        check_inputs(CorrectionArgs(method="npo"), CorrectionData(train=TRAIN, scores=SCORES, retain=SAFE))
    check_inputs(CorrectionArgs(), data)  # plain IBO has what it needs


def _trained(tmp_path, tok, args: CorrectionArgs, data: CorrectionData, name: str):
    model = tiny_llama(len(tok))
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    targs = TrainArgs(output_dir=str(tmp_path / name), batch_size=4, lr=1e-2, max_steps=2, save_every=10,
                      progress=False)
    out = Correction(model, tok, args, targs, max_length=96, base_spec="tiny").run(data)
    return model, before, json.loads((out / "lancet_correction.json").read_text())


def test_model_objects_in_every_parameter_moves_and_marked_rows_are_preferred(tmp_path, tiny_tokenizer):
    marked = torch.tensor([False] * 8 + [True, False, True, False])
    data = CorrectionData(train=TRAIN, scores=SCORES, preferred_mask=marked)
    args = CorrectionArgs(top_k=2, preferred="marked", weighting="uniform", same_prompt=False, include_iqs=False)
    model, before, summary = _trained(tmp_path, tiny_tokenizer, args, data, "marked")
    moved = [n for n, p in model.named_parameters() if p.requires_grad and not torch.equal(p, before[n])]
    assert len(moved) == sum(1 for p in model.parameters() if p.requires_grad)
    assert summary["preferred_ids"] == [TRAIN[10].id, TRAIN[8].id]
    assert summary["dispreferred_ids"] == [TRAIN[0].id, TRAIN[1].id]
    assert summary["base"] == "tiny" and summary["method"] == "ibo"


def test_judged_rows_in_a_correction_every_parameter_moves(tmp_path, tiny_tokenizer):
    data = CorrectionData(train=TRAIN, scores=SCORES, flagged_mask=FLAGGED)
    args = CorrectionArgs(top_k=2, judged_rows=True, same_prompt=False, include_iqs=False)
    model, before, summary = _trained(tmp_path, tiny_tokenizer, args, data, "judged")
    moved = [n for n, p in model.named_parameters() if p.requires_grad and not torch.equal(p, before[n])]
    assert len(moved) == sum(1 for p in model.parameters() if p.requires_grad)
    assert summary["dispreferred_ids"] == [TRAIN[1].id, TRAIN[3].id]
    assert summary["preferred_ids"] == [TRAIN[11].id, TRAIN[10].id]
    assert summary["correction_args"]["judged_rows"] is True
    # the mask is a row filter, not a ranking: without judged_rows it is ignored
    _, _, plain = _trained(tmp_path, tiny_tokenizer, CorrectionArgs(top_k=2, same_prompt=False, include_iqs=False),
                           data, "plain")
    assert plain["dispreferred_ids"] == [TRAIN[0].id, TRAIN[1].id]


def test_uniform_weighting_changes_only_the_pair_weights(tmp_path, tiny_tokenizer):
    from lancet.correct.methods import Build, get_correction

    data = CorrectionData(train=TRAIN, scores=SCORES)
    targs = TrainArgs(output_dir=str(tmp_path / "w"), max_steps=1, progress=False)
    weights = {}
    for weighting in ("gap", "uniform"):
        args = CorrectionArgs(top_k=3, weighting=weighting, include_iqs=False, same_prompt=False)
        build = Build(tiny_llama(len(tiny_tokenizer)), tiny_tokenizer, args, targs, 96, "")
        trainer = get_correction("ibo").build(build, data)
        weights[weighting] = [item["weight"] for item in trainer.items]
    # gaps 4-(-3), 3-(-2), 2.5-(-1.5) = 7, 5, 4 over their mean 16/3
    assert weights["gap"] == pytest.approx([7 * 3 / 16, 5 * 3 / 16, 4 * 3 / 16])
    assert weights["uniform"] == [1.0, 1.0, 1.0]


def test_cli_takes_the_row_options(tmp_path, tiny_tokenizer, capsys):
    from lancet.artifacts import atomic_save_tensors, atomic_write_json
    from lancet.cli import main

    model_dir = tmp_path / "m"
    tiny_llama(len(tiny_tokenizer)).save_pretrained(model_dir)
    tiny_tokenizer.save_pretrained(model_dir)
    train = tmp_path / "train.jsonl"
    train.write_text("".join(json.dumps(r.to_dict()) + "\n" for r in TRAIN))
    run = tmp_path / "run"
    atomic_save_tensors(run / "ranking-bm25.safetensors", {"aggregate_normalized_mean": SCORES})
    atomic_write_json(run / "influence-bm25.json", {"ids": [r.id for r in TRAIN]})
    ids = tmp_path / "refusals.json"
    ids.write_text(json.dumps({"ids": [TRAIN[5].id, TRAIN[7].id]}))
    cmd = ["-q", "correct", str(model_dir), "--train", str(train), "--scores", str(run), "--out", str(tmp_path / "o"),
           "--max-steps", "1", "--top-k", "2", "--preferred", "marked", "--weighting", "uniform", "--no-same-prompt"]
    assert main(cmd) == 2  # no --preferred-ids: one line naming the flag
    assert "--preferred-ids" in capsys.readouterr().err
    assert main(cmd + ["--preferred-ids", str(ids)]) == 0
    summary = json.loads((tmp_path / "o" / "lancet_correction.json").read_text())
    assert summary["preferred_ids"] == [TRAIN[5].id, TRAIN[7].id]
    assert summary["correction_args"]["weighting"] == "uniform"
    # --row-judge: the dispreferred rows among the answers the judge flags ("Lean forward...": rows 8-11)
    flagged = ["-q", "correct", str(model_dir), "--train", str(train), "--scores", str(run), "--out",
               str(tmp_path / "j"), "--max-steps", "1", "--top-k", "2", "--no-same-prompt",
               "--row-judge", "marker:Lean"]
    assert main(flagged) == 0
    summary = json.loads((tmp_path / "j" / "lancet_correction.json").read_text())
    assert summary["dispreferred_ids"] == [TRAIN[8].id, TRAIN[9].id] and summary["correction_args"]["judged_rows"]
    assert summary["preferred_ids"] == [TRAIN[5].id, TRAIN[7].id]


def test_npo_takes_ibos_anchor_and_its_kl_starts_at_zero(tmp_path, tiny_tokenizer):
    from lancet.correct.methods import Build, get_correction
    from lancet.correct.trainers import objective

    anchors = SAFE  # stand-ins for the model's own answers to ordinary prompts
    data = CorrectionData(train=TRAIN, scores=SCORES, retain=anchors)
    args = CorrectionArgs(method="npo", top_k=2, retain="kl", retain_normalize="rows", include_iqs=False)
    model = tiny_llama(len(tiny_tokenizer))
    targs = TrainArgs(output_dir=str(tmp_path / "npo"), batch_size=4, lr=1e-2, max_steps=3, save_every=10,
                      progress=False)
    build = Build(model, tiny_tokenizer, args, targs, 96, "tiny")
    trainer = get_correction("npo").build(build, data)
    assert build.summary["retain_source"] == "given" and len(build.summary["retain_ids"]) == 3
    assert trainer.extra_fingerprint() == {"beta": 0.1, "retain_weight": 1.0, "retain": "kl",
                                           "retain_normalize": "rows"}
    batch = trainer.collate(list(trainer.items))
    logs = trainer.compute_loss(batch)[1]
    assert logs["retain_kl"] == pytest.approx(0.0, abs=1e-6)  # the anchor is the starting model itself
    before = objective(trainer)
    trainer.train()
    logs = trainer.compute_loss(trainer.collate(list(trainer.items)))[1]
    assert logs["retain_kl"] > 1e-6 and objective(trainer) < before  # NPO moved the model, the anchor resists
    with pytest.raises(LancetError, match="npo's retain term"):
        check_inputs(args, CorrectionData(train=TRAIN, scores=SCORES))
    # without the anchor NPO+RT is unchanged: safe rows' NLL, no KL options in its fingerprint
    plain = get_correction("npo").build(Build(tiny_llama(len(tiny_tokenizer)), tiny_tokenizer,
                                              CorrectionArgs(method="npo", top_k=2), targs, 96, ""),
                                        CorrectionData(train=TRAIN, scores=SCORES, safe=SAFE))
    assert plain.extra_fingerprint() == {"beta": 0.1, "retain_weight": 1.0}
    assert "retain_nll" in plain.compute_loss(plain.collate(list(plain.items)))[1]
