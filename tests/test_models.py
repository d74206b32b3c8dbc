import math
import dataclasses

import pytest
import torch

import normfree
from normfree.blocks import ResidualBlock
from normfree.layers import ScaledStdConv2d, activation_gamma
from normfree.models import ARCHS, NAMED_MODELS, RESNET_DEPTHS
from normfree.schemes import SCHEMES

BATCH_FREE = [m for m, s in SCHEMES.items() if not s.uses_batch_stats]
# the method x arch grid, and one model of each NF family layout (tests/test_nfnet.py checks
# every NFNet / NF-RegNet variant's parameters on the meta device)
RUN_MODELS = [n for n in normfree.list_models() if n not in NAMED_MODELS] + ["nfnet_f0", "nfnet_f0plus",
                                                                              "nf_regnet_b0"]


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
    assert len(names) == len(SCHEMES) * len(ARCHS) + len(NAMED_MODELS) == len(set(names))
    for method in ["bn", "relubn", "none", "skipinit", "fixup", "nf", "nf_he", "rescale", "gn", "ln"]:
        for arch in ["wrn", "resnet50", "resnet101", "resnet152", "resnet200", "resnet288", "resnet600"]:
            assert f"{method}_{arch}" in names


@pytest.mark.parametrize("name", RUN_MODELS)
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


@pytest.mark.slow
def test_wrn_depth_1000_builds_and_runs(perturb):
    """SkipInit at depth 1000: exactly the identity at init (gain 0) apart from the
    two projections; with the gain at 1/sqrt(L) the variance grows as predicted,
    (1 + 1/L)^L ~ e, instead of 2^L, and the signal still reaches the classifier."""
    torch.manual_seed(0)
    model = normfree.create_model("skipinit_wrn", depth=1000, width=1, num_classes=10, in_chans=3)
    blocks = blocks_of(model)
    assert len(blocks) == 498
    x = torch.randn(4, 3, 8, 8)
    with torch.no_grad():
        h = model.stem(x)
        for b in blocks[:40]:  # the first stage: identities
            out = b(h)
            assert torch.equal(out, h) if b.shortcut is None else torch.equal(out, b.shortcut(b.pre(h)))
            h = out
    from normfree.signal import measure_signal, predict_variance
    torch.manual_seed(0)
    model = normfree.create_model("skipinit_wrn", depth=1000, width=1, num_classes=10, gain_init="1/sqrt(d)")
    assert [b.gain.gain.item() for b in blocks_of(model)] == pytest.approx([498 ** -0.5] * 498)
    stats = measure_signal(model, (8, 3, 8, 8), residual=False)
    pred = predict_variance(model, v0=stats.input_var + stats.input_mean_sq)
    assert pred[-1] == pytest.approx((stats.input_var + stats.input_mean_sq) * (1 + 1 / 498) ** 498)
    second = [r.var + r.mean_sq for r in stats]
    assert 0.3 < second[-1] / pred[-1] < 3, (second[-1], pred[-1])
    assert all(math.isfinite(v) and v > 0.1 for v in second)
    with torch.no_grad():
        perturb(model.fc, 0.1)
        out = model(torch.randn(2, 3, 8, 8))
    assert torch.isfinite(out).all() and (out[0] - out[1]).abs().max() > 1e-4


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


def test_rescale_coefficients_follow_the_official_code():
    """hukkai/rescaling models/rescale.py: block k = L-1, L, ... scales its branch by
    L^-1/2 and its convs by (k+1)^(-1/6) L^(1/6) each (3 convs: variance x L/(k+1)),
    its skip by sqrt(k/(k+1)), and has a learnable scalar (init 1): in effect
    b_l^2 = 1/(l + L - 1) for the 1-based block l, a_l^2 = 1 - b_l^2."""
    model = small("rescale_wrn", depth=16)
    L = 6
    for b in blocks_of(model):
        k = L - 1 + (b.index - 1)  # the official block_idx
        b2 = (L ** -0.5) ** 2 * ((k + 1) ** (-1 / 6) * L ** (1 / 6)) ** 6
        assert b2 == pytest.approx(1.0 / (b.index + L - 1))
        assert b.branch_const == pytest.approx(math.sqrt(b2))
        assert b.skip_scale == pytest.approx(math.sqrt(k / (k + 1)))
        assert b.gain is not None and b.gain.gain.item() == 1.0 and b.gain.gain.requires_grad


