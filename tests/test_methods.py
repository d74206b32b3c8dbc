"""Issue 17's methods: residual scalings (Balduzzi, Szegedy, Hanin & Rolnick,
Arpit et al.), LSUV, weight normalization (WN, CWN) and SELU. Each one's
defining property at initialization, measured on what the network computes,
and a short training run that lowers the loss."""
import math
import re
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import normfree
from normfree.blocks import make_conv, unfolded
from normfree.data import load_digits
from normfree.layers import Activation, ScaledStdConv2d, WeightNormConv2d, activation_he_gain
from normfree.lsuv import lsuv_layers
from normfree.schemes import SCHEMES, make_scheme
from normfree.signal import compare_models, measure_signal, predict_variance

NEW = ["balduzzi", "szegedy", "hanin", "arpit", "lsuv", "wn", "cwn", "selu"]
SOURCES = {
    "balduzzi": "Balduzzi et al. 2017", "szegedy": "inception_resnet_v2.py", "hanin": "Hanin & Rolnick 2018",
    "arpit": "victorcampos7/weightnorm-init", "lsuv": "ducha-aiki/LSUVinit", "wn": "openai/weightnorm",
    "cwn": "huangleiBuaa/CenteredWN", "selu": "bioinf-jku/SNNs",
}
ALPHA = 1 / math.sqrt(2)
C_NORM_ACT = 1 - 1 / math.pi  # what a He conv of relu(N(0, 1)) keeps as channel variance


def build(name, seed=0, **kw):
    torch.manual_seed(seed)
    kw.setdefault("depth", 16)
    kw.setdefault("width", 2)
    return normfree.create_model(name, **kw)


def digits(n=None, split="train"):
    ds = load_digits()
    x, y = (ds.train_x, ds.train_y) if split == "train" else (ds.test_x, ds.test_y)
    x = (x.float() / 255 - ds.mean.view(1, -1, 1, 1)) / ds.std.view(1, -1, 1, 1)
    return (x, y) if n is None else (x[:n], y[:n])


def second_moment(stats):
    return [r.var + r.mean_sq for r in stats]


# --------------------------------------------------------------------------
# everywhere: registry, docs, README, spp --compare
# --------------------------------------------------------------------------
def test_every_new_method_is_registered_documented_and_in_the_readme():
    readme = (Path(__file__).parent.parent / "README.md").read_text()
    names = normfree.list_models()
    for m in NEW:
        assert m in normfree.list_methods()
        assert f"{m}_wrn" in names and f"{m}_resnet50" in names
        assert "=" in SCHEMES[m].doc and SOURCES[m] in SCHEMES[m].doc, m
        assert re.search(rf"^\| `{m}` \|", readme, re.M), f"no README method-table row for {m}"


def test_spp_compare_takes_every_new_method(tmp_path, capsys):
    """``normfree spp --compare`` measures and predicts every new method; the lsuv
    model is LSUV-initialized on noise first (unit variance at its branch's last conv)."""
    from normfree.cli import main
    out = tmp_path / "spp.png"
    assert main(["spp", "--model", "none_wrn", "--compare", *[f"{m}_wrn" for m in NEW], "--depth", "10",
                 "--batch", "16", "--resolution", "16", "--out", str(out)]) == 0
    text = capsys.readouterr().out
    for m in NEW:
        assert f"{m}_wrn" in text
    import json
    doc = json.loads(out.with_suffix(".json").read_text())
    for m in NEW:
        assert doc["models"][f"{m}_wrn"]["predicted_var"], m
    lsuv = doc["models"]["lsuv_wrn"]["blocks"]
    none = doc["models"]["none_wrn"]["blocks"]
    # the last conv of each branch has unit variance over all elements (var + spread of channel means)
    assert all(0.7 < b["res_var"] + b["res_mean_sq"] < 1.3 for b in lsuv), lsuv
    assert none[-1]["res_var"] + none[-1]["res_mean_sq"] > 2.0  # without LSUV it grows with the input


