"""Define-by-run sampling: an Optuna trial's parameters -> one valid :class:`Plan` of a space.

Parameter names and distributions (each name keeps one distribution in every trial, as TPE needs;
a parameter whose range allows a single value is not suggested at all):

``n_stages``                 int in ``search.stages``
``stage{k}.method``          categorical over ``search.methods`` (``allow_repeat: true``)
``stage{k}.method_idx``      categorical over ``0 .. M-k`` (``allow_repeat: false``): a Lehmer code,
                             stage k picks among the M-k+1 methods not used by stages 1..k-1, in the
                             space's order, so an ordering without repeats is the only possible outcome
``stage{k}.epochs``          int in ``search.epochs`` (when ``total_epochs`` is not set)
``stage{k}.share``           float in [0.1, 1] (when ``total_epochs`` is set and there are 2+ stages):
                             the total is split in proportion to the shares, every stage >= 1 epoch
``weight_mode``              categorical over ``search.weight_modes``     (2+ stages only)
``lambda_ref``               float in ``search.lambda_ref``               (2+ stages, mode != none)
``normalize``                categorical over ``search.normalizations``   (2+ stages, mode != none)

Stages are numbered from 1, like the engine's ``stage{k}.pt`` checkpoints. The reference settings
are only sampled where they change the computation: a single-stage plan has no reference, and
weight mode ``none`` makes ``lambda_ref`` and the normalisation irrelevant.

Baseline trials (:func:`baseline_plans`) are expressed as parameter dicts whenever the space can
express them; a baseline the space cannot express (e.g. a single method for more epochs than one
stage may have) is carried as a fixed plan in the trial's ``fixed_plan`` user attribute, without
parameters, so that it never misleads the sampler about what its parameters produce.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Protocol

import yaml

from smskd_search.plan import Plan
from smskd_search.search.record import BASELINE_ATTR, FIXED_PLAN_ATTR, TrialAttrs, write_trial_attrs
from smskd_search.space import LoadedSpace, SearchSpec, Space, make_plan, reference_defaults
from smskd_search.validate import parse_plan

SHARE_LOW = 0.1
SHARE_HIGH = 1.0

class TrialLike(Protocol):
    """What :func:`suggest_plan` needs from a trial: ``optuna.Trial``, ``FixedTrial`` or Tune's captor."""

    @property
    def user_attrs(self) -> dict[str, Any]: ...

    def suggest_int(self, name: str, low: int, high: int, *, step: int = 1, log: bool = False) -> int: ...

    def suggest_float(self, name: str, low: float, high: float, *, step: float | None = None,
                      log: bool = False) -> float: ...

    def suggest_categorical(self, name: str, choices: Any) -> Any: ...


def _space_of(space: LoadedSpace | Space) -> Space:
    return space.space if isinstance(space, LoadedSpace) else space


def _search_of(space: Space) -> SearchSpec:
    if space.search is None:
        from smskd_search.errors import UserError

        raise UserError(f"space {space.name!r} has no 'search' part: nothing to search over")
    return space.search


def split_epochs(total: int, shares: list[float]) -> list[int]:
    """Split ``total`` epochs over stages in proportion to ``shares``, every stage >= 1 epoch.

    Largest-remainder rounding with ties to the earlier stage, so equal shares give the most even
    split with the extra epochs on the first stages.
    """
    n = len(shares)
    extra = total - n
    if extra < 0:
        raise ValueError(f"cannot split {total} epochs over {n} stages")
    weight = sum(shares)
    ideal = [extra * s / weight for s in shares]
    base = [math.floor(x) for x in ideal]
    order = sorted(range(n), key=lambda i: (-(ideal[i] - base[i]), i))
    for i in order[: extra - sum(base)]:
        base[i] += 1
    return [1 + b for b in base]


