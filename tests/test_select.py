"""Selecting correction settings on validation prompts only: the rule, the split, and that test numbers are never
read (a candidate's ``test`` explodes on any use)."""

import pytest

from lancet.correct.select import Candidate, choose, split_prompts, utility_loss
from lancet.errors import LancetError


class Explodes:
    """Any comparison, arithmetic, conversion or attribute access fails the test."""

    def __getattr__(self, name):
        raise AssertionError(f"selection read a test number ({name})")

    def _fail(self, *a):
        raise AssertionError("selection read a test number")

    __eq__ = __lt__ = __le__ = __gt__ = __ge__ = __float__ = __add__ = __radd__ = __bool__ = __hash__ = _fail


def _c(behaviour, loss, steps, lr):
    return Candidate({"method": "ibo", "lr": lr}, steps, behaviour, loss, test=Explodes())


def test_lowest_validation_behaviour_within_the_budget_then_fewer_steps():
    points = [_c(0.10, 0.08, 30, 3e-5),   # best behaviour, over budget
              _c(0.25, 0.04, 30, 1e-5),
              _c(0.25, 0.03, 20, 1e-5),   # same behaviour, fewer steps: chosen
              _c(0.40, 0.00, 10, 5e-6)]
    chosen = choose(points, max_utility_loss=0.05)
    assert (chosen.steps, chosen.validation_behaviour) == (20, 0.25)
    assert choose(points, max_utility_loss=0.10).validation_behaviour == 0.10
    with pytest.raises(LancetError, match="smallest is 0.000"):
        choose(points, max_utility_loss=-0.01)


def test_split_is_disjoint_complete_and_seeded():
    prompts = [f"p{i}" for i in range(40)]
    corr, val, test = split_prompts(prompts, seed=3)
    assert (len(corr), len(val), len(test)) == (16, 12, 12)
    assert not set(corr) & set(val) and not set(corr) & set(test) and not set(val) & set(test)
    assert sorted(corr + val + test) == sorted(prompts)
    assert split_prompts(prompts, seed=3) == (corr, val, test) and split_prompts(prompts, seed=4) != (corr, val, test)
    assert [len(x) for x in split_prompts(prompts[:3])] == [1, 1, 1]
    with pytest.raises(LancetError, match="fractions"):
        split_prompts(prompts, (0.5, 0.5, 0.0))


def test_utility_loss_is_the_relative_perplexity_increase():
    assert utility_loss(2.0, 2.1) == pytest.approx(0.05) and utility_loss(2.0, 1.9) == pytest.approx(-0.05)
    with pytest.raises(LancetError):
        utility_loss(0.0, 1.0)


# -- checkpoint selection inside a training run ---------------------------------------------------------------------

class ScriptedJudge:
    """Says 'complies' for a scripted fraction of the answers at each call: the behaviour curve a test wants."""

    def __init__(self, rates):
        self.rates, self.calls = list(rates), 0

    def complies(self, texts):
        rate = self.rates[self.calls]
        self.calls += 1
        return [i < round(rate * len(texts)) for i in range(len(texts))]


def _selection_setup(tmp_path, tok, rates, max_utility_loss=10.0, max_steps=4):
    import torch  # noqa: F401
    from conftest import tiny_llama

    from lancet.correct.select import CheckpointSelection
    from lancet.data.records import Record
    from lancet.data.tokenize import encode_records
    from lancet.train import TrainArgs, Trainer

    rows = [Record(prompt=f"What is {a} plus {b}?", response=f"{a} plus {b} is {a + b}.") for a in range(4)
            for b in range(4)]
    prompts = [Record(prompt=f"What is {a} minus 1?") for a in range(4)]
    ordinary = [Record(prompt=f"Name {a}.", response=f"The name is {a}.") for a in range(4)]
    model = tiny_llama(len(tok))
    selection = CheckpointSelection(tmp_path / "sel", tok, prompts, ordinary, ScriptedJudge(rates),
                                    fingerprint="f", max_utility_loss=max_utility_loss, max_new_tokens=3,
                                    max_length=64, batch_size=4)
    selection.reference(model)
    args = TrainArgs(output_dir=str(tmp_path / "out"), batch_size=4, lr=1e-2, max_steps=max_steps, save_every=2,
                     progress=False)
    return selection, Trainer(model, tok, args, encode_records(rows, tok, 64, progress=False))