# --------------------------------------------------------------------------
# residual scalings: the factors, the forward pass, the prediction
# --------------------------------------------------------------------------
def test_scaling_factors_are_the_papers():
    """s_skip and s_branch of every block, computed here from the papers' formulas."""
    for b in build("balduzzi_wrn").blocks:
        assert b.skip_scale == pytest.approx(ALPHA) and b.branch_scale() == pytest.approx(ALPHA)
    for b in build("szegedy_wrn").blocks:
        assert b.skip_scale is None and b.branch_scale() == pytest.approx(0.2)
    assert all(b.branch_scale() == pytest.approx(0.3) for b in build("szegedy_wrn", beta=0.3).blocks)
    blocks = list(build("hanin_wrn", depth=22).blocks)
    assert [b.branch_scale() for b in blocks] == pytest.approx([0.9 ** l for l in range(1, 10)])
    assert all(b.skip_scale is None for b in blocks)
    assert [b.branch_scale() for b in build("hanin_wrn", beta_decay=0.5).blocks] == pytest.approx(
        [0.5 ** l for l in range(1, 7)])


def test_arpit_initialization_follows_the_official_code():
    """weightnorm-init's proposed_orthogonal: orthogonal v, g = sqrt(gain cin / cout),
    gain 2 after a ReLU, 1 for the (linear-input) stem, x 1/L on each branch's last conv."""
    m = build("arpit_wrn", width=1)
    L = len(m.blocks)
    stem = m.stem[0]
    assert isinstance(stem, WeightNormConv2d) and not stem.center
    assert torch.allclose(stem.gain, torch.full_like(stem.gain, math.sqrt(3 / 16)))
    for b in m.blocks:
        first, last = b.convs
        assert torch.allclose(first.gain, torch.full_like(first.gain, math.sqrt(2 * b.in_channels / b.out_channels)))
        assert torch.allclose(last.gain, torch.full_like(last.gain, math.sqrt(2 / L)))
        if b.shortcut is not None:
            assert torch.allclose(b.shortcut.gain,
                                  torch.full_like(b.shortcut.gain, math.sqrt(2 * b.in_channels / b.out_channels)))
        for conv in b.convs:  # orthogonal directions: rows orthonormal (out <= fan_in here)
            v = conv.weight.reshape(conv.out_channels, -1)
            torch.testing.assert_close(v @ v.T, torch.eye(v.shape[0]), atol=1e-5, rtol=0)
        assert b.branch_scale() is None and b.skip_scale is None  # beta lives in the last conv's g, as official


@pytest.mark.parametrize("method", NEW)
def test_the_forward_pass_applies_the_scaling(method):
    """Per block, the measured output variance is a^2 Var(skip) + s^2 Var(f) with a, s
    the papers' factors (skip and f uncorrelated at init), from one measured pass."""
    L = 6
    factors = {"balduzzi": lambda l: (ALPHA, ALPHA), "szegedy": lambda l: (1.0, 0.2),
               "hanin": lambda l: (1.0, 0.9 ** l)}.get(method, lambda l: (1.0, 1.0))
    m = build(f"{method}_wrn")
    x = torch.randn(16, 3, 32, 32)
    if method == "lsuv":
        normfree.lsuv_init(m, torch.randn(16, 3, 32, 32))
    stats = measure_signal(m, x)
    assert len(stats) == L
    for r, b in zip(stats, m.blocks):
        a, s = factors(r.index)
        raw_skip = r.skip_var / (b.skip_scale or 1.0) ** 2  # measure_signal reports s_skip^2 Var(skip)
        want = a * a * raw_skip + s * s * r.res_var
        assert r.var == pytest.approx(want, rel=0.08), (r.index, r.var, want)


def test_balduzzi_is_the_plain_network_shrunk_by_alpha_per_block():
    """y = alpha x + f(alpha x) with a ReLU branch: the same weights as `none`, each
    block output exactly alpha^l times none's, so the variance stays put."""
    bal, none = build("balduzzi_wrn"), build("none_wrn")
    x = torch.randn(8, 3, 32, 32)
    sb, sn = measure_signal(bal, x), measure_signal(none, x)
    for rb, rn in zip(sb, sn):
        assert rb.var == pytest.approx(rn.var * ALPHA ** (2 * rb.index), rel=1e-4)
    assert max(second_moment(sb)) < 2 * sb.input_var  # none: x 30
    assert max(second_moment(sn)) > 10 * sn.input_var


