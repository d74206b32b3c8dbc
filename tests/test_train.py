"""The trainer: schedules, parameter groups, learning, exact resume, divergence, CLI."""
import copy
import importlib
import json
import math
import os
import signal

import pytest
import torch
import torch.nn.functional as F

import normfree
from normfree.cli import main
from normfree.train import (EXIT_DIVERGED, StepLog, TrainConfig, evaluate, load_checkpoint, lr_factor,
                            param_groups, parse_options, train)


def tiny(**kw):
    """A tiny WRN-10-1 on a 256-image subset of the 8x8 digits: 8 steps per epoch."""
    base = dict(model="skipinit_wrn", depth=10, width=1, data="digits", batch_size=32, lr=0.05,
                max_train_examples=256, max_test_examples=120, epochs=2, log_every=4, progress=False)
    base.update(kw)
    return TrainConfig(**base)


def assert_same_weights(a, b):
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for k in sa:
        assert torch.equal(sa[k], sb[k]), f"{k} differs"


# ---------------------------------------------------------------- pieces
def test_lr_schedules():
    total, warm = 100, 10
    assert [lr_factor(s, total, warm, "cosine") for s in (0, 4, 9)] == pytest.approx([0.1, 0.5, 1.0])
    assert lr_factor(10, total, warm, "cosine") == pytest.approx(1.0)
    assert lr_factor(55, total, warm, "cosine") == pytest.approx(0.5)          # half-way after warmup
    assert lr_factor(99, total, warm, "cosine") < 1e-3
    assert [lr_factor(s, total, 0, "step") for s in (0, 49, 50, 74, 75, 99)] == pytest.approx(
        [1, 1, 0.1, 0.1, 0.01, 0.01])
    assert lr_factor(80, total, 0, "constant") == 1.0
    with pytest.raises(ValueError, match="schedule"):
        lr_factor(0, 10, 0, "linear")


@pytest.mark.parametrize("name", ["fixup_wrn", "nf_wrn", "bn_wrn", "skipinit_wrn"])
def test_param_groups_decay_only_conv_linear_weights(name):
    model = normfree.create_model(name, depth=10, num_classes=10, in_chans=1)
    groups = {g["name"]: g for g in param_groups(model, 5e-4, scalar_lr_mult=0.1)}
    names = {id(p): n for n, p in model.named_parameters()}
    decay = {names[id(p)] for p in groups["decay"]["params"]}
    others = {names[id(p)] for g in groups.values() if g["name"] != "decay" for p in g["params"]}
    assert groups["decay"]["weight_decay"] == 5e-4
    assert all(g["weight_decay"] == 0 for k, g in groups.items() if k != "decay")
    # every parameter in exactly one group
    assert decay | others == set(names.values()) and not decay & others
    for n, p in model.named_parameters():
        is_weight = n.endswith(".weight") and p.dim() > 1
        assert (n in decay) == is_weight, n
    if name in ("fixup_wrn", "skipinit_wrn"):  # the scalar gains (and Fixup's scalar biases)
        scal = {names[id(p)] for p in groups["scalar"]["params"]}
        assert scal and all(model.get_parameter(n).dim() == 0 for n in scal)
        assert groups["scalar"]["lr_mult"] == 0.1
    if name == "nf_wrn":  # Scaled WS gains are 4-d but must not be decayed
        assert any(n.endswith(".gain") for n in others)


