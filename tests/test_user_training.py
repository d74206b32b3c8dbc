"""normfree.train with a user's nn.Module and torch Dataset / DataLoader: learning, exact
resume, the note when resume cannot be exact, AGC without the classifier, divergence,
load_model with a factory, and safetensors weights."""
import json
import math
import os

import pytest
import torch
import torch.nn as nn
from torch.utils.data import DataLoader, Sampler

import normfree
from normfree.train import TrainConfig, load_checkpoint, load_model, train
from normfree.train.weights import load_weights
from user_models import HeadNet, NoisyDigits, OddNames, TinyCNN, digits_tensors, tiny_cnn


@pytest.fixture(scope="module")
def digits():
    return digits_tensors()  # (train: 256, test: 96) float TensorDatasets with .classes


def cfg(**kw):
    base = dict(model=None, steps=12, batch_size=32, lr=0.1, log_every=4, progress=False, weight_decay=0.0)
    base.update(kw)
    return TrainConfig(**base)


def net(seed=0, **kw):
    torch.manual_seed(seed)
    return TinyCNN(10, 1, **kw)


def same_weights(a, b):
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


# ---------------------------------------------------------------- learning
def test_user_module_trains_on_a_dataset_and_the_loss_drops(digits, tmp_path):
    train_ds, test_ds = digits
    out = str(tmp_path / "run")
    model = net()
    res = train(cfg(steps=40, lr=0.2, out=out), model=model, dataset=train_ds, test_data=test_ds)
    losses = [h["loss"] for h in res.history if h["kind"] == "train"]
    assert res.status == "ok" and res.steps == 40 and res.model is model  # trained in place
    assert losses[-1] < losses[0] - 0.5, losses      # starts near ln 10 = 2.30
    assert res.test_acc > 0.4                       # chance is 0.1
    info = json.load(open(os.path.join(out, "config.json")))
    assert info["config"]["model"] is None and info["config"]["data"] is None
    assert info["model_info"]["class"] == "user_models.TinyCNN" and info["model_info"]["source"] == "module"
    assert info["data_fingerprint"]["train"] == [256, 1, 8, 8] and info["data_fingerprint"]["test"] == [96, 1, 8, 8]
    assert info["exact_resume"] is True and info["num_classes"] == 10
    assert sorted(set(os.listdir(out)) - {"tb"}) == [".lock", "checkpoint.pt", "config.json", "metrics.csv", "metrics.jsonl",
                                       "model.safetensors", "summary.json"]


def test_a_model_building_function_is_recorded_by_its_import_path(digits, tmp_path):
    train_ds, _ = digits
    out = str(tmp_path / "fn")
    res = train(cfg(steps=4, out=out, model_options={"width": 4}), model=tiny_cnn, dataset=train_ds)
    assert res.model.conv.out_channels == 4 and res.model.conv.in_channels == 1  # options + data's channels
    assert res.test_acc is None                                                    # no test data given
    assert load_checkpoint(out)["config"]["model"] == "user_models:tiny_cnn"
    again = load_model(out)  # no factory needed: the spec is stored
    assert same_weights(again, res.model)


# ---------------------------------------------------------------- exact resume
class ShuffledLoader:
    """DataLoader(shuffle=True) without a generator: its own order would come from torch's global RNG."""

    def __new__(cls, ds):
        return DataLoader(ds, batch_size=32, shuffle=True)


@pytest.mark.parametrize("variant", ["dataset_random_transform", "unseeded_dataloader", "two_workers"])
def test_resume_of_a_user_module_run_is_bit_identical(digits, tmp_path, variant):
    train_ds, test_ds = digits
    data = {"dataset_random_transform": lambda: NoisyDigits(train_ds),
            "unseeded_dataloader": lambda: ShuffledLoader(train_ds),
            "two_workers": lambda: NoisyDigits(train_ds)}[variant]
    opts = dict(steps=14, num_workers=2 if variant == "two_workers" else 0)
    full = train(cfg(**opts, out=str(tmp_path / "full")), model=net(dropout=0.3), dataset=data(), test_data=test_ds)
    out = str(tmp_path / "parts")
    part = train(cfg(**opts, out=out, stop_after_steps=5), model=net(dropout=0.3), dataset=data(),
                 test_data=test_ds)
    assert part.status == "stopped" and load_checkpoint(out)["batch_in_epoch"] == 5  # mid-epoch (8 per epoch)
    if variant == "two_workers":  # the number of workers may change on resume: it changes no sample
        opts["num_workers"] = 0
    resumed = train(cfg(**opts, out=out, resume=True), model=net(seed=5, dropout=0.3), dataset=data(),
                    test_data=test_ds)
    assert resumed.steps == 14
    assert same_weights(full.model, resumed.model)
    assert resumed.final_train_loss == full.final_train_loss and resumed.test_acc == full.test_acc


