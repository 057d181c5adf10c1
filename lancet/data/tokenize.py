"""Records to token ids with loss labels on the final assistant turn only, plus batching and length statistics."""

from __future__ import annotations

import statistics
import warnings
from collections.abc import Iterable, Sequence
from typing import TYPE_CHECKING, Any, overload

from lancet.constants import FALLBACK_ASSISTANT_PREFIX, FALLBACK_USER_PREFIX, IGNORE_INDEX
from lancet.data.records import Record
from lancet.errors import ModelError

if TYPE_CHECKING:
    import torch
    from transformers import PreTrainedTokenizerBase


def _ids(tokenizer: PreTrainedTokenizerBase, text: str) -> list[int]:
    # Chat templates write BOS and role markers themselves, so the tokenizer must not add its own.
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


def _plain_chat(messages: list[dict[str, str]], tokenizer: PreTrainedTokenizerBase) -> str:
    """The fallback format for tokenizers without a chat template: "User: ..." / "\\nAssistant: ...<eos>"."""
    eos = tokenizer.eos_token or ""
    parts = []
    for m in messages:
        if m["role"] == "assistant":
            parts.append(FALLBACK_ASSISTANT_PREFIX + m["content"] + eos)
        else:  # a system message has no fallback marker; it reads as plain text before the first turn
            prefix = FALLBACK_USER_PREFIX if m["role"] == "user" else ""
            parts.append(("\n" if parts else "") + prefix + m["content"])
    return "".join(parts)


def _prompt_text(record: Record, tokenizer: PreTrainedTokenizerBase) -> str:
    if tokenizer.chat_template:
        return tokenizer.apply_chat_template(record.prompt_messages, add_generation_prompt=True, tokenize=False)
    return _plain_chat(record.prompt_messages, tokenizer) + FALLBACK_ASSISTANT_PREFIX


def encode_prompt(record: Record, tokenizer: PreTrainedTokenizerBase) -> list[int]:
    """Token ids of the prompt turns followed by the generation prompt (where the reply would start)."""
    return _ids(tokenizer, _prompt_text(record, tokenizer))


def _prompt_and_response_ids(record: Record, tokenizer: PreTrainedTokenizerBase) -> tuple[list[int], list[int]]:
    prefix = _prompt_text(record, tokenizer)
    if record.response_text is None:
        return _ids(tokenizer, prefix), []
    if tokenizer.chat_template:
        # Whitespace after the end-of-turn token is template layout the model never generates (generation
        # stops at end-of-turn), so it is not part of the labelled response.
        full = tokenizer.apply_chat_template(record.to_messages(), tokenize=False).rstrip()
        if not full.startswith(prefix):
            raise ModelError(
                "the tokenizer's chat template renders the prompt differently with the response "
                "appended, so the response tokens cannot be located"
            )
    else:
        full = prefix + record.response_text + (tokenizer.eos_token or "")
    prefix_ids, full_ids = _ids(tokenizer, prefix), _ids(tokenizer, full)
    if full_ids[: len(prefix_ids)] == prefix_ids:
        return prefix_ids, full_ids[len(prefix_ids) :]
    # A BPE merge crossed the prompt/response boundary; tokenize the halves apart, as generation would see them.
    return prefix_ids, _ids(tokenizer, full[len(prefix) :])


def encode_record(record: Record, tokenizer: PreTrainedTokenizerBase, max_length: int) -> dict[str, Any]:
    """``input_ids`` and ``labels`` (IGNORE_INDEX except on the final assistant turn and its end-of-turn
    token), right-truncated to ``max_length``. Prompt-only records get no labelled tokens."""
    prompt_ids, response_ids = _prompt_and_response_ids(record, tokenizer)
    input_ids = prompt_ids + response_ids
    labels = [IGNORE_INDEX] * len(prompt_ids) + response_ids
    truncated = len(input_ids) > max_length
    return {
        "input_ids": input_ids[:max_length],
        "labels": labels[:max_length],
        "id": record.id,
        "truncated": truncated,
    }