def test_schedule_ends_and_optimizer_construction():
    """The cosine schedule stays at 0 past its end and needs no step after warmup; the
    optimizer starts at lr x lr_mult per group, Nesterov only with momentum, AGC leaving
    out the classifier it finds; frozen parameters are in no group, empty groups dropped."""
    from normfree.agc import AGC
    from normfree.train import Schedule, make_optimizer
    assert lr_factor(120, 100, 10, "cosine") == 0.0          # past the end: not back up
    assert lr_factor(11, 10, 10, "cosine") == pytest.approx(0.0, abs=1e-12)  # warmup == total: at once 0 after
    assert lr_factor(10, 10, 10, "cosine") == 1.0
    assert lr_factor(0, 100, 1, "cosine") == 1.0 and lr_factor(3, 100, 4, "constant") == 1.0
    assert lr_factor(60, 100, 0, "step", milestones=(0.5,), gamma=0.3) == pytest.approx(0.3)
    cfg = TrainConfig(lr=0.2, schedule="constant", momentum=0.0, nesterov=True, scalar_lr_mult=0.5)
    assert not Schedule(cfg, 10, 0).depends_on_length()
    assert Schedule(TrainConfig(schedule="cosine"), 10, 0).depends_on_length()
    rec = Schedule(TrainConfig(lr=0.3, schedule="step", milestones=(0.4,), lr_gamma=0.2), 50, 5).record()
    assert rec == {"lr": 0.3, "schedule": "step", "total_steps": 50, "warmup_steps": 5, "milestones": [0.4],
                   "lr_gamma": 0.2}
    torch.manual_seed(0)
    model = normfree.create_model("skipinit_wrn", depth=10, num_classes=10, in_chans=1)
    model.stem[0].weight.requires_grad_(False)
    opt = make_optimizer(model, cfg)
    groups = {g["name"]: g for g in opt.param_groups}
    assert all(g["nesterov"] is False for g in groups.values())  # momentum 0: no Nesterov (torch would refuse)
    assert groups["decay"]["lr"] == 0.2 and groups["scalar"]["lr"] == pytest.approx(0.1)
    assert not any(p is model.stem[0].weight for g in groups.values() for p in g["params"])
    opt = make_optimizer(model, TrainConfig(momentum=0.9, nesterov=True, agc=0.05))
    assert isinstance(opt, AGC) and all(g["nesterov"] is True for g in opt.param_groups)
    assert [id(p) for p in opt.excluded] == [id(model.fc.weight)]  # the classifier's weight (bias clipped)
    plain = torch.nn.Sequential(torch.nn.Conv2d(1, 2, 3), torch.nn.Flatten(), torch.nn.Linear(72, 3))
    names = [g["name"] for g in param_groups(plain, 1e-4, scalar_lr_mult=0.1)]
    assert names == ["decay", "no_decay"]  # no scalars: no empty "scalar" group
    bare = torch.nn.Linear(3, 2)  # top-level names ("weight", no dot) are found too
    assert [g["name"] for g in param_groups(bare, 1e-4)] == ["decay", "no_decay"]
    user = torch.nn.Module()  # a 0-dim parameter of any module is a scalar too
    user.lin, user.temperature = torch.nn.Linear(2, 2), torch.nn.Parameter(torch.tensor(0.5))
    scalar = {g["name"]: g for g in param_groups(user, 1e-4, 0.1)}["scalar"]
    assert [id(p) for p in scalar["params"]] == [id(user.temperature)] and scalar["lr_mult"] == 0.1
    default = {g["name"]: g for g in param_groups(model, 0.0)}
    assert default["scalar"]["lr_mult"] == 1.0  # scalar_lr_mult defaults to 1 (param_groups; Fixup's 0.1 is the trainer's)


def test_make_optimizer_agc_leaves_out_the_named_or_given_classifier():
    """AGC's exclusion in make_optimizer: the classifier named by cfg.classifier (its weight),
    or exactly the parameters the caller gives."""
    from collections import OrderedDict

    from normfree.agc import AGC
    from normfree.train import make_optimizer
    model = torch.nn.Sequential(OrderedDict(body=torch.nn.Linear(4, 8), out_layer=torch.nn.Linear(8, 2)))
    opt = make_optimizer(model, TrainConfig(model=None, agc=0.01, classifier="out_layer"))
    assert isinstance(opt, AGC) and [id(p) for p in opt.excluded] == [id(model.out_layer.weight)]
    opt = make_optimizer(model, TrainConfig(model=None, agc=0.01), agc_exclude=[model.body.bias])
    assert [id(p) for p in opt.excluded] == [id(model.body.bias)]


