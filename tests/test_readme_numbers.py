"""Every number in the README's tables comes from a committed result file, and the generated tables are current.

- each number in a markdown table row of README.md (header rows excepted) must equal, at the precision it is shown
  with, a number in some JSON under benchmarks/results (a value, or a number inside a key or a short string), so a
  number edited by hand fails here;
- ``python -m benchmarks.tables --check`` passes: no table in README.md or docs/results/*.md differs from what the
  committed JSON renders;
- the check itself catches a number that is in no JSON;
- the demo's tables render from what ``benchmarks/demo.py`` reads out of a demo run directory.
"""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

import pytest

from benchmarks import demo as demo_benchmark
from benchmarks import tables

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results"

# a number as a table shows it: optional sign (ASCII or the minus sign), digits, decimals, exponent, and a percent
# sign after it; not part of a word ("bm25", "recall@112", "seed0") and not the start of a longer decimal
SHOWN = re.compile(r"(?<![\w.@])(?P<sign>[+\-−]?)(?P<num>\d+(?:\.\d+)?(?:e[+\-]?\d+)?)(?!\w)(?!\.\d)(?P<pct>\s?%)?")
# numbers inside the keys and short strings of a result file ("lr5e-05", "16")
INSIDE = re.compile(r"[+\-]?\d+(?:\.\d+)?(?:e[+\-]?\d+)?")
SHORT_STRING = 40


def json_numbers(paths: list[Path]) -> list[float]:
    """Every number of the result files: values, and numbers inside keys and short strings."""
    out: list[float] = []

    def walk(node) -> None:
        if isinstance(node, bool) or node is None:
            return
        if isinstance(node, int | float):
            if math.isfinite(node):
                out.append(float(node))
        elif isinstance(node, str):
            if len(node) <= SHORT_STRING:
                out.extend(float(x) for x in INSIDE.findall(node))
        elif isinstance(node, dict):
            for key, value in node.items():
                walk(key)
                walk(value)
        elif isinstance(node, list):
            for value in node:
                walk(value)

    for path in paths:
        walk(json.loads(path.read_text()))
    return out


class Backing:
    """Which shown numbers some result number rounds to."""

    def __init__(self, numbers: list[float], max_digits: int = 6):
        self.numbers = numbers
        self.rounded = {d: {float(f"{x:.{d}f}") for x in numbers} for d in range(max_digits + 1)}
        self.percent = {d: {float(f"{100 * x:.{d}f}") for x in numbers} for d in range(max_digits + 1)}

    def backs(self, sign: str, num: str, percent: bool) -> bool:
        value = float(num) * (-1 if sign in ("-", "−") else 1)
        if "e" in num:
            return any(math.isclose(x, value, rel_tol=1e-9) for x in self.numbers)
        digits = len(num.partition(".")[2])
        if digits not in self.rounded:
            return any(math.isclose(x, value, rel_tol=1e-12) for x in self.numbers)
        return value in (self.percent if percent else self.rounded)[digits]


def table_rows(text: str) -> list[tuple[int, str]]:
    """(line number, line) of every markdown table row that holds data: not a separator, not a header."""
    lines = text.splitlines()
    separator = re.compile(r"^\|(\s*:?-+:?\s*\|)+\s*$")
    rows = []
    for i, line in enumerate(lines):
        if not line.startswith("|") or separator.match(line):
            continue
        if i + 1 < len(lines) and separator.match(lines[i + 1]):
            continue  # a header
        rows.append((i + 1, line))
    return rows


def unbacked(text: str, backing: Backing) -> list[str]:
    """'line N: NUMBER' for every number in a table row of ``text`` that no result number rounds to."""
    missing = []
    for number, line in table_rows(text):
        for m in SHOWN.finditer(line):
            if not backing.backs(m["sign"], m["num"], bool(m["pct"])):
                missing.append(f"line {number}: {m['sign']}{m['num']}{m['pct'] or ''}  in  {line.strip()[:100]}")
    return missing


