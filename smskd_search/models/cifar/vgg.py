"""VGG with BatchNorm for CIFAR as in RepDistiller (vgg8_bn, vgg13_bn): five conv blocks, max-pools
after the first three, then a global average pool and one linear layer."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from smskd_search.models.base import Features, ZooModel, register_model
from smskd_search.models.cifar.common import init_weights, pool_flatten


def conv_block(cin: int, widths: list[int]) -> nn.Sequential:
    layers: list[nn.Module] = []
    for w in widths:
        layers += [nn.Conv2d(cin, w, 3, 1, 1), nn.BatchNorm2d(w), nn.ReLU(inplace=True)]
        cin = w
    # The block ends at its last BN so that the forward can keep the pre-ReLU tensor.
    return nn.Sequential(*layers[:-1])


class VGG(ZooModel):
    def __init__(self, cfg: list[list[int]], num_classes: int, in_channels: int):
        super().__init__()
        self.blocks = nn.ModuleList()
        cin = in_channels
        for widths in cfg:
            self.blocks.append(conv_block(cin, widths))
            cin = widths[-1]
        self.fc = nn.Linear(cin, num_classes)
        init_weights(self)
        # RepDistiller's classifier init
        nn.init.normal_(self.fc.weight, 0, 0.01)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, Features]:
        stages, preact = [], []
        for i, block in enumerate(self.blocks):
            # RepDistiller pools after blocks 0-2 (a 4th pool only for 64x64 inputs, dropped here).
            # A pool is skipped once the map is 1 pixel wide so that small inputs never shrink to
            # 0x0; 8x8 inputs go 8->4->2->1 and are pooled exactly as in the benchmark.
            if 1 <= i <= 3 and min(x.shape[-2:]) > 1:
                x = F.max_pool2d(x, 2, 2)
            pre = block(x)
            x = F.relu(pre)
            stages.append(x)
            preact.append(pre)
        pooled = pool_flatten(x)
        return self.fc(pooled), Features(stages, preact, pooled)

    def preact_bns(self) -> list[nn.Module | None]:
        return [block[-1] for block in self.blocks]


_CONFIGS = {
    "vgg8": [[64], [128], [256], [512], [512]],
    "vgg13": [[64, 64], [128, 128], [256, 256], [512, 512], [512, 512]],
}


def _register(name: str, cfg: list[list[int]]) -> None:
    @register_model(name)
    def factory(num_classes: int = 100, in_channels: int = 3) -> VGG:
        return VGG(cfg, num_classes, in_channels)


for _name, _cfg in _CONFIGS.items():
    _register(_name, _cfg)