def test_evaluate_matches_manual(digits):
    """evaluate = eval-mode cross-entropy and accuracy over all examples (the last,
    partial batch included), the model's mode restored whichever it was. A BN model
    whose running statistics are not the batch's: train mode would give other logits."""
    torch.manual_seed(0)
    model = normfree.create_model("bn_wrn", depth=10, num_classes=10, in_chans=1)
    for m in model.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.uniform_(-0.5, 0.5)
            m.running_var.uniform_(0.5, 2.0)
    with torch.no_grad():
        model.fc.weight.normal_(0, 0.3)
    x, y = digits.test_x[:50], digits.test_y[:50]
    xb = (x.float() / 255 - digits.mean.view(1, -1, 1, 1)) / digits.std.view(1, -1, 1, 1)
    with torch.no_grad():
        logits = model.eval()(xb)
        train_logits = copy.deepcopy(model).train()(xb)  # (a copy: train mode updates running statistics)
    assert (logits - train_logits).abs().max() > 1e-2  # the mode matters for this model
    want_loss = F.cross_entropy(logits, y).item()
    want_acc = (logits.argmax(1) == y).float().mean().item()
    for mode in (True, False):
        model.train(mode)
        loss, acc = evaluate(model, x, y, digits.mean, digits.std, batch_size=16)
        assert loss == pytest.approx(want_loss, rel=1e-5)
        assert acc == pytest.approx(want_acc)
        assert model.training is mode  # mode restored
        assert all(m.training is mode for m in model.modules())


def test_parse_options():
    assert parse_options(["alpha=0.2", "gain_init=1/sqrt(d)", "regularized=true", "depth=3", "x=none"]) == {
        "alpha": 0.2, "gain_init": "1/sqrt(d)", "regularized": True, "depth": 3, "x": None}
    with pytest.raises(ValueError, match="key=value"):
        parse_options(["alpha"])


def test_config_errors():
    with pytest.raises(ValueError, match="optimizer"):
        TrainConfig(optimizer="adam")
    with pytest.raises(ValueError, match="unknown method"):
        TrainConfig(model="batchnorm_wrn")
    with pytest.raises(TypeError, match="unknown option"):
        TrainConfig(model_options={"alpah": 0.2})
    with pytest.raises(ValueError, match="resume needs out"):
        TrainConfig(resume=True)


# ---------------------------------------------------------------- training
def test_training_learns_and_writes_files(digits, tmp_path):
    out = str(tmp_path / "run")
    seen = []
    res = train(tiny(epochs=4, lr=0.2, augment=False, out=out, eval_every=2), dataset=digits,
                callback=lambda step, model, rec: seen.append((step, rec["loss"])))
    assert res.status == "ok" and res.steps == 32 and res.epochs == 4
    assert [s for s, _ in seen] == [4, 8, 12, 16, 20, 24, 28, 32]
    assert seen[-1][1] < seen[0][1] - 0.5          # the loss clearly drops
    assert res.test_acc > 0.5                        # chance is 0.1
    assert isinstance(res.model, normfree.ResNet) and res.model.num_classes == 10 and res.model.in_chans == 1
    for f in ("metrics.jsonl", "metrics.csv", "config.json", "summary.json", "checkpoint.pt"):
        assert os.path.exists(os.path.join(out, f)), f
    lines = [json.loads(l) for l in open(os.path.join(out, "metrics.jsonl"))]
    assert [r["step"] for r in lines if r["kind"] == "eval"] == [16, 32]
    assert lines[-1]["test_acc"] == pytest.approx(res.test_acc)
    assert len(open(os.path.join(out, "metrics.csv")).read().splitlines()) == len(lines) + 1
    cfg = json.load(open(os.path.join(out, "config.json")))
    assert cfg["config"]["model"] == "skipinit_wrn" and cfg["steps_per_epoch"] == 8 and cfg["train_examples"] == 256
    summ = json.load(open(os.path.join(out, "summary.json")))
    assert summ["status"] == "ok" and summ["test_acc"] == pytest.approx(res.test_acc)
    ck = torch.load(os.path.join(out, "checkpoint.pt"), weights_only=True)
    assert ck["step"] == 32
    # no resume flag: refuse to overwrite the finished run
    with pytest.raises(ValueError, match="resume"):
        train(tiny(out=out), dataset=digits)


