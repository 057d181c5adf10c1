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
