"""Signal propagation: the SPP properties the papers claim, exactness of chunking,
hooks that leave the model alone, foreign models, predictions, errors."""
import contextlib
import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import normfree
from normfree.signal import (compare_models, effective_depth, find_blocks, measure_gradients, measure_signal,
                             path_length_distribution, predict_variance, write_csv, write_json)


def model(name, seed=0, **kw):
    torch.manual_seed(seed)
    kw.setdefault("depth", 28)
    kw.setdefault("width", 1)
    return normfree.create_model(name, **kw)


def by_stage(stats):
    out = {}
    for r in stats:
        out.setdefault(r.stage, []).append(r)
    return list(out.values())


# --------------------------------------------------------------------------
# the papers' SPP properties
# --------------------------------------------------------------------------
def test_relubn_variance_grows_linearly_within_each_stage():
    stats = measure_signal(model("relubn_wrn"), (32, 3, 16, 16))
    assert [len(s) for s in by_stage(stats)] == [4, 4, 4]
    for stage in by_stage(stats):
        var = np.array([r.var for r in stage])
        inc = np.diff(var)
        assert np.all(inc > 0)
        # constant increments (linear), not a constant ratio (exponential)
        assert inc.max() / inc.min() < 1.6, inc
        k = np.arange(len(var))
        fit = np.polyfit(k, var, 1)
        resid = var - np.polyval(fit, k)
        assert 1 - resid.var() / var.var() > 0.98
        # the branch adds ~ its own variance (ReLU -> BN -> He conv: ~2) per block
        assert 1.0 < inc.mean() < 2.5
        assert all(0.7 * inc.mean() < r.res_var < 1.5 * inc.mean() for r in stage[1:])
    # the branch is downscaled relative to the skip path (De & Smith 2020): with
    # branch variance c on a skip of v0 + (l-1) c, the ratio is sqrt(c / (v0 + (l-1) c)),
    # ~ 1/sqrt(l) once l c dominates the stem's v0
    stage = by_stage(stats)[0]
    ratios = [r.ratio for r in stage]
    assert all(a > b for a, b in zip(ratios, ratios[1:]))
    c = np.mean(np.diff([stats.input_var] + [r.var for r in stage]))
    law = [math.sqrt(c / (stats.input_var + (l - 1) * c)) for l in range(1, 5)]
    assert np.allclose(ratios, law, rtol=0.15), (ratios, law)


def test_unnormalized_variance_roughly_doubles_per_block():
    stats = measure_signal(model("none_wrn", width=2), (8, 3, 32, 32))
    ratios = [b.var / a.var for s in by_stage(stats) for a, b in zip(s, s[1:])]
    gmean = math.exp(np.mean(np.log(ratios)))
    # He init preserves the second moment, which doubles; the variance loses
    # the part that becomes channel means: between (2 - 1/pi) = 1.68 and 2
    assert 1.5 < gmean < 2.5, ratios
    second = [r.var + r.mean_sq for r in stats]
    g2 = (second[-1] / second[0]) ** (1 / (len(second) - 1))
    assert 1.6 < g2 < 2.4
    assert stats[-1].var > 100 * stats.input_var


def test_nf_scaled_ws_keeps_unit_branch_variance_and_tracks_one_plus_k_alpha2():
    m = model("nf_wrn", gain_init=1.0)  # the SPP convention: SkipInit gain at 1
    stats = measure_signal(m, (8, 3, 64, 64))
    alpha = 0.2
    for r in stats:
        assert 0.75 < r.res_var < 1.25, (r.index, r.res_var)
        assert r.mean_sq < 0.03
        assert r.branch_scale == pytest.approx(alpha)
    # var after the k-th block of a stage ~ 1 + k alpha^2 (width 1: the first
    # stage has no transition, so its count runs on from the stem's 1)
    expected = [b.expected_var_out for b in m.blocks]
    assert expected[:5] == pytest.approx([1 + k * alpha ** 2 for k in (1, 2, 3, 4, 1)])
    assert max(abs(r.var - e) for r, e in zip(stats, expected)) < 0.15
    for stage in by_stage(stats):
        slope = np.polyfit(np.arange(len(stage)), [r.var for r in stage], 1)[0]
        assert 0.4 * alpha ** 2 < slope < 1.6 * alpha ** 2, slope
    assert expected == pytest.approx(predict_variance(m))


def test_nf_he_shows_the_mean_drift_that_scaled_ws_removes():
    ws = measure_signal(model("nf_wrn", gain_init=1.0), (8, 3, 64, 64))
    he = measure_signal(model("nf_he_wrn", gain_init=1.0), (8, 3, 64, 64))
    assert he[-1].mean_sq > 20 * ws[-1].mean_sq
    assert he[-1].mean_sq > 5 * he[0].mean_sq  # drifts upward with depth
    assert max(r.res_var for r in he) > 1.25  # and the branch variance is not steady


def test_skipinit_alpha_zero_keeps_the_variance_constant():
    m = model("skipinit_wrn")
    assert all(b.gain.gain.item() == 0.0 for b in m.blocks)
    stats = measure_signal(m, (16, 3, 16, 16))
    for stage in by_stage(stats):
        assert [r.var for r in stage] == pytest.approx([stage[0].var] * len(stage), rel=1e-6)
    assert stats[0].var == pytest.approx(stats.input_var, rel=1e-6)
    assert all(r.ratio == 0.0 for r in stats)
    assert all(r.res_var > 0.1 for r in stats)  # f(x) is still measured (before the zero gain)
    assert max(r.var for r in stats) / min(r.var for r in stats) < 3
    pred = predict_variance(m, v0=stats.input_var)
    assert pred == pytest.approx([stats.input_var] * len(stats))