def _stage_blocks(model):
    return [(b.in_channels, b.out_channels, b.shortcut_uses_preact) for b in model.blocks]


def test_predict_variance_is_each_papers_formula():
    """predict_variance against the formulas written out here (v0 = 1)."""
    L = 6
    assert predict_variance(build("balduzzi_wrn")) == pytest.approx([1.0] * L)
    # Szegedy on BN: + beta^2 c per block, c = 1 - 1/pi; a transition restarts from c (conv of the normalized input)
    b2c = 0.04 * C_NORM_ACT
    want = [1 + b2c, 1 + 2 * b2c, C_NORM_ACT + b2c, C_NORM_ACT + 2 * b2c, C_NORM_ACT + b2c, C_NORM_ACT + 2 * b2c]
    assert predict_variance(build("szegedy_wrn", width=1)) == pytest.approx(want)
    assert predict_variance(build("hanin_wrn")) == pytest.approx(np.cumprod([1 + 0.81 ** l for l in range(1, L + 1)]))
    # Arpit: x (cin / cout) (1 + 1/L) per block
    arpit = build("arpit_wrn", width=1)
    want, v = [], 1.0
    for cin, cout, _ in _stage_blocks(arpit):
        v *= cin / cout * (1 + 1 / L)
        want.append(v)
    assert predict_variance(arpit) == pytest.approx(want)
    # WN with g = sqrt(2) after a ReLU keeps the second moment: x 2 per block (as He init)
    assert predict_variance(build("wn_wrn")) == pytest.approx([2.0 ** l for l in range(1, L + 1)])
    # CWN: each conv keeps g^2 Var(relu(z)) = 2 (1 - 1/pi)/2 of the variance: r = 0.68^2 v
    k = C_NORM_ACT
    want, v = [], 1.0
    for cin, cout, projects in _stage_blocks(build("cwn_wrn")):
        v = (k * v if projects else v) + k * k * v
        want.append(v)
    assert predict_variance(build("cwn_wrn")) == pytest.approx(want)
    # LSUV (after lsuv_init): unit-variance conv outputs, + 1 per block, 1 + 1 after a transition
    want, v = [], 1.0
    for _, _, projects in _stage_blocks(build("lsuv_wrn")):
        v = (1.0 if projects else v) + 1.0
        want.append(v)
    assert predict_variance(build("lsuv_wrn")) == pytest.approx(want)
    # SELU: He's gain is 1 (LeCun); each conv maps u to E[selu(sqrt(u) z)^2] (Gauss-Hermite here)
    z, w = np.polynomial.hermite_e.hermegauss(200)
    w = w / w.sum()
    sel = lambda u: float((w * F.selu(torch.from_numpy(np.sqrt(u) * z)).numpy() ** 2).sum())  # noqa: E731
    want, v = [], 1.0
    for _, _, projects in _stage_blocks(build("selu_wrn")):
        v = (sel(v) if projects else v) + sel(sel(v))
        want.append(v)
    assert predict_variance(build("selu_wrn")) == pytest.approx(want, rel=1e-3)


# measured / predicted, per block: the formulas ignore zero padding (3x3 convs lose
# variance at 16x16 and 8x8) and, for He-type nets (balduzzi, hanin, wn), how channel
# means split the second moment: there the ratio varies 0.4-1.6 from seed to seed at
# this width, so three seeds are measured
SPP_TOLERANCE = {"szegedy": (0.85, 1.15), "lsuv": (0.8, 1.2), "cwn": (0.7, 1.15), "selu": (0.7, 1.15),
                 "arpit": (0.5, 1.2), "balduzzi": (0.25, 2.0), "hanin": (0.3, 2.0), "wn": (0.3, 2.0)}


