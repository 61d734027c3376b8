"""User-facing errors: one line that names the problem and the field, exit code 2, no traceback."""

from __future__ import annotations

import re

_SUBPATH = re.compile(r"^[A-Za-z_]\w*(\.\w+)*: ")


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
        msg = err.get("msg", "invalid value").removeprefix("Value error, ")
        if err.get("type") == "extra_forbidden":
            msg = "unknown field"
        if loc and _SUBPATH.match(msg):
            # A model-level validator that names the sub-field itself: join the two paths.
            parts.append(f"{loc}.{msg}")
        else:
            parts.append(f"{loc}: {msg}" if loc else msg)
    return f"{source}: " + "; ".join(parts)
