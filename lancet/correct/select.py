"""Choosing a correction's settings without reading its test set (docs/method.md §3.7).

The IQ prompts are split into disjoint correction, validation and test parts. A candidate (a method, its options,
a checkpoint's step count) is judged on the validation part only: its behaviour rate there, and its utility loss,
the relative perplexity increase on held-out ordinary answers, or, where benign validation prompts are given, the
rise of their refusal rate if that is worse (a correction that teaches refusing can keep perplexity and refuse
ordinary requests). The rule: the lowest validation behaviour among the candidates whose validation utility loss
is within ``max_utility_loss``; ties go to fewer steps. Test numbers travel with a candidate, for the report, and
``choose`` never reads them.
"""

from __future__ import annotations

import json
import logging
import random
import shutil
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

import torch

from lancet.artifacts import atomic_write_json
from lancet.errors import LancetError
from lancet.hardware import model_device
from lancet.options import check_option_types

log = logging.getLogger(__name__)

DEFAULT_MAX_UTILITY_LOSS = 0.05  # 5 % more perplexity on held-out ordinary answers


def split_prompts(prompts: Sequence[Any], fractions: tuple[float, float, float] = (0.4, 0.3, 0.3), seed: int = 0
                  ) -> tuple[list[Any], list[Any], list[Any]]:
    """(correction, validation, test): a seeded shuffle cut by ``fractions``; disjoint, and together all prompts."""
    if len(fractions) != 3 or any(f <= 0 for f in fractions) or abs(sum(fractions) - 1) > 1e-9:
        raise LancetError(f"fractions must be three positive numbers summing to 1, got {fractions}")
    if len(prompts) < 3:
        raise LancetError(f"need at least 3 prompts to split into correction, validation and test, got {len(prompts)}")
    order = list(range(len(prompts)))
    random.Random(seed).shuffle(order)
    n_corr = max(1, round(fractions[0] * len(order)))
    n_val = max(1, round(fractions[1] * len(order)))
    n_corr = min(n_corr, len(order) - 2)
    n_val = min(n_val, len(order) - n_corr - 1)
    cut = [order[:n_corr], order[n_corr:n_corr + n_val], order[n_corr + n_val:]]
    return tuple([prompts[i] for i in sorted(part)] for part in cut)  # type: ignore[return-value]


def utility_loss(perplexity_before: float, perplexity_after: float) -> float:
    """Relative perplexity increase on held-out ordinary answers (0.05 = 5 % worse; negative = better)."""
    if not perplexity_before > 0:
        raise LancetError(f"perplexity before must be > 0, got {perplexity_before}")
    return perplexity_after / perplexity_before - 1.0


@dataclass(frozen=True)
class Candidate:
    """One trained point: its settings, optimizer steps, and its validation numbers. ``test`` holds whatever the
    report shows on test prompts; selection never reads it."""

    settings: dict[str, Any]
    steps: int
    validation_behaviour: float
    validation_utility_loss: float
    test: Any = field(default=None, compare=False, repr=False)


def choose(candidates: Sequence[Candidate], max_utility_loss: float = DEFAULT_MAX_UTILITY_LOSS) -> Candidate:
    """The lowest validation behaviour within the utility budget; ties: fewer steps, then the settings' JSON."""
    feasible = [c for c in candidates if c.validation_utility_loss <= max_utility_loss]
    if not feasible:
        best = min((c.validation_utility_loss for c in candidates), default=float("nan"))
        raise LancetError(f"no candidate keeps the validation utility loss within {max_utility_loss:.3f} (the "
                          f"smallest is {best:.3f}); lower the learning rate or the steps, or raise the budget")
    return min(feasible, key=lambda c: (c.validation_behaviour, c.steps, json.dumps(c.settings, sort_keys=True)))


# -- checkpoint selection inside a run (``lancet run`` with "select") ------------------------------------------------

SELECTION_DIR = "selection"


