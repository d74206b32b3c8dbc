"""Laws that hold for every input, checked on inputs Hypothesis draws.

* AGC (Brock et al. 2021, deepmind-research/nfnets/agc_optax.py) never increases a
  unit's gradient norm, brings every unit to at most lambda * max(||W_i||, eps), and
  leaves the units already under that bound bit for bit alone.
* Scaled WS (Qiao et al. 2019; Brock et al. 2021) gives every filter zero mean and
  norm 1 (norm sqrt(q / eps) below the eps guard), whatever the weight, and the
  conv computes with gain x that filter.
* measure_signal's statistics equal a plain NumPy computation on the block
  outputs, for any input shape and any chunk size.

Examples per test: tests/conftest.py's Hypothesis profile (40; 10 under ``make mutate``).
"""
import math

import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

hypothesis = pytest.importorskip("hypothesis")
from hypothesis import example, given, strategies as st  # noqa: E402
from hypothesis.extra.numpy import arrays  # noqa: E402

from normfree.agc import adaptive_clip_grad_  # noqa: E402
from normfree.layers import ScaledStdConv2d  # noqa: E402
from normfree.signal import measure_signal  # noqa: E402

SHAPES = st.sampled_from([(), (5,), (4, 3), (3, 2, 3, 3), (6, 1, 1, 1), (2, 5, 1, 1)])
# zero, or a magnitude from 2^-10 to 1 (float32 has no trouble with these; subnormals are another subject)
VALUES = st.one_of(st.just(0.0), st.floats(2.0 ** -10, 1.0, width=32), st.floats(-1.0, -2.0 ** -10, width=32))


@st.composite
def weight_and_grad(draw):
    shape = draw(SHAPES)
    w = draw(arrays(np.float32, shape, elements=VALUES)) * np.float32(10.0 ** draw(st.integers(-3, 2)))
    g = draw(arrays(np.float32, shape, elements=VALUES)) * np.float32(10.0 ** draw(st.integers(-4, 2)))
    return torch.from_numpy(np.array(w)), torch.from_numpy(np.array(g))


def _units(t: torch.Tensor):
    """The AGC units of ``t``: the whole tensor when every dim after the first is 1, else its rows."""
    if t.dim() <= 1 or all(n == 1 for n in t.shape[1:]):
        return [t.reshape(-1)]
    return [row.reshape(-1) for row in t]


@given(wg=weight_and_grad(), lam=st.sampled_from([1e-3, 0.01, 0.1, 1.0]), eps=st.sampled_from([0.0, 1e-3, 0.1]))
def test_agc_never_increases_a_unit_norm_and_leaves_small_units_alone(wg, lam, eps):
    w, g = wg
    p = nn.Parameter(w.clone())
    p.grad = g.clone()
    clipped = adaptive_clip_grad_([p], clipping=lam, eps=eps)
    sure, unsure = 0, 0
    for wi, gi, gi_new in zip(_units(w), _units(g), _units(p.grad)):
        bound = lam * max(float(wi.double().norm()), eps)
        before, after = float(gi.double().norm()), float(gi_new.double().norm())
        assert after <= before * (1 + 1e-6)  # never increases
        assert after <= bound * (1 + 1e-5)  # at most the bound
        if before < bound * (1 - 1e-5):
            assert torch.equal(gi_new, gi)  # under the bound: untouched, bit for bit
        elif before > bound * (1 + 1e-5):
            sure += 1
            if before >= 1e-6:  # the direction is kept, the norm set to the bound
                assert after == pytest.approx(bound, rel=1e-5)
                torch.testing.assert_close(gi_new * before, gi * after, rtol=1e-4, atol=1e-6 * before * after)
        else:  # within float32 rounding of the bound: either way
            unsure += 1
    assert sure <= int(clipped) <= sure + unsure


@given(shape=st.sampled_from([(3, 2, 3, 3), (4, 1, 1, 1), (2, 5, 1, 1), (1, 3, 3, 3)]),
       data=st.data(), offset=st.floats(-5, 5), scale_exp=st.integers(-2, 2))