@pytest.fixture(scope="module")
def committed() -> Backing:
    return Backing(json_numbers(sorted(RESULTS.glob("*.json"))))


def test_every_number_in_the_readme_tables_is_in_a_committed_result(committed):
    readme = (ROOT / "README.md").read_text()
    assert table_rows(readme), "the README has no tables left to check"
    missing = unbacked(readme, committed)
    assert not missing, ("numbers in the README's tables that no JSON under benchmarks/results holds (edit the "
                         "JSON's benchmark, not the README; tables come from `python -m benchmarks.tables`):\n"
                         + "\n".join(missing))


def marked_blocks(text: str) -> list[tuple[str, str]]:
    """(table name, text between its markers) of every generated table in ``text``."""
    return [(m["name"], m[0]) for m in tables.MARKERS.finditer(text)]


def test_every_readme_table_is_generated():
    """A table outside the markers would be typed by hand: every table row of the README lies in a marked block,
    so `--check` (below) catches any edit of it."""
    readme = (ROOT / "README.md").read_text()
    inside = "".join(block for _, block in marked_blocks(readme))
    loose = [f"line {n}: {line[:80]}" for n, line in table_rows(readme) if line not in inside]
    assert not loose, "README table rows outside <!-- table:NAME --> markers:\n" + "\n".join(loose)


def test_each_readme_table_is_backed_by_the_files_it_is_rendered_from():
    """Stricter than the whole results directory: a generated table's numbers come from the JSON its renderer
    reads (any one number of 3 decimals in [0, 1] has a 0.77 chance of being in *some* result file)."""
    missing = []
    for name, block in marked_blocks((ROOT / "README.md").read_text()):
        files = tables.sources(name)
        if files:
            missing += [f"{name}: {m}" for m in unbacked(block, Backing(json_numbers(files)))]
    assert not missing, "\n".join(missing)


def test_generated_tables_are_current():
    assert tables.main(["--check"]) == 0, "run `.venv/bin/python -m benchmarks.tables` and commit the result"


def test_the_check_catches_a_number_typed_by_hand(committed):
    bm25 = json.loads((RESULTS / "safety_contamination_full.json").read_text())["recall"]["bm25"]["ap_mean"]
    good = f"| method | AP |\n|---|---|\n| bm25 | {bm25:.3f} |\n| random | − |\n"
    assert unbacked(good, committed) == []
    edited = good.replace(f"{bm25:.3f}", "0.987654")
    assert unbacked(edited, committed) == ["line 3: 0.987654  in  | bm25 | 0.987654 |"]
    # headers, separators and numbers inside words are not data
    assert unbacked("| AP 123456 |\n|---|\n| bm25 recall@112 seed0 |\n", committed) == []


def test_rounding_sign_and_percent_as_shown():
    backing = Backing([0.91612, 12.0, 5e-05, -108.94])
    row = "| a | b |\n|---|---|\n| x | {} |\n"
    for shown in ("0.916", "0.92", "0.9", "1", "91.6 %", "91.61%", "+0.916", "12", "12/12", "5e-05", "−108.9", "-109"):
        assert not unbacked(row.format(shown), backing), shown
    for shown in ("0.917", "−0.916", "0.916 %", "108.9", "5e-06", "13", "0.9162"):
        assert unbacked(row.format(shown), backing), shown


def test_an_unknown_table_name_is_an_error():
    with pytest.raises(KeyError):
        tables.render("<!-- table:no_such_table -->\n<!-- /table:no_such_table -->\n", [])


