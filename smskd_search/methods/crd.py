"""CRD: Tian, Krishnan & Isola, "Contrastive Representation Distillation", ICLR 2020.

Student and teacher pooled features are embedded (linear + L2 norm) to ``feat_dim``; each embedding
is scored against a momentum memory bank of the *other* view: the sample's own row is the positive,
K uniformly drawn rows of other training samples are the negatives, and the NCE loss of both views
is summed. The banks are updated after the optimizer step (``on_step_end``).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from pydantic import Field
from torch import nn

from smskd_search.methods.base import KDBatch, Method, MethodContext, MethodParams, register_method
from smskd_search.methods.common import full_precision


class CRDParams(MethodParams):
    weight: float = Field(0.8, ge=0.0, description="weight of the summed student and teacher NCE losses")
    feat_dim: int = Field(128, ge=1, description="dimension of the contrastive embeddings")
    nce_k: int = Field(
        16384, ge=1, description="negatives per sample; capped to the training-split size minus one"
    )
    nce_t: float = Field(0.07, gt=0.0, description="temperature of the exp(similarity / t) scores")
    nce_m: float = Field(0.5, ge=0.0, lt=1.0, description="momentum of the memory-bank update")
    eps: float = Field(1e-7, gt=0.0, description="added inside the NCE logs")


class Embed(nn.Module):
    def __init__(self, dim_in: int, dim_out: int):
        super().__init__()
        self.linear = nn.Linear(dim_in, dim_out)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.normalize(self.linear(x.float().flatten(1)), dim=1)


def nce_loss(scores: torch.Tensor, n_data: int, eps: float = 1e-7) -> torch.Tensor:
    """NCE with a uniform noise distribution over the n_data samples. ``scores`` is (b, 1 + K):
    normalised exp-similarities, the positive in column 0."""
    k = scores.shape[1] - 1
    noise = k / n_data  # K * P_noise
    log_pos = torch.log(scores[:, 0] / (scores[:, 0] + noise + eps))
    log_neg = torch.log(noise / (scores[:, 1:] + noise + eps))
    return -(log_pos.sum() + log_neg.sum()) / scores.shape[0]


@register_method
class CRD(Method):
    name = "crd"
    family = "relation"
    reference = "Tian, Krishnan & Isola, Contrastive Representation Distillation, ICLR 2020"
    Params = CRDParams
    needs_indices = True

    def __init__(self, params: CRDParams, ctx: MethodContext):
        super().__init__(params, ctx)
        n = int(ctx.num_train)
        if n < 2:
            raise ValueError(f"crd needs at least 2 training samples, got {n}")
        self.n_data = n
        # Size the negatives to the dataset: K = 16384 would exceed small training splits.
        self.k = min(params.nce_k, n - 1)
        self.embed_s = Embed(ctx.student_shapes.pooled[0], params.feat_dim)
        self.embed_t = Embed(ctx.teacher_shapes.pooled[0], params.feat_dim)
        stdv = 1.0 / math.sqrt(params.feat_dim / 3)
        self.register_buffer("memory_s", torch.rand(n, params.feat_dim).mul_(2 * stdv).sub_(stdv))
        self.register_buffer("memory_t", torch.rand(n, params.feat_dim).mul_(2 * stdv).sub_(stdv))
        # Normalisation constants Z, fixed from the first batch (-1: not set yet).
        self.register_buffer("z_s", torch.tensor(-1.0))
        self.register_buffer("z_t", torch.tensor(-1.0))
        self._pending: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None

    def sample_candidates(self, idx: torch.Tensor) -> torch.Tensor:
        """(b, 1 + K) rows of the banks: the sample itself, then K others drawn uniformly with
        replacement, on the batch's device."""
        neg = torch.randint(0, self.n_data - 1, (idx.shape[0], self.k), device=idx.device)
        neg = neg + (neg >= idx.unsqueeze(1)).long()  # skip the positive's own row
        return torch.cat([idx.unsqueeze(1), neg], dim=1)

    def _scores(self, v: torch.Tensor, memory: torch.Tensor, cand: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        # One (b, N) product and a gather: b*N floats, instead of gathering (b, 1 + K, d) bank rows.
        sims = (v @ memory.t()).gather(1, cand)
        out = torch.exp(sims / self.params.nce_t)
        z.copy_(torch.where(z < 0, out.detach().mean() * self.n_data, z))  # no host sync
        return out / z

    def forward(self, batch: KDBatch) -> torch.Tensor:
        if batch.indices is None:
            raise ValueError("crd needs the batch's sample indices (KDBatch.indices)")
        idx = batch.indices.long()
        with full_precision(batch.s_feats.pooled):
            v_s = self.embed_s(batch.s_feats.pooled)
            v_t = self.embed_t(batch.t_feats.pooled)
            cand = self.sample_candidates(idx)
            # Each view against the other view's memory.
            out_s = self._scores(v_s, self.memory_t, cand, self.z_s)
            out_t = self._scores(v_t, self.memory_s, cand, self.z_t)
            loss = nce_loss(out_s, self.n_data, self.params.eps) + nce_loss(out_t, self.n_data, self.params.eps)
        self._pending = (idx, v_s.detach(), v_t.detach())
        return self.params.weight * loss

    @torch.no_grad()
    def on_step_end(self, batch: KDBatch) -> None:
        if self._pending is None:
            return
        idx, v_s, v_t = self._pending
        m = self.params.nce_m
        for memory, v in ((self.memory_s, v_s), (self.memory_t, v_t)):
            rows = memory.index_select(0, idx) * m + v * (1.0 - m)
            memory.index_copy_(0, idx, F.normalize(rows, dim=1))
        self._pending = None
