"""Pieces several methods share: pairing student and teacher stages, and the FitNets regressor."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from smskd_search.models.pool import adaptive_avg_pool2d


def paired_stages(n_student: int, n_teacher: int, skip_stem: bool = True) -> list[tuple[int, int]]:
    """Pairs of (student, teacher) indices into Features.stages, deepest stages aligned.

    The rule: leave out the stems (index 0) when ``skip_stem``, then pair the last
    ``min(n_student, n_teacher) - start`` entries of each in order, so that the deepest stages always
    meet and the model with more stages has its shallowest extra ones left out. The benchmark
    codebases zip from the shallow end instead (the deeper model's deepest maps are dropped). On every
    benchmark pair of the zoo both models have the same stage count and the two rules give the same
    pairs; they differ only on pairs such as wrn_40_2 -> mobilenetv2 (4 and 5 entries: ours pairs
    student 2, 3, 4 with teacher 1, 2, 3, the peers' zip 1, 2, 3 with 1, 2, 3). Deepest-aligned keeps
    the semantically closest maps together.

    Args:
        n_student: Number of the student's stage entries (stem included).
        n_teacher: Number of the teacher's stage entries (stem included).
        skip_stem: Leave the stems out (every method but SP does).
    """
    start = 1 if skip_stem else 0
    k = min(n_student, n_teacher) - start
    return [(n_student - k + i, n_teacher - k + i) for i in range(k)]


def middle_stage(n_stages: int) -> int:
    """The 'hint' stage of FitNets: index 2 for the usual stem + 3 stages layout."""
    return max(1, n_stages // 2)


def full_precision(like: torch.Tensor):
    """Autocast off for loss arithmetic on ``like``'s device.

    Under bf16 autocast, matmuls (Gram matrices, similarities, exp(s/tau)) would run in bf16 even on
    float32 inputs; the relational losses compare small differences of such products.
    """
    return torch.autocast(like.device.type, enabled=False)


def pool_to_common(a: torch.Tensor, b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Average-pool the larger map down to the smaller one's spatial size (per dimension)."""
    hw = (min(a.shape[-2], b.shape[-2]), min(a.shape[-1], b.shape[-1]))
    return resize_to(a, hw), resize_to(b, hw)


def resize_to(x: torch.Tensor, hw: tuple[int, int]) -> torch.Tensor:
    if tuple(x.shape[-2:]) == tuple(hw):
        return x
    if x.shape[-2] >= hw[0] and x.shape[-1] >= hw[1]:
        return adaptive_avg_pool2d(x, hw)
    return F.interpolate(x, size=hw, mode="bilinear", align_corners=False)


class ConvReg(nn.Module):
    """Maps a student feature map onto a teacher map's shape: conv + BN + ReLU (FitNets' regressor).

    The benchmark codebases' rule (mdistiller and RepDistiller build the same ConvReg), chosen by the
    spatial sizes ``(hs, ws)`` of the student and ``(ht, wt)`` of the teacher:

    - student twice as large: a 3x3 conv, stride 2, padding 1;
    - student half as large: a 4x4 transposed conv, stride 2, padding 1;
    - student at least as large: a "valid" conv with kernel ``(1 + hs - ht, 1 + ws - wt)``, so a 1x1
      conv where the sizes are equal;
    - otherwise (student smaller, not by 2x; the peers raise there): the student map is resized to
      the teacher's size first, then the equal-size 1x1 conv.

    Args:
        s_shape: Student map shape ``(C, H, W)``.
        t_shape: Teacher map shape ``(C, H, W)``.
        use_relu: Apply the ReLU after the BN (the peers' default, True).
    """

    def __init__(self, s_shape: tuple[int, ...], t_shape: tuple[int, ...], use_relu: bool = True):
        super().__init__()
        cs, hs, ws = s_shape
        ct, ht, wt = t_shape
        self.target_hw = (ht, wt)
        self.pre_resize = False
        if hs == 2 * ht and ws == 2 * wt:
            self.conv: nn.Module = nn.Conv2d(cs, ct, 3, stride=2, padding=1)
        elif 2 * hs == ht and 2 * ws == wt:
            self.conv = nn.ConvTranspose2d(cs, ct, 4, stride=2, padding=1)
        elif hs >= ht and ws >= wt:
            self.conv = nn.Conv2d(cs, ct, (1 + hs - ht, 1 + ws - wt))
        else:
            self.pre_resize = True
            self.conv = nn.Conv2d(cs, ct, 1)
        self.bn = nn.BatchNorm2d(ct)
        self.use_relu = use_relu

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.pre_resize:
            x = resize_to(x, self.target_hw)
        x = self.bn(self.conv(x))
        return F.relu(x) if self.use_relu else x
