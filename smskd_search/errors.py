"""User-facing errors: one line that names the problem and the field, exit code 2, no traceback."""

from __future__ import annotations


class UserError(Exception):
    """Bad input from the user (a file, a flag, a dataset, a checkpoint).

    The CLI prints ``error: <message>`` and exits with code 2. Library callers can catch it.
    """

    exit_code = 2


def format_validation_error(source: str, exc: Exception) -> str:
    """Turn a pydantic ValidationError into one line: ``<source>: <field.path>: <message>``."""
    errors = getattr(exc, "errors", None)
    if errors is None:
        return f"{source}: {exc}"
    parts = []
    for err in errors():
        loc = ".".join(str(p) for p in err.get("loc", ()) if p != "__root__")
        msg = err.get("msg", "invalid value")
        if err.get("type") == "extra_forbidden":
            msg = "unknown field"
        parts.append(f"{loc}: {msg}" if loc else msg)
    return f"{source}: " + "; ".join(parts)