def _interrupt_by_callback(at):
    def cb(step, model, rec):
        if step == at:
            raise KeyboardInterrupt
    return cb


def _signal_during_step(at, signum=signal.SIGINT):
    """A callback that, from the first log on, delivers a real signal in the middle of
    the ``at``-th training forward pass after it (so during a step, not between steps)."""
    state = {"n": 0, "hook": None}

    def hook(mod, inp, out):
        if mod.training:
            state["n"] += 1
            if state["n"] == at:
                os.kill(os.getpid(), signum)

    def cb(step, model, rec):
        if state["hook"] is None:
            state["hook"] = model.register_forward_hook(hook)
    return cb


@pytest.mark.parametrize("variant", ["callback_mid_epoch", "sigint_during_step", "sigterm_during_step",
                                     "stop_after_epoch_adamw"])
def test_interrupted_and_resumed_run_is_exact(digits, tmp_path, variant):
    opts = dict(steps=20, model_options={"drop_path": 0.2, "dropout": 0.3})  # RNG state matters
    if variant.endswith("adamw"):
        opts.update(optimizer="adamw", lr=3e-3, model="nf_wrn", model_options={"drop_path": 0.2})
    full = train(tiny(**opts, out=str(tmp_path / "full")), dataset=digits)
    out = str(tmp_path / "parts")
    if variant == "callback_mid_epoch":
        with pytest.raises(KeyboardInterrupt):
            train(tiny(**opts, out=out), dataset=digits, callback=_interrupt_by_callback(12))
        expect = 12
    elif variant.endswith("during_step"):
        # hook installed at the step-4 log; its 7th forward is in step 11, which completes first
        signum = signal.SIGTERM if variant.startswith("sigterm") else signal.SIGINT
        with pytest.raises(KeyboardInterrupt) as e:
            train(tiny(**opts, out=out), dataset=digits, callback=_signal_during_step(7, signum))
        assert e.value.signum == signum  # normfree train exits with 128 + signum
        expect = 11
    else:
        r = train(tiny(**opts, out=out, stop_after_steps=8), dataset=digits)
        assert r.status == "stopped" and r.steps == 8
        expect = 8
    ck = torch.load(os.path.join(out, "checkpoint.pt"), weights_only=True)
    assert ck["step"] == expect
    assert ck["batch_in_epoch"] == expect % 8
    resumed = train(tiny(**opts, out=out, resume=True), dataset=digits)
    assert resumed.steps == 20
    assert_same_weights(full.model, resumed.model)
    assert resumed.final_train_loss == full.final_train_loss
    events = [h for h in resumed.history if h["kind"] == "event"]
    assert [e["status"] for e in events] == (["stopped"] if variant.endswith("adamw") else ["interrupted"])
    strip = lambda hs: [(h["kind"], h["step"], h.get("loss"), h.get("test_acc")) for h in hs if h["kind"] != "event"]
    assert strip(resumed.history) == strip(full.history)


def test_resume_rejects_changed_config(digits, tmp_path):
    out = str(tmp_path / "r")
    train(tiny(out=out, stop_after_steps=3), dataset=digits)
    with pytest.raises(ValueError, match="batch_size=32 .checkpoint. vs 16"):
        train(tiny(out=out, resume=True, batch_size=16), dataset=digits)