def test_without_seeded_reading_a_random_transform_in_workers_breaks_exact_resume(digits, tmp_path, monkeypatch):
    """The seeding of each sample is what makes the resume above exact when workers
    read the data (in the main process, restoring torch's generator would suffice)."""
    import contextlib

    from normfree.train import torchdata

    monkeypatch.setattr(torchdata, "seeded_rngs", lambda seed: contextlib.nullcontext())
    train_ds, _ = digits
    opts = dict(steps=10, num_workers=2)
    full = train(cfg(**opts, out=str(tmp_path / "f")), model=net(), dataset=NoisyDigits(train_ds))
    out = str(tmp_path / "p")
    train(cfg(**opts, out=out, stop_after_steps=5), model=net(), dataset=NoisyDigits(train_ds))
    resumed = train(cfg(**opts, out=out, resume=True), model=net(), dataset=NoisyDigits(train_ds))
    assert not same_weights(full.model, resumed.model)


class EveryOtherSampler(Sampler):
    """A sampler normfree cannot reproduce (it knows only Random/SequentialSampler)."""

    def __init__(self, n):
        self.n = n

    def __len__(self):
        return self.n // 2

    def __iter__(self):
        return iter(range(0, self.n, 2))


def test_a_loader_normfree_cannot_order_says_so_and_still_resumes(digits, tmp_path, capsys):
    train_ds, _ = digits
    loader = DataLoader(train_ds, batch_size=16, sampler=EveryOtherSampler(len(train_ds)))  # 8 batches/epoch
    out = str(tmp_path / "custom")
    part = train(cfg(steps=12, out=out, stop_after_steps=4), model=net(), dataset=loader)
    err = capsys.readouterr().err
    assert "cannot order this DataLoader's batches itself: its sampler is EveryOtherSampler" in err
    assert "note: the DataLoader gives 16 examples per batch" in err  # batch_size=32 of the config is not used
    info = json.load(open(os.path.join(out, "config.json")))
    assert info["exact_resume"] is False and info["batch_size"] == 16
    assert part.steps == 4
    resumed = train(cfg(steps=12, out=out, resume=True), model=net(), dataset=loader)
    assert "note: resuming, but normfree cannot order" in capsys.readouterr().err
    assert resumed.status == "ok" and resumed.steps == 12
    # this sampler's order does not depend on anything: the resumed run is exact after all
    full = train(cfg(steps=12), model=net(), dataset=loader)
    assert same_weights(full.model, resumed.model)


# ---------------------------------------------------------------- AGC
def _one_step(model, data, **kw):
    """One plain SGD step (lr 1) over the whole data set as one batch: the
    gradient of the mean loss does not depend on the order."""
    before = {k: v.clone() for k, v in model.state_dict().items()}
    train(cfg(steps=1, batch_size=len(data), lr=1.0, momentum=0.0, nesterov=False, schedule="constant", **kw),
          model=model, dataset=data)
    return {k: before[k] - v for k, v in model.state_dict().items()}  # = clipped gradient


