"""Collect what a run directory holds into report.json and a self-contained report.html.

Read (each optional): ``influence-<method>.json`` and ``ranking-<method>.safetensors`` (from ``lancet attribute``),
``tokens-<method>.json`` (per-token scores of top rows), ``metrics_before.json`` / ``metrics_after.json`` (from
``lancet evaluate``). Everything read is treated as untrusted: numbers are coerced, text is escaped at rendering,
and method names taken from file names must match a strict pattern before they are used to build other paths.
"""

from __future__ import annotations

import json
import math
import re
from pathlib import Path
from typing import Any

from lancet.artifacts import atomic_write_bytes, atomic_write_json, load_tensors
from lancet.errors import LancetError
from lancet.report import plots
from lancet.report.html import render

SAFE_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_-]{0,63}$")  # no dots, slashes or leading dashes
ROW_TEXT = ("id", "source", "sign", "prompt", "response")


def num(x: Any) -> float | None:
    """A finite float, or None for anything else (strings, NaN, booleans)."""
    if isinstance(x, bool) or not isinstance(x, (int, float)) or not math.isfinite(x):
        return None
    return float(x)


def _read_json(path: Path) -> dict[str, Any] | None:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def methods(run: Path, prefix: str, suffix: str) -> list[str]:
    names = (p.name[len(prefix):-len(suffix)] for p in run.glob(f"{prefix}*{suffix}") if p.is_file())
    return sorted(n for n in names if SAFE_NAME.match(n))


def _rows(value: Any) -> list[dict[str, Any]]:
    rows = []
    for r in value if isinstance(value, list) else []:
        if isinstance(r, dict):
            rows.append({"rank": num(r.get("rank")), "score": num(r.get("score")), "line": num(r.get("line")),
                         **{k: str(r.get(k, "")) for k in ROW_TEXT}})
    return rows


def _influence(run: Path, method: str) -> tuple[dict[str, Any], str | None]:
    data = _read_json(run / f"influence-{method}.json") or {}
    entry: dict[str, Any] = {"method": method, **{k: num(data.get(k)) for k in ("n_train", "n_queries", "seconds")},
                             "top_positive": _rows(data.get("top_positive")),
                             "top_negative": _rows(data.get("top_negative")),
                             "args": data.get("args") if isinstance(data.get("args"), dict) else {}}
    if isinstance(data.get("recall"), dict):
        entry["recall"] = {str(k): num(v) for k, v in data["recall"].items()}
    image = None
    ranking = run / f"ranking-{method}.safetensors"
    if ranking.is_file():
        scores = load_tensors(ranking).get("aggregate_normalized_mean")
        if scores is not None:
            values = [float(v) for v in scores.flatten().tolist()]
            finite = [v for v in values if math.isfinite(v)]
            entry["score_stats"] = {"n": len(values), "min": min(finite, default=None),
                                    "max": max(finite, default=None), "n_positive": sum(v > 0 for v in finite),
                                    "mean": sum(finite) / len(finite) if finite else None}
            image = plots.score_histogram(values, f"{method}: score distribution over {len(values)} rows")
    return entry, image


def _tokens(run: Path, method: str) -> list[dict[str, Any]]:
    data = _read_json(run / f"tokens-{method}.json") or {}
    rows = []
    for r in data.get("rows", []) if isinstance(data.get("rows"), list) else []:
        if isinstance(r, dict) and isinstance(r.get("tokens"), list) and isinstance(r.get("scores"), list):
            pairs = [(str(t), num(s) or 0.0) for t, s in zip(r["tokens"], r["scores"], strict=False)]
            rows.append({"id": str(r.get("id", "")), "tokens": pairs})
    return rows