def test_divergence_is_a_result(digits, tmp_path):
    out = str(tmp_path / "d")

    def poison(step, model, rec):
        if step == 12:  # after the epoch-1 checkpoint (step 8)
            with torch.no_grad():
                model.fc.weight.fill_(float("nan"))

    res = train(tiny(epochs=3, out=out), dataset=digits, callback=poison)
    assert res.status == "diverged"
    assert res.diverged_step == 13 and math.isfinite(res.last_finite_loss)
    assert res.test_acc is None
    last = json.loads(open(os.path.join(out, "metrics.jsonl")).read().splitlines()[-1])
    assert last["status"] == "diverged" and last["step"] == 13
    assert json.load(open(os.path.join(out, "summary.json")))["status"] == "diverged"
    ck = load_checkpoint(os.path.join(out, "checkpoint.pt"))
    assert ck["step"] == 8  # the last good checkpoint stays
    assert all(torch.isfinite(v).all() for v in ck["model"].values() if v.is_floating_point())


@pytest.fixture
def spy_optimizer(monkeypatch):
    """The optimizer the trainer builds (normfree.train.loop.make_optimizer, spied on)."""
    loop = importlib.import_module("normfree.train.loop")
    made = []

    def spy(model, cfg, *a, **kw):
        opt = make(model, cfg, *a, **kw)
        made.append((opt, {n: p.detach().clone() for n, p in model.named_parameters()}))
        return opt

    make = loop.make_optimizer
    monkeypatch.setattr(loop, "make_optimizer", spy)
    return made


def test_amp_channels_last_label_smoothing_fixup_scalars(digits, spy_optimizer, monkeypatch):
    """Each option has its effect: bf16 autocast in the training forward, channels_last
    weights and inputs, the smoothed loss, scalars at lr x scalar_lr_mult, the step
    schedule after a linear warmup, SGD momentum without Nesterov."""
    seen = {"ls": set(), "dtypes": set(), "cl_input": set(), "lrs": []}
    ce = F.cross_entropy

    def spy_ce(*a, **kw):
        seen["ls"].add(kw.get("label_smoothing", 0.0))
        return ce(*a, **kw)

    monkeypatch.setattr(F, "cross_entropy", spy_ce)

    def cb(step, model, rec):
        if step == 1:
            model.fc.register_forward_hook(lambda m, i, o: seen["dtypes"].add(o.dtype) if m.training else None)
            model.stem[0].register_forward_pre_hook(
                lambda m, i: seen["cl_input"].add(i[0].is_contiguous(memory_format=torch.channels_last)))
        opt = spy_optimizer[0][0]
        seen["lrs"].append({g["name"]: g["lr"] for g in opt.param_groups})
        assert rec["lr"] == seen["lrs"][-1]["decay"]

    res = train(tiny(model="fixup_wrn", steps=6, log_every=1, amp=True, channels_last=True, label_smoothing=0.1,
                     scalar_lr_mult=0.1, schedule="step", warmup_steps=2, nesterov=False, lr=0.05),
                dataset=digits, callback=cb)
    assert res.status == "ok" and math.isfinite(res.final_train_loss) and 0 <= res.test_acc <= 1
    assert seen["dtypes"] == {torch.bfloat16}                  # amp: the training forward runs in bf16
    assert seen["cl_input"] == {True}                          # channels_last inputs ...
    convs = [m for m in res.model.modules() if isinstance(m, torch.nn.Conv2d) and m.kernel_size == (3, 3)]
    assert convs and all(c.weight.is_contiguous(memory_format=torch.channels_last) for c in convs)  # ... and weights
    assert 0.1 in seen["ls"]                                   # the training loss is smoothed
    # warmup (step + 1) / 2 for steps 0, 1; then x 0.1 at 50% and 75% of the 6 steps
    factors = [0.5, 1.0, 1.0, 0.1, 0.1, 0.01]
    assert [r["decay"] for r in seen["lrs"]] == pytest.approx([0.05 * f for f in factors])
    assert [r["scalar"] for r in seen["lrs"]] == pytest.approx([0.005 * f for f in factors])
    opt = spy_optimizer[0][0]
    assert isinstance(opt, torch.optim.SGD) and all(g["nesterov"] is False and g["momentum"] == 0.9
                                                   for g in opt.param_groups)


