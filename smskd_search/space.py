"""Space files (``spaces/*.yaml``): the problem (data, teacher, student, recipe) and the search ranges.

The problem part is what the teacher command and every plan of the space share; the search part
says which plans the sampler may build. Both are validated on load, with one error line naming the
file and the field.
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any, Literal

from pydantic import Field, ValidationError, model_validator

from smskd_search.errors import UserError, format_validation_error
from smskd_search.methods.pair_defaults import stage_params
from smskd_search.plan import (
    NORMALIZATIONS,
    WEIGHT_MODES,
    Plan,
    ProblemSpec,
    RecipeSpec,
    ReferenceSpec,
    Strict,
    read_yaml,
)
from smskd_search.validate import check_space, parse_plan, search_names_error

WeightMode = Literal["inverse", "direct", "uniform", "none"]
Normalization = Literal["none", "batch_mean"]

SPACES_DIR = Path(__file__).resolve().parent.parent / "spaces"
DEFAULT_SPACE = "default"


class IntRange(Strict):
    min: int = Field(ge=1)
    max: int = Field(ge=1)

    @model_validator(mode="after")
    def _ordered(self) -> IntRange:
        if self.max < self.min:
            raise ValueError("max must be >= min")
        return self


class FloatRange(Strict):
    low: float = Field(ge=0.0)
    high: float = Field(ge=0.0)
    log: bool = True

    @model_validator(mode="after")
    def _ordered(self) -> FloatRange:
        if self.high < self.low:
            raise ValueError("high must be >= low")
        if self.log and self.low <= 0.0:
            raise ValueError("low must be > 0 on a log scale")
        return self


class PruningSpec(Strict):
    enabled: bool = True
    # In cumulative epochs: no trial is judged before it has trained this many.
    grace_period: int = Field(4, ge=1)
    reduction_factor: int = Field(2, ge=2)
    # Stop a trial only when it is behind the rung's cutoff by more than this many standard errors
    # of the difference of two validation accuracies (0: the stock ASHA rule).
    noise_margin: float = Field(0.0, ge=0.0, le=10.0)
    # Where the scheduler decides: at the rungs (a trial also reports its validation accuracy after
    # exactly each rung's cumulative epochs, mid-stage if need be), or at stage ends only (then a
    # trial is judged only where a stage ends exactly on a rung: values are compared at equal epochs).
    decide_at: Literal["stage_ends", "rungs"] = "rungs"


class ObjectiveSpec(Strict):
    metric: Literal["val_acc"] = "val_acc"
    direction: Literal["maximize"] = "maximize"
    # Add total epochs as a second objective (minimised): an accuracy-vs-cost Pareto search.
    # Pruning is off in that mode (Optuna does not prune multi-objective trials).
    cost_objective: bool = False


class SamplerSpec(Strict):
    kind: Literal["tpe", "random"] = "tpe"
    n_startup_trials: int = Field(10, ge=0)


class SearchSpec(Strict):
    methods: list[str] = Field(min_length=1)
    # Per-method parameter overrides applied to every stage that uses the method.
    method_params: dict[str, dict[str, Any]] = Field(default_factory=dict)
    stages: IntRange = Field(default_factory=lambda: IntRange(min=1, max=3))
    allow_repeat: bool = False
    # Epochs per stage are sampled from `epochs`, unless `total_epochs` is set, in which case the
    # total is split across the stages by sampled shares.
    epochs: IntRange = Field(default_factory=lambda: IntRange(min=2, max=8))
    total_epochs: int | None = Field(None, ge=1)
    lambda_ref: FloatRange = Field(default_factory=lambda: FloatRange(low=0.1, high=10.0))
    weight_modes: list[WeightMode] = Field(default_factory=lambda: list[WeightMode](["inverse"]))
    normalizations: list[Normalization] = Field(default_factory=lambda: list[Normalization](["none"]))
    objective: ObjectiveSpec = Field(default_factory=ObjectiveSpec)
    pruning: PruningSpec = Field(default_factory=PruningSpec)
    sampler: SamplerSpec = Field(default_factory=SamplerSpec)
    # Total epochs of the enqueued single-method baselines; None: the middle of the plan lengths.
    baseline_epochs: int | None = Field(None, ge=1)

    @model_validator(mode="after")
    def _consistent(self) -> SearchSpec:
        why = search_names_error(self.methods, self.method_params)
        if why is not None:
            raise ValueError(why)
        if not self.allow_repeat and self.stages.max > len(self.methods):
            raise ValueError(
                f"stages.max ({self.stages.max}) exceeds the number of methods ({len(self.methods)})"
                " while allow_repeat is false"
            )
        if self.total_epochs is not None and self.total_epochs < self.stages.max:
            raise ValueError("total_epochs must be >= stages.max (every stage trains at least one epoch)")
        if not self.weight_modes or not self.normalizations:
            raise ValueError("weight_modes and normalizations must not be empty")
        return self

    @property
    def max_total_epochs(self) -> int:
        if self.total_epochs is not None:
            return self.total_epochs
        return self.stages.max * self.epochs.max

    @property
    def typical_total_epochs(self) -> int:
        if self.baseline_epochs is not None:
            return self.baseline_epochs
        if self.total_epochs is not None:
            return self.total_epochs
        mid_stages = (self.stages.min + self.stages.max + 1) // 2
        mid_epochs = (self.epochs.min + self.epochs.max + 1) // 2
        return mid_stages * mid_epochs


class RuntimeSpec(Strict):
    # Default GPU share per trial on a GPU cluster (the packing the GPU benchmark found for this student).
    gpus_per_trial: float = Field(1.0, gt=0.0, le=8.0)
    cpus_per_trial: float = Field(1.0, gt=0.0)


class Space(Strict):
    """A search space: the problem and recipe every plan of it shares, and the search ranges."""

    name: str
    description: str = ""
    problem: ProblemSpec
    recipe: RecipeSpec = Field(default_factory=RecipeSpec)
    reference: ReferenceSpec = Field(default_factory=ReferenceSpec)
    search: SearchSpec | None = None
    runtime: RuntimeSpec = Field(default_factory=RuntimeSpec)
    seed: int = 0


def reference_defaults(space: Space) -> dict[str, Any]:
    """The space's reference settings, with weight mode and normalisation among those it searches."""
    ref = space.reference
    search = space.search
    out: dict[str, Any] = {"lambda_ref": ref.lambda_ref, "weight_mode": ref.weight_mode, "normalize": ref.normalize}
    if search is not None:
        if ref.weight_mode not in search.weight_modes:
            out["weight_mode"] = search.weight_modes[0]
        if ref.normalize not in search.normalizations:
            out["normalize"] = search.normalizations[0]
    return out