@pytest.mark.parametrize("name", ["nf_wrn", "fixup_wrn", "rescale_wrn"])
def test_residual_statistics_before_gain_equal_unfolded_branch_out(name):
    m = model(name, depth=10)
    if name == "fixup_wrn":  # as if trained: nonzero last conv, gain != 1, scalar biases != 0
        with torch.no_grad():
            for b in m.blocks:
                b.convs[-1].weight.normal_(0, 0.1)
                b.gain.gain.fill_(-0.7)
                b.out_bias.bias.fill_(0.3)
                for mod in b.modules():
                    if isinstance(mod, normfree.ScalarBias) and mod is not b.out_bias:
                        mod.bias.fill_(0.1)
    x = torch.randn(8, 3, 8, 8)
    stats = measure_signal(m, x)
    seen = []
    hooks = [b.branch_out.register_forward_hook(lambda _m, _i, o: seen.append(o)) for b in m.blocks]
    with normfree.unfolded(m), torch.no_grad():
        m.eval()(x)
    for h in hooks:
        h.remove()
    assert [r.res_var for r in stats] == pytest.approx(
        [float(o.var(dim=(0, 2, 3), unbiased=False).mean()) for o in seen], rel=1e-4)
    assert [r.res_mean_sq for r in stats] == pytest.approx(
        [float(o.mean(dim=(0, 2, 3)).square().mean()) for o in seen], rel=1e-3, abs=1e-9)


# --------------------------------------------------------------------------
# exactness, side effects
# --------------------------------------------------------------------------
@pytest.mark.parametrize("name", ["nf_wrn", "skipinit_wrn", "rescale_wrn"])
def test_chunked_and_one_pass_measurements_agree(name):
    m = model(name, depth=16)
    x = torch.randn(24, 3, 8, 8) * 3 + 1  # a mean shift makes the sums of squares work
    one = measure_signal(m, x)
    chunked = measure_signal(m, x, chunk_size=5)
    for a, b in zip(one, chunked):
        for f in ("mean_sq", "var", "res_var", "skip_var", "ratio"):
            assert getattr(b, f) == pytest.approx(getattr(a, f), rel=1e-5, abs=1e-9), (name, a.index, f)
    # generated noise is the same whatever the chunk size
    g1 = measure_signal(m, (24, 3, 8, 8), seed=3)
    g2 = measure_signal(m, (24, 3, 8, 8), seed=3, chunk_size=7)
    assert g1.column("var") == pytest.approx(g2.column("var"), rel=1e-5)
    assert measure_signal(m, (24, 3, 8, 8), seed=4).column("var") != pytest.approx(g1.column("var"), rel=1e-5)


def test_automatic_chunks_follow_the_memory_budget():
    m = model("nf_wrn", depth=10)
    x = torch.randn(12, 3, 8, 8)
    one = measure_signal(m, x)
    assert one.chunk_size == 12
    # largest activation 16 x 8 x 8 floats per sample, 6 of them: 24 KiB per sample
    small = measure_signal(m, x, memory_budget=6 * 16 * 64 * 4 * 5)
    assert small.chunk_size == 5
    assert small.column("var") == pytest.approx(one.column("var"), rel=1e-5)
    assert small.column("res_var") == pytest.approx(one.column("res_var"), rel=1e-5)


def test_statistics_match_a_direct_computation():
    m = model("bn_wrn", depth=10)
    x = torch.randn(16, 3, 8, 8)
    outs = []
    hooks = [b.register_forward_hook(lambda _m, _i, o: outs.append(o.detach())) for b in m.blocks]
    m.train()
    with torch.no_grad():
        m(x)
    for h in hooks:
        h.remove()
    m2 = model("bn_wrn", depth=10)  # the same weights, fresh running stats
    stats = measure_signal(m2, x)
    for r, o in zip(stats, outs):
        assert r.mean_sq == pytest.approx(float(o.mean(dim=(0, 2, 3)).square().mean()), rel=1e-4)
        assert r.var == pytest.approx(float(o.var(dim=(0, 2, 3), unbiased=False).mean()), rel=1e-4)


@pytest.mark.parametrize("name,train", [("bn_wrn", True), ("nf_wrn", False), ("skipinit_wrn", True)])
def test_measuring_leaves_the_model_unchanged(name, train):
    m = model(name, depth=10)
    m.train(train)
    x = torch.randn(8, 3, 8, 8)
    state = {k: v.clone() for k, v in m.state_dict().items()}
    flags = [mod.training for mod in m.modules()]
    hooks = [len(mod._forward_hooks) + len(mod._forward_pre_hooks) for mod in m.modules()]
    with torch.no_grad():
        before = m.eval()(x)
    m.train(train)
    with pytest.warns(UserWarning) if name == "bn_wrn" else contextlib.nullcontext():
        measure_signal(m, x, chunk_size=3)
    measure_gradients(m, x, torch.randint(0, 10, (8,)))
    assert [mod.training for mod in m.modules()] == flags
    assert [len(mod._forward_hooks) + len(mod._forward_pre_hooks) for mod in m.modules()] == hooks
    assert all(b.fold_scalars and b.fold_biases for b in m.blocks)
    for k, v in m.state_dict().items():
        assert torch.equal(v, state[k]), k
    assert all(p.grad is None for p in m.parameters())
    with torch.no_grad():
        assert torch.equal(m.eval()(x), before)


