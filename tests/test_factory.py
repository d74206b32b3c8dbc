"""Model specs (package.module:factory, timm:NAME, torchvision:NAME) in Python and on the
command line (train, spp, export), the classifier search, and the real libraries where
they are installed."""
import importlib.util
import json
import os
import re

import pytest
import torch
import torch.nn as nn

import normfree
from normfree.cli import main
from normfree.factory import adapt_input_conv, build_model, check_spec, find_classifier, resolve
from normfree.train import load_checkpoint, load_model
from foreign_resnets import timm_resnetv2_50
from user_models import HeadNet, OddNames, ProjNet, TinyCNN, tiny_cnn

HAVE_TIMM = importlib.util.find_spec("timm") is not None
HAVE_TORCHVISION = importlib.util.find_spec("torchvision") is not None


# ---------------------------------------------------------------- specs
def test_a_spec_is_called_with_what_its_factory_accepts():
    m = build_model("user_models:tiny_cnn", num_classes=7, in_chans=1, options={"width": 4})
    assert isinstance(m, TinyCNN) and m.conv.in_channels == 1 and m.conv.out_channels == 4
    assert m(torch.randn(2, 1, 8, 8)).shape == (2, 7)
    m = build_model("user_models:HeadNet", num_classes=5, in_chans=2)  # a class taking in_channels
    assert m.body.in_channels == 2 and m(torch.randn(2, 2, 8, 8)).shape == (2, 5)
    m = build_model("user_models:fixed_net", num_classes=3, in_chans=3)  # takes neither: called bare
    assert m.conv.in_channels == 1 and m.fc.out_features == 10
    assert resolve("user_models:TinyCNN.__init__") is TinyCNN.__init__  # attribute paths
    m = build_model(tiny_cnn, num_classes=4, in_chans=1)  # a callable works like its spec
    assert m.fc.out_features == 4


@pytest.mark.parametrize("spec, message", [
    ("user_models:tiny_cnnn", "'user_models' has no attribute 'tiny_cnnn'; did you mean 'tiny_cnn'"),
    ("no_such_pkg.nets:make", "cannot import 'no_such_pkg.nets' (no module named 'no_such_pkg'); is it installed"),
    ("user_models:NOT_CALLABLE", "user_models.NOT_CALLABLE is a int, not a callable"),
    ("user_models:returns_int", "user_models:returns_int returned a int, not an nn.Module"),
    ("user models:x", "is not a valid spec: use a registered name"),
    ("user_models:", "is not a valid spec"),
])
def test_bad_specs_give_clear_errors(spec, message):
    with pytest.raises((ValueError, TypeError)) as e:
        build_model(spec, num_classes=10, in_chans=1)
    assert message in str(e.value)


def test_bad_factory_options_and_conversions_are_named():
    with pytest.raises(TypeError, match=r"does not take the option\(s\) \['depthh'\]; it takes \['dropout', "
                                        r"'in_chans', 'num_classes', 'width'\]"):
        build_model("user_models:tiny_cnn", options={"depthh": 3})
    with pytest.raises(ValueError, match="give num_classes as the run's num_classes"):
        build_model("user_models:tiny_cnn", options={"num_classes": 3})
    with pytest.raises(ValueError, match="convert='skipinit' is for foreign models; 'nf_wrn' is a normfree model"):
        build_model("nf_wrn", convert="skipinit")
    with pytest.raises(ValueError, match="depth and width are for normfree's registered models"):
        build_model("user_models:tiny_cnn", depth=10)
    with pytest.raises(ValueError, match="method 'fixup' is not available in convert"):
        build_model("user_models:tv_small", convert="fixup")


@pytest.mark.skipif(HAVE_TIMM and HAVE_TORCHVISION, reason="both libraries are installed")
def test_library_specs_without_the_library_say_what_to_install():
    for lib in ("timm", "torchvision"):
        if importlib.util.find_spec(lib) is None:
            with pytest.raises(ValueError, match=rf"model '{lib}:resnet18' needs {lib}, which is not importable "
                                                 rf"here .*pip install {lib}"):
                build_model(f"{lib}:resnet18", num_classes=10)


def test_spec_syntax_is_checked_without_importing():
    assert check_spec("timm:vit_base_patch16_224.augreg_in21k") and check_spec("a.b.c:Net.build")
    with pytest.raises(ValueError, match="not a valid spec"):
        check_spec("timm:")
    with pytest.raises(ValueError, match="data 'x:y z' is not a valid spec: use package.module:function"):
        check_spec("x:y z", "data")
    with pytest.raises(ValueError, match="not a valid spec"):
        normfree.TrainConfig(model="pkg:bad name")


