"""ReviewKD: Chen et al., "Distilling Knowledge via Knowledge Review", CVPR 2021.

The student's stage maps and pooled vector are fused from the deepest level up by attention-based
fusion (ABF) modules, each level's output is compared with the teacher's map at the same level by the
hierarchical context loss (HCL). Levels, channels and sizes come from the probed shapes of the pair
(mdistiller hard-codes them for resnet32x4 -> resnet8x4).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from pydantic import Field
from torch import nn

from smskd_search.methods.base import KDBatch, Method, MethodContext, MethodParams, register_method
from smskd_search.methods.common import paired_stages
from smskd_search.models.pool import adaptive_avg_pool2d


class ReviewKDParams(MethodParams):
    weight: float = Field(5.0, ge=0.0, description="weight of the HCL loss after warm-up")
    warmup_epochs: int = Field(20, ge=0, description="linear loss warm-up, counted from the stage start")
    max_mid_channels: int = Field(
        512, ge=1, description="cap of the ABF width (the width is min(cap, student pooled dim))"
    )
    student_preact: bool = Field(
        False, description="fuse the student's pre-activation maps instead of its stage outputs"
    )
    pyramid: list[int] = Field(
        default_factory=lambda: [4, 2, 1],
        description="HCL pooled grid sizes, each weighted half the previous; sizes >= the map are skipped",
    )


class ABF(nn.Module):
    """Reduce a student level to the shared width, fuse it with the deeper levels' result through
    two per-pixel attention weights, and project it to the teacher level's channels."""

    def __init__(self, c_in: int, c_mid: int, c_out: int, fuse: bool):
        super().__init__()
        self.reduce = nn.Sequential(nn.Conv2d(c_in, c_mid, 1, bias=False), nn.BatchNorm2d(c_mid))
        self.project = nn.Sequential(nn.Conv2d(c_mid, c_out, 3, padding=1, bias=False), nn.BatchNorm2d(c_out))
        self.attention = nn.Sequential(nn.Conv2d(2 * c_mid, 2, 1), nn.Sigmoid()) if fuse else None
        nn.init.kaiming_uniform_(self.reduce[0].weight, a=1)
        nn.init.kaiming_uniform_(self.project[0].weight, a=1)

    def forward(self, x: torch.Tensor, deeper: torch.Tensor | None,
                out_hw: tuple[int, int]) -> tuple[torch.Tensor, torch.Tensor]:
        x = self.reduce(x)
        if self.attention is not None and deeper is not None:
            deeper = F.interpolate(deeper, size=x.shape[-2:], mode="nearest")
            z = self.attention(torch.cat([x, deeper], dim=1))
            x = x * z[:, :1] + deeper * z[:, 1:]
        if tuple(x.shape[-2:]) != tuple(out_hw):
            x = F.interpolate(x, size=out_hw, mode="nearest")
        return self.project(x), x


def hcl_loss(f_s: torch.Tensor, f_t: torch.Tensor, pyramid: list[int] | tuple[int, ...] = (4, 2, 1)) -> torch.Tensor:
    """MSE of the maps plus MSEs of their l x l average-pooled versions with weights 1/2, 1/4...,
    normalised by the sum of the weights."""
    f_s, f_t = f_s.float(), f_t.float()
    loss = F.mse_loss(f_s, f_t)
    w, total = 1.0, 1.0
    side = min(f_s.shape[-2:])
    for size in pyramid:
        if size >= side:
            continue
        w /= 2.0
        loss = loss + w * F.mse_loss(adaptive_avg_pool2d(f_s, size), adaptive_avg_pool2d(f_t, size))
        total += w
    return loss / total


@register_method
class ReviewKD(Method):
    name = "reviewkd"
    family = "feature"
    reference = "Chen et al., Distilling Knowledge via Knowledge Review, CVPR 2021"
    Params = ReviewKDParams

    def __init__(self, params: ReviewKDParams, ctx: MethodContext):
        super().__init__(params, ctx)
        ss, ts = ctx.student_shapes, ctx.teacher_shapes
        # Levels, shallow to deep: the paired stages (deepest aligned), then the pooled vector.
        s_maps = ss.preact if params.student_preact else ss.stages
        self.pairs = paired_stages(len(s_maps), len(ts.preact))
        c_in = [s_maps[i][0] for i, _ in self.pairs] + [ss.pooled[0]]
        c_out = [ts.preact[j][0] for _, j in self.pairs] + [ts.pooled[0]]
        self.out_hw = [tuple(ts.preact[j][1:]) for _, j in self.pairs] + [(1, 1)]
        c_mid = min(params.max_mid_channels, c_in[-1])
        last = len(c_in) - 1
        self.abfs = nn.ModuleList(ABF(ci, c_mid, co, fuse=lvl < last) for lvl, (ci, co) in enumerate(zip(c_in, c_out)))

    def warmup_factor(self, stage_epoch: int) -> float:
        w = self.params.warmup_epochs
        return 1.0 if w == 0 else min((stage_epoch + 1) / w, 1.0)

    def review(self, s_stages: list[torch.Tensor], s_pooled: torch.Tensor) -> list[torch.Tensor]:
        """The ABF outputs per level, shallow to deep."""
        xs = [s_stages[i] for i, _ in self.pairs] + [s_pooled.flatten(1)[:, :, None, None]]
        outs: list[torch.Tensor] = []
        deeper = None
        for lvl in reversed(range(len(xs))):
            out, deeper = self.abfs[lvl](xs[lvl], deeper, self.out_hw[lvl])
            outs.insert(0, out)
        return outs

    def forward(self, batch: KDBatch) -> torch.Tensor:
        s = batch.s_feats
        outs = self.review(s.preact if self.params.student_preact else s.stages, s.pooled)
        t = batch.t_feats
        targets = [t.preact[j] for _, j in self.pairs] + [t.pooled.flatten(1)[:, :, None, None]]
        loss = sum(hcl_loss(o, tgt, self.params.pyramid) for o, tgt in zip(outs, targets))
        return self.warmup_factor(batch.stage_epoch) * self.params.weight * loss
