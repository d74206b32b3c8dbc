"""Resuming is safe: a corrupt, unsafe or inconsistent checkpoint is refused in
one line (by `normfree train --resume` and `normfree export` alike, before the
data are loaded or a model is built), and a run continues only with the
data and the learning-rate schedule it was started with (issue 14, classes 4
and 5)."""
import json
import os
import pickle
import random
import shutil

import numpy as np
import pytest
import torch

import normfree
from normfree.cli import main
from normfree.data import load_dataset
from normfree.train import TrainConfig, load_checkpoint, train

TINY = dict(model="skipinit_wrn", depth=10, width=1, batch_size=32, lr=0.05, max_train_examples=64,
            max_test_examples=32, log_every=1, progress=False)


@pytest.fixture(scope="module")
def stopped_run(tmp_path_factory, digits):
    """A 6-step run stopped after 2 steps (checkpoint at step 2)."""
    out = str(tmp_path_factory.mktemp("stopped") / "run")
    res = train(TrainConfig(**TINY, steps=6, stop_after_steps=2, out=out), dataset=digits)
    assert res.status == "stopped"
    return out


def copy_run(src, dst):
    shutil.copytree(src, dst)
    return str(dst)


def assert_same_weights(a, b):
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for k in sa:
        assert torch.equal(sa[k], sb[k]), k


class _Mkdir:
    """Unpickling this runs os.mkdir(path): a stand-in for a malicious payload."""

    def __init__(self, path):
        self.path = path

    def __reduce__(self):
        return (os.mkdir, (self.path,))


def _truncate(path, n=3000):
    blob = open(path, "rb").read()
    open(path, "wb").write(blob[:n])


def _good(path):
    return torch.load(path, weights_only=True)


def _edit(path, change):
    ck = _good(path)
    change(ck)
    torch.save(ck, path)


def _set_config(key, value):
    def change(ck):
        cfg = json.loads(ck["config"])
        cfg[key] = value
        ck["config"] = json.dumps(cfg)
    return change


def _drop_weight(ck):
    ck["model"].pop(next(iter(ck["model"])))


