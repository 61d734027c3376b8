"""torchvision's ResNet-18/34/50 with mdistiller's ImageNet feature layout.

Stages (mdistiller's ``feats``): the stem after its ReLU and before the max-pool (112x112 at 224),
then each of the four layers' outputs; ``preact`` holds the same tensors before their final ReLU (the
stem's BN output; each layer's last residual sum). The residual sums are computed here from the
block's own modules rather than by calling the block, because torchvision's blocks apply the ReLU
in place and would leave no pre-activation to read.
"""

from __future__ import annotations

import torch
import torchvision
from torch import nn
from torchvision.models.resnet import BasicBlock, Bottleneck

from smskd_search.models.base import Features, ZooModel, register_model
from smskd_search.models.pool import adaptive_avg_pool2d


def residual_sum(block: BasicBlock | Bottleneck, x: torch.Tensor) -> torch.Tensor:
    """A torchvision BasicBlock's or Bottleneck's output before its final ReLU."""
    identity = x if block.downsample is None else block.downsample(x)
    out = torch.relu(block.bn1(block.conv1(x)))
    out = block.bn2(block.conv2(out))
    if isinstance(block, Bottleneck):
        out = block.bn3(block.conv3(torch.relu(out)))
    return out + identity


class TorchvisionResNet(ZooModel):
    """A torchvision ResNet returning ``(logits, Features)``.

    Args:
        net: The torchvision ResNet whose modules this model takes over.
        in_channels: Input channels; other than 3, the stem convolution is replaced by a freshly
            initialised one with that many inputs (pretrained weights then no longer fit it).
    """

    def __init__(self, net: torchvision.models.ResNet, in_channels: int = 3):
        super().__init__()
        # torchvision's modules under torchvision's names, in its order: its state-dict keys.
        self.conv1, self.bn1, self.relu, self.maxpool = net.conv1, net.bn1, net.relu, net.maxpool
        self.layer1, self.layer2, self.layer3, self.layer4 = net.layer1, net.layer2, net.layer3, net.layer4
        self.avgpool, self.fc = net.avgpool, net.fc
        if in_channels != 3:
            old = self.conv1
            self.conv1 = nn.Conv2d(in_channels, old.out_channels, old.kernel_size, old.stride, old.padding, bias=False)
            nn.init.kaiming_normal_(self.conv1.weight, mode="fan_out", nonlinearity="relu")
        self.input_shape = (in_channels, 224, 224)

    def _layers(self) -> list[nn.Sequential]:  # of BasicBlocks or Bottlenecks
        return [self.layer1, self.layer2, self.layer3, self.layer4]

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, Features]:
        pre = self.bn1(self.conv1(x))
        out = torch.relu(pre)
        stages, preact = [out], [pre]
        out = self.maxpool(out)
        for layer in self._layers():
            for block in layer:
                pre = residual_sum(block, out)
                out = torch.relu(pre)
            stages.append(out)
            preact.append(pre)
        pooled = torch.flatten(adaptive_avg_pool2d(out, 1), 1)
        return self.fc(pooled), Features(stages, preact, pooled)

    def preact_bns(self) -> list[nn.Module | None]:
        # A layer's preact is its last block's final BN plus the shortcut, so that BN only
        # approximates its statistics; mdistiller's get_bn_before_relu makes the same choice.
        last = [layer[-1] for layer in self._layers()]
        return [self.bn1] + [b.bn3 if isinstance(b, Bottleneck) else b.bn2 for b in last]


def _register(name: str) -> None:
    builder = getattr(torchvision.models, name)

    @register_model(name)
    def factory(num_classes: int = 1000, in_channels: int = 3) -> TorchvisionResNet:
        return TorchvisionResNet(builder(weights=None, num_classes=num_classes), in_channels)


for _name in ("resnet18", "resnet34", "resnet50"):
    _register(_name)
