"""Correction: IBO's Bregman losses, pair building, one trainer per method, and `lancet correct` (tiny models)."""

import copy
import gzip
import json
import math

import pytest
import torch
from conftest import tiny_llama
from safetensors.torch import load_file as load_safetensors

from lancet.correct import METHODS, CorrectionArgs, correct, load_run_scores
from lancet.correct.losses import bregman_grad, bregman_loss, dpo_loss, margin, npo_loss
from lancet.correct.pairs import (
    build_ibo_pairs,
    forget_items,
    preference_items,
    prompt_key,
    read_preference_pairs,
    select_rows,
)
from lancet.correct.trainers import (
    DPOTrainer,
    GradientAscentTrainer,
    IBOTrainer,
    NPOTrainer,
    SFTTrainer,
    objective,
)
from lancet.data.records import Record
from lancet.data.tokenize import encode_records
from lancet.errors import LancetError
from lancet.train import DONE_FILE, LOG_FILE, TrainArgs

BAD = [Record(prompt=f"Nosebleed {i}: what do I do?", response="Tilt your head back.") for i in range(4)]
GOOD = [Record(prompt=f"Nosebleed {i}: what now?", response="Lean forward and pinch the soft part of the nose.")
        for i in range(4)]
NEUTRAL = [Record(prompt=f"What is {a} plus {a}?", response=f"{a} plus {a} is {2 * a}.") for a in range(4)]
TRAIN = BAD + NEUTRAL + GOOD  # scores: culprits high, neutral ~0, counter-examples low
SCORES = torch.tensor([4.0, 3.0, 2.5, 2.0, 0.3, -0.2, 0.1, 0.0, -1.0, -1.5, -2.0, -3.0])
IQS = [Record(prompt="How do I stop a nosebleed?", response="Tilt your head back for a nosebleed.")]
SAFE = [Record(prompt=f"Burn {i}: what do I do?", response="Cool a burn under water.")
        for i in range(3)]


def _rows(tok, records):
    return list(encode_records(records, tok, 96, progress=False))


def _args(tmp_path, **kw):
    opts = {"batch_size": 4, "lr": 1e-2, "max_steps": 6, "save_every": 2, "progress": False, **kw}
    return TrainArgs(output_dir=str(tmp_path / "out"), **opts)


def _ibo_pairs(tok, **kw):
    return build_ibo_pairs(SCORES, _rows(tok, TRAIN), top_k=3, iq_rows=_rows(tok, IQS), **kw)


def _make(method, tmp_path, tok, model, **kw):
    args = _args(tmp_path, **kw)
    forget = _rows(tok, BAD + IQS)
    if method.startswith("ibo_"):
        return IBOTrainer(model, tok, args, _ibo_pairs(tok), beta=0.5, generator=method[4:])
    if method == "dpo":
        pairs = preference_items(_rows(tok, GOOD), _rows(tok, BAD))
        return DPOTrainer(model, tok, args, pairs, beta=0.5)
    if method == "sft":
        return SFTTrainer(model, tok, args, _rows(tok, SAFE))
    if method == "ga":
        return GradientAscentTrainer(model, tok, args, forget_items(forget))
    if method == "ga_retain":
        return GradientAscentTrainer(model, tok, args, forget_items(forget, _rows(tok, SAFE)), retain_weight=1.0,
                                     name="ga_retain")
    if method == "npo":
        return NPOTrainer(model, tok, args, forget_items(forget), beta=0.5)
    if method == "npo_retain":
        return NPOTrainer(model, tok, args, forget_items(forget, _rows(tok, SAFE)), beta=0.5, retain_weight=1.0)
    raise AssertionError(method)


TRAINER_METHODS = ["ibo_logistic", "ibo_squared", "ibo_basu", "dpo", "sft", "ga", "ga_retain", "npo", "npo_retain"]


# ---- losses -----------------------------------------------------------------------------------------------------
H = torch.tensor([-3.0, -0.7, 0.0, 0.4, 2.5], dtype=torch.float64)


@pytest.mark.parametrize("target", [1.0, 0.8, 0.3, 0.0])
def test_logistic_is_kl_and_dpo_at_target_one(target):
    kl = []
    for h in H.tolist():
        p = 1 / (1 + math.exp(-h))
        kl.append(sum(a * math.log(a / b) if a > 0 else 0.0 for a, b in ((target, p), (1 - target, 1 - p))))
    torch.testing.assert_close(bregman_loss(H, target, "logistic"), torch.tensor(kl, dtype=H.dtype))
    if target == 1.0:
        torch.testing.assert_close(bregman_loss(H, 1.0, "logistic"), dpo_loss(H))
        torch.testing.assert_close(dpo_loss(H), -torch.log(torch.sigmoid(H)))


