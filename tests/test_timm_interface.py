"""normfree models in timm's model interface: reset_classifier / get_classifier /
forward_head(pre_logits), features_only / feature_info / forward_intermediates,
pretrained_cfg, and pretrained weights from a local checkpoint only."""
import os

import pytest
import torch

import normfree
from normfree.train import TrainConfig, train


def model(name="nf_wrn", seed=0, **kw):
    torch.manual_seed(seed)
    kw.setdefault("depth", 10) if "wrn" in name else None
    return normfree.create_model(name, **kw).eval()


# ---------------------------------------------------------------- classifier
def test_reset_classifier_changes_the_output_size_and_keeps_the_features():
    m = model("nf_wrn", num_classes=10)
    x = torch.randn(4, 3, 16, 16)
    with torch.no_grad():
        feats = m.forward_head(m.forward_features(x), pre_logits=True)
        torch.testing.assert_close(m.get_classifier()(feats), m(x))  # pre_logits is the classifier's input
        assert m.get_classifier() is m.fc and feats.shape == (4, m.num_features)
        m.reset_classifier(3)
        assert m(x).shape == (4, 3) and m.num_classes == 3 and m.get_classifier().out_features == 3
        torch.testing.assert_close(m.forward_head(m.forward_features(x), pre_logits=True), feats)  # same features
        m.reset_classifier(0)  # timm: no classifier, the model returns its pooled features
        torch.testing.assert_close(m(x), feats)
    s = model("skipinit_wrn")
    s.reset_classifier(5)  # SkipInit's classifier starts at zero, like the one create_model builds
    assert torch.count_nonzero(s.fc.weight) == 0 and s.fc.out_features == 5
    with pytest.raises(ValueError, match="num_classes must be an integer >= 0"):
        m.reset_classifier(-1)
    with pytest.raises(ValueError, match="global_pool must be None or 'avg'"):
        m.reset_classifier(3, global_pool="max")