def make_plan(
    space: Space | LoadedSpace,
    stages: list[tuple[str, int]],
    *,
    name: str | None = None,
    seed: int | None = None,
    teacher_sha256: str | None = None,
    **reference: Any,
) -> Plan:
    """A plan of this space's problem and recipe with the given (method, epochs) stages.

    The one plan builder: the search's sampling, its baselines, ``train --method`` and notebooks
    all build plans here.

    Args:
        space: The space (or a loaded space).
        stages: ``(method, epochs)`` per stage, in order.
        name: The plan's name (default: the methods joined by ``-``).
        seed: The plan's seed (default: the space's).
        teacher_sha256: The teacher the plan is bound to (checked when it runs).
        **reference: Reference settings (``lambda_ref``, ``weight_mode``, ``normalize``,
            ``temperature``...) over the space's; weight mode and normalisation default to ones the
            space searches.

    Returns:
        The validated plan; the space's ``method_params`` apply to every stage of that method, over
        the teacher/student pair's defaults (:mod:`smskd_search.methods.pair_defaults`, e.g. DKD's
        ``beta``), which the plan then states. A bad combination is a :class:`UserError` naming the
        field.

    Example:

        >>> from smskd_search import load_space, make_plan
        >>> plan = make_plan(load_space("default"), [("kd", 4), ("dkd", 4)], lambda_ref=2.0)
        >>> plan.sequence(), plan.total_epochs, plan.reference.lambda_ref
        ('kd(4) -> dkd(4)', 8, 2.0)
    """
    sp = space.space if isinstance(space, LoadedSpace) else space
    overrides = sp.search.method_params if sp.search is not None else {}
    # Pair defaults are written into the plan here, so the plan says what it trains with.
    teacher, student = sp.problem.teacher.arch, sp.problem.student.arch
    ref = {**sp.reference.model_dump(mode="json"), **reference_defaults(sp),
           **{k: v for k, v in reference.items() if v is not None}}
    data = {
        "name": name or "-".join(m for m, _ in stages),
        "problem": sp.problem.model_dump(mode="json"),
        "recipe": sp.recipe.model_dump(mode="json"),
        "reference": ref,
        "stages": [{"method": m, "epochs": e, "params": stage_params(teacher, student, m, overrides.get(m, {}))}
                   for m, e in stages],
        "seed": sp.seed if seed is None else seed,
        "teacher_sha256": teacher_sha256,
    }
    # Through the validating parser, so that a bad combination is a UserError naming the field.
    return parse_plan(data, source=f"space {sp.name!r}")