def suggest_plan(trial: TrialLike, space: LoadedSpace | Space, teacher_sha256: str | None = None,
                 name: str | None = None) -> Plan:
    """Sample one plan of ``space`` through ``trial`` (see the module docstring for the parameters)."""
    sp = _space_of(space)
    fixed = TrialAttrs.of(trial).fixed_plan
    if fixed:
        plan = parse_plan(yaml.safe_load(fixed), source=f"trial attribute {FIXED_PLAN_ATTR}")
        update: dict[str, Any] = {"teacher_sha256": teacher_sha256}
        if name is not None:
            update["name"] = name
        return plan.model_copy(update=update)

    search = _search_of(sp)
    n_stages = search.stages.min
    if search.stages.max > search.stages.min:
        n_stages = trial.suggest_int("n_stages", search.stages.min, search.stages.max)

    methods: list[str] = []
    remaining = list(search.methods)
    for k in range(1, n_stages + 1):
        if search.allow_repeat:
            if len(search.methods) > 1:
                methods.append(trial.suggest_categorical(f"stage{k}.method", list(search.methods)))
            else:
                methods.append(search.methods[0])
        else:
            idx = 0
            if len(remaining) > 1:
                # The choices depend on k only, never on earlier picks: a fixed distribution per name.
                idx = trial.suggest_categorical(f"stage{k}.method_idx", list(range(len(search.methods) - k + 1)))
            methods.append(remaining.pop(idx))

    if search.total_epochs is not None:
        if n_stages == 1:
            epochs = [search.total_epochs]
        else:
            shares = [trial.suggest_float(f"stage{k}.share", SHARE_LOW, SHARE_HIGH) for k in range(1, n_stages + 1)]
            epochs = split_epochs(search.total_epochs, shares)
    elif search.epochs.max > search.epochs.min:
        epochs = [trial.suggest_int(f"stage{k}.epochs", search.epochs.min, search.epochs.max)
                  for k in range(1, n_stages + 1)]
    else:
        epochs = [search.epochs.min] * n_stages

    ref = reference_defaults(sp)
    if n_stages > 1:
        if len(search.weight_modes) > 1:
            ref["weight_mode"] = trial.suggest_categorical("weight_mode", list(search.weight_modes))
        else:
            ref["weight_mode"] = search.weight_modes[0]
        if ref["weight_mode"] != "none":
            lr = search.lambda_ref
            ref["lambda_ref"] = (trial.suggest_float("lambda_ref", lr.low, lr.high, log=lr.log)
                                 if lr.high > lr.low else lr.low)
            if len(search.normalizations) > 1:
                ref["normalize"] = trial.suggest_categorical("normalize", list(search.normalizations))
            else:
                ref["normalize"] = search.normalizations[0]
    return make_plan(sp, list(zip(methods, epochs)), teacher_sha256=teacher_sha256, name=name, **ref)


def plan_from_params(params: dict[str, Any], space: LoadedSpace | Space, teacher_sha256: str | None = None,
                     user_attrs: Mapping[str, Any] | TrialAttrs | None = None, name: str | None = None) -> Plan:
    """The plan a finished trial's ``params`` (and, for fixed baselines, its stored attributes:
    Optuna's mapping or a :class:`TrialAttrs`) stand for."""
    import optuna

    trial = optuna.trial.FixedTrial(params)
    if user_attrs is not None:
        write_trial_attrs(trial, user_attrs if isinstance(user_attrs, TrialAttrs) else TrialAttrs.from_stored(user_attrs))
    return suggest_plan(trial, space, teacher_sha256, name=name)


@dataclass(frozen=True)
class Baseline:
    """One enqueued baseline: its label, the plan, and how to enqueue it.

    ``params`` is None when the space cannot express the plan; then ``user_attrs`` carries it as a
    fixed plan.
    """

    label: str
    plan: Plan
    params: dict[str, Any] | None

    @property
    def attrs(self) -> TrialAttrs:
        """What the baseline's trial is enqueued with."""
        return TrialAttrs(baseline=self.label, fixed_plan=self.plan.to_yaml() if self.params is None else None)

    @property
    def user_attrs(self) -> dict[str, Any]:
        """:attr:`attrs` as Optuna stores them."""
        return self.attrs.stored()


