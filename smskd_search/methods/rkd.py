"""RKD: Park et al., "Relational Knowledge Distillation", CVPR 2019 (distance + angle)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from pydantic import Field

from smskd_search.methods.base import KDBatch, Method, MethodParams, register_method
from smskd_search.methods.common import full_precision


class RKDParams(MethodParams):
    distance_weight: float = Field(25.0, ge=0.0, description="weight of the distance-wise term")
    angle_weight: float = Field(50.0, ge=0.0, description="weight of the angle-wise term")
    squared: bool = Field(False, description="compare squared distances (the peers use plain distances)")
    eps: float = Field(1e-12, gt=0.0, description="floor of the squared distances before the square root")


def pairwise_distances(e: torch.Tensor, squared: bool, eps: float) -> torch.Tensor:
    """b x b Euclidean distances, diagonal zero, divided by the mean off-diagonal distance."""
    sq = e.pow(2).sum(1)
    d = (sq.unsqueeze(0) + sq.unsqueeze(1) - 2.0 * (e @ e.t())).clamp(min=eps)
    if not squared:
        d = d.sqrt()
    d = d * (1.0 - torch.eye(e.shape[0], device=e.device, dtype=d.dtype))
    # Mean over the positive entries, without boolean indexing (no host sync on a GPU).
    return d / (d.sum() / (d > 0).sum().clamp(min=1))


def triplet_angles(e: torch.Tensor) -> torch.Tensor:
    """cos of the angle at j between (i - j) and (k - j), for all i, j, k, flattened."""
    diff = F.normalize(e.unsqueeze(0) - e.unsqueeze(1), p=2, dim=2)
    return torch.bmm(diff, diff.transpose(1, 2)).flatten()


def rkd_loss(e_s: torch.Tensor, e_t: torch.Tensor, distance_weight: float, angle_weight: float,
             squared: bool = False, eps: float = 1e-12) -> torch.Tensor:
    with full_precision(e_s):
        e_s, e_t = e_s.float().flatten(1), e_t.float().flatten(1)
        with torch.no_grad():
            d_t = pairwise_distances(e_t, squared, eps)
            a_t = triplet_angles(e_t)
        loss_d = F.smooth_l1_loss(pairwise_distances(e_s, squared, eps), d_t)
        loss_a = F.smooth_l1_loss(triplet_angles(e_s), a_t)
        return distance_weight * loss_d + angle_weight * loss_a


@register_method
class RKD(Method):
    name = "rkd"
    family = "relation"
    reference = "Park et al., Relational Knowledge Distillation, CVPR 2019"
    Params = RKDParams

    def forward(self, batch: KDBatch) -> torch.Tensor:
        p = self.params
        return rkd_loss(batch.s_feats.pooled, batch.t_feats.pooled, p.distance_weight, p.angle_weight, p.squared, p.eps)
