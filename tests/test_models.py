import math

import pytest
import torch

import normfree
from normfree.blocks import ResidualBlock
from normfree.layers import ScaledStdConv2d, activation_gamma
from normfree.models import ARCHS, RESNET_DEPTHS
from normfree.schemes import SCHEMES

BATCH_FREE = [m for m, s in SCHEMES.items() if not s.uses_batch_stats]


def small(name, **kw):
    """A registered model at a size that keeps the test fast."""
    if name.endswith("_wrn"):
        kw.setdefault("depth", 10)
    else:
        kw.setdefault("width", 0.0625)  # 16..128 channels
    return normfree.create_model(name, **kw)


def blocks_of(model):
    return [m for m in model.modules() if isinstance(m, ResidualBlock)]


def test_registry_lists_every_method_and_arch():
    names = normfree.list_models()
    assert len(names) == len(SCHEMES) * len(ARCHS) == len(set(names))
    for method in ["bn", "relubn", "none", "skipinit", "fixup", "nf", "nf_he", "rescale", "gn", "ln"]:
        for arch in ["wrn", "resnet50", "resnet101", "resnet152", "resnet200", "resnet288", "resnet600"]:
            assert f"{method}_{arch}" in names


@pytest.mark.parametrize("name", normfree.list_models())
def test_every_model_runs_forward_backward_and_round_trips(name):
    torch.manual_seed(0)
    model = small(name, num_classes=7, in_chans=2)
    x = torch.randn(4, 2, 16 if name.endswith("_wrn") else 32, 16 if name.endswith("_wrn") else 32)
    y = model(x)
    assert y.shape == (4, 7) and torch.isfinite(y).all()
    y.pow(2).sum().backward()
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    assert grads and all(torch.isfinite(g).all() for g in grads)
    # state_dict round trip into a differently initialized copy
    torch.manual_seed(1)
    other = small(name, num_classes=7, in_chans=2)
    other.load_state_dict(model.state_dict())
    model.eval(), other.eval()
    with torch.no_grad():
        torch.testing.assert_close(other(x), model(x), rtol=0, atol=0)


def test_resnet_stage_depths_and_block_counts():
    for depth, stages in RESNET_DEPTHS.items():
        arch = normfree.make_arch(f"resnet{depth}")
        assert arch.depths == stages and arch.block == "bottleneck"
    m = normfree.create_model("bn_resnet50", num_classes=1000)
    assert len(blocks_of(m)) == 16
    assert sum(p.numel() for p in m.parameters()) == pytest.approx(25.5e6, rel=0.03)  # ~25.5M like ResNet-50
    assert len(blocks_of(small("none_wrn", depth=28))) == 12


def test_wrn_depth_1000_builds_and_runs():
    model = normfree.create_model("skipinit_wrn", depth=1000, width=1, num_classes=10, in_chans=3)
    assert len(blocks_of(model)) == 498
    with torch.no_grad():
        out = model(torch.randn(2, 3, 8, 8))
    assert torch.isfinite(out).all()


def test_small_single_channel_inputs():
    for name, hw in [("nf_resnet50", 28), ("skipinit_wrn", 8), ("bn_resnet50", 8)]:
        m = small(name, in_chans=1, num_classes=10).eval()
        with torch.no_grad():
            assert m(torch.randn(2, 1, hw, hw)).shape == (2, 10)


def test_skipinit_blocks_are_exactly_identity_at_init():
    torch.manual_seed(0)
    model = small("skipinit_wrn", depth=22, width=2)
    x = torch.randn(4, 3, 16, 16)
    h = model.stem(x)
    identities = 0
    for block in model.blocks:
        out = block(h)
        if block.shortcut is None:
            assert torch.equal(out, h)  # exactly the identity
            identities += 1
        else:  # transition: only the projection shortcut contributes
            assert torch.equal(out, block.shortcut(block.pre(h)))
        h = out
    assert identities >= 4


