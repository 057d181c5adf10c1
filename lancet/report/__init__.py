"""The audit report of a run directory: report.html (self-contained) and report.json."""

from lancet.report.build import collect, write_report

__all__ = ["collect", "write_report"]
