"""Registry checks: the models, methods and method parameters a plan or space names exist.

:mod:`smskd_search.plan` and :mod:`smskd_search.space` check structure and ranges only (they sit
below the registries); this module, above ``models`` and ``methods``, checks the names, with the same
one-line errors naming the file and the field. :func:`load_plan` and :func:`parse_plan` here do
both, and are what commands and notebooks use.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from pydantic import ValidationError

from smskd_search import plan as plan_mod
from smskd_search.errors import UserError, format_validation_error
from smskd_search.methods import METHODS
from smskd_search.models import MODELS
from smskd_search.plan import Plan, ProblemSpec


def _unknown(kind: str, name: str, known: Any) -> str:
    return f"unknown {kind} {name!r}; known: {', '.join(sorted(known))}"


def method_params_error(method: str, params: dict[str, Any], label: str) -> str | None:
    """Why ``params`` are not valid for ``method`` (None if they are)."""
    if method not in METHODS:
        return _unknown("method", method, METHODS)
    try:
        METHODS[method].Params.model_validate(params)
    except ValidationError as exc:
        return format_validation_error(label, exc)
    return None


def check_problem(problem: ProblemSpec, source: str, prefix: str = "problem") -> None:
    for role in ("teacher", "student"):
        arch = getattr(problem, role).arch
        if arch not in MODELS:
            raise UserError(f"{source}: {prefix}.{role}: {_unknown('arch', arch, MODELS)}")
    teacher = problem.teacher
    if teacher.weights is not None:
        from smskd_search.models.pretrained import weights_error  # torchvision: only when asked for

        why = weights_error(teacher.arch, teacher.weights)
        if why is not None:
            raise UserError(f"{source}: {prefix}.teacher.weights: {why}")


def check_plan(plan: Plan, source: str = "plan") -> Plan:
    """``plan`` if every arch, method and method parameter it names exists; else a UserError."""
    check_problem(plan.problem, source)
    for i, stage in enumerate(plan.stages):
        why = method_params_error(stage.method, stage.params, f"params of {stage.method}")
        if why is not None:
            raise UserError(f"{source}: stages.{i}: {why}")
    return plan


def search_names_error(methods: list[str], method_params: dict[str, dict[str, Any]]) -> str | None:
    """Why a space's search names an unknown method or bad parameters, as ``field: message``."""
    for i, name in enumerate(methods):
        if name not in METHODS:
            return f"methods.{i}: {_unknown('method', name, METHODS)}"
    for name, params in method_params.items():
        if name not in METHODS:
            return f"method_params.{name}: unknown method"
        why = method_params_error(name, params, f"method_params.{name}")
        if why is not None:
            return why
    return None


def check_space(space: Any, source: str) -> Any:
    """``space`` (a :class:`smskd_search.space.Space`) if its problem's archs exist; else a UserError.

    The search part's names are checked while the space validates (:func:`search_names_error`).
    """
    check_problem(space.problem, source)
    return space


def parse_plan(data: Any, source: str = "plan") -> Plan:
    """A plan from parsed YAML, checked in structure and names (one-line UserError otherwise)."""
    return check_plan(plan_mod.parse_plan(data, source), source)


# Top-level plan fields a hand-written file may leave out (they then take the defaults of Plan).
DEFAULTABLE = ("recipe", "reference", "seed", "restart_optimizer")


def load_plan(path: str | Path) -> Plan:
    """A plan file, checked in structure and names; it must say its ``version``.

    Example:

        >>> from smskd_search import load_plan
        >>> plan = load_plan("studies/default/best.yaml")  # doctest: +SKIP
        >>> plan.sequence()  # doctest: +SKIP
        'kd(10)'
    """
    return load_plan_and_defaults(path)[0]


def load_plan_and_defaults(path: str | Path) -> tuple[Plan, list[str]]:
    """:func:`load_plan`, and the top-level fields the file left to their defaults."""
    data = plan_mod.read_yaml(path)
    if isinstance(data, dict) and "version" not in data:
        raise UserError(f"{path}: version: missing; a plan file says `version: {plan_mod.PLAN_VERSION}` "
                        "(as `export` writes it)")
    plan = parse_plan(data, str(path))
    return plan, [f for f in DEFAULTABLE if f not in data]


__all__ = ["DEFAULTABLE", "check_plan", "check_problem", "check_space", "load_plan", "load_plan_and_defaults",
           "method_params_error", "parse_plan",
           "search_names_error"]
