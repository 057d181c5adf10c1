"""report.html: one self-contained page (inline CSS, base64 PNG images, no scripts, no external resources).

Training and model text is untrusted: every string goes through ``e`` (html.escape, quotes too), and a
Content-Security-Policy forbids scripts and remote loads should anything slip through.
"""

from __future__ import annotations

import json
from html import escape
from typing import Any

CSP = "default-src 'none'; img-src data:; style-src 'unsafe-inline'"
CSS = """body{font:14px/1.45 system-ui,sans-serif;margin:2em auto;max-width:1150px;color:#222}
table{border-collapse:collapse;margin:.5em 0 1.5em}td,th{border:1px solid #ccc;padding:3px 6px;vertical-align:top}
th{background:#f3f3f3}td.t{max-width:420px;white-space:pre-wrap;word-break:break-word}td.n{text-align:right}
pre{background:#f6f6f6;padding:.6em;overflow-x:auto}.tok{white-space:pre-wrap;line-height:1.9}
.tok span{border-radius:2px}img{max-width:100%}.note{color:#666}"""


def e(x: Any) -> str:
    return escape(str(x), quote=True)


def fmt(x: float | None, digits: int = 4) -> str:
    return "–" if x is None else f"{x:.{digits}g}"


def table(header: list[str], rows: list[list[tuple[str, str]]]) -> str:
    """Rows of (css class, already-escaped cell html)."""
    head = "".join(f"<th>{e(h)}</th>" for h in header)
    body = "".join("<tr>" + "".join(f'<td class="{c}">{v}</td>' for c, v in r) + "</tr>" for r in rows)
    return f"<table><tr>{head}</tr>{body}</table>"


def image(b64: str, alt: str) -> str:
    return f'<img alt="{e(alt)}" src="data:image/png;base64,{b64}">'


def _top_rows(rows: list[dict[str, Any]]) -> str:
    return table(["rank", "score", "source:line", "id", "prompt", "response"], [
        [("n", fmt(r["rank"])), ("n", fmt(r["score"])),
         ("", e(f"{r['source'].rsplit('/', 1)[-1]}:{fmt(r['line'])}")), ("", e(r["id"])),
         ("t", e(r["prompt"])), ("t", e(r["response"]))] for r in rows])


def _tokens(rows: list[dict[str, Any]]) -> str:
    """Red = pushes towards the behaviour (positive), blue = against; opacity = |score| / max |score| of the row."""
    out = []
    for r in rows:
        peak = max((abs(s) for _, s in r["tokens"]), default=0.0) or 1.0
        spans = "".join(
            f'<span title="{s:+.3g}" style="background:rgba({"214,39,40" if s > 0 else "31,119,180"},'
            f'{abs(s) / peak:.2f})">{e(t)}</span>' for t, s in r["tokens"])
        out.append(f"<p>row {e(r['id'])}</p><div class=\"tok\">{spans}</div>")
    return "".join(out)


def _influence(entry: dict[str, Any], images: dict[str, str], tokens: dict[str, list]) -> str:
    m = entry["method"]
    parts = [f"<h2>Influence: {e(m)}</h2>",
             f"<p>{fmt(entry['n_train'])} training rows × {fmt(entry['n_queries'])} queries, "
             f"{fmt(entry['seconds'])} s.</p>"]
    if entry.get("recall"):
        parts.append(table(list(entry["recall"]), [[("n", fmt(v)) for v in entry["recall"].values()]]))
    if f"hist-{m}" in images:
        parts.append(image(images[f"hist-{m}"], f"{m} score histogram"))
    parts += ["<h3>Rows that drive the behaviour (positive influence)</h3>", _top_rows(entry["top_positive"]),
              "<h3>Rows that counter it (negative influence)</h3>", _top_rows(entry["top_negative"])]
    if tokens.get(m):
        parts += ["<h3>Per-token influence of top rows</h3>", _tokens(tokens[m])]
    return "".join(parts)


def _metrics(report: dict[str, Any], images: dict[str, str]) -> str:
    parts = ["<h2>Evaluation before and after correction</h2>"]
    if "before-after" in images:
        parts.append(image(images["before-after"], "before/after metrics"))
    judges = {s: m["judge"] for s, m in report["metrics"].items()}
    rows = []
    for c in report["comparison"]:
        acc = "; ".join(f"{e(s)}: {fmt(j['accuracy'], 3)} ({e(j['judge'])})" for s, j in judges.items())
        rows.append([("", e(c["set"])), ("", e(c["metric"])), ("n", fmt(c["before"])), ("n", fmt(c["after"])),
                     ("", acc if c["judged"] else "–")])
    parts.append(table(["set", "metric", "before", "after", "judge accuracy (held-out XSTest)"], rows))
    return "".join(parts)


def _selection(selection: dict[str, Any]) -> str:
    chosen = selection["chosen_steps"]
    rows = [[("n", fmt(p["steps"])), ("n", fmt(p["behaviour"], 3)), ("n", fmt(p["perplexity"])),
             ("n", fmt(p["utility_loss"], 3)), ("", "chosen" if p["steps"] == chosen else "")]
            for p in selection["curve"]]
    return ("<h2>Checkpoint selection (validation prompts only)</h2>"
            f"<p class=\"note\">The lowest validation behaviour with utility loss (relative perplexity increase on "
            f"validation ordinary answers) within {fmt(selection['max_utility_loss'], 3)}; ties go to fewer steps. "
            "Step 0 is the model before correction. The evaluation above reads the test sets once, on the chosen "
            "model.</p>"
            + table(["steps", "validation behaviour", "validation perplexity", "utility loss", ""], rows))


def render(report: dict[str, Any], images: dict[str, str]) -> str:
    body = [f"<h1>lancet report</h1><p class=\"note\">run directory: {e(report['run_dir'])}</p>"]
    for entry in report["influence"]:
        body.append(_influence(entry, images, report["tokens"]))
    if report.get("comparison"):
        body.append(_metrics(report, images))
    if report.get("selection"):
        body.append(_selection(report["selection"]))
    if report.get("rounds"):
        rows = [[("n", fmt(r["round"])), ("n", fmt(r["n_iqs"])), ("n", fmt(r["chosen_steps"])),
                 ("n", fmt(r["validation_behaviour"], 3)), ("n", fmt(r["utility_loss"], 3))] for r in report["rounds"]]
        body.append("<h2>Correction rounds</h2><p class=\"note\">Each round attributes the corrected model's remaining "
                    "flagged answers and corrects again; utility loss is measured against the model before round "
                    "0.</p>" + table(["round", "IQs", "chosen steps", "validation behaviour", "utility loss"], rows))
    if not report["influence"] and not report.get("comparison"):
        body.append("<p>Nothing to report yet: no influence-*.json or metrics_*.json in this directory.</p>")
    settings = {e["method"]: e["args"] for e in report["influence"]}
    settings.update({f"evaluate {s}": m["suite"] for s, m in report["metrics"].items()})
    body.append("<h2>Compute and settings</h2>" + table(["stage", "seconds"], [
        [("", e(k)), ("n", fmt(v))] for k, v in report["compute"].items()]))
    body.append(f"<pre>{e(json.dumps(settings, indent=2, sort_keys=True, default=str))}</pre>")
    return (f'<!DOCTYPE html><html lang="en"><head><meta charset="utf-8">'
            f'<meta http-equiv="Content-Security-Policy" content="{CSP}">'
            f"<title>lancet report</title><style>{CSS}</style></head><body>{''.join(body)}</body></html>\n")