def test_skipinit_gain_options():
    m = small("skipinit_wrn", depth=28, gain_init="1/sqrt(d)")
    assert all(b.gain.gain.item() == pytest.approx(1 / math.sqrt(12)) for b in blocks_of(m))
    m = small("skipinit_wrn", gain_init=1.0)
    assert all(b.gain.gain.item() == 1.0 for b in blocks_of(m))
    reg = small("skipinit_wrn", regularized=True)
    assert reg.scheme.dropout > 0 and isinstance(reg.dropout, torch.nn.Dropout)
    assert all(c.bias is not None for b in blocks_of(reg) for c in b.convs)


@pytest.mark.parametrize("name,m", [("fixup_wrn", 2), ("fixup_resnet50", 3)])
def test_fixup_initialization_rules(name, m):
    torch.manual_seed(0)
    model = small(name, **({"depth": 40} if m == 2 else {"width": 0.25}))
    blocks = blocks_of(model)
    L = len(blocks)
    factor = L ** (-1.0 / (2 * m - 2))
    # rule 1: classifier and last layer of every branch are zero
    assert torch.count_nonzero(model.fc.weight) == 0 and torch.count_nonzero(model.fc.bias) == 0
    for b in blocks:
        assert torch.count_nonzero(b.convs[-1].weight) == 0
    # rule 2: other branch layers are He-initialized, scaled by L^(-1/(2m-2))
    w = torch.cat([c.weight.flatten() / math.sqrt(2.0 / c.weight[0].numel())
                   for b in blocks for c in b.convs[:-1]])
    assert w.std().item() == pytest.approx(factor, rel=0.03)
    # rule 3: scalar multiplier (init 1) per branch and scalar biases (init 0)
    assert all(b.gain.gain.item() == 1.0 for b in blocks)
    biases = [mod for mod in model.modules() if isinstance(mod, normfree.ScalarBias)]
    assert len(biases) >= 4 * L and all(b.bias.item() == 0 for b in biases)


@pytest.mark.parametrize("name", ["nf_wrn", "nf_resnet50", "nf_he_wrn"])
def test_nf_beta_tracks_expected_variance_with_resets(name):
    alpha = 0.3
    model = small(name, alpha=alpha, **({"depth": 22, "width": 2} if "wrn" in name else {}))
    gamma = activation_gamma("relu")
    var = 1.0
    resets = 0
    for b in blocks_of(model):
        assert b.beta == pytest.approx(math.sqrt(var))
        assert b.in_scale == pytest.approx(gamma / math.sqrt(var))  # branch input is relu(x) * gamma / beta
        assert b.branch_const == pytest.approx(alpha)
        if b.shortcut is not None:  # transition: the shortcut sees the scaled input, variance resets
            var, resets = 1.0 + alpha ** 2, resets + 1
        else:
            var = var + alpha ** 2
    assert resets >= 2


def test_nf_uses_standardized_convs_and_nf_he_plain():
    nf, he = small("nf_wrn"), small("nf_he_wrn")
    assert all(isinstance(c, ScaledStdConv2d) for b in blocks_of(nf) for c in b.convs)
    assert not any(isinstance(c, ScaledStdConv2d) for c in he.modules())
    for c in (c for b in blocks_of(nf) for c in b.convs):
        w = c.standardized_weight().detach()
        assert torch.allclose(w.mean(dim=(1, 2, 3)), torch.zeros(w.shape[0]), atol=1e-6)
        assert torch.allclose(w.var(dim=(1, 2, 3), unbiased=False) * c.fan_in, torch.ones(w.shape[0]), rtol=1e-4)


def test_rescale_coefficients():
    model = small("rescale_wrn", depth=16)
    L = 6
    for b in blocks_of(model):
        b2 = 1.0 / (b.index + L)
        assert b.branch_const == pytest.approx(math.sqrt(b2))
        assert b.skip_scale == pytest.approx(math.sqrt(1 - b2))


