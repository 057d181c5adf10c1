"""Every results table of the README and of docs/results/*.md, rendered from the committed JSON under
benchmarks/results (never typed by hand).

    .venv/bin/python -m benchmarks.tables            # rewrite the tables in place
    .venv/bin/python -m benchmarks.tables --check    # exit 1 if any file would change (CI, tests)
    .venv/bin/python -m benchmarks.tables --list     # the table names and the JSON each one reads

A table lives between two markers in a markdown file:

    <!-- table:NAME -->
    (generated; anything here is replaced)
    <!-- /table:NAME -->

NAME is a key of ``TABLES``; the same table may appear in several files. The prose around the markers is the
lab notes' reading and is left alone. A marker with an unknown name is an error (exit 2).

The demo's tables read benchmarks/results/demo.json, written by ``python -m benchmarks.demo`` (the demo run as the
README gives it, about 10 minutes on 2 cores). Until that file exists they render a one-line note saying so, in
both modes, so ``--check`` passes on a clone without it; once it exists, the tables must be regenerated (``--check``
then fails until they are).
"""

from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path

from benchmarks.tables import demo, others, safety  # noqa: F401  (each registers its tables)
from benchmarks.tables.core import (  # noqa: F401  (the tables' API, as tests and callers use it)
    DEMO_MISSING,
    FILES,
    MARKERS,
    RESULTS,
    ROOT,
    TABLES,
    Missing,
    clear_cache,
    load,
    sources,
)

# tables that may render before their result exists: the demo's, until benchmarks/demo.py has run
OPTIONAL = {"demo_summary", "demo_recall", "demo_sets", "demo_selection", "demo_seconds"}


def render_table(name: str, notes: list[str]) -> str:
    try:
        return TABLES[name]()
    except Missing as missing:
        if name not in OPTIONAL:
            raise
        notes.append(f"{missing} is missing: the demo's tables are left as a note (`python -m benchmarks.demo` "
                     "writes it)")
        return DEMO_MISSING


def render(text: str, notes: list[str]) -> str:
    """``text`` with every marked table regenerated."""
    def block(match: re.Match) -> str:
        name = match["name"]
        if name not in TABLES:
            raise KeyError(name)
        return f"<!-- table:{name} -->\n\n{render_table(name, notes)}\n\n<!-- /table:{name} -->"

    return MARKERS.sub(block, text)


def files(root: Path = ROOT) -> list[Path]:
    found = [p for pattern in FILES for p in sorted(root.glob(pattern))]
    if root / "README.md" not in found:  # a wrong root would find nothing and check nothing
        raise FileNotFoundError(f"{root}: no README.md to render tables into")
    return found


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--check", action="store_true", help="change nothing; exit 1 if any file would change")
    parser.add_argument("--list", action="store_true", help="print the table names and stop")
    ns = parser.parse_args(argv)
    if ns.list:
        for name, fn in TABLES.items():
            print(f"{name:<32} {(fn.__doc__ or '').strip().splitlines()[0] if fn.__doc__ else ''}")
        return 0
    notes: list[str] = []
    stale = []
    for path in files():
        old = path.read_text()
        try:
            new = render(old, notes)
        except KeyError as exc:
            print(f"{path.relative_to(ROOT)}: unknown table {exc.args[0]!r} (known: {', '.join(TABLES)})",
                  file=sys.stderr)
            return 2
        except Missing as missing:
            print(f"{path.relative_to(ROOT)}: a table reads {missing}, which is missing", file=sys.stderr)
            return 2
        if new != old:
            stale.append(path.relative_to(ROOT))
            if not ns.check:
                path.write_text(new)
    for note in dict.fromkeys(notes):
        print(f"note: {note}", file=sys.stderr)
    if ns.check:
        for path in stale:
            print(f"{path}: tables differ from benchmarks/results (run `python -m benchmarks.tables`)",
                  file=sys.stderr)
        return 1 if stale else 0
    for path in stale:
        print(f"rewrote the tables of {path}")
    return 0
