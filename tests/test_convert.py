"""normfree.convert on torchvision- and timm-structured ResNets (tests/foreign_resnets.py)
and on residual blocks of no known structure."""
import copy
import math

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.nn.modules.batchnorm import _BatchNorm

import normfree
from normfree.convert import _no_inplace, _replace_norms
from foreign_resnets import (PlainBlock, PlainNet, TimmBasicBlock, TimmBottleneck, TimmResNet, TimmResNetV2,
                             TVBasicBlock, TVBottleneck, TVResNet, timm_resnetv2_50, tv_resnet50)

GAMMA = normfree.activation_gamma("relu")

SMALL = {  # every recognized structure, small enough to run in milliseconds
    "tv_basic": lambda: TVResNet(TVBasicBlock, [1, 2, 1, 1], width=8, num_classes=10),
    "tv_bottleneck": lambda: TVResNet(TVBottleneck, [1, 2, 1, 1], width=8, num_classes=10),
    "timm_basic_se_dp": lambda: TimmResNet(TimmBasicBlock, [1, 2, 1, 1], width=8, num_classes=10, se=True,
                                           drop_path_rate=0.2),
    "timm_bottleneck_se_dp": lambda: TimmResNet(TimmBottleneck, [1, 2, 1, 1], width=8, num_classes=10, se=True,
                                                drop_path_rate=0.2),
    "v2_bottleneck": lambda: TimmResNetV2([1, 2, 1, 1], channels=(32, 64, 128, 256), stem_chs=16, num_classes=10,
                                          drop_path_rate=0.2),
    "v2_basic": lambda: TimmResNetV2([1, 2, 1, 1], channels=(8, 16, 32, 64), stem_chs=8, num_classes=10, basic=True),
}
STRUCTURE = {"tv_basic": "torchvision.BasicBlock", "tv_bottleneck": "torchvision.Bottleneck",
             "timm_basic_se_dp": "timm.resnet.BasicBlock", "timm_bottleneck_se_dp": "timm.resnet.Bottleneck",
             "v2_bottleneck": "timm.resnetv2.PreActBottleneck", "v2_basic": "timm.resnetv2.PreActBasic"}


def small(name, seed=0):
    torch.manual_seed(seed)
    return SMALL[name]()


def noise(*shape, seed=1):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


def blocks_io(model, x):
    """[(block, its input, its output)] of one forward pass."""
    rec = []
    hooks = [b.register_forward_hook(lambda m, i, o: rec.append((m, i[0].detach().clone(), o.detach().clone())))
             for b in normfree.find_blocks(model)]
    try:
        with torch.no_grad():
            model(x)
    finally:
        for h in hooks:
            h.remove()
    return rec


def set_gains(model, value):
    with torch.no_grad():
        for b in normfree.find_blocks(model):
            b.gain.gain.fill_(value)
    return model


# --------------------------------------------------------------------------
# the recipes compute each family's own forward
# --------------------------------------------------------------------------
@pytest.mark.parametrize("name", list(SMALL))
def test_converted_blocks_compute_the_original_forward(name):
    """gn keeps every layer and only swaps BN for GroupNorm: the converted model must give
    the bits of the original forward with the same swap (order, shortcut, post-activation)."""
    model = small(name).eval()
    x = noise(2, 3, 64, 64)
    reference = copy.deepcopy(model)
    assert _replace_norms(reference, "gn") > 0
    conv = normfree.convert(model, "gn")
    blocks = normfree.find_blocks(conv)
    assert blocks and all(isinstance(b, normfree.ConvertedBlock) and b.structure == STRUCTURE[name] for b in blocks)
    assert len(blocks) == 5 and not any(isinstance(m, _BatchNorm) for m in conv.modules())
    with torch.no_grad():
        assert torch.equal(conv(x), reference(x))
    # "none" with a gain of 1: the original forward with normalization removed -- and without in-place
    # activations, which would now overwrite the block input (timm's norm1 + ReLU(inplace) on x, the skip)
    reference = copy.deepcopy(model)
    _replace_norms(reference, None)
    _no_inplace(reference)
    none = normfree.convert(model, "none", gain_init=1.0)
    with torch.no_grad():
        assert torch.equal(none(x), reference(x))
    assert not any(isinstance(m, (_BatchNorm, nn.GroupNorm)) for m in none.modules())