def _params_for(space: Space, stages: list[tuple[str, int]], ref: dict[str, Any]) -> dict[str, Any] | None:
    """The parameter dict that :func:`suggest_plan` maps to exactly these stages, or None."""
    search = _search_of(space)
    n = len(stages)
    if not search.stages.min <= n <= search.stages.max:
        return None
    params: dict[str, Any] = {}
    if search.stages.max > search.stages.min:
        params["n_stages"] = n
    remaining = list(search.methods)
    for k, (method, epochs) in enumerate(stages, start=1):
        if search.allow_repeat:
            if method not in search.methods:
                return None
            if len(search.methods) > 1:
                params[f"stage{k}.method"] = method
        else:
            if method not in remaining:
                return None
            if len(remaining) > 1:
                params[f"stage{k}.method_idx"] = remaining.index(method)
            remaining.remove(method)
        if search.total_epochs is None:
            if not search.epochs.min <= epochs <= search.epochs.max:
                return None
            if search.epochs.max > search.epochs.min:
                params[f"stage{k}.epochs"] = epochs
    if search.total_epochs is not None and n > 1:
        if sum(e for _, e in stages) != search.total_epochs:
            return None
        for k, (_, epochs) in enumerate(stages, start=1):
            params[f"stage{k}.share"] = min(SHARE_HIGH, max(SHARE_LOW, epochs / search.total_epochs))
    elif search.total_epochs is not None and stages[0][1] != search.total_epochs:
        return None
    if n > 1:
        if ref["weight_mode"] not in search.weight_modes:
            return None
        if len(search.weight_modes) > 1:
            params["weight_mode"] = ref["weight_mode"]
        if ref["weight_mode"] != "none":
            lr = search.lambda_ref
            if lr.high > lr.low:
                params["lambda_ref"] = min(lr.high, max(lr.low, ref["lambda_ref"]))
            if len(search.normalizations) > 1:
                params["normalize"] = ref["normalize"]
    return params


def _no_reference_sequence(search: SearchSpec, total: int) -> list[tuple[str, int]] | None:
    n_max = min(search.stages.max, total)
    if n_max < 2:
        return None
    # A typical length (the middle of the range), at least two stages so that there is a sequence.
    n = min(n_max, max(2, (search.stages.min + search.stages.max + 1) // 2))
    if search.allow_repeat:
        methods = [search.methods[i % len(search.methods)] for i in range(n)]
    else:
        methods = search.methods[:n]
    return list(zip(methods, split_epochs(total, [1.0] * n)))


def baseline_plans(space: LoadedSpace | Space, teacher_sha256: str | None = None) -> list[Baseline]:
    """The plans a search enqueues first, so that every study measures what a sequence must beat.

    - ``single:<method>``: each allowed method alone for ``search.typical_total_epochs`` epochs;
    - ``no-reference``: a sequence of the first methods over the same total, with weight mode
      ``none`` (sequential stages without the reference: the forgetting baseline).
    """
    sp = _space_of(space)
    search = _search_of(sp)
    total = search.typical_total_epochs
    out: list[Baseline] = []
    defaults = reference_defaults(sp)
    candidates: list[tuple[str, list[tuple[str, int]], dict[str, Any]]] = [
        (f"single:{m}", [(m, total)], dict(defaults)) for m in search.methods
    ]
    seq = _no_reference_sequence(search, total)
    if seq is not None:
        # With weight mode none the reference weights are zero, so lambda_ref and the
        # normalisation keep the space's defaults (as suggest_plan leaves them).
        candidates.append(("no-reference", seq, {**defaults, "weight_mode": "none"}))
    for label, stages, ref in candidates:
        plan = make_plan(sp, stages, teacher_sha256=teacher_sha256, name=f"{sp.name}-{label.replace(':', '-')}", **ref)
        params = _params_for(sp, stages, ref)
        if params is not None:
            mapped = plan_from_params(params, sp, teacher_sha256, name=plan.name)
            if mapped.content_hash() != plan.content_hash():
                params = None  # the space's encoding cannot say it exactly: carry the plan itself
        out.append(Baseline(label, plan, params))
    return out


__all__ = [
    "BASELINE_ATTR",
    "Baseline",
    "FIXED_PLAN_ATTR",
    "baseline_plans",
    "plan_from_params",
    "split_epochs",
    "suggest_plan",
]
