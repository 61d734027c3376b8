"""Pre-activation Wide ResNets (Zagoruyko & Komodakis 2016) as in RepDistiller / mdistiller.

Feature choice, as the peers (and the original AT code) tap them. In a pre-activation network a
group's output is a raw residual sum, activated only by the next block's ``bn1`` + ReLU (or the final
``bn`` + ReLU). ``stages`` are those raw sums: the stem conv's output, then each block group's output.
``preact`` is the stem output itself (no BN produces it), then for each group the BN that activates
it: the next group's first ``bn1``, or the final ``bn`` after the last group; ``preact_bns`` names
those BNs (what OFD's margins assume). The forward computes each such BN once and hands the result to
the block, so running statistics move exactly as in the plain network; mdistiller and RepDistiller
apply that ``bn1`` a second time for their pre-activation features, which in train mode updates its
statistics twice per step (their values are the same: one batch, the same batch statistics).
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
        stages, preact = [x], [x]
        h: torch.Tensor | None = None  # the first group's bn1 is not a tapped preact: its block computes it
        for k, stage in enumerate(self.stages):
            x = stage[0](x, h)
            for block in stage[1:]:
                x = block(x)
            stages.append(x)
            # The BN that activates this group's output: the next group's first bn1, or the final bn.
            h = self.stages[k + 1][0].bn1(x) if k + 1 < len(self.stages) else self.bn(x)
            preact.append(h)
        assert h is not None
        pooled = pool_flatten(F.relu(h))
        return self.fc(pooled), Features(stages, preact, pooled)

    def preact_bns(self) -> list[nn.Module | None]:
        return [None] + [stage[0].bn1 for stage in self.stages[1:]] + [self.bn]


def _register(name: str, depth: int, widen: int) -> None:
    @register_model(name)
    def factory(num_classes: int = 100, in_channels: int = 3) -> WideResNet:
        return WideResNet(depth, widen, num_classes, in_channels)


_register("wrn_16_2", 16, 2)
_register("wrn_40_2", 40, 2)
