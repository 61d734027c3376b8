"""CIFAR ShuffleNet V2 (Ma et al. 2018) as in RepDistiller ``ShuffleV2`` (net size 1): widths
116/232/464 with 3/7/3 basic units after each down-sampling unit, a 1x1 stem, a 1024-wide head."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from smskd_search.models.base import Features, ZooModel, register_model, relu_stages
from smskd_search.models.cifar.common import pool_flatten
from smskd_search.models.cifar.shufflenetv1 import channel_shuffle


def conv_bn(cin: int, cout: int, k: int, stride: int = 1, groups: int = 1) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(cin, cout, k, stride, k // 2, groups=groups, bias=False), nn.BatchNorm2d(cout))


class BasicUnit(nn.Module):
    """Half the channels pass through; the other half goes through 1x1 -> 3x3 dw -> 1x1."""

    def __init__(self, channels: int):
        super().__init__()
        c = channels // 2
        self.branch = nn.Sequential(conv_bn(c, c, 1), nn.ReLU(inplace=True), conv_bn(c, c, 3, groups=c), conv_bn(c, c, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Returns the pre-ReLU output. The pass-through half is already non-negative (it comes
        out of a ReLU), so the caller's ReLU only acts on the branch, as in the original."""
        keep, x2 = x.chunk(2, dim=1)
        # Shuffled like the output, unlike RepDistiller's preact (which skips the shuffle and so
        # does not line up channel by channel with its own feature).
        return channel_shuffle(torch.cat([keep, self.branch(x2)], 1), 2)


class DownUnit(nn.Module):
    def __init__(self, cin: int, cout: int):
        super().__init__()
        mid = cout // 2
        self.left = nn.Sequential(conv_bn(cin, cin, 3, 2, groups=cin), conv_bn(cin, mid, 1))
        self.right = nn.Sequential(conv_bn(cin, mid, 1), nn.ReLU(inplace=True), conv_bn(mid, mid, 3, 2, groups=mid), conv_bn(mid, mid, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Pre-ReLU output: both branches end in a BN whose ReLU the caller applies."""
        return channel_shuffle(torch.cat([self.left(x), self.right(x)], 1), 2)


class ShuffleNetV2(ZooModel):
    def __init__(self, widths: tuple[int, ...], depths: tuple[int, ...], head: int, num_classes: int, in_channels: int):
        super().__init__()
        self.stem = conv_bn(in_channels, 24, 1)
        self.stages = nn.ModuleList()
        cin = 24
        for cout, n in zip(widths, depths):
            self.stages.append(nn.Sequential(DownUnit(cin, cout), *[BasicUnit(cout) for _ in range(n)]))
            cin = cout
        self.head = conv_bn(cin, head, 1)
        self.fc = nn.Linear(head, num_classes)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, Features]:
        out, stages, preact = relu_stages(self.stem(x), self.stages)
        pooled = pool_flatten(F.relu(self.head(out)))
        return self.fc(pooled), Features(stages, preact, pooled)

    def preact_bns(self) -> list[nn.Module | None]:
        # A stage's preact mixes a pass-through half with a BN output half: no single BN covers it.
        return [self.stem[1]] + [None] * len(self.stages)


def shufflenetv2(num_classes: int = 100, in_channels: int = 3) -> ShuffleNetV2:
    return ShuffleNetV2((116, 232, 464), (3, 7, 3), 1024, num_classes, in_channels)


register_model("shufflenetv2")(shufflenetv2)
register_model("ShuffleV2")(shufflenetv2)  # the benchmark codebases' spelling
