"""The model protocol of smskd_search.models.base, checked on every registered model."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from smskd_search.models import MODELS, count_parameters, create_model, probe_shapes

# Benchmark parameter counts (RepDistiller / mdistiller at 100 classes, 3 channels).
CIFAR_PARAMS = {
    "resnet8x4": 1.23e6, "resnet32x4": 7.43e6, "resnet20": 0.28e6, "resnet56": 0.86e6, "resnet110": 1.74e6,
    "wrn_16_2": 0.70e6, "wrn_40_2": 2.26e6, "vgg8": 3.96e6, "vgg13": 9.46e6,
    "mobilenetv2": 0.81e6, "shufflenetv1": 0.95e6, "shufflenetv2": 1.36e6,
}
ALIASES = {"MobileNetV2": "mobilenetv2", "ShuffleV1": "shufflenetv1", "ShuffleV2": "shufflenetv2"}
CIFAR = set(CIFAR_PARAMS) | set(ALIASES)
NAMES = sorted(MODELS)


def input_shapes(name: str) -> list[tuple[int, int, int]]:
    return [(3, 32, 32), (1, 8, 8)] if name in CIFAR else [(1, 8, 8), (1, 28, 28)]


CASES = [(name, shape) for name in NAMES for shape in input_shapes(name)]


def build(name: str, shape: tuple[int, int, int], num_classes: int = 10):
    torch.manual_seed(0)
    return create_model(name, num_classes, in_channels=shape[0], image_size=shape[1])


def bn_state(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in model.state_dict().items()
            if k.rsplit(".", 1)[-1] in ("running_mean", "running_var", "num_batches_tracked")}


def test_zoo_is_registered():
    assert CIFAR <= set(MODELS)
    for alias, name in ALIASES.items():
        assert MODELS[alias] is MODELS[name]


@pytest.mark.parametrize("name,shape", CASES, ids=[f"{n}-{s[0]}x{s[1]}" for n, s in CASES])
def test_forward_matches_protocol(name, shape):
    model = build(name, shape).eval()
    x = torch.randn(2, *shape)
    with torch.no_grad():
        logits, feats = model(x)
    assert logits.shape == (2, 10)
    assert torch.isfinite(logits).all()
    assert len(feats.stages) == len(feats.preact) >= 2
    probe = probe_shapes(model, shape)
    assert tuple(tuple(f.shape[1:]) for f in feats.stages) == probe.stages
    assert tuple(tuple(f.shape[1:]) for f in feats.preact) == probe.preact == probe.stages
    assert feats.pooled.shape == (2, model.fc.in_features)
    bns = model.preact_bns()
    assert len(bns) == len(feats.preact)
    # Each stage is its preact after the final activation (ReLU), or the preact itself where the
    # stage ends linearly (MobileNetV2's bottlenecks, the WRN stem). Pre-activation networks (the
    # WRNs) expose raw group outputs as stages, and as preact the BN that activates them.
    for s, p, bn in zip(feats.stages, feats.preact, bns):
        preact_net = isinstance(bn, nn.BatchNorm2d) and bn.num_features == s.shape[1] and torch.allclose(p, bn(s))
        assert torch.equal(s, p) or torch.allclose(s, F.relu(p)) or (name.startswith("wrn") and preact_net)
    # The stem's preact carries negative values: it really is taken before the ReLU.
    assert (feats.preact[0] < 0).any()
    # Only the WRNs' stem output is no BN's (the peers' preact_feats[0] is the raw stem conv).
    assert bns[0] is not None or name.startswith("wrn")
    for bn, p in zip(bns, feats.preact):
        if bn is not None:
            assert isinstance(bn, nn.BatchNorm2d)
            assert bn.num_features == p.shape[1]
            assert any(bn is m for m in model.modules())


@pytest.mark.parametrize("training", [True, False])
@pytest.mark.parametrize("name", NAMES)
def test_probe_leaves_bn_stats_and_mode(name, training):
    shape = input_shapes(name)[0]
    model = build(name, shape).train(training)
    before = bn_state(model)
    assert before, "every zoo model has BatchNorm"
    probe_shapes(model, shape)
    assert model.training is training
    assert all(m.training is training for m in model.modules())
    after = bn_state(model)
    assert before.keys() == after.keys()
    for k in before:
        assert torch.equal(before[k], after[k]), k


@pytest.mark.parametrize("name", NAMES)
def test_train_forward_updates_each_bn_once(name):
    # Guards against a second pass through a BN per step (mdistiller's WRN preact does that).
    shape = input_shapes(name)[-1]
    model = build(name, shape).train()
    model(torch.randn(2, *shape))
    counts = {k: int(v) for k, v in bn_state(model).items() if k.endswith("num_batches_tracked")}
    assert counts and set(counts.values()) == {1}, counts


@pytest.mark.parametrize("name", sorted(CIFAR_PARAMS))
def test_parameter_counts_match_benchmarks(name):
    n = count_parameters(MODELS[name](num_classes=100, in_channels=3))
    assert abs(n - CIFAR_PARAMS[name]) / CIFAR_PARAMS[name] < 0.05, n


@pytest.mark.parametrize("name", NAMES)
def test_gradients_reach_first_conv(name):
    shape = input_shapes(name)[-1]
    model = build(name, shape).train()
    logits, _ = model(torch.randn(2, *shape))
    logits.sum().backward()
    first_conv = next(m for m in model.modules() if isinstance(m, nn.Conv2d))
    assert first_conv.in_channels == shape[0]
    g = first_conv.weight.grad
    assert g is not None and torch.isfinite(g).all() and g.abs().sum() > 0


@pytest.mark.parametrize("name", ["wrn_16_2", "wrn_40_2"])
@pytest.mark.parametrize("training", [False, True])
def test_wrn_features_are_the_raw_group_outputs(name, training):
    # The peers' WRN feats: [conv1(x), block1(.), block2(.), block3(.)], the residual sums before any
    # BN + ReLU; preact_feats: [conv1(x), block2[0].bn1(f1), block3[0].bn1(f2), bn1(f3)].
    model = build(name, (3, 32, 32)).train(training)
    x = torch.randn(4, 3, 32, 32)
    with torch.no_grad():
        logits, feats = model(x)
    assert len(feats.stages) == len(feats.preact) == 4
    # By hand, in eval mode so that the second pass through each BN sees the same statistics.
    model.eval()
    with torch.no_grad():
        f = [model.conv1(x)]
        for stage in model.stages:
            h = f[-1]
            for block in stage:
                h = block(h)
            f.append(h)
        bns = [model.stages[1][0].bn1, model.stages[2][0].bn1, model.bn]
        pre = [f[0]] + [bn(fi) for bn, fi in zip(bns, f[1:])]
        ref_logits = model.fc(torch.relu(model.bn(f[3])).mean((2, 3)))
    for got, want in zip(feats.stages, f):
        assert got.shape == want.shape
        if not training:
            assert torch.allclose(got, want, atol=1e-5)
    assert [tuple(t.shape[1:]) for t in feats.stages] == [(16, 32, 32), (model.stages[0][0].conv1.out_channels, 32, 32),
                                                          (model.stages[1][0].conv1.out_channels, 16, 16),
                                                          (model.stages[2][0].conv1.out_channels, 8, 8)]
    assert (feats.stages[3] < 0).any()  # a raw sum, not a ReLU output
    if training:
        # Batch statistics: each preact is its BN (on this batch) of the raw output.
        for k, bn in zip((1, 2, 3), bns):
            mean = feats.stages[k].mean((0, 2, 3), keepdim=True)
            var = feats.stages[k].var((0, 2, 3), unbiased=False, keepdim=True)
            norm = (feats.stages[k] - mean) / torch.sqrt(var + bn.eps) * bn.weight.view(1, -1, 1, 1) + bn.bias.view(1, -1, 1, 1)
            assert torch.allclose(feats.preact[k], norm, atol=1e-4)
        assert torch.equal(feats.preact[0], feats.stages[0])
    else:
        for got, want in zip(feats.preact, pre):
            assert torch.allclose(got, want, atol=1e-5)
        assert torch.allclose(logits, ref_logits, atol=1e-5)
    assert model.preact_bns() == [None, *bns]