@pytest.mark.parametrize("make, head, kw", [
    (lambda: HeadNet(10, 1), "head.2", {}),                      # found: head -> its last Linear
    (lambda: OddNames(10, 1), "out_layer", {"classifier": "out_layer"}),  # named by the user
])
def test_agc_clips_a_user_model_but_not_its_classifier(digits, make, head, kw):
    train_ds, _ = digits
    torch.manual_seed(0)
    model = make()
    w0 = {k: v.clone() for k, v in model.state_dict().items()}
    grad = _one_step(model, train_ds)                     # no AGC: the raw gradient
    model.load_state_dict(w0)
    clipped = _one_step(model, train_ds, agc=1e-3, **kw)
    # the classifier's weight is not clipped; its bias is, like every bias (experiment_nfnets.py; main 62a1686)
    torch.testing.assert_close(clipped[head + ".weight"], grad[head + ".weight"])
    assert not torch.allclose(clipped[head + ".bias"], grad[head + ".bias"])
    body = [n for n in w0 if not n.startswith(head + ".") and w0[n].dim() > 1]
    assert body
    for name in body:
        w, g = w0[name], clipped[name]
        limit = 1e-3 * w.flatten(1).norm(dim=1).clamp(min=1e-3)
        assert torch.all(g.flatten(1).norm(dim=1) <= limit * (1 + 1e-4)), name
        assert not torch.allclose(g, grad[name]), name    # and it was clipped


def test_agc_without_a_classifier_it_can_find_clips_everything_and_says_so(digits, capsys):
    train_ds, _ = digits
    torch.manual_seed(0)
    model = OddNames(10, 1)
    delta = _one_step(model, train_ds, agc=1e-3)
    assert "no classifier found in OddNames" in capsys.readouterr().err
    w = model.out_layer.weight + delta["out_layer.weight"]  # the weight before the step
    assert torch.all(delta["out_layer.weight"].norm(dim=1) <= 1e-3 * w.norm(dim=1).clamp(min=1e-3) * (1 + 1e-4))


# ---------------------------------------------------------------- divergence, checks
def test_divergence_of_a_user_model_is_a_result(digits, tmp_path):
    train_ds, _ = digits
    out = str(tmp_path / "d")

    def poison(step, model, rec):
        if step == 6:
            with torch.no_grad():
                model.fc.weight.fill_(float("nan"))

    res = train(cfg(steps=16, out=out, log_every=2, checkpoint_every=4), model=net(), dataset=train_ds,
                callback=poison)
    assert res.status == "diverged" and res.diverged_step == 7 and math.isfinite(res.last_finite_loss)
    assert load_checkpoint(out)["step"] == 4  # the last good checkpoint stays
    w = load_weights(os.path.join(out, "model.safetensors"))
    assert w["step"] == 4 and all(torch.isfinite(v).all() for v in w["model"].values())


@pytest.mark.parametrize("model, message", [
    (lambda: TinyCNN(3, 1), "has 3 outputs, but the data have 10 classes: build it with num_classes=10"),
    (lambda: TinyCNN(10, 3), "fails on the training inputs of shape (2, 1, 8, 8): RuntimeError"),
    (lambda: nn.Conv2d(1, 10, 3), "must return logits of shape (N, classes) in eval mode; for inputs "
                                  "(2, 1, 8, 8) it returned (2, 10, 6, 6)"),
    (lambda: nn.Flatten(), "the model (Flatten) has no parameters to train"),
])
def test_a_model_that_does_not_fit_the_data_is_refused_before_training(digits, model, message):
    train_ds, _ = digits
    with pytest.raises(ValueError) as e:
        train(cfg(), model=model(), dataset=train_ds)
    assert message in str(e.value)


def test_config_and_arguments_are_checked(digits):
    train_ds, _ = digits
    with pytest.raises(ValueError, match="depth is an option of normfree's registered models"):
        train(TrainConfig(depth=10, progress=False), model=net(), dataset=train_ds)
    with pytest.raises(ValueError, match="model_options .* are arguments of a model factory"):
        train(cfg(model_options={"width": 3}), model=net(), dataset=train_ds)
    with pytest.raises(TypeError, match="model must be an nn.Module or a callable"):
        train(cfg(), model="tiny", dataset=train_ds)
    with pytest.raises(ValueError, match="augment applies to normfree's built-in data sets"):
        train(cfg(augment=True), model=net(), dataset=train_ds)
    with pytest.raises(ValueError, match="convert='skipinit' makes a foreign model BN-free; 'nf_wrn' is a normfree"):
        train(TrainConfig(model="nf_wrn", convert="skipinit", progress=False))
    with pytest.raises(ValueError, match="convert must be one of"):
        TrainConfig(convert="skipnit")
    with pytest.raises(ValueError, match="data=None means the data are passed"):
        train(cfg(data=None), model=net())
    with pytest.raises(TypeError, match=r"does not take the option\(s\) \['depthh'\]"):
        train(cfg(model="user_models:tiny_cnn", model_options={"depthh": 2}), dataset=train_ds)
    from torch.utils.data import TensorDataset

    with pytest.raises(ValueError, match="do not say how many classes they have .* give num_classes"):
        train(cfg(model="user_models:tiny_cnn"), dataset=TensorDataset(*train_ds.tensors))
    with pytest.raises(ValueError, match="gave a dict with keys \\['x', 'y'\\]; normfree.train needs"):
        train(cfg(), model=net(), dataset=[{"x": torch.zeros(1, 8, 8), "y": 0}] * 64)


