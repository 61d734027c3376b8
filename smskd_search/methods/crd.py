"""CRD: Tian, Krishnan & Isola, "Contrastive Representation Distillation", ICLR 2020.

Student and teacher pooled features are embedded (linear + L2 norm) to ``feat_dim``; each embedding
is scored against a momentum memory bank of the *other* view: the sample's own row is the positive,
K rows of training samples of *other classes* are the negatives, and the NCE loss of both views is
summed. The banks are updated after the optimizer step (``on_step_end``).

Negatives as RepDistiller's CIFAR-100 sampler draws them (``mode='exact'``; mdistiller's CRD uses
that sampler too): uniformly from the samples whose label differs from the anchor's, without
replacement, or with replacement where K exceeds that class's number of other-class samples. They
come from the torch generator of the batch's device, which the engine seeds per stage, so a plan and
seed give the same negatives on the same device.
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
        if ctx.train_labels is None or ctx.train_labels.shape != (n,):
            raise ValueError(f"crd needs the labels of the {n} training samples (MethodContext.train_labels)")
        labels = ctx.train_labels.detach().long()
        n_other = n - torch.bincount(labels)
        if int(n_other[labels].min()) < 1:
            raise ValueError("crd needs at least two classes in the training split (negatives are other classes)")
        self.n_data = n
        # Size the negatives to the dataset: K = 16384 would exceed small training splits.
        self.k = min(params.nce_k, n - 1)
        # Not state: rebuilt from the context, so kept out of the state dict.
        self.register_buffer("labels", labels.clone(), persistent=False)
        self.register_buffer("n_other", n_other, persistent=False)  # per class: samples of other classes
        # Which draws are with replacement, when every class agrees: decided here, not per batch on
        # the device (a host sync per step); None: it depends on the batch's classes.
        present = n_other[labels.unique()]
        self._all_replace: bool | None = (
            False if int(present.min()) >= self.k else True if int(present.max()) < self.k else None
        )
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
        """(b, 1 + K) rows of the banks: the sample itself, then K samples of other classes, on the
        batch's device.

        Args:
            idx: Positions of the batch's samples in the training split.
        """
        labels = self.labels.to(idx.device)
        y = labels[idx]
        other = labels.unsqueeze(0) != y.unsqueeze(1)  # (b, N): the anchor's candidate negatives
        n_other = self.n_other.to(idx.device)[y]
        if self._all_replace is not None:
            return torch.cat([idx.unsqueeze(1), self._draw(other, n_other, self._all_replace)], dim=1)
        replace = n_other < self.k
        neg = torch.empty((idx.shape[0], self.k), dtype=torch.long, device=idx.device)
        for flag in (False, True):
            rows = (replace == flag).nonzero().squeeze(1)
            if rows.numel():
                neg[rows] = self._draw(other[rows], n_other[rows], flag)
        return torch.cat([idx.unsqueeze(1), neg], dim=1)

    def _draw(self, other: torch.Tensor, n_other: torch.Tensor, replace: bool) -> torch.Tensor:
        """K positions per row among the row's ``other`` ones, uniformly, with or without replacement."""
        if not replace:
            # The K largest of i.i.d. uniform keys, same-class keys below them all: a uniform K-subset.
            keys = torch.rand(other.shape, device=other.device).masked_fill_(~other, -1.0)
            return keys.topk(self.k, dim=1).indices
        # Uniform ranks among the other-class samples, mapped to positions by a running count.
        counts = n_other.unsqueeze(1)
        ranks = torch.minimum((torch.rand((other.shape[0], self.k), device=other.device) * counts).long(), counts - 1)
        return torch.searchsorted(other.long().cumsum(1), ranks + 1)

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