def test_original_model_is_left_alone_and_state_dict_names_are_kept():
    model = small("tv_bottleneck")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    conv = normfree.convert(model, "skipinit")
    assert model.state_dict().keys() == before.keys()
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    keys = set(conv.state_dict())
    kept = {k for k in before if ".bn" not in k and not k.startswith("bn") and "downsample.1." not in k}
    assert kept <= keys  # every conv / fc weight under its original name
    assert keys - kept == {f"{n}.gain.gain" for n in ("layer1.0", "layer2.0", "layer2.1", "layer3.0", "layer4.0")}
    assert torch.equal(conv.state_dict()["layer2.1.conv2.weight"], before["layer2.1.conv2.weight"])
    nf = normfree.convert(model, "nf").state_dict()
    assert torch.equal(nf["layer1.0.conv1.weight"], before["layer1.0.conv1.weight"])  # carried into Scaled WS
    assert "layer1.0.conv1.gain" in nf and "layer1.0.conv1.bias" in nf and "conv1.gain" in nf
    assert torch.equal(nf["fc.weight"], before["fc.weight"]) and "fc.gain" not in nf  # classifier untouched


# --------------------------------------------------------------------------
# identity at initialization
# --------------------------------------------------------------------------
@pytest.mark.parametrize("name", list(SMALL))
@pytest.mark.parametrize("method", ["skipinit", "nf"])
def test_every_block_is_its_skip_path_at_init(name, method):
    conv = normfree.convert(small(name), method).train()
    rec = blocks_io(conv, noise(2, 3, 64, 64))
    assert len(rec) == 5
    for b, x, y in rec:
        assert torch.isfinite(y).all()
        if b.downsample is None:
            assert torch.equal(y, x)  # exactly the identity
        else:  # exactly the projection shortcut
            with torch.no_grad():
                h = x if b.pre is None else b._modules[b.pre](x)
                s = b.downsample(h * b.pre_scale if b.pre_scale is not None else h) if b.shortcut_preact \
                    else b.downsample(x)
                expected = s if b.post is None else b._modules[b.post](s)
            assert torch.equal(y, expected)


def test_identity_breaks_when_the_gain_is_not_zero():
    conv = set_gains(normfree.convert(small("tv_bottleneck"), "skipinit"), 0.1)
    b, x, y = next(r for r in blocks_io(conv, noise(2, 3, 64, 64)) if r[0].downsample is None)
    assert not torch.equal(y, x)


# --------------------------------------------------------------------------
# NF: one block against the formula, written out by hand
# --------------------------------------------------------------------------
def test_nf_block_is_deepminds_formula():
    torch.manual_seed(0)
    conv = normfree.convert(TVResNet(TVBottleneck, [2, 1, 1, 1], width=8), "nf", alpha=0.3)
    set_gains(conv, 0.7)
    b0, b1 = conv.layer1[0], conv.layer1[1]
    assert b0.expected_var == 1.0 and b1.expected_var == pytest.approx(1.0 + 0.3 ** 2)  # reset after projection
    assert conv.layer2[0].expected_var == pytest.approx(1.0 + 2 * 0.3 ** 2)
    x = noise(2, 32, 16, 16)
    beta = math.sqrt(b1.expected_var)
    with torch.no_grad():
        h = F.relu(x) * GAMMA / beta
        r = b1.conv1(h)
        r = b1.conv2(F.relu(r) * GAMMA)
        r = b1.conv3(F.relu(r) * GAMMA)
        expected = x + 0.3 * 0.7 * r
        assert torch.allclose(b1(x), expected, rtol=1e-5, atol=1e-5)
        x0 = noise(2, 8, 16, 16)  # the transition block: the shortcut takes the pre-activated input
        h = F.relu(x0) * GAMMA / 1.0
        r = b0.conv3(F.relu(b0.conv2(F.relu(b0.conv1(h)) * GAMMA)) * GAMMA)
        assert torch.allclose(b0(x0), b0.downsample(h) + 0.3 * 0.7 * r, rtol=1e-5, atol=1e-5)
    assert all(isinstance(m, normfree.ScaledStdConv2d) for m in (b1.conv1, b1.conv2, b1.conv3, b0.downsample[0]))


