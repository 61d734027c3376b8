"""KD method library: each loss against an independent computation, gradients, one training step on
the pairs of the zoo a user is likely to meet, and a five-method plan end to end.

The reference computations below are written from the papers' formulas with plain tensor arithmetic
(loops, explicit BN and conv via torch primitives, float64) and never call smskd_search code; they
read only the trained weights of a method's extra modules.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
import yaml
from torch import nn
from torch.testing import assert_close

from smskd_search.methods import METHODS, KDBatch, MethodContext, build_method
from smskd_search.models import MODELS, Features, FeatureShapes, create_model, probe_shapes

DISTILLERS = ["kd", "dkd", "fitnet", "at", "sp", "vid", "rkd", "pkt", "nst", "cc", "crd", "ofd", "reviewkd"]
NEW = ["sp", "vid", "rkd", "pkt", "nst", "cc", "crd", "ofd", "reviewkd"]


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    yield


def test_registry_has_all_methods():
    assert set(DISTILLERS) | {"ce"} <= set(METHODS)
    assert len(DISTILLERS) == 13 and len(set(DISTILLERS) | {"ce"}) == 14
    for name in NEW:
        cls = METHODS[name]
        assert cls.family in ("response", "feature", "relation")
        assert cls.reference and cls.name == name
        assert cls.Params().ce_weight == 1.0


# --------------------------------------------------------------------------------------------------
# Synthetic features: student stem + 3 stages at 8/8/4/2, teacher twice as wide and twice as large.

S_SHAPES = FeatureShapes(
    stages=((4, 8, 8), (4, 8, 8), (8, 4, 4), (16, 2, 2)),
    preact=((4, 8, 8), (4, 8, 8), (8, 4, 4), (16, 2, 2)),
    pooled=(16,), logits=(10,),
)
T_SHAPES = FeatureShapes(
    stages=((8, 16, 16), (16, 16, 16), (32, 8, 8), (64, 4, 4)),
    preact=((8, 16, 16), (16, 16, 16), (32, 8, 8), (64, 4, 4)),
    pooled=(64,), logits=(10,),
)


class FakeTeacher(nn.Module):
    """Stands in for a zoo teacher in OFD: BNs before its pre-activations, one of them missing."""

    def __init__(self):
        super().__init__()
        self.bns = nn.ModuleList(nn.BatchNorm2d(c) for c in (8, 16, 32, 64))
        with torch.no_grad():
            for bn in self.bns:
                bn.weight.copy_(torch.rand(bn.num_features) * 1.5 + 0.25)
                bn.bias.copy_(torch.randn(bn.num_features))
            # Channel 0 of stage 1: P(x < 0) = Phi(-4) < 1e-3, the OFD code's -3 gamma branch.
            self.bns[1].weight[0], self.bns[1].bias[0] = 0.5, 2.0
        self.eval()

    def preact_bns(self):
        return [self.bns[0], self.bns[1], None, self.bns[3]]


def cycle_labels(n: int, classes: int = 10) -> torch.Tensor:
    """Training labels 0, 1, ..., classes - 1, 0, 1... (CRD's negatives are the other classes)."""
    return torch.arange(n) % classes


def make_ctx(num_train: int = 50, teacher: nn.Module | None = None, labels: torch.Tensor | None = None) -> MethodContext:
    return MethodContext(S_SHAPES, T_SHAPES, teacher or FakeTeacher(), 10, num_train,
                         cycle_labels(num_train) if labels is None else labels)


def random_features(shapes: FeatureShapes, b: int, gen: torch.Generator, grad: bool = False) -> Features:
    stages = [torch.randn(b, *s, generator=gen).relu() for s in shapes.stages]
    preact = [torch.randn(b, *s, generator=gen) for s in shapes.preact]
    pooled = torch.randn(b, *shapes.pooled, generator=gen).abs()
    if grad:
        for t in stages + preact + [pooled]:
            t.requires_grad_(True)
    return Features(stages, preact, pooled)


def make_batch(b: int = 6, seed: int = 1, grad: bool = False, stage_epoch: int = 0,
               indices: torch.Tensor | None = None) -> KDBatch:
    gen = torch.Generator().manual_seed(seed)
    s_logits = (torch.randn(b, 10, generator=gen) * 3).requires_grad_(grad)
    t_logits = torch.randn(b, 10, generator=gen) * 3
    labels = torch.randint(0, 10, (b,), generator=gen)
    return KDBatch(s_logits, random_features(S_SHAPES, b, gen, grad), t_logits, random_features(T_SHAPES, b, gen),
                   labels, indices, stage_epoch)


def d(t: torch.Tensor) -> torch.Tensor:
    return t.detach().double()


# Plain building blocks (float64).

def softmax(v: torch.Tensor) -> torch.Tensor:
    e = torch.exp(v - v.max())
    return e / e.sum()


def bn_train(x: torch.Tensor, bn: nn.BatchNorm2d) -> torch.Tensor:
    """BatchNorm in training mode: batch mean and biased batch variance per channel."""
    mean = x.mean(dim=(0, 2, 3), keepdim=True)
    var = ((x - mean) ** 2).mean(dim=(0, 2, 3), keepdim=True)
    return (x - mean) / torch.sqrt(var + bn.eps) * d(bn.weight).view(1, -1, 1, 1) + d(bn.bias).view(1, -1, 1, 1)


def conv1x1(x: torch.Tensor, conv: nn.Conv2d) -> torch.Tensor:
    w = d(conv.weight)[:, :, 0, 0]
    y = torch.einsum("oc,bchw->bohw", w, x)
    return y if conv.bias is None else y + d(conv.bias).view(1, -1, 1, 1)


def block_mean(x: torch.Tensor, hw: tuple[int, int]) -> torch.Tensor:
    """Average over non-overlapping blocks down to ``hw`` (integer factors)."""
    fh, fw = x.shape[-2] // hw[0], x.shape[-1] // hw[1]
    return x.reshape(*x.shape[:-2], hw[0], fh, hw[1], fw).mean(dim=(-3, -1))


def upsample_nearest(x: torch.Tensor, hw: tuple[int, int]) -> torch.Tensor:
    return x.repeat_interleave(hw[0] // x.shape[-2], -2).repeat_interleave(hw[1] // x.shape[-1], -1)


def common(a: torch.Tensor, b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    hw = (min(a.shape[-2], b.shape[-2]), min(a.shape[-1], b.shape[-1]))
    return block_mean(a, hw), block_mean(b, hw)


def smooth_l1(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    r = (x - y).abs()
    return torch.where(r < 1, 0.5 * r * r, r - 0.5).mean()


# Student stage i pairs with teacher stage i here (same stage counts, stem skipped).
PAIRS = [(1, 1), (2, 2), (3, 3)]


# --------------------------------------------------------------------------------------------------
# Golden values, response methods.

def test_kd_hand_value_with_t_squared():
    # s uniform, t/T = [ln 3, 0]: p_t = [3/4, 1/4], p_s = [1/2, 1/2],
    # KL = 3/4 ln(3/2) + 1/4 ln(1/2) = 0.1308120; times T^2 = 16 and weight 0.9: 1.883693.
    m = build_method("kd", {}, make_ctx())
    s = torch.zeros(1, 2)
    t = torch.tensor([[4 * math.log(3.0), 0.0]])
    feats = random_features(S_SHAPES, 1, torch.Generator().manual_seed(0))
    batch = KDBatch(s, feats, t, feats, torch.tensor([0]), None, 0)
    expected = 0.9 * 16 * (0.75 * math.log(1.5) + 0.25 * math.log(0.5))
    assert abs(expected - 1.883693) < 1e-6
    assert_close(m(batch).double(), torch.tensor(expected, dtype=torch.float64), rtol=1e-5, atol=1e-7)


def test_kd_against_plain_loop():
    batch = make_batch()
    for T, w in ((4.0, 0.9), (2.0, 1.0)):
        m = build_method("kd", {"T": T, "weight": w}, make_ctx())
        total = 0.0
        for i in range(batch.labels.shape[0]):
            p_s, p_t = softmax(d(batch.s_logits[i]) / T), softmax(d(batch.t_logits[i]) / T)
            total += (p_t * torch.log(p_t / p_s)).sum() * T * T
        assert_close(m(batch).double(), w * total / batch.labels.shape[0], rtol=1e-5, atol=1e-6)


def plain_dkd(s, t, y, alpha, beta, T):
    total = 0.0
    for i in range(y.shape[0]):
        g = int(y[i])
        p_s, p_t = softmax(d(s[i]) / T), softmax(d(t[i]) / T)
        b_s = torch.stack([p_s[g], 1 - p_s[g]])
        b_t = torch.stack([p_t[g], 1 - p_t[g]])
        tckd = (b_t * torch.log(b_t / b_s)).sum()
        others = [c for c in range(s.shape[1]) if c != g]
        q_s, q_t = softmax(d(s[i, others]) / T), softmax(d(t[i, others]) / T)
        nckd = (q_t * torch.log(q_t / q_s)).sum()
        total += (alpha * tckd + beta * nckd) * T * T
    return total / y.shape[0]


def test_dkd_against_plain_loop_and_stage_relative_warmup():
    m = build_method("dkd", {}, make_ctx())
    full = plain_dkd(make_batch().s_logits, make_batch().t_logits, make_batch().labels, 1.0, 8.0, 4.0)
    # The warm-up counts from the stage start: its first epoch gets 1/20, its 20th the full weight.
    for stage_epoch, factor in ((0, 1 / 20), (9, 10 / 20), (19, 1.0), (50, 1.0)):
        got = m(make_batch(stage_epoch=stage_epoch)).double()
        assert_close(got, factor * full, rtol=1e-5, atol=1e-6)


# --------------------------------------------------------------------------------------------------
# Golden values, feature methods.

def test_fitnet_against_plain_regressor():
    m = build_method("fitnet", {}, make_ctx())
    batch = make_batch()
    # Middle stage (index 2): student 8x4x4 -> teacher 32x8x8, a 2x up-projection (ConvTranspose 4/2/1).
    conv, bn = m.regressor.conv, m.regressor.bn
    y = F.conv_transpose2d(d(batch.s_feats.stages[2]), d(conv.weight), d(conv.bias), stride=2, padding=1)
    y = bn_train(y, bn).relu()
    expected = 100.0 * ((y - d(batch.t_feats.stages[2])) ** 2).mean()
    assert_close(m(batch).double(), expected, rtol=1e-5, atol=1e-6)


def fitnet_on(s_shape: tuple[int, int, int], t_shape: tuple[int, int, int]):
    """FitNets with its hint at stage 1 of synthetic shapes (student s_shape, teacher t_shape)."""
    ss = FeatureShapes(stages=(s_shape, s_shape), preact=(s_shape, s_shape), pooled=(s_shape[0],), logits=(10,))
    ts = FeatureShapes(stages=(t_shape, t_shape), preact=(t_shape, t_shape), pooled=(t_shape[0],), logits=(10,))
    return build_method("fitnet", {"hint_layer": 1}, MethodContext(ss, ts, FakeTeacher(), 10, 50))


@pytest.mark.parametrize("s_hw,t_hw,kind,kernel,stride,padding", [
    (8, 8, nn.Conv2d, (1, 1), (1, 1), (0, 0)),        # equal sizes: 1 + 8 - 8 = 1
    (6, 4, nn.Conv2d, (3, 3), (1, 1), (0, 0)),        # larger, not 2x: "valid" conv 1 + 6 - 4 = 3
    (8, 4, nn.Conv2d, (3, 3), (2, 2), (1, 1)),        # twice as large
    (4, 8, nn.ConvTranspose2d, (4, 4), (2, 2), (1, 1)),  # half as large
])
def test_fitnet_regressor_is_the_peers_conv(s_hw, t_hw, kind, kernel, stride, padding):
    m = fitnet_on((5, s_hw, s_hw), (7, t_hw, t_hw))
    conv = m.regressor.conv
    assert type(conv) is kind and (conv.in_channels, conv.out_channels) == (5, 7)
    assert conv.kernel_size == kernel and conv.stride == stride and conv.padding == padding
    assert conv.bias is not None and not m.regressor.pre_resize
    assert m.regressor.use_relu  # the peers' ConvReg(use_relu=True): ReLU after the BN
    b = 4
    gen = torch.Generator().manual_seed(2)
    f_s = torch.randn(b, 5, s_hw, s_hw, generator=gen)
    f_t = torch.randn(b, 7, t_hw, t_hw, generator=gen)
    feats_s, feats_t = Features([f_s, f_s], [f_s, f_s], f_s.mean((2, 3))), Features([f_t, f_t], [f_t, f_t], f_t.mean((2, 3)))
    batch = KDBatch(torch.zeros(b, 10), feats_s, torch.zeros(b, 10), feats_t, torch.zeros(b, dtype=torch.long), None, 0)
    if kind is nn.ConvTranspose2d:
        y = F.conv_transpose2d(d(f_s), d(conv.weight), d(conv.bias), stride=2, padding=1)
    else:
        y = F.conv2d(d(f_s), d(conv.weight), d(conv.bias), stride=stride, padding=padding)
    assert y.shape == (b, 7, t_hw, t_hw)
    expected = 100.0 * ((bn_train(y, m.regressor.bn).relu() - d(f_t)) ** 2).mean()
    assert_close(m(batch).double(), expected, rtol=1e-5, atol=1e-6)


def test_fitnet_regressor_resizes_a_smaller_student_first():
    # Student smaller, not by 2x (the peers raise): bilinear resize to the teacher's size, then the
    # equal-size 1x1 conv.
    m = fitnet_on((5, 3, 3), (7, 8, 8))
    conv = m.regressor.conv
    assert m.regressor.pre_resize and type(conv) is nn.Conv2d and conv.kernel_size == (1, 1)
    f_s = torch.randn(4, 5, 3, 3)
    up = F.interpolate(d(f_s), size=(8, 8), mode="bilinear", align_corners=False)
    y = bn_train(conv1x1(up, conv), m.regressor.bn).relu()
    assert_close(m.regressor(f_s).double(), y, rtol=1e-5, atol=1e-6)


def test_fitnet_regressor_size_on_resnet8x4_from_resnet32x4():
    if "resnet8x4" not in MODELS:
        pytest.skip("CIFAR zoo not registered yet")
    t_shapes = probe_shapes(create_model("resnet32x4", 100, 3, 32), (3, 32, 32))
    s_shapes = probe_shapes(create_model("resnet8x4", 100, 3, 32), (3, 32, 32))
    m = build_method("fitnet", {}, MethodContext(s_shapes, t_shapes, FakeTeacher(), 100, 50))
    # The hint is stage index 2 of stem + 3 stages, the peers' HINT_LAYER 2 / --hint_layer 2: the
    # second stage's output, 128 x 16 x 16 in both models.
    assert (m.s_idx, m.t_idx) == (2, 2)
    assert s_shapes.stages[2] == t_shapes.stages[2] == (128, 16, 16)
    # The peers' ConvReg at equal sizes: Conv2d(128, 128, kernel 1 + 16 - 16 = 1) with bias, then
    # BatchNorm2d(128): 128*128*1*1 + 128 + 2*128 = 16,384 + 128 + 256 = 16,768 parameters (the old
    # 3x3 conv: 128*128*9 + 128 + 256 = 147,840).
    assert sum(p.numel() for p in m.regressor.parameters()) == 16_768
    assert m.regressor.conv.kernel_size == (1, 1) and m.regressor.conv.padding == (0, 0)


def test_at_against_plain():
    m = build_method("at", {}, make_ctx())
    batch = make_batch()
    total = 0.0
    for i, j in PAIRS:
        f_s, f_t = common(d(batch.s_feats.stages[i]), d(batch.t_feats.stages[j]))  # pool, then attention
        a_s = (f_s**2).mean(1).flatten(1)
        a_t = (f_t**2).mean(1).flatten(1)
        a_s = a_s / a_s.norm(dim=1, keepdim=True)
        a_t = a_t / a_t.norm(dim=1, keepdim=True)
        total += ((a_s - a_t) ** 2).mean()
    assert_close(m(batch).double(), 1000.0 * total, rtol=1e-5, atol=1e-6)


def test_nst_against_plain_loops():
    m = build_method("nst", {}, make_ctx())
    batch = make_batch(b=3)
    total = 0.0
    for i, j in PAIRS:
        f_s, f_t = common(d(batch.s_feats.stages[i]), d(batch.t_feats.stages[j]))
        for n in range(f_s.shape[0]):
            # A channel that is zero everywhere (dead after the ReLU) stays a zero vector.
            a = [v / v.norm() if v.norm() > 0 else v for v in f_s[n].flatten(1)]
            b = [v / v.norm() if v.norm() > 0 else v for v in f_t[n].flatten(1)]
            k = lambda xs, ys: sum(float(x @ y) ** 2 for x in xs for y in ys) / (len(xs) * len(ys))  # noqa: E731
            total += (k(a, a) + k(b, b) - 2 * k(a, b)) / f_s.shape[0]
    assert_close(m(batch).double(), torch.tensor(50.0 * total, dtype=torch.float64), rtol=1e-4, atol=1e-5)


def test_vid_against_plain_and_trained_variance():
    m = build_method("vid", {}, make_ctx())
    names = dict(m.named_parameters())
    # sigma^2 = softplus(log_scale) + eps is a registered Parameter, initialised to init_pred_var.
    for k in range(len(PAIRS)):
        assert isinstance(names[f"regressors.{k}.log_scale"], nn.Parameter)
        var0 = torch.log1p(torch.exp(d(names[f"regressors.{k}.log_scale"]))) + 1e-5
        assert_close(var0, torch.full_like(var0, 5.0), rtol=1e-6, atol=1e-6)
    with torch.no_grad():  # move the variances off their initial value, so the check sees them
        for k in range(len(PAIRS)):
            names[f"regressors.{k}.log_scale"].add_(torch.randn(names[f"regressors.{k}.log_scale"].shape))
    batch = make_batch()
    total = 0.0
    for k, (i, j) in enumerate(PAIRS):
        f_s, f_t = common(d(batch.s_feats.stages[i]), d(batch.t_feats.stages[j]))
        convs = [mod for mod in m.regressors[k].mean if isinstance(mod, nn.Conv2d)]
        mu = conv1x1(conv1x1(conv1x1(f_s, convs[0]).relu(), convs[1]).relu(), convs[2])
        var = (torch.log1p(torch.exp(d(m.regressors[k].log_scale))) + 1e-5).view(1, -1, 1, 1)
        total += (0.5 * ((mu - f_t) ** 2 / var + torch.log(var))).mean()
    loss = m(batch)
    assert_close(loss.double(), total, rtol=1e-5, atol=1e-6)
    loss.backward()
    for k in range(len(PAIRS)):
        assert m.regressors[k].log_scale.grad is not None and m.regressors[k].log_scale.grad.abs().sum() > 0


def normal_margin_numeric(gamma: float, beta: float) -> float:
    """E[x | x < 0] for x ~ N(beta, gamma^2) by trapezoidal integration (or -3 gamma when
    P(x < 0) <= 1e-3, the OFD code's rule)."""
    if 0.5 * math.erfc(beta / gamma / math.sqrt(2)) <= 1e-3:
        return -3 * gamma
    x = torch.linspace(beta - 14 * gamma, 0.0, 200001, dtype=torch.float64)
    pdf = torch.exp(-0.5 * ((x - beta) / gamma) ** 2)
    return float(torch.trapezoid(x * pdf, x) / torch.trapezoid(pdf, x))


def test_ofd_margins_and_loss_against_plain():
    teacher = FakeTeacher()
    m = build_method("ofd", {}, make_ctx(teacher=teacher))
    assert m.margin_sources == ["bn", "empirical", "bn"]
    bns = teacher.preact_bns()
    for k, (_, j) in enumerate(PAIRS):
        if bns[j] is None:
            continue
        expected = [normal_margin_numeric(float(g), float(b)) for g, b in zip(d(bns[j].weight), d(bns[j].bias))]
        assert_close(d(getattr(m, f"margin{k}")), torch.tensor(expected, dtype=torch.float64), rtol=1e-4, atol=1e-5)
    assert float(m.margin0[0]) == pytest.approx(-1.5)  # the -3 gamma branch

    batch = make_batch()
    total = 0.0
    n = len(PAIRS)
    for k, (i, j) in enumerate(PAIRS):
        conv, bn = m.connectors[k][0], m.connectors[k][1]
        src = bn_train(conv1x1(d(batch.s_feats.preact[i]), conv), bn)
        t = d(batch.t_feats.preact[j])
        if bns[j] is not None:
            margin = torch.tensor([normal_margin_numeric(float(g), float(b)) for g, b in zip(d(bns[j].weight), d(bns[j].bias))],
                                  dtype=torch.float64)
        else:  # the fallback: mean of the teacher's negative pre-activations per channel
            margin = torch.stack([t[:, c][t[:, c] < 0].mean() for c in range(t.shape[1])])
        tgt = block_mean(torch.maximum(t, margin.view(1, -1, 1, 1)), src.shape[-2:])
        mg = margin.view(1, -1, 1, 1)
        # The OFD paper's three cases: below the margin, between margin and 0, positive.
        per = ((src - mg) ** 2 * ((src > mg) & (tgt <= mg))
               + (src - tgt) ** 2 * ((src > tgt) & (tgt > mg) & (tgt <= 0))
               + (src - tgt) ** 2 * (tgt > 0))
        total += per.sum() / src.shape[0] / 2 ** (n - k - 1)
    assert_close(m(batch).double(), 1e-3 * total, rtol=1e-3, atol=1e-6)


def plain_abf(abf, x, deeper, out_hw):
    convs = [mod for mod in abf.modules() if isinstance(mod, nn.Conv2d)]
    reduce_conv, project_conv = abf.reduce[0], abf.project[0]
    x = bn_train(conv1x1(x, reduce_conv), abf.reduce[1])
    if deeper is not None:
        deeper = upsample_nearest(deeper, tuple(x.shape[-2:]))
        att_conv = [c for c in convs if c is not reduce_conv and c is not project_conv][0]
        z = torch.sigmoid(conv1x1(torch.cat([x, deeper], 1), att_conv))
        x = x * z[:, :1] + deeper * z[:, 1:]
    x = upsample_nearest(x, out_hw)
    y = F.conv2d(x, d(project_conv.weight), None, padding=1)
    return bn_train(y, abf.project[1]), x


def plain_hcl(fs, ft):
    loss, w, tot = ((fs - ft) ** 2).mean(), 1.0, 1.0
    for size in (4, 2, 1):
        if size >= fs.shape[-1]:
            continue
        w /= 2
        loss = loss + w * ((block_mean(fs, (size, size)) - block_mean(ft, (size, size))) ** 2).mean()
        tot += w
    return loss / tot


def test_reviewkd_against_plain_and_stage_relative_warmup():
    m = build_method("reviewkd", {}, make_ctx())
    # Derived from the shapes: 3 paired stages + the pooled level; width min(512, student pooled 16).
    assert [a.reduce[0].in_channels for a in m.abfs] == [4, 8, 16, 16]
    assert [a.project[0].out_channels for a in m.abfs] == [16, 32, 64, 64]
    assert {a.reduce[0].out_channels for a in m.abfs} == {16}
    batch = make_batch()
    xs = [d(batch.s_feats.stages[i]) for i, _ in PAIRS] + [d(batch.s_feats.pooled)[:, :, None, None]]
    ts = [d(batch.t_feats.preact[j]) for _, j in PAIRS] + [d(batch.t_feats.pooled)[:, :, None, None]]
    outs, deeper = [None] * 4, None
    for lvl in (3, 2, 1, 0):
        outs[lvl], deeper = plain_abf(m.abfs[lvl], xs[lvl], deeper, tuple(ts[lvl].shape[-2:]))
    hcl = sum(plain_hcl(o, t) for o, t in zip(outs, ts))
    for stage_epoch, factor in ((0, 1 / 20), (19, 1.0), (25, 1.0)):
        batch.stage_epoch = stage_epoch
        assert_close(m(batch).double(), 5.0 * factor * hcl, rtol=1e-4, atol=1e-6)


# --------------------------------------------------------------------------------------------------
# Golden values, relation methods.

def test_sp_against_plain_loops():
    m = build_method("sp", {}, make_ctx())
    batch = make_batch(b=5)
    b = 5

    def gram(f):
        flat = f.flatten(1)
        g = torch.tensor([[float(flat[i] @ flat[j]) for j in range(b)] for i in range(b)], dtype=torch.float64)
        return g / g.norm(dim=1, keepdim=True)

    g_s, g_t = gram(d(batch.s_feats.stages[-1])), gram(d(batch.t_feats.stages[-1]))
    expected = 3000.0 * ((g_s - g_t) ** 2).sum() / b**2
    assert_close(m(batch).double(), expected, rtol=1e-5, atol=1e-5)


def plain_rkd(e_s, e_t):
    b = e_s.shape[0]

    def dist(e):
        m = torch.zeros(b, b, dtype=torch.float64)
        for i in range(b):
            for j in range(b):
                if i != j:
                    m[i, j] = torch.sqrt(((e[i] - e[j]) ** 2).sum())
        return m / (m.sum() / (b * b - b))

    def angles(e):
        out = []
        for j in range(b):  # the vertex
            for i in range(b):
                for k in range(b):
                    u, v = e[i] - e[j], e[k] - e[j]
                    nu, nv = u.norm(), v.norm()
                    out.append(0.0 if nu == 0 or nv == 0 else float(u @ v / (nu * nv)))
        return torch.tensor(out, dtype=torch.float64)

    return 25.0 * smooth_l1(dist(e_s), dist(e_t)) + 50.0 * smooth_l1(angles(e_s), angles(e_t))


def test_rkd_against_plain_loops():
    m = build_method("rkd", {}, make_ctx())
    batch = make_batch(b=6)
    expected = plain_rkd(d(batch.s_feats.pooled), d(batch.t_feats.pooled))
    assert_close(m(batch).double(), expected, rtol=1e-4, atol=1e-6)


def test_pkt_against_plain_loops():
    m = build_method("pkt", {}, make_ctx())
    batch = make_batch(b=5)
    eps = 1e-7

    def cond(e):
        b = e.shape[0]
        e = e / (e.norm(dim=1, keepdim=True) + eps)
        k = torch.tensor([[(float(e[i] @ e[j]) + 1) / 2 for j in range(b)] for i in range(b)], dtype=torch.float64)
        return k / k.sum(1, keepdim=True)

    p_s, p_t = cond(d(batch.s_feats.pooled)), cond(d(batch.t_feats.pooled))
    expected = 30000.0 * (p_t * torch.log((p_t + eps) / (p_s + eps))).mean()
    assert_close(m(batch).double(), expected, rtol=1e-4, atol=1e-4)


def test_cc_against_plain_loops():
    m = build_method("cc", {}, make_ctx())
    batch = make_batch(b=5)
    e_s = d(batch.s_feats.pooled) @ d(m.embed_s.weight).t() + d(m.embed_s.bias)
    e_t = d(batch.t_feats.pooled) @ d(m.embed_t.weight).t() + d(m.embed_t.bias)
    assert e_s.shape[1] == 128 and e_t.shape[1] == 128
    total = 0.0
    for i in range(4):
        total += float(((e_s[i] - e_t[i]).abs() * (e_s[i + 1] - e_t[i + 1]).abs()).sum())
    assert_close(m(batch).double(), torch.tensor(0.02 * total / 4, dtype=torch.float64), rtol=1e-5, atol=1e-6)


def test_crd_against_plain_nce_and_memory_update():
    n_train = 20
    m = build_method("crd", {"nce_k": 5}, make_ctx(num_train=n_train))
    assert m.k == 5 and m.memory_s.shape == (n_train, 128) and m.memory_t.shape == (n_train, 128)
    assert {"memory_s", "memory_t"} <= {name for name, _ in m.named_buffers()}
    idx = torch.tensor([3, 7, 0, 19, 11, 5])
    batch = make_batch(b=6, indices=idx)
    cand = m.sample_candidates(idx)
    assert cand.shape == (6, 6) and torch.equal(cand[:, 0], idx)
    assert (cand[:, 1:] != idx[:, None]).all() and int(cand.max()) <= n_train - 1 and int(cand.min()) >= 0
    labels = cycle_labels(n_train)
    assert (labels[cand[:, 1:]] != labels[idx][:, None]).all()  # negatives of other classes only
    m.sample_candidates = lambda i: cand  # fix the negatives for the reference computation
    mem_s, mem_t = d(m.memory_s).clone(), d(m.memory_t).clone()

    def embed(x, lin):
        v = x @ d(lin.weight).t() + d(lin.bias)
        return v / v.norm(dim=1, keepdim=True)

    v_s, v_t = embed(d(batch.s_feats.pooled), m.embed_s.linear), embed(d(batch.t_feats.pooled), m.embed_t.linear)

    def nce(v, memory):
        b, k1 = cand.shape
        scores = torch.tensor([[math.exp(float(v[i] @ memory[cand[i, c]]) / 0.07) for c in range(k1)]
                               for i in range(b)], dtype=torch.float64)
        z = scores.mean() * n_train
        p = scores / z
        noise = (k1 - 1) / n_train
        loss = 0.0
        for i in range(b):
            loss -= math.log(p[i, 0] / (p[i, 0] + noise + 1e-7))
            for c in range(1, k1):
                loss -= math.log(noise / (p[i, c] + noise + 1e-7))
        return loss / b, z

    l_s, z_s = nce(v_s, mem_t)  # the student's embedding against the teacher's memory
    l_t, z_t = nce(v_t, mem_s)
    loss = m(batch)
    assert_close(loss.double(), torch.tensor(0.8 * (l_s + l_t), dtype=torch.float64), rtol=1e-4, atol=1e-5)
    assert_close(d(m.z_s), z_s, rtol=1e-4, atol=0.0)

    m.on_step_end(batch)
    for mem_old, v, mem_new in ((mem_s, v_s, m.memory_s), (mem_t, v_t, m.memory_t)):
        rows = 0.5 * mem_old[idx] + 0.5 * v
        assert_close(d(mem_new[idx]), rows / rows.norm(dim=1, keepdim=True), rtol=1e-5, atol=1e-6)
        others = torch.tensor([r for r in range(n_train) if r not in idx.tolist()])
        assert torch.equal(d(mem_new[others]), mem_old[others])
    # Z stays fixed after the first batch.
    m(make_batch(b=6, seed=5, indices=idx))
    assert_close(d(m.z_s), z_s, rtol=1e-4, atol=0.0)


def test_crd_negatives_sized_to_the_dataset():
    labels = torch.tensor([0, 0, 0, 1, 1, 1, 1, 2, 2, 2])
    m = build_method("crd", {}, make_ctx(num_train=10, labels=labels))  # default K = 16384
    assert m.k == 9
    idx = torch.arange(10)
    for _ in range(20):
        cand = m.sample_candidates(idx)
        assert cand.shape == (10, 10)
        assert int(cand.max()) <= 9 and int(cand.min()) >= 0
        # K = 9 exceeds every class's other-class count (6 or 7): drawn with replacement, still
        # never from the anchor's class.
        assert (labels[cand[:, 1:]] != labels[idx][:, None]).all()
    with pytest.raises(ValueError):
        build_method("crd", {}, make_ctx(num_train=1))
    with pytest.raises(ValueError, match="two classes"):
        build_method("crd", {}, make_ctx(num_train=10, labels=torch.zeros(10, dtype=torch.long)))
    with pytest.raises(ValueError, match="labels"):
        build_method("crd", {}, MethodContext(S_SHAPES, T_SHAPES, FakeTeacher(), 10, 10))
    with pytest.raises(ValueError, match="indices"):
        m(make_batch(b=4))


def test_crd_negatives_exclude_the_anchor_class_and_are_seeded():
    # RepDistiller's mode 'exact': K negatives from cls_negative[target] (every sample of another
    # class), without replacement when K <= len(cls_negative[target]).
    gen = torch.Generator().manual_seed(3)
    n = 300
    labels = torch.randint(0, 7, (n,), generator=gen)
    m = build_method("crd", {"nce_k": 40}, make_ctx(num_train=n, labels=labels))
    idx = torch.randperm(n, generator=gen)[:64]
    draws = []
    for seed in (11, 11, 12):
        torch.manual_seed(seed)
        draws.append(torch.cat([m.sample_candidates(idx) for _ in range(50)]))
    assert torch.equal(draws[0], draws[1]) and not torch.equal(draws[0], draws[2])
    cand = draws[0]
    anchors = idx.repeat(50)
    assert cand.shape == (64 * 50, 41) and torch.equal(cand[:, 0], anchors)
    neg = cand[:, 1:]
    assert (labels[neg] != labels[anchors][:, None]).all()
    # Without replacement: K distinct negatives per anchor.
    assert all(len(set(row.tolist())) == 40 for row in neg)
    # Uniform over the other-class samples: every one of them is drawn, at about the same rate.
    for c in range(7):
        rows = labels[anchors] == c
        pool = (labels != c).nonzero().squeeze(1)
        counts = torch.bincount(neg[rows].flatten(), minlength=n)[pool].double()
        assert (counts > 0).all()
        expected = rows.sum().item() * 40 / pool.numel()
        assert abs(counts.mean().item() - expected) < 1e-9 and counts.std().item() < 0.35 * expected


def test_crd_negatives_mixed_replacement():
    # Class-0 anchors have 2 samples of other classes (8, 9): K = 5 is drawn with replacement from
    # them; class-1 anchors have 8 (0..7): 5 distinct ones.
    labels = torch.tensor([0] * 8 + [1] * 2)
    m = build_method("crd", {"nce_k": 5}, make_ctx(num_train=10, labels=labels))
    assert m._all_replace is None
    idx = torch.tensor([0, 8, 3, 9])
    seen: set[int] = set()
    for _ in range(30):
        cand = m.sample_candidates(idx)
        assert torch.equal(cand[:, 0], idx)
        for row in (0, 2):
            assert set(cand[row, 1:].tolist()) <= {8, 9}
            seen |= set(cand[row, 1:].tolist())
        for row in (1, 3):
            assert set(cand[row, 1:].tolist()) <= set(range(8)) and len(set(cand[row, 1:].tolist())) == 5
    assert seen == {8, 9}


# --------------------------------------------------------------------------------------------------
# Gradients reach the student.

@pytest.mark.parametrize("name", DISTILLERS)
def test_gradient_reaches_student(name):
    idx = torch.arange(6) if METHODS[name].needs_indices else None
    batch = make_batch(b=6, grad=True, indices=idx)
    m = build_method(name, {}, make_ctx())
    loss = m(batch)
    assert loss.dim() == 0 and torch.isfinite(loss)
    loss.backward()
    s = batch.s_feats
    student = [batch.s_logits, *s.stages, *s.preact, s.pooled]
    total = sum(float(t.grad.abs().sum()) for t in student if t.grad is not None)
    assert total > 0, f"{name}: no gradient reaches the student"
    assert all(torch.isfinite(t.grad).all() for t in student if t.grad is not None)


# --------------------------------------------------------------------------------------------------
# One training step on the pairs of the zoo.

ZOO_PAIRS = {
    "same_family": ("resnet32x4", "resnet8x4", 3, 32),
    "cross_family_shufflenet": ("resnet32x4", "shufflenetv2", 3, 32),
    "cross_family_mobilenet": ("wrn_40_2", "mobilenetv2", 3, 32),
    "depth_width_wrn": ("wrn_40_2", "wrn_16_2", 3, 32),
    "depth_width_vgg": ("vgg13", "vgg8", 3, 32),
    "digits_default": ("cnn_large", "cnn_micro", 1, 8),
    # torchvision's ImageNet architectures, at 64x64 to keep the step cheap on a CPU.
    "imagenet_resnet": ("resnet34", "resnet18", 3, 64),
    "imagenet_cross_family": ("resnet50", "mobilenet_v2", 3, 64),
}


class Pair:
    def __init__(self, teacher_arch: str, student_arch: str, channels: int, size: int):
        missing = [a for a in (teacher_arch, student_arch) if a not in MODELS]
        if missing:
            pytest.skip(f"model(s) {missing} not registered in the zoo yet")
        self.classes = 100 if channels == 3 else 10
        self.in_shape = (channels, size, size)
        self.teacher = create_model(teacher_arch, self.classes, channels, size).eval()
        for p in self.teacher.parameters():
            p.requires_grad_(False)
        self.student = create_model(student_arch, self.classes, channels, size)
        self.t_shapes = probe_shapes(self.teacher, self.in_shape)
        self.s_shapes = probe_shapes(self.student, self.in_shape)
        self.teacher_state = {k: v.clone() for k, v in self.teacher.state_dict().items()}


@pytest.fixture(scope="module")
def pairs():
    built: dict[str, Pair] = {}

    def get(key: str) -> Pair:
        if key not in built:
            torch.manual_seed(0)
            built[key] = Pair(*ZOO_PAIRS[key])
        return built[key]

    return get


@pytest.mark.parametrize("name", DISTILLERS + ["ce"])
@pytest.mark.parametrize("pair_key", list(ZOO_PAIRS))
def test_one_training_step(pairs, pair_key, name):
    pair = pairs(pair_key)
    num_train = 64
    ctx = MethodContext(pair.s_shapes, pair.t_shapes, pair.teacher, pair.classes, num_train,
                        cycle_labels(num_train, pair.classes))
    method = build_method(name, {}, ctx)
    student = pair.student
    student.train()
    method.train()
    before = {k: v.detach().clone() for k, v in method.named_parameters()}
    opt = torch.optim.SGD([{"params": list(student.parameters())}, {"params": list(method.parameters())}], lr=0.05)

    b = 8 if name == "rkd" else 4
    x = torch.randn(b, *pair.in_shape)
    y = torch.randint(0, pair.classes, (b,))
    idx = torch.randperm(num_train)[:b]
    s_logits, s_feats = student(x)
    with torch.no_grad():
        t_logits, t_feats = pair.teacher(x)
    batch = KDBatch(s_logits, s_feats, t_logits, t_feats, y, idx if method.needs_indices else None, 0)
    kd = method(batch)
    assert kd.dim() == 0 and torch.isfinite(kd), f"{name} on {pair_key}: {kd}"
    loss = method.params.ce_weight * F.cross_entropy(s_logits, y) + kd
    opt.zero_grad(set_to_none=True)
    loss.backward()
    opt.step()
    mem_before = (method.memory_s[idx].clone(), method.memory_t[idx].clone()) if name == "crd" else None
    method.on_step_end(batch)

    # Extra modules are trained: every parameter tensor moved.
    for k, v in method.named_parameters():
        assert not torch.equal(before[k], v.detach()), f"{name} on {pair_key}: {k} was not trained"
    if name == "vid":
        assert any(k.endswith("log_scale") for k in before)
    if name == "crd":
        assert method.k == num_train - 1
        assert not torch.equal(mem_before[0], method.memory_s[idx])
        assert not torch.equal(mem_before[1], method.memory_t[idx])
    # The teacher is only read: eval mode, parameters and BN buffers bit-identical.
    assert not any(mod.training for mod in pair.teacher.modules())
    state = pair.teacher.state_dict()
    assert all(torch.equal(state[k], v) for k, v in pair.teacher_state.items()), f"{name} moved the teacher"


# --------------------------------------------------------------------------------------------------
# A plan chaining five methods, end to end on the default digits pair.

def test_five_method_plan_end_to_end(tmp_path):
    from smskd_search.engine import run_plan
    from smskd_search.plan import Plan, ProblemSpec, StageSpec, StudentSpec, TeacherRecipe, TeacherSpec

    plan = Plan(
        problem=ProblemSpec(
            teacher=TeacherSpec(arch="cnn_large", recipe=TeacherRecipe(epochs=2)),
            student=StudentSpec(arch="cnn_micro"),
        ),
        stages=[StageSpec(method=m, epochs=1) for m in ("kd", "fitnet", "crd", "rkd", "reviewkd")],
    )
    assert plan.problem.dataset.name == "digits"
    result = run_plan(plan, teacher_cache=tmp_path, device="cpu")
    assert [s.method for s in result.stages] == ["kd", "fitnet", "crd", "rkd", "reviewkd"]
    assert len(result.stages) == 5
    for k, stage in enumerate(result.stages):
        assert math.isfinite(stage.val_acc) and 0.0 <= stage.val_acc <= 1.0
        assert all(math.isfinite(e.train_loss) for e in stage.epoch_metrics)
        assert stage.reference_active == (k >= 1)


def test_catalog_lists_every_method_with_described_params():
    from smskd_search.methods.catalog import method_rows

    rows = {r["name"]: r for r in method_rows()}
    assert set(rows) == set(METHODS)
    for name, row in rows.items():
        assert row["family"] in ("none", "response", "feature", "relation")
        assert row["reference"]
        assert any(p["name"] == "ce_weight" for p in row["params"])
        for p in row["params"]:
            assert p["description"], f"{name}.{p['name']} has no description"
    crd = {p["name"]: p["default"] for p in rows["crd"]["params"]}
    assert crd == {"ce_weight": 1.0, "weight": 0.8, "feat_dim": 128, "nce_k": 16384, "nce_t": 0.07,
                   "nce_m": 0.5, "eps": 1e-7}
    assert {p["name"]: p["default"] for p in rows["kd"]["params"]}["T"] == 4.0


def test_ofd_on_a_teacher_without_bn_before_its_preactivations():
    # ShuffleNetV2's stage outputs are channel shuffles, not BN outputs: OFD estimates those margins.
    if "shufflenetv2" not in MODELS or "resnet8x4" not in MODELS:
        pytest.skip("CIFAR zoo not registered yet")
    teacher = create_model("shufflenetv2", 100, 3, 32).eval()
    for p in teacher.parameters():
        p.requires_grad_(False)
    student = create_model("resnet8x4", 100, 3, 32)
    t_shapes, s_shapes = probe_shapes(teacher, (3, 32, 32)), probe_shapes(student, (3, 32, 32))
    method = build_method("ofd", {}, MethodContext(s_shapes, t_shapes, teacher, 100, 64))
    assert "empirical" in method.margin_sources
    state = {k: v.clone() for k, v in teacher.state_dict().items()}
    x = torch.randn(4, 3, 32, 32)
    s_logits, s_feats = student(x)
    with torch.no_grad():
        t_logits, t_feats = teacher(x)
    loss = method(KDBatch(s_logits, s_feats, t_logits, t_feats, torch.zeros(4, dtype=torch.long), None, 0))
    loss.backward()
    assert torch.isfinite(loss) and loss > 0
    for k, src in enumerate(method.margin_sources):
        margin = getattr(method, f"margin{k}")
        assert torch.isfinite(margin).all() and (margin <= 0).all()
        if src == "empirical":
            assert (margin < 0).any()
    assert not teacher.training and all(torch.equal(teacher.state_dict()[k], v) for k, v in state.items())


# --------------------------------------------------------------------------------------------------
# Defaults that follow the teacher/student pair (DKD's beta, from mdistiller's CIFAR-100 configs).

def pair_space(teacher: str, student: str, method_params: dict | None = None):
    from smskd_search.space import Space

    return Space.model_validate({
        "name": f"{teacher}-{student}",
        "problem": {"dataset": {"name": "cifar100"}, "teacher": {"arch": teacher}, "student": {"arch": student}},
        "search": {"methods": ["kd", "dkd"], "stages": {"min": 1, "max": 2}, "method_params": method_params or {}},
    })


@pytest.mark.parametrize("teacher,student,beta", [
    ("resnet32x4", "resnet8x4", 8.0), ("wrn_40_2", "wrn_16_2", 6.0), ("resnet56", "resnet20", 2.0),
    ("vgg13", "MobileNetV2", 6.0),  # an alias matches its canonical name
])
def test_dkd_beta_follows_the_pair_in_a_built_plan(teacher, student, beta):
    from smskd_search.space import make_plan
    from smskd_search.validate import parse_plan

    plan = make_plan(pair_space(teacher, student, {"dkd": {"warmup_epochs": 3}}), [("kd", 2), ("dkd", 3)])
    assert plan.stages[1].params == {"beta": beta, "warmup_epochs": 3}
    assert plan.stages[0].params == {}  # kd has no pair defaults
    # The stored plan says it: after a YAML round trip, the same beta and the same canonical hash.
    again = parse_plan(yaml.safe_load(plan.to_yaml()))
    assert again.stages[1].params["beta"] == beta and again.canonical_hash() == plan.canonical_hash()
    other = plan.model_copy(update={"stages": [plan.stages[0], plan.stages[1].model_copy(
        update={"params": {"beta": 9.0, "warmup_epochs": 3}})]})
    assert other.canonical_hash() != plan.canonical_hash()
    # The method built from the plan's params trains with that beta.
    assert build_method("dkd", plan.stages[1].params, make_ctx()).params.beta == beta


def test_explicit_dkd_beta_wins_over_the_pair():
    from smskd_search.space import make_plan
    from smskd_search.verify import comparison_plans

    plan = make_plan(pair_space("wrn_40_2", "wrn_16_2", {"dkd": {"beta": 1.5}}), [("dkd", 3)])
    assert plan.stages[0].params == {"beta": 1.5}
    # A pair outside the table: the method's own default, nothing written into the plan.
    plan = make_plan(pair_space("resnet110", "resnet20"), [("dkd", 3)])
    assert plan.stages[0].params == {}
    assert build_method("dkd", plan.stages[0].params, make_ctx()).params.beta == 8.0
    # verify's single-method rows for a method the plan does not use get the pair's value too.
    kd_plan = make_plan(pair_space("wrn_40_2", "wrn_16_2"), [("kd", 3)])
    rows = dict(comparison_plans(kd_plan, methods=["kd", "dkd"]))
    assert rows["single:dkd"].stages[0].params == {"beta": 6.0}
    rows = dict(comparison_plans(kd_plan, methods=["dkd"], method_params={"dkd": {"beta": 3.0}}))
    assert rows["single:dkd"].stages[0].params == {"beta": 3.0}


def test_methods_command_shows_the_pair_table(capsys):
    from smskd_search.cli import main

    assert main(["methods"]) == 0
    out = capsys.readouterr().out
    lines = out.splitlines()
    beta = next(line for line in lines if line.strip().startswith("beta"))
    assert "8.0" in beta and "default per pair" in beta
    table = lines[next(i for i, line in enumerate(lines) if line.startswith("pair defaults")):]
    rows = {" ".join(line.split()[:3]): line.split()[-1] for line in table[1:] if "->" in line}
    assert rows["resnet32x4 -> resnet8x4"] == "8.0"
    assert rows["wrn_40_2 -> wrn_16_2"] == "6.0"
    assert rows["resnet56 -> resnet20"] == "2.0"
    assert rows["vgg13 -> vgg8"] == "6.0" and rows["wrn_40_2 -> shufflenetv1"] == "8.0"
    assert len(rows) == 8  # only pairs whose archs are in the zoo (no resnet32, wrn_40_1, ResNet50)