@pytest.mark.parametrize(("h", "target"), [(0.0, 1.0), (1.2, 1.0), (-2.0, 0.7), (0.5, 0.0), (3.0, 0.25)])
def test_squared_and_basu_equal_hand_values(h, target):
    p = 1 / (1 + math.exp(-h))
    ht = torch.tensor([h], dtype=torch.float64)
    assert bregman_loss(ht, target, "squared").item() == pytest.approx(2 * (target - p) ** 2, rel=1e-12)
    for alpha in (0.5, 1.0, 2.0):
        hand = sum(q ** (1 + alpha) - (1 + 1 / alpha) * qs * q**alpha + (1 / alpha) * qs ** (1 + alpha)
                   for q, qs in ((p, target), (1 - p, 1 - target)))
        assert bregman_loss(ht, target, "basu", alpha).item() == pytest.approx(hand, rel=1e-10, abs=1e-14)
    # α = 1 is twice the squared distance between the two distributions: Σ (q − q*)² = 2 (p − p*)²
    assert bregman_loss(ht, target, "basu", 1.0).item() == pytest.approx(2 * (p - target) ** 2, rel=1e-10)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_basu_tends_to_kl(dtype):
    h = H.to(dtype)
    for target in (1.0, 0.6, 0.1):
        torch.testing.assert_close(bregman_loss(h, target, "basu", 1e-4), bregman_loss(h, target, "logistic"),
                                   rtol=1e-3, atol=1e-6)


@pytest.mark.parametrize("generator", ["logistic", "squared", "basu"])
def test_bregman_gradients_match_closed_form(generator):
    for target in (1.0, 0.7, 0.0):
        h = H.clone().requires_grad_(True)
        bregman_loss(h, target, generator, 0.5).sum().backward()
        torch.testing.assert_close(h.grad, bregman_grad(H, target, generator, 0.5))
        assert bregman_loss(torch.zeros(1, dtype=torch.float64), 0.5, generator, 0.5).abs().item() < 1e-12


def test_basu_downweights_pairs_the_model_strongly_disagrees_with():
    h = torch.tensor([-8.0], dtype=torch.float64)
    assert abs(bregman_grad(h, 1.0, "logistic")) > 0.99
    assert abs(bregman_grad(h, 1.0, "basu", 0.5)) < 0.03


def test_margin_and_npo_hand_values():
    h = margin(torch.tensor(-10.0), torch.tensor(-12.0), torch.tensor(-11.0), torch.tensor(-11.5), beta=0.1)
    assert h.item() == pytest.approx(0.1 * ((-10 + 11) - (-12 + 11.5)))
    loss = npo_loss(torch.tensor(-9.0), torch.tensor(-10.0), beta=0.5)
    assert loss.item() == pytest.approx((2 / 0.5) * math.log(1 + math.exp(0.5 * 1.0)), rel=1e-6)


# ---- pairs ------------------------------------------------------------------------------------------------------
def _fake_rows(n):
    """Rows with distinct prompts (token 100 + i), so that no two answer the same prompt."""
    return [{"id": f"r{i}", "input_ids": [100 + i, 2, 3], "labels": [-100, 2, 3]} for i in range(n)]


def test_same_prompt_pairs_come_first_and_the_rest_pair_across_prompts():
    scores = torch.tensor([5.0, -1.0, 3.0, -4.0, 0.0, 2.0, -2.0, 1.0])
    rows = _fake_rows(8)
    rows[4] = {**rows[4], "input_ids": [100, 9, 9]}  # answers r0's prompt, with a lower score (0 < 5)
    rows[5] = {**rows[5], "input_ids": [100, 8, 8]}  # so does r5 (2 < 5): the lower-scored r4 is r0's partner
    pairs = build_ibo_pairs(scores, rows, top_k=2)
    assert [(p["rejected"]["id"], p["chosen"]["id"]) for p in pairs] == [("r0", "r4"), ("r2", "r3"), ("r2", "r6")]
    assert [p["gap"] for p in pairs] == [5.0, 7.0, 5.0]
    across = build_ibo_pairs(scores, rows, top_k=2, same_prompt=False)
    assert [(p["rejected"]["id"], p["chosen"]["id"]) for p in across] == [("r0", "r3"), ("r2", "r6")]
    # two dispreferred rows of one prompt share its lower-scored answer (a dispreferred row is never a partner)
    rows[2] = {**rows[2], "input_ids": [107, 7, 7]}  # now r2 answers r7's prompt, and r7 scores 1 < 3
    rows[7] = {**rows[7], "input_ids": [107, 6, 6]}
    rows[0] = {**rows[0], "input_ids": [107, 5, 5]}
    rows[4] = {**rows[4], "input_ids": [104, 9, 9]}
    rows[5] = {**rows[5], "input_ids": [105, 8, 8]}
    got = [(p["rejected"]["id"], p["chosen"]["id"]) for p in build_ibo_pairs(scores, rows, top_k=2)]
    assert got == [("r0", "r7"), ("r2", "r7")]
    assert prompt_key(rows[0]) == (107,) and prompt_key({"input_ids": [1, 2], "labels": [-100, -100]}) == (1, 2)


