"""Checkpoint-aware influence: `lancet finetune --keep-checkpoints K` keeps K loadable models with Adam's second moment
(training itself unchanged), and ``CheckpointInfluence`` averages the per-checkpoint scores with learning-rate
weights, exactly (float64 tiny models), with or without the Adam normalisation; the CLI takes the checkpoints."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import call_counter, tiny_llama
from test_influence_engine import F64, QUERIES, TRAIN, close, encode
from test_train import _encoded

import lancet.influence.engine as engine_module
from lancet.artifacts import load_tensors
from lancet.errors import ArtifactError, LancetError
from lancet.finetune import KeepingTrainer, kept_checkpoints, kept_steps, read_checkpoint
from lancet.influence import Influence
from lancet.influence.checkpoints import CheckpointInfluence, checkpoint_weights
from lancet.influence.gradient_scale import GradientScale
from lancet.models.loading import load_model
from lancet.train import LOG_FILE, TrainArgs, Trainer

LR, STEPS = 1e-2, 6


def lr_of(step: int) -> float:
    """The learning rate of optimizer step ``step`` (1-based): linear decay from LR over 6 steps, no warmup."""
    return LR * (1 - (step - 1) / STEPS)


# kept steps 2, 4, 6: each stands for the steps since the previous one
LR_SUMS = {2: lr_of(1) + lr_of(2), 4: lr_of(3) + lr_of(4), 6: lr_of(5) + lr_of(6)}


def _args(out, **kw) -> TrainArgs:
    return TrainArgs(output_dir=str(out), batch_size=4, lr=LR, max_steps=STEPS, save_every=2, progress=False, **kw)


class _Crash(Exception):
    pass


@pytest.fixture(scope="module")
def kept_run(tmp_path_factory):
    """A 6-step run keeping 3 checkpoints, and the same run without keeping any."""
    from conftest import make_tokenizer

    tok = make_tokenizer()
    root = tmp_path_factory.mktemp("kept")
    keeping = KeepingTrainer(tiny_llama(len(tok)), tok, _args(root / "keep"), _encoded(tok), keep=3)
    keeping.train()
    plain = Trainer(tiny_llama(len(tok)), tok, _args(root / "plain"), _encoded(tok))
    plain.train()
    return tok, root, keeping, plain


def test_kept_steps_are_evenly_spaced_and_end_at_the_final_model():
    assert kept_steps(6, 3) == [2, 4, 6]
    assert kept_steps(10, 3) == [4, 7, 10]
    assert kept_steps(5, 1) == [5] and kept_steps(4, 4) == [1, 2, 3, 4]
    with pytest.raises(LancetError, match="more than the run's 6 optimizer steps"):
        kept_steps(6, 7)


def test_keeping_writes_loadable_checkpoints_and_trains_as_before(kept_run):
    tok, root, keeping, plain = kept_run
    # training is the same run: the same losses step by step and the same final weights, bit for bit
    logs = [[json.loads(x)["loss"] for x in (root / d / LOG_FILE).read_text().splitlines()] for d in ("keep", "plain")]
    assert logs[0] == logs[1] and len(logs[0]) == STEPS
    final = dict(keeping.module.named_parameters())
    assert all(torch.equal(p, final[n]) for n, p in plain.module.named_parameters())
    kept = kept_checkpoints(root / "keep")
    assert [k.step for k in kept] == [2, 4, 6] and [k.name for k in kept] == ["step-2", "step-4", "step-6"]
    models = {k.step: load_model(str(k.path))[0] for k in kept}
    last = dict(models[6].named_parameters())
    assert all(torch.equal(p.detach(), last[n]) for n, p in keeping.module.named_parameters())  # step 6 = final
    assert not torch.equal(models[2].model.layers[0].mlp.up_proj.weight, last["model.layers.0.mlp.up_proj.weight"])
    for k in kept:
        assert k.lr == pytest.approx(lr_of(k.step), rel=1e-12)
        assert k.lr_sum == pytest.approx(LR_SUMS[k.step], rel=1e-12)
        assert k.adam == {"betas": [0.9, 0.999], "eps": 1e-8, "step": k.step, "weight_decay": 0.0}
        second = load_tensors(k.second_moment)
        assert sorted(second) == sorted(keeping.param_names)
    final_v = load_tensors(kept[-1].second_moment)
    for name, p in zip(keeping.param_names, keeping.params, strict=True):
        assert torch.equal(final_v[name], keeping.optimizer.state[p]["exp_avg_sq"])
    assert not (root / "plain" / "checkpoints").exists()


def test_kept_run_resumes_to_the_same_checkpoints_and_refuses_another_k(kept_run, tmp_path):
    tok, root, keeping, _ = kept_run
    crashing = KeepingTrainer(tiny_llama(len(tok)), tok, _args(tmp_path / "run"), _encoded(tok), keep=3)
    real, calls = crashing.optimizer.step, {"n": 0}

    def step_then_crash():
        real()
        calls["n"] += 1
        if calls["n"] == 5:  # after the resume checkpoint of step 4 and the kept one of step 4
            raise _Crash

    crashing.optimizer.step = step_then_crash
    with pytest.raises(_Crash):
        crashing.train()
    assert [p.name for p in (tmp_path / "run" / "checkpoints").iterdir()] != []
    KeepingTrainer(tiny_llama(len(tok)), tok, _args(tmp_path / "run"), _encoded(tok), keep=3).train()
    for k, ref in zip(kept_checkpoints(tmp_path / "run"), kept_checkpoints(root / "keep"), strict=True):
        assert (k.step, k.lr_sum) == (ref.step, ref.lr_sum)
        assert all(torch.equal(v, load_tensors(ref.second_moment)[n]) for n, v in load_tensors(k.second_moment).items())
    # K is part of the run's inputs: the finished run is not reused as a run with other kept checkpoints
    with pytest.raises(ArtifactError, match="other inputs"):
        KeepingTrainer(tiny_llama(len(tok)), tok, _args(tmp_path / "run"), _encoded(tok), keep=2).train()
    with pytest.raises(ArtifactError, match="other inputs"):
        Trainer(tiny_llama(len(tok)), tok, _args(tmp_path / "run"), _encoded(tok)).train()


def _f64(path):
    return load_model(str(path), dtype=torch.float64)[0]


def test_checkpoint_average_is_the_lr_weighted_sum(kept_run, tmp_path, monkeypatch):
    tok, root, _, _ = kept_run
    train, queries = encode(tok, TRAIN), encode(tok, QUERIES)
    kept = kept_checkpoints(root / "keep")
    per = [Influence(_f64(k.path), method="identity", **F64).scores(train, queries)["scores"] for k in kept]
    total = sum(LR_SUMS.values())
    expected = sum(LR_SUMS[k.step] / total * s for k, s in zip(kept, per, strict=True))
    ck = CheckpointInfluence(root / "keep", method="identity", out_dir=tmp_path, **F64)
    got = ck.scores(train, queries)
    close(got["scores"], expected, 1e-12)
    close(got["weights"], torch.tensor([LR_SUMS[s] / total for s in (2, 4, 6)], dtype=torch.float64), 1e-14)
    close(got["per_checkpoint"], torch.stack(per), 1e-12)
    # the three checkpoints' scores differ: the average is not one of them
    assert min((per[i] - per[j]).abs().max().item() for i, j in ((0, 1), (1, 2), (0, 2))) > 1e-3
    # each checkpoint's scores are its own artifact: a rerun reads them, no pass over the rows
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["step-2", "step-4", "step-6"]
    calls = call_counter(monkeypatch, engine_module, "score_rows")
    again = CheckpointInfluence(root / "keep", method="identity", out_dir=tmp_path, **F64)
    assert torch.equal(again.scores(train, queries)["scores"], got["scores"]) and calls["n"] == 0
    # other weightings: the learning rate of each checkpoint's own step, uniform, given numbers
    lrs = torch.tensor([lr_of(s) for s in (2, 4, 6)], dtype=torch.float64)
    checkpoints = CheckpointInfluence(root / "keep", method="identity").checkpoints
    close(checkpoint_weights(checkpoints, "lr"), lrs / lrs.sum(), 1e-14)
    uniform = CheckpointInfluence([k.path for k in kept], method="identity", weights="uniform",
                                  **F64).scores(train, queries)["scores"]
    close(uniform, sum(per) / 3, 1e-12)
    with pytest.raises(LancetError, match="2 checkpoint weights for 3 checkpoints"):
        CheckpointInfluence(root / "keep", weights=[1.0, 2.0])


def test_checkpoint_average_with_adam_normalisation(kept_run):
    tok, root, _, _ = kept_run
    train, queries = encode(tok, TRAIN[:6]), encode(tok, QUERIES)
    kept = kept_checkpoints(root / "keep")
    scale = GradientScale.from_checkpoint(kept[0].path)
    v = load_tensors(kept[0].second_moment)["model.layers.1.mlp.down_proj.weight"].double()
    layer = next(x for x in Influence(_f64(kept[0].path)).layer_names() if x.endswith("1.mlp.down_proj"))
    from lancet.curvature.modules import find_tracked_layers

    layers = [x for x in find_tracked_layers(_f64(kept[0].path)) if x.name == layer]
    close(scale.divisors(layers, torch.float64)[layer], (v / (1 - 0.999 ** 2)).sqrt() + 1e-8, 1e-12)
    per = [Influence(_f64(k.path), method="cosine", gradient_scale=GradientScale.from_checkpoint(k.path),
                     **F64).scores(train, queries)["scores"] for k in kept]
    total = sum(LR_SUMS.values())
    expected = sum(LR_SUMS[k.step] / total * s for k, s in zip(kept, per, strict=True))
    ck = CheckpointInfluence(root / "keep", method="cosine", adam=True, **F64)
    close(ck.scores(train, queries)["scores"], expected, 1e-12)
    assert ck.label() == "cosine_adam_ckpt" and ck.label("identity") == "identity_adam_ckpt"
    with pytest.raises(LancetError, match="not linfac"):
        CheckpointInfluence(root / "keep", method="linfac", adam=True, **F64).scores(train, queries)
    with pytest.raises(LancetError, match="not a finished kept checkpoint"):
        read_checkpoint(root / "plain")


def _jsonl(path, pairs) -> str:
    path.write_text("".join(json.dumps({"prompt": p, "response": r}) + "\n" for p, r in pairs))
    return str(path)


def test_cli_finetune_keeps_checkpoints_and_attribute_averages_them(tmp_path, tiny_tokenizer, capsys):
    from lancet.cli import main
    from lancet.data import encode_records, load_dataset_spec

    model_dir, ft = tmp_path / "m", tmp_path / "ft"
    tiny_llama(len(tiny_tokenizer)).save_pretrained(model_dir)
    tiny_tokenizer.save_pretrained(model_dir)
    train, queries = _jsonl(tmp_path / "train.jsonl", TRAIN), _jsonl(tmp_path / "q.jsonl", QUERIES)
    common = ["--train", train, "--max-steps", "6", "--batch-size", "4", "--lr", "1e-2", "--device", "cpu"]
    assert main(["-q", "finetune", str(model_dir), "--out", str(ft), *common, "--keep-checkpoints", "3"]) == 0
    kept = kept_checkpoints(ft)
    assert [k.name for k in kept] == ["step-2", "step-4", "step-6"]
    assert all(load_model(str(k.path))[0].config.num_hidden_layers == 2 for k in kept)
    assert main(["-q", "finetune", str(model_dir), "--out", str(tmp_path / "ft7"), *common,
                 "--keep-checkpoints", "7"]) == 2
    assert "keep_checkpoints=7 is more than the run's 6 optimizer steps" in capsys.readouterr().err

    run = tmp_path / "run"
    base = ["-q", "attribute", str(model_dir), "--train", train, "--queries", queries, "--out", str(run),
            "--device", "cpu"]
    assert main([*base, "--method", "cosine,identity", "--checkpoints", str(ft), "--adam"]) == 0
    ranking = load_tensors(run / "ranking-cosine_adam_ckpt.safetensors")["scores"]
    rows = encode_records(load_dataset_spec(train), tiny_tokenizer, 512, progress=False)
    iqs = encode_records(load_dataset_spec(queries), tiny_tokenizer, 512, progress=False)
    # the per-checkpoint scores the command stored, averaged by the Python API (read back: no second pass)
    expected = CheckpointInfluence(ft, method="cosine", adam=True, out_dir=run, progress=False).scores(rows, iqs)
    assert torch.equal(ranking, expected["scores"]) and expected["per_checkpoint"].shape == (3, 3, len(TRAIN))
    summary = json.loads((run / "influence-identity_adam_ckpt.json").read_text())
    assert summary["method"] == "identity_adam_ckpt" and summary["checkpoints"]["adam"] is True
    weights = [c["weight"] for c in summary["checkpoints"]["checkpoints"]]
    assert weights == pytest.approx([LR_SUMS[s] / sum(LR_SUMS.values()) for s in (2, 4, 6)], rel=1e-5)
    two = f"{ft}/checkpoints/step-2,{ft}/checkpoints/step-6"
    assert main([*base, "--method", "identity", "--checkpoints", two, "--checkpoint-weights", "uniform"]) == 0
    assert json.loads((run / "influence-identity_ckpt.json").read_text())["checkpoints"]["weighting"] == "uniform"
    assert main([*base, "--method", "cosine", "--adam"]) == 2
    assert "--adam needs --checkpoints" in capsys.readouterr().err

    # the behaviour measurement over checkpoints: a direction fitted at each from the IQs against --counter
    counter = _jsonl(tmp_path / "counter.jsonl", [(q, "I would rather not say.") for q, _ in QUERIES])
    assert main([*base, "--method", "linfac", "--checkpoints", str(ft), "--measurement", "behaviour", "--counter",
                 counter, "--layer", "0"]) == 0
    got = load_tensors(run / "ranking-linfac_behaviour_ckpt.safetensors")["scores"]
    from lancet.influence import BehaviourDirection

    crows = encode_records(load_dataset_spec(counter), tiny_tokenizer, 512, progress=False)
    same = CheckpointInfluence(ft, method="linfac", measurement="behaviour", out_dir=run, progress=False,
                               behaviour=lambda m: BehaviourDirection.fit(m, iqs, crows, layer=0))
    assert torch.allclose(got, same.behaviour_scores(rows, iqs)["linfac"]["scores"].to(got.dtype), rtol=1e-5)
    assert main([*base, "--method", "linfac", "--checkpoints", str(ft), "--measurement", "behaviour"]) == 2
    assert "need --counter FILE" in capsys.readouterr().err

    anchors = _jsonl(tmp_path / "anchors.jsonl", [("Burn?", "Cool it under running water.")])
    assert main([*base, "--method", "repsim_anchored", "--anchors", anchors]) == 0
    assert load_tensors(run / "ranking-repsim_anchored.safetensors")["scores"].shape == (3, len(TRAIN))
    assert main([*base, "--method", "repsim_anchored"]) == 2
    assert "needs --anchors FILE" in capsys.readouterr().err


def test_behaviour_over_checkpoints_is_the_weighted_sum_with_a_direction_per_checkpoint(kept_run, tmp_path):
    """The behaviour as one query at each checkpoint, its direction fitted there from the same contrast rows (or one
    direction for all), averaged with the lr_sum weights: equal to the per-checkpoint ``behaviour_scores``."""
    from lancet.influence import BehaviourDirection, behaviour_scores

    tok, root, _, _ = kept_run
    train, iqs, counter = encode(tok, TRAIN[:6]), encode(tok, QUERIES), encode(tok, TRAIN[6:9])
    kept = kept_checkpoints(root / "keep")

    def fit(model):
        return BehaviourDirection.fit(model, iqs, counter, layer=0)

    total = sum(LR_SUMS.values())
    per = []
    for k in kept:
        model = _f64(k.path)
        run = Influence(model, method="linfac", measurement="behaviour", behaviour=fit(model), **F64)
        per.append(behaviour_scores(run, train, iqs, ["linfac", "identity"]))
    ck = CheckpointInfluence(root / "keep", method="linfac", measurement="behaviour", behaviour=fit,
                             out_dir=tmp_path, **F64)
    got = ck.behaviour_scores(train, iqs, ["linfac", "identity"])
    for method in ("linfac", "identity"):
        expected = sum(LR_SUMS[k.step] / total * p[method]["scores"] for k, p in zip(kept, per, strict=True))
        close(got[method]["scores"], expected, 1e-9)
        assert got[method]["per_checkpoint"].shape == (3, 1, len(train))
    # one direction for every checkpoint (the final model's) is another ranking
    final = fit(_f64(kept[-1].path))
    fixed = CheckpointInfluence(root / "keep", method="linfac", measurement="behaviour", behaviour=final,
                                **F64).behaviour_scores(train, iqs)
    assert not torch.allclose(fixed["linfac"]["scores"], got["linfac"]["scores"], rtol=1e-3)
    with pytest.raises(LancetError, match="needs behaviour="):
        CheckpointInfluence(root / "keep", method="linfac", measurement="behaviour").behaviour_scores(train, iqs)