# ---------------------------------------------------------------- load_model, safetensors
@pytest.fixture(scope="module")
def module_run(digits, tmp_path_factory):
    train_ds, test_ds = digits
    out = str(tmp_path_factory.mktemp("module_run"))
    res = train(cfg(steps=6, out=out), model=HeadNet(10, 1), dataset=train_ds, test_data=test_ds)
    return out, res


def test_load_model_of_a_passed_module_needs_a_factory(module_run):
    out, res = module_run
    with pytest.raises(ValueError, match=r"passed to normfree.train as an object \(user_models.HeadNet\): give "
                                         r"load_model factory="):
        load_model(out)
    for factory in (HeadNet, "user_models:HeadNet", lambda num_classes: HeadNet(num_classes, in_channels=1)):
        model = load_model(out, factory=factory)
        assert not model.training and same_weights(model, res.model)
    with pytest.raises(ValueError, match="do not fit the model that user_models:TinyCNN builds"):
        load_model(out, factory="user_models:TinyCNN")
    ckpt = os.path.join(out, "checkpoint.pt")
    for factory in (None, TinyCNN):  # the errors name the file, and a class by its importable name
        with pytest.raises(ValueError) as e:
            load_model(out, factory=factory)
        assert str(e.value).startswith(ckpt if factory is None else f"the weights in {ckpt} do not fit the model "
                                       "that user_models:TinyCNN builds ("), str(e.value)


def test_load_model_of_a_factory_run_calls_it_again_with_its_options(digits, tmp_path):
    train_ds, _ = digits
    out = str(tmp_path / "opts")
    res = train(cfg(model="user_models:tiny_cnn", model_options={"width": 4}, steps=2, out=out), dataset=train_ds)
    model = load_model(out)  # no factory needed: the spec and its options are stored
    assert isinstance(model, TinyCNN) and same_weights(model, res.model)
    got = []

    def factory(num_classes, in_chans, width):  # a factory given also gets the run's options
        got.append((num_classes, in_chans, width))
        return tiny_cnn(num_classes, in_chans, width=width)
    assert same_weights(load_model(out, factory=factory), res.model) and got == [(10, 1, 4)]


def test_safetensors_round_trip_equals_the_model(module_run, tmp_path):
    out, res = module_run
    path = os.path.join(out, "model.safetensors")
    from safetensors.torch import load_file

    raw = load_file(path)  # a plain safetensors file: any reader takes it
    assert raw.keys() == res.model.state_dict().keys()
    model = load_model(path, factory=HeadNet)
    x = torch.randn(5, 1, 8, 8)
    with torch.no_grad():
        assert torch.equal(model(x), res.model.eval()(x))
    meta = load_weights(path)
    assert meta["step"] == 6 and meta["config"]["lr"] == 0.1 and meta["model_info"]["num_classes"] == 10
    assert meta["input"]["shape"] == [1, 8, 8]


def test_registered_model_weights_load_without_a_factory(tmp_path):
    out = str(tmp_path / "reg")
    res = train(TrainConfig(model="nf_wrn", depth=10, width=1, steps=3, batch_size=32, max_train_examples=64,
                            max_test_examples=32, progress=False, out=out))
    model = load_model(os.path.join(out, "model.safetensors"))
    assert isinstance(model, normfree.ResNet) and same_weights(model, res.model)