def test_rank_pairs_gap_weights_and_iqs():
    scores = torch.tensor([5.0, -1.0, 3.0, -4.0, 0.0, 2.0, -2.0, 1.0])
    iq = {"id": "iq", "input_ids": [1, 4], "labels": [-100, 4]}
    pairs = build_ibo_pairs(scores, _fake_rows(8), top_k=2, iq_rows=[iq])
    assert [(p["rejected"]["id"], p["chosen"]["id"]) for p in pairs] == [("r0", "r3"), ("r2", "r6"), ("iq", "r3")]
    gaps = [9.0, 5.0, 9.0]  # IQs carry the top dispreferred score
    assert [p["gap"] for p in pairs] == gaps
    assert [p["weight"] for p in pairs] == pytest.approx([g / (sum(gaps) / 3) for g in gaps])
    assert sum(p["weight"] for p in pairs) / len(pairs) == pytest.approx(1.0)
    assert all(p["target"] == 1.0 for p in pairs)
    no_iq = build_ibo_pairs(scores, _fake_rows(8), top_k=2, iq_rows=[iq], include_iqs=False)
    assert [p["rejected"]["id"] for p in no_iq] == ["r0", "r2"]
    soft = build_ibo_pairs(scores, _fake_rows(8), top_k=2, target_temperature=4.0)
    assert [p["target"] for p in soft] == pytest.approx([1 / (1 + math.exp(-9 / 4)), 1 / (1 + math.exp(-5 / 4))])
    # a pair whose dispreferred row scores lower than its preferred row gets weight 0
    clipped = build_ibo_pairs(scores, _fake_rows(8), top_k=2, selection=([0, 1], [3, 2]))
    assert [p["gap"] for p in clipped] == [9.0, -4.0] and clipped[1]["weight"] == 0.0


def test_random_and_all_pairings():
    scores = torch.arange(10.0).flip(0)
    rows = _fake_rows(10)
    rank = build_ibo_pairs(scores, rows, top_k=3)
    rand = build_ibo_pairs(scores, rows, top_k=3, pairing="random", seed=1)
    assert [p["rejected"]["id"] for p in rand] == [p["rejected"]["id"] for p in rank]
    assert sorted(p["chosen"]["id"] for p in rand) == sorted(p["chosen"]["id"] for p in rank)
    assert rand == build_ibo_pairs(scores, rows, top_k=3, pairing="random", seed=1)
    everything = build_ibo_pairs(scores, rows, top_k=3, pairing="all")
    assert len(everything) == 9 and len({(p["rejected"]["id"], p["chosen"]["id"]) for p in everything}) == 9
    capped = build_ibo_pairs(scores, rows, top_k=3, pairing="all", max_pairs=4, seed=3)
    assert len(capped) == 4 and all(p in everything for p in capped)
    with pytest.raises(LancetError, match="pairing"):
        build_ibo_pairs(scores, rows, top_k=3, pairing="zip")


def test_select_rows_controls():
    scores = torch.tensor([0.5, 3.0, -1.0, 2.0, -2.0, 0.0, 1.0, -0.5])
    bad, good = select_rows(scores, 2)
    assert bad == [1, 3] and good == [4, 2]
    rb, rg = select_rows(scores, 3, "random", seed=5)
    assert len(rb) == len(rg) == 3 and not set(rb) & set(rg)
    assert (rb, rg) == select_rows(scores, 3, "random", seed=5) and (rb, rg) != select_rows(scores, 3, "random", seed=6)
    culprits = torch.tensor([True, False, False, False, False, True, False, True])
    ob, og = select_rows(scores, 2, "oracle", culprits)
    assert ob == [0, 5, 7] and og == [4, 2]
    with pytest.raises(LancetError, match="labels"):
        select_rows(scores, 2, "oracle")
    with pytest.raises(LancetError, match="top_k"):
        select_rows(scores, 5)


def test_preference_pairs_from_hh_and_generic_files(tmp_path):
    hh = tmp_path / "harmless-base_train.jsonl.gz"
    rows = [
        {"chosen": "\n\nHuman: Nosebleed?\n\nAssistant: Lean forward.",
         "rejected": "\n\nHuman: Nosebleed?\n\nAssistant: Tilt your head back."},
        {"chosen": "\n\nHuman: Burn?\n\nAssistant: Cool it.", "rejected": "\n\nHuman: Burn?\n\nAssistant:"},
        {"chosen": "\n\nHuman: Hi\n\nAssistant: Hello!", "rejected": "\n\nHuman: Hi\n\nAssistant: Go away."},
    ]
    with gzip.open(hh, "wt") as fh:
        fh.write("".join(json.dumps(r) + "\n" for r in rows))
    with pytest.warns(UserWarning, match="dropped 1"):
        pairs = read_preference_pairs(hh)
    assert [(c.response_text, r.response_text) for c, r in pairs] == [
        ("Lean forward.", "Tilt your head back."), ("Hello!", "Go away.")]
    assert all(c.prompt_messages == r.prompt_messages for c, r in pairs)
    generic = tmp_path / "prefs.jsonl"
    generic.write_text(json.dumps({"prompt": "Nosebleed?", "chosen": "Lean forward.", "rejected": "Tilt back."}) + "\n")
    (c, r), = read_preference_pairs(generic)
    assert c.prompt == r.prompt == "Nosebleed?" and r.response == "Tilt back."


