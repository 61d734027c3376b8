"""VID: Ahn et al., "Variational Information Distillation for Knowledge Transfer", CVPR 2019.

Kept as it is: the per-channel variances are trained with the student, as RepDistiller's VIDLoss
(a module parameter its optimizer sees); mdistiller keeps them outside its learnable parameters, so
its variances never move from ``init_pred_var``.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from pydantic import Field
from torch import nn

from smskd_search.methods.base import KDBatch, Method, MethodContext, MethodParams, register_method
from smskd_search.methods.common import paired_stages, pool_to_common


class VIDParams(MethodParams):
    weight: float = Field(1.0, ge=0.0, description="weight of the summed per-stage negative log-likelihoods")
    init_pred_var: float = Field(5.0, gt=0.0, description="initial predicted variance of every teacher channel")
    eps: float = Field(1e-5, gt=0.0, description="variance floor: sigma^2 = softplus(log_scale) + eps")
    mid_channels: int | None = Field(
        None, ge=1, description="hidden width of each mean regressor; None: the teacher stage's channels"
    )


def _inverse_softplus(y: float) -> float:
    return y + math.log(-math.expm1(-y))


class VIDRegressor(nn.Module):
    """Gaussian q(t | s): a 1x1-conv mean network and one trained variance per teacher channel."""

    def __init__(self, c_in: int, c_mid: int, c_out: int, init_pred_var: float, eps: float):
        super().__init__()
        self.mean = nn.Sequential(
            nn.Conv2d(c_in, c_mid, 1, bias=False), nn.ReLU(),
            nn.Conv2d(c_mid, c_mid, 1, bias=False), nn.ReLU(),
            nn.Conv2d(c_mid, c_out, 1, bias=False),
        )
        if init_pred_var <= eps:
            raise ValueError(f"init_pred_var {init_pred_var} must exceed eps {eps}")
        # A registered Parameter, so that the stage optimizer trains it (mdistiller keeps it in a
        # plain list and never does).
        self.log_scale = nn.Parameter(torch.full((c_out,), _inverse_softplus(init_pred_var - eps)))
        self.eps = eps

    def variance(self) -> torch.Tensor:
        return F.softplus(self.log_scale.float()) + self.eps


def vid_nll(mean: torch.Tensor, var: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Mean Gaussian negative log-likelihood, without the constant log(2 pi) / 2."""
    var = var.view(1, -1, 1, 1)
    return (0.5 * ((mean - target).pow(2) / var + var.log())).mean()


@register_method
class VID(Method):
    name = "vid"
    family = "feature"
    reference = "Ahn et al., Variational Information Distillation for Knowledge Transfer, CVPR 2019"
    Params = VIDParams

    def __init__(self, params: VIDParams, ctx: MethodContext):
        super().__init__(params, ctx)
        s_sh, t_sh = ctx.student_shapes.stages, ctx.teacher_shapes.stages
        self.pairs = paired_stages(len(s_sh), len(t_sh))
        self.regressors = nn.ModuleList(
            VIDRegressor(s_sh[i][0], params.mid_channels or t_sh[j][0], t_sh[j][0], params.init_pred_var, params.eps)
            for i, j in self.pairs
        )

    def forward(self, batch: KDBatch) -> torch.Tensor:
        s, t = batch.s_feats.stages, batch.t_feats.stages
        loss = 0.0
        for reg, (i, j) in zip(self.regressors, self.pairs):
            f_s, f_t = pool_to_common(s[i], t[j])
            loss = loss + vid_nll(reg.mean(f_s).float(), reg.variance(), f_t.float())
        return self.params.weight * loss
