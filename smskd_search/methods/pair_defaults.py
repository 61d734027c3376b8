"""Method parameters whose benchmark default depends on the teacher/student pair.

mdistiller's CIFAR-100 DKD configs set ``beta`` per pair (2, 6 or 8; 8 is the config default). Only
pairs whose archs are in our zoo are listed; aliases (``ShuffleV1``, ``MobileNetV2``...) match their
canonical names.

Where it applies: :func:`smskd_search.make_plan` (and ``verify``'s single-method rows) writes these
values into a stage's ``params`` when the space does not set the parameter, so that a stored or
exported plan says the value it trains with and re-runs bit-for-bit whatever this table later says.
The engine never reads the table: a hand-written plan that leaves the parameter out gets the
method's own default (the ``Params`` default), and an explicit value in a plan or a space always wins.
"""

from __future__ import annotations

from typing import Any

from smskd_search.models import MODELS

# (teacher arch, student arch) -> {method: {parameter: value}}.
PAIR_DEFAULTS: dict[tuple[str, str], dict[str, dict[str, Any]]] = {
    ("resnet56", "resnet20"): {"dkd": {"beta": 2.0}},
    ("resnet32x4", "resnet8x4"): {"dkd": {"beta": 8.0}},
    ("resnet32x4", "shufflenetv1"): {"dkd": {"beta": 8.0}},
    ("resnet32x4", "shufflenetv2"): {"dkd": {"beta": 8.0}},
    ("vgg13", "vgg8"): {"dkd": {"beta": 6.0}},
    ("vgg13", "mobilenetv2"): {"dkd": {"beta": 6.0}},
    ("wrn_40_2", "wrn_16_2"): {"dkd": {"beta": 6.0}},
    ("wrn_40_2", "shufflenetv1"): {"dkd": {"beta": 8.0}},
}


def _same_arch(a: str, b: str) -> bool:
    # Aliases are registered as the same factory.
    return a == b or (a in MODELS and MODELS.get(a) is MODELS.get(b))


def pair_defaults(teacher_arch: str, student_arch: str, method: str) -> dict[str, Any]:
    """The pair's defaults for ``method`` (empty where the pair or the method is not in the table).

    Args:
        teacher_arch: The teacher's arch name (aliases allowed).
        student_arch: The student's arch name (aliases allowed).
        method: The method's registered name.
    """
    for (t, s), by_method in PAIR_DEFAULTS.items():
        if _same_arch(teacher_arch, t) and _same_arch(student_arch, s):
            return dict(by_method.get(method, {}))
    return {}


def stage_params(teacher_arch: str, student_arch: str, method: str, explicit: dict[str, Any]) -> dict[str, Any]:
    """A stage's parameters: the pair's defaults for ``method``, overridden by ``explicit``.

    Args:
        teacher_arch: The teacher's arch name.
        student_arch: The student's arch name.
        method: The method's registered name.
        explicit: Parameters the space (or plan) sets; these always win.
    """
    return {**pair_defaults(teacher_arch, student_arch, method), **explicit}


def pair_default_rows() -> list[dict[str, Any]]:
    """One dict per table entry: ``{"teacher", "student", "method", "params"}``, in table order."""
    return [{"teacher": t, "student": s, "method": m, "params": dict(p)}
            for (t, s), by_method in PAIR_DEFAULTS.items() for m, p in by_method.items()]


__all__ = ["PAIR_DEFAULTS", "pair_default_rows", "pair_defaults", "stage_params"]