def test_adapt_input_conv_repeats_the_channels_and_keeps_the_output_variance():
    torch.manual_seed(0)
    conv = nn.Conv2d(3, 64, 3, bias=False)
    old = conv.weight.detach().clone()
    model = nn.Sequential(conv, nn.ReLU())
    assert adapt_input_conv(model, 5) == "0"
    new = model[0].weight
    assert new.shape == (64, 5, 3, 3)
    for c in range(5):
        torch.testing.assert_close(new[:, c], old[:, c % 3] * (3 / 5) ** 0.5)
    x3, x5 = torch.randn(4096, 3, 3, 3), torch.randn(4096, 5, 3, 3)
    v3 = torch.nn.functional.conv2d(x3, old).var()
    with torch.no_grad():
        v5 = model[0](x5).var()
    assert abs(float(v5 / v3) - 1) < 0.05
    with pytest.raises(ValueError, match="has no convolution taking 3 channels"):
        adapt_input_conv(nn.Sequential(nn.Conv2d(1, 2, 1)), 2)


# ---------------------------------------------------------------- classifier
@pytest.mark.parametrize("make, name", [
    (lambda: TinyCNN(10, 1), "fc"),                          # attribute fc
    (lambda: HeadNet(10, 1), "head.2"),                      # head: an MLP, its last Linear
    (lambda: timm_resnetv2_50(num_classes=10), "head.fc"),   # get_classifier() (timm's interface)
    (lambda: ProjNet(), "proj"),                             # get_classifier() only
    (lambda: normfree.create_model("nf_wrn", depth=10), "fc"),
    (lambda: nn.Sequential(nn.Linear(2, 2)), None),          # nothing to find
])
def test_find_classifier(make, name):
    model = make()
    found, module = find_classifier(model)
    assert found == name
    assert (module is None) if name is None else (module is model.get_submodule(name))


def test_a_named_classifier_must_exist():
    model = OddNames()
    assert find_classifier(model, "out_layer") == ("out_layer", model.out_layer)
    with pytest.raises(ValueError, match=re.escape("classifier 'out_layr' is not a module of OddNames (did you mean "
                                                   "'out_layer'?); its last layers are ['features', 'out_layer']")):
        find_classifier(model, "out_layr")


# ---------------------------------------------------------------- command line
def test_cli_spp_of_a_factory_converted_and_not(tmp_path, capsys):
    out = str(tmp_path / "spp.png")
    rc = main(["spp", "--model", "user_models:tv_small", "--convert", "skipinit", "--compare", "user_models:tv_small",
               "--batch", "4", "--resolution", "32", "--out", out])
    assert rc == 0
    models = json.load(open(str(tmp_path / "spp.json")))["models"]
    assert list(models) == ["user_models:tv_small+skipinit", "user_models:tv_small"]
    converted, original = (models[k]["blocks"] for k in models)
    assert len(converted) == len(original) == 4
    assert all(b["ratio"] == 0 for b in converted)     # SkipInit: every branch starts at zero
    assert all(b["ratio"] > 0.1 for b in original)     # BN branches do not
    assert models["user_models:tv_small"]["predicted_var"] is None  # no prediction for an unknown model


@pytest.mark.parametrize("argv, message", [
    (["--model", "user_models:tv_small", "--convert", "skipnit"], "--convert must be one of"),
    (["--model", "nf_wrn", "--convert", "skipinit"], "--convert is for foreign models; 'nf_wrn' is a normfree"),
    (["--model", "user_models:tv_small", "--depth", "10"], "--depth and --width are for normfree's registered"),
    (["--model", "nf_wrn", "--compare", "user_models:nope"], "'user_models' has no attribute 'nope'"),
])
def test_cli_spp_refuses_bad_specs_before_measuring(tmp_path, capsys, argv, message):
    assert main(["spp", *argv, "--out", str(tmp_path / "s.png")]) == 2
    assert message in capsys.readouterr().err
    assert not os.path.exists(tmp_path / "s.png")


def test_cli_train_export_and_load_a_converted_factory_model(tmp_path, capsys):
    out = str(tmp_path / "run")
    args = ["train", "--model", "user_models:tv_small", "--convert", "skipinit", "--steps", "24",
            "--batch-size", "32", "--lr", "0.4", "--max-train-examples", "256", "--max-test-examples", "64",
            "--log-every", "6", "--no-augment", "--agc", "0.02", "--out", out]
    assert main(args) == 0
    lines = [json.loads(line) for line in open(os.path.join(out, "metrics.jsonl"))]
    losses = [r["loss"] for r in lines if r["kind"] == "train"]
    assert losses[-1] < losses[0] - 0.5, losses  # the BN-free copy learns
    info = json.load(open(os.path.join(out, "config.json")))
    assert info["config"]["model"] == "user_models:tv_small" and info["config"]["convert"] == "skipinit"
    assert info["agc_excluded"] == "fc" and info["model_info"]["in_chans"] == 1
    model = load_model(out)  # rebuilt from the stored spec, converted again
    assert any(isinstance(m, normfree.ConvertedBlock) for m in model.modules())
    assert not any(isinstance(m, nn.BatchNorm2d) for m in model.modules())
    assert main(["export", out]) == 0
    printed = capsys.readouterr().out
    assert "model.pt2" in printed and "model.safetensors" in printed
    x = torch.randn(3, 1, 8, 8)
    with torch.no_grad():
        torch.testing.assert_close(torch.export.load(os.path.join(out, "model.pt2")).module()(x), model(x))
        assert torch.equal(load_model(os.path.join(out, "model.safetensors"))(x), model(x))