class LoadedSpace:
    """A validated space with where it came from and a hash of its text (for provenance)."""

    def __init__(self, space: Space, path: Path, text: str):
        self.space = space
        self.path = path
        self.text = text  # what was validated (a study stores it, not whatever the file holds later)
        self.sha256 = hashlib.sha256(text.encode()).hexdigest()


def resolve_space_path(name_or_path: str | Path | None) -> Path:
    """A path to a space file, or the name of a built-in space (``default``, ``cifar10``...)."""
    if name_or_path is None:
        name_or_path = DEFAULT_SPACE
    p = Path(name_or_path)
    if p.is_file():
        return p
    # A built-in space by name ("cifar10") or by its path in the source tree ("spaces/cifar10.yaml"),
    # from any working directory.
    builtin = SPACES_DIR / (p.name if p.suffix in (".yaml", ".yml") else f"{p.name}.yaml")
    if builtin.is_file() and (len(p.parts) == 1 or p.parent.name == "spaces"):
        return builtin
    known = ", ".join(sorted(x.stem for x in SPACES_DIR.glob("*.yaml"))) if SPACES_DIR.is_dir() else ""
    raise UserError(f"space: no such file {str(p)!r} (built-in spaces: {known})")


def load_space(name_or_path: str | Path | None = None) -> LoadedSpace:
    """A space file, or a built-in space by name, validated (one-line UserError naming the field).

    Args:
        name_or_path: A path, or the name of a built-in space (``default``, ``cifar10``...);
            None: the default space.

    Returns:
        The :class:`LoadedSpace`: the validated space, its path and the hash of its text.

    Example:

        >>> from smskd_search import load_space
        >>> space = load_space("default")
        >>> space.space.problem.dataset.name, space.path.name
        ('digits', 'default.yaml')
    """
    path = resolve_space_path(name_or_path)
    text = path.read_text()
    data = read_yaml(path)
    if not isinstance(data, dict):
        raise UserError(f"{path}: expected a mapping at the top level")
    try:
        space = Space.model_validate(data)
    except ValidationError as exc:
        raise UserError(format_validation_error(str(path), exc)) from None
    return LoadedSpace(check_space(space, str(path)), path, text)


__all__ = [
    "Space",
    "SearchSpec",
    "LoadedSpace",
    "load_space",
    "make_plan",
    "reference_defaults",
    "resolve_space_path",
    "WEIGHT_MODES",
    "NORMALIZATIONS",
]
