"""User-facing errors: one line naming what and where, exit code 2 at the CLI."""

from __future__ import annotations


class LancetError(Exception):
    """An error caused by the user's input or environment, not by a bug in lancet.

    The CLI prints ``str(err)`` on one line and exits with code 2 (no traceback unless ``--debug``).
    """

    exit_code = 2


class DataError(LancetError):
    """Bad training or query data: names the file, the line (1-based, where known) and the field."""

    def __init__(self, message: str, path: str | None = None, line: int | None = None, field: str | None = None):
        self.path, self.line, self.field, self.reason = path, line, field, message
        where = []
        if path is not None:
            where.append(str(path) + (f":{line}" if line is not None else ""))
        if field is not None:
            where.append(f"field '{field}'")
        prefix = ", ".join(where)
        super().__init__(f"{prefix}: {message}" if prefix else message)


class ModelError(LancetError):
    """A model spec that cannot be resolved or loaded."""


class ArtifactError(LancetError):
    """A stored artifact that is missing, corrupted, or was made from other inputs (fingerprint mismatch)."""


class NonFiniteError(LancetError):
    """NaN or inf in a model's activations, gradients or influence scores: what was computed from them is not kept."""


def require(module: str, extra: str, needed_for: str):
    """Import an optional dependency, or stop with one line naming the extra that installs it."""
    import importlib

    try:
        return importlib.import_module(module)
    except ImportError:
        raise LancetError(f"{needed_for} needs the '{module}' package: pip install 'lancet-llm[{extra}]'") from None
