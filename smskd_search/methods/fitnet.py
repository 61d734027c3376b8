"""FitNets: Romero et al., "FitNets: Hints for Thin Deep Nets", ICLR 2015 (one-stage form, as the
CIFAR benchmark codebases train it: regressor and student jointly)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from pydantic import Field

from smskd_search.methods.base import KDBatch, Method, MethodContext, MethodParams, register_method
from smskd_search.methods.common import ConvReg, middle_stage


class FitNetParams(MethodParams):
    weight: float = Field(100.0, ge=0.0, description="weight of the hint MSE")
    hint_layer: int | None = Field(
        None, description="index into the stage features (stem = 0); None: the middle stage"
    )


@register_method
class FitNet(Method):
    name = "fitnet"
    family = "feature"
    reference = "Romero et al., FitNets: Hints for Thin Deep Nets, ICLR 2015"
    Params = FitNetParams

    def __init__(self, params: FitNetParams, ctx: MethodContext):
        super().__init__(params, ctx)
        n_s, n_t = len(ctx.student_shapes.stages), len(ctx.teacher_shapes.stages)
        hint = params.hint_layer
        self.s_idx = middle_stage(n_s) if hint is None else hint
        self.t_idx = middle_stage(n_t) if hint is None else min(hint, n_t - 1)
        if not 0 <= self.s_idx < n_s:
            raise ValueError(f"hint_layer {hint} out of range for a student with {n_s} stage features")
        self.regressor = ConvReg(ctx.student_shapes.stages[self.s_idx], ctx.teacher_shapes.stages[self.t_idx])

    def forward(self, batch: KDBatch) -> torch.Tensor:
        f_s = self.regressor(batch.s_feats.stages[self.s_idx]).float()
        f_t = batch.t_feats.stages[self.t_idx].float()
        return self.params.weight * F.mse_loss(f_s, f_t)