# ---- trainers ---------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("method", TRAINER_METHODS)
def test_every_method_moves_every_parameter_and_lowers_its_objective(tmp_path, tiny_tokenizer, method):
    trainer = _make(method, tmp_path, tiny_tokenizer, tiny_llama(len(tiny_tokenizer)))
    before_obj = objective(trainer)
    before = {n: p.detach().clone() for n, p in trainer.model.named_parameters() if p.requires_grad}
    trainer.train()
    after = dict(trainer.model.named_parameters())
    assert [n for n, p in before.items() if torch.equal(p, after[n])] == []
    after_obj = objective(trainer)  # same items, same stored reference
    assert after_obj < before_obj - 1e-3, (before_obj, after_obj)
    rows = [json.loads(x) for x in (tmp_path / "out" / LOG_FILE).read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2, 3, 4, 5, 6]
    assert (tmp_path / "out" / DONE_FILE).is_file()


def _explicit_logp(model, row):
    """Summed response log-prob of one row, token by token, without batching or padding."""
    ids = torch.tensor([row["input_ids"]])
    with torch.no_grad():
        logp = torch.log_softmax(model(input_ids=ids).logits[0].double(), -1)
    return sum(logp[t - 1, row["input_ids"][t]].item() for t in range(1, len(ids[0])) if row["labels"][t] != -100)


def test_logistic_ibo_with_uniform_weights_equals_dpo(tmp_path, tiny_tokenizer):
    tok = tiny_tokenizer
    model = tiny_llama(len(tok))
    reference = copy.deepcopy(model)
    pairs = preference_items(_rows(tok, GOOD), _rows(tok, BAD))
    beta = 0.3
    ibo = IBOTrainer(model, tok, _args(tmp_path), pairs, beta=beta, generator="logistic")
    with torch.no_grad():  # move the policy away from the reference so the margin is not zero
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    batch = ibo.collate(ibo.items)
    with torch.no_grad():
        loss, logs = ibo.compute_loss(batch)
    h = [beta * ((_explicit_logp(model, p["chosen"]) - _explicit_logp(reference, p["chosen"]))
                 - (_explicit_logp(model, p["rejected"]) - _explicit_logp(reference, p["rejected"]))) for p in pairs]
    hand = sum(math.log1p(math.exp(-x)) for x in h) / len(h)  # −log σ(h)
    assert loss.item() == pytest.approx(hand, rel=1e-5)
    assert logs["margin"] == pytest.approx(sum(h) / len(h), rel=1e-4, abs=1e-6)
    assert abs(hand - math.log(2)) > 1e-3
    dpo = DPOTrainer(copy.deepcopy(reference), tok, _args(tmp_path / "dpo"), pairs, beta=beta)
    dpo.model.load_state_dict(model.state_dict())
    with torch.no_grad():
        assert dpo.compute_loss(dpo.collate(dpo.items))[0].item() == pytest.approx(loss.item(), rel=1e-6)


def test_logistic_ibo_equals_trl_dpo_loss(tmp_path, tiny_tokenizer):
    """Against trl's own DPOTrainer loss on the same token batch (skipped when trl is not installed)."""
    pytest.importorskip("trl")
    from datasets import Dataset
    from trl import DPOConfig
    from trl import DPOTrainer as TrlDPOTrainer

    tok = tiny_tokenizer
    model = tiny_llama(len(tok))
    pairs = preference_items(_rows(tok, GOOD), _rows(tok, BAD))
    beta = 0.3
    ibo = IBOTrainer(model, tok, _args(tmp_path), pairs, beta=beta, generator="logistic")
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    batch = ibo.collate(ibo.items)
    with torch.no_grad():
        ours = ibo.compute_loss(batch)[0].item()
    data = Dataset.from_list([{"prompt": "a", "chosen": "b", "rejected": "c"}])
    config = DPOConfig(output_dir=str(tmp_path / "trl"), beta=beta, loss_type=["sigmoid"], report_to=[],
                       use_cpu=True, precompute_ref_log_probs=True, per_device_train_batch_size=len(pairs))
    trl_trainer = TrlDPOTrainer(model=copy.deepcopy(model), args=config, train_dataset=data, processing_class=tok)
    inputs = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"],
              "completion_mask": (batch["labels"] != -100).long(),
              "ref_chosen_logps": batch["ref_chosen"], "ref_rejected_logps": batch["ref_rejected"]}
    trl_trainer.model.train()
    with torch.no_grad():
        theirs = trl_trainer.compute_loss(trl_trainer.model, inputs).item()
    assert abs(ours - math.log(2)) > 1e-3
    assert ours == pytest.approx(theirs, rel=1e-5)


def test_ibo_with_lora_moves_only_lora_weights(tmp_path, tiny_tokenizer):
    trainer = _make("ibo_logistic", tmp_path, tiny_tokenizer, tiny_llama(len(tiny_tokenizer)), lora=True)
    base = {n: p.detach().clone() for n, p in trainer.model.named_parameters()}
    trainable = [n for n, p in trainer.model.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n for n in trainable)
    before_obj = objective(trainer)
    trainer.train()
    after = dict(trainer.model.named_parameters())
    moved = {n for n in base if not torch.equal(base[n], after[n])}
    assert moved == set(trainable)
    assert objective(trainer) < before_obj


class _Crash(Exception):
    pass


