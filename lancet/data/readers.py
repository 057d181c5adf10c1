"""Read rows from JSONL, JSON, CSV, Parquet or a saved Hugging Face dataset into Records.

Every bad input raises a one-line DataError naming the file, the 1-based line (or row) and the field,
so a user can fix a 100k-row file without reading a traceback.
"""

from __future__ import annotations

import csv
import gzip
import json
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import IO, Any

from lancet.data.records import ROLES, Record
from lancet.errors import DataError, require

FORMATS = ("jsonl", "json", "csv", "parquet", "hf")
_EXTENSIONS = {".jsonl": "jsonl", ".ndjson": "jsonl", ".json": "json", ".csv": "csv", ".parquet": "parquet"}


def detect_format(path: str | Path) -> str:
    """The format of ``path`` from its extension (``.gz`` allowed for text formats); a directory is ``hf``."""
    p = Path(path)
    if p.is_dir():
        return "hf"
    suffixes = [s.lower() for s in p.suffixes]
    if suffixes and suffixes[-1] == ".gz":
        suffixes = suffixes[:-1]
        if suffixes and suffixes[-1] == ".parquet":
            suffixes = []  # parquet compresses internally; a gzip'd parquet file is not something we read
    fmt = _EXTENSIONS.get(suffixes[-1]) if suffixes else None
    if fmt is None:
        raise DataError(
            f"unknown file extension; expected one of {', '.join(sorted(_EXTENSIONS))} "
            "(optionally .gz), or a saved Hugging Face dataset directory",
            str(path),
        )
    return fmt


def read_records(
    path: str | Path,
    format: str | None = None,
    *,
    prompt_field: str = "prompt",
    response_field: str = "response",
    messages_field: str = "messages",
    limit: int | None = None,
) -> list[Record]:
    """Read ``path`` into Records; each row is ``prompt`` (+ ``response``) or ``messages``.

    Optional ``id`` and ``label`` keys are kept; all other keys go into ``Record.meta`` (a ``meta`` object's keys
    directly, as ``Record.to_dict`` writes them). ``limit`` stops
    after that many records (rows past it are not validated).
    """
    if not Path(path).exists():
        raise DataError("no such file or directory", str(path))
    fmt = format or detect_format(path)
    if fmt not in FORMATS:
        raise DataError(f"unknown format {fmt!r}; expected one of {', '.join(FORMATS)}", str(path))
    fields = (prompt_field, response_field, messages_field)
    records: list[Record] = []
    if limit is not None and limit <= 0:
        return records
    for line, row in iter_rows(path, fmt):
        records.append(row_to_record(row, str(path), line, *fields))
        if limit is not None and len(records) >= limit:
            break
    if not records:
        raise DataError("empty file (no rows)", str(path))
    return records


def records_from_rows(
    rows: Iterable[dict[str, Any]],
    source: str,
    *,
    prompt_field: str = "prompt",
    response_field: str = "response",
    messages_field: str = "messages",
) -> list[Record]:
    """Records from in-memory rows (a list of dicts or a ``datasets.Dataset``); ``line`` is the 1-based row."""
    fields = (prompt_field, response_field, messages_field)
    records = [row_to_record(row, source, i, *fields) for i, row in enumerate(rows, 1)]
    if not records:
        raise DataError("no rows", source)
    return records


# --- raw rows -----------------------------------------------------------------------------------------------


def iter_rows(path: str | Path, fmt: str) -> Iterator[tuple[int, Any]]:
    """Yield ``(line, row)`` pairs; ``line`` is the 1-based file line (JSONL, CSV) or row index (others)."""
    src = str(path)
    p = Path(path)
    if not p.exists():
        raise DataError("no such file or directory", src)
    try:
        if fmt == "jsonl":
            yield from _jsonl_rows(p)
        elif fmt == "json":
            yield from _json_rows(p)
        elif fmt == "csv":
            yield from _csv_rows(p)
        elif fmt == "parquet":
            yield from enumerate(_parquet_table(p), 1)
        elif fmt == "hf":
            yield from enumerate(_hf_dataset(p), 1)
        else:
            raise DataError(f"unknown format {fmt!r}; expected one of {', '.join(FORMATS)}", src)
    except UnicodeDecodeError as e:
        raise DataError(f"not UTF-8 text ({e.reason} at byte {e.start})", src) from None
    except OSError as e:  # permission denied, a directory where a file was expected, a corrupt gzip stream
        raise DataError(f"cannot read: {e.strerror or e}", src) from None