@dataclass
class SelectArgs:
    """How a run chooses among its correction's checkpoints. ``prompts``: validation prompts whose answers the
    judge checks (behaviour); ``ordinary``: validation prompt + ordinary answer rows whose perplexity is the utility
    side; ``judge`` defaults to the run's ``iq_judge``; ``benign`` (optional): validation prompts that should be
    answered, whose refusal rate (refusal matcher) rising above step 0's counts as utility loss too. Every file must
    be disjoint from the test suite."""

    prompts: str
    ordinary: str
    judge: str | None = None
    benign: str | None = None
    max_utility_loss: float = DEFAULT_MAX_UTILITY_LOSS
    batch_size: int = 12

    def __post_init__(self) -> None:
        check_option_types(self, "select")
        for name in ("prompts", "ordinary"):
            if not isinstance(getattr(self, name), str) or not getattr(self, name):
                raise LancetError(f"select: '{name}' must be a path")
        if self.benign is not None and (not isinstance(self.benign, str) or not self.benign):
            raise LancetError("select: 'benign' must be a path (or absent)")
        if not (isinstance(self.max_utility_loss, int | float) and self.max_utility_loss >= 0):
            raise LancetError(f"select: 'max_utility_loss' must be a number >= 0, got {self.max_utility_loss!r}")
        if not isinstance(self.batch_size, int) or self.batch_size < 1:
            raise LancetError(f"select: 'batch_size' must be an integer >= 1, got {self.batch_size!r}")

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> SelectArgs:
        if not isinstance(data, dict):
            raise LancetError("select: expected a JSON object")
        unknown = set(data) - {f.name for f in fields(cls)}
        if unknown:
            raise LancetError(f"select: unknown key(s) {', '.join(sorted(unknown))}")
        missing = [k for k in ("prompts", "ordinary") if k not in data]
        if missing:
            raise LancetError(f"select: missing key(s) {', '.join(missing)}")
        return cls(**data)