def test_bn_chunks_warn_and_running_mode_differs():
    m = model("bn_wrn", depth=10)
    x = torch.randn(16, 3, 8, 8)
    with pytest.warns(UserWarning, match="chunk"):
        measure_signal(m, x, chunk_size=4)
    batch = measure_signal(m, x)
    running = measure_signal(m, x, bn_stats="running")  # BN = identity at init: no normalization
    assert running[-1].var > 1.5 * batch[-1].var  # ~2^3 x the stem's ~1 against ~1
    with pytest.raises(ValueError, match="bn_stats"):
        measure_signal(m, x, bn_stats="train")


# --------------------------------------------------------------------------
# anyone's model
# --------------------------------------------------------------------------
class TVBlock(nn.Module):
    """A torchvision-style post-activation BasicBlock, written here (not ours)."""

    def __init__(self, cin, cout, stride):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.downsample = None
        if stride != 1 or cin != cout:
            self.downsample = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x):
        out = self.bn2(self.conv2(F.relu(self.bn1(self.conv1(x)))))
        idt = x if self.downsample is None else self.downsample(x)
        return F.relu(out + idt)


class TVResNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 3, 1, 1)
        self.layer1 = nn.Sequential(TVBlock(8, 8, 1), TVBlock(8, 8, 1))
        self.layer2 = nn.Sequential(TVBlock(8, 16, 2), TVBlock(16, 16, 1))
        self.fc = nn.Linear(16, 10)

    def forward(self, x):
        x = self.layer2(self.layer1(self.conv1(x)))
        return self.fc(x.mean((2, 3)))


class OddBlock(nn.Module):
    """A residual block with names no heuristic knows: y = x + 0.5 * body(x)."""

    def __init__(self, c):
        super().__init__()
        self.body = nn.Sequential(nn.ReLU(), nn.Conv2d(c, c, 3, padding=1))

    def forward(self, x):
        return x + 0.5 * self.body(x)


def test_a_foreign_torchvision_style_resnet_is_measured():
    torch.manual_seed(0)
    net = TVResNet()
    assert find_blocks(net) == [net.layer1[0], net.layer1[1], net.layer2[0], net.layer2[1]]
    x = torch.randn(16, 3, 8, 8)
    seen = []
    hooks = [b.bn2.register_forward_hook(lambda _m, _i, o: seen.append(float(o.var(dim=(0, 2, 3), unbiased=False).mean())))
             for b in find_blocks(net)]
    with torch.no_grad():
        net.train()(x)
    for h in hooks:
        h.remove()
    torch.manual_seed(0)
    net = TVResNet()
    stats = measure_signal(net, x)
    assert [r.name for r in stats] == ["layer1.0", "layer1.1", "layer2.0", "layer2.1"]
    assert [r.stage for r in stats] == [1, 1, 2, 2]
    assert [r.channels for r in stats] == [8, 8, 16, 16]
    for r, v in zip(stats, seen):
        assert r.res_var == pytest.approx(v, rel=1e-4)  # BN output: ~1
        assert r.skip_var is not None and r.ratio is not None


def test_user_named_blocks_and_branches():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), OddBlock(8), OddBlock(8), OddBlock(8))
    with pytest.raises(ValueError, match="blocks="):
        measure_signal(net, (4, 3, 8, 8))
    blocks = list(net)[1:]
    stats = measure_signal(net, (4, 3, 8, 8), blocks=blocks)
    assert [r.name for r in stats] == ["1", "2", "3"]
    assert all(r.res_var is None and r.ratio is None for r in stats)  # branch unknown: documented None
    stats = measure_signal(net, (4, 3, 8, 8), blocks=blocks, branches={b: b.body for b in blocks})
    assert all(r.res_var > 0 for r in stats)
    assert stats[0].var > stats.input_var


class TokenBlock(nn.Module):
    """A transformer-style residual MLP on (N, L, C) tokens: y = x + mlp(x)."""

    def __init__(self, c):
        super().__init__()
        self.mlp = nn.Sequential(nn.Linear(c, 2 * c), nn.GELU(), nn.Linear(2 * c, c))

    def forward(self, x):
        return x + self.mlp(x)


def test_channels_last_tokens_with_channel_dim():
    torch.manual_seed(0)
    net = nn.Sequential(TokenBlock(6), TokenBlock(6))
    x = torch.randn(5, 7, 6) + 0.5
    stats = measure_signal(net, x, blocks=list(net), branches={b: b.mlp for b in net}, channel_dim=-1)
    with torch.no_grad():
        h1 = net[0](x)
        h2 = net[1](h1)
        f2 = net[1].mlp(h1)
    flat = lambda t: t.reshape(-1, 6)  # noqa: E731
    assert stats[1].var == pytest.approx(float(flat(h2).var(0, unbiased=False).mean()), rel=1e-5)
    assert stats[1].mean_sq == pytest.approx(float(flat(h2).mean(0).square().mean()), rel=1e-5)
    assert stats[1].res_var == pytest.approx(float(flat(f2).var(0, unbiased=False).mean()), rel=1e-5)
    assert stats[0].channels == 6 and stats.input_var == pytest.approx(float(flat(x).var(0, unbiased=False).mean()))