@pytest.mark.parametrize("method", sorted(SPP_TOLERANCE))
def test_measured_spp_follows_predict_variance(method):
    ratios = []
    for seed in range(3 if method in ("balduzzi", "hanin", "wn") else 1):
        m = build(f"{method}_wrn", seed=seed)
        if method == "lsuv":
            normfree.lsuv_init(m, torch.randn(16, 3, 32, 32))
        stats = measure_signal(m, (16, 3, 32, 32), seed=seed)
        # BN and CWN nets keep their channels centred: compare variances; the others' prediction is
        # the second moment (He init, WN, SELU's fixed point; LSUV's variance over all elements)
        centred = method in ("szegedy", "cwn")
        got = [r.var for r in stats] if centred else second_moment(stats)
        v0 = stats.input_var + (0.0 if centred else stats.input_mean_sq)
        ratios.append(np.array(got) / np.array(predict_variance(m, v0=v0)))
    ratio = np.array(ratios)
    lo, hi = SPP_TOLERANCE[method]
    assert np.all((lo < ratio) & (ratio < hi)), ratio
    gmean = float(np.exp(np.log(ratio).mean()))
    assert 0.6 < gmean < 1.3, ratio


# --------------------------------------------------------------------------
# weight normalization: ||W|| = g, CWN's zero-mean filters, the mean drift
# --------------------------------------------------------------------------
def _wn_layers(model):
    return [m for m in model.modules() if isinstance(m, WeightNormConv2d)]


@pytest.mark.parametrize("method", ["wn", "cwn", "arpit"])
def test_weight_norm_equals_g_and_cwn_filters_have_zero_mean(method):
    m = build(f"{method}_wrn", width=1)
    layers = _wn_layers(m)
    assert len(layers) == sum(1 for x in m.modules() if isinstance(x, nn.Conv2d))  # every conv
    opt = torch.optim.SGD(m.parameters(), lr=0.5)
    for step in range(2):  # at init and after a step that moves v and g
        for conv in layers:
            w = conv.effective_weight().reshape(conv.out_channels, -1)
            torch.testing.assert_close(w.norm(dim=1), conv.gain.reshape(-1), rtol=1e-5, atol=0)
            sums = w.sum(dim=1).abs()
            if conv.center:
                assert sums.max() < 1e-5 * conv.gain.abs().max()
            else:
                assert sums.max() > 0.05 * conv.gain.abs().min()  # WN filters do not sum to zero
        if step == 0:
            x, y = torch.randn(4, 3, 16, 16), torch.tensor([0, 1, 2, 3])
            F.cross_entropy(m(x), y).backward()
            with torch.no_grad():
                for conv in layers:
                    conv.gain.mul_(1.3)
            opt.step()
    assert all(c.center == (method == "cwn") for c in layers)


def test_wn_and_cwn_start_at_the_he_gain():
    """g = the He gain of what feeds the conv: sqrt(2) after a ReLU (CWN's official
    NScale 1.414), 1 for the stem's linear input."""
    for method in ("wn", "cwn"):
        m = build(f"{method}_wrn", width=1)
        assert torch.all(m.stem[0].gain == 1.0)
        for b in m.blocks:
            for conv in list(b.convs) + ([b.shortcut] if b.shortcut is not None else []):
                torch.testing.assert_close(conv.gain, torch.full_like(conv.gain, math.sqrt(2)))


def test_cwn_is_scaled_weight_standardization_with_a_gain():
    """The same v gives the same weight: (v - mean) / ||v - mean|| = (v - mean) / sqrt(N var(v))."""
    torch.manual_seed(0)
    cwn = WeightNormConv2d(8, 6, 3, padding=1, center=True)
    ws = ScaledStdConv2d(8, 6, 3, padding=1)
    with torch.no_grad():
        ws.weight.copy_(cwn.weight)
        cwn.gain.uniform_(0.5, 2.0)
        ws.gain.copy_(cwn.gain)
        ws.bias.copy_(cwn.bias)
    x = torch.randn(2, 8, 7, 7)
    torch.testing.assert_close(cwn(x), ws(x), rtol=1e-5, atol=1e-6)
    wn = WeightNormConv2d(8, 6, 3, padding=1)
    with torch.no_grad():
        wn.weight.copy_(cwn.weight)
        wn.gain.copy_(cwn.gain)
        wn.bias.copy_(cwn.bias)
    assert not torch.allclose(wn(x), ws(x), atol=1e-3)  # without centring it is not WS


