"""Adaptive average pooling that stays legal under PyTorch's deterministic algorithms.

``F.adaptive_avg_pool2d`` has no deterministic CUDA backward: with ``torch.use_deterministic_algorithms``
on (``--deterministic`` on a GPU) it raises. Where the output size divides the input's, the adaptive
windows are the plain ``avg_pool2d`` windows (kernel = stride = the ratio), whose backward is
deterministic; that form is used there, and only there, so CPU runs and default GPU runs compute
exactly what they did.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def adaptive_avg_pool2d(x: torch.Tensor, size: int | tuple[int, int]) -> torch.Tensor:
    """``F.adaptive_avg_pool2d(x, size)``; see the module docstring for the deterministic case."""
    oh, ow = (size, size) if isinstance(size, int) else (int(size[0]), int(size[1]))
    h, w = x.shape[-2], x.shape[-1]
    if x.is_cuda and torch.are_deterministic_algorithms_enabled() and h % oh == 0 and w % ow == 0:
        return F.avg_pool2d(x, (h // oh, w // ow))
    return F.adaptive_avg_pool2d(x, (oh, ow))