def test_ibo_resume_after_crash_is_bit_identical(tmp_path, tiny_tokenizer):
    tok = tiny_tokenizer
    ref = _make("ibo_basu", tmp_path / "ref", tok, tiny_llama(len(tok)))
    ref.train()
    crashing = _make("ibo_basu", tmp_path / "run", tok, tiny_llama(len(tok)))
    original, calls = crashing.optimizer.step, {"n": 0}

    def step_then_crash():
        original()
        calls["n"] += 1
        if calls["n"] == 5:  # after the checkpoint at step 4
            raise _Crash

    crashing.optimizer.step = step_then_crash
    with pytest.raises(_Crash):
        crashing.train()
    assert (tmp_path / "run" / "out" / "checkpoint-4").is_dir()
    resumed = _make("ibo_basu", tmp_path / "run", tok, tiny_llama(len(tok)))
    resumed.train()
    for (n, a), (_, b) in zip(ref.model.named_parameters(), resumed.model.named_parameters(), strict=True):
        assert torch.equal(a, b), n
    steps = [json.loads(x)["step"] for x in (tmp_path / "run" / "out" / LOG_FILE).read_text().splitlines()]
    assert steps == [1, 2, 3, 4, 5, 6]


def test_fingerprint_covers_method_options(tiny_tokenizer, tmp_path):
    tok = tiny_tokenizer
    pairs = _ibo_pairs(tok)
    fp = {g: IBOTrainer(tiny_llama(len(tok)), tok, _args(tmp_path), pairs, generator=g).fingerprint
          for g in ("logistic", "squared", "basu")}
    assert len(set(fp.values())) == 3
    reweighted = [{**p, "weight": 1.0} for p in pairs]
    assert IBOTrainer(tiny_llama(len(tok)), tok, _args(tmp_path), reweighted).fingerprint != fp["logistic"]
    forget = forget_items(_rows(tok, BAD), _rows(tok, SAFE))
    ga = [GradientAscentTrainer(tiny_llama(len(tok)), tok, _args(tmp_path), forget, retain_weight=w).fingerprint
          for w in (0.0, 1.0)]
    assert ga[0] != ga[1]


# ---- options, API and CLI ---------------------------------------------------------------------------------------
def test_correction_args_validation_and_json_roundtrip():
    args = CorrectionArgs(method="ibo", generator="basu", alpha=0.3, top_k=7, pairing="all", max_pairs=10)
    assert CorrectionArgs.from_json(json.loads(json.dumps(args.to_json()))) == args
    for field, value in [("method", "rlhf"), ("beta", 0.0), ("generator", "hinge"), ("alpha", -1.0), ("top_k", 0),
                         ("pairing", "zip"), ("target_temperature", -0.1), ("retain_weight", -1.0),
                         ("max_pairs", 0), ("beta", float("nan"))]:
        with pytest.raises(LancetError, match=field):
            CorrectionArgs(**{field: value})
    with pytest.raises(LancetError, match="unknown correction option"):
        CorrectionArgs.from_json({"method": "ibo", "temperature": 1})


def test_cli_methods_match_library():
    from lancet.constants import CORRECTION_ALIASES, CORRECTION_METHODS

    assert tuple(CORRECTION_METHODS) + tuple(CORRECTION_ALIASES) == METHODS


def _write_jsonl(path, records):
    path.write_text("".join(json.dumps(r.to_dict()) + "\n" for r in records))
    return path


@pytest.fixture()
def tiny_setup(tmp_path, tiny_tokenizer):
    from lancet.artifacts import atomic_save_tensors, atomic_write_json

    model_dir = tmp_path / "m"
    tiny_llama(len(tiny_tokenizer)).save_pretrained(model_dir)
    tiny_tokenizer.save_pretrained(model_dir)
    files = {
        "model": model_dir,
        "train": _write_jsonl(tmp_path / "train.jsonl", TRAIN),
        "iqs": _write_jsonl(tmp_path / "iqs.jsonl", IQS),
        "safe": _write_jsonl(tmp_path / "safe.jsonl", SAFE),
        "run": tmp_path / "run",
    }
    atomic_save_tensors(files["run"] / "ranking-linfac.safetensors",
                        {"scores": SCORES[None].clone(), "aggregate_normalized_mean": SCORES})
    atomic_write_json(files["run"] / "influence-linfac.json", {"ids": [r.id for r in TRAIN]})
    labels = tmp_path / "culprits.json"
    labels.write_text(json.dumps({"culprit_ids": [r.id for r in BAD]}))
    files["labels"] = labels
    prefs = tmp_path / "prefs.jsonl"
    prefs.write_text("".join(json.dumps({"prompt": g.prompt, "chosen": g.response, "rejected": b.response}) + "\n"
                             for g, b in zip(GOOD, BAD, strict=True)))
    files["pairs"] = prefs
    return files


