"""Rows for the influence engine, from any input ``Influence`` takes: Records, prompt/response dicts, a
``datasets.Dataset`` or tokenised rows."""

from __future__ import annotations

from typing import Any

from lancet.constants import DEFAULT_MAX_LENGTH
from lancet.errors import LancetError


def _as_list(values: Any) -> Any:
    return values.tolist() if hasattr(values, "tolist") else values


def as_rows(data: Any, what: str, tokenizer=None, max_length: int = DEFAULT_MAX_LENGTH) -> list[dict[str, Any]]:
    """Rows for the engine, from any of the inputs ``Influence`` takes:
    - tokenised rows: an EncodedDataset, or dicts with ``input_ids`` and ``labels`` (lists, tensors or arrays:
      tensors become lists, so the same rows give the same scores and fingerprints in either form);
    - text: ``Record`` objects, or dicts with ``prompt`` (+ ``response``) or ``messages`` (a list of dicts or a
      ``datasets.Dataset``), tokenised with ``tokenizer`` (labels on the response only).
    Anything else is one clear error."""
    if isinstance(data, str | bytes | dict) or not hasattr(data, "__iter__"):
        raise LancetError(f"{what}: expected a sequence of rows (Records, prompt/response dicts or tokenised rows), "
                          f"got {type(data).__name__}")
    rows = list(data)
    if not rows:
        raise LancetError(f"{what}: no rows")
    if is_text(rows[0]):
        if tokenizer is None:
            raise LancetError(f"{what}: rows of text need a tokenizer: Influence(model, tokenizer=...)")
        from lancet.data import Record, encode_records
        from lancet.data.readers import records_from_rows

        if all(isinstance(r, Record) for r in rows):
            records = rows
        elif all(isinstance(r, dict) for r in rows):
            records = records_from_rows(rows, what)
        else:
            raise LancetError(f"{what}: mixed row types; give all Records or all dicts")
        return list(encode_records(records, tokenizer, max_length, progress=False))
    for i, row in enumerate(rows):
        if not isinstance(row, dict) or "input_ids" not in row or "labels" not in row:
            raise LancetError(f"{what}: row {i} is a {type(row).__name__} without 'input_ids' and 'labels': give "
                              "Records, prompt/response dicts (with a tokenizer) or tokenised rows")
        if hasattr(row["input_ids"], "tolist") or hasattr(row["labels"], "tolist"):
            rows[i] = row = {**row, "input_ids": _as_list(row["input_ids"]), "labels": _as_list(row["labels"])}
        if len(row["input_ids"]) != len(row["labels"]):
            raise LancetError(f"{what}: row {i} has {len(row['input_ids'])} input_ids but {len(row['labels'])} labels")
    return rows


def is_text(row: Any) -> bool:
    from lancet.data import Record

    return isinstance(row, Record) or (isinstance(row, dict) and "input_ids" not in row
                                       and ("prompt" in row or "messages" in row))