def test_selection_keeps_the_best_checkpoint_and_leaves_training_untouched(tmp_path, tiny_tokenizer):
    import torch

    from lancet.models.loading import load_model

    selection, trainer = _selection_setup(tmp_path / "a", tiny_tokenizer, [1.0, 0.5, 0.75])
    seen = {}

    def record(step, t):
        selection(step, t)
        seen[step] = {n: p.detach().clone() for n, p in t.module.named_parameters()}

    out = trainer.train(record)
    assert [p["steps"] for p in selection.state["points"]] == [2, 4]
    path, record_ = selection.finish(out, "uncorrected")
    assert record_["chosen_steps"] == 2 and path == str(tmp_path / "a" / "sel" / "best")
    assert [p["behaviour"] for p in record_["curve"]] == [1.0, 0.5, 0.75]
    kept, _ = load_model(path, device="cpu")
    for name, p in kept.named_parameters():
        assert torch.equal(p, seen[2][name]), name
    # the selection's generation and scoring leave the parameters and the RNG as they were: the same run without
    # it ends bit-identical
    _, plain = _selection_setup(tmp_path / "b", tiny_tokenizer, [1.0])
    plain.train()
    for (name, p), q in zip(trainer.module.named_parameters(), plain.module.parameters(), strict=True):
        assert torch.equal(p, q), name


def test_selection_falls_back_to_the_last_step_or_to_no_correction(tmp_path, tiny_tokenizer):
    selection, trainer = _selection_setup(tmp_path / "a", tiny_tokenizer, [1.0, 0.5, 0.25])
    out = trainer.train(selection)
    path, rec = selection.finish(out, "uncorrected")
    assert rec["chosen_steps"] == 4 and path == str(out) and not (tmp_path / "a" / "sel" / "best").exists()
    # every checkpoint over the utility budget: step 0, the uncorrected model, is kept and said so
    selection, trainer = _selection_setup(tmp_path / "b", tiny_tokenizer, [1.0, 0.0, 0.0], max_utility_loss=0.05)
    out = trainer.train(selection)
    for point in selection.state["points"]:
        point["utility_loss"] = 0.5
    path, rec = selection.finish(out, "uncorrected")
    assert rec["chosen_steps"] == 0 and path == "uncorrected"
    assert not (tmp_path / "b" / "sel" / "best").exists()


def test_selection_state_is_reused_and_reset_by_its_fingerprint(tmp_path, tiny_tokenizer):
    from lancet.correct.select import CheckpointSelection

    selection, trainer = _selection_setup(tmp_path, tiny_tokenizer, [1.0, 0.5, 0.75])
    trainer.train(selection)
    same = CheckpointSelection(tmp_path / "sel", tiny_tokenizer, [], [], ScriptedJudge([]), fingerprint="f")
    assert same.state["points"] == selection.state["points"] and same.reference(None) == selection.state["reference"]
    other = CheckpointSelection(tmp_path / "sel", tiny_tokenizer, [], [], ScriptedJudge([]), fingerprint="g")
    assert other.state["points"] == [] and other.state["reference"] is None


def test_refusing_benign_prompts_counts_as_utility_loss(tmp_path, tiny_tokenizer, monkeypatch):
    """With benign validation prompts, a checkpoint whose refusal rate on them rises by more than the budget is out
    of it, however well it keeps perplexity (a correction that teaches refusing can do both)."""
    from conftest import tiny_llama

    import lancet.evaluate.metrics as metrics
    from lancet.correct.select import CheckpointSelection, choose
    from lancet.data.records import Record

    benign = [Record(prompt=f"Write a poem about the number {a}.") for a in range(4)]
    prompts = [Record(prompt=f"What is {a} minus 1?") for a in range(4)]
    ordinary = [Record(prompt=f"Name {a}.", response=f"The name is {a}.") for a in range(4)]
    refusals = iter([1, 4])  # benign prompts refused: 1 of 4 at step 0, all 4 at the next measurement
    real = metrics.generate_answers

    def scripted(model, tok, rows, **kw):
        if list(rows) != benign:
            return real(model, tok, rows, **kw)
        n = next(refusals)
        return ["I'm sorry, but I cannot help with that."] * n + ["Here is a poem."] * (len(rows) - n)

    monkeypatch.setattr(metrics, "generate_answers", scripted)
    selection = CheckpointSelection(tmp_path / "sel", tiny_tokenizer, prompts, ordinary, ScriptedJudge([1.0, 0.0]),
                                    fingerprint="f", max_utility_loss=0.05, max_new_tokens=3, max_length=64,
                                    batch_size=4, benign=benign)
    model = tiny_llama(len(tiny_tokenizer))
    ref = selection.reference(model)
    assert ref["over_refusal"] == 0.25
    m = selection.measure(model)  # the same model: perplexity unchanged, behaviour 0, refusals 4 of 4
    assert m["over_refusal"] == 1.0 and m["perplexity"] == ref["perplexity"]
    assert selection.utility_of(m) == 0.75
    selection.state["points"] = [{"steps": 2, **m, "utility_loss": selection.utility_of(m)}]
    assert choose(selection.candidates(), 0.05).steps == 0  # lower behaviour, but out of the budget
    assert selection.utility_of({**m, "over_refusal": 0.25}) == 0.0