def test_bad_weights_files_are_refused_in_one_line(tmp_path):
    from safetensors.torch import save_file

    junk = tmp_path / "junk.safetensors"
    junk.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json")
    with pytest.raises(ValueError, match="cannot read .*junk.safetensors: not a readable safetensors file"):
        load_model(str(junk))
    foreign = str(tmp_path / "foreign.safetensors")
    save_file({"w": torch.zeros(2)}, foreign)
    with pytest.raises(ValueError, match="a safetensors file without normfree's metadata"):
        load_model(foreign)


def test_resume_on_other_user_data_is_refused(digits, tmp_path):
    train_ds, _ = digits
    out = str(tmp_path / "r")
    train(cfg(out=out, stop_after_steps=3), model=net(), dataset=train_ds)
    x, y = train_ds.tensors
    edited = torch.utils.data.TensorDataset(x.clone(), y.clone())
    edited.classes = train_ds.classes
    edited.tensors[0][-1] += 1.0  # one image changed (the last one is among the probed samples)
    with pytest.raises(ValueError, match="cannot resume .*: the data differ from the checkpoint's"):
        train(cfg(out=out, resume=True), model=net(), dataset=edited)


def test_evaluating_random_test_data_does_not_change_the_training(digits):
    """eval_every may change on resume: evaluation must not draw from the training's random stream."""
    train_ds, test_ds = digits
    runs = [train(cfg(steps=16, eval_every=every), model=net(dropout=0.3), dataset=train_ds,
                  test_data=NoisyDigits(test_ds)) for every in (0, 1)]
    assert [h["step"] for h in runs[1].history if h["kind"] == "eval"] == [8, 16]
    assert same_weights(runs[0].model, runs[1].model)


def test_ddp_of_a_factory_model_on_user_data_matches_one_process(tmp_path):
    """Two torchrun processes (gloo) split every global batch of normfree's order
    for a user Dataset: the trajectory is the one-process one (up to float summation)."""
    import subprocess
    import sys

    dist = pytest.importorskip("torch.distributed")
    if not (dist.is_available() and dist.is_gloo_available()):
        pytest.skip("torch.distributed with gloo is not available")
    args = ["--model", "user_models:tiny_cnn", "--data", "user_models:digits_tensors", "--steps", "6",
            "--batch-size", "32", "--lr", "0.1", "--log-every", "3", "--device", "cpu", "--no-progress"]
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR",
                                                            "MASTER_PORT")}
    here = os.path.dirname(os.path.abspath(__file__))
    env.update(OMP_NUM_THREADS="1", PYTHONPATH=os.pathsep.join([here, env.get("PYTHONPATH", "")]))
    out = str(tmp_path / "ddp")
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                           "-m", "normfree.cli", "train", *args, "--out", out], env=env, capture_output=True,
                          text=True, timeout=240)
    assert proc.returncode == 0, proc.stderr[-3000:]
    from normfree.cli import main

    assert main(["train", *args, "--out", str(tmp_path / "one")]) == 0
    a, b = load_checkpoint(out), load_checkpoint(str(tmp_path / "one"))
    assert json.load(open(os.path.join(out, "config.json")))["local_batch_size"] == 16
    for k, v in b["model"].items():
        assert torch.allclose(a["model"][k], v, rtol=1e-4, atol=1e-5), k
    torch.manual_seed(0)  # what train() does before calling the factory
    init = TinyCNN(10, 1).state_dict()
    assert all(torch.equal(init[k], v) for k, v in net().state_dict().items())  # (same seed, same weights)
    assert max(float((b["model"][k] - init[k]).abs().max()) for k in init) > 1e-3  # and the runs did train


@pytest.mark.slow
def test_bench_user_data_runs_and_prints_the_three_paths(capsys):
    import importlib.util

    path = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "benchmarks", "bench_user_data.py")
    spec = importlib.util.spec_from_file_location("bench_user_data", path)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    bench.main(["--n", "256", "--batch", "32", "--rounds", "1"])
    lines = capsys.readouterr().out.splitlines()
    assert [ln.split()[0] for ln in lines[1:4]] == ["builtin", "plain", "normfree"]
    assert lines[2].split()[2] == "1.00" and lines[4].startswith("per-sample seeding:")