def test_cli_export_of_a_passed_module_takes_the_factory_as_model(tmp_path, capsys):
    from user_models import digits_tensors

    out = str(tmp_path / "m")
    train_ds, _ = digits_tensors(n_train=64)
    res = normfree.train(normfree.TrainConfig(model=None, steps=2, batch_size=32, progress=False, out=out),
                         model=HeadNet(10, 1), dataset=train_ds)
    assert main(["export", out]) == 2
    assert "give load_model factory=" in capsys.readouterr().err
    assert main(["export", out, "--model", "user_models:HeadNet", "--format", "safetensors",
                 "--out", str(tmp_path / "e" / "w.safetensors")]) == 0
    assert not os.path.exists(tmp_path / "e" / "w.pt2")
    again = load_model(str(tmp_path / "e" / "w.safetensors"), factory=HeadNet)
    assert all(torch.equal(a, b) for a, b in zip(again.state_dict().values(), res.model.state_dict().values()))


def test_cli_train_with_a_data_function_resumes(tmp_path):
    out = str(tmp_path / "d")
    base = ["train", "--model", "user_models:tiny_cnn", "--data", "user_models:digits_tensors", "--steps", "10",
            "--batch-size", "32", "--log-every", "5", "--out", out]
    assert main(base + ["--stop-after-steps", "4"]) == 0
    assert main(["train", "--out", out, "--resume"]) == 0  # everything else comes from config.json
    ck = load_checkpoint(out)
    assert ck["step"] == 10 and ck["config"]["data"] == "user_models:digits_tensors"
    assert ck["data"]["test"] == [96, 1, 8, 8]  # the (train, test) pair's test part is used


# ---------------------------------------------------------------- the real libraries, where installed
@pytest.mark.skipif(not HAVE_TIMM, reason="timm is not installed")
def test_real_timm_spec_builds_converts_and_trains(tmp_path):
    m = build_model("timm:resnet18", num_classes=10, in_chans=1)
    assert m(torch.randn(2, 1, 32, 32)).shape == (2, 10)
    assert find_classifier(m)[0] == "fc"
    res = normfree.train(normfree.TrainConfig(model="timm:resnet18", convert="skipinit", steps=2, batch_size=16,
                                              max_train_examples=64, max_test_examples=32, progress=False,
                                              agc=0.01))
    assert res.status == "ok"
    with pytest.raises(ValueError, match="timm has no model 'resnet18x'"):
        build_model("timm:resnet18x")


@pytest.mark.skipif(not HAVE_TORCHVISION, reason="torchvision is not installed")
def test_real_torchvision_spec_builds_converts_and_trains(tmp_path):
    m = build_model("torchvision:resnet18", num_classes=10, in_chans=1)
    assert m.conv1.in_channels == 1 and m(torch.randn(2, 1, 32, 32)).shape == (2, 10)
    res = normfree.train(normfree.TrainConfig(model="torchvision:resnet18", convert="skipinit", steps=2,
                                              batch_size=16, max_train_examples=64, max_test_examples=32,
                                              progress=False))
    assert res.status == "ok"
    assert main(["spp", "--model", "torchvision:resnet18", "--convert", "skipinit", "--compare",
                 "torchvision:resnet18", "--batch", "2", "--resolution", "64",
                 "--out", str(tmp_path / "tv.png")]) == 0


# ---------------------------------------------------------------- TensorBoard
@pytest.mark.skipif(importlib.util.find_spec("tensorboard") is None, reason="tensorboard is not installed")
def test_tensorboard_logs_the_metrics(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    out = str(tmp_path / "tb_run")
    res = normfree.train(normfree.TrainConfig(model="skipinit_wrn", depth=10, steps=4, batch_size=32, log_every=2,
                                              max_train_examples=64, max_test_examples=32, progress=False,
                                              out=out))
    acc = EventAccumulator(os.path.join(out, "tb")).Reload()
    losses = [e.value for e in acc.Scalars("train/loss")]
    want = [h["loss"] for h in res.history if h["kind"] == "train"]
    assert [e.step for e in acc.Scalars("train/loss")] == [2, 4]
    assert losses == pytest.approx(want)
    assert acc.Scalars("eval/test_acc")[0].value == pytest.approx(res.test_acc)
