"""CIFAR ShuffleNet V1 (Zhang et al. 2018) as in RepDistiller ``ShuffleV1``: groups 3, widths
240/480/960 with 4/8/4 units, a 1x1 stem and no stem pooling (CIFAR images are small)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from smskd_search.models.base import Features, ZooModel, register_model, relu_stages
from smskd_search.models.cifar.common import pool_flatten


def channel_shuffle(x: torch.Tensor, groups: int) -> torch.Tensor:
    n, c, h, w = x.shape
    return x.view(n, groups, c // groups, h, w).transpose(1, 2).reshape(n, c, h, w)


class ShuffleUnit(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int, groups: int, group_first: bool = True):
        super().__init__()
        self.stride = stride
        # A stride-2 unit concatenates its pooled input, so its branch only adds cout - cin channels.
        branch = cout - cin if stride == 2 else cout
        mid = branch // 4
        # The paper (and RepDistiller) leave the very first pointwise conv ungrouped: its input is
        # only the 24-channel stem.
        self.g1 = groups if group_first else 1
        self.conv1 = nn.Conv2d(cin, mid, 1, groups=self.g1, bias=False)
        self.bn1 = nn.BatchNorm2d(mid)
        self.conv2 = nn.Conv2d(mid, mid, 3, stride, 1, groups=mid, bias=False)
        self.bn2 = nn.BatchNorm2d(mid)
        self.conv3 = nn.Conv2d(mid, branch, 1, groups=groups, bias=False)
        self.bn3 = nn.BatchNorm2d(branch)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Returns the pre-ReLU output; the caller applies the ReLU."""
        out = channel_shuffle(F.relu(self.bn1(self.conv1(x))), self.g1)
        out = self.bn3(self.conv3(F.relu(self.bn2(self.conv2(out)))))
        if self.stride == 2:
            return torch.cat([out, F.avg_pool2d(x, 3, 2, 1)], 1)
        return out + x


class ShuffleNetV1(ZooModel):
    def __init__(self, widths: tuple[int, ...], depths: tuple[int, ...], groups: int, num_classes: int, in_channels: int):
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, 24, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(24)
        self.stages = nn.ModuleList()
        cin = 24
        for i, (cout, n) in enumerate(zip(widths, depths)):
            units = [ShuffleUnit(cin if d == 0 else cout, cout, 2 if d == 0 else 1, groups, group_first=(i, d) != (0, 0)) for d in range(n)]
            self.stages.append(nn.Sequential(*units))
            cin = cout
        self.fc = nn.Linear(cin, num_classes)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, Features]:
        out, stages, preact = relu_stages(self.bn1(self.conv1(x)), self.stages)
        pooled = pool_flatten(out)
        return self.fc(pooled), Features(stages, preact, pooled)

    def preact_bns(self) -> list[nn.Module | None]:
        # Every stage ends in a stride-1 unit, whose preact is bn3's output plus the identity
        # (bn3 approximates its statistics, as in mdistiller's OFD).
        return [self.bn1] + [stage[-1].bn3 for stage in self.stages]


def shufflenetv1(num_classes: int = 100, in_channels: int = 3) -> ShuffleNetV1:
    return ShuffleNetV1((240, 480, 960), (4, 8, 4), 3, num_classes, in_channels)


register_model("shufflenetv1")(shufflenetv1)
register_model("ShuffleV1")(shufflenetv1)  # the benchmark codebases' spelling
