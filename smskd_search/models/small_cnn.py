"""Plain CNNs for small images (digits 8x8, Fashion-MNIST 28x28): a ~1M-parameter teacher and
students 10x to 2500x smaller, all with the same stem + 3 stages layout as the CIFAR zoo."""

from __future__ import annotations

import torch
from torch import nn

from smskd_search.models.base import Features, ZooModel, register_model, relu_stages
from smskd_search.models.pool import adaptive_avg_pool2d


class ConvBN(nn.Sequential):
    def __init__(self, cin: int, cout: int, stride: int = 1):
        super().__init__(nn.Conv2d(cin, cout, 3, stride, 1, bias=False), nn.BatchNorm2d(cout))


class SmallCNN(ZooModel):
    def __init__(self, widths: tuple[int, int, int, int], depth: int, num_classes: int, in_channels: int):
        super().__init__()
        self.stem = ConvBN(in_channels, widths[0])
        self.stages = nn.ModuleList()
        cin = widths[0]
        for i, cout in enumerate(widths[1:]):
            blocks = [ConvBN(cin if d == 0 else cout, cout, 2 if (i > 0 and d == 0) else 1) for d in range(depth)]
            self.stages.append(nn.ModuleList(blocks))
            cin = cout
        self.fc = nn.Linear(cin, num_classes)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, Features]:
        out, stages, preact = relu_stages(self.stem(x), self.stages)
        pooled = torch.flatten(adaptive_avg_pool2d(out, 1), 1)
        return self.fc(pooled), Features(stages, preact, pooled)

    def preact_bns(self) -> list[nn.Module | None]:
        return [self.stem[1]] + [blocks[-1][1] for blocks in self.stages]


_SIZES = {
    # name: (widths stem/stage1/stage2/stage3, convs per stage)  ~parameters at 10 classes, 1 channel
    "cnn_large": ((32, 64, 128, 256), 2),  # 1.16M
    "cnn_medium": ((16, 32, 64, 128), 2),  # 0.29M
    "cnn_small": ((8, 16, 32, 64), 1),  # 25k
    "cnn_tiny": ((4, 8, 16, 32), 1),  # 6.5k
    "cnn_micro": ((4, 4, 8, 16), 1),  # 1.8k
    # The default digits student: a 4-d embedding is a real bottleneck, so the teacher has
    # something to teach (about 70% val alone vs about 78% with KD at 10 epochs, lr 0.05).
    "cnn_nano": ((2, 4, 4, 4), 1),  # 456
    # The default digits student since the equal-budget default: the same with a 6-d embedding, whose
    # single methods' seed noise is small enough to tell plans apart (benchmarks/RESULTS.md, section 6).
    "cnn_nano6": ((2, 4, 4, 6), 1),  # 552
}


def _make(name: str, widths: tuple[int, int, int, int], depth: int) -> None:
    @register_model(name)
    def factory(num_classes: int = 10, in_channels: int = 1) -> SmallCNN:
        return SmallCNN(widths, depth, num_classes, in_channels)


for _name, (_widths, _depth) in _SIZES.items():
    _make(_name, _widths, _depth)
