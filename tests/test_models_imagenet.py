"""The ImageNet zoo (torchvision's architectures) against torchvision itself: same parameters, same
state-dict keys, same logits; the feature taps at 224x224 and their pre-activations."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
import torchvision
from torch import nn

from smskd_search.models import count_parameters, create_model, probe_shapes

NAMES = ["resnet18", "resnet34", "resnet50", "mobilenet_v2"]

# Per-sample stage shapes at 224x224 (mdistiller's ImageNet layout for the ResNets).
STAGES_224 = {
    "resnet18": [(64, 112, 112), (64, 56, 56), (128, 28, 28), (256, 14, 14), (512, 7, 7)],
    "resnet34": [(64, 112, 112), (64, 56, 56), (128, 28, 28), (256, 14, 14), (512, 7, 7)],
    "resnet50": [(64, 112, 112), (256, 56, 56), (512, 28, 28), (1024, 14, 14), (2048, 7, 7)],
    "mobilenet_v2": [(32, 112, 112), (24, 56, 56), (32, 28, 28), (96, 14, 14), (1280, 7, 7)],
}
# torchvision's published parameter counts at 1000 classes (its weights' meta "num_params").
PUBLISHED = {"resnet18": 11_689_512, "resnet34": 21_797_672, "resnet50": 25_557_032, "mobilenet_v2": 3_504_872}


@pytest.mark.parametrize("name", NAMES)
def test_state_dict_and_parameters_are_torchvisions(name):
    torch.manual_seed(0)
    ours = create_model(name, 1000, 3, 224)
    theirs = getattr(torchvision.models, name)(weights=None)
    assert count_parameters(ours) == count_parameters(theirs) == PUBLISHED[name]
    assert list(ours.state_dict()) == list(theirs.state_dict())
    for k, v in theirs.state_dict().items():
        assert ours.state_dict()[k].shape == v.shape, k


@pytest.mark.parametrize("name", NAMES)
def test_logits_equal_torchvisions_forward(name):
    torch.manual_seed(0)
    theirs = getattr(torchvision.models, name)(weights=None, num_classes=10).eval()
    ours = create_model(name, 10, 3, 64).eval()
    # Loading torchvision's state dict as it is: the path a pretrained teacher takes.
    ours.load_state_dict(theirs.state_dict())
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        logits, feats = ours(x)
        expected = theirs(x)
    assert torch.equal(logits, expected)
    assert torch.equal(ours.fc(feats.pooled), logits)  # eval: the classifier's dropout is the identity
    assert feats.pooled.shape == (2, ours.fc.in_features)


@pytest.mark.parametrize("name", NAMES)
def test_taps_at_224(name):
    model = create_model(name, 1000, 3, 224)
    shapes = probe_shapes(model, (3, 224, 224))
    assert [tuple(s) for s in shapes.stages] == STAGES_224[name]
    assert shapes.preact == shapes.stages
    assert shapes.pooled == (STAGES_224[name][-1][0],)
    assert shapes.logits == (1000,)


@pytest.mark.parametrize("name", NAMES)
def test_stages_are_their_preact_activated(name):
    torch.manual_seed(0)
    model = create_model(name, 10, 3, 64).eval()
    with torch.no_grad():
        _, feats = model(torch.randn(2, 3, 64, 64))
    for i, (s, p) in enumerate(zip(feats.stages, feats.preact)):
        linear_bottleneck = name == "mobilenet_v2" and 0 < i < len(feats.stages) - 1
        if linear_bottleneck:
            assert s is p
        else:
            act = F.relu6(p) if name == "mobilenet_v2" else F.relu(p)
            assert torch.equal(s, act)
            assert (p < 0).any(), f"stage {i}: preact has no negatives, so it is not before the activation"
    bns = model.preact_bns()
    assert len(bns) == len(feats.preact)
    for bn, p in zip(bns, feats.preact):
        assert isinstance(bn, nn.BatchNorm2d) and bn.num_features == p.shape[1]
        assert any(bn is m for m in model.modules())
    # The stems' preact is exactly their BN's output.
    with torch.no_grad():
        x = torch.randn(2, 3, 64, 64)
        stem_conv = model.conv1 if name != "mobilenet_v2" else model.features[0][0]
        assert torch.equal(model(x)[1].preact[0], bns[0](stem_conv(x)))


def test_one_channel_input_replaces_only_the_stem():
    model = create_model("resnet18", 10, 1, 32)
    reference = torchvision.models.resnet18(weights=None, num_classes=10)
    assert model.conv1.in_channels == 1
    assert count_parameters(reference) - count_parameters(model) == 64 * 2 * 7 * 7
    logits, _ = model(torch.randn(2, 1, 32, 32))
    assert logits.shape == (2, 10)