def _has_response_left(item: dict[str, Any]) -> bool:
    return any(t != IGNORE_INDEX for t in item["labels"])


def has_response_tokens(item: dict[str, Any]) -> bool:
    """Whether an encoded row has a response token the model predicts (a labelled position after the first): a row
    without one (prompt-only, or truncated before its response) adds nothing to a training loss."""
    return any(t != IGNORE_INDEX for t in item["labels"][1:])


def require_response_tokens(encoded: EncodedDataset, what: str = "training") -> None:
    """Stop, on one line, when a row has no response tokens: naming the first such row's file:line (as the
    correction's rows do), or the file when no row has any. Training on such rows would report success having
    learned nothing from them."""
    from lancet.errors import DataError

    empty = [i for i, item in enumerate(encoded.items) if not has_response_tokens(item)]
    if not empty:
        return
    records, max_length = encoded.records, encoded.max_length
    if len(empty) == len(records) > 1:  # one row alone is named by its line below, with its own reason
        prompt_only = sum(records[i].response_text is None for i in empty)
        why = ("prompt-only rows: give each a 'response', or end its 'messages' with an assistant turn"
               if prompt_only == len(records) else f"prompt-only or truncated to max_length={max_length} tokens")
        sources = sorted({r.source for r in records if r.source})
        raise DataError(f"none of the {len(records)} {what} rows has response tokens ({why}); nothing to train on",
                        path=", ".join(sources) or None)
    first = records[empty[0]]
    why = ("prompt-only" if first.response_text is None
           else f"its response is cut off by max_length={max_length} tokens")
    others = f"; {len(empty) - 1} more of the {len(records)} rows too" if len(empty) > 1 else ""
    raise DataError(f"{what} row has no response tokens ({why}){others}", path=first.source or what,
                    line=first.line)


class EncodedDataset(Sequence[dict[str, Any]]):
    """Encoded rows in record order, with the records they came from."""

    def __init__(self, records: Sequence[Record], items: list[dict[str, Any]], max_length: int):
        self.records = list(records)
        self.items = items
        self.max_length = max_length

    @property
    def ids(self) -> list[str]:
        return [item["id"] for item in self.items]

    @property
    def n_truncated(self) -> int:
        return sum(item["truncated"] for item in self.items)

    def __len__(self) -> int:
        return len(self.items)

    @overload
    def __getitem__(self, index: int) -> dict[str, Any]: ...
    @overload
    def __getitem__(self, index: slice) -> list[dict[str, Any]]: ...
    def __getitem__(self, index: int | slice) -> dict[str, Any] | list[dict[str, Any]]:
        return self.items[index]


def encode_records(
    records: Iterable[Record], tokenizer: PreTrainedTokenizerBase, max_length: int, *, progress: bool = True
) -> EncodedDataset:
    """Encode every record; truncation is reported once, as counts, not per row."""
    from tqdm.auto import tqdm

    records = list(records)
    items = [encode_record(r, tokenizer, max_length) for r in tqdm(records, desc="tokenize", disable=not progress)]
    n_truncated = sum(item["truncated"] for item in items)
    if n_truncated:
        lost = sum(
            1
            for r, item in zip(records, items, strict=True)
            if item["truncated"] and r.response_text is not None and not _has_response_left(item)
        )
        note = f" ({lost} with no response tokens left)" if lost else ""
        warnings.warn(f"{n_truncated} of {len(items)} rows truncated to {max_length} tokens{note}", stacklevel=2)
    return EncodedDataset(records, items, max_length)


