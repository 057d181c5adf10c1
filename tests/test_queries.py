"""take_iqs: the model's flagged answers become IQs, stored with a key and reused only when the key matches;
take_anchors: its unflagged, non-blank answers become a correction's anchor, stored the same way."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import call_counter

import lancet.influence.queries as queries_module
from lancet.data.records import Record
from lancet.influence.queries import take_anchors, take_iqs

PROMPTS = [Record(prompt=p, source="prompts.jsonl", line=i + 1) for i, p in enumerate(["Burn?", "Egg?", "Fox?"])]


class EveryOther:
    """Flags the 1st and 3rd answers."""

    def __init__(self, name: str = "every-other"):
        self.name = name

    def complies(self, texts):
        return [i % 2 == 0 for i in range(len(texts))]


class Nothing(EveryOther):
    def complies(self, texts):
        return [False] * len(texts)


@pytest.fixture()
def counted(monkeypatch):
    return call_counter(monkeypatch, queries_module, "generate")


def test_take_iqs_flags_stores_and_reuses(llama_model, tiny_tokenizer, tmp_path, counted):
    iqs = take_iqs(llama_model, tiny_tokenizer, PROMPTS, EveryOther(), tmp_path, max_new_tokens=4, progress=False)
    assert counted["n"] == 1
    assert [r.prompt_messages[0]["content"] for r in iqs] == ["Burn?", "Fox?"]
    assert all(r.response_text for r in iqs)
    meta = json.loads((tmp_path / "iqs.meta.json").read_text())
    assert meta["flagged"] == 2 and meta["prompts"] == 3 and meta["key"]["judge"] == "every-other"

    again = take_iqs(llama_model, tiny_tokenizer, PROMPTS, EveryOther(), tmp_path, max_new_tokens=4, progress=False)
    assert counted["n"] == 1 and [r.to_dict() for r in again] == [r.to_dict() for r in iqs]

    # any part of the key changing (judge, decoding length, prompts, weights) takes the answers again
    take_iqs(llama_model, tiny_tokenizer, PROMPTS, EveryOther("other"), tmp_path, max_new_tokens=4, progress=False)
    take_iqs(llama_model, tiny_tokenizer, PROMPTS, EveryOther("other"), tmp_path, max_new_tokens=5, progress=False)
    take_iqs(llama_model, tiny_tokenizer, PROMPTS[:2], EveryOther("other"), tmp_path, max_new_tokens=5,
             progress=False)
    with torch.no_grad():
        next(llama_model.parameters()).add_(1e-3)
    take_iqs(llama_model, tiny_tokenizer, PROMPTS[:2], EveryOther("other"), tmp_path, max_new_tokens=5,
             progress=False)
    assert counted["n"] == 5


def test_take_iqs_flagging_nothing_returns_empty_and_stores_nothing(llama_model, tiny_tokenizer, tmp_path):
    assert take_iqs(llama_model, tiny_tokenizer, PROMPTS, Nothing(), tmp_path, max_new_tokens=4,
                    progress=False) == []
    assert not list(tmp_path.iterdir())


def test_take_anchors_keeps_the_unflagged_answers(llama_model, tiny_tokenizer, tmp_path, counted):
    anchors = take_anchors(llama_model, tiny_tokenizer, PROMPTS, EveryOther(), tmp_path, max_new_tokens=4,
                           progress=False)
    assert [r.prompt_messages[0]["content"] for r in anchors] == ["Egg?"]  # the 2nd: the one not flagged
    iqs = take_iqs(llama_model, tiny_tokenizer, PROMPTS, EveryOther(), tmp_path, max_new_tokens=4, progress=False)
    assert anchors[0].response_text == anchors[0].response_text.strip() != ""
    assert counted["n"] == 2 and (tmp_path / "anchors.jsonl").is_file() and (tmp_path / "iqs.jsonl").is_file()
    assert len(iqs) == 2  # both files live side by side in the run directory
    # no judge: every non-blank answer; a new key (the judge), so generated again, then reused
    every = take_anchors(llama_model, tiny_tokenizer, PROMPTS, None, tmp_path, max_new_tokens=4, progress=False)
    again = take_anchors(llama_model, tiny_tokenizer, PROMPTS, None, tmp_path, max_new_tokens=4, progress=False)
    assert len(every) == 3 and counted["n"] == 3 and [r.to_dict() for r in again] == [r.to_dict() for r in every]
    assert json.loads((tmp_path / "anchors.meta.json").read_text())["kept"] == 3
    # every answer flagged: nothing kept, nothing stored over the previous file
    assert take_anchors(llama_model, tiny_tokenizer, PROMPTS, _All(), tmp_path,
                        max_new_tokens=4, progress=False) == []


class _All(EveryOther):
    def complies(self, texts):
        return [True] * len(texts)