@pytest.mark.parametrize("method", BATCH_FREE)
def test_batch_independence(method):
    torch.manual_seed(0)
    model = small(f"{method}_wrn", gain_init=0.5) if method == "skipinit" else small(f"{method}_wrn")
    x = torch.randn(6, 3, 16, 16)
    for train in (True, False):
        model.train(train)
        with torch.no_grad():
            full = model(x)
            alone = model(x[:1])
            shuffled = model(torch.cat([x[:1], torch.randn(5, 3, 16, 16) * 5]))
        torch.testing.assert_close(alone[0], full[0], rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(shuffled[0], full[0], rtol=1e-4, atol=1e-5)
        assert full.abs().sum() > 0 or method in ("skipinit", "fixup")


def test_bn_in_train_mode_depends_on_the_batch():
    torch.manual_seed(0)
    model = small("bn_wrn").train()
    x = torch.randn(6, 3, 16, 16)
    with torch.no_grad():
        full = model(x)[0]
        other = model(torch.cat([x[:1], torch.randn(5, 3, 16, 16) * 5]))[0]
    assert (full - other).abs().max() > 1e-3
    model.eval()
    with torch.no_grad():
        torch.testing.assert_close(model(x)[0], model(x[:1])[0], rtol=1e-4, atol=1e-5)


def test_method_options_reach_the_scheme():
    m = normfree.create_model("nf_wrn", depth=28, width=4, alpha=0.2, act="gelu")
    assert m.scheme.nf_alpha == 0.2 and m.scheme.act == "gelu"
    assert blocks_of(m)[0].mid_scale == pytest.approx(activation_gamma("gelu"))
    assert m.arch.widths == (64, 128, 256)
    m = normfree.create_model("skipinit_wrn_1000_4")
    assert m.arch.depths == (166, 166, 166) and m.arch.widths == (64, 128, 256)


@pytest.mark.parametrize("call,pattern", [
    (lambda: normfree.create_model("skipint_wrn"), r"unknown method 'skipint'.*did you mean 'skipinit_wrn'"),
    (lambda: normfree.create_model("nf_resnet51"), r"unknown model 'nf_resnet51'.*did you mean"),
    (lambda: normfree.create_model("bn_wrn", depth=1001), r"depth 1001 does not fit wrn.*6n\+4"),
    (lambda: normfree.create_model("bn_wrn", depth=8), r"depth 8 does not fit wrn"),
    (lambda: normfree.create_model("bn_resnet50", depth=34), r"resnet50 has depth 50.*depth=34"),
    (lambda: normfree.create_model("nf_wrn", alpha=0), r"alpha must be a number > 0, got 0"),
    (lambda: normfree.create_model("nf_wrn", alpha=-0.2), r"alpha must be a number > 0, got -0.2"),
    (lambda: normfree.create_model("nf_wrn", act="swishh"), r"unknown activation 'swishh'.*allowed"),
    (lambda: normfree.create_model("skipinit_wrn", gain_init="1/d"), r"gain_init must be"),
    (lambda: normfree.create_model("bn_wrn", num_classes=0), r"num_classes must be a positive integer, got 0"),
])
def test_bad_input_raises_clear_errors(call, pattern):
    with pytest.raises(ValueError, match=pattern):
        call()


def test_unknown_option_names_the_option():
    with pytest.raises(TypeError, match=r"unknown option 'alhpa'.*did you mean 'alpha'"):
        normfree.create_model("nf_wrn", alhpa=0.2)


def test_wrong_input_shape_is_caught_before_pytorch():
    model = small("nf_wrn", in_chans=3)
    with pytest.raises(ValueError, match=r"expected input of shape \(N, 3, H, W\), got \(2, 1, 8, 8\)"):
        model(torch.randn(2, 1, 8, 8))
    with pytest.raises(ValueError, match=r"got \(3, 8, 8\)"):
        model(torch.randn(3, 8, 8))