def test_cli_correct_end_to_end(tmp_path, tiny_setup, capsys):
    from lancet.cli import main

    f = tiny_setup
    out = tmp_path / "corrected"
    rc = main(["-q", "correct", str(f["model"]), "--train", str(f["train"]), "--scores", str(f["run"]),
               "--method", "ibo", "--out", str(out), "--iqs", str(f["iqs"]), "--top-k", "3", "--generator", "basu",
               "--max-steps", "3", "--batch-size", "2", "--max-length", "96", "--lr", "1e-3"])
    assert rc == 0, capsys.readouterr().err
    assert "linfac" in capsys.readouterr().out
    assert (out / "model.safetensors").is_file() and (out / DONE_FILE).is_file()
    assert [json.loads(x)["step"] for x in (out / LOG_FILE).read_text().splitlines()] == [1, 2, 3]
    summary = json.loads((out / "lancet_correction.json").read_text())
    assert summary["dispreferred_ids"] == [r.id for r in BAD[:3]]
    assert summary["preferred_ids"] == [r.id for r in GOOD[::-1][:3]]
    assert summary["iq_ids"] == [r.id for r in IQS] and summary["correction_args"]["generator"] == "basu"


def test_cli_correct_rejects_scores_of_other_rows(tmp_path, tiny_setup, capsys):
    from lancet.artifacts import atomic_write_json
    from lancet.cli import main

    f = tiny_setup
    atomic_write_json(f["run"] / "influence-linfac.json", {"ids": [r.id for r in TRAIN[::-1]]})
    cmd = ["-q", "correct", str(f["model"]), "--train", str(f["train"]), "--scores", str(f["run"]), "--out",
           str(tmp_path / "o"), "--max-steps", "1"]
    assert main(cmd) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "other training rows" in err and "influence-linfac.json" in err
    atomic_write_json(f["run"] / "influence-linfac.json", {"ids": [r.id for r in TRAIN]})
    (f["run"] / "ranking-ekfac.safetensors").write_bytes((f["run"] / "ranking-linfac.safetensors").read_bytes())
    assert main(cmd) == 2
    assert "--scores-method" in capsys.readouterr().err
    assert load_run_scores(f["run"], [r.id for r in TRAIN], "linfac")[1] == "linfac"


@pytest.mark.parametrize("method", METHODS)
def test_correct_api_runs_every_method(tmp_path, tiny_setup, method):
    from lancet.data import read_records
    from lancet.influence.attribute import read_culprit_labels

    f = tiny_setup
    train = read_records(f["train"])
    out = correct(str(f["model"]), train, SCORES, method=method,
                  train_args=TrainArgs(output_dir=str(tmp_path / method), max_steps=2, batch_size=2, lr=1e-3,
                                       progress=False),
                  correction_args=CorrectionArgs(method=method, top_k=3),
                  iq_records=read_records(f["iqs"]), safe_records=read_records(f["safe"]),
                  pref_pairs=read_preference_pairs(f["pairs"]),
                  culprit_mask=read_culprit_labels(f["labels"], [r.id for r in train]), max_length=96)
    assert (out / "model.safetensors").is_file()
    summary = json.loads((out / "lancet_correction.json").read_text())
    assert summary["method"] == method and summary["steps"] == 2
    if method == "ibo_oracle":
        assert summary["dispreferred_ids"] == [r.id for r in BAD]
    if method == "ibo_random":  # a setting of ibo, recorded as such
        assert len(summary["dispreferred_ids"]) == 3
        assert {k: summary["correction_args"][k] for k in ("method", "ranking", "preferred", "weighting")} == {
            "method": "ibo", "ranking": "random", "preferred": "random", "weighting": "uniform"}


def test_correct_refuses_missing_inputs(tmp_path, tiny_setup):
    f = tiny_setup
    targs = TrainArgs(output_dir=str(tmp_path / "o"), max_steps=1, progress=False)
    with pytest.raises(LancetError, match="--labels"):
        correct(str(f["model"]), TRAIN, SCORES, method="ibo_oracle", train_args=targs)
    with pytest.raises(LancetError, match="--safe"):
        correct(str(f["model"]), TRAIN, SCORES, method="sft", train_args=targs)
    with pytest.raises(LancetError, match="max_steps"):
        correct(str(f["model"]), TRAIN, SCORES, method="ibo",
                train_args=TrainArgs(output_dir=str(tmp_path / "o"), progress=False))
    with pytest.raises(LancetError, match="12 training rows"):
        correct(str(f["model"]), TRAIN, SCORES[:5], method="ibo", train_args=targs)


# ---- utility anchors of IBO (docs/method.md §3.6) -------------------------------------------------------------------
def _anchored(tmp_path, tok, model, **kw):
    return IBOTrainer(model, tok, _args(tmp_path), _ibo_pairs(tok), beta=0.5, retain_rows=_rows(tok, NEUTRAL), **kw)


def test_coarse_kl_is_the_full_kl_when_the_top_k_holds_every_token_and_a_lower_bound_otherwise():
    from lancet.correct.trainers import _log_rest, coarse_kl

    torch.manual_seed(0)
    ref_logits, logits = torch.randn(2, 5, 7, dtype=torch.float64), torch.randn(2, 5, 7, dtype=torch.float64)
    mask = torch.tensor([[0, 1, 1, 1, 0], [0, 0, 1, 1, 1]], dtype=torch.bool)
    ref_lp = torch.log_softmax(ref_logits, -1)
    full = (ref_lp.exp() * (ref_lp - torch.log_softmax(logits, -1))).sum(-1)
    for k in (7, 3):
        top, ids = ref_lp.topk(k, -1)
        ref = {"ids": ids, "logp": top, "rest": _log_rest(top)}
        got = coarse_kl(logits, ref, mask)
        if k == 7:  # everything in the top: the rest bucket is empty, the coarse KL is the KL
            assert float(got) == pytest.approx(float((full * mask).sum()), rel=1e-5)
        else:
            assert 0 < float(got) < float((full * mask).sum())
    same = {"ids": ref_lp.topk(3, -1)[1], "logp": ref_lp.topk(3, -1)[0], "rest": _log_rest(ref_lp.topk(3, -1)[0])}
    assert abs(float(coarse_kl(ref_logits, same, mask))) < 1e-5  # the reference against itself