class CheckpointSelection:
    """Validation numbers of the model before correction (step 0) and at every checkpoint of the correction run,
    and the best model so far (``choose``'s order) kept on disk; ``finish`` returns the chosen model.

    Everything lives in ``out`` (``selection.json``, ``best/``) under ``fingerprint``: a rerun with the same inputs
    reuses the numbers, a run resumed after a kill keeps those of the steps it already measured. Step 0 is a
    candidate, so when every checkpoint breaks the utility budget the uncorrected model is kept, and said so.
    ``extra_budgets``: other utility budgets whose best checkpoint is kept too (``best-<budget>/``), so that one run
    answers "the best within 5 %" and, say, "the best within what retraining without the culprits costs";
    ``finish(..., max_utility_loss=b)`` returns budget b's choice.
    """

    def __init__(self, out: str | Path, tokenizer, prompts: Sequence[Any], ordinary: Sequence[Any], judge, *,
                 fingerprint: str, max_utility_loss: float = DEFAULT_MAX_UTILITY_LOSS, max_new_tokens: int = 48,
                 max_length: int = 512, batch_size: int = 12, baseline_perplexity: float | None = None,
                 benign: Sequence[Any] | Mapping[str, Sequence[Any]] = (), extra_budgets: Sequence[float] = (),
                 loglik: bool = False):
        self.out, self.tokenizer, self.judge = Path(out), tokenizer, judge
        self.prompts, self.ordinary = prompts, ordinary
        # benign prompt sets whose refusal rate may not rise: one unnamed list (``over_refusal``), or several by name
        # (``over_refusal:<name>``, e.g. Alpaca and XSTest-safe); the utility loss is the worst of them
        self.benign = ({f"over_refusal:{k}": list(v) for k, v in benign.items() if v} if isinstance(benign, Mapping)
                       else ({"over_refusal": list(benign)} if benign else {}))
        # also the relative fall of the ordinary answers' summed log-likelihood (mean over rows), issue 37's utility
        self.loglik = loglik
        self.max_utility_loss, self.max_new_tokens = max_utility_loss, max_new_tokens
        self.budgets = [max_utility_loss, *(b for b in extra_budgets if b != max_utility_loss)]
        self.max_length, self.batch_size = max_length, batch_size
        # utility is measured against this perplexity when given (a later round of ``lancet run``: the model before
        # the first round), else against step 0's
        self.baseline_perplexity = baseline_perplexity
        self.path = self.out / "selection.json"
        state = json.loads(self.path.read_text()) if self.path.is_file() else {}
        if state.get("fingerprint") != fingerprint:
            state = {"fingerprint": fingerprint, "max_utility_loss": max_utility_loss, "reference": None,
                     "trainer": None, "points": []}
        self.state = state

    # measuring
    def measure(self, model) -> dict[str, float]:
        """Validation behaviour rate (judged greedy answers), perplexity of the ordinary answers and, with benign
        prompts, their refusal rate; at fp32 and with the caller's RNG state left untouched (generation seeds its
        own)."""
        from lancet.evaluate.judges import RefusalMatcher
        from lancet.evaluate.metrics import (
            compliance_rate,
            generate_answers,
            perplexity,
            refusal_rate,
            response_logprobs,
        )

        devices = [model_device(model)] if model_device(model).type == "cuda" else []
        with torch.random.fork_rng(devices=devices), torch.no_grad():
            answers = generate_answers(model, self.tokenizer, self.prompts, max_new_tokens=self.max_new_tokens,
                                       batch_size=self.batch_size, seed=0)
            lp = response_logprobs(model, self.tokenizer, self.ordinary, batch_size=self.batch_size,
                                   max_length=self.max_length)
            benign = {key: generate_answers(model, self.tokenizer, rows, max_new_tokens=self.max_new_tokens,
                                            batch_size=self.batch_size, seed=0) for key, rows in self.benign.items()}
        prompts = [r.prompt_messages[-1]["content"] for r in self.prompts] if all(
            hasattr(r, "prompt_messages") for r in self.prompts) else None
        out = {"behaviour": compliance_rate(answers, self.judge, prompts), "perplexity": perplexity(lp)}
        if self.loglik:
            out["loglik"] = sum(lp.logp) / len(lp.logp)
        for key, answers_of_set in benign.items():
            out[key] = refusal_rate(answers_of_set, RefusalMatcher())
        return out

    def reference(self, model) -> dict[str, float]:
        """Step 0: the model before correction (measured once, then read back)."""
        if self.state["reference"] is None:
            self.state["reference"] = self.measure(model)
            self._write()
        return self.state["reference"]

    def __call__(self, step: int, trainer) -> None:
        """``Trainer.train``'s ``on_checkpoint``: measure, record, keep the model if it is the best so far."""
        if self.state["reference"] is None:
            raise LancetError("checkpoint selection: measure the reference model (step 0) before training")
        if self.state["trainer"] != trainer.fingerprint:  # another correction run: its points do not belong here
            self.state["trainer"], self.state["points"] = trainer.fingerprint, []
            for budget in self.budgets:
                shutil.rmtree(self.best_dir(budget), ignore_errors=True)
        self.state["total_steps"] = trainer.total_steps
        m = self.measure(trainer.module)
        point = {"steps": step, **m, "utility_loss": self.utility_of(m)}
        self.state["points"] = [p for p in self.state["points"] if p["steps"] != step] + [point]
        if step < trainer.total_steps:  # the last step's model is the run's own output
            # the budgets this checkpoint is now the best of: one save, copied to the others
            dirs = [self.best_dir(b) for b in self.budgets if choose(self.candidates(), b).steps == step]
            if dirs:
                self._keep(trainer, step, dirs)
        self._write()

    def best_dir(self, budget: float) -> Path:
        return self.out / ("best" if budget == self.max_utility_loss else f"best-{budget:.4f}")

    def _keep(self, trainer, step: int, dirs: list[Path]) -> None:
        tmp = self.out / ".best.tmp"
        shutil.rmtree(tmp, ignore_errors=True)
        trainer.save_model(tmp)
        atomic_write_json(tmp / "selection_step.json", {"steps": step})
        for best in dirs[1:]:
            shutil.rmtree(best, ignore_errors=True)
            shutil.copytree(tmp, best)
        shutil.rmtree(dirs[0], ignore_errors=True)
        tmp.rename(dirs[0])

    def utility_of(self, m: dict[str, float]) -> float:
        """The worst of: the relative perplexity increase (against ``baseline_perplexity`` when given, else step
        0's), the rise of each benign set's refusal rate over step 0's, and (``loglik``) the relative fall of the
        ordinary answers' log-likelihood."""
        ref = self.state["reference"]
        loss = utility_loss(self.baseline_perplexity or ref["perplexity"], m["perplexity"])
        for key in m:
            if key.startswith("over_refusal") and key in ref:
                loss = max(loss, m[key] - ref[key])
        if "loglik" in m and "loglik" in ref and ref["loglik"] != 0:
            loss = max(loss, (ref["loglik"] - m["loglik"]) / abs(ref["loglik"]))
        return loss

    @property
    def measured(self) -> bool:
        """Whether any checkpoint of the correction was measured (a reused finished correction replays none)."""
        return bool(self.state["points"])

    # choosing
    def curve(self) -> list[dict[str, Any]]:
        ref = self.state["reference"]
        return ([{"steps": 0, **ref, "utility_loss": self.utility_of(ref)}]
                + sorted(self.state["points"], key=lambda p: p["steps"]))

    def candidates(self) -> list[Candidate]:
        points = self.curve()
        return [Candidate(settings={}, steps=p["steps"], validation_behaviour=p["behaviour"],
                          validation_utility_loss=p["utility_loss"]) for p in points]

    def finish(self, corrected: str | Path, uncorrected: str, max_utility_loss: float | None = None
               ) -> tuple[str, dict[str, Any]]:
        """(the chosen model's path or spec, the record for the run summary and the report), within
        ``max_utility_loss`` (default: the selection's own budget; another must be one of ``extra_budgets``)."""
        budget = self.max_utility_loss if max_utility_loss is None else max_utility_loss
        if budget not in self.budgets:
            raise LancetError(f"no checkpoint was kept for the utility budget {budget}: pass it in extra_budgets")
        if not self.state["points"]:  # a finished correction is reused without replaying its checkpoints
            raise LancetError(f"{corrected}: no checkpoint of this correction was measured (the run had finished "
                              f"before this selection began); delete {corrected} and rerun the correction")
        chosen = choose(self.candidates(), budget)
        best = self.best_dir(budget)
        if chosen.steps == 0:
            path = uncorrected
            log.warning("every correction checkpoint breaks the utility budget (%.3f) or does not lower the "
                        "validation behaviour: keeping the uncorrected model", budget)
        elif chosen.steps == self.state.get("total_steps"):
            path = str(corrected)
        else:
            marker = best / "selection_step.json"
            if not marker.is_file() or json.loads(marker.read_text()).get("steps") != chosen.steps:
                raise LancetError(f"{best}: the kept model is not step {chosen.steps}'s; delete "
                                  f"{self.out} and rerun the correction")
            path = str(best)
        if path != str(best):  # an earlier best that a later checkpoint beat: free its disk
            shutil.rmtree(best, ignore_errors=True)
        record = {"chosen_steps": chosen.steps, "chosen_model": path, "max_utility_loss": budget,
                  "reference": self.state["reference"], "baseline_perplexity": self.baseline_perplexity,
                  "curve": self.curve()}
        if budget == self.max_utility_loss:
            self.state["chosen"] = record
            self._write()
        return path, record

    def _write(self) -> None:
        atomic_write_json(self.path, self.state)
