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
    out = Path(out)
    path, meta_path = out / "iqs.jsonl", out / "iqs.meta.json"
    key = {"model": model_fingerprint(model), "prompts": hash_json([r.to_dict() for r in prompts]),
           "judge": getattr(judge, "name", type(judge).__name__), "max_new_tokens": max_new_tokens,
           **({"judge_rules": judge.fingerprint} if hasattr(judge, "fingerprint") else {}),
           "decoding": "greedy", **({"spans": True} if hasattr(judge, "cue_spans") else {})}
    if path.is_file() and meta_path.is_file() and json.loads(meta_path.read_text()).get("key") == key:
        return read_records(path)
    answers = generate(model, tokenizer, list(prompts), max_new_tokens=max_new_tokens, batch_size=batch_size,
                       progress=progress)
    flagged = judge_complies(judge, answers, [p.prompt_messages[-1]["content"] for p in prompts])
    iqs = [p.with_response(a) for p, a, f in zip(prompts, answers, flagged, strict=True) if f]
    if hasattr(judge, "cue_spans"):  # a judge that can point at the behaviour: keep where it is (measurement "spans")
        for iq in iqs:
            spans = judge.cue_spans(iq.response_text, iq.prompt_messages[-1]["content"])
            iq.meta["behaviour_spans"] = [list(s) for s in spans]
    if not iqs:
        return []
    atomic_write_bytes(path, records_to_jsonl(iqs))
    atomic_write_json(meta_path, {"key": key, "flagged": len(iqs), "prompts": len(prompts)})
    return read_records(path)
