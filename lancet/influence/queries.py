"""Influence queries taken from the model itself: its greedy answers to prompts, kept where a judge flags them."""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

from lancet.artifacts import atomic_write_bytes, atomic_write_json, hash_json, model_fingerprint
from lancet.data.readers import read_records
from lancet.data.records import Record, records_to_jsonl
from lancet.evaluate.judges import judge_complies
from lancet.models.generate import generate


def take_iqs(model, tokenizer, prompts: Sequence[Record], judge, out: str | Path, *, max_new_tokens: int,
             batch_size: int = 12, progress: bool = True) -> list[Record]:
    """IQs = (prompt, the model's greedy answer) for each prompt whose answer ``judge.complies`` flags.

    A judge with ``cue_spans`` (the rule judge) also stores where in each answer the behaviour is, as
    ``meta.behaviour_spans`` (the query measurement ``spans`` reads them).
    Stored as ``out/iqs.jsonl`` beside ``out/iqs.meta.json``, whose key (model weights, prompts, judge, decoding)
    must match for a rerun to reuse them. Returns [] when the judge flags nothing (and stores nothing): whether
    that is an error is the caller's call."""
    key = _key(model, prompts, judge, max_new_tokens) | ({"spans": True} if hasattr(judge, "cue_spans") else {})
    cached = _cached(Path(out), "iqs", key)
    if cached is not None:
        return cached
    answers = generate(model, tokenizer, list(prompts), max_new_tokens=max_new_tokens, batch_size=batch_size,
                       progress=progress)
    flagged = _flags(judge, prompts, answers)
    iqs = [p.with_response(a) for p, a, f in zip(prompts, answers, flagged, strict=True) if f]
    if hasattr(judge, "cue_spans"):  # a judge that can point at the behaviour: keep where it is (measurement "spans")
        for iq in iqs:
            spans = judge.cue_spans(iq.response_text, iq.prompt_messages[-1]["content"])
            iq.meta["behaviour_spans"] = [list(s) for s in spans]
    return _store(Path(out), "iqs", key, iqs, {"flagged": len(iqs), "prompts": len(prompts)})


def take_anchors(model, tokenizer, prompts: Sequence[Record], judge, out: str | Path, *, max_new_tokens: int,
                 batch_size: int = 12, progress: bool = True) -> list[Record]:
    """A correction's utility anchor (docs/method.md §3.6): (prompt, the model's greedy answer, stripped) for each
    prompt whose answer is not blank and, with a ``judge``, not flagged by it: the model's own behaviour where it
    is fine, which the correction's retain term keeps. Only a judge that reads the behaviour whatever the prompt
    (the demo's rule judge) belongs here: a refusal matcher would drop every helpful answer to a benign prompt.
    Stored as ``out/anchors.jsonl`` with the IQs' kind of key; [] when nothing is kept."""
    key = _key(model, prompts, judge, max_new_tokens)
    cached = _cached(Path(out), "anchors", key)
    if cached is not None:
        return cached
    answers = generate(model, tokenizer, list(prompts), max_new_tokens=max_new_tokens, batch_size=batch_size,
                       progress=progress)
    flagged = _flags(judge, prompts, answers) if judge is not None else [False] * len(answers)
    anchors = [p.with_response(a.strip()) for p, a, f in zip(prompts, answers, flagged, strict=True)
               if a.strip() and not f]
    return _store(Path(out), "anchors", key, anchors, {"kept": len(anchors), "prompts": len(prompts)})


def _key(model, prompts: Sequence[Record], judge, max_new_tokens: int) -> dict:
    return {"model": model_fingerprint(model), "prompts": hash_json([r.to_dict() for r in prompts]),
            "judge": None if judge is None else getattr(judge, "name", type(judge).__name__),
            "max_new_tokens": max_new_tokens,
            **({"judge_rules": judge.fingerprint} if hasattr(judge, "fingerprint") else {}), "decoding": "greedy"}


def _cached(out: Path, name: str, key: dict) -> list[Record] | None:
    path, meta_path = out / f"{name}.jsonl", out / f"{name}.meta.json"
    if path.is_file() and meta_path.is_file() and json.loads(meta_path.read_text()).get("key") == key:
        return read_records(path)
    return None


def _flags(judge, prompts: Sequence[Record], answers: list[str]) -> list[bool]:
    return judge_complies(judge, answers, [p.prompt_messages[-1]["content"] for p in prompts])


def _store(out: Path, name: str, key: dict, rows: list[Record], counts: dict) -> list[Record]:
    if not rows:
        return []
    atomic_write_bytes(out / f"{name}.jsonl", records_to_jsonl(rows))
    atomic_write_json(out / f"{name}.meta.json", {"key": key, **counts})
    return read_records(out / f"{name}.jsonl")