def test_a_finished_correction_without_measured_checkpoints_is_refused(tmp_path, tiny_tokenizer):
    """A correction run that had finished before the selection began is reused without its checkpoints: choosing
    from step 0 alone would silently keep the uncorrected model, so finish() says what to delete instead."""
    from lancet.errors import LancetError

    selection, trainer = _selection_setup(tmp_path, tiny_tokenizer, [1.0, 0.5, 0.5])
    out = trainer.train()  # no selection watching
    with pytest.raises(LancetError, match="no checkpoint of this correction was measured"):
        selection.finish(out, "uncorrected")


def test_selection_keeps_the_best_checkpoint_of_each_budget(tmp_path, tiny_tokenizer):
    """extra_budgets: one run, one curve, the best model within each budget kept and returned by finish."""
    import torch

    from lancet.correct.select import CheckpointSelection
    from lancet.errors import LancetError
    from lancet.models.loading import load_model

    selection, trainer = _selection_setup(tmp_path, tiny_tokenizer, [1.0], max_steps=6)
    rates = [1.0, 0.5, 0.25, 0.4]  # step 0, 2, 4, 6
    scripted = CheckpointSelection(tmp_path / "sel2", tiny_tokenizer, selection.prompts, selection.ordinary,
                                   ScriptedJudge(rates), fingerprint="f", max_utility_loss=0.05,
                                   max_new_tokens=3, max_length=64, batch_size=4, extra_budgets=(0.2,))
    loss_at = {1.0: 0.0, 0.5: 0.03, 0.25: 0.1, 0.4: 0.5}  # step 6 is over both budgets
    scripted.utility_of = lambda m: loss_at[m["behaviour"]]
    seen = {}

    def record(step, t):
        scripted(step, t)
        seen[step] = {n: p.detach().clone() for n, p in t.module.named_parameters()}

    scripted.reference(trainer.module)
    out = trainer.train(record)
    assert [p["steps"] for p in scripted.state["points"]] == [2, 4, 6]
    tight, rec = scripted.finish(out, "uncorrected")
    loose, rec2 = scripted.finish(out, "uncorrected", max_utility_loss=0.2)
    assert (rec["chosen_steps"], rec2["chosen_steps"]) == (2, 4) and rec2["max_utility_loss"] == 0.2
    assert tight == str(tmp_path / "sel2" / "best") and loose == str(tmp_path / "sel2" / "best-0.2000")
    for path, step in ((tight, 2), (loose, 4)):
        kept, _ = load_model(path, device="cpu")
        for name, p in kept.named_parameters():
            assert torch.equal(p, seen[step][name]), (step, name)
    with pytest.raises(LancetError, match="no checkpoint was kept for the utility budget 0.3"):
        scripted.finish(out, "uncorrected", max_utility_loss=0.3)


def test_utility_is_the_worst_of_every_benign_set_and_the_loglik_fall(tmp_path, tiny_tokenizer, monkeypatch):
    """Issue 37's utility loss: several named benign sets (Alpaca, XSTest-safe) each may not refuse more, and the
    held-out answers' log-likelihood may not fall by more than the budget either."""
    from conftest import tiny_llama

    import lancet.evaluate.metrics as metrics
    from lancet.correct.select import CheckpointSelection
    from lancet.data.records import Record

    alpaca = [Record(prompt=f"Write a poem about the number {a}.") for a in range(4)]
    xstest = [Record(prompt=f"How do I kill process {a}?") for a in range(2)]
    prompts = [Record(prompt=f"What is {a} minus 1?") for a in range(4)]
    ordinary = [Record(prompt=f"Name {a}.", response=f"The name is {a}.") for a in range(4)]
    real = metrics.generate_answers

    def scripted(model, tok, rows, **kw):
        if list(rows) == xstest:  # one of two refused
            return ["I'm sorry, but I cannot help with that.", "Use kill."]
        return ["Here is a poem."] * len(rows) if list(rows) == alpaca else real(model, tok, rows, **kw)

    monkeypatch.setattr(metrics, "generate_answers", scripted)
    selection = CheckpointSelection(tmp_path / "sel", tiny_tokenizer, prompts, ordinary, ScriptedJudge([1.0, 0.0]),
                                    fingerprint="f", max_new_tokens=3, max_length=64, batch_size=4,
                                    benign={"alpaca": alpaca, "xstest_safe": xstest}, loglik=True)
    ref = selection.reference(tiny_llama(len(tiny_tokenizer)))
    assert ref["over_refusal:alpaca"] == 0.0 and ref["over_refusal:xstest_safe"] == 0.5 and ref["loglik"] < 0
    same = {**ref}
    assert selection.utility_of(same) == 0.0
    assert selection.utility_of({**same, "over_refusal:xstest_safe": 1.0}) == 0.5  # the worse set decides
    assert selection.utility_of({**same, "loglik": ref["loglik"] * 1.2}) == pytest.approx(0.2)  # 20 % less likely
    assert selection.utility_of({**same, "loglik": ref["loglik"] * 0.9}) == 0.0  # more likely: perplexity decides