def _unit_norms(t):
    return t.reshape(t.shape[0], -1).norm(dim=1) if t.dim() > 1 and t[0].numel() > 1 else t.reshape(1, -1).norm(dim=1)


@pytest.mark.parametrize("agc", [0.01, None])
def test_agc_option(digits, spy_optimizer, agc):
    """With agc=lambda the optimizer clips every unit's update (plain SGD, lr = 1) to
    lambda max(||W_i||, 1e-3), all but the classifier weight's (experiment_nfnets.py);
    without it, updates are larger."""
    from normfree.agc import AGC
    res = train(tiny(model="nf_wrn", steps=1, log_every=1, agc=agc, lr=1.0, momentum=0.0, weight_decay=0.0,
                     schedule="constant"), dataset=digits)
    assert res.status == "ok"
    opt, before = spy_optimizer[0]
    assert isinstance(opt, AGC) == (agc is not None)
    after = dict(res.model.named_parameters())
    ratios, fc_ratios = [], []
    for name, w0 in before.items():
        step = (after[name].detach() - w0)
        bound = 1.0 * 0.01 * _unit_norms(w0).clamp(min=1e-3)
        r = (_unit_norms(step) / bound).max().item()
        (fc_ratios if name == "fc.weight" else ratios).append(r)
    if agc is not None:
        assert opt.clipping == agc and [id(p) for p in opt.excluded] == [id(res.model.fc.weight)]
        assert max(ratios) <= 1 + 1e-4          # every unit's step within the bound ...
        assert max(ratios) > 0.999              # ... and some at it: clipped
        assert max(fc_ratios) > 1.5             # the classifier weight is not clipped
    else:
        assert max(ratios) > 1.5                # the same step without AGC exceeds the bound


def test_model_and_optimizer_options_reach_the_run(digits, spy_optimizer):
    """Options by their effect on what the run builds: per-block drop-path rates linear in
    depth (p l / L), dropout before the classifier, AdamW with its betas and weight decay on
    conv/linear weights only, AGC's lambda and eps, the step schedule's milestones and gamma."""
    from normfree.agc import AGC
    lrs = []
    res = train(tiny(model="nf_wrn", steps=4, log_every=1, drop_path=0.2, dropout=0.3, optimizer="adamw", lr=1e-3,
                     betas=(0.8, 0.95), weight_decay=1e-3, agc=0.02, agc_eps=0.01, schedule="step",
                     milestones=(0.25, 0.5), lr_gamma=0.5, warmup_steps=0),
                dataset=digits, callback=lambda step, model, rec: lrs.append(rec["lr"]))
    assert res.status == "ok"
    rates = [b.drop_path for b in res.model.blocks]
    L = len(rates)
    assert rates == pytest.approx([0.2 * i / L for i in range(L)]) and rates[-1] > 0.1
    assert isinstance(res.model.dropout, torch.nn.Dropout) and res.model.dropout.p == 0.3
    opt = spy_optimizer[0][0]
    assert isinstance(opt, AGC) and (opt.clipping, opt.eps) == (0.02, 0.01)
    inner = opt.optimizer
    assert isinstance(inner, torch.optim.AdamW)
    groups = {g["name"]: g for g in inner.param_groups}
    assert all(tuple(g["betas"]) == (0.8, 0.95) for g in groups.values())
    assert groups["decay"]["weight_decay"] == 1e-3 and groups["no_decay"]["weight_decay"] == 0.0
    assert lrs == pytest.approx([1e-3, 5e-4, 2.5e-4, 2.5e-4])  # x 0.5 at 25% and at 50% of 4 steps


