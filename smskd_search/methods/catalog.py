"""The method catalog that ``smskd-search methods`` prints: every registered method with its family,
reference and parameters (defaults and descriptions read from its pydantic ``Params``), and the
defaults that follow the teacher/student pair."""

from __future__ import annotations

from typing import Any

from smskd_search.methods.base import METHODS
from smskd_search.methods.pair_defaults import pair_default_rows

_FAMILY_ORDER = {"none": 0, "response": 1, "feature": 2, "relation": 3}


def _type_name(annotation: Any) -> str:
    if isinstance(annotation, type):
        return annotation.__name__
    return str(annotation).replace("typing.", "")


def method_rows() -> list[dict]:
    """One dict per registered method, ordered by family then name:
    ``{"name", "family", "reference", "params": [{"name", "type", "default", "description", "per_pair"}]}``;
    ``per_pair`` says that some pair of :func:`pair_default_rows` has its own default for it."""
    # Importing the package registers every method module.
    import smskd_search.methods  # noqa: F401

    per_pair = {(r["method"], p) for r in pair_default_rows() for p in r["params"]}
    rows = []
    for name, cls in METHODS.items():
        params = []
        for pname, field in cls.Params.model_fields.items():
            params.append({
                "name": pname,
                "type": _type_name(field.annotation),
                "default": field.get_default(call_default_factory=True),
                "description": field.description or "",
                "per_pair": (name, pname) in per_pair,
            })
        rows.append({"name": name, "family": cls.family, "reference": cls.reference, "params": params})
    rows.sort(key=lambda r: (_FAMILY_ORDER.get(r["family"], len(_FAMILY_ORDER)), r["name"]))
    return rows


__all__ = ["method_rows", "pair_default_rows"]