# name -> (how the file is spoiled, substring of the train --resume error, substring of the export error)
CORRUPTIONS = {
    "empty": (lambda p, m: open(p, "wb").close(), "cannot read", "cannot read"),
    "truncated": (lambda p, m: _truncate(p), "cannot read", "cannot read"),
    "random_bytes": (lambda p, m: open(p, "wb").write(random.Random(0).randbytes(5000)), "cannot read",
                     "cannot read"),
    "malicious_zip": (lambda p, m: torch.save({"model": _Mkdir(m), "config": "{}"}, p), "cannot read", "cannot read"),
    "malicious_legacy": (lambda p, m: torch.save({"model": _Mkdir(m)}, p, _use_new_zipfile_serialization=False),
                         "cannot read", "cannot read"),
    "plain_pickle": (lambda p, m: open(p, "wb").write(pickle.dumps({"model": _Mkdir(m)})), "cannot read",
                     "cannot read"),
    "foreign_torch_file": (lambda p, m: torch.save({"weights": torch.zeros(3)}, p), "not a normfree checkpoint",
                           "not a normfree checkpoint"),
    "a_list": (lambda p, m: torch.save([1, 2, 3], p), "not a normfree checkpoint", "not a normfree checkpoint"),
    "config_not_json": (lambda p, m: _edit(p, lambda ck: ck.update(config="{not json")), "corrupt or inconsistent",
                        "corrupt or inconsistent"),
    "model_not_tensors": (lambda p, m: _edit(p, lambda ck: ck.update(model={"w": "x"})), "corrupt or inconsistent",
                          "corrupt or inconsistent"),
    "weight_missing": (lambda p, m: _edit(p, _drop_weight), "corrupt or inconsistent", "corrupt or inconsistent"),
    "config_depth_disagrees": (lambda p, m: _edit(p, _set_config("depth", 16)), "configuration differs",
                               "has 6 residual blocks, its weights 3"),
    "config_asks_absurd_size": (lambda p, m: _edit(p, _set_config("depth", 9994)), "configuration differs",
                                "has 4995 residual blocks, its weights 3"),
    "config_asks_impossible_size": (lambda p, m: _edit(p, _set_config("depth", 19996)), "configuration differs",
                                    "configuration is invalid (depth 19996 does not fit wrn"),
    "config_invalid_value": (lambda p, m: _edit(p, _set_config("lr", -1)), "configuration differs",
                             "configuration is invalid"),
    "negative_step": (lambda p, m: _edit(p, lambda ck: ck.update(step=-3)), "corrupt or inconsistent", None),
    "loss_history_short": (lambda p, m: _edit(p, lambda ck: ck.update(loss_hist=torch.zeros(1))),
                           "corrupt or inconsistent", None),
    "rng_state_garbage": (lambda p, m: _edit(p, lambda ck: ck.update(rng={"torch": torch.zeros(3)})),
                          "corrupt or inconsistent", None),
    "optimizer_of_another_model": (lambda p, m: _edit(p, lambda ck: ck.update(
        optimizer=torch.optim.SGD([torch.nn.Parameter(torch.zeros(2))], lr=0.1).state_dict())),
        "corrupt or inconsistent", None),
    "classifier_of_another_width": (lambda p, m: _edit(p, _set_config("width", 2)), "configuration differs",
                                    "gives the classifier 128 input features, its weights (10, 64)"),
    "classifier_not_a_matrix": (lambda p, m: _edit(p, lambda ck: ck["model"].update(
        {"fc.weight": ck["model"]["fc.weight"].flatten()})), "corrupt or inconsistent",
        "gives the classifier 64 input features, its weights (640,)"),
    "epoch_disagrees_with_step": (lambda p, m: _edit(p, lambda ck: ck.update(epoch=5)), "corrupt or inconsistent",
                                  None),
    "accuracy_history_missing": (lambda p, m: _edit(p, lambda ck: ck.pop("acc_hist")), "corrupt or inconsistent",
                                 None),
    "loss_history_of_integers": (lambda p, m: _edit(p, lambda ck: ck.update(loss_hist=torch.zeros(2, dtype=torch.long))),
                                 "corrupt or inconsistent", None),
    "optimizer_not_a_dict": (lambda p, m: _edit(p, lambda ck: ck.update(optimizer=[1, 2])),
                             "corrupt or inconsistent", None),
}

# the reasons that are the whole line after the file's name
WHOLE = {"empty", "model_not_tensors", "rng_state_garbage", "accuracy_history_missing", "optimizer_not_a_dict",
         "loss_history_short"}
# what the one line says is wrong (in both errors, where the file gets that far): the reason, not just "cannot read"
REASONS = {
    "empty": "the file is empty or truncated",
    "truncated": "its zip archive is incomplete",
    "random_bytes": "not a checkpoint file (unreadable data: pickle operand",
    "malicious_zip": "it refers to the Python object posix.mkdir, which is never loaded",
    "malicious_legacy": "it refers to the Python object posix.mkdir, which is never loaded",
    "plain_pickle": "not a checkpoint file (unreadable data: pickle operand",
    "foreign_torch_file": "(it holds a dict with keys ['weights'])",
    "a_list": "(it holds a list)",
    "config_not_json": "its JSON entries do not decode",
    "model_not_tensors": "its 'model' entry is not a dict of named tensors",
    "negative_step": "must be integers >= 0, got -3/",
    "loss_history_short": "loss_hist must hold one number per step (2)",
    "rng_state_garbage": "its RNG state is missing or not a byte tensor",
    "epoch_disagrees_with_step": "step 2 is not epoch 5 x",
    "accuracy_history_missing": "it has no 'acc_hist' entry",
    "loss_history_of_integers": "loss_hist must hold one number per step (2)",
    "optimizer_not_a_dict": "its optimizer state is not a dict",
}


