"""CC: Peng et al., "Correlation Congruence for Knowledge Distillation", ICCV 2019, in the form the
CIFAR-100 benchmark (RepDistiller) trains it: linear 128-d embeddings of both pooled features, and
the product of the embedding gaps of consecutive samples in the batch."""

from __future__ import annotations

import torch
from pydantic import Field
from torch import nn

from smskd_search.methods.base import KDBatch, Method, MethodContext, MethodParams, register_method
from smskd_search.methods.common import full_precision


class CCParams(MethodParams):
    weight: float = Field(0.02, ge=0.0, description="weight of the correlation-congruence loss")
    feat_dim: int = Field(128, ge=1, description="dimension of the student and teacher linear embeddings")


def cc_loss(e_s: torch.Tensor, e_t: torch.Tensor) -> torch.Tensor:
    """mean_i sum_d |e_s - e_t|_{i,d} * |e_s - e_t|_{i+1,d}: a first-order expansion of the
    correlation between samples i and i+1."""
    if e_s.shape[0] < 2:
        return e_s.new_zeros((), dtype=torch.float32)
    delta = (e_s.float() - e_t.float()).abs()
    return (delta[:-1] * delta[1:]).sum(1).mean()


@register_method
class CC(Method):
    name = "cc"
    family = "relation"
    reference = "Peng et al., Correlation Congruence for Knowledge Distillation, ICCV 2019"
    Params = CCParams

    def __init__(self, params: CCParams, ctx: MethodContext):
        super().__init__(params, ctx)
        # Both embeddings are trained, as in RepDistiller (the teacher stays frozen; only its
        # embedding head learns).
        self.embed_s = nn.Linear(ctx.student_shapes.pooled[0], params.feat_dim)
        self.embed_t = nn.Linear(ctx.teacher_shapes.pooled[0], params.feat_dim)

    def forward(self, batch: KDBatch) -> torch.Tensor:
        s, t = batch.s_feats.pooled, batch.t_feats.pooled
        with full_precision(s):
            e_s = self.embed_s(s.float().flatten(1))
            e_t = self.embed_t(t.float().flatten(1))
            return self.params.weight * cc_loss(e_s, e_t)
