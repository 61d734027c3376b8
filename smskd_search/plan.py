"""Plans: plain typed data that says everything needed to re-run one SMSKD pipeline.

A plan is a versioned YAML document. ``parse_plan``/``load_plan`` here validate its structure and
ranges and raise :class:`UserError` with one line naming the field path; the names it refers to
(models, methods, method parameters) are checked by :mod:`smskd_search.validate`, which sits above
the registries (``smskd_search.load_plan`` does both). ``save_plan`` writes a plan back;
load -> save -> load is the identity. This module imports nothing of the project but ``errors``.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from smskd_search.errors import UserError, format_validation_error

PLAN_VERSION: Literal[1] = 1


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


# The datasets that ``DatasetSpec.download`` can fetch.
DOWNLOADABLE = ("cifar10", "cifar100")
# DatasetSpec fields that say where or how the data is read, not what it is: no hash covers them.
NOT_HASHED = {"root", "download"}
# DatasetSpec fields added after plans were first stored: hashes (and saved plans) leave them out
# while unset, so those plans' hashes and cache keys still hold.
LATER_DATASET_FIELDS = ("stream", "classes", "image_size")


class DatasetSpec(Strict):
    name: Literal["digits", "fashion_mnist", "cifar10", "cifar100", "imagefolder"] = "digits"
    # Folder of the on-disk data; None means the dataset's default place (see smskd_search.data).
    root: str | None = None
    val_fraction: float = Field(0.1, gt=0.0, lt=0.9)
    # Only for datasets without an official test split (digits): the held-out test fraction.
    test_fraction: float = Field(0.2, gt=0.0, lt=0.9)
    split_seed: int = 0
    # Train on a seeded, stratified subset of this many training images (drawn with split_seed,
    # before the validation split); None uses them all. The test split is never subsampled.
    train_subset: int | None = Field(None, ge=20)
    # cifar10 / cifar100 only: when their files are missing under root, fetch them with torchvision's
    # downloader (smskd_search.data.download). How the data is got, not what it is: never hashed.
    download: bool = False
    # imagefolder only. Decode files as batches are needed (smskd_search.data.streaming) instead of
    # holding the decoded training folder in memory. None: automatic, streaming when the training
    # split decoded to float32 at its first image's size would take more than SMSKD_STREAM_ABOVE_BYTES
    # (default 8 GiB; a fixed rule, so every node of a search decides alike).
    stream: bool | None = None
    # imagefolder only: keep these class folders (names), or a seeded draw of this many (split_seed,
    # ImageNet-100 style); None keeps them all.
    classes: int | list[str] | None = None
    # imagefolder, streaming only: the side of the square crop the models see (default 224, after
    # Resize(size * 256 / 224) for evaluation).
    image_size: int | None = Field(None, ge=8, le=1024)

    @model_validator(mode="after")
    def _downloadable(self) -> DatasetSpec:
        if self.download and self.name not in DOWNLOADABLE:
            raise ValueError(f"download: only {' and '.join(DOWNLOADABLE)} can be downloaded; "
                             f"{self.name} is read from what is on disk (set download: false)")
        return self

    @field_validator("classes")
    @classmethod
    def _sorted_classes(cls, v: int | list[str] | None) -> int | list[str] | None:
        # Sorted: labels follow the sorted names, and one set of classes has one hash.
        return sorted(v) if isinstance(v, list) else v

    @model_validator(mode="after")
    def _folder_fields(self) -> DatasetSpec:
        for name in LATER_DATASET_FIELDS:
            if getattr(self, name) is not None and self.name != "imagefolder":
                raise ValueError(f"{name}: only for an imagefolder dataset, not {self.name}")
        if self.image_size is not None and self.stream is False:
            raise ValueError("image_size: the crop size of a streamed folder; with stream: false the images "
                             "keep their own size (leave image_size unset)")
        if isinstance(self.classes, int) and self.classes < 2:
            raise ValueError(f"classes: at least 2, not {self.classes}")
        if isinstance(self.classes, list) and (len(set(self.classes)) != len(self.classes) or len(self.classes) < 2):
            raise ValueError("classes: a list of at least 2 distinct class folder names")
        return self

    def hashed(self) -> dict[str, Any]:
        """The fields that change the data, for hashes: ``root`` is where, not what, and ``download``
        how; a field added since studies were first stored is left out while unset, so their hashes
        still hold."""
        data = self.model_dump(mode="json", exclude=NOT_HASHED)
        for name in ("train_subset", *LATER_DATASET_FIELDS):
            if data[name] is None:
                del data[name]
        return data


class AugmentSpec(Strict):
    crop_padding: int = Field(0, ge=0, le=16)
    flip: bool = False

    @property
    def enabled(self) -> bool:
        return self.crop_padding > 0 or self.flip


class ScheduleSpec(Strict):
    kind: Literal["constant", "step", "cosine", "wsd"] = "cosine"
    # For "step": fractions of the stage's epochs at which lr is multiplied by gamma.
    # The CIFAR-100 benchmark's 150/180/210 of 240 epochs is [0.625, 0.75, 0.875].
    # For "wsd" (warmup-free warmup-stable-decay): the base lr until the first milestone, then a
    # cosine decay to zero over the rest of the stage; stages of one method but different lengths
    # run alike until the shorter one's decay starts, so the stage cache can share those epochs.
    milestones: list[float] = Field(default_factory=lambda: [0.625, 0.75, 0.875])
    gamma: float = Field(0.1, gt=0.0, le=1.0)

    @field_validator("milestones")
    @classmethod
    def _fractions(cls, v: list[float]) -> list[float]:
        if any(not 0.0 < m < 1.0 for m in v) or v != sorted(v):
            raise ValueError("milestones must be increasing fractions in (0, 1)")
        return v

    @model_validator(mode="after")
    def _decay_start(self) -> ScheduleSpec:
        if self.kind == "wsd" and not self.milestones:
            raise ValueError("a wsd schedule needs milestones: [start of the decay, as a fraction of the stage]")
        return self


class RecipeSpec(Strict):
    optimizer: Literal["sgd", "adamw"] = "sgd"
    lr: float = Field(0.05, gt=0.0)
    momentum: float = Field(0.9, ge=0.0, lt=1.0)
    weight_decay: float = Field(5e-4, ge=0.0)
    nesterov: bool = False
    batch_size: int = Field(64, ge=1)
    eval_batch_size: int = Field(1024, ge=1)
    schedule: ScheduleSpec = Field(default_factory=ScheduleSpec)
    augment: AugmentSpec = Field(default_factory=AugmentSpec)


class TeacherRecipe(RecipeSpec):
    epochs: int = Field(30, ge=1)
    seed: int = 0


class TeacherSpec(Strict):
    arch: str
    # A user-supplied checkpoint (state_dict or {"state_dict": ...}); None: train with `recipe`.
    checkpoint: str | None = None
    # torchvision's published weights for `arch` by name (IMAGENET1K_V1, DEFAULT): the file torch
    # hub caches, fetched there where it is missing (smskd_search.models.pretrained). Not with
    # `checkpoint`; left out of hashes while unset, so plans made before it keep theirs.
    weights: str | None = None
    recipe: TeacherRecipe = Field(default_factory=TeacherRecipe)

    @model_validator(mode="after")
    def _one_source(self) -> TeacherSpec:
        if self.checkpoint and self.weights:
            raise ValueError(f"weights: give either checkpoint ({self.checkpoint}) or weights ({self.weights}), "
                             "not both")
        return self


class StudentSpec(Strict):
    arch: str


class ProblemSpec(Strict):
    dataset: DatasetSpec = Field(default_factory=DatasetSpec)
    teacher: TeacherSpec
    student: StudentSpec


WEIGHT_MODES = ("inverse", "direct", "uniform", "none")
NORMALIZATIONS = ("none", "batch_mean")


class ReferenceSpec(Strict):
    lambda_ref: float = Field(1.0, ge=0.0)
    weight_mode: Literal["inverse", "direct", "uniform", "none"] = "inverse"
    normalize: Literal["none", "batch_mean"] = "none"
    temperature: float = Field(4.0, gt=0.0)
    loss: Literal["logit_kl", "feature_mse"] = "logit_kl"
    # For loss "feature_mse": which entry of Features.stages to compare (-1: the last stage).
    feature_stage: int = -1


class StageSpec(Strict):
    method: str
    epochs: int = Field(ge=1)
    params: dict[str, Any] = Field(default_factory=dict)


class Plan(Strict):
    """Everything needed to re-run one SMSKD pipeline: problem, recipe, reference, stages, seed.

    Build one with :func:`smskd_search.make_plan` (from a space) or load one with
    :func:`smskd_search.load_plan`; ``to_yaml``/:func:`save_plan` write it back.

    Example:

        >>> from smskd_search import load_space, make_plan
        >>> plan = make_plan(load_space("default"), [("kd", 3), ("fitnet", 2)])
        >>> plan.total_epochs, plan.sequence()
        (5, 'kd(3) -> fitnet(2)')
    """

    version: Literal[1] = PLAN_VERSION
    name: str = "plan"
    problem: ProblemSpec
    recipe: RecipeSpec = Field(default_factory=RecipeSpec)
    reference: ReferenceSpec = Field(default_factory=ReferenceSpec)
    stages: list[StageSpec] = Field(min_length=1)
    seed: int = 0
    # Fresh optimizer and restarted lr schedule at every stage (the default); False: one optimizer
    # and one schedule over all stages.
    restart_optimizer: bool = True
    # sha256 of the teacher checkpoint this plan was searched with; checked when set.
    teacher_sha256: str | None = None
    # Free-form provenance written by `export` (study, trial, values, space hash); not used to train.
    provenance: dict[str, Any] | None = None

    @property
    def total_epochs(self) -> int:
        return sum(s.epochs for s in self.stages)

    def sequence(self) -> str:
        """Readable stage sequence, e.g. ``kd(6) -> fitnet(4)``."""
        return " -> ".join(f"{s.method}({s.epochs})" for s in self.stages)

    def _hashed(self) -> dict[str, Any]:
        # Plans hash their dataset's root (as they always have) but not how it is got (download).
        data = self.model_dump(mode="json", exclude={"name": True, "provenance": True,
                                                     "problem": {"dataset": {"download": True}}})
        dataset = data["problem"]["dataset"]
        for name in ("train_subset", *LATER_DATASET_FIELDS):
            if dataset[name] is None:
                del dataset[name]
        if self.problem.teacher.weights is None:
            del data["problem"]["teacher"]["weights"]
        return data

    def content_hash(self) -> str:
        """Hash of everything that changes the computation (not name or provenance)."""
        data = self._hashed()
        return hashlib.sha256(json.dumps(data, sort_keys=True).encode()).hexdigest()[:12]

    def canonical_hash(self) -> str:
        """Hash of what the run computes: :meth:`content_hash` less the settings with no effect.

        A one-stage plan has no reference term, and weight mode ``none`` zeroes it whatever
        ``lambda_ref``, the normalisation and the rest of the reference say; two plans with the same
        canonical hash train the same student. A search answers a repeated plan from this.
        """
        data = self._hashed()
        if len(self.stages) == 1:
            data["reference"] = None
        elif self.reference.weight_mode == "none":
            data["reference"] = {"weight_mode": "none"}
        return hashlib.sha256(json.dumps(data, sort_keys=True).encode()).hexdigest()[:16]

    def to_yaml(self) -> str:
        data = self.model_dump(mode="json")
        for name in LATER_DATASET_FIELDS:  # unset: the plan reads as one written before they existed
            if data["problem"]["dataset"][name] is None:
                del data["problem"]["dataset"][name]
        if data["problem"]["teacher"]["weights"] is None:
            del data["problem"]["teacher"]["weights"]
        return yaml.safe_dump(data, sort_keys=False)


def parse_plan(data: Any, source: str = "plan") -> Plan:
    if not isinstance(data, dict):
        raise UserError(f"{source}: expected a mapping at the top level, got {type(data).__name__}")
    try:
        return Plan.model_validate(data)
    except ValidationError as exc:
        raise UserError(format_validation_error(source, exc)) from None


def read_yaml(path: str | Path) -> Any:
    p = Path(path)
    if not p.is_file():
        raise UserError(f"{p}: file not found")
    try:
        return yaml.safe_load(p.read_text())
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" (line {mark.line + 1}, column {mark.column + 1})" if mark else ""
        problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
        raise UserError(f"{p}: malformed YAML{where}: {problem}") from None


def load_plan(path: str | Path) -> Plan:
    """A plan file, checked in structure and ranges (:func:`smskd_search.load_plan` checks names too)."""
    return parse_plan(read_yaml(path), str(path))


def save_plan(plan: Plan, path: str | Path) -> Path:
    """Write ``plan`` as YAML to ``path`` (folders made as needed); load -> save -> load is the identity.

    Args:
        plan: The plan.
        path: The file to write.

    Returns:
        ``path``.
    """
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    p.write_text(plan.to_yaml())
    return p
