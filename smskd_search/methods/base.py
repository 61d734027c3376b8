"""What a KD method is: a module that builds its extra parts from probed feature shapes and returns
its loss for one batch. One file per method, registered by name with :func:`register_method`.

The engine adds ``Params.ce_weight * CE`` and, from stage 2 on, the reference term; a method returns
only its own, already weighted, distillation term. Extra modules (regressors, embeddings, memory
banks) are submodules of the method: they are trained with the student and dropped with the method
at the end of its stage.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar, Literal

import torch
from pydantic import BaseModel, ConfigDict, Field
from torch import nn

from smskd_search.models.base import Features, FeatureShapes


class MethodParams(BaseModel):
    """Parameters every method has; subclasses add their own, each with the peers' default."""

    model_config = ConfigDict(extra="forbid")
    ce_weight: float = Field(1.0, ge=0.0, description="weight of the cross-entropy term")


@dataclass
class MethodContext:
    """What a method may look at when it builds its extra modules."""

    student_shapes: FeatureShapes
    teacher_shapes: FeatureShapes
    teacher: nn.Module  # frozen, eval mode: read statistics only (OFD's margins), never train it
    num_classes: int
    num_train: int  # size of the training split (CRD sizes its memory bank to it)
    # No stage length here on purpose: the stage cache lets stages of one method but different
    # lengths share their first epochs where the lr schedule allows it (engine/prefix_cache.py).
    # Labels of the training split, by position (CRD draws its negatives from other classes); None
    # where the caller has none (a method that needs them says so when it is built).
    train_labels: torch.Tensor | None = None


@dataclass
class KDBatch:
    s_logits: torch.Tensor
    s_feats: Features
    t_logits: torch.Tensor
    t_feats: Features
    labels: torch.Tensor
    # Positions of the samples in the training split (CRD's memory bank); None where not needed.
    indices: torch.Tensor | None
    # 0-based epoch within the current stage: warm-ups count from the stage start, not the run.
    stage_epoch: int


class Method(nn.Module):
    name: ClassVar[str]
    family: ClassVar[Literal["none", "response", "feature", "relation"]]
    reference: ClassVar[str]
    Params: ClassVar[type[MethodParams]] = MethodParams
    needs_indices: ClassVar[bool] = False
    # Whether forward reads ``batch.t_feats``. False (KD, DKD, CE) lets the engine serve the
    # teacher's logits from its logit store instead of running the teacher on augmented batches;
    # True is the safe default for a new method.
    teacher_features: ClassVar[bool] = True

    def __init__(self, params: MethodParams, ctx: MethodContext):
        super().__init__()
        self.params = params

    def forward(self, batch: KDBatch) -> torch.Tensor:  # pragma: no cover - abstract
        raise NotImplementedError

    def on_step_end(self, batch: KDBatch) -> None:
        """Called after the optimizer step (momentum memory banks update here)."""


METHODS: dict[str, type[Method]] = {}


def register_method(cls: type[Method]) -> type[Method]:
    if cls.name in METHODS:
        raise KeyError(f"method {cls.name!r} registered twice")
    METHODS[cls.name] = cls
    return cls


def build_method(name: str, params: dict, ctx: MethodContext) -> Method:
    cls = METHODS[name]
    return cls(cls.Params.model_validate(params), ctx)


def kl_div_t(s_logits: torch.Tensor, t_logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """Per-sample ``T^2 * KL(softmax(t/T) || softmax(s/T))``, summed over classes, in float32."""
    log_p_s = torch.log_softmax(s_logits.float() / temperature, dim=1)
    log_p_t = torch.log_softmax(t_logits.float() / temperature, dim=1)
    return (log_p_t.exp() * (log_p_t - log_p_s)).sum(dim=1) * temperature**2
