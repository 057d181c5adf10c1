"""The pieces every table renderer shares: the registry (``TABLES``, ``@table``), reading a result file once
(``load``), and small formatters."""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from functools import cache
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]  # the repository: benchmarks/tables/core.py
RESULTS = ROOT / "benchmarks" / "results"
FILES = ("README.md", "docs/results/*.md")
MARKERS = re.compile(r"<!-- table:(?P<name>[\w.-]+) -->\n.*?<!-- /table:(?P=name) -->", re.S)
DEMO_MISSING = ("_Not measured yet: `benchmarks/results/demo.json` is written by `.venv/bin/python -m "
                "benchmarks.demo` (the demo as the README runs it), then `.venv/bin/python -m benchmarks.tables` "
                "fills in this table._")


# name -> renderer (a marker's NAME); each renderer reads its JSON through ``load`` (Missing when absent)
TABLES: dict[str, Callable[[], str]] = {}


def table(fn: Callable[[], str]) -> Callable[[], str]:
    TABLES[fn.__name__] = fn
    return fn


class Missing(Exception):
    """A result file a table reads is not there."""


_reading: list[str] | None = None  # the result files the table being traced reads (``sources``)


def load(name: str) -> dict:
    """benchmarks/results/NAME.json (read once per process)."""
    if _reading is not None:
        _reading.append(name)
    return _load(name)


@cache
def _load(name: str) -> dict:
    path = RESULTS / f"{name}.json"
    if not path.is_file():
        raise Missing(str(path.relative_to(ROOT)) if path.is_relative_to(ROOT) else str(path))
    return json.loads(path.read_text())


def clear_cache() -> None:
    _load.cache_clear()


def sources(name: str) -> list[Path]:
    """The result files table ``name`` reads (those that exist)."""
    global _reading
    _reading = []
    try:
        TABLES[name]()
    except Missing:
        pass
    finally:
        names, _reading = _reading, None
    return [RESULTS / f"{n}.json" for n in dict.fromkeys(names) if (RESULTS / f"{n}.json").is_file()]


def md(head: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(head) + " |", "|---" * len(head) + "|"]
    return "\n".join(lines + ["| " + " | ".join(str(c) for c in row) + " |" for row in rows])


def f(x: float | None, digits: int = 3, sign: bool = False) -> str:
    if x is None:
        return "–"
    return f"{x:+.{digits}f}" if sign else f"{x:.{digits}f}"


def bold(text: str, on: bool) -> str:
    return f"**{text}**" if on else text


def made_by(command: str, result: dict, file: str, extra: str = "") -> str:
    env = result.get("env", {})
    where = ", ".join(x for x in (env.get("precision"), extra) if x)
    return (f"`{command}`, {env.get('date', 'date not recorded')}" + (f" ({where})" if where else "")
            + f"; `benchmarks/results/{file}.json`.")