# ---------------------------------------------------------------- features
@pytest.mark.parametrize("name, kw, side, want", [
    ("nf_resnet50", {"width": 0.25}, 64, [(16, 32), (64, 16), (128, 8), (256, 4), (512, 2)]),
    ("skipinit_wrn", {"depth": 10, "width": 2}, 32, [(16, 32), (32, 32), (64, 16), (128, 8)]),
])
def test_features_only_returns_one_map_per_stage(name, kw, side, want):
    torch.manual_seed(0)
    f = normfree.create_model(name, features_only=True, **kw).eval()
    x = torch.randn(2, 3, side, side)
    with torch.no_grad():
        maps = f(x)
    assert [(m.shape[1], m.shape[2]) for m in maps] == want
    assert all(m.shape[0] == 2 and m.shape[2] == m.shape[3] for m in maps)
    assert f.feature_info.channels() == [c for c, _ in want]
    assert f.feature_info.reduction() == [side // s for _, s in want]
    torch.manual_seed(0)
    full = normfree.create_model(name, **kw).eval()
    with torch.no_grad():
        final, inter = full.forward_intermediates(x)
        for a, b in zip(maps, inter):
            torch.testing.assert_close(a, b)  # the same maps as the full model's
        torch.testing.assert_close(final, full.final_act(full.forward_features(x)))
    missing, unexpected = f.load_state_dict(full.state_dict(), strict=False)
    assert missing == [] and sorted(unexpected) == ["fc.bias", "fc.weight"]


def test_out_indices_pick_maps_and_drop_the_blocks_behind_them():
    torch.manual_seed(0)
    full = normfree.create_model("nf_resnet50", width=0.25).eval()
    torch.manual_seed(0)
    f = normfree.create_model("nf_resnet50", width=0.25, features_only=True, out_indices=(1, -3)).eval()
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        maps = f(x)
        want = full.forward_intermediates(x, indices=[1, 2], intermediates_only=True)
    assert len(maps) == 2 and [m.shape[1] for m in maps] == [64, 128]
    for a, b in zip(maps, want):
        torch.testing.assert_close(a, b)
    assert len(f.blocks) == 3 + 4  # stages 3 and 4 are never run
    assert f.feature_info.module_name() == ["blocks.2", "blocks.6"]
    with pytest.raises(ValueError, match="feature index 7 out of range: the model has 5 feature maps"):
        normfree.create_model("nf_resnet50", width=0.25, features_only=True, out_indices=(7,))
    with pytest.raises(ValueError, match="out_indices goes with features_only=True"):
        normfree.create_model("nf_wrn", out_indices=(1,))


def test_pretrained_cfg_of_a_fresh_model():
    cfg = model("nf_resnet50", width=0.25, in_chans=1, num_classes=7).pretrained_cfg
    assert cfg["input_size"] == (1, 224, 224) and cfg["num_classes"] == 7 and cfg["pool_size"] == (7, 7)
    assert cfg["mean"] is None and cfg["first_conv"] == "stem.0" and cfg["classifier"] == "fc"


# ---------------------------------------------------------------- pretrained: local files only
@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    out = str(tmp_path_factory.mktemp("pre"))
    res = train(TrainConfig(model="nf_wrn", depth=10, width=1, steps=3, batch_size=32, max_train_examples=64,
                            max_test_examples=32, progress=False, out=out))
    return out, res.model


def test_pretrained_true_is_a_clear_error():
    with pytest.raises(ValueError, match="normfree publishes no pretrained weights: pretrained=True cannot "
                                         "download anything. Give pretrained='path/to/checkpoint.pt'"):
        normfree.create_model("nf_resnet50", pretrained=True)


@pytest.mark.parametrize("how", ["pretrained_dir", "checkpoint_path_file", "safetensors"])
def test_pretrained_path_loads_the_weights_and_the_input_record(trained, how):
    out, m = trained
    kw = {"pretrained_dir": {"pretrained": out},
          "checkpoint_path_file": {"checkpoint_path": os.path.join(out, "checkpoint.pt")},
          "safetensors": {"pretrained": os.path.join(out, "model.safetensors")}}[how]
    torch.manual_seed(123)  # another initialization: every weight must come from the file
    loaded = normfree.create_model("nf_wrn", depth=10, in_chans=1, num_classes=10, **kw)
    for k, v in m.state_dict().items():
        assert torch.equal(loaded.state_dict()[k], v), k
    cfg = loaded.pretrained_cfg
    assert cfg["input_size"] == (1, 8, 8) and len(cfg["mean"]) == 1 and len(cfg["label_names"]) == 10


def test_pretrained_with_other_classes_keeps_a_fresh_classifier(trained):
    out, m = trained
    torch.manual_seed(5)
    fresh = normfree.create_model("nf_wrn", depth=10, in_chans=1, num_classes=4)
    torch.manual_seed(5)
    tuned = normfree.create_model("nf_wrn", depth=10, in_chans=1, num_classes=4, pretrained=out)
    assert torch.equal(tuned.fc.weight, fresh.fc.weight) and tuned.fc.out_features == 4
    assert torch.equal(tuned.stem[0].weight, m.stem[0].weight)


def test_pretrained_from_another_architecture_names_the_keys(trained):
    out, _ = trained
    with pytest.raises(ValueError, match=r"does not fit 'nf_wrn': missing \['blocks.3"):
        normfree.create_model("nf_wrn", depth=16, in_chans=1, pretrained=out)
    with pytest.raises(ValueError, match="other shapes \\['stem.0.weight'"):
        normfree.create_model("nf_wrn", depth=10, in_chans=3, pretrained=out)


def test_load_model_records_the_training_input(trained):
    out, _ = trained
    cfg = normfree.load_model(out).pretrained_cfg
    assert cfg["input_size"] == (1, 8, 8) and cfg["architecture"] == "nf_wrn" and cfg["file"].endswith("checkpoint.pt")
