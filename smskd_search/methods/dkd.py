"""DKD: Zhao et al., "Decoupled Knowledge Distillation", CVPR 2022.

``beta`` defaults to 8 (mdistiller's config default); the benchmark pairs with their own beta (2 or
6) are in :mod:`smskd_search.methods.pair_defaults`, which plans built from a space follow.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from pydantic import Field

from smskd_search.methods.base import KDBatch, Method, MethodParams, register_method


class DKDParams(MethodParams):
    alpha: float = Field(1.0, ge=0.0, description="weight of target-class KD (TCKD)")
    beta: float = Field(8.0, ge=0.0, description="weight of non-target-class KD (NCKD)")
    T: float = Field(4.0, gt=0.0, description="temperature")
    warmup_epochs: int = Field(20, ge=0, description="linear loss warm-up, counted from the stage start")


def dkd_loss(s_logits: torch.Tensor, t_logits: torch.Tensor, labels: torch.Tensor,
             alpha: float, beta: float, T: float) -> torch.Tensor:
    s, t = s_logits.float(), t_logits.float()
    gt = F.one_hot(labels, s.shape[1]).bool()
    p_s, p_t = F.softmax(s / T, dim=1), F.softmax(t / T, dim=1)
    # Binary (target, all non-targets) distributions.
    b_s = torch.stack([(p_s * gt).sum(1), (p_s * ~gt).sum(1)], dim=1)
    b_t = torch.stack([(p_t * gt).sum(1), (p_t * ~gt).sum(1)], dim=1)
    tckd = (b_t * (torch.log(b_t) - torch.log(b_s))).sum(1).mean() * T**2
    # Distributions over the non-target classes: mask the target logit out before the softmax.
    log_q_s = F.log_softmax(s / T - 1000.0 * gt, dim=1)
    log_q_t = F.log_softmax(t / T - 1000.0 * gt, dim=1)
    nckd = (log_q_t.exp() * (log_q_t - log_q_s)).sum(1).mean() * T**2
    return alpha * tckd + beta * nckd


@register_method
class DKD(Method):
    name = "dkd"
    family = "response"
    reference = "Zhao et al., Decoupled Knowledge Distillation, CVPR 2022"
    Params = DKDParams
    teacher_features = False

    def warmup_factor(self, stage_epoch: int) -> float:
        w = self.params.warmup_epochs
        return 1.0 if w == 0 else min((stage_epoch + 1) / w, 1.0)

    def forward(self, batch: KDBatch) -> torch.Tensor:
        p = self.params
        loss = dkd_loss(batch.s_logits, batch.t_logits, batch.labels, p.alpha, p.beta, p.T)
        return self.warmup_factor(batch.stage_epoch) * loss
