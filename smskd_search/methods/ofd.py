"""OFD: Heo et al., "A Comprehensive Overhaul of Feature Distillation", ICCV 2019.

Student pre-activations go through a Conv1x1 + BN connector and are compared with the teacher's
pre-activations by a partial L2: where the teacher is negative (below the ReLU) only a student value
above ``max(teacher, margin)`` is penalised. The per-channel margin is E[x | x < 0] of the teacher's
pre-activation, read from the BN that produces it (x ~ N(beta, gamma^2)).

Kept as it is, unlike mdistiller: the teacher is only read (its BN parameters at build time, its
features per batch) and stays in eval mode, where mdistiller's OFD switches it to train mode with the
student. Our teacher is one frozen model shared by every stage of a run and cached on disk (its
outputs may be cached across epochs too), so a method must not move its BN statistics; its
pre-activations are therefore normalised with the running statistics, not the batch's.
"""

from __future__ import annotations

import logging
import math

import torch
from pydantic import Field
from torch import nn

from smskd_search.methods.base import KDBatch, Method, MethodContext, MethodParams, register_method
from smskd_search.methods.common import paired_stages, pool_to_common

log = logging.getLogger(__name__)


class OFDParams(MethodParams):
    weight: float = Field(1e-3, ge=0.0, description="weight of the per-sample summed partial L2")
    margin_cdf_floor: float = Field(
        1e-3, gt=0.0, lt=1.0,
        description="below this P(x < 0) the BN margin falls back to -3 gamma (as the OFD code)",
    )


def bn_margin(bn: nn.Module, cdf_floor: float = 1e-3) -> torch.Tensor:
    """Per-channel E[x | x < 0] for x ~ N(beta, gamma^2), from a BatchNorm's affine parameters."""
    c = bn.num_features
    gamma = bn.weight.detach().float().cpu() if getattr(bn, "weight", None) is not None else torch.ones(c)
    beta = bn.bias.detach().float().cpu() if getattr(bn, "bias", None) is not None else torch.zeros(c)
    s, m = gamma.abs().clamp(min=1e-12), beta
    cdf = torch.special.ndtr(-m / s)
    pdf = torch.exp(-0.5 * (m / s) ** 2) / math.sqrt(2 * math.pi)
    return torch.where(cdf > cdf_floor, m - s * pdf / cdf.clamp(min=1e-30), -3.0 * s)


def partial_l2(source: torch.Tensor, target: torch.Tensor, margin: torch.Tensor) -> torch.Tensor:
    """Sum over the map of OFD's partial L2, divided by the batch size.

    target <- max(target, margin); a position counts where the student exceeds that target, or where
    the teacher is positive. The larger map is average-pooled to the smaller one after the max.
    """
    target = torch.max(target.float(), margin.view(1, -1, 1, 1).to(target.device))
    source, target = pool_to_common(source.float(), target)
    mask = (source > target) | (target > 0)
    return ((source - target).pow(2) * mask).sum() / source.shape[0]


class Connector(nn.Sequential):
    def __init__(self, c_in: int, c_out: int):
        conv = nn.Conv2d(c_in, c_out, 1, bias=False)
        nn.init.normal_(conv.weight, 0.0, math.sqrt(2.0 / c_out))  # He init over the output fan
        super().__init__(conv, nn.BatchNorm2d(c_out))


@register_method
class OFD(Method):
    name = "ofd"
    family = "feature"
    reference = "Heo et al., A Comprehensive Overhaul of Feature Distillation, ICCV 2019"
    Params = OFDParams

    def __init__(self, params: OFDParams, ctx: MethodContext):
        super().__init__(params, ctx)
        s_sh, t_sh = ctx.student_shapes.preact, ctx.teacher_shapes.preact
        self.pairs = paired_stages(len(s_sh), len(t_sh))
        self.connectors = nn.ModuleList(Connector(s_sh[i][0], t_sh[j][0]) for i, j in self.pairs)
        bns = ctx.teacher.preact_bns() if hasattr(ctx.teacher, "preact_bns") else [None] * len(t_sh)
        self.margin_sources: list[str] = []  # per pair: "bn" or "empirical" (the fallback)
        for k, (_, j) in enumerate(self.pairs):
            bn = bns[j] if j < len(bns) else None
            usable = bn is not None and getattr(bn, "num_features", None) == t_sh[j][0]
            self.margin_sources.append("bn" if usable else "empirical")
            margin = bn_margin(bn, params.margin_cdf_floor) if usable else torch.zeros(t_sh[j][0])
            self.register_buffer(f"margin{k}", margin)
            # Fallback where no BN produces the pre-activation: the same quantity, E[x | x < 0],
            # estimated from the teacher's pre-activations seen so far this stage.
            self.register_buffer(f"neg_sum{k}", torch.zeros(t_sh[j][0], dtype=torch.float64))
            self.register_buffer(f"neg_count{k}", torch.zeros(t_sh[j][0], dtype=torch.float64))

        if "empirical" in self.margin_sources:
            log.info("ofd: no teacher BN before stage(s) %s; margins estimated from the teacher's pre-activations",
                     [j for (_, j), src in zip(self.pairs, self.margin_sources) if src == "empirical"])

    def margin(self, k: int, f_t: torch.Tensor) -> torch.Tensor:
        if self.margin_sources[k] == "bn":
            return getattr(self, f"margin{k}")
        with torch.no_grad():
            x = f_t.detach().double()
            neg = x.clamp(max=0)
            getattr(self, f"neg_sum{k}").add_(neg.sum(dim=(0, 2, 3)))
            getattr(self, f"neg_count{k}").add_((x < 0).sum(dim=(0, 2, 3)).double())
            est = getattr(self, f"neg_sum{k}") / getattr(self, f"neg_count{k}").clamp(min=1)
            getattr(self, f"margin{k}").copy_(est.float())
        return getattr(self, f"margin{k}").clone()

    def forward(self, batch: KDBatch) -> torch.Tensor:
        s, t = batch.s_feats.preact, batch.t_feats.preact
        n = len(self.pairs)
        loss = 0.0
        for k, (conn, (i, j)) in enumerate(zip(self.connectors, self.pairs)):
            # Deeper stages weigh more: 1, 1/2, 1/4... from the deepest down (as the OFD code).
            scale = 2.0 ** (n - k - 1)
            loss = loss + partial_l2(conn(s[i]), t[j], self.margin(k, t[j])) / scale
        return self.params.weight * loss
