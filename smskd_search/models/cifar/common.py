"""Helpers shared by the CIFAR zoo."""

from __future__ import annotations

import torch
from torch import nn

from smskd_search.models.pool import adaptive_avg_pool2d


def pool_flatten(x: torch.Tensor) -> torch.Tensor:
    # Adaptive, not the benchmarks' fixed AvgPool2d(8)/(4): inputs range from 8x8 to 32x32, and at
    # 32x32 this averages the same window as the fixed pool did.
    return torch.flatten(adaptive_avg_pool2d(x, 1), 1)


def init_weights(model: nn.Module) -> None:
    """The benchmark codebases' init: He (fan_out) convs, unit BN, zero biases."""
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.BatchNorm2d):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)
        elif isinstance(m, nn.Linear):
            nn.init.zeros_(m.bias)