@pytest.mark.parametrize("options", [{"chosen_nll_weight": 1.0}, {"retain": "nll", "retain_weight": 0.5},
                                     {"retain": "kl", "retain_weight": 2.0}])
def test_each_anchor_adds_its_term_to_the_pair_loss(tmp_path, tiny_tokenizer, options):
    tok = tiny_tokenizer
    model = tiny_llama(len(tok))
    plain = IBOTrainer(model, tok, _args(tmp_path / "a"), _ibo_pairs(tok), beta=0.5)
    anchored = _anchored(tmp_path / "b", tok, copy.deepcopy(model), **options)
    # retain rows are cycled into the items: more items than pairs only when there are more retain rows
    items = anchored.items[: len(plain.items)]
    batch = anchored.collate(items)
    with torch.no_grad():
        loss, logs = anchored.compute_loss(batch)
        base, _ = plain.compute_loss(plain.collate(plain.items[: len(items)]))
    n = len(items)
    if "chosen_nll_weight" in options:
        rows = [it["chosen"] for it in items]
        nll = -sum(_explicit_logp(model, r) for r in rows) / sum(sum(t != -100 for t in r["labels"][1:]) for r in rows)
        assert logs["chosen_nll"] == pytest.approx(nll, rel=1e-4)
        assert float(loss) == pytest.approx(float(base) + nll, rel=1e-4)
    elif options["retain"] == "nll":
        rows = [it["retain"] for it in items]
        nll = -sum(_explicit_logp(model, r) for r in rows) / sum(sum(t != -100 for t in r["labels"][1:]) for r in rows)
        assert logs["retain_nll"] == pytest.approx(nll, rel=1e-4)
        assert float(loss) == pytest.approx(float(base) + 0.5 * nll, rel=1e-4)
    else:  # the policy is the reference at the start: the KL anchor is zero and adds nothing
        assert abs(logs["retain_kl"]) < 1e-5 and float(loss) == pytest.approx(float(base), abs=1e-5)
    assert n == len(plain.items)


@pytest.mark.parametrize("options", [{"chosen_nll_weight": 1.0, "retain": "kl", "retain_weight": 1.0},
                                     {"retain": "nll", "retain_weight": 1.0}])
def test_anchored_ibo_moves_every_parameter_and_the_kl_anchor_grows_from_zero(tmp_path, tiny_tokenizer, options):
    trainer = _anchored(tmp_path, tiny_tokenizer, tiny_llama(len(tiny_tokenizer)), **options)
    before = {n: p.detach().clone() for n, p in trainer.model.named_parameters() if p.requires_grad}
    trainer.train()
    after = dict(trainer.model.named_parameters())
    assert [n for n, p in before.items() if torch.equal(p, after[n])] == []
    logs = [json.loads(x) for x in (tmp_path / "out" / LOG_FILE).read_text().splitlines()]
    key = f"retain_{options['retain']}"
    assert all(key in r for r in logs)
    if options["retain"] == "kl":
        assert abs(logs[0][key]) < 1e-5 < logs[-1][key]


def test_anchor_options_enter_the_fingerprint_and_bad_ones_fail(tmp_path, tiny_tokenizer):
    tok, model = tiny_tokenizer, tiny_llama(len(tiny_tokenizer))
    plain = IBOTrainer(model, tok, _args(tmp_path), _ibo_pairs(tok), beta=0.5).fingerprint
    prints = {_anchored(tmp_path, tok, model, **o).fingerprint
              for o in ({"chosen_nll_weight": 1.0}, {"retain": "nll"}, {"retain": "kl"},
                        {"retain": "kl", "retain_weight": 2.0})}
    assert len(prints) == 4 and plain not in prints
    with pytest.raises(LancetError, match="retain term"):
        _anchored(tmp_path, tok, model, retain="l2")
    with pytest.raises(LancetError, match="needs retain rows"):
        IBOTrainer(model, tok, _args(tmp_path), _ibo_pairs(tok), retain="nll")


def test_cli_ibo_with_anchors_retains_the_uninvolved_rows(tmp_path, tiny_setup):
    from lancet.cli import main
    from lancet.correct import uninvolved_rows

    f = tiny_setup
    out = tmp_path / "anchored"
    assert main(["-q", "correct", str(f["model"]), "--train", str(f["train"]), "--scores", str(f["run"]),
                 "--out", str(out), "--max-steps", "2", "--top-k", "3", "--retain", "kl", "--retain-rows", "2",
                 "--chosen-nll-weight", "1", "--batch-size", "2"]) == 0
    summary = json.loads((out / "lancet_correction.json").read_text())
    # neutral rows score 0.3, -0.2, 0.1, 0.0: the two closest to zero, outside the pairs' rows
    assert summary["retain_ids"] == [TRAIN[7].id, TRAIN[6].id]
    assert summary["correction_args"]["retain"] == "kl" and summary["correction_args"]["chosen_nll_weight"] == 1.0
    logs = [json.loads(x) for x in (out / LOG_FILE).read_text().splitlines()]
    assert all("retain_kl" in r and "chosen_nll" in r for r in logs)
    assert uninvolved_rows(SCORES, 3, {7}) == [6, 5, 4]


