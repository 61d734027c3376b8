"""CIFAR ResNets (He et al. 2016, section 4.2) as in RepDistiller / mdistiller: a 3x3 stem and
three stages of BasicBlocks, the 2nd and 3rd starting with stride 2."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from smskd_search.models.base import Features, ZooModel, register_model, relu_stages
from smskd_search.models.cifar.common import init_weights, pool_flatten


class BasicBlock(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.shortcut = None
        if stride != 1 or cin != cout:
            self.shortcut = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Returns the pre-ReLU sum; the caller applies the ReLU so it can keep both."""
        out = self.bn2(self.conv2(F.relu(self.bn1(self.conv1(x)))))
        return out + (x if self.shortcut is None else self.shortcut(x))


class ResNet(ZooModel):
    def __init__(self, depth: int, widths: tuple[int, int, int, int], num_classes: int, in_channels: int):
        super().__init__()
        assert (depth - 2) % 6 == 0, "CIFAR ResNet depth is 6n+2"
        n = (depth - 2) // 6
        self.conv1 = nn.Conv2d(in_channels, widths[0], 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(widths[0])
        self.stages = nn.ModuleList()
        cin = widths[0]
        for i, cout in enumerate(widths[1:]):
            stride = 1 if i == 0 else 2
            self.stages.append(nn.Sequential(*[BasicBlock(cin if d == 0 else cout, cout, stride if d == 0 else 1) for d in range(n)]))
            cin = cout
        self.fc = nn.Linear(cin, num_classes)
        init_weights(self)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, Features]:
        out, stages, preact = relu_stages(self.bn1(self.conv1(x)), self.stages)
        pooled = pool_flatten(out)
        return self.fc(pooled), Features(stages, preact, pooled)

    def preact_bns(self) -> list[nn.Module | None]:
        # A stage's preact is bn2's output plus the shortcut, so bn2 only approximates its
        # statistics; mdistiller's OFD makes the same choice.
        return [self.bn1] + [stage[-1].bn2 for stage in self.stages]


_CONFIGS = {
    # name: (depth, widths stem/stage1/stage2/stage3)
    "resnet20": (20, (16, 16, 32, 64)),
    "resnet56": (56, (16, 16, 32, 64)),
    "resnet110": (110, (16, 16, 32, 64)),
    "resnet8x4": (8, (32, 64, 128, 256)),
    "resnet32x4": (32, (32, 64, 128, 256)),
}


def _register(name: str, depth: int, widths: tuple[int, int, int, int]) -> None:
    @register_model(name)
    def factory(num_classes: int = 100, in_channels: int = 3) -> ResNet:
        return ResNet(depth, widths, num_classes, in_channels)


for _name, (_depth, _widths) in _CONFIGS.items():
    _register(_name, _depth, _widths)
