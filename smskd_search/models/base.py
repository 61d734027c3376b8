"""The model protocol every zoo model follows, the model registry and the feature-shape probe.

``model(x)`` returns ``(logits, Features)``:

- ``stages``: the stem output then each stage's output (after its final activation), so
  ``stages[0]`` is the stem and ``stages[-1]`` the last stage (mdistiller's ``feats`` layout);
  pre-activation networks (the WRNs) expose, as the peers do, the raw group outputs instead;
- ``preact``: the same tensors before their final activation (for OFD and ReviewKD); in
  pre-activation networks, the output of the BN that activates each group's output;
- ``pooled``: the penultimate vector that the classifier reads.

Models also expose ``preact_bns()``: for each entry of ``preact``, the BatchNorm whose output it is
(or None), so that methods such as OFD can read the teacher's BN statistics.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass

import torch
from torch import nn


@dataclass
class Features:
    stages: list[torch.Tensor]
    preact: list[torch.Tensor]
    pooled: torch.Tensor


@dataclass(frozen=True)
class FeatureShapes:
    """Per-sample shapes (no batch dimension) of a model's features and logits."""

    stages: tuple[tuple[int, ...], ...]
    preact: tuple[tuple[int, ...], ...]
    pooled: tuple[int, ...]
    logits: tuple[int, ...]


class ZooModel(nn.Module):
    """Base for zoo models: subclasses implement ``forward(x) -> (logits, Features)``."""

    def preact_bns(self) -> list[nn.Module | None]:
        return [None] * len(self.probe_shapes().preact)

    def probe_shapes(self, input_shape: tuple[int, int, int] | None = None) -> FeatureShapes:
        return probe_shapes(self, input_shape or self.input_shape)

    input_shape: tuple[int, int, int] = (3, 32, 32)


def relu_stages(stem_pre: torch.Tensor,
                stages: Iterable[Iterable[nn.Module]]) -> tuple[torch.Tensor, list[torch.Tensor], list[torch.Tensor]]:
    """The common body of models whose blocks return pre-ReLU outputs: ReLU after the stem and
    after every block; returns the last output, the stage outputs and their pre-activations."""
    out = torch.relu(stem_pre)
    outs, pres = [out], [stem_pre]
    for blocks in stages:
        for block in blocks:
            pre = block(out)
            out = torch.relu(pre)
        outs.append(out)
        pres.append(pre)
    return out, outs, pres


ModelFactory = Callable[..., ZooModel]
MODELS: dict[str, ModelFactory] = {}


def register_model(name: str) -> Callable[[ModelFactory], ModelFactory]:
    def deco(fn: ModelFactory) -> ModelFactory:
        if name in MODELS:
            raise KeyError(f"model {name!r} registered twice")
        MODELS[name] = fn
        return fn

    return deco


def create_model(name: str, num_classes: int, in_channels: int = 3, image_size: int = 32) -> ZooModel:
    if name not in MODELS:
        raise KeyError(f"unknown model {name!r}; known: {', '.join(sorted(MODELS))}")
    model = MODELS[name](num_classes=num_classes, in_channels=in_channels)
    model.input_shape = (in_channels, image_size, image_size)
    return model


@torch.no_grad()
def probe_shapes(model: nn.Module, input_shape: tuple[int, int, int]) -> FeatureShapes:
    """Feature shapes from one forward pass in eval mode.

    Eval mode and no_grad, then the previous mode is restored: BN running statistics are left
    bit-identical (the probe of mdistiller runs in train mode and moves them).
    """
    was_training = model.training
    model.eval()
    try:
        param = next(model.parameters(), None)
        device = param.device if param is not None else torch.device("cpu")
        dtype = param.dtype if param is not None else torch.float32
        x = torch.zeros((2, *input_shape), device=device, dtype=dtype)
        logits, feats = model(x)
    finally:
        model.train(was_training)
    return FeatureShapes(
        stages=tuple(tuple(f.shape[1:]) for f in feats.stages),
        preact=tuple(tuple(f.shape[1:]) for f in feats.preact),
        pooled=tuple(feats.pooled.shape[1:]),
        logits=tuple(logits.shape[1:]),
    )


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())