# ---------------------------------------------------------------- CLI
def test_cli_train_and_exit_codes(tmp_path, capsys):
    out = str(tmp_path / "cli")
    common = ["train", "--model", "skipinit_wrn", "--depth", "10", "--batch-size", "32",
              "--max-train-examples", "128", "--max-test-examples", "64", "--no-progress"]
    assert main(common + ["--steps", "3", "--opt", "drop_path=0.1", "--out", out]) == 0
    assert "status ok" in capsys.readouterr().out
    cfg = json.load(open(os.path.join(out, "config.json")))["config"]
    assert cfg["model_options"] == {"drop_path": 0.1} and cfg["steps"] == 3
    assert main(["train", "--steps", "6", "--out", out, "--resume", "--no-progress"]) == 2  # schedule would change
    assert "--reschedule" in capsys.readouterr().err
    assert main(["train", "--steps", "6", "--out", out, "--resume", "--reschedule", "--no-progress"]) == 0
    assert json.load(open(os.path.join(out, "config.json")))["config"]["model_options"] == {"drop_path": 0.1}
    assert load_checkpoint(os.path.join(out, "checkpoint.pt"))["step"] == 6
    assert main(common + ["--steps", "3", "--out", out]) == 2                     # would overwrite
    assert main(common + ["--model", "bnn_wrn", "--steps", "1"]) == 2
    div = str(tmp_path / "div")
    assert main(common[:2] + ["none_wrn"] + common[3:] + ["--lr", "1e6", "--steps", "20", "--log-every", "2",
                                                          "--out", div]) == EXIT_DIVERGED
    assert json.load(open(os.path.join(div, "summary.json")))["status"] == "diverged"
    assert "diverged at step" in capsys.readouterr().err


# ---------------------------------------------------------------- Fixup's scalar learning rate (issue 12, item 4)
def _effective_scalar_lrs(digits, **kw):
    """Measure, for every scalar parameter with a gradient, the learning rate
    its plain-SGD update of step 2 used: -(w2 - w1) / grad2. (At step 1 the
    zero-initialized classifier of Fixup and SkipInit passes no gradient back.)"""
    cfg = tiny(steps=2, log_every=1, momentum=0.0, schedule="constant", lr=0.05, **kw)
    before, measured = {}, {}

    def after_step(step, model, rec):
        groups = {g["name"]: g for g in param_groups(model, 0.0)}
        scalars = {n: p for n, p in model.named_parameters() if any(p is q for q in groups["scalar"]["params"])}
        if step == 1:
            before.update({n: p.detach().clone() for n, p in scalars.items()})
            return
        for n, p in scalars.items():
            if p.grad is not None and float(p.grad.abs().max()) > 1e-6:
                measured[n] = float(-(p.detach() - before[n]).sum() / p.grad.sum())

    train(cfg, dataset=digits, callback=after_step)
    assert len(measured) >= 3, measured
    return measured


def test_fixup_scalars_train_at_a_tenth_of_the_learning_rate(digits):
    default = _effective_scalar_lrs(digits, model="fixup_wrn")
    assert default == pytest.approx({k: 0.005 for k in default}, rel=1e-4)      # base / 10
    overridden = _effective_scalar_lrs(digits, model="fixup_wrn", scalar_lr_mult=1.0)
    assert overridden == pytest.approx({k: 0.05 for k in overridden}, rel=1e-4)  # --scalar-lr-mult 1
    others = _effective_scalar_lrs(digits, model="skipinit_wrn")                  # not Fixup: base lr
    assert others == pytest.approx({k: 0.05 for k in others}, rel=1e-4)


def test_cli_scalar_lr_mult_default_and_override(tmp_path):
    common = ["train", "--model", "fixup_wrn", "--depth", "10", "--batch-size", "32", "--max-train-examples", "64",
              "--max-test-examples", "32", "--steps", "1", "--no-progress"]
    assert main(common + ["--out", str(tmp_path / "a")]) == 0
    assert main(common + ["--scalar-lr-mult", "0.5", "--out", str(tmp_path / "b")]) == 0
    assert json.load(open(tmp_path / "a" / "config.json"))["scalar_lr_mult"] == 0.1
    assert json.load(open(tmp_path / "b" / "config.json"))["scalar_lr_mult"] == 0.5