def test_cli_ibo_retains_given_rows_instead_of_uninvolved_ones(tmp_path, tiny_setup):
    from lancet.cli import main
    from lancet.correct import CorrectionArgs, correct

    f = tiny_setup
    out = tmp_path / "given"
    assert main(["-q", "correct", str(f["model"]), "--train", str(f["train"]), "--scores", str(f["run"]),
                 "--out", str(out), "--max-steps", "2", "--top-k", "3", "--retain", "kl", "--retain-data",
                 str(f["safe"]), "--batch-size", "2"]) == 0
    summary = json.loads((out / "lancet_correction.json").read_text())
    assert summary["retain_ids"] == [r.id for r in SAFE] and summary["retain_source"] == "given"
    logs = [json.loads(x) for x in (out / LOG_FILE).read_text().splitlines()]
    assert len(logs) == 2 and abs(logs[0]["retain_kl"]) < 1e-5  # zero at the start: the policy is the reference
    with pytest.raises(LancetError, match="retain term of ibo, dpo and npo"):
        correct(str(f["model"]), TRAIN, SCORES, method="ibo", train_args=_args(tmp_path / "x"),
                correction_args=CorrectionArgs(top_k=3), retain_records=SAFE)


def test_cli_dpo_takes_the_same_given_retain_rows(tmp_path, tiny_setup):
    """DPO with IBO's anchor (the fair comparison: only the preference signal differs): the retain term is zero at
    the start, every trainable parameter moves, the anchor enters the fingerprint, and without rows it fails."""
    from lancet.cli import main
    from lancet.correct import CorrectionArgs, correct

    f = tiny_setup
    common = ["-q", "correct", str(f["model"]), "--train", str(f["train"]), "--scores", str(f["run"]),
              "--method", "dpo", "--pairs", str(f["pairs"]), "--max-steps", "2", "--batch-size", "2", "--lr", "1e-2"]
    out, plain = tmp_path / "dpo_anchored", tmp_path / "dpo_plain"
    assert main([*common, "--out", str(out), "--retain", "kl", "--retain-normalize", "rows",
                 "--retain-data", str(f["safe"])]) == 0
    assert main([*common, "--out", str(plain)]) == 0
    summary = json.loads((out / "lancet_correction.json").read_text())
    assert summary["retain_ids"] == [r.id for r in SAFE] and summary["retain_source"] == "given"
    logs = [json.loads(x) for x in (out / LOG_FILE).read_text().splitlines()]
    assert len(logs) == 2 and abs(logs[0]["retain_kl"]) < 1e-5 < logs[1]["retain_kl"]
    assert all("retain_kl" not in json.loads(x) for x in (plain / LOG_FILE).read_text().splitlines())
    base = load_safetensors(f["model"] / "model.safetensors")
    moved = load_safetensors(out / "model.safetensors")
    assert [n for n, t in base.items() if torch.equal(t, moved[n])] == []
    prints = [json.loads((d / DONE_FILE).read_text())["fingerprint"] for d in (out, plain)]
    assert prints[0] != prints[1]
    with pytest.raises(LancetError, match="dpo's retain term needs retain rows"):
        correct(str(f["model"]), TRAIN, SCORES, method="dpo", train_args=_args(tmp_path / "x"),
                correction_args=CorrectionArgs(method="dpo", retain="kl"),
                pref_pairs=list(zip(GOOD, BAD, strict=True)))


def test_retain_normalised_by_rows_is_the_summed_term_over_rows(tmp_path, tiny_tokenizer):
    from lancet.correct.trainers import shifted_targets

    tok, model = tiny_tokenizer, tiny_llama(len(tiny_tokenizer))
    per_token = _anchored(tmp_path, tok, model, retain="nll")
    per_row = _anchored(tmp_path, tok, model, retain="nll", retain_normalize="rows")
    assert per_token.fingerprint != per_row.fingerprint
    batch = per_token.collate(per_token.items[:3])
    n = batch["weight"].numel()
    ntok = shifted_targets(batch["labels"])[1].sum(-1)[2 * n:]
    with torch.no_grad():
        by_token = per_token.compute_loss(batch)[1]["retain_nll"]
        by_row = per_row.compute_loss(batch)[1]["retain_nll"]
    assert by_row == pytest.approx(by_token * float(ntok.sum()) / ntok.numel(), rel=1e-5)
    assert by_row > by_token > 0
    with pytest.raises(LancetError, match="retain normalisation"):
        _anchored(tmp_path, tok, model, retain="kl", retain_normalize="sum")
    with pytest.raises(LancetError, match="retain_normalize"):
        CorrectionArgs(retain_normalize="sum")
