"""AT: Zagoruyko & Komodakis, "Paying More Attention to Attention", ICLR 2017."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from pydantic import Field

from smskd_search.methods.base import KDBatch, Method, MethodContext, MethodParams, register_method
from smskd_search.methods.common import paired_stages
from smskd_search.models.pool import adaptive_avg_pool2d


class ATParams(MethodParams):
    weight: float = Field(1000.0, ge=0.0, description="weight of the attention-map loss")
    p: float = Field(2.0, gt=0.0, description="power applied to activations before the channel mean")


def attention_map(f: torch.Tensor, p: float) -> torch.Tensor:
    return F.normalize(f.float().pow(p).mean(1).flatten(1))


def at_stage_loss(f_s: torch.Tensor, f_t: torch.Tensor, p: float) -> torch.Tensor:
    hs, ht = f_s.shape[2], f_t.shape[2]
    if hs > ht:
        f_s = adaptive_avg_pool2d(f_s, f_t.shape[2:])
    elif hs < ht:
        f_t = adaptive_avg_pool2d(f_t, f_s.shape[2:])
    return (attention_map(f_s, p) - attention_map(f_t, p)).pow(2).mean()


@register_method
class AT(Method):
    name = "at"
    family = "feature"
    reference = "Zagoruyko & Komodakis, Paying More Attention to Attention, ICLR 2017"
    Params = ATParams

    def __init__(self, params: ATParams, ctx: MethodContext):
        super().__init__(params, ctx)
        self.pairs = paired_stages(len(ctx.student_shapes.stages), len(ctx.teacher_shapes.stages))

    def forward(self, batch: KDBatch) -> torch.Tensor:
        s, t = batch.s_feats.stages, batch.t_feats.stages
        loss = sum(at_stage_loss(s[i], t[j], self.params.p) for i, j in self.pairs)
        return self.params.weight * loss