def test_nf_transition_block_and_squeeze_excite():
    torch.manual_seed(0)
    conv = normfree.convert(TimmResNet(TimmBottleneck, [1, 1, 1, 1], width=8, se=True), "nf")
    set_gains(conv, 1.0)
    b = conv.layer2[0]
    x = noise(2, 32, 16, 16)
    beta = math.sqrt(b.expected_var)
    assert beta == pytest.approx(math.sqrt(1.04))
    with torch.no_grad():
        h = F.relu(x) * GAMMA / beta
        r = b.conv3(F.relu(b.conv2(F.relu(b.conv1(h)) * GAMMA)) * GAMMA)
        r = 2.0 * b.se(r)  # DeepMind's 2 * se(out) * out
        expected = b.downsample(h) + 0.2 * r
        assert torch.allclose(b(x), expected, rtol=1e-5, atol=1e-5)
    # the SE's own convolutions stay plain (DeepMind's SE uses linear layers); the classifier too
    assert type(b.se.fc1) is nn.Conv2d and type(conv.fc) is nn.Linear
    assert isinstance(conv.conv1, normfree.ScaledStdConv2d)  # the stem is Scaled WS


def test_nf_leaves_the_classifier_named_by_get_classifier_alone():
    class Renamed(TimmResNetV2):  # the classifier conv is not named fc / head / classifier
        def __init__(self):
            super().__init__([1, 1, 1, 1], channels=(8, 16, 32, 64), stem_chs=8, num_classes=10, basic=True)
            self.head.logits = self.head.fc
            del self.head.fc

        def get_classifier(self):
            return self.head.logits

        def forward(self, x):
            h = self.norm(self.stages(self.stem(x)))
            return self.head.logits(self.head.global_pool(h)).flatten(1)

    conv = normfree.convert(Renamed(), "nf")
    assert type(conv.head.logits) is nn.Conv2d
    assert isinstance(conv.stages[1].blocks[0].downsample.conv, normfree.ScaledStdConv2d)
    assert conv(noise(2, 3, 32, 32)).shape == (2, 10)


def test_nf_post_activation_network_keeps_the_activation_before_the_head():
    conv = normfree.convert(small("tv_bottleneck"), "nf")
    assert isinstance(conv.layer4[-1], nn.ReLU) and len(conv.layer4) == 2
    assert not conv.layer4[-1].inplace
    assert normfree.find_blocks(conv)[-1] is conv.layer4[0]
    x = noise(2, 3, 64, 64)
    with torch.no_grad():
        feats = conv.layer4(conv.layer3(conv.layer2(conv.layer1(conv.maxpool(conv.relu(conv.conv1(x)))))))
    assert feats.min() >= 0


# --------------------------------------------------------------------------
# ResNet-50s: finite, SPPs like the registry's nf_resnet50, trainable
# --------------------------------------------------------------------------
@pytest.fixture(scope="module")
def resnet50s():
    torch.manual_seed(0)
    return {"torchvision": tv_resnet50(num_classes=10), "timm_v2": timm_resnetv2_50(num_classes=10)}


@pytest.fixture(scope="module")
def registry_spp():
    torch.manual_seed(0)
    reg = normfree.create_model("nf_resnet50", num_classes=10, gain_init=1.0)
    set_gains(reg, 1.0)  # whatever the registry's default gain: the SPP is drawn with the branch on
    return normfree.measure_signal(reg, (4, 3, 128, 128), seed=0), normfree.predict_variance(reg, v0=1.0)