def test_centering_removes_the_mean_drift():
    """The blog's point about Scaled WS: WN's uncentred filters pass the ReLU's mean on,
    and channel means pile up with depth; CWN's zero-sum filters remove it."""
    wn = measure_signal(build("wn_wrn", depth=28), (16, 3, 32, 32))
    cwn = measure_signal(build("cwn_wrn", depth=28), (16, 3, 32, 32))
    assert max(r.mean_sq / r.var for r in cwn) < 0.05
    assert max(r.res_mean_sq / r.res_var for r in cwn) < 0.05
    assert wn[-1].mean_sq / wn[-1].var > 0.5
    assert wn[-1].mean_sq > 20 * wn[0].mean_sq  # drifts upward with depth
    assert cwn[-1].mean_sq / cwn[-1].var < 0.1 * wn[-1].mean_sq / wn[-1].var


def test_wn_conv_can_be_used_in_any_scheme():
    m = build("nf_wrn", conv="cwn", gain_init=1.0)
    assert all(isinstance(c, WeightNormConv2d) and c.center for b in m.blocks for c in b.convs)
    # in an NF block gamma is on the activation: the conv's g starts at 1 (as NF's Scaled WS gain)
    assert all(torch.all(c.gain == 1.0) for b in m.blocks for c in b.convs)
    stats = measure_signal(m, (8, 3, 32, 32))
    assert all(0.7 < r.res_var < 1.3 for r in stats[:4])  # = NF's Scaled WS: unit branch variance
    with pytest.raises(ValueError, match=r"init='arpit'.*needs conv='wn', got conv='cwn'"):
        make_scheme("arpit", conv="cwn")
    with pytest.raises(ValueError, match=r"conv must be one of \['plain', 'ws', 'wn', 'cwn'\], got 'wm'"):
        make_scheme("wn", conv="wm")


# --------------------------------------------------------------------------
# SELU: the fixed point mean 0 / variance 1
# --------------------------------------------------------------------------
def _plain_stack(act, depth=40, channels=128):
    """``depth`` convolutions initialized by the block's rule for ``act`` (make_conv),
    each followed by ``act``: a deep plain network (no residual connections)."""
    scheme = make_scheme("selu", act=act)
    layers = []
    for _ in range(depth):
        layers += [make_conv(scheme, channels, channels, 1), Activation(act)]
    return nn.Sequential(*layers)


def _trace(net, x):
    stats = []
    with torch.no_grad():
        for layer in net:
            x = layer(x)
            if isinstance(layer, Activation):
                stats.append((float(x.mean()), float(x.var())))
    return stats


def test_selu_with_lecun_init_keeps_mean_0_and_variance_1_through_a_deep_plain_stack():
    assert activation_he_gain("selu") == pytest.approx(1.0, abs=1e-9)  # He's rule is LeCun's for SELU
    m = build("selu_wrn", width=1)
    for conv in m.blocks[1].convs:  # W ~ N(0, 1 / fan_in)
        assert conv.weight.std().item() * math.sqrt(conv.weight[0].numel()) == pytest.approx(1.0, rel=0.05)
    torch.manual_seed(0)
    net = _plain_stack("selu")
    stats = _trace(net, torch.randn(64, 128, 8, 8))
    for mean, var in stats:
        assert abs(mean) < 0.1 and abs(var - 1) < 0.15, (mean, var)
    # an input off the fixed point is pulled back to it (self-normalization)
    torch.manual_seed(0)
    far = _trace(_plain_stack("selu"), 3.0 * torch.randn(64, 128, 8, 8) + 1.0)
    assert abs(far[0][1] - 1) > 0.5 and all(abs(m_) < 0.1 and abs(v - 1) < 0.15 for m_, v in far[-10:])
    # not so for ReLU with He's gain: its outputs keep a positive mean, and their variance decays
    torch.manual_seed(0)
    relu = _trace(_plain_stack("relu"), torch.randn(64, 128, 8, 8))
    assert np.mean([m_ for m_, _ in relu[-10:]]) > 0.2 and np.mean([v for _, v in relu[-10:]]) < 0.5


