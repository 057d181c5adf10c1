"""Matplotlib figures (Agg, no pyplot state) returned as base64 PNG for embedding in the report."""

from __future__ import annotations

import base64
import io
import math
from collections.abc import Sequence

from lancet.errors import LancetError


def _figure(width: float, height: float):
    try:
        from matplotlib.figure import Figure
    except ImportError as exc:
        raise LancetError("the report needs matplotlib: pip install 'lancet-llm[report]'") from exc
    return Figure(figsize=(width, height), dpi=100, layout="constrained")


def _png(fig) -> str:
    buf = io.BytesIO()
    fig.savefig(buf, format="png")  # Figure.savefig uses the Agg canvas for PNG
    return base64.b64encode(buf.getvalue()).decode("ascii")


def _label(text: str) -> str:
    return text.replace("$", r"\$")  # untrusted names must not be parsed as mathtext


def score_histogram(scores: Sequence[float], title: str) -> str:
    fig = _figure(7, 2.8)
    ax = fig.add_subplot()
    ax.hist([s for s in scores if math.isfinite(s)], bins=60, color="#555555")
    ax.axvline(0, color="black", linewidth=0.8)
    ax.set_yscale("log")
    ax.set_xlabel("aggregated influence (normalised mean over queries)")
    ax.set_ylabel("training rows")
    ax.set_title(_label(title))
    return _png(fig)


def before_after(rows: Sequence[tuple[str, str, float | None, float | None]]) -> str:
    """One small panel per (set, metric, before, after): two bars."""
    cols = min(4, len(rows))
    nrows = math.ceil(len(rows) / cols)
    fig = _figure(3.0 * cols, 2.4 * nrows)
    for k, (name, metric, before, after) in enumerate(rows):
        ax = fig.add_subplot(nrows, cols, k + 1)
        values = [v if v is not None else 0.0 for v in (before, after)]
        bars = ax.bar(["before", "after"], values, color=["#999999", "#2b7bba"])
        for bar, v in zip(bars, (before, after), strict=True):
            ax.annotate("n/a" if v is None else f"{v:.3g}", (bar.get_x() + bar.get_width() / 2, bar.get_height()),
                        ha="center", va="bottom", fontsize=8)
        ax.set_title(_label(f"{name}\n{metric}"), fontsize=9)
        ax.tick_params(labelsize=8)
    return _png(fig)
