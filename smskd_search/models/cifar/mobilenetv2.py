"""CIFAR MobileNetV2 as in RepDistiller / mdistiller ``mobile_half``: expansion 6, width 0.5, a
stride-2 stem and a 1280-wide head. Stage boundaries follow their ``feats``: after inverted
residual groups 1, 2, 4 and 6."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from smskd_search.models.base import Features, ZooModel, register_model
from smskd_search.models.cifar.common import init_weights, pool_flatten


def conv_bn_relu(cin: int, cout: int, k: int, stride: int = 1, groups: int = 1) -> list[nn.Module]:
    return [nn.Conv2d(cin, cout, k, stride, k // 2, groups=groups, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True)]


class InvertedResidual(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int, expand: int):
        super().__init__()
        mid = cin * expand
        self.residual = stride == 1 and cin == cout
        # RepDistiller keeps the 1x1 expansion even when expand == 1 (unlike the paper); so do we,
        # to match its parameter count.
        self.conv = nn.Sequential(
            *conv_bn_relu(cin, mid, 1),
            *conv_bn_relu(mid, mid, 3, stride, groups=mid),
            nn.Conv2d(mid, cout, 1, bias=False),
            nn.BatchNorm2d(cout),  # linear bottleneck: no ReLU
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.conv(x) if self.residual else self.conv(x)


class MobileNetV2(ZooModel):
    def __init__(self, expand: int, width: float, num_classes: int, in_channels: int):
        super().__init__()
        # (expansion, channels, blocks, first stride) per group, as in the paper with the CIFAR
        # change of stride 1 in the second group.
        groups = [(1, 16, 1, 1), (expand, 24, 2, 1), (expand, 32, 3, 2), (expand, 64, 4, 2),
                  (expand, 96, 3, 1), (expand, 160, 3, 2), (expand, 320, 1, 1)]
        cin = int(32 * width)
        self.stem = nn.Sequential(*conv_bn_relu(in_channels, cin, 3, 2))
        blocks = []
        for t, c, n, s in groups:
            cout = int(c * width)
            group = [InvertedResidual(cin if i == 0 else cout, cout, s if i == 0 else 1, t) for i in range(n)]
            blocks.append(group)
            cin = cout
        self.stages = nn.ModuleList(nn.Sequential(*sum(blocks[a:b], [])) for a, b in [(0, 2), (2, 3), (3, 5), (5, 7)])
        head = int(1280 * width) if width > 1.0 else 1280
        self.head = nn.Sequential(*conv_bn_relu(cin, head, 1))
        self.fc = nn.Linear(head, num_classes)
        init_weights(self)
        nn.init.normal_(self.fc.weight, 0, 0.01)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, Features]:
        pre = self.stem[:2](x)
        out = F.relu(pre)
        stages, preact = [out], [pre]
        for stage in self.stages:
            # Stages end in a linear bottleneck: there is no final activation, preact == stage.
            out = stage(out)
            stages.append(out)
            preact.append(out)
        pooled = pool_flatten(self.head(out))
        return self.fc(pooled), Features(stages, preact, pooled)

    def preact_bns(self) -> list[nn.Module | None]:
        # The last BN of each stage, as mdistiller's OFD takes; where that block is residual the
        # preact also carries the skip, so the BN only approximates its statistics.
        return [self.stem[1]] + [stage[-1].conv[-1] for stage in self.stages]


def mobilenetv2(num_classes: int = 100, in_channels: int = 3) -> MobileNetV2:
    return MobileNetV2(6, 0.5, num_classes, in_channels)


register_model("mobilenetv2")(mobilenetv2)
register_model("MobileNetV2")(mobilenetv2)  # the benchmark codebases' spelling
