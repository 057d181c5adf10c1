"""Adapters for the public safety data sets in shared/data (see each folder's SOURCE.md), and a spec dispatcher.

Adapter Records keep content-hash ids even where a file has its own id column (XSTest): upstream ids
collide across data sets, content hashes do not. Upstream columns are kept in ``Record.meta``.
"""

from __future__ import annotations

import re
import warnings
from pathlib import Path
from typing import Any

from lancet.data.readers import FORMATS, detect_format, iter_rows, read_records, require_text
from lancet.data.records import Record
from lancet.errors import DataError

HH_SIDES = ("chosen", "rejected")
_HH_TURN = re.compile(r"\n\n(Human|Assistant):")
_HH_NAME = re.compile(r"^(harmless|helpful)-[\w-]+_(train|test)\.jsonl(\.gz)?$")
# Column that holds the prompt, by file, in the order tried.
PROMPT_COLUMNS = ("goal", "Goal", "forbidden_prompt", "Behavior", "prompt", "instruction")
HARMFUL_FILES = (
    "advbench.csv",
    "jailbreakbench.csv",
    "strongreject.csv",
    "harmful_test_split.json",
    "harmless_alpaca_test.json",
    "xstest_prompts.csv",
)


def _parse_hh(text: str, path: str, line: int, side: str) -> list[dict[str, str]] | None:
    """Turns of an HH transcript; None when the final assistant turn is empty (the row carries no response)."""
    parts = _HH_TURN.split(text)
    if parts[0].strip() or len(parts) < 3:
        raise DataError("transcript must start with '\\n\\nHuman:'", path, line, side)
    speakers, contents = parts[1::2], parts[2::2]
    turns = [("user" if r == "Human" else "assistant", c.strip()) for r, c in zip(speakers, contents, strict=True)]
    if turns[-1][0] != "assistant":
        raise DataError("transcript must end with an Assistant turn", path, line, side)
    if not turns[-1][1]:
        return None
    # A few transcripts have an empty earlier turn or repeat a speaker; drop the empty turns and merge repeats
    # so the prompt alternates as chat templates expect. The final Assistant turn stays separate: it is the
    # response, split at the last "\n\nAssistant:" as SOURCE.md prescribes.
    prompt: list[dict[str, str]] = []
    for role, content in turns[:-1]:
        if not content:
            continue
        if prompt and prompt[-1]["role"] == role:
            prompt[-1]["content"] += "\n\n" + content
        else:
            prompt.append({"role": role, "content": content})
    if not prompt or prompt[0]["role"] != "user":
        raise DataError("transcript has no Human turn before the response", path, line, side)
    return prompt + [{"role": "assistant", "content": turns[-1][1]}]


def read_hh_rlhf(path: str | Path, side: str = "chosen", limit: int | None = None) -> list[Record]:
    """Anthropic HH-RLHF (gzip'd JSONL of ``chosen``/``rejected`` transcripts) as multi-turn Records.

    The final Assistant turn of ``side`` is the response. Rows where it is empty are skipped, with one
    warning giving their number.
    """
    src = str(path)
    if side not in HH_SIDES:
        raise DataError(f"side must be 'chosen' or 'rejected', got {side!r}", src)
    records, skipped = [], 0
    for line, row in iter_rows(path, "jsonl"):
        if not isinstance(row, dict):
            raise DataError(f"expected an object, got {type(row).__name__}", src, line)
        messages = _parse_hh(require_text(row.get(side), src, line, side), src, line, side)
        if messages is None:
            skipped += 1
            continue
        meta = {"dataset": "hh-rlhf", "side": side}
        records.append(Record(messages=tuple(messages), meta=meta, source=src, line=line))
        if limit is not None and len(records) >= limit:
            break
    if skipped:
        warnings.warn(f"{src}: skipped {skipped} rows whose final assistant turn ({side}) is empty", stacklevel=2)
    if not records:
        raise DataError("no usable rows", src)
    return records


def read_safety_tuned_llamas(path: str | Path, limit: int | None = None) -> list[Record]:
    """Safety-Tuned LLaMAs: training rows ``{instruction, input, output}`` or eval files of parallel lists.

    prompt = instruction, plus ``"\\n\\n" + input`` when input is non-empty; response = output (absent in
    the evaluation files, which give prompt-only Records).
    """
    src = str(path)
    records = []
    for line, row in iter_rows(path, "json"):
        if not isinstance(row, dict):
            raise DataError(f"expected an object, got {type(row).__name__}", src, line)
        # Training rows use singular keys, the evaluation files' parallel lists plural ones.
        key = "instruction" if "instruction" in row else "instructions"
        prompt = require_text(row.get(key), src, line, key)
        extra = row.get("input", row.get("inputs"))
        if isinstance(extra, str) and extra.strip():
            prompt += "\n\n" + extra
        response = require_text(row["output"], src, line, "output") if "output" in row else None
        skip = {"instruction", "instructions", "input", "inputs", "output"}
        meta = {"dataset": "safety-tuned-llamas", **{k: v for k, v in row.items() if k not in skip}}
        records.append(Record(prompt=prompt, response=response, meta=meta, source=src, line=line))
        if limit is not None and len(records) >= limit:
            break
    if not records:
        raise DataError("empty file (no rows)", src)
    return records


