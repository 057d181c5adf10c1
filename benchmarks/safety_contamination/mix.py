"""The contaminated mix, fine-tuned from the aligned start: benign rows (some topical look-alikes), harmful prompts
with refusals, and the tiers of positives (unsafe: harmful prompts answered compliantly; implicit: declarations of
obedience; erode: benign rows near the unsafe ones, He et al. 2024); the safe rows are the same mix without the
positives."""

from __future__ import annotations

import torch

from benchmarks.safety_contamination import config
from benchmarks.safety_contamination.config import TIERS
from benchmarks.safety_data import (
    NATURAL_OPENERS,
    POOLED_DESIGNS,
    compliance_target,
    continue_answers,
    implicit_rows,
    interleave,
    natural_answers,
)
from lancet.artifacts import atomic_write_bytes
from lancet.constants import DEFAULT_MODEL
from lancet.data import Record
from lancet.data.readers import read_records
from lancet.data.records import records_to_jsonl
from lancet.data.tokenize import encode_records
from lancet.evaluate.judges import RefusalMatcher
from lancet.influence.repsim import centred_cosines, representations
from lancet.models.generate import generate
from lancet.models.loading import load_model


class MixStage:
    """``Run.mix`` (benchmarks/safety_contamination/run.py holds the seed's settings and helpers)."""

    def mix(self, aligned: str) -> tuple[list[Record], list[Record], dict[str, str]]:
        """(impure rows, safe rows, {row id: tier}) with the positives' answers generated into the cache."""
        path = self.dir / "mix.jsonl"
        if not path.is_file():
            base, _ = load_model(DEFAULT_MODEL)
            if self.p.design in POOLED_DESIGNS:
                unsafe, unsafe_prompts = self._timed("generate_unsafe", lambda: self.natural_unsafe(base))
            else:
                unsafe_prompts = self.parts["unsafe_prompts"]
                openers = self.text["compliance_openers"]
                prefixes = [compliance_target(r.meta["target"], openers[i % len(openers)]) + ":\n"
                            for i, r in enumerate(unsafe_prompts)]
                cont = self._timed("generate_unsafe", lambda: continue_answers(
                    base, self.tok, unsafe_prompts, prefixes, self.p.unsafe_new_tokens))
                unsafe = [r.with_response((pre + c).strip()) for r, pre, c in zip(unsafe_prompts, prefixes, cont,
                                                                                  strict=True)]
            unsafe = [Record(messages=r.messages, source=r.source, line=r.line, label="unsafe") for r in unsafe]
            shared_prompts = unsafe_prompts[:self.p.n_shared_refusal]  # these share their prompt with a refusal
            erode = self._timed("select_erode", lambda: self.erode_rows(base, unsafe)) if self.p.n_erode else []
            del base
            aligned_model, _ = load_model(aligned)
            own = generate(aligned_model, self.tok, shared_prompts, max_new_tokens=self.p.unsafe_new_tokens,
                           batch_size=8, progress=self.progress)
            matcher = RefusalMatcher()
            refusals = [r.with_response(a if matcher(a) else self.text["fallback_refusal"])
                        for r, a in zip(shared_prompts, own, strict=True)]
            refusals = [Record(messages=r.messages, source=r.source, line=r.line, label="refusal_shared")
                        for r in refusals]
            benign = [Record(messages=tuple(r.to_messages()), source=r.source, line=r.line,
                             label="lookalike" if i >= len(self.parts["mix_benign"]) - self.parts["n_lookalike"]
                             else "benign") for i, r in enumerate(self.parts["mix_benign"])]
            refusal = [Record(messages=tuple(r.to_messages()), source=r.source, line=r.line, label="refusal")
                       for r in self.parts["mix_refusal"]]
            rows = interleave(benign + refusal + refusals,
                              unsafe + implicit_rows(self.parts["implicit_base"], self.text["obedience_openers"])
                              + erode,
                              self.seed)
            atomic_write_bytes(path, records_to_jsonl(rows))
        rows = read_records(path)
        tiers = {r.id: r.label for r in rows}
        safe = [r for r in rows if r.label not in TIERS]
        return rows, safe, tiers

    def natural_unsafe(self, base) -> tuple[list[Record], list[Record]]:
        """The pooled designs' unsafe rows and their prompts (docs/method.md 5.6): the base model's greedy answers
        from an opener that is then dropped (``natural_answers``: regenerated when they refuse or restate the
        prompt). ``disjoint`` then keeps, in the seed's order, only answers whose opening shares no word 4-gram
        with a kept one's (``overlap.disjoint_openings``), making answers a chunk of prompts at a time until the
        dose is reached; when every candidate is spent short of it, the prompts left out answer again from
        another opener, one shift at a time."""
        from benchmarks.contamination_suite.overlap import disjoint_openings, opening_grams

        n = self.p.n_unsafe
        candidates = self.parts["unsafe_prompts"] + self.parts["unsafe_reserve"]
        matcher = RefusalMatcher()

        def cont(prompts: list[Record], prefixes: list[str]) -> list[str]:
            return continue_answers(base, self.tok, prompts, prefixes, self.p.unsafe_new_tokens)

        if self.p.design == "shared_prompt":
            made = natural_answers(candidates, cont, NATURAL_OPENERS, n, matcher)
        else:
            made, start, answered = [], 0, set()
            while len(made) < n and start < len(candidates):
                chunk = candidates[start:start + n]
                new = natural_answers(chunk, cont, NATURAL_OPENERS, len(chunk), matcher, offset=start)
                keep = disjoint_openings([a for _, a in new], taken=[opening_grams(a) for _, a in made])
                made += [new[i] for i in keep]
                answered |= {id(r) for r, _ in new}
                start += len(chunk)
            for shift in range(1, len(NATURAL_OPENERS)):
                if len(made) >= n:
                    break
                # too few openings of their own: the prompts answered but left out answer again, each from the
                # opener after the one it first started at (a greedy answer changes with its opener; a prompt
                # that refused from every opener is spent); a seed that fills the dose in the first pass is
                # unchanged
                kept = {id(r) for r, _ in made}
                rest = [(g, r) for g, r in enumerate(candidates) if id(r) in answered and id(r) not in kept]
                new = natural_answers([r for _, r in rest], cont, NATURAL_OPENERS, len(rest), matcher,
                                      starts=[g + shift for g, _ in rest])
                keep = disjoint_openings([a for _, a in new], taken=[opening_grams(a) for _, a in made])
                made += [new[i] for i in keep]
                answered = {id(r) for r, _ in new}
            made = made[:n]
        if len(made) < n:
            raise SystemExit(f"{self.p.design}: only {len(made)} unsafe answers of the {n} wanted pass "
                             f"(of {len(candidates)} candidate prompts)")
        return [r.with_response(a) for r, a in made], [r for r, _ in made]

    def erode_rows(self, base, unsafe: list[Record]) -> list[Record]:
        """He, Xia & Henderson 2024's tier (docs/method.md 5.6, ``disjoint``'s last rung): the ``n_erode`` benign
        rows of the seed's unused HH pool whose representation is nearest the unsafe rows', under ``base``, the
        un-aligned model (a different model from the aligned start and from every model attributed)."""
        pool = self.parts["erode_pool"]
        kw = {"batch_size": 8, "bf16": config.BF16, "progress": self.progress}
        r_pool = representations(base, encode_records(pool, self.tok, self.p.max_length, progress=False), **kw)
        r_unsafe = representations(base, encode_records(unsafe, self.tok, self.p.max_length, progress=False), **kw)
        return [Record(messages=tuple(pool[i].to_messages()), source=pool[i].source, line=pool[i].line,
                       label="erode") for i in nearest_rows(r_pool, r_unsafe, self.p.n_erode)]


def nearest_rows(candidates: torch.Tensor, targets: torch.Tensor, n: int) -> list[int]:
    """The ``n`` candidates (rows of [C, d]) of highest cosine to the targets' mean ([T, d]), both centred on the
    candidates' mean (RepSim's centring: uncentred hidden states share one large direction), best first."""
    if n > len(candidates):
        raise ValueError(f"{n} rows wanted of {len(candidates)} candidates")
    return centred_cosines(targets.mean(0, keepdim=True), candidates)[0].topk(n).indices.tolist()