@pytest.mark.parametrize("method", BATCH_FREE)
def test_batch_independence(method, perturb):
    torch.manual_seed(0)
    model = perturb(small(f"{method}_wrn"), 0.1, seed=1)  # zero classifiers / gains would give equal zeros
    x = torch.randn(6, 3, 16, 16)
    for train in (True, False):
        model.train(train)
        with torch.no_grad():
            full = model(x)
            alone = model(x[:1])
            shuffled = model(torch.cat([x[:1], torch.randn(5, 3, 16, 16) * 5]))
        # the outputs are not trivially equal: they differ from sample to sample
        assert (full - full[:1]).abs().amax() > 1e-4 * full.abs().amax() > 0
        torch.testing.assert_close(alone[0], full[0], rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(shuffled[0], full[0], rtol=1e-4, atol=1e-5)


# --------------------------------------------------------------------------
# every method's forward pass against the formula, step by step (issue 18)
# --------------------------------------------------------------------------
RELU_GAMMA = math.sqrt(2.0 / (1.0 - 1.0 / math.pi))  # Var(gamma relu(z)) = 1 for z ~ N(0, 1)
# method -> (a_l, s_l) of y = a_l skip + s_l g f(x) [+ b] for block l = 1..L, from the papers (g: the
# learnable gain where the method has one, else 1); written out here, not read from the blocks
FORMULA = {
    "nf": lambda l, L: (1.0, 0.2),
    "nf_he": lambda l, L: (1.0, 0.2),
    "rescale": lambda l, L: (math.sqrt(1.0 - 1.0 / (l + L - 1)), math.sqrt(1.0 / (l + L - 1))),
    "balduzzi": lambda l, L: (1.0 / math.sqrt(2.0), 1.0 / math.sqrt(2.0)),
    "szegedy": lambda l, L: (1.0, 0.2),
    "hanin": lambda l, L: (1.0, 0.9 ** l),
}
WITH_GAIN = {"skipinit", "fixup", "nf", "nf_he", "rescale"}
KNOWN = {"bn", "relubn", "gn", "ln", "in", "none", "skipinit", "fixup", "nf", "nf_he", "rescale", "balduzzi",
         "szegedy", "hanin", "arpit", "lsuv", "wn", "cwn", "selu"}


def test_every_method_has_its_formula_here():
    """A new method must say here what its block computes (FORMULA: a_l, s_l; WITH_GAIN)."""
    assert set(SCHEMES) == KNOWN, set(SCHEMES) ^ KNOWN


def reference_block(b, x, method, l, L, var):
    """The block's output from its layers, with the method's constants from FORMULA
    (NF: h = relu(x) gamma / sqrt(var), var the expected variance tracked here)."""
    from normfree.blocks import PoolPadShortcut
    nf = method in ("nf", "nf_he")
    a, s = FORMULA.get(method, lambda l, L: (1.0, 1.0))(l, L)
    h = b.pre(x)
    if nf:
        h = h * (RELU_GAMMA / math.sqrt(var))
    if b.shortcut is None:
        skip = x
    else:
        skip = b.shortcut(x) if isinstance(b.shortcut, PoolPadShortcut) else b.shortcut(h)
    f = b.convs[0](h)
    for mid, conv in zip(b.mids, b.convs[1:]):
        u = mid(f)
        f = conv(u * RELU_GAMMA if nf else u)
    assert (b.gain is not None) == (method in WITH_GAIN)
    g = b.gain.gain if method in WITH_GAIN else 1.0
    r = s * g * f
    if method == "fixup":
        r = r + b.out_bias.bias
    return a * skip + r


@pytest.mark.parametrize("method", sorted(SCHEMES))
def test_step_by_step_forward_of_every_method(method, tiny_model):
    """y = a_l skip + s_l g f(x) [+ b], computed here from the block's layers and the
    papers' constants, equals the block's output (folded and unfolded paths), with
    every weight, gain and bias moved off its initialization."""
    from normfree.blocks import unfolded
    model = tiny_model(f"{method}_wrn", depth=16, perturb=0.1).eval()
    blocks = blocks_of(model)
    L = len(blocks)
    assert L == 6
    x = torch.randn(2, 3, 8, 8)
    with torch.no_grad():
        h = model.stem(x)
        var = 1.0
        for l, b in enumerate(blocks, start=1):
            want = reference_block(b, h, method, l, L, var)
            got = b(h)
            with unfolded(b):
                got_unfolded = b(h)
            torch.testing.assert_close(got, want, rtol=2e-5, atol=2e-5 * float(want.abs().max()))
            torch.testing.assert_close(got_unfolded, want, rtol=2e-5, atol=2e-5 * float(want.abs().max()))
            var = (1.0 if b.shortcut is not None else var) + 0.2 ** 2  # NF's tracked variance
            h = got


def test_drop_path_drops_whole_samples_with_probability_p_and_rescales(tiny_model):
    """Stochastic depth in the forward pass: per sample the branch is dropped (y = skip)
    with probability p or kept and scaled by 1/(1 - p); eval mode keeps it unscaled."""
    model = tiny_model("nf_wrn", depth=16, drop_path=0.5, perturb=0.1)
    b = blocks_of(model)[-1]  # p = 0.5 (L - 1) / L
    p = b.drop_path
    assert p == pytest.approx(0.5 * 5 / 6)
    x = torch.randn(400, 64, 2, 2)
    with torch.no_grad():
        b.eval()
        full = b(x)
        hb = b.preact(x)
        skip = b.skip(x, hb)
        b.train()
        out = b(x)
    from normfree.blocks import unfolded
    with torch.no_grad(), unfolded(b):  # the reference path drops the same way
        out_ref = b(x)
    r_full = (full - skip).flatten(1)
    for got in (out, out_ref):
        r_out = (got - skip).flatten(1)
        dropped = r_out.abs().amax(1) == 0
        kept = ~dropped
        assert 0.7 < dropped.float().mean().item() / p < 1.3
        torch.testing.assert_close(r_out[kept], r_full[kept] / (1 - p), rtol=1e-4, atol=1e-5)


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
    (lambda: normfree.create_model("nf_wrn", alpha=0), r"alpha must be a finite number in \(0, 10\], got 0"),
    (lambda: normfree.create_model("nf_wrn", alpha=-0.2), r"alpha must be a finite number in \(0, 10\], got -0.2"),
    (lambda: normfree.create_model("nf_wrn", act="swishh"), r"unknown activation 'swishh'.*allowed"),
    (lambda: normfree.create_model("skipinit_wrn", gain_init="1/d"), r"gain_init must be"),
    (lambda: normfree.create_model("bn_wrn", num_classes=0), r"num_classes must be an integer from 1 to 100000, got 0"),
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


# --------------------------------------------------------------------------
# fidelity to the official code (issue 12)
# --------------------------------------------------------------------------
@pytest.mark.parametrize("method", ["nf", "nf_he"])
def test_nf_has_the_official_skipinit_gain_before_alpha(method):
    """DeepMind nf_resnet.py: out = f(x) * skip_gain (init 0) * alpha + shortcut."""
    alpha = 0.3
    model = small(f"{method}_wrn", depth=16, width=2, alpha=alpha)
    blocks = blocks_of(model)
    assert all(b.gain is not None and b.gain.gain.item() == 0.0 for b in blocks)
    assert all(b.gain.gain.requires_grad and b.gain.gain.dim() == 0 for b in blocks)
    # with the gain at 0 a non-transition block is exactly the identity
    x = torch.randn(2, 3, 8, 8)
    h = model.stem(x)
    for b in blocks:
        out = b(h)
        if b.shortcut is None:
            assert torch.equal(out, h)
        h = out
    # a changed gain: y = skip + alpha * g * f(h), with the block's public parts
    m = small(f"{method}_wrn", depth=16, width=2, alpha=alpha, gain_init=0.7)
    b = blocks_of(m)[1]
    assert b.gain.gain.item() == pytest.approx(0.7) and b.branch_scale().item() == pytest.approx(0.21)
    x = torch.randn(2, 16 * 2, 8, 8)
    with torch.no_grad():
        hb = b.preact(x)
        want = b.skip(x, hb) + alpha * 0.7 * b.branch(hb)
        torch.testing.assert_close(b(x), want, rtol=1e-5, atol=1e-6)
    # the expected variance keeps adding alpha^2 whatever the gain (as the official code does)
    assert [b.beta for b in blocks] == pytest.approx([b.beta for b in blocks_of(m)])


@pytest.mark.parametrize("alpha", [0.05, 0.2, 0.5, 1.0, 2.0])
@pytest.mark.parametrize("method", ["nf", "nf_he"])
def test_nf_any_alpha_builds_tracks_variance_and_runs(alpha, method):
    model = small(f"{method}_wrn", alpha=alpha, gain_init=1.0)
    var = 1.0
    for b in blocks_of(model):
        assert b.beta == pytest.approx(math.sqrt(var))
        var = (1.0 if b.shortcut is not None else var) + alpha ** 2
        assert b.expected_var_out == pytest.approx(var)
        assert b.branch_scale().item() == pytest.approx(alpha)
    y = model(torch.randn(2, 3, 8, 8))
    assert torch.isfinite(y).all()


def test_fixup_shortcut_is_a_1x1_conv_on_bottleneck_resnets_and_pool_pad_on_wrn():
    from normfree.blocks import PoolPadShortcut
    from normfree.layers import Conv2d
    torch.manual_seed(0)
    r50 = small("fixup_resnet50", width=0.25)  # 16 -> 64 channels in the first block
    first = blocks_of(r50)[0]
    assert type(first.shortcut) is Conv2d and first.shortcut.kernel_size == (1, 1) and first.shortcut_uses_preact
    assert first.shortcut.in_channels == 16 and first.shortcut.out_channels == 64
    transitions = [b for b in blocks_of(r50) if b.shortcut is not None]
    assert len(transitions) == 4 and all(type(b.shortcut) is Conv2d for b in transitions)
    # the projection is He-initialized, not scaled by Fixup's L^(-1/(2m-2)) (official: likewise)
    w = torch.cat([b.shortcut.weight.flatten() * math.sqrt(b.shortcut.weight[0].numel()) for b in transitions])
    assert w.std().item() == pytest.approx(math.sqrt(2), rel=0.05)
    wrn = small("fixup_wrn", depth=16)
    assert all(isinstance(b.shortcut, PoolPadShortcut) for b in blocks_of(wrn) if b.shortcut is not None)
    assert wrn.scheme.shortcut == "pool_pad" and r50.scheme.shortcut == "conv"
    # still selectable
    assert isinstance(blocks_of(small("fixup_resnet50", shortcut="pool_pad"))[0].shortcut, PoolPadShortcut)


def test_he_gain_is_computed_for_every_activation():
    from normfree.layers import ACTIVATIONS, activation_he_gain
    z = torch.randn(4_000_000, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    assert activation_he_gain("relu") == pytest.approx(math.sqrt(2), rel=1e-8)
    assert activation_he_gain("identity") == pytest.approx(1.0, rel=1e-8)
    assert activation_he_gain("gelu") == pytest.approx(1.534, abs=1e-3)
    for name, fn in ACTIVATIONS.items():  # 1 / sqrt(E[act(z)^2]) by Monte Carlo
        assert activation_he_gain(name) == pytest.approx(float(fn(z).square().mean()) ** -0.5, rel=3e-3), name


@pytest.mark.parametrize("act", sorted(normfree.ACTIVATIONS))
def test_unnormalized_branch_roughly_preserves_the_second_moment_for_every_activation(act):
    """He init for the activation in use: E[f(x)^2] ~ E[x^2] for x ~ N(0, 1).
    (He init keeps the second moment; part of it may sit in channel means.)"""
    ratios = []
    for seed in range(4):  # with 64 channels one draw's channel means move the ratio by ~15%
        torch.manual_seed(seed)
        b = blocks_of(normfree.create_model("none_wrn", depth=16, width=4, act=act))[1]  # 64 -> 64
        x = torch.randn(4, 64, 32, 32)
        with torch.no_grad():
            f = b(x) - x  # none: y = x + f(x)
        ratios.append(float(f.square().mean() / x.square().mean()))
    ratio = sum(ratios) / len(ratios)
    assert 0.75 < ratio < 1.25, (act, ratios)  # ~0.92: zero padding loses ~4% per 3x3 conv at 32x32
    from normfree.layers import activation_he_gain
    for method in ("skipinit", "fixup", "rescale"):  # the same init in every unnormalized method
        m = normfree.create_model(f"{method}_wrn", depth=16, width=4, act=act)
        conv = blocks_of(m)[2].convs[0]
        L = len(blocks_of(m))
        factor = L ** -0.5 if method == "fixup" else 1.0
        std = conv.weight.std().item() * math.sqrt(conv.weight[0].numel())
        assert std == pytest.approx(activation_he_gain(act) * factor, rel=0.03), (method, act)


@pytest.mark.parametrize("method", ["none", "bn", "skipinit", "fixup", "rescale"])
def test_stem_is_initialized_for_a_linear_input(method):
    torch.manual_seed(0)
    model = normfree.create_model(f"{method}_wrn", depth=10, width=4)
    stem = model.stem[0]
    assert stem.weight.std().item() * math.sqrt(stem.weight[0].numel()) == pytest.approx(1.0, rel=0.08)
    x = torch.randn(16, 3, 32, 32)
    with torch.no_grad():
        v = model.stem(x).var(dim=(0, 2, 3), unbiased=False).mean().item()
    assert 0.7 < v < 1.25, v  # ~1 (minus zero padding's loss), not ~2


def _registry_channel_counts():
    """Every channel count a norm layer sees in the registry's architectures at
    the widths the project uses (and some odd ones)."""
    counts = set()
    for arch in normfree.ARCHS:
        for width in (0.0625, 0.125, 0.25, 0.5, 0.75, 1, 1.5, 2, 3, 4, 8, 10):
            try:
                a = normfree.make_arch(arch, width=width)
            except ValueError:
                continue
            counts.update(a.widths)
            counts.add(a.stem_width)
            if a.block == "bottleneck":
                counts.update(w // 4 for w in a.widths)
    return sorted(counts)


def test_groupnorm_never_degenerates_to_instancenorm():
    model = small("gn_wrn", width=1)  # 16, 32 and 64 channels
    norms = [m for m in model.modules() if isinstance(m, torch.nn.GroupNorm)]
    assert norms and all(1 < n.num_groups < n.num_channels for n in norms)
    from normfree.blocks import group_count
    counts = _registry_channel_counts()
    assert {16, 32, 64, 128, 256, 2048} <= set(counts)
    for c in counts:
        g = group_count(c)
        assert c % g == 0 and g <= 32, c
        if c >= 2:
            assert g < c and c // g >= 2, (c, g)  # never InstanceNorm
        if c % 32 == 0 and c >= 64:
            assert g == 32, c  # Wu & He's G = 32 wherever it leaves >= 2 channels per group
    assert [group_count(c) for c in (1, 2, 3, 7, 16, 32, 48)] == [1, 1, 1, 1, 8, 16, 24]


def test_groupnorm_group_count_examples():
    """The largest G <= 32 that divides C with >= 2 channels per group, whichever parity."""
    from normfree.blocks import group_count
    assert [group_count(c) for c in (4, 6, 10, 99, 66)] == [2, 3, 5, 11, 22]


def test_groupnorm_variants_ln_and_in_normalize_over_their_groups():
    """ln: LayerNorm over (C, H, W) (one group); in: InstanceNorm (one group per channel)."""
    import torch.nn.functional as F
    x = torch.randn(3, 16, 5, 5) * 3 + torch.linspace(-2, 2, 16).view(1, -1, 1, 1)
    refs = {"ln": lambda t: F.layer_norm(t, t.shape[1:], eps=1e-5), "in": lambda t: F.instance_norm(t, eps=1e-5)}
    for method, ref in refs.items():
        norms = [m for m in small(f"{method}_wrn", width=1).modules() if isinstance(m, torch.nn.GroupNorm)]
        n16 = next(m for m in norms if m.num_channels == 16)
        with torch.no_grad():
            torch.testing.assert_close(n16(x), ref(x), rtol=1e-4, atol=1e-4)


def test_norm_order_bn_relu_vs_relu_bn():
    """bn (norm_act): relu(bn(x)) >= 0; relubn (act_norm): bn(relu(x)), zero-mean channels."""
    x = torch.randn(8, 16, 6, 6) + 0.5
    with torch.no_grad():
        pre_bn = blocks_of(small("bn_wrn", width=1).train())[0].pre(x)
        pre_relubn = blocks_of(small("relubn_wrn", width=1).train())[0].pre(x)
    assert pre_bn.min() >= 0 and pre_bn.mean() > 0.2
    assert pre_relubn.min() < -0.1
    torch.testing.assert_close(pre_relubn.mean(dim=(0, 2, 3)), torch.zeros(16), atol=1e-5, rtol=0)


def test_fixup_shortcut_pool_pad_keeps_equal_channels_and_pads_new_ones():
    from normfree.blocks import PoolPadShortcut
    x = torch.randn(2, 4, 6, 6)
    assert torch.equal(PoolPadShortcut(4, 4, 2)(x), x[:, :, ::2, ::2])  # equal channels: allowed, subsampled
    assert torch.equal(PoolPadShortcut(4, 4, 1)(x), x)
    out = PoolPadShortcut(4, 6, 1)(x)
    assert torch.equal(out[:, :4], x) and torch.count_nonzero(out[:, 4:]) == 0
    with pytest.raises(ValueError, match=r"cannot reduce channels \(4 -> 3\)"):
        PoolPadShortcut(4, 3, 1)


def test_stochastic_depth_indexes_blocks_from_zero_like_the_official_code():
    """DeepMind nf_resnet.py / skipinit_resnet.py: rate = p * index / L, index = 0..L-1."""
    model = small("nf_wrn", depth=16, drop_path=0.1)
    rates = [b.drop_path for b in blocks_of(model)]
    L = len(rates)
    assert rates == pytest.approx([0.1 * i / L for i in range(L)])
    assert rates[0] == 0.0


def test_method_docs_give_formula_and_official_source():
    for name, scheme in SCHEMES.items():
        assert "=" in scheme.doc, name
    for name in ("nf", "nf_he", "skipinit", "bn"):
        assert "deepmind-research/nfnets/" in SCHEMES[name].doc
    assert "hongyi-zhang/Fixup" in SCHEMES["fixup"].doc and "hukkai/rescaling" in SCHEMES["rescale"].doc
    with pytest.raises(TypeError, match="unknown option 'doc'"):
        normfree.make_scheme("nf", doc="x")


# --------------------------------------------------------------------------
# numeric arguments (issue 14, class 7)
# --------------------------------------------------------------------------
NAN, INF = float("nan"), float("inf")


@pytest.mark.parametrize("kwargs,pattern", [
    (dict(alpha=NAN), r"alpha must be a finite number.*got nan"),
    (dict(alpha=INF), r"alpha must be a finite number.*got inf"),
    (dict(alpha=11.0), r"alpha must be a finite number in \(0, 10\], got 11.0"),
    (dict(alpha=True), r"alpha must be a finite number.*got True"),
    (dict(gain_init=NAN), r"gain_init must be None, a finite number.*got nan"),
    (dict(gain_init=-INF), r"gain_init must be.*got -inf"),
    (dict(gain_init=1e9), r"gain_init must be.*\[-100, 100\].*got 1000000000.0"),
    (dict(dropout=NAN), r"dropout must be a number in \[0, 1\), got nan"),
    (dict(drop_path=INF), r"drop_path must be a number in \[0, 1\), got inf"),
    (dict(width=NAN), r"width must be a finite number > 0, got nan"),
    (dict(width=INF), r"width must be a finite number > 0, got inf"),
    (dict(width=-1), r"width must be a finite number > 0, got -1"),
    (dict(width=1000), r"width 1000 gives wrn a layer of 64000 channels; allowed: up to 16384 \(width <= 256\)"),
    (dict(depth=100_006), r"depth 100006 does not fit wrn: allowed depths are 6n\+4 with n >= 1, up to 10000"),
    (dict(depth=16.0), r"depth 16.0 does not fit wrn"),
    (dict(depth=True), r"depth True does not fit wrn"),
    (dict(num_classes=10 ** 7), r"num_classes must be an integer from 1 to 100000, got 10000000"),
    (dict(num_classes=NAN), r"num_classes must be an integer from 1 to 100000, got nan"),
    (dict(in_chans=5000), r"in_chans must be an integer from 1 to 1024, got 5000"),
    (dict(in_chans=3.0), r"in_chans must be an integer from 1 to 1024, got 3.0"),
])
def test_numeric_arguments_are_validated_with_the_bad_value_named(kwargs, pattern):
    method = "nf" if {"alpha", "gain_init"} & set(kwargs) else "skipinit"
    with pytest.raises(ValueError, match=pattern):
        normfree.create_model(f"{method}_wrn", **kwargs)


def test_resnet_width_bound_and_name_encoded_size_conflicts():
    with pytest.raises(ValueError, match=r"width 16 gives resnet50 a layer of 32768 channels.*width <= 8"):
        normfree.make_arch("resnet50", width=16)
    with pytest.raises(ValueError, match=r"'skipinit_wrn_1000_4' encodes depth 1000, but depth=16 was given"):
        normfree.create_model("skipinit_wrn_1000_4", depth=16)
    with pytest.raises(ValueError, match=r"encodes width 4, but width=2 was given"):
        normfree.create_model("skipinit_wrn_28_4", width=2)
    with pytest.raises(ValueError, match=r"resnet50 has depth 50; got depth=101"):
        normfree.create_model("nf_resnet50", depth=101)
    # the same value twice is not a conflict
    assert normfree.create_model("skipinit_wrn_16_2", depth=16, width=2).arch.widths == (32, 64, 128)
    assert normfree.create_model("nf_resnet50", depth=50, width=0.0625).arch.depths == (3, 4, 6, 3)


# --------------------------------------------------------------------------
# option bounds and defaults of make_scheme (issue 18: mutation survivors)
# --------------------------------------------------------------------------
def test_option_bounds_include_their_documented_ends():
    from normfree.schemes import make_scheme
    ok = [dict(alpha=10.0), dict(alpha=1e-9), dict(gain_init=100.0), dict(gain_init=-100.0), dict(gain_init=0),
          dict(dropout=0.0), dict(drop_path=0.999), dict(skip_alpha=10.0), dict(beta=10.0), dict(beta_decay=1.0),
          dict(beta_decay=1e-9), dict(gain_init="1/sqrt(d)"), dict(alpha=None), dict(gain_init=None)]
    ok += [dict(shortcut=v) for v in ("conv", "pool_pad", "auto")] + [dict(order=v) for v in ("norm_act", "act_norm")]
    ok += [dict(conv=v) for v in ("plain", "ws", "wn", "cwn")] + [dict(norm=v) for v in (None, "bn", "gn", "ln", "in")]
    ok += [dict(classifier_init=v) for v in ("default", "zero", "normal_0.01")] + [dict(data_init=v) for v in (None, "lsuv")]
    ok += [dict(act=v) for v in normfree.ACTIVATIONS]
    for kw in ok:
        make_scheme("nf", **kw)
    bad = [dict(alpha=10.001), dict(gain_init=100.001), dict(gain_init=-100.001), dict(dropout=1.0),
           dict(drop_path=1.0), dict(dropout=-1e-9), dict(skip_alpha=10.001), dict(beta_decay=1.001),
           dict(gain_init=True), dict(dropout=True), dict(skip_alpha=True), dict(skip_alpha=float("inf")),
           dict(order="act"), dict(conv="sn"), dict(shortcut="pad"), dict(classifier_init="ones"), dict(norm="xn"),
           dict(init="arpit"), dict(data_init="lsuv2")]
    for kw in bad:
        with pytest.raises(ValueError):
            make_scheme("nf", **kw)
    assert make_scheme("wn", init="arpit").init == "arpit"  # arpit needs (and has) conv="wn"


def test_aliases_regularized_defaults_and_initial_gain():
    from normfree.schemes import make_scheme
    s = make_scheme("nf", alpha=0.3, gain=0.5, activation="gelu", beta=0.7)
    assert (s.nf_alpha, s.gain_init, s.act, s.branch_beta) == (0.3, 0.5, "gelu", 0.7)
    reg = make_scheme("skipinit", regularized=True)
    assert reg.conv_bias is True and reg.dropout == 0.2
    assert make_scheme("skipinit").conv_bias is False and make_scheme("skipinit").dropout == 0.0
    kept = make_scheme("skipinit", regularized=True, dropout=0.5, conv_bias=False)
    assert kept.dropout == 0.5 and kept.conv_bias is False
    assert make_scheme("none").initial_gain(9) is None
    assert make_scheme("skipinit", gain_init=0.25).initial_gain(9) == 0.25
    assert make_scheme("skipinit", gain_init="1/sqrt(d)").initial_gain(9) == pytest.approx(1 / 3)
    assert isinstance(make_scheme("skipinit", gain_init=2).initial_gain(9), float)
    assert {m for m, s in SCHEMES.items() if s.uses_batch_stats} == {"bn", "relubn", "szegedy"}
    assert normfree.list_methods() == sorted(SCHEMES)
    for field in ("name", "doc"):  # the method's identity and text are not options
        with pytest.raises(TypeError, match=f"unknown option '{field}'"):
            make_scheme("nf", **{field: "x"})
    with pytest.raises(ValueError, match=r"unknown method 'nff' \(did you mean 'nf'\?\)"):
        make_scheme("nff")
    with pytest.raises(ValueError, match=r"unknown method 'qqqq'; allowed"):  # nothing close: no suggestion
        make_scheme("qqqq")


@pytest.mark.parametrize("name", sorted(SCHEMES))
def test_make_conv_of_every_scheme(name):
    """The conv each method's block is built from: its class, stride, padding, groups, bias
    and initial scale, read from the scheme's fields as the docstring states them."""
    from normfree.blocks import make_conv
    from normfree.layers import Conv2d, WeightNormConv2d, activation_he_gain

    s = SCHEMES[name]
    torch.manual_seed(0)
    kind = {"ws": ScaledStdConv2d, "wn": WeightNormConv2d, "cwn": WeightNormConv2d}.get(s.conv, Conv2d)
    for kernel, stride, groups in [(1, 1, 1), (3, 2, 1), (3, 1, 2), (7, 2, 1)]:
        conv = make_conv(s, 8, 16, kernel, stride, groups=groups)
        assert type(conv) is kind
        assert conv.kernel_size == (kernel, kernel) and conv.stride == (stride, stride)
        assert conv.padding == (kernel // 2, kernel // 2) and conv.groups == groups
        assert (conv.bias is not None) == bool(s.conv_bias)
        if conv.bias is not None:
            assert torch.count_nonzero(conv.bias) == 0
        assert conv(torch.randn(1, 8, 15, 15)).shape == (1, 16, 15 // stride + (stride > 1), 15 // stride + (stride > 1))
    if kind is WeightNormConv2d:
        assert conv.center == (s.conv == "cwn")
    # the initial scale (a wide layer, so the sample std is within a few %)
    act = "identity" if s.nf_alpha is not None else s.act
    conv = make_conv(s, 64, 256, 3)
    fan_in = conv.weight[0].numel()
    std = conv.weight.std().item() * math.sqrt(fan_in)
    if kind is ScaledStdConv2d:
        assert std == pytest.approx(1.0, rel=0.03)             # N(0, 1 / fan_in), as DeepMind's WSConv2D
    elif kind is WeightNormConv2d:
        g = activation_he_gain(act) * (math.sqrt(64 / 256) if s.init == "arpit" else 1.0)
        assert torch.allclose(conv.gain.detach(), torch.full_like(conv.gain, g))
        if s.init != "arpit":
            assert std == pytest.approx(1.0, rel=0.03)
    else:
        assert std == pytest.approx(activation_he_gain(act), rel=0.03)
        if s.nf_alpha is None:                                 # a linear input (the stem) gets gain 1
            lin = make_conv(s, 64, 256, 3, input_act="identity")
            assert lin.weight.std().item() * math.sqrt(fan_in) == pytest.approx(1.0, rel=0.03)


@pytest.mark.parametrize("name", sorted(SCHEMES))
def test_norm_act_units_of_every_scheme(name):
    """The pre-activation unit, spelled out: [ScalarBias] (norm, act) or (act, norm) or act [ScalarBias]."""
    from normfree.blocks import norm_act
    from normfree.layers import Activation, ScalarBias

    s = SCHEMES[name]
    norm = {"bn": torch.nn.BatchNorm2d, "gn": torch.nn.GroupNorm, "ln": torch.nn.GroupNorm,
            "in": torch.nn.GroupNorm, None: None}[s.norm]
    core = [Activation] if norm is None else [norm, Activation] if s.order == "norm_act" else [Activation, norm]
    want = [ScalarBias] + core + [ScalarBias] if s.fixup else core
    assert [type(m) for m in norm_act(s, 16)] == want
    # a Fixup-style scheme with a norm keeps both scalar biases around the (norm, act) pair
    both = [type(m) for m in norm_act(dataclasses.replace(s, fixup=True, norm="bn", order="act_norm"), 16)]
    assert both == [ScalarBias, Activation, torch.nn.BatchNorm2d, ScalarBias]


def test_norm_act_units_ln_in_and_gn_normalize_over_their_groups():
    from normfree.blocks import group_count, norm_layer

    assert norm_layer("ln", 12).num_groups == 1 and norm_layer("in", 12).num_groups == 12
    assert norm_layer("gn", 12).num_groups == group_count(12) == 6
    x = torch.randn(3, 12, 5, 5) * 4 + 2
    y = norm_layer("ln", 12)(x)
    assert torch.allclose(y.mean(dim=(1, 2, 3)), torch.zeros(3), atol=1e-5)
    assert torch.allclose(y.var(dim=(1, 2, 3), unbiased=False), torch.ones(3), atol=1e-3)


def test_a_block_built_by_hand_takes_its_documented_defaults():
    """ResidualBlock(cin, cout, stride, scheme): basic 3x3-3x3 layout (bottleneck=True:
    1x1-3x3-1x1 at a quarter of the width), index l = 1 of L = 1 blocks, NF's tracked
    input variance 1, no stochastic depth."""
    from normfree.schemes import make_scheme

    basic = ResidualBlock(16, 16, 1, make_scheme("bn"))
    assert [c.kernel_size for c in basic.convs] == [(3, 3), (3, 3)]
    neck = ResidualBlock(64, 64, 1, make_scheme("bn"), bottleneck=True)
    assert [(c.kernel_size, c.in_channels, c.out_channels) for c in neck.convs] == \
        [((1, 1), 64, 16), ((3, 3), 16, 16), ((1, 1), 16, 64)]
    rescale = ResidualBlock(16, 16, 1, make_scheme("rescale"))  # b_1^2 = 1 / (1 + 1 - 1) = 1
    assert rescale.branch_const is None and rescale.skip_scale == 0.0
    assert ResidualBlock(16, 16, 1, make_scheme("nf")).beta == 1.0
    torch.manual_seed(0)
    x = torch.randn(4, 16, 6, 6)
    basic.train()
    out = basic(x)
    assert torch.equal(out, basic(x)) and not torch.allclose(out, x)  # the branch is never dropped


def test_scalars_of_combined_methods_multiply():
    """Options stack the papers' scalars: RescaleNet's b_l, a_l with Balduzzi's alpha,
    Szegedy's beta and Hanin's b^l give y = (alpha a_l) x + (b_l alpha beta b^l) g f(h)
    (block l = 2 of L = 4); NF's alpha times a Szegedy beta."""
    from normfree.blocks import unfolded
    from normfree.schemes import make_scheme

    scheme = make_scheme("rescale", skip_alpha=0.5, branch_beta=0.5, beta_decay=0.9)
    block = ResidualBlock(8, 8, 1, scheme, index=2, num_blocks=4).eval()
    b2 = 1.0 / (2 + 4 - 1)
    a, s = 0.5 * math.sqrt(1.0 - b2), math.sqrt(b2) * 0.5 * 0.5 * 0.9 ** 2
    with torch.no_grad():
        block.gain.gain.fill_(0.7)
        for c in block.convs:
            c.weight.normal_(0.0, 0.3)
        x = torch.randn(3, 8, 5, 5)
        f = block.convs[1](block.mids[0](block.convs[0](block.pre(x))))
        want = a * x + s * 0.7 * f
        torch.testing.assert_close(block(x), want)
        with unfolded(block):
            torch.testing.assert_close(block(x), want)
    nf = ResidualBlock(8, 8, 1, make_scheme("nf", branch_beta=0.5, rescale=True), index=2, num_blocks=4)
    assert nf.branch_const == pytest.approx(0.2 * math.sqrt(b2) * 0.5) and nf.skip_scale == pytest.approx(
        math.sqrt(1.0 - b2))
    assert ResidualBlock(8, 8, 1, make_scheme("bn")).beta is None  # beta and the tracked variance are NF's


def test_block_construction_details_that_the_papers_fix():
    """Conv biases follow the scheme (plain, WS and WN convs); a bottleneck transition strides
    its 3x3 conv (ResNet v1.5, as the official NF-ResNet and timm code); SkipInit's
    "1/sqrt(d)" gain uses L; Arpit's 1/L scales the last conv of a bottleneck too; Fixup's
    scalar biases before every conv enter the folded forward."""
    from normfree.blocks import unfolded
    from normfree.layers import ScalarBias
    from normfree.schemes import make_scheme

    assert ResidualBlock(8, 8, 1, make_scheme("nf", conv_bias=False)).convs[0].bias is None
    assert ResidualBlock(8, 8, 1, make_scheme("nf")).convs[0].bias is not None
    assert ResidualBlock(8, 8, 1, make_scheme("wn", conv_bias=False)).convs[0].bias is None
    regularized = ResidualBlock(8, 8, 1, make_scheme("skipinit", regularized=True))
    assert all(torch.equal(c.bias, torch.zeros(8)) for c in regularized.convs)  # present, initialized to 0
    neck = ResidualBlock(64, 128, 2, make_scheme("bn"), bottleneck=True)
    assert [c.stride for c in neck.convs] == [(1, 1), (2, 2), (1, 1)]
    assert ResidualBlock(8, 8, 1, make_scheme("skipinit", gain_init="1/sqrt(d)"), num_blocks=16).gain.gain.item() \
        == pytest.approx(0.25)
    torch.manual_seed(0)
    one = ResidualBlock(64, 64, 1, make_scheme("arpit"), bottleneck=True, num_blocks=1)
    torch.manual_seed(0)
    four = ResidualBlock(64, 64, 1, make_scheme("arpit"), bottleneck=True, num_blocks=4)
    torch.testing.assert_close(four.convs[2].gain, one.convs[2].gain * 0.5)
    torch.testing.assert_close(four.convs[1].gain, one.convs[1].gain)
    fixup = ResidualBlock(8, 8, 1, make_scheme("fixup")).eval()
    with torch.no_grad():
        for m in fixup.modules():
            if isinstance(m, ScalarBias):
                m.bias.normal_()
        for c in fixup.convs:
            c.weight.normal_(0.0, 0.2)
    x = torch.randn(2, 8, 5, 5)
    with torch.no_grad(), unfolded(fixup):
        want = fixup(x)
    torch.testing.assert_close(fixup(x), want)


def test_an_nfnet_runs_on_odd_input_sizes():
    """Its average-pool shortcut rounds up (ceil_mode) like the strided 3x3 conv's SAME padding."""
    model = normfree.create_model("nfnet_f0", width=1 / 16, num_classes=3).eval()
    with torch.no_grad():
        assert model(torch.randn(1, 3, 37, 37)).shape == (1, 3)
