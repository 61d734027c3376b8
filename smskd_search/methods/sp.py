"""SP: Tung & Mori, "Similarity-Preserving Knowledge Distillation", ICCV 2019."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from pydantic import Field

from smskd_search.methods.base import KDBatch, Method, MethodContext, MethodParams, register_method
from smskd_search.methods.common import full_precision, paired_stages


class SPParams(MethodParams):
    weight: float = Field(3000.0, ge=0.0, description="weight of the similarity-preserving loss")
    stage: int = Field(
        -1, le=-1,
        description="stage map to compare, counted from the deepest (-1: the last stage, -2: the one before)",
    )


def batch_similarity(f: torch.Tensor) -> torch.Tensor:
    """Row-normalised b x b Gram matrix of the flattened activations."""
    flat = f.float().flatten(1)
    return F.normalize(flat @ flat.t(), dim=1)


def sp_loss(f_s: torch.Tensor, f_t: torch.Tensor) -> torch.Tensor:
    # Only b x b matrices are compared, so the two maps may differ in channels and spatial size.
    b = f_s.shape[0]
    with full_precision(f_s):
        return (batch_similarity(f_s) - batch_similarity(f_t)).pow(2).sum() / (b * b)


@register_method
class SP(Method):
    name = "sp"
    family = "relation"
    reference = "Tung & Mori, Similarity-Preserving Knowledge Distillation, ICCV 2019"
    Params = SPParams

    def __init__(self, params: SPParams, ctx: MethodContext):
        super().__init__(params, ctx)
        pairs = paired_stages(len(ctx.student_shapes.stages), len(ctx.teacher_shapes.stages), skip_stem=False)
        if -params.stage > len(pairs):
            raise ValueError(f"stage {params.stage}: this pair has only {len(pairs)} comparable stage maps")
        self.s_idx, self.t_idx = pairs[params.stage]

    def forward(self, batch: KDBatch) -> torch.Tensor:
        loss = sp_loss(batch.s_feats.stages[self.s_idx], batch.t_feats.stages[self.t_idx])
        return self.params.weight * loss