# --------------------------------------------------------------------------
# LSUV on any module
# --------------------------------------------------------------------------
def _layer_variances(model, x):
    """Variance over all elements of every conv / linear output, in one plain forward
    pass (eval mode, normfree blocks on their reference path)."""
    out = {}
    hooks = [m.register_forward_hook(lambda mod, i, o, n=n: out.__setitem__(n, float(o.double().var(correction=0))))
             for n, m in model.named_modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
    was = model.training
    model.eval()
    try:
        with torch.no_grad(), unfolded(model):
            model(x)
    finally:
        model.train(was)
        for h in hooks:
            h.remove()
    return out


def test_lsuv_gives_every_layer_unit_variance_on_a_real_batch():
    x, _ = digits(256)
    torch.manual_seed(0)
    model = normfree.create_model("lsuv_wrn", depth=10, width=1, in_chans=1, num_classes=10)
    before = _layer_variances(model, x)
    records = normfree.lsuv_init(model, x)
    after = _layer_variances(model, x)
    assert [r.name for r in records] == list(after)  # every conv and the classifier, in forward order
    assert all(r.converged for r in records)
    for name, var in after.items():
        assert abs(var - 1) < 0.1, (name, var)
    assert max(abs(v - 1) for v in before.values()) > 0.3  # He init alone does not give that
    # the scale carries over to other images of the same data
    held_out = _layer_variances(model, digits(256, split="test")[0])
    assert all(abs(v - 1) < 0.25 for v in held_out.values()), held_out
    # orthonormal first (the paper's step 1): each rescaled matrix is a multiple of an orthonormal one
    with torch.no_grad():
        w = model.blocks[1].convs[0].weight.reshape(16, -1)
        gram = w @ w.T
    torch.testing.assert_close(gram, gram[0, 0] * torch.eye(16), atol=1e-4 * float(gram[0, 0]), rtol=0)


def test_lsuv_works_on_a_foreign_module_with_torch_weight_norm():
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(1, 8, 3, padding=1), nn.Tanh(),
        nn.utils.parametrizations.weight_norm(nn.Conv2d(8, 16, 3, padding=1, stride=2)), nn.ReLU(),
        nn.Conv2d(16, 16, 3, padding=1), nn.ReLU(), nn.Dropout(0.5),
        nn.Flatten(), nn.Linear(16 * 16, 10))
    model.train()
    x, _ = digits(200)
    records = normfree.lsuv_init(model, x)
    assert [r.name for r in records] == ["0", "2", "4", "8"]
    assert all(abs(v - 1) < 0.1 for v in _layer_variances(model, x).values())
    assert model.training and model[6].training  # flags restored
    wn = model[2].parametrizations.weight
    assert records[1].scale != 1.0 and torch.allclose(wn.original0, torch.full_like(wn.original0, records[1].scale))


def test_lsuv_rescales_the_gain_of_normalized_weights_and_can_keep_the_init():
    """orthonormal=False: the method's own weights are only rescaled; for Scaled WS and
    WN convs that is their gain (dividing the direction would change nothing)."""
    for name, options in (("nf_wrn", {"gain_init": 1.0}), ("cwn_wrn", {})):
        torch.manual_seed(0)
        model = normfree.create_model(name, depth=10, width=1, in_chans=1, **options)
        x, _ = digits(128)
        directions = {n: c.weight.clone() for n, c in model.named_modules() if isinstance(c, nn.Conv2d)}
        records = normfree.lsuv_init(model, x, orthonormal=False)
        assert all(r.converged for r in records), records
        assert all(abs(v - 1) < 0.1 for v in _layer_variances(model, x).values())
        for n, c in model.named_modules():
            if n in directions:
                assert torch.equal(c.weight, directions[n]), n  # only the gains moved


