import math

import pytest
import torch
import torch.nn.functional as F

import normfree
from normfree.layers import Conv2d, ScaledStdConv2d, activation_gamma


def test_scaled_std_conv_matches_reference_formula():
    torch.manual_seed(0)
    conv = ScaledStdConv2d(5, 7, 3, padding=1)
    with torch.no_grad():
        conv.weight.normal_(0.3, 2.0)
        conv.gain.uniform_(0.5, 2.0)
        conv.bias.normal_()
    w = conv.weight.detach()
    n = w[0].numel()
    mean = w.mean(dim=(1, 2, 3), keepdim=True)
    var = torch.var(w, dim=(1, 2, 3), unbiased=False, keepdim=True)  # biased, as in the definition
    expected = conv.gain.detach() * (w - mean) / torch.sqrt(torch.clamp(n * var, min=1e-4))
    torch.testing.assert_close(conv.effective_weight().detach(), expected)
    x = torch.randn(2, 5, 6, 6)
    torch.testing.assert_close(conv(x), F.conv2d(x, expected, conv.bias, padding=1))


def test_standardized_weight_zero_mean_and_var_one_over_fan_in():
    conv = ScaledStdConv2d(16, 32, 3)
    w = conv.standardized_weight().detach()
    fan_in = 16 * 9
    assert torch.allclose(w.mean(dim=(1, 2, 3)), torch.zeros(32), atol=1e-6)
    assert torch.allclose(w.var(dim=(1, 2, 3), unbiased=False), torch.full((32,), 1 / fan_in), rtol=1e-4)
    # learnable gain (init 1) and bias (init 0)
    assert conv.gain.requires_grad and torch.equal(conv.gain, torch.ones_like(conv.gain))
    assert conv.bias.requires_grad and torch.equal(conv.bias, torch.zeros_like(conv.bias))


def test_standardization_guard_for_constant_filters():
    conv = ScaledStdConv2d(2, 3, 1)
    with torch.no_grad():
        conv.weight.fill_(0.5)  # zero variance: the max(N var, 1e-4) guard avoids a division by 0
    w = conv.effective_weight()
    assert torch.isfinite(w).all() and torch.equal(w, torch.zeros_like(w))


def test_scaled_std_conv_exports_without_std_mean():
    conv = ScaledStdConv2d(3, 4, 3, padding=1).eval()
    exported = torch.export.export(conv, (torch.randn(2, 3, 8, 8),))
    ops = " ".join(str(n.target) for n in exported.graph.nodes)
    assert "std_mean" not in ops and "var_mean" not in ops
    x = torch.randn(2, 3, 8, 8)
    torch.testing.assert_close(exported.module()(x), conv(x))


@pytest.mark.parametrize("cls", [Conv2d, ScaledStdConv2d])
def test_conv_folds_scales_exactly(cls):
    torch.manual_seed(1)
    conv = cls(4, 6, 3, padding=1, bias=True)
    with torch.no_grad():
        conv.bias.normal_()
    x = torch.randn(2, 4, 5, 5)
    a, b = 0.37, torch.tensor(2.5)
    torch.testing.assert_close(conv(x, in_scale=a, out_scale=b), b * conv(a * x))
    per_channel = torch.rand(6)
    torch.testing.assert_close(conv(x, out_scale=per_channel), conv(x) * per_channel.view(1, -1, 1, 1))


def test_relu_gamma_matches_analytic_value():
    assert abs(activation_gamma("relu") - math.sqrt(2 / (1 - 1 / math.pi))) < 1e-6
    assert abs(normfree.RELU_GAMMA - 1.7129) < 1e-4


@pytest.mark.parametrize("name", sorted(normfree.PUBLISHED_GAMMAS))
def test_gammas_match_published_monte_carlo_constants(name):
    # the published values are Monte-Carlo estimates: agree to ~0.1%
    published = normfree.PUBLISHED_GAMMAS[name]
    assert activation_gamma(name) == pytest.approx(published, rel=2e-3)


def test_gamma_of_any_callable_and_unit_variance():
    assert activation_gamma(lambda x: 3 * x) == pytest.approx(1 / 3, rel=1e-6)
    z = torch.randn(2_000_000, generator=torch.Generator().manual_seed(0))
    for name in ("relu", "gelu", "tanh"):
        g = activation_gamma(name)
        assert (g * normfree.get_activation(name)(z)).var().item() == pytest.approx(1.0, rel=5e-3)


def test_unknown_activation_is_a_clear_error():
    with pytest.raises(ValueError, match=r"unknown activation 'rleu'.*allowed"):
        normfree.get_activation("rleu")


def test_scalar_gain_and_bias():
    g, b = normfree.ScalarGain(0.0), normfree.ScalarBias()
    x = torch.randn(3, 4)
    assert torch.equal(g(x), torch.zeros_like(x)) and torch.equal(b(x), x)
    (g(x).sum() + b(x).sum()).backward()
    assert g.gain.grad is not None and b.bias.grad.item() == pytest.approx(12.0)


