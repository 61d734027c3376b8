"""PKT: Passalis & Tefas, "Learning Deep Representations with Probabilistic Knowledge Transfer",
ECCV 2018."""

from __future__ import annotations

import torch
from pydantic import Field

from smskd_search.methods.base import KDBatch, Method, MethodParams, register_method
from smskd_search.methods.common import full_precision


class PKTParams(MethodParams):
    weight: float = Field(30000.0, ge=0.0, description="weight of the KL between the similarity distributions")
    eps: float = Field(1e-7, gt=0.0, description="added to norms and probabilities to keep the logs finite")


def cosine_conditional(e: torch.Tensor, eps: float) -> torch.Tensor:
    """Row-stochastic b x b matrix of (cos + 1) / 2 similarities (cosine kernel densities)."""
    e = e / (e.norm(dim=1, keepdim=True) + eps)
    sim = (e @ e.t() + 1.0) / 2.0
    return sim / sim.sum(dim=1, keepdim=True)


def pkt_loss(e_s: torch.Tensor, e_t: torch.Tensor, eps: float = 1e-7) -> torch.Tensor:
    with full_precision(e_s):
        p_s = cosine_conditional(e_s.float().flatten(1), eps)
        with torch.no_grad():
            p_t = cosine_conditional(e_t.float().flatten(1), eps)
        return (p_t * torch.log((p_t + eps) / (p_s + eps))).mean()


@register_method
class PKT(Method):
    name = "pkt"
    family = "relation"
    reference = "Passalis & Tefas, Learning Deep Representations with Probabilistic Knowledge Transfer, ECCV 2018"
    Params = PKTParams

    def forward(self, batch: KDBatch) -> torch.Tensor:
        return self.params.weight * pkt_loss(batch.s_feats.pooled, batch.t_feats.pooled, self.params.eps)