# --------------------------------------------------------------------------
# bad input
# --------------------------------------------------------------------------
def test_clear_errors_for_bad_input():
    m = model("nf_wrn", depth=10)
    stranger = nn.Conv2d(3, 3, 1)
    with pytest.raises(ValueError, match=r"blocks\[1\] \(Conv2d\) is not a module of this ResNet"):
        measure_signal(m, (2, 3, 8, 8), blocks=[m.blocks[0], stranger])
    with pytest.raises(ValueError, match=r"expected input of shape \(N, 3, H, W\)"):
        measure_signal(m, torch.randn(2, 1, 8, 8))
    with pytest.raises(ValueError, match="input must have a batch dimension"):
        measure_signal(m, torch.randn(3))
    with pytest.raises(TypeError, match="x must be a tensor or an input shape"):
        measure_signal(m, "noise")
    with pytest.raises(ValueError, match="chunk_size"):
        measure_signal(m, (2, 3, 8, 8), chunk_size=0)
    with pytest.raises(ValueError, match="no residual blocks detected.*pass blocks="):
        measure_signal(nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU()), (2, 3, 8, 8))
    with pytest.raises(ValueError, match="branches"):
        measure_signal(m, (2, 3, 8, 8), blocks=[m.blocks[0]], branches={m.blocks[1]: m.blocks[1].branch_out})
    torch.manual_seed(0)
    with pytest.raises(ValueError, match=r"first convolution takes 3 input channels: pass \(N, 3, H, W\)"):
        measure_signal(TVResNet(), torch.randn(2, 5, 8, 8))
    m.unused = nn.Identity()
    with pytest.raises(ValueError, match=r"block 1 \(unused\) was never called"):
        measure_signal(m, (2, 3, 8, 8), blocks=[m.blocks[0], m.unused])


# --------------------------------------------------------------------------
# predictions, paths, gradients
# --------------------------------------------------------------------------
def test_predictions_follow_each_method():
    bn = model("bn_wrn", depth=16)
    p = predict_variance(bn, v0=2.0)
    c = 1 - 1 / math.pi
    assert p[:2] == pytest.approx([2 + c, 2 + 2 * c])  # linear in the first stage
    assert p[2:4] == pytest.approx([2 * c, 3 * c])  # reset by the transition's conv shortcut
    none = predict_variance(model("none_wrn", depth=16), v0=1.0)
    assert none == pytest.approx([2.0 ** l for l in range(1, 7)])
    si = predict_variance("skipinit_wrn", depth=16, gain_init=0.5)
    assert si == pytest.approx([1.25 ** l for l in range(1, 7)])
    assert predict_variance("rescale_wrn", depth=16) == pytest.approx([1.0] * 6)
    nf = predict_variance("nf_resnet50", width=0.25, gain_init=1.0)
    assert nf[:3] == pytest.approx([1.04, 1.08, 1.12]) and nf[3] == pytest.approx(1.04)
    nf0 = predict_variance("nf_resnet50", width=0.25)  # the gain at its init, 0
    assert nf0[:4] == pytest.approx([1.0, 1.0, 1.0, 1 / 1.12])
    with pytest.raises(ValueError, match="normfree model"):
        predict_variance(TVResNet())
    # measured vs predicted for BN (norm -> ReLU): within 25% at 32x32
    stats = measure_signal(bn, (16, 3, 32, 32))
    pred = predict_variance(bn, v0=stats.input_var)
    assert stats.column("var") == pytest.approx(pred, rel=0.25)


@pytest.mark.parametrize("gain", [0.0, 1.0])
def test_nf_predictions_hold_with_the_skip_gain_at_init_and_at_one(gain):
    """With the gain at 0 (the official init) the transitions divide the variance by
    the tracked beta^2 = 1 + k alpha^2, which assumes the gain at 1; at 1 the
    variance follows the tracked 1 + k alpha^2."""
    m = model("nf_wrn", gain_init=gain)
    stats = measure_signal(m, (8, 3, 64, 64))
    pred = predict_variance(m, v0=stats.input_var)
    assert stats.column("var") == pytest.approx(pred, rel=0.1)
    if gain == 0.0:
        assert pred[4] == pytest.approx(pred[0] / (1 + 4 * 0.2 ** 2))  # the first transition: v / beta^2
        assert pred[:4] == pytest.approx([stats.input_var] * 4)
    torch.manual_seed(0)
    r50 = normfree.create_model("nf_resnet50", width=0.25, gain_init=gain)
    stats = measure_signal(r50, (4, 3, 128, 128))
    # v0 = 1: the NF design; the stem's max-pool leaves channel means the pre-activation passes on
    assert stats.column("var") == pytest.approx(predict_variance(r50), rel=0.15)


def test_compare_models_can_keep_the_registered_nf_gain():
    results, preds = compare_models(["nf_wrn"], batch=4, resolution=8, depth=10, nf_gain=None)
    assert list(results) == ["nf_wrn"]
    assert all(r.branch_scale == 0.0 for r in results["nf_wrn"])
    results, _ = compare_models(["nf_wrn"], batch=4, resolution=8, depth=10, gain_init=0.5)
    assert list(results) == ["nf_wrn"] and results["nf_wrn"][0].branch_scale == pytest.approx(0.1)
    with pytest.raises(ValueError, match="nf_gain must be a finite number or None, got nan"):
        compare_models(["nf_wrn"], nf_gain=float("nan"))


def test_path_lengths_are_binomial_and_effective_depth_is_shallow_under_bn():
    d = path_length_distribution(54)
    assert d.sum() == pytest.approx(1.0)
    assert d == pytest.approx([math.comb(54, k) / 2 ** 54 for k in range(55)], rel=1e-9, abs=1e-300)
    # Veit et al.: most paths of a 54-block ResNet are 19..35 blocks deep (binomial bulk)
    assert d[19:36].sum() > 0.95
    assert len(path_length_distribution(model("nf_wrn", depth=10))) == 4
    with pytest.raises(ValueError):
        path_length_distribution(3, p=[0.5, 0.5])
    stats = measure_signal(model("relubn_wrn", depth=100), (8, 3, 8, 8))
    eff = effective_depth(stats)
    assert eff["blocks"] == 48 and eff["distribution"].sum() == pytest.approx(1.0)
    assert eff["mean"] == pytest.approx(sum(eff["p"]))
    none = effective_depth(measure_signal(model("none_wrn", depth=100), (8, 3, 8, 8)))
    assert eff["mean"] < 0.7 * none["mean"]  # BN downweights deep branches (~1/l): shallower
    assert effective_depth(measure_signal(model("skipinit_wrn"), (4, 3, 8, 8)))["mean"] == 0.0