def _open_text(p: Path, **kwargs: Any) -> IO[str]:
    if p.suffix.lower() == ".gz":
        return gzip.open(p, "rt", encoding="utf-8", **kwargs)
    return open(p, encoding="utf-8", **kwargs)


def _jsonl_rows(p: Path) -> Iterator[tuple[int, Any]]:
    with _open_text(p) as f:
        for line, text in enumerate(f, 1):
            if not text.strip():
                continue  # blank lines (a trailing newline, a hand-edited file) are not rows
            try:
                yield line, json.loads(text.rstrip("\r\n"))  # so the error column counts within the line
            except json.JSONDecodeError as e:
                raise DataError(f"invalid JSON: {e.msg} (column {e.colno})", str(p), line) from None


def _json_rows(p: Path) -> Iterator[tuple[int, Any]]:
    with _open_text(p) as f:
        text = f.read()
    if not text.strip():
        raise DataError("empty file (no rows)", str(p))
    try:
        data = json.loads(text)
    except json.JSONDecodeError as e:
        raise DataError(f"invalid JSON: {e.msg} (column {e.colno})", str(p), e.lineno) from None
    if isinstance(data, list):
        yield from enumerate(data, 1)
    elif isinstance(data, dict) and data and all(isinstance(v, list) for v in data.values()):
        # Upstream files (Safety-Tuned LLaMAs) store an absent column as an empty list, so drop those.
        columns = {k: v for k, v in data.items() if v}
        lengths = {k: len(v) for k, v in columns.items()}
        if len(set(lengths.values())) > 1:
            key = min(lengths, key=lengths.__getitem__)
            raise DataError(f"parallel lists differ in length: {lengths}", str(p), field=key)
        for i, values in enumerate(zip(*columns.values(), strict=True), 1):
            yield i, dict(zip(columns, values, strict=True))
    else:
        raise DataError("expected a JSON list of objects or an object of parallel lists", str(p))


def _csv_rows(p: Path) -> Iterator[tuple[int, dict[str, str]]]:
    with _open_text(p, newline="") as f:
        reader = csv.reader(f)
        try:
            header = next(reader)
        except StopIteration:
            return
        except csv.Error as e:
            raise DataError(f"invalid CSV: {e}", str(p), reader.line_num) from None
        while True:
            line = reader.line_num + 1  # a quoted cell may span lines, so remember where the row starts
            try:
                cells = next(reader)
            except StopIteration:
                return
            except csv.Error as e:
                raise DataError(f"invalid CSV: {e}", str(p), line) from None
            if not cells:
                continue
            if len(cells) > len(header):
                raise DataError(f"row has {len(cells)} cells but the header has {len(header)}", str(p), line)
            yield line, dict(zip(header, cells + [""] * (len(header) - len(cells)), strict=True))


def _parquet_table(p: Path) -> list[dict[str, Any]]:
    pa = require("pyarrow", "data", f"reading {p} (Parquet)")
    import pyarrow.parquet as pq

    try:
        # pyarrow's to_pylist gives plain Python values (None for nulls), unlike pandas' NaN and numpy arrays.
        return pq.read_table(p).to_pylist()
    except pa.ArrowException as e:
        raise DataError(f"cannot read Parquet: {e}", str(p)) from None