@pytest.mark.parametrize("family", ["torchvision", "timm_v2"])
def test_nf_resnet50_spp_matches_the_registry(resnet50s, registry_spp, family):
    ref, ref_pred = registry_spp
    conv = set_gains(normfree.convert(resnet50s[family], "nf"), 1.0)
    assert not any(isinstance(m, _BatchNorm) for m in conv.modules())
    stats = normfree.measure_signal(conv, (4, 3, 128, 128), seed=0)
    assert len(stats) == len(ref) == 16
    assert [r.stage for r in stats] == [r.stage for r in ref]
    for a, b in zip(stats, ref):
        assert a.var == pytest.approx(b.var, rel=0.06), (a.name, a.var, b.var)
        assert a.res_var == pytest.approx(b.res_var, rel=0.12), (a.name, a.res_var, b.res_var)
        assert a.mean_sq < 0.05 and a.branch_scale == pytest.approx(0.2)
    # NF's claims on the converted network itself: variance 1 + k alpha^2 within a stage, branch ~ unit variance
    pred = normfree.predict_variance(conv)
    assert pred == pytest.approx(ref_pred)
    assert pred[:3] == pytest.approx([1.04, 1.08, 1.12])
    assert all(abs(r.var - p) / p < 0.1 for r, p in zip(stats[:13], pred[:13]))


@pytest.mark.parametrize("family,method,lr", [("torchvision", "skipinit", 0.05), ("torchvision", "nf", 0.01),
                                              ("timm_v2", "skipinit", 0.05), ("timm_v2", "nf", 0.01)])