def collate(batch: list[dict[str, Any]], pad_token_id: int, padding_side: str = "right") -> dict[str, torch.Tensor]:
    """Pad a batch to its longest row: ``input_ids``, ``attention_mask`` and ``labels`` (padded with IGNORE_INDEX)."""
    import torch  # imported here so that reading and checking data does not pay for importing torch

    if padding_side not in ("left", "right"):
        raise ValueError(f"padding_side must be 'left' or 'right', got {padding_side!r}")
    if not batch:
        raise ValueError("cannot collate an empty batch")
    width = max(len(item["input_ids"]) for item in batch)

    def pad(values, fill: int) -> list[int]:
        values = values.tolist() if hasattr(values, "tolist") else list(values)  # tensors, arrays or lists
        filler = [fill] * (width - len(values))
        return filler + values if padding_side == "left" else values + filler

    return {
        "input_ids": torch.tensor([pad(item["input_ids"], pad_token_id) for item in batch], dtype=torch.long),
        "attention_mask": torch.tensor([pad([1] * len(item["input_ids"]), 0) for item in batch], dtype=torch.long),
        "labels": torch.tensor([pad(item["labels"], IGNORE_INDEX) for item in batch], dtype=torch.long),
    }


def length_stats(encoded: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """Token-length summary for ``lancet data check``: n, min, mean, median, p95, max, n_truncated, and
    n_no_response (rows with no labelled token, prompt-only or truncated away)."""
    lengths = sorted(len(item["input_ids"]) for item in encoded)
    n = len(lengths)
    if not n:
        return {
            "n": 0,
            "min": None,
            "mean": None,
            "median": None,
            "p95": None,
            "max": None,
            "n_truncated": 0,
            "n_no_response": 0,
        }
    # Linear interpolation between order statistics, the same rule as numpy.percentile's default.
    pos = 0.95 * (n - 1)
    lo = int(pos)
    p95 = lengths[lo] + (lengths[min(lo + 1, n - 1)] - lengths[lo]) * (pos - lo)
    return {
        "n": n,
        "min": lengths[0],
        "mean": statistics.fmean(lengths),
        "median": float(statistics.median(lengths)),
        "p95": float(p95),
        "max": lengths[-1],
        "n_truncated": sum(bool(item["truncated"]) for item in encoded),
        "n_no_response": sum(not _has_response_left(item) for item in encoded),
    }


def restrict_to_spans(items: Sequence[dict[str, Any]], records: Sequence[Record], tokenizer: PreTrainedTokenizerBase
                      ) -> list[dict[str, Any]]:
    """Copies of encoded ``items`` whose labels keep only the response tokens that overlap their record's
    ``meta["behaviour_spans"]`` ([start, end) character spans of the response text, as the rule judge points at
    them): the query measurement ``spans`` explains those tokens instead of the whole answer. A token's characters
    are found by decoding the response one token longer each time. The copies are marked ``"spans": True``."""
    from lancet.errors import DataError

    out = []
    for item, record in zip(items, records, strict=True):
        spans = (record.meta or {}).get("behaviour_spans")
        text = record.response_text or ""
        if not spans or not all(isinstance(s, list | tuple) and len(s) == 2 for s in spans):
            raise DataError("measurement 'spans' needs the behaviour's character spans of the answer "
                            "([[start, end], ...]; IQs taken with a rule judge carry them)", path=record.source,
                            line=record.line, field="meta.behaviour_spans")
        positions = [i for i, label in enumerate(item["labels"]) if label != IGNORE_INDEX]
        ids = [item["input_ids"][i] for i in positions]
        ends = [len(tokenizer.decode(ids[:k + 1])) for k in range(len(ids))]
        shift = max(tokenizer.decode(ids).find(text[:16]), 0) if text else 0  # text before the answer, if any
        starts = [0, *ends[:-1]]
        keep = {positions[k] for k in range(len(ids))
                if any(a + shift < ends[k] and starts[k] < b + shift for a, b in spans)}
        if not keep:
            raise DataError("no answer token overlaps the behaviour spans (truncated?)", path=record.source,
                            line=record.line, field="meta.behaviour_spans")
        out.append({**item, "labels": [label if i in keep else IGNORE_INDEX for i, label in enumerate(item["labels"])],
                    "spans": True})
    return out