def _metrics(data: dict[str, Any] | None) -> dict[str, Any] | None:
    if data is None or not isinstance(data.get("sets"), dict):
        return None
    sets = {}
    for name, r in data["sets"].items():
        if isinstance(r, dict):
            metric = str(r.get("metric", ""))
            sets[str(name)] = {"kind": str(r.get("kind", "")), "metric": metric, "value": num(r.get(metric)),
                               "n": num(r.get("n")), "judged": bool(r.get("judged")), "seconds": num(r.get("seconds"))}
    judge = data.get("judge") if isinstance(data.get("judge"), dict) else {}
    return {"sets": sets, "seconds": num(data.get("seconds")),
            "suite": data.get("suite") if isinstance(data.get("suite"), dict) else {},
            "judge": {"judge": str(judge.get("judge", "")),
                      **{k: num(judge.get(k)) for k in ("accuracy", "f1", "refusal_matcher_accuracy", "n")}}}


def collect(run_dir: str | Path) -> tuple[dict[str, Any], dict[str, str]]:
    """(report.json content, {image name: base64 PNG})."""
    run = Path(run_dir)
    if not run.is_dir():
        raise LancetError(f"{run}: run directory not found")
    report: dict[str, Any] = {"run_dir": str(run), "influence": [], "tokens": {}, "metrics": {}}
    images: dict[str, str] = {}
    # a `lancet run` directory: its main method first, the ones it ranked only for comparison after it
    influence_config = (_read_json(run / "run_config.json") or {}).get("influence")
    # a config that names no method ranked with LinFAC before the default became RepSim (2026-12-06); since then the
    # run writes the method it resolved into run_config.json
    main = influence_config.get("method", "linfac") if isinstance(influence_config, dict) else None
    for method in sorted(methods(run, "influence-", ".json"), key=lambda m: m != main):
        entry, image = _influence(run, method)
        report["influence"].append(entry)
        if image:
            images[f"hist-{method}"] = image
    for method in methods(run, "tokens-", ".json"):
        report["tokens"][method] = _tokens(run, method)
    for side in ("before", "after"):
        m = _metrics(_read_json(run / f"metrics_{side}.json"))
        if m:
            report["metrics"][side] = m
    names = sorted({n for m in report["metrics"].values() for n in m["sets"]})
    if names:
        def value(side, name):
            return report["metrics"].get(side, {}).get("sets", {}).get(name, {})

        report["comparison"] = [{"set": n, "metric": value("after", n).get("metric") or value("before", n)["metric"],
                                 "before": value("before", n).get("value"), "after": value("after", n).get("value"),
                                 "judged": bool(value("after", n).get("judged") or value("before", n).get("judged"))}
                                for n in names]
        images["before-after"] = plots.before_after(
            [(c["set"], c["metric"], c["before"], c["after"]) for c in report["comparison"]])
    selection = _read_json(run / "selection" / "selection.json")
    if selection and isinstance(selection.get("chosen"), dict):
        chosen = selection["chosen"]
        report["selection"] = {"chosen_steps": chosen.get("chosen_steps"),
                               "max_utility_loss": num(chosen.get("max_utility_loss")),
                               "curve": [{k: num(p.get(k)) for k in ("steps", "behaviour", "perplexity",
                                                                      "utility_loss")}
                                         for p in chosen.get("curve") or [] if isinstance(p, dict)]}
    rounds = _read_json(run / "rounds.json")
    if rounds and isinstance(rounds.get("rounds"), list):
        report["rounds"] = [{"round": num(r.get("round")), "n_iqs": num(r.get("n_iqs")),
                             "chosen_steps": num(r.get("chosen_steps")),
                             "validation_behaviour": num(r.get("validation_behaviour")),
                             "utility_loss": num(r.get("utility_loss"))}
                            for r in rounds["rounds"] if isinstance(r, dict)]
    report["compute"] = {**{f"attribute {e['method']} (s)": e["seconds"] for e in report["influence"]},
                         **{f"evaluate {s} (s)": m["seconds"] for s, m in report["metrics"].items()}}
    return report, images


def write_report(run_dir: str | Path) -> tuple[Path, Path]:
    """Write ``report.html`` and ``report.json`` into ``run_dir`` (atomically) and return their paths."""
    report, images = collect(run_dir)
    html_path, json_path = Path(run_dir) / "report.html", Path(run_dir) / "report.json"
    atomic_write_json(json_path, report)
    atomic_write_bytes(html_path, render(report, images).encode("utf-8"))
    return html_path, json_path
