"""torchvision's MobileNet-V2 with stage taps at each resolution.

Stages: the stem (32 channels, stride 2), then the blocks ending at strides 4, 8 and 16
(``features[1:4]``, ``[4:7]``, ``[7:14]``) and the rest with the 1x1 head to 1280 channels
(``features[14:]``, stride 32). The first three stages end in a linear bottleneck, so their preact is
the stage itself; the stem's and the last stage's preact is the BN output before the ReLU6.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
import torchvision
from torch import nn

from smskd_search.models.base import Features, ZooModel, register_model
from smskd_search.models.pool import adaptive_avg_pool2d

_STAGES = ((1, 4), (4, 7), (7, 14), (14, 19))


def _conv_bn_pre(block: nn.Sequential, x: torch.Tensor) -> torch.Tensor:
    """torchvision's Conv2dNormActivation (conv, BN, ReLU6) stopped before the ReLU6."""
    return block[1](block[0](x))


class TorchvisionMobileNetV2(ZooModel):
    """torchvision's MobileNet-V2 returning ``(logits, Features)``; ``fc`` is its classifier's Linear.

    Args:
        net: The torchvision MobileNetV2 whose modules this model takes over.
        in_channels: Input channels; other than 3, the stem convolution is replaced by a freshly
            initialised one with that many inputs.
    """

    def __init__(self, net: torchvision.models.MobileNetV2, in_channels: int = 3):
        super().__init__()
        self.features = net.features
        self.classifier = net.classifier
        if in_channels != 3:
            old = self.features[0][0]
            self.features[0][0] = nn.Conv2d(in_channels, old.out_channels, old.kernel_size, old.stride,
                                            old.padding, bias=False)
            nn.init.kaiming_normal_(self.features[0][0].weight, mode="fan_out")
        self.input_shape = (in_channels, 224, 224)

    @property
    def fc(self) -> nn.Linear:
        return self.classifier[-1]

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, Features]:
        pre = _conv_bn_pre(self.features[0], x)
        out = F.relu6(pre)
        stages, preact = [out], [pre]
        for a, b in _STAGES:
            for i in range(a, b - 1):
                out = self.features[i](out)
            last = self.features[b - 1]
            if b == len(self.features):
                pre = _conv_bn_pre(last, out)
                out = F.relu6(pre)
            else:
                out = pre = last(out)
            stages.append(out)
            preact.append(pre)
        pooled = torch.flatten(adaptive_avg_pool2d(out, 1), 1)
        return self.classifier(pooled), Features(stages, preact, pooled)

    def preact_bns(self) -> list[nn.Module | None]:
        # A bottleneck stage's preact also carries its skip, so its last BN only approximates it.
        bns: list[nn.Module | None] = [self.features[0][1]]
        for _, b in _STAGES[:-1]:
            bns.append(self.features[b - 1].conv[-1])
        bns.append(self.features[-1][1])
        return bns


@register_model("mobilenet_v2")
def mobilenet_v2(num_classes: int = 1000, in_channels: int = 3) -> TorchvisionMobileNetV2:
    return TorchvisionMobileNetV2(torchvision.models.mobilenet_v2(weights=None, num_classes=num_classes), in_channels)