@pytest.mark.parametrize("name", sorted(CORRUPTIONS))
def test_bad_checkpoint_is_refused_in_one_line(name, stopped_run, tmp_path, capsys, monkeypatch):
    spoil, resume_msg, export_msg = CORRUPTIONS[name]
    run = copy_run(stopped_run, tmp_path / "run")
    ckpt = os.path.join(run, "checkpoint.pt")
    marker = str(tmp_path / "payload-ran")
    spoil(ckpt, marker)

    # train --resume: refused before the data are loaded
    def no_data(*a, **k):
        raise AssertionError("the data were loaded before the checkpoint was checked")
    if name not in ("optimizer_of_another_model", "weight_missing", "classifier_not_a_matrix"):  # (those need the
        # model, built after the data)
        monkeypatch.setattr("normfree.data.load_dataset", no_data)
    assert main(["train", "--out", run, "--resume", "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("normfree train: error: ") and err.count("\n") == 1, err
    assert resume_msg in err and ckpt in err, err
    assert REASONS.get(name, "") in err, err
    if name in WHOLE:
        assert err.rstrip("\n").endswith(f"{ckpt}: {REASONS[name]}"), err
    assert "weights_only" not in err  # no advice to load the file unsafely
    assert not os.path.exists(marker)  # nothing in the file ran

    if export_msg is not None:
        assert main(["export", run]) == 2
        err = capsys.readouterr().err
        assert err.startswith("normfree export: error: ") and err.count("\n") == 1, err
        assert export_msg in err and ckpt in err, err
        assert REASONS.get(name, "") in err, err
        assert "weights_only" not in err
    assert not os.path.exists(marker)
    assert not os.path.exists(os.path.join(run, "model.pt2"))


def test_good_checkpoint_passes_the_same_checks(stopped_run, tmp_path, capsys):
    """The control: the unspoiled copy resumes and exports."""
    run = copy_run(stopped_run, tmp_path / "run")
    assert main(["export", run]) == 0
    assert main(["train", "--out", run, "--resume", "--no-progress"]) == 0
    assert load_checkpoint(run)["step"] == 6


# ------------------------------------------------------------------ class 5: resume must not change the run
def test_resume_with_another_length_is_refused_unless_rescheduled(digits, tmp_path):
    out = str(tmp_path / "r")
    train(TrainConfig(**TINY, epochs=2, stop_after_steps=2, out=out), dataset=digits)
    with pytest.raises(ValueError, match=r"schedule would change \(total_steps 4 -> 6\).*--reschedule"):
        train(TrainConfig(**TINY, epochs=3, out=out, resume=True), dataset=digits)
    with pytest.raises(ValueError, match=r"total_steps 4 -> 3"):
        train(TrainConfig(**TINY, steps=3, out=out, resume=True), dataset=digits)
    res = train(TrainConfig(**TINY, epochs=3, out=out, resume=True, reschedule=True), dataset=digits)
    assert res.status == "ok" and res.steps == 6


def test_constant_schedule_may_be_extended_exactly(digits, tmp_path):
    """With a constant learning rate the length does not change any step: a
    3-step run resumed to 6 steps equals a fresh 6-step run, bit for bit."""
    kw = dict(TINY, schedule="constant", warmup_steps=2)
    fresh = train(TrainConfig(**kw, steps=6), dataset=digits)
    out = str(tmp_path / "c")
    train(TrainConfig(**kw, steps=3, out=out), dataset=digits)
    resumed = train(TrainConfig(**kw, steps=6, out=out, resume=True), dataset=digits)
    assert_same_weights(fresh.model, resumed.model)


def test_resume_on_other_data_is_refused(digits, tmp_path):
    out = str(tmp_path / "d")
    train(TrainConfig(**TINY, steps=4, stop_after_steps=2, out=out), dataset=digits)
    other = load_dataset("digits")
    other.train_x = other.train_x.clone()
    other.train_x[:, :, 0, 0] ^= 1  # one pixel of every image differs
    with pytest.raises(ValueError, match=r"the data differ from the checkpoint's \(digits: train 64x1x8x8"):
        train(TrainConfig(**TINY, steps=4, out=out, resume=True), dataset=other)
    assert train(TrainConfig(**TINY, steps=4, out=out, resume=True), dataset=digits).steps == 4


def write_pngs(root, seed=0):
    from PIL import Image

    rng = np.random.default_rng(seed)
    for split, n in (("train", 20), ("test", 4)):
        for cls in ("a", "b"):
            os.makedirs(os.path.join(root, split, cls), exist_ok=True)
            for i in range(n):
                Image.fromarray(rng.integers(0, 256, (6, 6, 3), dtype=np.uint8)).save(
                    os.path.join(root, split, cls, f"{i}.png"))
    return str(root)


def test_cli_resume_after_the_files_changed_is_refused(tmp_path, capsys):
    """An image folder edited between the run and its resumption: refused; the
    same files in another folder (--data-dir moved): accepted."""
    from PIL import Image

    data = write_pngs(tmp_path / "imgs")
    out = str(tmp_path / "run")
    args = ["train", "--model", "skipinit_wrn", "--depth", "10", "--data", "folder", "--data-dir", data,
            "--image-size", "8", "--batch-size", "8", "--steps", "6", "--no-progress"]
    assert main(args + ["--stop-after-steps", "2", "--out", out]) == 0
    moved = shutil.copytree(data, tmp_path / "moved")
    Image.fromarray(np.zeros((6, 6, 3), dtype=np.uint8)).save(os.path.join(data, "train", "a", "3.png"))
    assert main(["train", "--out", out, "--resume", "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert "the data differ" in err and "folder: train 40x3x8x8" in err
    assert main(["train", "--out", out, "--resume", "--data-dir", str(moved), "--no-progress"]) == 0
    assert load_checkpoint(out)["step"] == 6


def test_fingerprint_is_stored_and_old_checkpoints_still_resume(digits, tmp_path, capsys):
    out = str(tmp_path / "f")
    train(TrainConfig(**TINY, steps=4, stop_after_steps=2, out=out), dataset=digits)
    ck = load_checkpoint(out)
    assert ck["data"]["train"] == [64, 1, 8, 8] and len(ck["data"]["sha256"]) == 64
    assert ck["schedule"]["total_steps"] == 4 and ck["schedule"]["schedule"] == "cosine"
    raw = torch.load(os.path.join(out, "checkpoint.pt"), weights_only=True)  # as format 1 wrote it
    for key in ("data", "schedule"):
        raw.pop(key)
    raw["format"] = 1
    torch.save(raw, os.path.join(out, "checkpoint.pt"))
    assert train(TrainConfig(**TINY, steps=4, out=out, resume=True), dataset=digits).steps == 4
    assert "predates data fingerprints" in capsys.readouterr().err


def test_load_model_of_a_consistent_checkpoint(stopped_run):
    model = normfree.load_model(stopped_run)
    assert len(model.blocks) == 3 and not model.training


def test_a_load_failure_is_told_in_one_short_line_without_the_advice_to_load_unsafely():
    """The reason torch.load gave, shortened: its lines joined with "; ", the lines
    that advise weights_only=False dropped, at most 300 characters."""
    from normfree.train.checkpoint import _load_failure, one_line

    advice = RuntimeError("Weights only load failed.\n  bad tag 7 in the stream  \n"
                          "Re-running with weights_only set to False will likely succeed.\n"
                          "Please file an issue with the following so that we can make it work.\n"
                          "Check the documentation of torch.load to learn more.\n"
                          "Do it only if you got the file from a trusted source.\nmore detail")
    assert _load_failure(advice) == "Weights only load failed.; bad tag 7 in the stream; more detail"
    assert _load_failure(RuntimeError("x" * 400)) == "x" * 300
    assert _load_failure(RuntimeError("weights_only\nPyTorch")) == "RuntimeError"  # nothing left: the type
    assert _load_failure(RuntimeError("   ")) == "the file is empty or truncated"
    assert _load_failure(EOFError("Ran out of input")) == "the file is empty or truncated"
    assert _load_failure(RuntimeError("failed finding central directory")).startswith("truncated or damaged")
    assert _load_failure(RuntimeError("not a zip archive")).startswith("truncated or damaged")
    assert _load_failure(RuntimeError("Unsupported operand 42")).endswith("(unreadable data: pickle operand 42)")
    assert "object os.system," in _load_failure(RuntimeError("Unsupported global: GLOBAL os.system was not"))
    assert _load_failure(RuntimeError('Expected hasRecord("version") to be true')).endswith("'version' record)")

    assert one_line(RuntimeError("Error(s) in loading:\n\n\tMissing key(s): a.\n\tUnexpected: b.")) == \
        "Error(s) in loading: Missing key(s): a. Unexpected: b."
    assert one_line(ValueError("")) == "ValueError"
    assert one_line(ValueError("y" * 300)) == "y" * 300               # at the limit: whole
    cut = one_line(ValueError("y" * 301))
    assert cut == "y" * 297 + "..." and len(cut) == 300
    assert one_line(ValueError("abcdefgh"), limit=6) == "abc..."


def test_a_zip_that_is_not_a_checkpoint_is_refused_with_the_reason(tmp_path):
    import zipfile

    path = tmp_path / "checkpoint.pt"
    with zipfile.ZipFile(path, "w") as z:
        z.writestr("archive/readme.txt", "hello")
    with pytest.raises(ValueError, match=r"cannot read .*checkpoint.pt: not a checkpoint file "
                                         r"\(a zip archive without torch's 'version' record\)") as e:
        load_checkpoint(str(tmp_path))
    assert "weights_only" not in str(e.value) and "\n" not in str(e.value)


@pytest.mark.parametrize("name,width", [("skipinit_wrn_10_2", None), ("skipinit_wrn_10", 2)])
def test_load_model_rebuilds_a_run_of_another_shape_on_the_device_asked(tmp_path, name, width):
    """A sized name (depth, and width in the name or given), 2 classes, RGB: the model
    comes back with that layout and the trained weights, its input record as
    pretrained_cfg, on the device map_location names."""
    data = write_pngs(tmp_path / "imgs")
    out = str(tmp_path / "run")
    res = train(TrainConfig(model=name, width=width, data="folder", data_dir=data, image_size=8, batch_size=8,
                            steps=2, lr=0.05, progress=False, out=out))
    model = normfree.load_model(out)
    assert (model.fc.out_features, model.fc.in_features, model.stem[0].in_channels) == (2, 128, 3)
    assert len(model.blocks) == 3 and not model.training
    assert_same_weights(model, res.model)
    cfg = model.pretrained_cfg
    assert cfg["architecture"] == name and cfg["input_size"] == (3, 8, 8)
    assert cfg["label_names"] == ["a", "b"] and cfg["file"] == os.path.join(out, "checkpoint.pt")
    on_meta = normfree.load_model(out, map_location="meta")
    assert {p.device.type for p in on_meta.parameters()} == {"meta"}
    seen = []
    normfree.load_model(out, map_location=lambda storage, where: seen.append(where) or storage)
    assert seen and set(seen) == {"cpu"}  # a callable goes to torch.load


def test_a_finished_run_resumed_with_its_length_is_left_as_it_is(stopped_run, tmp_path):
    run = copy_run(stopped_run, tmp_path / "run")
    assert main(["train", "--out", run, "--resume", "--no-progress"]) == 0
    weights = load_checkpoint(run)["model"]
    assert main(["train", "--out", run, "--resume", "--no-progress"]) == 0  # step 6 of 6: nothing to do
    again = load_checkpoint(run)
    assert again["step"] == 6 and all(torch.equal(weights[k], v) for k, v in again["model"].items())


def test_check_resumable_names_every_schedule_change_and_hints_only_for_the_length():
    from normfree.train import check_resumable

    cfg = TrainConfig(**TINY, steps=6)
    sched = {"lr": 0.05, "schedule": "cosine", "total_steps": 6, "warmup_steps": 0, "milestones": [],
             "lr_gamma": 0.1}
    ckpt = {"path": "/runs/x/checkpoint.pt", "config": cfg.to_dict(), "steps_per_epoch": 2, "data": {"d": 1},
            "schedule": dict(sched), "step": 2}
    assert check_resumable(ckpt, cfg, 2, {"d": 1}, dict(sched)) is None  # the same run: no note
    with pytest.raises(ValueError) as e:
        check_resumable(ckpt, cfg, 2, {"d": 1}, dict(sched, lr=0.1, total_steps=8))
    msg = str(e.value)
    assert msg.startswith("cannot resume /runs/x/checkpoint.pt: the learning-rate schedule would change (")
    assert "(lr 0.05 -> 0.1, total_steps 6 -> 8)" in msg and "--reschedule" not in msg
    assert msg.endswith("every remaining step would get another learning rate than the checkpoint's run.")
    with pytest.raises(ValueError) as e:
        check_resumable(ckpt, cfg, 2, {"d": 1}, dict(sched, total_steps=8))
    assert str(e.value) == (
        "cannot resume /runs/x/checkpoint.pt: the learning-rate schedule would change (total_steps 6 -> 8): every "
        "remaining step would get another learning rate than the checkpoint's run. Resume with the same "
        "--steps/--epochs, or pass --reschedule to recompute the schedule for the new length (the run then "
        "differs from a fresh run of that length).")
    old = {k: v for k, v in ckpt.items() if k != "schedule"}  # format 1: only the run's length was stored
    with pytest.raises(ValueError, match=r"^cannot resume /runs/x/checkpoint.pt: its run was 6 steps long, this "
                                         r"one 8: the cosine learning-rate schedule would change"):
        check_resumable(dict(old, total_steps=6), cfg, 2, {"d": 1}, dict(sched, total_steps=8))
    for same in (dict(old, total_steps=8), old):
        assert check_resumable(same, cfg, 2, {"d": 1}, dict(sched, total_steps=8)) is None
    assert check_resumable(dict(old, total_steps=6), TrainConfig(**TINY, steps=8, reschedule=True), 2, {"d": 1},
                           dict(sched, total_steps=8)) is None
    flat_cfg = TrainConfig(**TINY, steps=8, schedule="constant")
    assert check_resumable(dict(old, total_steps=6, config=flat_cfg.to_dict()), flat_cfg, 2, {"d": 1},
                           dict(sched, total_steps=8, schedule="constant")) is None
    with pytest.raises(ValueError, match="cannot resume /runs/x/checkpoint.pt: it has done 2 steps, more than the 1"):
        check_resumable(ckpt, cfg, 2, {"d": 1}, dict(sched, total_steps=1))
    assert check_resumable(dict(ckpt, step=6), cfg, 2, {"d": 1}, dict(sched)) is None  # finished: allowed
    with pytest.raises(ValueError, match=r"^cannot resume \?: 2 steps per epoch in the checkpoint, 3 now"):
        check_resumable({k: v for k, v in ckpt.items() if k != "path"}, cfg, 3, {"d": 1}, dict(sched))
    longer = TrainConfig(**TINY, steps=8, reschedule=True)
    note = check_resumable(ckpt, longer, 2, {"d": 1}, dict(sched, total_steps=8))
    assert note == ("note: the run's length changes from 6 to 8 steps; the cosine schedule is recomputed from "
                    "step 2 on")
    constant = dict(sched, schedule="constant")
    flat = TrainConfig(**TINY, steps=6, schedule="constant")
    note = check_resumable(dict(ckpt, config=flat.to_dict(), schedule=constant), flat, 2, {"d": 1},
                           dict(constant, total_steps=8))
    assert note == "note: the run's length changes from 6 to 8 steps"


def test_check_same_config_names_every_difference_and_compares_the_scalar_lr_in_effect():
    from normfree.train.checkpoint import check_same_config

    fixup = dict(TINY, model="fixup_wrn")
    stored = TrainConfig(**fixup).to_dict()
    ckpt = {"path": "/runs/f/checkpoint.pt", "config": dict(stored, scalar_lr_mult=None)}
    check_same_config(ckpt, TrainConfig(**fixup))                          # default 0.1 both times
    check_same_config(ckpt, TrainConfig(**fixup, scalar_lr_mult=0.1))     # the same multiplier, now explicit
    check_same_config({**ckpt, "config": {k: v for k, v in ckpt["config"].items() if k != "scalar_lr_mult"}},
                      TrainConfig(**fixup))                                # an older checkpoint without the field
    with pytest.raises(ValueError) as e:
        check_same_config(ckpt, TrainConfig(**dict(fixup, lr=0.1, batch_size=16), scalar_lr_mult=1.0))
    assert str(e.value) == ("cannot resume /runs/f/checkpoint.pt: the configuration differs: "
                            "batch_size=32 (checkpoint) vs 16 (now), lr=0.05 (checkpoint) vs 0.1 (now), "
                            "scalar_lr_mult=0.1 (checkpoint) vs 1.0 (now)")
    plain = {"path": "p", "config": dict(TrainConfig(**TINY).to_dict(), scalar_lr_mult=None)}
    check_same_config(plain, TrainConfig(**TINY, scalar_lr_mult=1.0))     # 1 is the default of other methods
    with pytest.raises(ValueError, match=r"^cannot resume \?: .*scalar_lr_mult=2.0 \(checkpoint\) vs 1.0 \(now\)"):
        check_same_config({"config": dict(plain["config"], scalar_lr_mult=2)}, TrainConfig(**TINY))  # no path: ?
    spec = dict(TINY, model="user_models:fixup_net", depth=None, width=None)  # not a registered name: 1
    check_same_config({"path": "p", "config": dict(TrainConfig(**spec).to_dict(), scalar_lr_mult=None)},
                      TrainConfig(**spec, scalar_lr_mult=1.0))


def test_load_checkpoint_checks_the_top_level_entries(tmp_path):
    path = str(tmp_path / "c.pt")
    model = {"fc.weight": torch.zeros(2, 2)}
    for raw in ({"model": model}, {"config": "{}"}):  # one of the two entries missing
        torch.save(raw, path)
        with pytest.raises(ValueError, match="not a normfree checkpoint"):
            load_checkpoint(path)
    torch.save({f"k{i}": i for i in range(10)}, path)
    with pytest.raises(ValueError, match=r"it holds a dict with keys \['k0', 'k1', 'k2', 'k3', 'k4', 'k5', 'k6', "
                                         r"'k7'\]\)$"):
        load_checkpoint(path)                          # the first 8 keys, sorted
    torch.save({"model": model, "config": "{}"}, path)
    assert load_checkpoint(path)["history"] == []      # written before the history was stored
    torch.save({"model": model, "config": "{}", "history": '{"a": 1}'}, path)
    with pytest.raises(ValueError, match="its config is not a dict or its history not a list"):
        load_checkpoint(path)


def test_load_checkpoint_turns_read_failures_into_errors_naming_the_file(tmp_path, monkeypatch):
    import errno

    path = str(tmp_path / "c.pt")
    torch.save({"model": {"w": torch.zeros(1)}, "config": "{}"}, path)

    def failing(exc):
        def load(*a, **k):
            raise exc
        return load
    monkeypatch.setattr(torch, "load", failing(OSError(errno.EIO, "Input/output error")))
    with pytest.raises(OSError) as e:
        load_checkpoint(path)
    assert e.value.errno == errno.EIO and e.value.filename == path       # the system's error, with the file
    for exc in (OSError("a reader's message"), MemoryError()):            # no errno: one "cannot read" line
        monkeypatch.setattr(torch, "load", failing(exc))
        with pytest.raises(ValueError, match=f"cannot read {path}: "):
            load_checkpoint(path)


def test_check_state_accepts_a_checkpoint_at_the_end_of_an_epoch():
    """The loop can write one after an epoch's last batch, before the epoch counter
    moves on (checkpoint_every, an interrupt): batch_in_epoch == steps_per_epoch."""
    from normfree.train.checkpoint import check_state

    ok = {"optimizer": {}, "step": 4, "epoch": 1, "batch_in_epoch": 2, "steps_per_epoch": 2,
          "loss_hist": torch.zeros(4), "acc_hist": torch.zeros(4), "rng": {"torch": torch.zeros(3, dtype=torch.uint8)}}
    check_state(ok)
    check_state(dict(ok, epoch=2, batch_in_epoch=0))
    with pytest.raises(ValueError, match="^corrupt or inconsistent checkpoint \\?: step 4 is not epoch 0 x 2 steps "
                                         "\\+ batch 4"):
        check_state(dict(ok, epoch=0, batch_in_epoch=4))  # (a dict without its path: "?")


def test_a_registered_run_rebuilt_by_a_factory_gets_no_method_options(digits, tmp_path):
    """The run's method options built the registered model; a factory given instead is
    called with num_classes / in_chans only (it builds the architecture its own way)."""
    out = str(tmp_path / "opts")
    res = train(TrainConfig(**TINY, steps=1, model_options={"gain_init": 0.5}, out=out), dataset=digits)

    def factory(num_classes, in_chans):
        return normfree.create_model("skipinit_wrn", depth=10, width=1, num_classes=num_classes, in_chans=in_chans)
    assert_same_weights(normfree.load_model(out, factory=factory), res.model)