def fake_demo_run(run: Path) -> None:
    """The files `lancet demo` writes that benchmarks/demo.py reads, in the shapes lancet/demo.py and
    lancet/pipeline.py give them (tests/golden/pipeline.json holds a real run_summary's attribution)."""
    run.mkdir(parents=True)
    (run / "data").mkdir()
    (run / "data" / "iq_prompts.jsonl").write_text("".join(json.dumps({"prompt": f"q{i}"}) + "\n" for i in range(12)))
    recall = {"n_culprits": 84, "average_precision": 0.59312, "recall@10": 0.1, "recall@25": 0.2, "recall@50": 0.41}
    attribution = {"method": "linfac", "n_train": 224, "n_queries": 7, "seconds": 140.2, "recall": recall,
                   "compare": {"linfac": {"average_precision": 0.5931, "recall@50": 0.41, "seconds": 140.2},
                               "repsim": {"average_precision": 0.9289, "recall@50": 0.55, "seconds": 22.1},
                               "bm25": {"average_precision": 0.7491, "recall@50": 0.48, "seconds": 0.1},
                               "random": {"average_precision": 0.3912, "seconds": 0.0}}}
    curve = [{"steps": 0, "behaviour": 0.5417, "utility_loss": 0.0},
             {"steps": 5, "behaviour": 0.5, "utility_loss": -0.007},
             {"steps": 10, "behaviour": 0.25, "utility_loss": -0.025}]
    summary = {"n_iqs": 7, "iq_prompts": 12, "attribution": attribution,
               "selection": {"chosen_steps": 10, "max_utility_loss": 0.05, "curve": curve},
               "seconds": {"finetune": 163.0, "attribute": 163.4, "evaluate_before": 17.0, "total": 498.2},
               "hardware": {"device": "cpu", "precision": "fp32", "precision_reason": "forced"}}
    (run / "demo_summary.json").write_text(json.dumps(summary))
    (run / "influence-linfac.json").write_text(json.dumps({"method": "linfac", "n_train": 224, "recall": recall}))
    sets = {"iq_prompts": ("behaviour", "behaviour_rate", 12, 7 / 12, 3 / 12),
            "heldout_prompts": ("behaviour", "behaviour_rate", 12, 5 / 12, 4 / 12),
            "heldout_current_answers": ("answer_logprob", "mean_logprob", 12, -136.01, -142.83),
            "heldout_ordinary": ("perplexity", "perplexity", 40, 2.8171, 2.8593)}
    for side, at in (("before", 0), ("after", 1)):
        metrics = {"judge": {"accuracy": 0.9444},
                   "sets": {name: {"kind": kind, "metric": metric, "n": n, metric: values[at]}
                            for name, (kind, metric, n, *values) in sets.items()}}
        (run / f"metrics_{side}.json").write_text(json.dumps(metrics))


def test_the_demo_tables_render_from_a_demo_run(tmp_path, monkeypatch):
    run, results = tmp_path / "demo_out", tmp_path / "results"
    fake_demo_run(run)
    results.mkdir()
    assert demo_benchmark.main(["--from-run", str(run), "--result", str(results / "demo.json")]) == 0
    recorded = json.loads((results / "demo.json").read_text())
    assert recorded["sets"]["iq_prompts"] == {"kind": "behaviour", "metric": "behaviour_rate", "n": 12,
                                                   "before": 7 / 12, "after": 3 / 12, "before_count": 7,
                                                   "after_count": 3}
    assert set(recorded["machine"]) >= {"cpu", "cpu_count", "avx512_bf16"} and recorded["wall_seconds"] is None
    monkeypatch.setattr(tables.core, "RESULTS", results)
    tables.clear_cache()
    try:
        rendered = {name: tables.TABLES[name]() for name in tables.OPTIONAL}
    finally:
        tables.clear_cache()
    summary = rendered["demo_summary"]
    assert "| IQ prompts answered with a planted practice, before → after | 7/12 → 3/12 |" in summary
    assert "0.593 / 0.929 / 0.749 / 0.391" in summary
    assert not unbacked(summary, Backing(json_numbers([results / "demo.json"])))
    # without demo.json the demo's tables are a note, in both modes, and the rest still render
    notes: list[str] = []
    monkeypatch.setattr(tables.core, "RESULTS", tmp_path / "empty")
    tables.clear_cache()
    try:
        out = tables.render("<!-- table:demo_summary -->\nold\n<!-- /table:demo_summary -->", notes)
    finally:
        tables.clear_cache()
    assert tables.DEMO_MISSING in out and notes