def test_gradient_norms_per_block_match_autograd_and_chunking():
    m = model("nf_wrn", depth=10)
    x, y = torch.randn(12, 3, 8, 8), torch.randint(0, 10, (12,))
    g = measure_gradients(m, x, y)
    outs = []
    hooks = [b.register_forward_hook(lambda _m, _i, o: outs.append(o)) for b in m.blocks]
    m.eval()
    loss = F.cross_entropy(m(x), y)
    for h in hooks:
        h.remove()
    ref = torch.autograd.grad(loss, outs)
    assert [r.norm for r in g] == pytest.approx([float(t.norm()) for t in ref], rel=1e-4)
    assert [r.rms for r in g] == pytest.approx([float(t.norm()) / math.sqrt(t.numel()) for t in ref], rel=1e-4)
    chunked = measure_gradients(m, x, y, chunk_size=5)
    assert [r.norm for r in chunked] == pytest.approx([r.norm for r in g], rel=1e-4)
    with pytest.raises(ValueError, match="one target per sample"):
        measure_gradients(m, x, y[:3])


# --------------------------------------------------------------------------
# export, figure, command line
# --------------------------------------------------------------------------
def test_compare_export_plot_and_cli(tmp_path, capsys):
    from normfree.cli import main
    from normfree.plots import plot_spp

    results, preds = compare_models(["nf_wrn", "bn_wrn"], batch=8, resolution=8, depth=10)
    assert list(results) == ["nf_wrn (gain 1)", "bn_wrn"]  # NF drawn with its SkipInit gain at 1, and says so
    nf_label = "nf_wrn (gain 1)"
    paths = plot_spp(results, tmp_path / "fig.png", predictions=preds)
    assert [p[-4:] for p in paths] == [".png", ".svg"]
    assert (tmp_path / "fig.png").read_bytes()[:4] == b"\x89PNG" and (tmp_path / "fig.svg").stat().st_size > 1000
    write_csv(results, tmp_path / "s.csv", preds)
    rows = (tmp_path / "s.csv").read_text().splitlines()
    assert len(rows) == 1 + 2 * 3 and rows[0].startswith("model,index,name,stage")
    doc = json.loads(write_json(results, tmp_path / "s.json", preds) and (tmp_path / "s.json").read_text())
    assert doc["models"][nf_label]["predicted_var"] == pytest.approx(preds[nf_label])

    out = tmp_path / "cli" / "spp.png"
    rc = main(["spp", "--model", "nf_wrn", "--compare", "skipinit_wrn", "--depth", "10", "--batch", "4",
               "--resolution", "8", "--grads", "--out", str(out)])
    assert rc == 0
    for f in ("spp.png", "spp.svg", "spp.csv", "spp.json", "spp_paths.png", "spp_paths.svg", "spp_grads.png"):
        assert (tmp_path / "cli" / f).exists(), f
    doc = json.loads((tmp_path / "cli" / "spp.json").read_text())
    assert doc["models"][nf_label]["input_shape"] == [4, 3, 8, 8] and doc["models"][nf_label]["nf_gain"] == 1.0
    assert "SkipInit gain at 1" in capsys.readouterr().out
    assert len(doc["models"][nf_label]["grads"]) == 3 and doc["models"][nf_label]["grads"][0]["norm"] > 0
    assert all(g["norm"] == 0 for g in doc["models"]["skipinit_wrn"]["grads"])  # zero-init classifier
    assert main(["spp", "--model", "nf_wrm", "--out", str(out)]) == 2


# --------------------------------------------------------------------------
# against DeepMind's official NF-ResNet-50
# --------------------------------------------------------------------------
OFFICIAL_NF_RESNET50 = Path(__file__).parent / "data" / "official_spp_nf_resnet50.json"


def test_nf_resnet50_matches_the_official_code_at_initialization():
    """tests/data/official_spp_nf_resnet50.json: DeepMind's nfnets/nf_resnet.py run
    with its skip gains at 1 (branch nfref, benchmarks/official_reference/). The same
    parameters, betas, expected variances and stochastic-depth rates, and the same SPP
    within 10% (measured gap: up to ~5%, from TF's asymmetric SAME padding)."""
    ref = json.loads(OFFICIAL_NF_RESNET50.read_text())
    torch.manual_seed(0)
    m = normfree.create_model("nf_resnet50", num_classes=1000, gain_init=1.0, drop_path=0.1)
    assert sum(p.numel() for p in m.parameters()) == ref["num_params"]  # 25,557,048: skip gains included
    for b, c in zip(m.blocks, ref["block_config"]):
        # the official "beta" is the multiplier 1 / expected_std; ours is expected_std
        assert b.beta == pytest.approx(1 / c["beta"]) and b.expected_var == pytest.approx(c["expected_var_in"])
        assert b.drop_path == pytest.approx(c["stochdepth_rate"]) and (b.shortcut is not None) == c["use_projection"]
    n, h, w, ch = ref["setup"]["input_shape_nhwc"]
    x = torch.from_numpy(np.random.default_rng(0).standard_normal((n, h, w, ch), dtype=np.float32)).permute(0, 3, 1, 2)
    stats = measure_signal(m, x.contiguous())
    official = ref["mean_over_seeds"]["blocks"]
    assert len(stats) == len(official) == 16
    assert stats.column("var") == pytest.approx([o["avg_var"] for o in official], rel=0.1)
    assert stats.column("res_var") == pytest.approx([o["res_avg_var"] for o in official], rel=0.1)
    assert stats.column("mean_sq") == pytest.approx([o["avg_sq_mean"] for o in official], abs=0.01)
    assert stats.input_var == pytest.approx(ref["mean_over_seeds"]["stem"]["avg_var"], rel=0.1)