@pytest.mark.parametrize("center", [False, True])
def test_weight_norm_conv_is_g_times_the_normalized_direction_per_filter(center):
    """W_hat = g v / ||v|| (WN), g (v - mean v) / ||v - mean v|| (CWN), per output channel,
    checked against a step-by-step computation on filters with different means and norms."""
    from normfree.layers import WeightNormConv2d

    torch.manual_seed(0)
    conv = WeightNormConv2d(3, 4, 3, center=center)
    assert conv.center is center and conv.gain.shape == (4, 1, 1, 1)
    with torch.no_grad():
        conv.weight.mul_(torch.tensor([0.5, 1.0, 2.0, 3.0]).view(4, 1, 1, 1))
        conv.weight.add_(torch.tensor([0.0, 0.3, -0.7, 1.5]).view(4, 1, 1, 1))   # each filter its own mean
        conv.gain.copy_(torch.tensor([0.5, 1.0, 1.5, 2.0]).view(4, 1, 1, 1))
    v = conv.weight.detach().flatten(1)
    if center:
        v = v - v.mean(dim=1, keepdim=True)
    ref = (v / v.norm(dim=1, keepdim=True)).view_as(conv.weight)
    assert torch.allclose(conv.normalized_weight(), ref, atol=1e-6)
    rows = conv.effective_weight().detach().flatten(1)
    assert torch.allclose(rows.norm(dim=1), torch.tensor([0.5, 1.0, 1.5, 2.0]), atol=1e-5)
    means = rows.mean(dim=1)
    if center:
        assert torch.allclose(means, torch.zeros(4), atol=1e-6)
    else:
        assert means.abs().min() > 1e-3                        # WN keeps each filter's mean
    x = torch.randn(2, 3, 6, 6)
    assert torch.allclose(conv(x), F.conv2d(x, ref * conv.gain.detach(), conv.bias), atol=1e-5)


def test_clear_cache_on_a_conv_that_never_cached():
    conv = Conv2d(3, 4, 3)
    conv.clear_cache()                                         # nothing cached yet: no error
    with torch.no_grad():
        conv(torch.randn(1, 3, 5, 5), in_scale=2.0)
    conv.clear_cache()
    conv.clear_cache()
    assert "_fold_cache" not in conv.__dict__


def test_activation_module_applies_its_gain_in_and_out_of_place():
    from normfree.layers import Activation

    x = torch.randn(2, 3, 4, 4)
    x0 = x.clone()
    assert torch.equal(Activation()(x), torch.relu(x0)) and torch.equal(x, x0)  # relu, gain 1, out of place
    torch.testing.assert_close(Activation("relu", gain=2.5)(x), 2.5 * torch.relu(x))
    y = x.clone()
    out = Activation("relu", gain=0.5)(y, inplace=True)
    torch.testing.assert_close(out, 0.5 * torch.relu(x))
    assert torch.equal(y, torch.relu(x))  # relu has an exact in-place form: y was overwritten
    z = x.clone()
    assert Activation("relu")(z, inplace=True).data_ptr() == z.data_ptr()
    torch.testing.assert_close(Activation("gelu", gain=3.0)(x), 3.0 * torch.nn.functional.gelu(x))


def test_defaults_of_the_scalar_and_weight_normalized_layers():
    from normfree.layers import ScalarBias, ScalarGain, WeightNormConv2d

    x = torch.randn(2, 3, 4, 4)
    assert torch.equal(ScalarGain()(x), x) and torch.equal(ScalarBias()(x), x)  # g = 1, b = 0
    torch.manual_seed(0)
    wn = WeightNormConv2d(3, 4, 3).normalized_weight()  # plain WN: unit-norm filters, not centred
    torch.testing.assert_close(wn.flatten(1).norm(dim=1), torch.ones(4))
    assert wn.flatten(1).sum(dim=1).abs().max() > 0.1


def test_activation_constants_of_a_callable_and_their_guards():
    from normfree.layers import activation_gamma, activation_he_gain

    assert activation_he_gain(torch.relu) == pytest.approx(math.sqrt(2.0), rel=1e-8)
    assert activation_gamma(torch.relu) == pytest.approx(math.sqrt(2.0 / (1.0 - 1.0 / math.pi)), rel=1e-8)
    with torch.device("meta"):  # the integration grid stays on the CPU under a meta-device context
        assert activation_gamma(torch.tanh) == pytest.approx(activation_gamma("tanh"))
    for bad in (lambda z: torch.ones_like(z), lambda z: z * 0.0, lambda z: z * float("nan")):  # zero/undefined
        with pytest.raises(ValueError, match="zero or undefined variance"):
            activation_gamma(bad)
    for bad in (lambda z: torch.zeros_like(z), lambda z: z * float("nan")):
        with pytest.raises(ValueError, match="zero or undefined second moment"):
            activation_he_gain(bad)


