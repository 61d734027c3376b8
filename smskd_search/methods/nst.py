"""NST: Huang & Wang, "Like What You Like: Knowledge Distill via Neuron Selectivity Transfer", 2017."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from pydantic import Field

from smskd_search.methods.base import KDBatch, Method, MethodContext, MethodParams, register_method
from smskd_search.methods.common import full_precision, paired_stages, pool_to_common


class NSTParams(MethodParams):
    weight: float = Field(50.0, ge=0.0, description="weight of the summed per-stage MMD^2")
    degree: int = Field(2, ge=1, description="polynomial kernel (x.y + c)^degree; degree 1 with c 0 is linear")
    c: float = Field(0.0, ge=0.0, description="constant of the polynomial kernel")


def nst_mmd2(f_s: torch.Tensor, f_t: torch.Tensor, degree: int = 2, c: float = 0.0) -> torch.Tensor:
    """Biased MMD^2 between the student's and the teacher's channels, each channel an L2-normalised
    spatial activation pattern (a sample of the "neuron selectivity" distribution)."""
    f_s, f_t = pool_to_common(f_s, f_t)
    with full_precision(f_s):
        a = F.normalize(f_s.float().flatten(2), dim=2)
        b = F.normalize(f_t.float().flatten(2), dim=2)

        def k(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
            return (torch.bmm(x, y.transpose(1, 2)) + c).pow(degree).mean()

        # The teacher-teacher term has no gradient; it keeps the value an MMD (>= 0).
        return k(b, b).detach() + k(a, a) - 2.0 * k(a, b)


@register_method
class NST(Method):
    name = "nst"
    family = "feature"
    reference = "Huang & Wang, Like What You Like: Knowledge Distill via Neuron Selectivity Transfer, arXiv 2017"
    Params = NSTParams

    def __init__(self, params: NSTParams, ctx: MethodContext):
        super().__init__(params, ctx)
        self.pairs = paired_stages(len(ctx.student_shapes.stages), len(ctx.teacher_shapes.stages))

    def forward(self, batch: KDBatch) -> torch.Tensor:
        s, t, p = batch.s_feats.stages, batch.t_feats.stages, self.params
        return p.weight * sum(nst_mmd2(s[i], t[j], p.degree, p.c) for i, j in self.pairs)