def test_converted_resnet50_trains(resnet50s, family, method, lr):
    conv = normfree.convert(resnet50s[family], method).train()
    g = torch.Generator().manual_seed(1)
    x, y = torch.randn(4, 3, 32, 32, generator=g), torch.randint(0, 10, (4,), generator=g)
    opt = torch.optim.SGD(conv.parameters(), lr=lr, momentum=0.9)
    losses = []
    for _ in range(4):
        loss = F.cross_entropy(conv(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert all(math.isfinite(v) for v in losses)
    assert losses[-1] < 0.9 * losses[0], losses  # a plain loop on one fixed batch: it learns
    gains = torch.stack([b.gain.gain.detach() for b in normfree.find_blocks(conv)])
    assert gains.abs().min() > 0  # every branch gain received gradient and moved off 0


@pytest.mark.parametrize("method", ["skipinit", "nf"])
def test_converted_resnet50_outputs_are_finite(resnet50s, method):
    for model in resnet50s.values():
        with torch.no_grad():
            y = normfree.convert(model, method).eval()(noise(2, 3, 64, 64))
        assert y.shape == (2, 10) and torch.isfinite(y).all()


# --------------------------------------------------------------------------
# measurement and prediction on converted models
# --------------------------------------------------------------------------
def test_measure_signal_sees_the_branch_before_the_gain():
    conv = normfree.convert(small("tv_bottleneck"), "skipinit")
    stats = normfree.measure_signal(conv, (4, 3, 64, 64))
    assert len(stats) == 5
    assert all(r.res_var is not None and r.res_var > 0 for r in stats)  # f(x) itself, though the gain is 0
    assert all(r.branch_scale == 0.0 and r.ratio == 0.0 for r in stats)
    assert all(r.skip_var is not None for r in stats)
    set_gains(conv, 0.5)
    again = normfree.measure_signal(conv, (4, 3, 64, 64))
    assert again[0].res_var == pytest.approx(stats[0].res_var)  # the branch does not depend on its own gain
    assert again[0].ratio == pytest.approx(0.5 * math.sqrt(stats[0].res_var / stats[0].skip_var))


def test_predict_variance_says_when_it_cannot():
    with pytest.raises(ValueError, match=r"only for models converted with method='nf'.*\['skipinit'\]"):
        normfree.predict_variance(normfree.convert(small("tv_basic"), "skipinit"))
    with pytest.raises(ValueError, match=r"Sequential is neither.*measure_signal"):
        normfree.predict_variance(nn.Sequential(nn.Conv2d(3, 3, 3), nn.ReLU()))
    with pytest.raises(ValueError, match="neither"):  # the unconverted torchvision ResNet
        normfree.predict_variance(small("tv_basic"))


# --------------------------------------------------------------------------
# blocks of no known structure
# --------------------------------------------------------------------------
def test_named_blocks_with_named_branches_get_a_branch_gain():
    torch.manual_seed(0)
    net = PlainNet(c=8, n=3)
    conv = normfree.convert(net, "skipinit", blocks=list(net.blocks),
                            branches={b: b.body[-1] for b in net.blocks})
    assert not any(isinstance(m, _BatchNorm) for m in conv.modules())
    for blk in conv.blocks:
        assert isinstance(blk.body[-1], normfree.BranchGain) and isinstance(blk.body[-1].module, nn.Identity)
    x = noise(2, 3, 16, 16)
    h = conv.stem(x)
    with torch.no_grad():
        assert torch.equal(conv.blocks(h), h)  # identity at init
    stats = normfree.measure_signal(conv, x, blocks=list(conv.blocks))
    assert all(r.res_var > 0 and r.branch_scale == 0.0 for r in stats)  # the BranchGain's f(x) and gain
    # names work as well as modules, and the branch may be named relative to the block
    by_name = normfree.convert(net, "skipinit", blocks=["blocks.0"], branches={"blocks.0": "body.4"})
    assert isinstance(by_name.blocks[0].body[4], normfree.BranchGain)
    assert not isinstance(by_name.blocks[1].body[4], normfree.BranchGain)


def test_named_blocks_without_branch_get_a_skip_gain():
    torch.manual_seed(0)
    net = PlainNet(c=8, n=2)
    conv = normfree.convert(net, "skipinit", blocks=list(net.blocks))
    assert all(isinstance(b, normfree.SkipGain) for b in conv.blocks)
    assert normfree.find_blocks(conv) == list(conv.blocks)
    x = noise(2, 8, 16, 16)
    with torch.no_grad():
        assert torch.equal(conv.blocks(x), x)
        set_gains(conv, 1.0)
        plain = copy.deepcopy(net)
        _replace_norms(plain, None)
        _no_inplace(plain)
        assert torch.allclose(conv.blocks(x), plain.blocks(x), atol=1e-6)
    assert set(conv.state_dict()) == {k.replace("blocks.0.", "blocks.0.module.").replace("blocks.1.", "blocks.1.module.")
                                      for k in plain.state_dict()} | {"blocks.0.gain.gain", "blocks.1.gain.gain"}


# --------------------------------------------------------------------------
# clear errors
# --------------------------------------------------------------------------
def test_no_blocks_found_names_what_is_recognized():
    with pytest.raises(ValueError, match=r"no residual blocks in PlainNet.*torchvision.Bottleneck.*blocks=\[\.\.\.\]"):
        normfree.convert(PlainNet())

    class Odd(nn.Module):  # looks like a block, but has no downsample attribute and no activation
        def __init__(self):
            super().__init__()
            self.conv1, self.bn1, self.conv2 = nn.Conv2d(3, 3, 1), nn.BatchNorm2d(3), nn.Conv2d(3, 3, 1)

    with pytest.raises(ValueError, match=r"look like residual blocks but match no known structure: \[.0 \(Odd: children \['conv1'"):
        normfree.convert(nn.Sequential(Odd()))


def test_block_with_unknown_children_is_refused():
    model = small("tv_basic")
    model.layer1[0].extra = nn.Conv2d(8, 8, 1)
    with pytest.raises(ValueError, match=r"block layer1.0 \(TVBasicBlock\) matches the torchvision.BasicBlock "
                                         r"structure but also has the children \['extra'\]"):
        normfree.convert(model)
    model = small("v2_basic")
    model.stages[0].blocks[0].norm2 = nn.Softplus()
    with pytest.raises(ValueError, match="norm2 is a Softplus, which convert does not know as a normalization layer"):
        normfree.convert(model)


def test_bad_arguments():
    model = small("tv_basic")
    with pytest.raises(ValueError, match="'fixup' is not available in convert: Fixup re-initializes"):
        normfree.convert(model, "fixup")
    with pytest.raises(ValueError, match="did you mean 'skipinit'"):
        normfree.convert(model, "skipint")
    with pytest.raises(TypeError, match=r"unknown option\(s\) \['act'\]"):
        normfree.convert(model, "nf", act="gelu")
    with pytest.raises(ValueError, match=r"alpha must be a finite number in \(0, 10\], got -1"):
        normfree.convert(model, "nf", alpha=-1)
    other = small("tv_basic")
    with pytest.raises(ValueError, match="is not a module of this TVResNet"):
        normfree.convert(model, blocks=[other.layer1[0]])
    with pytest.raises(ValueError, match="no submodule 'layer9'"):
        normfree.convert(model, blocks=["layer9"])
    with pytest.raises(ValueError, match="nested"):
        normfree.convert(model, blocks=["layer1", "layer1.0"])
    net = PlainNet()
    with pytest.raises(ValueError, match=r"method='nf'\) needs to know where the activations .* blocks.0 \(PlainBlock"):
        normfree.convert(net, "nf", blocks=list(net.blocks))
    with pytest.raises(ValueError, match="branches has a key"):
        normfree.convert(net, blocks=[net.blocks[0]], branches={net.blocks[1]: net.blocks[1].body[0]})
    with pytest.raises(ValueError, match="is not inside the block"):
        normfree.convert(net, blocks=[net.blocks[0]], branches={net.blocks[0]: net.blocks[1].body[0]})


def test_gain_options():
    conv = normfree.convert(small("tv_basic"), "skipinit", gain_init="1/sqrt(d)")
    assert [b.gain.gain.item() for b in normfree.find_blocks(conv)] == pytest.approx([1 / math.sqrt(5)] * 5)
    assert all(b.gain is None for b in normfree.find_blocks(normfree.convert(small("tv_basic"), "none")))
    assert all(b.gain.gain.item() == 0.0 for b in normfree.find_blocks(normfree.convert(small("tv_basic"), "nf")))
    nogain = normfree.convert(small("tv_basic"), "nf", gain_init=None)
    assert all(b.gain is None and b.branch_scale() == 0.2 for b in normfree.find_blocks(nogain))


# --------------------------------------------------------------------------
# the real libraries, where they happen to be installed
# --------------------------------------------------------------------------
def _train_step(model, x):
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    loss = model(x).logsumexp(1).mean()
    opt.zero_grad()
    loss.backward()
    opt.step()
    return loss.item()


@pytest.mark.parametrize("name", ["resnet50", "resnetv2_50", "seresnet50"])
def test_real_timm_models(name):
    timm = pytest.importorskip("timm")
    model = timm.create_model(name, num_classes=10)
    for method in ("skipinit", "nf"):
        conv = normfree.convert(model, method)
        assert len(normfree.find_blocks(conv)) == 16
        assert not any(isinstance(m, _BatchNorm) for m in conv.modules())
        assert math.isfinite(_train_step(conv.train(), noise(2, 3, 64, 64)))


@pytest.mark.parametrize("name", ["resnet18", "resnet50"])
def test_real_torchvision_models(name):
    tv = pytest.importorskip("torchvision")
    model = getattr(tv.models, name)(num_classes=10)
    for method in ("skipinit", "nf"):
        conv = normfree.convert(model, method)
        assert len(normfree.find_blocks(conv)) == (8 if name == "resnet18" else 16)
        assert math.isfinite(_train_step(conv.train(), noise(2, 3, 64, 64)))