@pytest.mark.parametrize("cls", ["Conv2d", "ScaledStdConv2d"])
def test_folded_weight_with_tensor_and_tuple_scales_is_the_formula(cls):
    """conv(x, in_scale=a, out_scale=b) == b * conv(a x): a a number or 0-d tensor, b a number,
    a per-channel tensor or a tuple of those (multiplied), the bias scaled by b too."""
    import normfree.layers as L

    torch.manual_seed(0)
    conv = getattr(L, cls)(3, 4, 3, padding=1, bias=True)
    with torch.no_grad():
        conv.bias.normal_()
    x = torch.randn(2, 3, 5, 5)
    per_channel = torch.tensor([0.5, 2.0, -1.0, 3.0])
    a = torch.tensor(0.7)
    plain = conv(x)
    cases = [(None, 0.5, 0.5), (a, None, 1.0), (a, per_channel, per_channel.view(1, -1, 1, 1)),
             (0.3, (per_channel, 0.5, torch.tensor(2.0)), per_channel.view(1, -1, 1, 1)),
             ((a, 2.0), (torch.tensor(-1.5),), -1.5), (2.0, 2.0, 2.0), (4.0, 0.5, 0.5), (0.5, 2.0, 2.0)]
    for in_scale, out_scale, b in cases:
        scale_in = 1.0
        for s in (in_scale if isinstance(in_scale, tuple) else (in_scale,)):
            scale_in = scale_in * (1.0 if s is None else s)
        want = b * conv(x * scale_in)
        torch.testing.assert_close(conv(x, in_scale=in_scale, out_scale=out_scale), want, rtol=1e-5, atol=1e-5)
    assert torch.equal(conv(x), plain)
    for c in (torch.tensor(0.25), per_channel):  # add_bias: + c after the conv
        torch.testing.assert_close(conv(x, add_bias=c), plain + c.reshape(1, -1, 1, 1).expand(1, 4, 1, 1))
        with torch.no_grad():  # (and in the cache's key)
            torch.testing.assert_close(conv(x, add_bias=c), plain + c.reshape(1, -1, 1, 1).expand(1, 4, 1, 1))
    d = torch.tensor(0.4)
    torch.testing.assert_close(conv(x, in_bias=d), conv(x + d), rtol=1e-5, atol=1e-5)
    fresh = getattr(L, cls)(3, 4, 3, padding=1, bias=True)
    fresh.load_state_dict(conv.state_dict())
    fresh = fresh.to(memory_format=torch.channels_last)  # the weight's rows read in that layout
    torch.testing.assert_close(fresh(x), plain, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("kw", [dict(padding=2, dilation=2), dict(padding=1, padding_mode="reflect")])
def test_in_bias_of_a_dilated_or_reflect_padded_conv(kw):
    """conv(x, in_bias=d) == conv(x + d): by conv(ones) with zero padding (dilated too),
    by adding d first with any other padding mode."""
    torch.manual_seed(0)
    conv = Conv2d(3, 4, 3, bias=True, **kw)
    x, d = torch.randn(2, 3, 7, 7), torch.tensor(-0.6)
    torch.testing.assert_close(conv(x, in_bias=d), conv(x + d), rtol=1e-5, atol=1e-5)


def test_the_weight_cache_keeps_the_two_latest_scalings():
    conv = ScaledStdConv2d(3, 4, 3, padding=1)
    x = torch.randn(1, 3, 5, 5)
    with torch.no_grad():
        for s in (0.5, 0.25, 2.0, 0.5):
            conv(x, out_scale=s)
    assert len(conv._fold_cache) == 2


def test_the_weight_cache_tells_tuple_scales_apart():
    """Under no_grad a cached conv keyed on (gain tensor, number): changing only the number
    must not return the folded weight of the old one."""
    from normfree.layers import ScaledStdConv2d

    conv = ScaledStdConv2d(3, 4, 3, padding=1)
    g = torch.tensor(1.5)
    x = torch.randn(2, 3, 5, 5)
    with torch.no_grad():
        half, quarter = conv(x, out_scale=(g, 0.5)), conv(x, out_scale=(g, 0.25))
        other = conv(x, out_scale=(torch.tensor(3.0), 0.25))
    torch.testing.assert_close(quarter, half / 2)
    torch.testing.assert_close(other, half)
    s = torch.tensor([2.0, 3.0, 4.0, 5.0])
    with torch.no_grad():  # a 0-d view shares its base's storage, version and data pointer: not its identity
        first = conv(x, out_scale=s[0])
        per_channel = conv(x, out_scale=s)
    torch.testing.assert_close(per_channel, first / 2.0 * s.view(1, -1, 1, 1))