def _hf_dataset(p: Path) -> Iterable[dict[str, Any]]:
    datasets = require("datasets", "data", f"reading {p} (a saved Hugging Face dataset)")  # slow to import: here

    try:
        ds = datasets.load_from_disk(str(p))
    except (FileNotFoundError, ValueError):
        raise DataError("not a saved Hugging Face dataset (the output of save_to_disk)", str(p)) from None
    if isinstance(ds, datasets.DatasetDict):
        splits = list(ds)
        if "train" in ds:
            ds = ds["train"]
        elif len(splits) == 1:
            ds = ds[splits[0]]
        else:
            raise DataError(f"dataset has splits {splits} and none is 'train'; save one split", str(p))
    return ds


# --- validation ---------------------------------------------------------------------------------------------


def require_text(value: Any, path: str, line: int, field: str) -> str:
    """``value`` if it is a non-blank string, else a DataError naming the field."""
    if value is None:
        raise DataError("is missing or null; expected a string", path, line, field)
    if not isinstance(value, str):
        raise DataError(f"expected a string, got {type(value).__name__}", path, line, field)
    if not value.strip():
        raise DataError("is empty", path, line, field)
    try:
        value.encode("utf-8")
    except UnicodeEncodeError as e:  # JSON can spell a lone surrogate ("\ud800"); no encoder can write it back
        raise DataError(f"holds a lone surrogate (\\u{ord(value[e.start]):04x} at character {e.start + 1}): not "
                        "valid Unicode text", path, line, field) from None
    return value


def _messages(value: Any, path: str, line: int, field: str) -> tuple[dict[str, str], ...]:
    if not isinstance(value, list) or not value:
        got = "an empty list" if isinstance(value, list) else type(value).__name__
        raise DataError(f"expected a non-empty list of {{role, content}} objects, got {got}", path, line, field)
    out = []
    for i, msg in enumerate(value):
        where = f"{field}[{i}]"
        if not isinstance(msg, dict):
            raise DataError(f"expected an object, got {type(msg).__name__}", path, line, where)
        role = msg.get("role")
        if role not in ROLES:
            raise DataError(f"role {role!r} is not one of {', '.join(ROLES)}", path, line, f"{where}.role")
        out.append({"role": role, "content": require_text(msg.get("content"), path, line, f"{where}.content")})
    return tuple(out)


def _scalar_text(value: Any, path: str, line: int, field: str) -> str | None:
    """An optional id or label: numbers are common there (class indices); a blank CSV cell means absent."""
    if value is None or (isinstance(value, str) and not value.strip()):
        return None
    if isinstance(value, bool | int | float):
        return str(value)
    return require_text(value, path, line, field)


def row_to_record(
    row: Any, path: str, line: int, prompt_field: str, response_field: str, messages_field: str
) -> Record:
    """Validate one raw row and build its Record."""
    if not isinstance(row, dict):
        raise DataError(f"expected an object, got {type(row).__name__}", path, line)
    has_messages = row.get(messages_field) is not None
    if has_messages and row.get(prompt_field) is not None:
        raise DataError(f"row has both '{prompt_field}' and '{messages_field}'; keep one", path, line, prompt_field)
    if has_messages:
        fields: dict[str, Any] = {"messages": _messages(row[messages_field], path, line, messages_field)}
    elif prompt_field in row:
        fields = {"prompt": require_text(row[prompt_field], path, line, prompt_field)}
        if row.get(response_field) is not None:
            fields["response"] = require_text(row[response_field], path, line, response_field)
    else:
        raise DataError(
            f"missing field: each row needs '{prompt_field}' or '{messages_field}'", path, line, prompt_field
        )
    used = {prompt_field, response_field, messages_field, "id", "label"}
    # a "meta" object is the meta a Record wrote (Record.to_dict): read back as it was, so a round trip keeps it
    nested = row.get("meta") if isinstance(row.get("meta"), dict) else None
    extra = {k: v for k, v in row.items() if k not in used and not (k == "meta" and nested is not None)}
    meta = {**(nested or {}), **extra}
    return Record(
        **fields,
        id=_scalar_text(row.get("id"), path, line, "id") or "",
        label=_scalar_text(row.get("label"), path, line, "label"),
        meta=meta,
        source=path,
        line=line,
    )
