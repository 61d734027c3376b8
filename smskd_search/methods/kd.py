"""KD: Hinton, Vinyals, Dean, "Distilling the Knowledge in a Neural Network" (2015)."""

from __future__ import annotations

import torch
from pydantic import Field

from smskd_search.methods.base import KDBatch, Method, MethodParams, kl_div_t, register_method


class KDParams(MethodParams):
    ce_weight: float = Field(0.1, ge=0.0, description="weight of the cross-entropy term")
    weight: float = Field(0.9, ge=0.0, description="weight of the KD term")
    T: float = Field(4.0, gt=0.0, description="temperature (the T^2 factor is always applied)")


@register_method
class KD(Method):
    name = "kd"
    family = "response"
    reference = "Hinton et al., Distilling the Knowledge in a Neural Network, 2015"
    Params = KDParams
    teacher_features = False

    def forward(self, batch: KDBatch) -> torch.Tensor:
        p = self.params
        return p.weight * kl_div_t(batch.s_logits, batch.t_logits, p.T).mean()