def test_format_table_keeps_long_labels_apart():
    """Two labels that share their first 18 characters (a model and its
    conversion) stay distinct in the text table, and the columns line up."""
    from normfree.signal import format_table

    torch.manual_seed(0)
    stats = normfree.measure_signal(normfree.create_model("skipinit_wrn", depth=10, width=1), (4, 3, 8, 8))
    a, b = "user_models:tv_small", "user_models:tv_small+skipinit"
    lines = format_table({a: stats, b: stats}).splitlines()
    assert {ln.split()[0] for ln in lines[1:]} == {a, b}
    assert len({len(ln) for ln in lines}) == 1


class TimmPostActBottleneck(nn.Module):
    """timm resnetv2.py's non-pre-activation Bottleneck (conv1 registered before norm1; used by ViT
    hybrids): f(x) ends with norm3. Written here with timm's attribute names."""

    def __init__(self, c):
        super().__init__()
        self.downsample = None
        self.conv1 = nn.Conv2d(c, c // 4, 1, bias=False)
        self.norm1 = nn.BatchNorm2d(c // 4)
        self.conv2 = nn.Conv2d(c // 4, c // 4, 3, 1, 1, bias=False)
        self.norm2 = nn.BatchNorm2d(c // 4)
        self.conv3 = nn.Conv2d(c // 4, c, 1, bias=False)
        self.norm3 = nn.BatchNorm2d(c)

    def forward(self, x):
        y = F.relu(self.norm1(self.conv1(x)))
        y = F.relu(self.norm2(self.conv2(y)))
        return F.relu(x + self.norm3(self.conv3(y)))


def _branch_variances(net, x, blocks, name):
    seen = []
    hooks = [getattr(b, name).register_forward_hook(
        lambda _m, _i, o: seen.append(float(o.var(dim=(0, 2, 3), unbiased=False).mean()))) for b in blocks]
    with torch.no_grad():
        net.train()(x)
    for h in hooks:
        h.remove()
    return seen


@pytest.mark.parametrize("basic", [False, True])
def test_timm_resnetv2_preactivation_blocks_are_found_and_their_branch_ends_with_the_last_conv(basic):
    from foreign_resnets import PreActBasic, PreActBottleneck, TimmResNetV2

    torch.manual_seed(0)
    net = TimmResNetV2([2, 1], channels=(32, 64), stem_chs=16, basic=basic, num_classes=10)
    blocks = find_blocks(net)
    kind = PreActBasic if basic else PreActBottleneck
    assert len(blocks) == 3 and all(type(b) is kind for b in blocks)
    x = torch.randn(8, 3, 32, 32)
    last = "conv2" if basic else "conv3"
    want = _branch_variances(net, x, blocks, last)
    stats = measure_signal(net, x)
    assert [r.name for r in stats] == ["stages.0.blocks.0", "stages.0.blocks.1", "stages.1.blocks.0"]
    assert [r.res_var for r in stats] == pytest.approx(want, rel=1e-4)
    # pre-activation BN: the block input keeps growing, the branch (after its BN-normalized input) does not
    assert stats[1].var > stats[0].var


def test_a_post_activation_timm_bottleneck_branch_ends_with_norm3():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), TimmPostActBottleneck(16), TimmPostActBottleneck(16))
    blocks = find_blocks(net)
    assert blocks == [net[1], net[2]]
    x = torch.randn(8, 3, 8, 8)
    want = _branch_variances(net, x, blocks, "norm3")
    stats = measure_signal(net, x)
    assert [r.res_var for r in stats] == pytest.approx(want, rel=1e-4) and want[0] == pytest.approx(1.0, abs=0.01)


def _moments(act, u, points=200_001):
    """(E[act(x)], E[act(x)^2]) for x ~ N(0, u), by NumPy on a grid (independent of normfree)."""
    z = np.linspace(-12.0, 12.0, points)
    w = np.exp(-0.5 * z * z) / math.sqrt(2 * math.pi)
    g = act(torch.from_numpy(z * math.sqrt(u))).numpy()
    return np.trapezoid(w * g, z), np.trapezoid(w * g * g, z)


def test_predictions_of_fixup_relubn_and_other_activations():
    """Fixup: zero branch, the pool+pad shortcut keeps cin/cout of the variance; ReLU -> BN:
    c = 2; a He-initialized GELU net: each conv maps u to G^2 E[gelu(x)^2], x ~ N(0, u), and
    so does a transition's conv shortcut; CWN with GELU: g^2 Var[gelu(x)] per conv."""
    assert predict_variance("fixup_wrn", depth=16) == pytest.approx([1.0, 1.0, 0.5, 0.5, 0.25, 0.25])
    assert predict_variance("relubn_wrn", depth=16, width=1) == pytest.approx([3.0, 5.0, 4.0, 6.0, 4.0, 6.0])
    gelu = F.gelu
    g2 = 1.0 / _moments(gelu, 1.0)[1]
    v, want = 1.0, []
    for block in range(3):  # depth 10: one block per stage, the last two are transitions
        r = v
        for _ in range(2):
            r = g2 * _moments(gelu, r)[1]
        skip = v if block == 0 else g2 * _moments(gelu, v)[1]
        v = skip + r
        want.append(v)
    assert predict_variance("none_wrn", depth=10, act="gelu") == pytest.approx(want, rel=1e-5)
    cwn = model("cwn_wrn", depth=10, act="gelu")
    v, want = 1.0, []
    for b in cwn.blocks:
        r = v
        for c in b.convs:
            m1, m2 = _moments(gelu, r)
            r = float(c.gain.detach().double().square().mean()) * (m2 - m1 * m1)
        if b.shortcut is None:
            skip = v
        else:
            m1, m2 = _moments(gelu, v)
            skip = float(b.shortcut.gain.detach().double().square().mean()) * (m2 - m1 * m1)
        v = skip + r
        want.append(v)
    assert predict_variance(cwn) == pytest.approx(want, rel=1e-5)


def test_predictions_of_blocks_outside_a_model_and_of_a_zero_variance():
    """A bare sequence of ResidualBlocks has no scheme: ReLU and no norm are assumed."""
    from normfree.blocks import ResidualBlock
    from normfree.schemes import make_scheme
    from normfree.signal import _act_moment

    torch.manual_seed(0)
    plain = nn.Sequential(*(ResidualBlock(8, 8, 1, make_scheme("none")) for _ in range(3)))
    assert predict_variance(plain) == pytest.approx([2.0, 4.0, 8.0])
    wn = nn.Sequential(*(ResidualBlock(8, 8, 1, make_scheme("wn")) for _ in range(2)))
    assert predict_variance(wn, v0=3.0) == pytest.approx([6.0, 12.0])
    assert _act_moment("gelu", 0.0, False) == 0.0 and _act_moment("gelu", 0.0, True) == 0.0
    assert _act_moment("relu", 2.0, False) == 1.0 and _act_moment("relu", 2.0, True) == pytest.approx(1 - 1 / math.pi)


def test_prediction_of_a_converted_model_is_the_tracked_variance():
    from foreign_resnets import TVBasicBlock, TVResNet

    from normfree.layers import ScalarGain

    torch.manual_seed(0)
    conv = normfree.convert(TVResNet(TVBasicBlock, [2, 1, 1, 1], width=8, num_classes=10), "nf")
    assert predict_variance(conv) == pytest.approx([1.0] * 5)  # the skip gains at their init, 0
    with torch.no_grad():
        for m in conv.modules():
            if isinstance(m, ScalarGain):
                m.gain.fill_(1.0)
    assert predict_variance(conv) == pytest.approx([1.04, 1.08, 1.04, 1.04, 1.04])  # 1 + k alpha^2 per stage
    assert predict_variance(conv, v0=2.0)[:3] == pytest.approx([2.04, 2.08, 1.04])  # v0 is passed on


def _reference_records(m, x):
    """Every BlockStats field from one plain forward with hooks (the reference path, so that
    block.branch_out sees f(x) before any scalar)."""
    from normfree.blocks import unfolded

    def stats(t):
        mean = t.double().mean(dim=(0, 2, 3))
        return float(mean.square().mean()), float(t.double().var(dim=(0, 2, 3), unbiased=False).mean())

    seen = {}
    hooks = []
    for i, b in enumerate(m.blocks):
        hooks.append(b.register_forward_hook(lambda mod, inp, out, i=i: seen.setdefault(i, {}).update(
            x=inp[0].detach(), y=out.detach())))
        hooks.append(b.branch_out.register_forward_hook(lambda mod, inp, out, i=i: seen.setdefault(i, {}).update(
            f=out.detach())))
        if b.shortcut is not None:
            hooks.append(b.shortcut.register_forward_hook(lambda mod, inp, out, i=i: seen.setdefault(i, {}).update(
                skip=out.detach())))
    with torch.no_grad(), unfolded(m):
        m.eval()(x)
    for h in hooks:
        h.remove()
    recs, stage, shape = [], 0, None
    for i, b in enumerate(m.blocks):
        d = seen[i]
        mean_sq, var = stats(d["y"])
        res_mean_sq, res_var = stats(d["f"])
        a = 1.0 if b.skip_scale is None else b.skip_scale
        skip_var = stats(d.get("skip", d["x"]))[1] * a * a
        s = b.branch_scale()
        s = 1.0 if s is None else float(s.detach() if isinstance(s, torch.Tensor) else s)
        if d["y"].shape[1:] != shape:
            stage, shape = stage + 1, d["y"].shape[1:]
        recs.append(dict(index=i + 1, stage=stage, channels=d["y"].shape[1], mean_sq=mean_sq, var=var,
                         res_mean_sq=res_mean_sq, res_var=res_var, skip_var=skip_var, branch_scale=s,
                         ratio=math.sqrt(s * s * res_var / skip_var)))
    return recs, stats(seen[0]["x"])


@pytest.mark.parametrize("name,kw", [("rescale_wrn", {}), ("nf_wrn", {"gain_init": 0.7}),
                                     ("szegedy_wrn", {})])
def test_every_field_matches_a_direct_computation(name, kw):
    """mean_sq, var, res_var, res_mean_sq, skip_var (times RescaleNet's a_l), branch_scale,
    ratio, stage, channels and the input's statistics, against hooks on a plain forward;
    in chunks of 5 and in one pass."""
    m = model(name, depth=10, **kw)
    x = torch.randn(16, 3, 8, 8)
    want, (in_mean_sq, in_var) = _reference_records(m, x)
    for chunk in (None, 5):
        got = measure_signal(m.eval(), x, chunk_size=chunk, bn_stats="running")
        assert got.chunk_size == (16 if chunk is None else 5)
        assert got.input_mean_sq == pytest.approx(in_mean_sq, rel=1e-5) and \
            got.input_var == pytest.approx(in_var, rel=1e-5)
        for r, w in zip(got, want):
            assert r.name == f"blocks.{w['index'] - 1}"
            for key, value in w.items():
                assert getattr(r, key) == pytest.approx(value, rel=1e-4, abs=1e-12), (name, r.index, key)
    assert len(got) == len(want) == 3 and [r.stage for r in got] == [1, 2, 3]


def test_measurement_options_seed_validation_and_outputs_only():
    m = model("skipinit_wrn", depth=10, gain_init=0.5)
    shape = (8, 3, 8, 8)
    first = measure_signal(m, shape)
    assert first.column("var") == measure_signal(m, shape, seed=0).column("var")   # the default seed is 0
    assert first.column("var") != measure_signal(m, shape, seed=1).column("var")
    outputs = measure_signal(m, shape, residual=False)
    assert outputs.column("var") == first.column("var") and outputs.column("res_var") == [None] * 3
    assert outputs.column("skip_var") == [None] * 3 and outputs.column("ratio") == [None] * 3
    for bad in (0, 2.5, -1):
        with pytest.raises(ValueError, match=f"chunk_size must be a positive integer or None, got {bad!r}"):
            measure_signal(m, shape, chunk_size=bad)
    with pytest.raises(ValueError, match=r"expected input of shape \(N, 3, H, W\), got \(2, 5, 8, 8\)"):
        measure_signal(m, torch.randn(2, 5, 8, 8))
    x = torch.randn(2, 3, 8, 8)
    x[1, 2, 3, 4] = float("nan")
    with pytest.raises(ValueError, match=r"the input holds 1 NaN/Inf value\(s\) \(of 384, shape \(2, 3, 8, 8\)\)"):
        measure_signal(m, x)
    wide = measure_signal(model("skipinit_wrn", depth=10, gain_init=0.5).double(), shape)  # noise in its dtype
    assert wide.column("var") == pytest.approx(first.column("var"), rel=1e-5)


def test_half_precision_activations_are_summed_in_float32():
    """bfloat16 block outputs: per-channel sums accumulate in float32 (in bfloat16, a sum of
    4096 values would be off by ~1%)."""
    x = (torch.randn(16, 3, 16, 16, generator=torch.Generator().manual_seed(0)) * 2 + 0.5).bfloat16()
    net = nn.Sequential(nn.Conv2d(3, 3, 1, bias=False), nn.Identity()).bfloat16()  # a bfloat16 model
    with torch.no_grad():
        net[0].weight.copy_(torch.eye(3).view(3, 3, 1, 1))  # the identity: its output is x
    got = measure_signal(net, x, blocks=list(net), residual=False)
    ref = x.double()
    mean = ref.mean(dim=(0, 2, 3))
    assert got[0].mean_sq == pytest.approx(float(mean.square().mean()), rel=1e-5)
    assert got[0].var == pytest.approx(float(ref.var(dim=(0, 2, 3), unbiased=False).mean()), rel=1e-5)


def test_branch_scale_of_converted_blocks_is_alpha_times_the_gain():
    from foreign_resnets import TVBasicBlock, TVResNet
    from normfree.layers import ScalarGain

    torch.manual_seed(0)
    conv = normfree.convert(TVResNet(TVBasicBlock, [2, 1, 1, 1], width=8, num_classes=10), "nf")
    with torch.no_grad():
        for m in conv.modules():
            if isinstance(m, ScalarGain):
                m.gain.fill_(0.5)
    stats = measure_signal(conv, (4, 3, 32, 32))
    assert stats.column("branch_scale") == pytest.approx([0.1] * 5)
    for r in stats:
        assert r.ratio == pytest.approx(0.1 * math.sqrt(r.res_var / r.skip_var))


class _TupleBlock(nn.Module):
    """A residual block that returns (output, an auxiliary value), as some user blocks do."""

    def __init__(self, c):
        super().__init__()
        self.conv = nn.Conv2d(c, c, 3, padding=1)

    def forward(self, x):
        return x + self.conv(x), x.sum()


class _TupleBranch(nn.Module):
    def __init__(self, block):
        super().__init__()
        self.block = block

    def forward(self, x):
        return self.block.conv(x), None


class _TupleNet(nn.Module):
    def __init__(self, c=3):
        super().__init__()
        self.b1, self.b2 = _TupleBlock(c), _TupleBlock(c)
        self.f1, self.unused = _TupleBranch(self.b1), nn.Identity()

    def forward(self, x):
        h = self.b1(x)[0]
        self.f1(h)  # a module named as b1's branch: measured on its output (the first element), wherever it runs
        return self.b2(h)[0]


def test_blocks_and_branches_that_return_tuples_are_measured_on_their_first_element():
    torch.manual_seed(0)
    net = _TupleNet()
    x = torch.randn(8, 3, 6, 6)
    stats = measure_signal(net, x, blocks=[net.b1, net.b2], branches={net.b1: net.f1, net.b2: net.unused})
    with torch.no_grad():
        h = net.b1(x)[0]
        y = net.b2(h)[0]
        f = net.b1.conv(h)
    for r, t in zip(stats, (h, y)):
        assert r.var == pytest.approx(float(t.double().var(dim=(0, 2, 3), unbiased=False).mean()), rel=1e-5)
    assert stats[0].res_var == pytest.approx(float(f.double().var(dim=(0, 2, 3), unbiased=False).mean()),
                                             rel=1e-5)
    assert stats[1].res_var is None and stats[1].ratio is None  # its branch module never ran: no statistics
    with pytest.raises(ValueError, match="average-pool shortcut"):
        predict_variance("nfnet_f0", width=1 / 16)