# ---------------------------------------------------------------- divergence: the first bad step
def test_divergence_reports_the_first_non_finite_step(digits):
    res = train(tiny(model="none_wrn", lr=1e6, steps=40, log_every=50), dataset=digits)
    assert res.status == "diverged"
    losses = [h for h in res.history if h["kind"] == "train"]
    assert losses == []  # no log point was reached: it was noticed at the step itself
    assert res.steps == res.diverged_step <= 5 and math.isfinite(res.last_finite_loss)


def test_no_checkpoint_is_written_from_non_finite_weights(digits, tmp_path, capsys):
    """The weights break in the last step of the first epoch, the loss is still finite:
    the epoch-end checkpoint must not be written (the finite-weights guard)."""
    out = str(tmp_path / "w")

    def poison(step, model, rec):
        if step == 8:
            with torch.no_grad():
                model.stem[0].weight.fill_(float("inf"))

    res = train(tiny(epochs=2, out=out), dataset=digits, callback=poison)
    assert res.status == "diverged" and res.diverged_step == 8
    assert not os.path.exists(os.path.join(out, "checkpoint.pt"))
    assert not any(f.endswith(".safetensors") for f in os.listdir(out))
    assert "no checkpoint written" in capsys.readouterr().err


def test_cli_ctrl_c_exits_130_with_a_checkpoint_to_resume(tmp_path, capsys, monkeypatch):
    """Ctrl-C in the middle of a run: exit status 128 + SIGINT, the message, a checkpoint."""
    loop = importlib.import_module("normfree.train.loop")
    after_step = loop.Trainer.after_step

    def ctrl_c_after_step_2(self):
        after_step(self)
        if self.step == 2:
            raise KeyboardInterrupt  # what Ctrl-C raises between two steps

    monkeypatch.setattr(loop.Trainer, "after_step", ctrl_c_after_step_2)
    out = str(tmp_path / "c")
    rc = main(["train", "--model", "skipinit_wrn", "--depth", "10", "--batch-size", "32", "--max-train-examples",
               "128", "--max-test-examples", "32", "--steps", "6", "--no-progress", "--out", out])
    assert rc == 130
    err = capsys.readouterr().err
    assert err.rstrip().endswith("normfree train: interrupted")
    assert load_checkpoint(os.path.join(out, "checkpoint.pt"))["step"] == 2


def test_weights_broken_by_the_last_step_are_named(digits, capsys):
    """All losses finite, but the weights are not after the last step: the run
    is diverged at that step, and says it was the weights."""
    def poison(step, model, rec):
        with torch.no_grad():
            model.fc.weight.fill_(float("inf"))

    res = train(tiny(steps=1, log_every=1), dataset=digits, callback=poison)
    assert res.status == "diverged" and res.diverged_step == 1 and res.steps == 1
    assert math.isfinite(res.last_finite_loss)
    assert "diverged at step 1: the weights became NaN/Inf in that step's update" in capsys.readouterr().err


def test_step_log_finds_the_first_bad_step_and_grows():
    log = StepLog(torch.device("cpu"), capacity=2)
    for v in (1.0, 2.0, float("nan"), 3.0, float("inf")):
        log.record(torch.tensor(v), torch.tensor(0.5))
    assert log.n == 5 and log.first_nonfinite() == 2
    log.checked = 3
    assert log.first_nonfinite() == 4
    ok = StepLog(torch.device("cpu"), capacity=1)
    for v in range(1, 6):
        ok.record(torch.tensor(float(v)), torch.tensor(1.0))
    assert ok.first_nonfinite() is None and ok.checked == 5
    assert ok.tail(0.4) == (4.5, 1.0) and ok.mean(0, 5) == (3.0, 1.0)
    ok.reduce(lambda t: t * 0 + 7)  # a "mean over processes" replaces the unreduced steps
    assert ok.mean(0, 5) == (7.0, 7.0) and ok.reduced == 5