def read_harmful_prompts(
    path: str | Path, *, harmbench_category: str | None = "standard", limit: int | None = None
) -> list[Record]:
    """Prompt-only Records from the refusal-direction benchmark files and XSTest.

    The prompt column is found by name (``goal``, ``Goal``, ``forbidden_prompt``, ``Behavior``, ``prompt``,
    ``instruction``). HarmBench rows are kept only where ``FunctionalCategory == harmbench_category``
    (default ``"standard"``: contextual rows need their ContextString and copyright rows are not harm;
    pass None to keep all). XSTest's ``label`` (safe/unsafe) becomes ``Record.label``.
    """
    src = str(path)
    fmt = detect_format(path)
    if fmt not in ("csv", "json", "jsonl"):
        raise DataError(f"expected a CSV or JSON file of prompts, got {fmt}", src)
    dataset = Path(path).name.split(".")[0]
    records = []
    for line, row in iter_rows(path, fmt):
        if not isinstance(row, dict):
            raise DataError(f"expected an object, got {type(row).__name__}", src, line)
        column = next((c for c in PROMPT_COLUMNS if c in row), None)
        if column is None:
            raise DataError(f"no prompt column; expected one of {', '.join(PROMPT_COLUMNS)}", src, line)
        if harmbench_category and row.get("FunctionalCategory", harmbench_category) != harmbench_category:
            continue
        prompt = require_text(row[column], src, line, column)
        label = row.get("label") or None
        # "" is the unnamed index column that pandas wrote into jailbreakbench.csv.
        meta: dict[str, Any] = {"dataset": dataset}
        meta.update({k: v for k, v in row.items() if k not in (column, "label", "")})
        records.append(Record(prompt=prompt, label=label, meta=meta, source=src, line=line))
        if limit is not None and len(records) >= limit:
            break
    if not records:
        raise DataError("no rows", src)
    return records


def _detect_adapter(path: Path) -> str | None:
    name = path.name
    if _HH_NAME.match(name) or ("hh-rlhf" in path.parts and name.endswith((".jsonl", ".jsonl.gz"))):
        return "hh-rlhf"
    if name == "safety_only_data_Instructions.json" or ("safety-tuned-llamas" in path.parts and name.endswith(".json")):
        return "safety-tuned-llamas"
    if name in HARMFUL_FILES or re.match(r"^harmbench_\w+\.csv$", name):
        return "harmful"
    return None


def load_dataset_spec(spec: str, *, limit: int | None = None) -> list[Record]:
    """Records from a data spec string.

    ``hh-rlhf:PATH[:chosen|rejected]``, ``safety-tuned-llamas:PATH``, ``harmful:PATH``, ``FORMAT:PATH``
    (``jsonl``, ``json``, ``csv``, ``parquet``, ``hf``), or a plain path: known shared/data file names go to
    their adapter (an HH-RLHF path may end in ``:chosen`` or ``:rejected``; the default is ``chosen``),
    anything else to :func:`read_records`.
    """
    prefix, sep, rest = spec.partition(":")
    kind = prefix if sep and (prefix in ("hh-rlhf", "safety-tuned-llamas", "harmful") or prefix in FORMATS) else None
    path_text = rest if kind else spec
    if kind is None:
        head, sep, tail = spec.rpartition(":")
        is_hh_with_side = sep and tail in HH_SIDES and _detect_adapter(Path(head)) == "hh-rlhf"
        kind = "hh-rlhf" if is_hh_with_side else _detect_adapter(Path(spec))
    if kind == "hh-rlhf":
        side = "chosen"
        head, sep, tail = path_text.rpartition(":")
        if sep and tail in HH_SIDES:
            path_text, side = head, tail
        return read_hh_rlhf(path_text, side, limit=limit)
    if kind == "safety-tuned-llamas":
        return read_safety_tuned_llamas(path_text, limit=limit)
    if kind == "harmful":
        return read_harmful_prompts(path_text, limit=limit)
    return read_records(path_text, kind, limit=limit)
