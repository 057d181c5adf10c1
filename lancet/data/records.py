"""One record model for every stage: a row is ``prompt`` + ``response`` or ``messages``."""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from typing import Any

ROLES = ("system", "user", "assistant")


@dataclass(frozen=True)
class Record:
    """A training example or an influence query.

    Exactly one of (``prompt``, ``response``) or ``messages`` is set. ``response`` may be None for
    prompt-only rows (evaluation prompts, IQ prompts before generation). ``source`` and ``line`` lead any
    later score back to the file and the 1-based line (or row) it came from.
    """

    prompt: str | None = None
    response: str | None = None
    messages: tuple[dict[str, str], ...] | None = None
    id: str = ""
    label: str | None = None
    meta: dict[str, Any] = field(default_factory=dict, compare=False, hash=False)
    source: str = ""
    line: int = 0

    def __post_init__(self) -> None:
        if self.messages is None and self.prompt is None:
            raise ValueError("a record needs 'prompt' or 'messages'")
        if not self.id:
            object.__setattr__(self, "id", content_id(self))

    def to_messages(self) -> list[dict[str, str]]:
        """The row as a chat list; the final assistant message (if any) is the scored response."""
        if self.messages is not None:
            return [dict(m) for m in self.messages]
        msgs = [{"role": "user", "content": self.prompt or ""}]
        if self.response is not None:
            msgs.append({"role": "assistant", "content": self.response})
        return msgs

    @property
    def prompt_messages(self) -> list[dict[str, str]]:
        """Everything before the final assistant turn."""
        msgs = self.to_messages()
        return msgs[:-1] if msgs and msgs[-1]["role"] == "assistant" else msgs

    @property
    def response_text(self) -> str | None:
        msgs = self.to_messages()
        return msgs[-1]["content"] if msgs and msgs[-1]["role"] == "assistant" else None

    @property
    def text(self) -> str:
        """All text of the row, for display and text retrieval (BM25)."""
        return "\n".join(m["content"] for m in self.to_messages())

    def with_response(self, response: str) -> Record:
        """A copy whose final assistant turn is ``response`` (used to build IQs from generations)."""
        msgs = self.prompt_messages + [{"role": "assistant", "content": response}]
        return Record(messages=tuple(msgs), label=self.label, meta=dict(self.meta), source=self.source, line=self.line)

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"id": self.id}
        if self.messages is not None:
            out["messages"] = [dict(m) for m in self.messages]
        else:
            out["prompt"] = self.prompt
            if self.response is not None:
                out["response"] = self.response
        if self.label is not None:
            out["label"] = self.label
        if self.meta:
            out["meta"] = self.meta
        return out


def content_id(record: Record) -> str:
    """A stable id from the row's content only (not its position), so scores survive reordering."""
    payload = json.dumps(record.to_messages(), ensure_ascii=False, sort_keys=True)
    return hashlib.sha256(payload.encode("utf-8")).hexdigest()[:16]


def records_to_jsonl(records) -> bytes:
    """Records as JSON lines (the format ``read_records`` reads back)."""
    return "".join(json.dumps(r.to_dict()) + "\n" for r in records).encode("utf-8")