def test_scaled_ws_filters_have_zero_mean_and_fixed_norm_for_any_weight(shape, data, offset, scale_exp):
    raw = data.draw(arrays(np.float32, shape, elements=VALUES))
    w = torch.from_numpy(np.array(raw)) * 10.0 ** scale_exp + offset
    conv = ScaledStdConv2d(shape[1], shape[0], shape[2], padding=shape[2] // 2, bias=False)
    with torch.no_grad():
        conv.weight.copy_(w)
        conv.gain.copy_(torch.linspace(0.5, 2.0, shape[0]).view(-1, 1, 1, 1))
    got = conv.standardized_weight().detach().double().reshape(shape[0], -1)
    # NumPy, in float64: c = w - mean(w), q = sum(c^2), w_hat = c / sqrt(max(q, eps))
    rows = w.double().numpy().reshape(shape[0], -1)
    c = rows - rows.mean(axis=1, keepdims=True)
    q = (c * c).sum(axis=1)
    want = c / np.sqrt(np.maximum(q, conv.eps))[:, None]
    # float32 rounding of w (2.4e-7 |w| per entry), in units of the standardized weight
    spread = 2.4e-7 * np.abs(rows).max() / math.sqrt(max(q.min(), conv.eps))
    np.testing.assert_allclose(got.numpy(), want, atol=1e-5 + 20 * spread)
    assert np.abs(got.mean(dim=1).numpy()).max() <= 1e-5 + spread  # zero mean
    norms = got.norm(dim=1).numpy()
    big = q >= 10 * conv.eps
    np.testing.assert_allclose(norms[big], 1.0, rtol=1e-4)  # norm 1 wherever the guard is not active
    assert np.all(norms <= 1 + 1e-4)
    # and the conv computes with gain x w_hat
    x = torch.randn(2, shape[1], 5, 5, generator=torch.Generator().manual_seed(0))
    ref = F.conv2d(x.double(), conv.gain.double() * got.view(shape), padding=shape[2] // 2)
    with torch.no_grad():
        torch.testing.assert_close(conv(x).double(), ref, rtol=1e-4, atol=1e-4)


class _Mix(nn.Module):
    """tanh of a channel mix along dim 1, for inputs of any number of dims."""

    def __init__(self, c, seed):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(c, c, generator=torch.Generator().manual_seed(seed)) / math.sqrt(c))

    def forward(self, x):
        return torch.tanh(torch.einsum("nc...,dc->nd...", x, self.weight) + 0.3)


class _Block(nn.Module):
    """y = skip + s f(x); skip = shortcut(x) (a fixed 2x scaling here) or x."""

    def __init__(self, c, seed, s, project):
        super().__init__()
        self.branch = _Mix(c, seed)
        self.shortcut = _Mix(c, seed + 100) if project else None
        self.s = s

    def forward(self, x):
        skip = x if self.shortcut is None else self.shortcut(x)
        return skip + self.s * self.branch(x)


def _np_stats(t: torch.Tensor):
    """(mean_c (mean x)^2, mean_c var x) over all dims but dim 1, in float64 NumPy."""
    a = t.detach().double().numpy()
    a = np.moveaxis(a, 1, 0).reshape(a.shape[1], -1)
    return float((a.mean(axis=1) ** 2).mean()), float(a.var(axis=1).mean())


@given(n=st.integers(1, 6), c=st.integers(1, 4), spatial=st.lists(st.integers(1, 5), max_size=2),
       chunk=st.integers(1, 7), seed=st.integers(0, 3))
@example(n=4, c=3, spatial=[], chunk=3, seed=0)  # (N, C) features: always tried, whatever the profile
def test_measure_signal_equals_numpy_for_any_shape_and_chunk(n, c, spatial, chunk, seed):
    torch.manual_seed(seed)
    model = nn.Sequential(_Block(c, seed, 0.5, False), _Block(c, seed + 1, 1.5, True), _Block(c, seed + 2, 1.0, False))
    x = torch.randn(n, c, *spatial, generator=torch.Generator().manual_seed(seed)) * 2 + 0.5
    stats = measure_signal(model, x, blocks=list(model), branches={b: b.branch for b in model},
                           chunk_size=chunk)
    assert stats.chunk_size == min(chunk, n)
    h = x
    in_mean_sq, in_var = _np_stats(x)
    assert stats.input_mean_sq == pytest.approx(in_mean_sq, rel=1e-5)
    assert stats.input_var == pytest.approx(in_var, rel=1e-5, abs=1e-6 * (in_mean_sq + in_var))
    with torch.no_grad():
        for rec, b in zip(stats, model):
            skip = h if b.shortcut is None else b.shortcut(h)
            f = b.branch(h)
            h = b(h)
            # float32 per-sample sums: the variance carries an error ~1e-7 x the second moment
            mean_sq, var = _np_stats(h)
            assert rec.channels == c
            assert rec.mean_sq == pytest.approx(mean_sq, rel=1e-5, abs=1e-9)
            assert rec.var == pytest.approx(var, rel=1e-5, abs=1e-6 * (mean_sq + var) + 1e-12)
            res_mean_sq, res_var = _np_stats(f)
            assert rec.res_var == pytest.approx(res_var, rel=1e-5, abs=1e-6 * (res_mean_sq + res_var) + 1e-12)
            assert rec.res_mean_sq == pytest.approx(res_mean_sq, rel=1e-5, abs=1e-9)
            skip_mean_sq, skip_var = _np_stats(skip)
            assert rec.skip_var == pytest.approx(skip_var, rel=1e-5, abs=1e-6 * (skip_mean_sq + skip_var) + 1e-12)
            if skip_var > 1e-3 and rec.skip_var > 1e-3:  # measure_signal's ratio uses the block's branch scale s (1: unknown here)
                assert rec.ratio == pytest.approx(math.sqrt(res_var / skip_var), rel=1e-4)