def test_lsuv_reports_layers_it_cannot_scale_and_refuses_bad_input():
    torch.manual_seed(0)
    model = normfree.create_model("fixup_wrn", depth=10, width=1, in_chans=1)  # last convs and classifier zero
    x, _ = digits(64)
    records = {r.name: r for r in normfree.lsuv_init(model, x, orthonormal=False)}
    zero = records["blocks.0.convs.1"]
    assert zero.var == 0.0 and not zero.converged and zero.iterations == 0
    assert records["blocks.0.convs.0"].converged
    with pytest.raises(ValueError, match="at least 2 samples"):
        normfree.lsuv_init(model, x[:1])
    with pytest.raises(ValueError, match="NaN or Inf"):
        normfree.lsuv_init(model, torch.full_like(x, float("nan")))
    with pytest.raises(ValueError, match=r"tol must be a number in \(0, 1\), got 0"):
        normfree.lsuv_init(model, x, tol=0)
    with pytest.raises(ValueError, match="max_iter must be an integer from 1 to 1000, got 0"):
        normfree.lsuv_init(model, x, max_iter=0)
    with pytest.raises(ValueError, match="no convolution or linear layer"):
        normfree.lsuv_init(nn.Sequential(nn.ReLU()), x)
    with pytest.raises(TypeError, match="nn.Module"):
        normfree.lsuv_init("lsuv_wrn", x)
    assert lsuv_layers(model, x)[0] is model.stem[0]


# --------------------------------------------------------------------------
# options and errors
# --------------------------------------------------------------------------
@pytest.mark.parametrize("kwargs,pattern", [
    (dict(skip_alpha=0.0), r"skip_alpha must be None or a finite number in \(0, 10\], got 0.0"),
    (dict(beta=float("nan")), r"branch_beta must be None or a finite number in \(0, 10\], got nan"),
    (dict(beta_decay=1.5), r"beta_decay must be None or a finite number in \(0, 1\], got 1.5"),
    (dict(init="xavier"), r"init must be 'he' or 'arpit', got 'xavier'"),
    (dict(data_init="wn"), r"data_init must be None or 'lsuv', got 'wn'"),
])
def test_new_options_are_validated(kwargs, pattern):
    with pytest.raises(ValueError, match=pattern):
        make_scheme("none", **kwargs)


# --------------------------------------------------------------------------
# a short training run lowers the loss
# --------------------------------------------------------------------------
@pytest.mark.parametrize("method", NEW)
def test_a_short_training_run_lowers_the_loss(method):
    x, y = digits()
    g = torch.Generator().manual_seed(0)
    order = torch.randperm(len(y), generator=g)
    probe = order[:512]
    torch.manual_seed(0)
    model = normfree.create_model(f"{method}_wrn", depth=10, width=1, in_chans=1, num_classes=10)
    if method == "lsuv":
        normfree.lsuv_init(model, x[order[:256]])

    def probe_loss():
        model.eval()
        with torch.no_grad():
            loss = F.cross_entropy(model(x[probe]), y[probe]).item()
        model.train()
        return loss

    start = probe_loss()
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    for step in range(60):
        idx = order[(step * 64) % 1344:][:64]
        loss = F.cross_entropy(model(x[idx]), y[idx])
        opt.zero_grad()
        loss.backward()
        opt.step()
    end = probe_loss()
    assert math.isfinite(end) and end < 0.5 * start, (start, end)


def test_normfree_train_initializes_lsuv_models_on_its_first_batch(capfd):
    """``normfree train`` of an ``lsuv`` model runs LSUV on the run's first
    training batch: every conv's output variance on training images is ~1
    (He init gives far from 1 at the deep end), and the weights differ from the
    registry's He-initialized model built under the same seed."""
    from normfree.lsuv import output_variance
    from normfree.train import TrainConfig, train

    cfg = TrainConfig(model="lsuv_wrn", depth=16, width=1, data="digits", batch_size=64, lr=1e-12,
                      max_train_examples=256, max_test_examples=64, steps=1, log_every=1, progress=False,
                      augment=False)
    res = train(cfg)
    x, _ = digits()
    probe = x[:256]
    layers = lsuv_layers(res.model, probe)
    variances = [output_variance(res.model, probe, m) for m in layers[:-1]]   # the classifier: not a conv
    assert all(0.6 < v < 1.6 for v in variances), variances
    torch.manual_seed(0)
    he = normfree.create_model("lsuv_wrn", depth=16, width=1, in_chans=1, num_classes=10)
    he_vars = [output_variance(he, probe, m) for m in lsuv_layers(he, probe)[:-1]]
    assert max(abs(v - 1) for v in he_vars) > 0.6, he_vars      # the check above could fail without LSUV
    assert "LSUV: " in capfd.readouterr().err
