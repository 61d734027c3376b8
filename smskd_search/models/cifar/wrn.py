"""Pre-activation Wide ResNets (Zagoruyko & Komodakis 2016) as in RepDistiller / mdistiller.

Feature choice. In a pre-activation network a stage's output is a raw residual sum; its
activation is the next block's ``bn1`` + ReLU (or the final ``bn`` + ReLU after the last stage).
We expose that BN output as ``preact`` and its ReLU as the stage feature, so every stage is
"after its final activation" like the other models, and ``preact_bns`` can name a BN whose output
the preact really is (what OFD's margins assume). The forward computes each such BN once and
hands the result to the block, so running statistics move exactly as in the plain network.
mdistiller instead exposes the raw sums as ``feats`` and applies the next ``bn1`` a second time
for ``preact_feats``, which in train mode updates that BN's statistics twice per step.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from smskd_search.models.base import Features, ZooModel, register_model
from smskd_search.models.cifar.common import init_weights, pool_flatten


class PreActBlock(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int):
        super().__init__()
        self.bn1 = nn.BatchNorm2d(cin)
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        # As in the reference WRN: a projection (from the activated input) only when widths differ.
        self.shortcut = None if cin == cout else nn.Conv2d(cin, cout, 1, stride, bias=False)

    def forward(self, x: torch.Tensor, h: torch.Tensor | None = None) -> torch.Tensor:
        """``h`` is ``self.bn1(x)`` when the caller already computed it (to expose it as a preact)."""
        a = F.relu(self.bn1(x) if h is None else h)
        out = self.conv2(F.relu(self.bn2(self.conv1(a))))
        return out + (x if self.shortcut is None else self.shortcut(a))


class WideResNet(ZooModel):
    def __init__(self, depth: int, widen: int, num_classes: int, in_channels: int):
        super().__init__()
        assert (depth - 4) % 6 == 0, "WRN depth is 6n+4"
        n = (depth - 4) // 6
        widths = [16, 16 * widen, 32 * widen, 64 * widen]
        self.conv1 = nn.Conv2d(in_channels, widths[0], 3, 1, 1, bias=False)
        self.stages = nn.ModuleList()
        cin = widths[0]
        for i, cout in enumerate(widths[1:]):
            stride = 1 if i == 0 else 2
            self.stages.append(nn.ModuleList([PreActBlock(cin if d == 0 else cout, cout, stride if d == 0 else 1) for d in range(n)]))
            cin = cout
        self.bn = nn.BatchNorm2d(cin)
        self.fc = nn.Linear(cin, num_classes)
        # The reference WRN has no dropout by default (dropRate=0), so none here.
        init_weights(self)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, Features]:
        x = self.conv1(x)
        stages, preact = [], []
        for stage in self.stages:
            # The activation of the previous stage (or of the stem) is this stage's first bn1.
            h = stage[0].bn1(x)
            preact.append(h)
            stages.append(F.relu(h))
            x = stage[0](x, h)
            for block in stage[1:]:
                x = block(x)
        h = self.bn(x)
        out = F.relu(h)
        preact.append(h)
        stages.append(out)
        pooled = pool_flatten(out)
        return self.fc(pooled), Features(stages, preact, pooled)

    def preact_bns(self) -> list[nn.Module | None]:
        return [stage[0].bn1 for stage in self.stages] + [self.bn]


def _register(name: str, depth: int, widen: int) -> None:
    @register_model(name)
    def factory(num_classes: int = 100, in_channels: int = 3) -> WideResNet:
        return WideResNet(depth, widen, num_classes, in_channels)


_register("wrn_16_2", 16, 2)
_register("wrn_40_2", 40, 2)
