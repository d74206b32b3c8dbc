"""The study: the pipeline end to end (quick preset), every claim's rule on
made-up measurements for each outcome, the statistics behind the margins,
size validation, the run store, and the worker processes."""
import json
import math
import os
import pickle
import re

import numpy as np
import pytest
import torch

from normfree import cli
from normfree.study import (EXPERIMENTS, FAILS, HOLDS, KNOBS, QUICK_WARNING, UNSURE, Claim, RunStore,
                            parse_size_overrides, run_study, study_size)
from normfree.study.experiments import agc, batch, budget, depth, paths, spp
from normfree.study.sizes import PRESET_NAMES
from normfree.study.verdicts import linear_r2, pack_bits, paired_bootstrap, unanimous, unpack_bits

VERDICTS = {HOLDS, FAILS, UNSURE}
QUIET = dict(jobs=1, progress=False, log=lambda s: None)


# --------------------------------------------------------------------------
# the pipeline
# --------------------------------------------------------------------------
@pytest.fixture(scope="module")
def quick(tmp_path_factory):
    out = str(tmp_path_factory.mktemp("study"))
    result = run_study("quick", out, **QUIET)
    return out, result


def test_quick_study_writes_a_complete_report(quick):
    out, result = quick
    assert result["executed"] > 0
    md = open(os.path.join(out, "report.md")).read()
    page = open(os.path.join(out, "report.html")).read()
    for title in ["Signal propagation", "Trainability against depth", "Batch size and learning rate",
                  "Accuracy at an equal budget", "Shallow paths", "Adaptive gradient clipping"]:
        assert title in md and title in page
    # a smoke test says so at the top, before any claim
    assert QUICK_WARNING in md.split("## Claims")[0] and "smoke test" in page.split("<h2>Claims")[0]
    assert page.count("data:image/png;base64,") >= 8 and "src='figures/" not in page
    for fig in ["spp", "spp_skipinit", "spp_methods", "spp_nf_families", "depth", "batch_lr", "paths_tracking",
                "lesion", "agc"]:
        for ext in ("png", "svg"):
            assert os.path.getsize(os.path.join(out, "figures", f"{fig}.{ext}")) > 1000
    assert "platform" in md and "torch" in md and "CPU time" in md
    # never Python's None: missing values are said in words or '-'
    assert "None" not in md and "None" not in page
    # each seed's measurement is in the report; NF's SPP is drawn with its skip gain at 1, and says so
    assert md.count("**Each seed's measurement**") == 6
    assert "gain_init=1.0" in md
    # the published NF families are drawn at their own depths (12 and 16 blocks), not judged
    assert "| nfnet_f0 (12 blocks" in md and "| nf_regnet_b0 (16 blocks" in md


def test_claims_are_computed_with_a_rule_and_a_verdict(quick):
    out, result = quick
    claims = result["claims"]
    assert len(claims) >= 15
    assert json.load(open(os.path.join(out, "claims.json"))) == claims
    for c in claims:
        assert c["verdict"] in VERDICTS and c["rule"] and c["measured"] and c["source"]
        assert c["per_seed"] and c["agreement"]
    by_text = {c["claim"]: c for c in claims}
    # properties that hold at any size: SkipInit alpha 0 / 1/sqrt(d) / 1, nf_he drifts
    skip = next(c for t, c in by_text.items() if t.startswith("SkipInit: alpha = 0"))
    assert skip["verdict"] == HOLDS and skip["agreement"] == "holds in 1 of 1 seed"
    drift = next(c for t, c in by_text.items() if t.startswith("With He init alone"))
    assert drift["verdict"] == HOLDS
    # the quick AGC runs do not train: nothing can be concluded from them
    agc_claim = next(c for t, c in by_text.items() if t.startswith("Adaptive gradient clipping"))
    assert agc_claim["verdict"] == UNSURE


def test_restarted_study_reuses_finished_runs_and_reruns_bad_records(quick, capsys):
    out, first = quick
    again = run_study("quick", out, experiments=["paths", "agc"], **QUIET)
    assert again["executed"] == 0 and again["reused"] == 4 and again["rejected"] == 0
    verdicts = [c["verdict"] for c in first["claims"] if c["claim"].startswith(("Deleting", "Adaptive"))]
    assert [c["verdict"] for c in again["claims"]] == verdicts
    folder = os.path.join(out, "runs")
    labels = {json.load(open(os.path.join(folder, f)))["result"]["label"]: os.path.join(folder, f)
              for f in os.listdir(folder)}
    mine = [p for label, p in sorted(labels.items()) if label.startswith(("nf no AGC", "nf AGC", "bn depth"))]
    # a truncated record (a crash mid-write on a file system without atomic rename), an edited one,
    # and a missing one: each is detected, and only those runs are done again
    a, b, c = mine[:3]
    text = open(a).read()
    open(a, "w").write(text[: len(text) // 2])
    rec = json.load(open(b))
    rec["result"]["final_train_loss"] = 0.01
    json.dump(rec, open(b, "w"))
    os.remove(c)
    third = run_study("quick", out, experiments=["paths", "agc"], jobs=1, progress=False, log=print)
    assert third["executed"] == 3 and third["rejected"] == 2 and third["reused"] == 1
    said = capsys.readouterr().out
    assert "fails its checksum" in said and "unreadable" in said


def test_run_store_rejects_what_it_cannot_trust(tmp_path):
    store = RunStore(str(tmp_path))
    spec = {"task": "train", "cfg": {"lr": 0.1}}
    result = {"status": "ok", "final_train_loss": 0.3, "test_acc": 0.9, "history": [], "steps": 10}
    store.put("k", spec, result)
    assert store.get("k", spec) == result
    assert store.get("k", {"task": "train", "cfg": {"lr": 0.2}}) is None           # another configuration
    rec = json.load(open(store.path("k")))
    for change in [{"format": 1}, {"key": "other"}, {"sha256": "0" * 64}]:
        json.dump({**rec, **change}, open(store.path("k"), "w"))
        assert store.get("k", spec) is None
    bad = {**result, "status": "stopped"}                                          # a run stopped half-way
    store.put("k", spec, bad)
    assert store.get("k", spec) is None
    store.put("k", spec, {k: v for k, v in result.items() if k != "history"})     # incomplete
    assert store.get("k", spec) is None
    assert store.rejected == 6


def test_full_preset_plans_without_data_and_download_is_passed(tmp_path, capsys, monkeypatch):
    # --plan needs no data on disk
    code = cli.main(["study", "--full", "--plan", "--data-dir", str(tmp_path / "nothing"), "--out", str(tmp_path / "o")])
    assert code == 0
    text = capsys.readouterr().out
    assert "depth 1000" in text and "agc" in text and "cifar10" in text
    assert cli.main(["study", "--cifar10", "--plan"]) == 0
    assert "preset cifar10" in capsys.readouterr().out
    assert cli.main(["study", "--data", "cifar10", "--plan"]) == 0       # --data cifar10 picks the preset
    assert "preset cifar10" in capsys.readouterr().out
    # --download reaches the loader before anything runs
    import normfree.data

    seen = {}

    def fake_load(name, data_dir=None, download=False, **kw):
        seen.update(name=name, data_dir=data_dir, download=download)
        raise FileNotFoundError("stop here")

    monkeypatch.setattr(normfree.data, "load_dataset", fake_load)
    code = cli.main(["study", "--full", "--download", "--data-dir", str(tmp_path / "d"), "--out", str(tmp_path / "o")])
    assert code == 2 and seen == {"name": "cifar10", "data_dir": str(tmp_path / "d"), "download": True}
    assert not os.path.exists(tmp_path / "o" / "runs")


def _fake_cifar(root, n=40):
    folder = os.path.join(root, "cifar-10-batches-py")
    os.makedirs(folder)
    rng = np.random.default_rng(0)
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        with open(os.path.join(folder, name), "wb") as f:
            pickle.dump({b"data": rng.integers(0, 256, (n, 3072), dtype=np.uint8),
                         b"labels": [int(i % 10) for i in range(n)]}, f)
    with open(os.path.join(folder, "batches.meta"), "wb") as f:
        pickle.dump({b"label_names": [f"c{i}".encode() for i in range(10)]}, f)


def test_quick_study_runs_on_cifar10_files(tmp_path, capsys):
    _fake_cifar(str(tmp_path / "data"))
    code = cli.main(["study", "--quick", "--data", "cifar10", "--data-dir", str(tmp_path / "data"), "--out",
                     str(tmp_path / "o"), "--no-progress", "--jobs", "1", "--experiments", "budget",
                     "--set", "budget_seeds=2"])
    assert code == 0
    md = open(tmp_path / "o" / "report.md").read()
    assert "cifar10 (200 train / 40 test images, 3x32x32" in md
    assert "paper: CIFAR-10 ResNet-110 test error BN 6.61%, Fixup 7.24%" in md   # paper / measured
    said = capsys.readouterr().out
    assert "(of 2)]" in said or "of 2 seeds]" in said


def test_cli_runs_one_experiment(tmp_path, capsys):
    before = torch.get_num_threads()
    torch.set_num_threads(2)  # the study runs on 1 thread and must give the caller's setting back
    try:
        code = cli.main(["study", "--quick", "--experiments", "agc", "--out", str(tmp_path), "--no-progress",
                         "--set", "agc_epochs=0.2", "--set", "agc_depth=16"])
        assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(before)
    assert code == 0
    out = capsys.readouterr().out
    md = open(tmp_path / "report.md").read()
    assert "nf WRN-16-1 at batch 64, 0.2 epochs" in md and "Sizes changed from the quick preset: agc_depth, " \
        "agc_epochs" in md
    assert "Adaptive gradient clipping lets" in out and "(of 1)]" in out


def test_spp_draws_nf_with_skip_gain_one():
    size = study_size("quick")
    from normfree.study import Context, DataInfo
    ctx = Context(size, 0, "cpu", "/tmp", DataInfo.guess("digits"))
    opts = {s.label.rsplit(" seed ", 1)[0]: s.cfg["options"] for s in spp.plan(ctx)}
    assert opts["nf"] == {"gain_init": 1.0} and opts["nf_he"] == {"gain_init": 1.0}
    assert opts["skipinit a=1"] == {"gain_init": 1.0} and opts["skipinit"] == {"gain_init": 0.0}


def test_issue_17_methods_are_in_the_spp_and_the_deep_ones_in_the_depth_curve():
    from normfree.study import Context, DataInfo
    size = study_size("default")
    ctx = Context(size, 0, "cpu", "/tmp", DataInfo.guess("digits"))
    runs = {s.label.rsplit(" seed ", 1)[0]: s for s in spp.plan(ctx)}
    for m in spp.NEW_METHODS:
        assert runs[m].cfg["model"] == f"{m}_wrn"
        assert runs[m].cfg["depth"] == (size.spp_lsuv_depth if m == "lsuv" else size.spp_depth)
    assert size.spp_lsuv_depth < size.spp_depth == 1000
    # lsuv_init's quadratic cost is in the estimate: its 100 layers cost more than another method's 1,000
    assert runs["lsuv"].cost > runs["wn"].cost
    curve = {s.label.split(" depth ")[0] for s in depth.plan(ctx)}
    assert {"curve balduzzi", "curve szegedy", "curve hanin", "curve arpit", "curve lsuv"} <= curve
    assert not {"curve wn", "curve cwn", "curve selu"} & curve


def test_spp_run_of_lsuv_initializes_it_on_data():
    """The study's signal run of lsuv_wrn calls lsuv_init: each block's E[x^2] then follows
    LSUV's prediction (unit-variance conv outputs: +1 per block); the He-initialized model
    (lsuv_init not run: the same as `none`) is off by 2-3x in the last blocks."""
    from normfree.study.runner import RunSpec, execute
    cfg = {"model": "lsuv_wrn", "options": {}, "depth": 16, "width": 1, "shape": [8, 1, 16, 16],
           "num_classes": 10, "seed": 0}
    rec = execute(RunSpec("spp", "lsuv seed 0", cfg, task="signal"), None)["models"]["lsuv_wrn"]
    ratio = spp.scale_ratios(rec)
    assert len(ratio) == 6 and all(0.8 < r < 1.25 for r in ratio), ratio
    he = execute(RunSpec("spp", "none seed 0", {**cfg, "model": "none_wrn"}, task="signal"), None)
    second = [b["var"] + b["mean_sq"] for b in he["models"]["none_wrn"]["blocks"]]
    assert max(s / p for s, p in zip(second, rec["predicted_second"])) > 2
    assert rec["input_mean_sq"] >= 0


def test_default_preset_tests_the_paper_depth():
    size = study_size("default")
    assert size.deep_depth >= 1000 and size.spp_depth >= 1000
    assert size.depth_seeds >= 3
    assert min(size.depth_seeds, size.spp_seeds, size.bs_seeds, size.budget_seeds, size.paths_seeds,
               size.agc_seeds) >= 2
    for preset in PRESET_NAMES:
        study_size(preset)  # every preset passes its own validation


# --------------------------------------------------------------------------
# sizes and arguments: refused before anything runs
# --------------------------------------------------------------------------
@pytest.mark.parametrize("item, message", [
    ("depths=ten", "'ten' is not an integer"),
    ("depths=10,nan", "'nan' is not an integer"),
    ("deep_lr=nan", "must be finite"),
    ("deep_lr=inf", "must be finite"),
    ("bs_lrs=-inf,1", "must be finite"),
    ("bs_lrs=0.1", "must have 2 to 12 values"),
    ("depths=" + ",".join(str(10 + 6 * k) for k in range(13)), "must have 1 to 12 values"),
    ("batch_sizes=16,16", "lists a value twice"),
    ("spp_depth=1001", "a WRN depth must be 6n+4"),
    ("depth_seeds=0", "out of range"),
    ("depth_seeds=1e9", "out of range"),
    ("deep_steps=2.5", "'2.5' is not an integer"),
    ("agc_clipping=0", "out of range"),
    ("data=imagenet", "must be one of"),
    ("depths=10,,16", "empty item"),
    ("dept=10", "did you mean 'depths'"),
    ("depths", "use KEY=VALUE"),
])
def test_bad_size_overrides_are_refused(item, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        parse_size_overrides([item])


def test_good_size_overrides_are_typed():
    got = parse_size_overrides(["depths=10,34", "deep_lr=0.01", "max_test_examples=none", "depth_steps=3e2"])
    assert got == {"depths": (10, 34), "deep_lr": 0.01, "max_test_examples": None, "depth_steps": 300}
    with pytest.raises(ValueError, match="given twice"):
        parse_size_overrides(["deep_lr=0.1", "deep_lr=0.2"])


def test_set_data_is_the_same_knob_as_data(tmp_path, capsys):
    # `--set data=NAME` once crashed with "got multiple values for keyword argument 'data'"
    assert cli.main(["study", "--plan", "--set", "data=cifar10", "--out", str(tmp_path / "o")]) == 0
    out = capsys.readouterr().out
    assert "preset cifar10" in out and "data cifar10" in out, out
    assert cli.main(["study", "--plan", "--data", "cifar10", "--set", "data=cifar10",
                     "--out", str(tmp_path / "o")]) == 0


def test_bad_study_arguments(tmp_path, capsys):
    def fails(args, message):
        assert cli.main(["study"] + args + ["--out", str(tmp_path / "o")]) == 2
        err = capsys.readouterr().err
        assert message in err, err

    fails(["--quick", "--experiments", "spp,bogus"], "unknown experiment(s) ['bogus']")
    fails(["--quick", "--set", "depths=ten"], "bad value in size override 'depths=ten'")
    fails(["--quick", "--set", "dept=10"], "bad size override 'dept=10'")
    fails(["--plan", "--set", "deep_lr=nan"], "must be finite")                      # --plan validates too
    fails(["--plan", "--set", "budget_batch=5000"], "batch size 5000 is larger than the 1437 training images")
    fails(["--plan", "--seed", "-1"], "seed must be an integer")
    fails(["--plan", "--jobs", "0"], "jobs must be an integer")
    fails(["--plan", "--threads", "100000"], "threads must be an integer")
    fails(["--plan", "--max-train-examples", "0"], "max_train_examples = 0 is out of range")
    fails(["--plan", "--device", "tpu"], "device must be cpu, cuda")
    fails(["--plan", "--data", "digits", "--set", "data=cifar10"], "data given twice: --data digits and --set data=cifar10")
    assert not os.path.exists(tmp_path / "o")  # nothing written
    (tmp_path / "file").write_text("mine")
    assert cli.main(["study", "--quick", "--out", str(tmp_path / "file")]) == 2
    assert "--out must be a directory, not a file" in capsys.readouterr().err
    assert (tmp_path / "file").read_text() == "mine"
    with pytest.raises(ValueError, match="unknown preset 'huge'"):
        run_study("huge", str(tmp_path))
    assert cli.main(["study", "--sizes"]) == 0
    assert "deep_depth" in capsys.readouterr().out
    assert set(EXPERIMENTS) == {"spp", "depth", "batch", "budget", "paths", "agc"}
    assert set(KNOBS) >= {"spp_depth", "deep_depth", "bootstrap"}


# --------------------------------------------------------------------------
# statistics
# --------------------------------------------------------------------------
def test_paired_bootstrap_covers_no_difference_and_sees_a_real_one():
    rng = np.random.default_rng(0)
    covered = 0
    for t in range(40):   # equal accuracies: the 95% interval covers 0 about 95% of the time
        a, b = (rng.random((1, 300)) < 0.8).astype(float), (rng.random((1, 300)) < 0.8).astype(float)
        iv = paired_bootstrap(a, b, resamples=400, seed=t)
        covered += iv.lo <= 0 <= iv.hi
    assert covered >= 34
    a = np.ones((2, 300))
    b = (rng.random((2, 300)) < 0.7).astype(float)
    iv = paired_bootstrap(a, b, resamples=400)
    assert iv.lo > 0.2 and abs(iv.diff - (1 - b.mean())) < 1e-12
    same = paired_bootstrap(b, b, resamples=100)
    assert same.lo == same.hi == same.diff == 0


def test_paired_bootstrap_includes_the_seed_to_seed_spread():
    # seed 0: a is 10 points better, seed 1: 10 points worse. Pooled as one seed the images alone
    # suggest a tight interval; with the seeds resampled the interval is much wider.
    rng = np.random.default_rng(1)
    b = (rng.random((2, 500)) < 0.8).astype(float)
    a = b.copy()
    flip0 = np.flatnonzero(b[0] == 0)[:50]
    a[0, flip0] = 1
    flip1 = np.flatnonzero(b[1] == 1)[:50]
    a[1, flip1] = 0
    two = paired_bootstrap(a, b, resamples=1000)
    one = paired_bootstrap(a.reshape(1, -1), b.reshape(1, -1), resamples=1000)
    assert abs(two.diff) < 1e-12 and abs(one.diff) < 1e-12
    assert (two.hi - two.lo) > 3 * (one.hi - one.lo)


def test_bits_round_trip_and_unanimity():
    c = np.random.default_rng(0).random(37) < 0.5
    assert (unpack_bits(pack_bits(c), 37) == c).all()
    assert unanimous([HOLDS, HOLDS]) == HOLDS and unanimous([HOLDS, FAILS]) == UNSURE
    assert unanimous([FAILS] * 3) == FAILS and unanimous([]) == UNSURE


def test_a_claim_never_says_none():
    with pytest.raises(ValueError, match="not None"):
        Claim("c", "s", "largest lr that trains None", HOLDS, "r")
    with pytest.raises(ValueError, match="verdict must be"):
        Claim("c", "s", "m", "maybe", "r")
    c = Claim("c", "s", "m", UNSURE, "r", per_seed=[(0, HOLDS, "a"), (1, FAILS, "b"), (2, HOLDS, "c")])
    assert c.agreement == "seeds: 2 holds, 1 does not hold (of 3)"


# --------------------------------------------------------------------------
# every claim's rule, fed made-up measurements, for each outcome
# --------------------------------------------------------------------------
def _blocks(var, stage=None, **cols):
    n = len(var)
    stage = stage or [1] * n
    out = []
    for i in range(n):
        b = {"index": i + 1, "name": f"blocks.{i}", "stage": stage[i], "channels": 16, "var": var[i],
             "mean_sq": 0.0, "res_var": 1.0, "ratio": None}
        for k, v in cols.items():
            b[k] = v[i]
        out.append(b)
    return out


L = np.arange(1, 21)


@pytest.mark.parametrize("growth, verdict", [(2.0, HOLDS), (1.1, FAILS), (1.35, UNSURE), (4.0, FAILS)])
def test_rule_doubling(growth, verdict):
    assert spp.rule_doubling(_blocks(list(growth ** L.astype(float))))[0] == verdict


def test_rule_doubling_survives_overflow():
    var = list(2.0 ** L.astype(float)) + [float("inf"), None]
    assert spp.rule_doubling(_blocks(var))[0] == HOLDS


@pytest.mark.parametrize("var, verdict", [
    (1 + 0.7 * L, HOLDS),                                   # linear
    (10 - 0.3 * L, FAILS),                                  # shrinking
    (1 + 0.7 * L + 2.0 * (L % 2), UNSURE),                  # linear but noisy: 0.8 <= R^2 < 0.95
    (1.5 ** L, FAILS),                                      # exponential: R^2 < 0.8
    (3.0 + 0.0 * L, FAILS),                                 # flat: no growth (once a rounding-noise slope)
])
def test_rule_bn_linear(var, verdict):
    v, m = spp.rule_bn_linear(_blocks(list(var)))
    assert v == verdict, m


@pytest.mark.parametrize("power, verdict", [(-0.5, HOLDS), (0.0, FAILS), (-0.2, UNSURE), (-1.0, FAILS)])
def test_rule_bn_ratio(power, verdict):
    assert spp.rule_bn_ratio(_blocks(list(1 + L), ratio=list(L.astype(float) ** power)))[0] == verdict


@pytest.mark.parametrize("ratio, verdict", [(0.1, HOLDS), (1.0, FAILS), (math.sqrt(0.3 / 0.7), UNSURE)])
def test_rule_bn_shallow(ratio, verdict):
    assert spp.rule_bn_shallow(_blocks(list(1 + L), ratio=[ratio] * len(L)))[0] == verdict


@pytest.mark.parametrize("small, one, verdict", [
    (1.001, 2.0, HOLDS),        # bounded, and alpha = 1 explodes
    (1.2, 2.0, FAILS),          # alpha = 1/sqrt(d) grows 38x: not bounded
    (1.001, 1.2, UNSURE),       # alpha = 1 grows only 38x: between 10x and 100x
    (1.001, 1.05, FAILS),       # alpha = 1 barely grows: the premise fails
])
def test_rule_skipinit(small, one, verdict):
    a0 = _blocks([1.0] * 20)
    v, m = spp.rule_skipinit(a0, _blocks(list(small ** L.astype(float))), _blocks(list(one ** L.astype(float))),
                             {"small": 1.0, "one": 1.0}, depth_blocks=20)
    assert v == verdict, m


def test_rule_skipinit_alpha_zero_must_be_constant():
    moved = _blocks([1.0] * 10 + [1.5] * 10)   # a gain that is not applied would show here
    v, _ = spp.rule_skipinit(moved, _blocks([1.0] * 20), _blocks(list(2.0 ** L.astype(float))),
                             {"small": 1.0, "one": 1.0}, 20)
    assert v == FAILS


def _nf(worst=0.0, res=1.0, msq=0.0):
    pred = [1 + 0.04 * k for k in range(1, 21)]
    var = list(pred)
    var[7] *= 1 + worst                      # one block off; the median stays perfect
    return _blocks(var, res_var=[res] * 20, mean_sq=[msq * v for v in var]), pred


@pytest.mark.parametrize("kw, verdict", [
    ({}, HOLDS), ({"worst": 0.6}, FAILS), ({"worst": 0.35}, UNSURE), ({"res": 1.9}, FAILS), ({"res": 1.6}, UNSURE),
    ({"msq": 0.1}, UNSURE), ({"msq": 0.3}, FAILS)])
def test_rule_nf_is_judged_on_the_worst_block(kw, verdict):
    v, m = spp.rule_nf(*_nf(**kw))
    assert v == verdict, m


@pytest.mark.parametrize("he, verdict", [(0.5, HOLDS), (0.015, FAILS), (0.05, UNSURE)])
def test_rule_he_drift(he, verdict):
    assert spp.rule_he_drift(_blocks([1.0], mean_sq=[he]), _blocks([1.0], mean_sq=[0.01]))[0] == verdict


def _scaled(ratio, n=20):
    """A method's SPP record whose E[x^2] is ratio(l) x its prediction in block l."""
    pred = [1 + 0.1 * k for k in range(1, n + 1)]
    var = [p * ratio(k) for k, p in enumerate(pred, 1)]
    return {"blocks": _blocks([v * 0.8 for v in var], mean_sq=[v * 0.2 for v in var]), "predicted_second": pred}


@pytest.mark.parametrize("ratio, verdict", [
    (lambda l: 1.0, HOLDS),
    (lambda l: 0.5 if l == 7 else 1.0, HOLDS),           # one block off by 2x: within the band
    (lambda l: 0.5 ** l, FAILS),                         # halves per block: vanishes (Balduzzi's marginal case)
    (lambda l: 2.0 ** l, FAILS),                         # doubles per block: explodes
    (lambda l: float("inf") if l > 15 else 1.0, FAILS),  # overflowed
    (lambda l: 0.1 if l == 20 else 1.0, UNSURE),         # one block 10x low: between the bands
    (lambda l: 8.0 if l == 3 else 1.0, UNSURE),
])
def test_rule_scale_is_judged_on_the_worst_block(ratio, verdict):
    v, m = spp.rule_scale("hanin", _scaled(ratio))
    assert v == verdict, m
    assert "None" not in m


def test_rule_scale_without_a_prediction_is_inconclusive():
    assert spp.rule_scale("arpit", {"blocks": _blocks([1.0] * 3), "predicted_second": []})[0] == UNSURE


@pytest.mark.parametrize("wn, cwn, verdict", [
    (6.0, 0.01, HOLDS), (0.5, 0.4, FAILS), (0.015, 0.01, FAILS), (0.05, 0.01, UNSURE), (0.5, 0.1, UNSURE)])
def test_rule_cwn_drift(wn, cwn, verdict):
    # wn overflows after 10 blocks: judged on the finite ones
    wn_blocks = _blocks([2.0 ** k for k in range(10)] + [float("inf"), None],
                        mean_sq=[wn * 2.0 ** k for k in range(10)] + [float("inf"), None])
    v, m = spp.rule_cwn_drift(wn_blocks, _blocks([1.0] * 12, mean_sq=[cwn] * 12))
    assert v == verdict, m


def test_rule_cwn_drift_with_nothing_finite_is_inconclusive():
    assert spp.rule_cwn_drift(_blocks([float("inf")]), _blocks([1.0]))[0] == UNSURE


def test_spp_claims_combine_seeds():
    def seed(bn_power):
        blocks = lambda var, **c: {"blocks": _blocks(list(var), **c), "input_var": 1.0,
                                   "predicted": [1 + 0.04 * k for k in range(1, 21)]}
        return {"none": blocks(2.0 ** L), "bn": blocks(1 + 0.7 * L, ratio=list(L.astype(float) ** bn_power)),
                "skipinit": blocks([1.0] * 20), "skipinit a=1/sqrt(d)": blocks(1.001 ** L),
                "skipinit a=1": blocks(2.0 ** L), "nf": blocks([1 + 0.04 * k for k in range(1, 21)]),
                "nf_he": blocks([1.0] * 20, mean_sq=[0.5] * 20)}

    claims = spp.judge({0: seed(-0.5), 1: seed(-0.5), 2: seed(0.0)}, 20)
    by = {c.claim.split()[0] + c.claim.split()[1]: c for c in claims}
    ratio = next(c for c in claims if "downscales" in c.claim)
    assert ratio.verdict == UNSURE and ratio.agreement == "seeds: 2 holds, 1 does not hold (of 3)"
    doubling = next(c for c in claims if "doubles" in c.claim)
    assert doubling.verdict == HOLDS and doubling.agreement == "holds in 3 of 3 seeds"
    assert len(doubling.per_seed) == 3 and by
    assert not any("Hanin" in c.claim or "CWN" in c.claim for c in claims)   # not run: not judged
    with_new = {k: {**v, "hanin": _scaled(lambda l: 1.0), "balduzzi": _scaled(lambda l: 0.5 ** l),
                    "arpit": _scaled(lambda l: 1.0),
                    "wn": {"blocks": _blocks([1.0] * 20, mean_sq=[1.0] * 20)},
                    "cwn": {"blocks": _blocks([1.0] * 20, mean_sq=[0.001] * 20)}}
                for k, v in {0: seed(-0.5), 1: seed(-0.5)}.items()}
    new = {c.source: c for c in spp.judge(with_new, 20)[7:]}
    assert new["Hanin & Rolnick 2018"].verdict == HOLDS and new["Arpit et al. 2019"].verdict == HOLDS
    assert new["Balduzzi et al. 2017"].verdict == FAILS
    assert new["Balduzzi et al. 2017"].agreement == "does not hold in 2 of 2 seeds"
    assert new["Huang et al. 2017; Brock et al. 2021"].verdict == HOLDS


def _run(loss=0.3, acc=0.9, status="ok", n=200, seed=0, correct=None):
    if correct is None:
        correct = np.zeros(n, bool)
        correct[np.random.default_rng(seed).permutation(n)[: int(round(acc * n))]] = True
    return {"status": status, "final_train_loss": loss if status == "ok" else None, "test_images": len(correct),
            "test_acc": float(np.mean(correct)) if status == "ok" else None,
            "test_correct": pack_bits(correct) if status == "ok" else None, "diverged_step": 3}


DIVERGED = dict(status="diverged")


GOOD = {"skipinit a=0": _run(), "none": _run(**DIVERGED), "skipinit a=1": _run(**DIVERGED)}


@pytest.mark.parametrize("runs, verdict", [
    (GOOD, HOLDS),
    ({**GOOD, "skipinit a=0": _run(loss=2.2)}, UNSURE),                     # nothing trained: budget too small?
    ({**GOOD, "none": _run()}, FAILS),                                      # an unnormalized network trains
    ({**GOOD, "skipinit a=1": _run(loss=1.0)}, FAILS),
    ({**GOOD, "skipinit a=0": _run(loss=2.2), "none": _run()}, FAILS),
    ({**GOOD, "bn": _run()}, HOLDS),                                        # with the BN control
    ({**GOOD, "bn": _run(loss=2.3)}, UNSURE),                               # the control did not train
    ({**GOOD, "bn": _run(), "skipinit a=0": _run(loss=2.2)}, FAILS),        # BN trains, SkipInit does not
])
def test_rule_depth(runs, verdict):
    v, m = depth.rule(runs, 10)
    assert v == verdict, m
    assert "None" not in m


def test_depth_claim_over_seeds():
    bad = {**GOOD, "skipinit a=1": _run(loss=1.0)}
    c = depth.judge({0: GOOD, 1: GOOD, 2: GOOD}, 10, 1000)
    assert c.verdict == HOLDS and c.agreement == "holds in 3 of 3 seeds"
    assert "skipinit a=0 trains in 3 of 3" in c.measured and "BN" not in c.claim
    c = depth.judge({0: GOOD, 1: bad, 2: GOOD}, 10, 1000)
    assert c.verdict == UNSURE and "skipinit a=1 trains in 1 of 3" in c.measured
    assert [v for _, v, _ in c.per_seed] == [HOLDS, FAILS, HOLDS]
    with_bn = {**GOOD, "bn": _run()}
    c = depth.judge({0: with_bn, 1: with_bn}, 10, 1000)
    assert c.verdict == HOLDS and "and with BN" in c.claim and "bn trains in 2 of 2" in c.measured
    assert c.paper == "" and "4.62%" in depth.judge({0: with_bn}, 10, 100, "cifar10").paper


LRS = (0.05, 0.2, 0.8, 3.2)


def _grid(bn_best, sk_best, bn_acc=0.9, sk_acc=0.9, bn_top=None, sk_top=None, same=True, n=400, seed=0):
    """{method: {lr: run}}: each method's best run at *_best, training up to *_top."""
    base = np.random.default_rng(seed).random(n) < 0.5

    def correct(acc, s):
        c = base.copy() if same else np.random.default_rng(s).random(n) < 0.5
        ones = np.flatnonzero(~c) if c.mean() < acc else np.flatnonzero(c)
        k = int(round(abs(acc - c.mean()) * n))
        c[ones[:k]] = c.mean() < acc
        return c

    def method(best, acc, top, s):
        out = {}
        for lr in LRS:
            if top is not None and lr > top:
                out[lr] = _run(**DIVERGED)
            elif lr == best:
                out[lr] = _run(correct=correct(acc, s))
            else:
                out[lr] = _run(correct=correct(acc - 0.2, s + 7))
        return out

    return {"bn": method(bn_best, bn_acc, bn_top, 1), "skipinit": method(sk_best, sk_acc, sk_top, 2)}


@pytest.mark.parametrize("kw, verdict", [
    ({"bn_best": 0.2, "sk_best": 0.2}, HOLDS),                                      # same accuracy, same lr
    ({"bn_best": 0.2, "sk_best": 0.05, "sk_acc": 0.9}, HOLDS),                        # one grid step apart
    ({"bn_best": 0.8, "sk_best": 0.05}, FAILS),                                      # lrs two steps apart
    ({"bn_best": 0.2, "sk_best": 0.2, "bn_acc": 0.95, "sk_acc": 0.75}, FAILS),        # 20 points apart
    ({"bn_best": 0.2, "sk_best": 0.2, "bn_acc": 0.92, "sk_acc": 0.895, "same": False, "n": 200}, UNSURE),
])
def test_rule_small_batch(kw, verdict):
    n = kw.pop("n", 400)
    v, m = batch.rule_small({0: _grid(**kw, n=n)}, 10, 0.03, LRS, 500)
    assert v == verdict, m


def test_rule_small_batch_pools_seeds():
    two = {0: _grid(0.2, 0.2, seed=0), 1: _grid(0.2, 0.2, seed=1)}
    v, m = batch.rule_small(two, 10, 0.03, LRS, 500)
    assert v == HOLDS and "2 seeds x 400 test images" in m


@pytest.mark.parametrize("bn_top, sk_top, verdict, words", [
    (0.8, 0.2, HOLDS, "bn 0.8, skipinit 0.2"),
    (0.2, 0.8, FAILS, "bn 0.2"),
    (0.8, 0.8, UNSURE, "a tie"),
    (3.2, 3.2, UNSURE, "both at the top of the grid"),
    (0.01, 0.01, UNSURE, "no run trained"),
])
def test_rule_large_batch_lr(bn_top, sk_top, verdict, words):
    runs = _grid(0.05, 0.05, bn_top=bn_top, sk_top=sk_top)
    if bn_top < 0.05:  # nothing trains
        runs = {m: {lr: _run(loss=2.3) for lr in LRS} for m in runs}
    v, m = batch.rule_large_lr(runs, 10, LRS)
    assert v == verdict and words in m, m
    assert "None" not in m


@pytest.mark.parametrize("bn_acc, sk_acc, verdict", [(0.95, 0.8, HOLDS), (0.8, 0.95, FAILS), (0.9, 0.9, UNSURE)])
def test_rule_large_batch_accuracy(bn_acc, sk_acc, verdict):
    v, m = batch.rule_large_acc({0: _grid(0.2, 0.2, bn_acc=bn_acc, sk_acc=sk_acc)}, 10, 500)
    assert v == verdict, m


def test_rule_large_batch_accuracy_needs_bn_to_train():
    runs = _grid(0.2, 0.2)
    runs["bn"] = {lr: _run(loss=2.3) for lr in LRS}
    assert batch.rule_large_acc({0: runs}, 10, 200)[0] == UNSURE


def _methods(accs, seeds=3, n=300, trained=None):
    base = np.random.default_rng(9).random((seeds, n))
    out = {}
    for m, acc in accs.items():
        out[m] = {}
        for s in range(seeds):
            c = base[s] < acc      # nested: a higher accuracy classifies a superset of images
            ok = trained is None or trained.get(m, True)
            out[m][s] = _run(correct=c, loss=0.3 if ok else 2.3)
    return out


@pytest.mark.parametrize("reg, plain, bn, verdicts", [
    (0.90, 0.80, 0.90, (HOLDS, HOLDS)),          # better than plain, level with BN
    (0.80, 0.90, 0.90, (FAILS, FAILS)),          # worse than plain, 10 points below BN
    (0.85, 0.85, 0.862, (UNSURE, UNSURE)),       # no difference to plain; within reach of BN's margin
])
def test_rules_regularized_skipinit(reg, plain, bn, verdicts):
    runs = _methods({"skipinit regularized": reg, "skipinit": plain, "bn": bn, "nf": bn, "fixup": bn})
    claims = budget.judge(runs, 10, 0.01, 500)
    assert (claims[0].verdict, claims[1].verdict) == verdicts, [c.measured for c in claims[:2]]
    assert "of 3" in claims[0].agreement and len(claims[0].per_seed) == 3


@pytest.mark.parametrize("nf, verdict", [(0.9, HOLDS), (0.7, FAILS), (0.88, UNSURE)])
def test_rule_nf_matches_bn(nf, verdict):
    runs = _methods({"skipinit regularized": 0.9, "skipinit": 0.9, "bn": 0.9, "nf": nf, "fixup": 0.9}, seeds=2)
    c = budget.judge(runs, 10, 0.01, 500)[2]
    assert c.claim.startswith("NF-ResNets") and c.verdict == verdict, c.measured


@pytest.mark.parametrize("fixup, verdict", [(0.9, HOLDS), (0.7, FAILS), (0.88, UNSURE)])
def test_rule_fixup_matches_bn(fixup, verdict):
    runs = _methods({"skipinit regularized": 0.9, "skipinit": 0.9, "bn": 0.9, "nf": 0.9, "fixup": fixup}, seeds=2)
    c = budget.judge(runs, 10, 0.01, 500)[3]
    assert c.claim.startswith("Fixup") and c.verdict == verdict, c.measured
    assert c.paper == ""                                  # the published number is CIFAR-10's, not comparable here
    assert "paper: CIFAR-10 ResNet-110" in budget.judge(runs, 10, 0.01, 200, data="cifar10")[3].paper


def test_budget_rules_need_the_reference_to_train():
    runs = _methods({"skipinit regularized": 0.9, "skipinit": 0.9, "bn": 0.9, "nf": 0.9, "fixup": 0.9},
                    trained={"bn": False})
    claims = budget.judge(runs, 10, 0.01, 200)
    assert [c.verdict for c in claims[1:]] == [UNSURE] * 3
    assert all("bn did not train" in c.measured for c in claims[1:])


@pytest.mark.parametrize("drop, loss, verdict", [(0.01, 0.3, HOLDS), (0.3, 0.3, FAILS), (0.1, 0.3, UNSURE),
                                                 (0.01, 2.2, UNSURE)])
def test_rule_lesion(drop, loss, verdict):
    rec = {**_run(loss=loss), "lesion": {"base_acc": 0.9, "blocks": [{"block": 2, "acc": 0.9 - drop, "drop": drop}]}}
    v, m = paths.rule(rec, "bn", 10)
    assert v == verdict, m
    assert paths.rule({**_run(**DIVERGED)}, "bn", 10)[0] == UNSURE


def _agc(no_top, yes_top, no_acc=0.6, yes_acc=0.6, train=True):
    lrs = (0.4, 1.6, 6.4)
    base = np.random.default_rng(3).random(300)

    def method(top, acc):
        return {lr: (_run(correct=base < acc, loss=0.3 if train else 2.2) if lr <= top else _run(**DIVERGED))
                for lr in lrs}

    return {"nf no AGC": method(no_top, no_acc), "nf AGC": method(yes_top, yes_acc)}, lrs


@pytest.mark.parametrize("kw, verdict", [
    ({"no_top": 0.4, "yes_top": 1.6}, HOLDS),                                 # AGC trains at a larger lr
    ({"no_top": 1.6, "yes_top": 0.4}, FAILS),                                 # AGC trains only at smaller ones
    ({"no_top": 1.6, "yes_top": 1.6, "yes_acc": 0.8}, HOLDS),                  # same lrs, clearly better
    ({"no_top": 1.6, "yes_top": 1.6}, UNSURE),                                # a tie is not a win
    ({"no_top": 1.6, "yes_top": 1.6, "no_acc": 0.094, "yes_acc": 0.172, "train": False}, UNSURE),  # nothing trained
])
def test_rule_agc(kw, verdict):
    runs, lrs = _agc(**kw)
    v, m = agc.rule(runs, 10, lrs, 500)
    assert v == verdict, m


def test_agc_claim_over_seeds():
    good, lrs = _agc(0.4, 1.6)
    tie, _ = _agc(1.6, 1.6)
    assert agc.judge({0: good, 1: good}, 10, lrs, 200).verdict == HOLDS
    c = agc.judge({0: good, 1: tie}, 10, lrs, 200)
    assert c.verdict == UNSURE and c.agreement == "seeds: 1 holds, 1 inconclusive (of 2)"


# --------------------------------------------------------------------------
# worker processes
# --------------------------------------------------------------------------
def test_workers_keep_freed_memory_unless_told_not_to(monkeypatch, tmp_path):
    from normfree.study.runner import Runner, worker_state

    def state():
        runner = Runner(RunStore(str(tmp_path)), None, jobs=2, threads=1, progress=False)
        try:
            return runner.start_pool().submit(worker_state).result(timeout=300)
        finally:
            runner.close()

    # conftest sets NORMFREE_SYSTEM_MALLOC=1: the workers keep the C library's settings
    opted_out = state()
    assert opted_out["allocator"] is False and opted_out["ppid"] == os.getpid() and opted_out["threads"] == 1
    monkeypatch.delenv("NORMFREE_SYSTEM_MALLOC")
    applied = state()
    import sys
    assert applied["allocator"] is sys.platform.startswith("linux")


def test_closing_the_runner_stops_a_busy_worker(tmp_path):
    import time
    from normfree.study.runner import Runner, _sleep, worker_state

    runner = Runner(RunStore(str(tmp_path)), None, jobs=2, threads=1, progress=False)
    pool = runner.start_pool()
    pid = pool.submit(worker_state).result(timeout=300)["pid"]
    pool.submit(_sleep, 600)
    pool.submit(_sleep, 600)
    time.sleep(0.5)
    t = time.perf_counter()
    runner.close()
    assert time.perf_counter() - t < 30
    assert not _alive(pid)


def _alive(pid: int) -> bool:
    """Running (not gone, not a zombie)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except (FileNotFoundError, ProcessLookupError):
        return False


def _catches(pid: int, signum: int) -> bool:
    """``pid`` has a handler for ``signum`` (a worker inside a training run: its loop catches SIGTERM)."""
    try:
        with open(f"/proc/{pid}/status") as f:
            mask = next(int(ln.split()[1], 16) for ln in f if ln.startswith("SigCgt:"))
    except (OSError, StopIteration):
        return False
    return bool(mask >> (signum - 1) & 1)


def _workers(parent: int):
    out = []
    for d in os.listdir("/proc"):
        if not d.isdigit():
            continue
        try:
            stat = open(f"/proc/{d}/stat").read().rsplit(")", 1)[1].split()
            cmd = open(f"/proc/{d}/cmdline").read()
        except OSError:
            continue
        if int(stat[1]) == parent and "spawn_main" in cmd:
            out.append(int(d))
    return out


STUDY = """
import sys
from normfree import cli
sys.exit(cli.main(["study", "--quick", "--experiments", "depth", "--out", sys.argv[1], "--no-progress", "--jobs", "2",
                   "--set", "depths=10", "--set", "depth_lrs=0.1", "--set", "depth_steps=1000000",
                   "--set", "deep_steps=1000000"]))
"""


@pytest.mark.skipif(not os.path.isdir("/proc/self"), reason="reads /proc")
@pytest.mark.parametrize("signame", ["SIGINT", "SIGTERM", "SIGKILL"])
def test_killing_the_study_stops_its_workers(tmp_path, signame):
    import signal
    import subprocess
    import sys
    import time

    proc = subprocess.Popen([sys.executable, "-c", STUDY, str(tmp_path / "o")], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    workers = []
    try:
        deadline = time.time() + 300
        while time.time() < deadline and len(workers) < 2 and proc.poll() is None:
            time.sleep(0.5)
            workers = _workers(proc.pid)
        assert len(workers) == 2, proc.communicate(timeout=60) if proc.poll() is not None else "no workers"
        while time.time() < deadline and not all(_catches(w, signal.SIGTERM) for w in workers):
            time.sleep(0.1)
        assert all(_catches(w, signal.SIGTERM) for w in workers), "the workers did not start training"
        time.sleep(0.5)  # inside their training loops
        os.kill(proc.pid, getattr(signal, signame))
        code = proc.wait(timeout=120)
        if signame != "SIGKILL":
            err = proc.stderr.read()
            assert code == 128 + getattr(signal, signame) and "interrupted" in err, err
            # the workers were killed, not asked to finish a step and write a checkpoint they do not have;
            # the pool's queues were closed (no resource-tracker warning of leaked semaphores)
            assert "finishing this step" not in err and "leaked" not in err and "Traceback" not in err, err
        deadline = time.time() + 30
        while time.time() < deadline and any(_alive(p) for p in workers):
            time.sleep(0.2)
        assert not any(_alive(p) for p in workers), f"workers still running after {signame} of the parent"
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        for pid in workers:  # never leave a worker behind, even when the test fails
            if _alive(pid):
                os.kill(pid, signal.SIGKILL)


def test_the_trains_bar_is_a_size():
    from normfree.study.verdicts import Trains, trains, trains_rule

    run = _run(loss=1.9)                                   # 0.83 ln(10)
    assert not trains(run, 10) and trains(run, Trains(10, 0.85))
    assert "0.85 ln(10) = 1.96" in trains_rule(Trains(10, 0.85))
    v, m = depth.rule({**GOOD, "skipinit a=0": run}, Trains(10, 0.85))
    assert v == HOLDS and depth.rule({**GOOD, "skipinit a=0": run}, 10)[0] == UNSURE
    assert study_size("cifar10").trains_below == 0.85 and study_size("default").trains_below == 0.75


@pytest.mark.skipif(not os.path.isdir("/proc/self"), reason="reads /proc")
def test_a_killed_worker_ends_the_study_with_one_line(tmp_path):
    import signal
    import subprocess
    import sys
    import time

    proc = subprocess.Popen([sys.executable, "-c", STUDY, str(tmp_path / "o")], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    workers = []
    try:
        deadline = time.time() + 300
        while time.time() < deadline and len(workers) < 2 and proc.poll() is None:
            time.sleep(0.5)
            workers = _workers(proc.pid)
        assert len(workers) == 2
        time.sleep(2)
        os.kill(workers[0], signal.SIGKILL)           # e.g. the kernel's out-of-memory killer
        code = proc.wait(timeout=120)
        err = proc.stderr.read()
        assert code == 2 and "a worker process died" in err and "Traceback" not in err, err
        deadline = time.time() + 30
        while time.time() < deadline and any(_alive(p) for p in workers):
            time.sleep(0.2)
        assert not any(_alive(p) for p in workers)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        for pid in workers:
            if _alive(pid):
                os.kill(pid, signal.SIGKILL)


def test_linear_r2_fits_a_line_and_gives_nan_for_missing_points():
    """The BN-growth rule's fit: exact on a line, nan (not an error) when a
    point is missing (None from an overflowed run) or there are < 3 points."""
    slope, r2 = linear_r2([1.0, 3.0, 5.0, 7.0])
    assert slope == pytest.approx(2.0) and r2 == pytest.approx(1.0)
    assert 0 < linear_r2([1.0, 4.0, 4.5, 9.0])[1] < 1
    for bad in ([1.0, None, 3.0, 4.0], [1.0, float("inf"), 3.0], [1.0, 2.0]):
        assert all(math.isnan(v) for v in linear_r2(bad)), bad


def test_rule_helper_matches_is_strict_at_both_margins():
    """`matches`: holds only strictly inside (-margin, margin), fails only strictly
    outside, and an interval touching or straddling a margin is inconclusive."""
    from normfree.study.verdicts import Interval, matches

    iv = lambda lo, hi: Interval((lo + hi) / 2, lo, hi, 1, 100)
    assert matches(iv(-0.01, 0.02), 0.03) == HOLDS
    assert matches(iv(-0.029, -0.001), 0.03) == HOLDS            # asymmetric, all below 0: still inside
    assert matches(iv(0.001, 0.029), 0.03) == HOLDS
    assert matches(iv(-0.03, 0.02), 0.03) == UNSURE              # touches -margin
    assert matches(iv(-0.02, 0.03), 0.03) == UNSURE              # touches +margin
    assert matches(iv(-0.04, 0.0), 0.03) == UNSURE               # straddles -margin
    assert matches(iv(0.0, 0.04), 0.03) == UNSURE                # straddles +margin
    assert matches(iv(0.031, 0.05), 0.03) == FAILS               # wholly above
    assert matches(iv(-0.05, -0.031), 0.03) == FAILS             # wholly below
    assert matches(iv(0.03, 0.05), 0.03) == UNSURE               # lo on the margin is not outside
    assert matches(iv(-0.05, -0.03), 0.03) == UNSURE
    assert matches(iv(-0.04, 0.04), 0.03) == UNSURE              # wider than the band on both sides


def test_rule_helper_fmt_never_prints_none_and_keeps_digits():
    from normfree.study.verdicts import fmt

    assert fmt(None) == "-"
    assert fmt(True) == "yes" and fmt(False) == "no"
    assert fmt(7) == "7" and fmt(np.int64(12)) == "12"
    assert fmt(0.123456) == "0.123" and fmt(0.123456, 2) == "0.12" and fmt(np.float32(2.5)) == "2.5"
    assert fmt(999.4) == "999" and fmt(1234.5) == "1.23e+03" and fmt(1234.5, 4) == "1234"
    assert fmt(-1234.5) == "-1.23e+03"
    assert fmt(float("inf")) == "inf" and fmt(float("-inf")) == "-inf" and fmt(float("nan")) == "nan"
    assert fmt(np.float64("nan")) == "nan"
    assert fmt("abc") == "abc"


def test_rule_helper_grid_note_names_the_grid_edges():
    from normfree.study.verdicts import grid_note

    grid = [0.8, 0.05, 0.2]                                      # not sorted: the edges are min and max
    assert grid_note(None, grid) == "no learning rate trained"
    assert grid_note(None, grid, "batch size") == "no batch size trained"
    assert grid_note(0.8, grid) == "0.8 (top of the grid: the true limit may be higher)"
    assert grid_note(0.05, grid) == "0.05 (bottom of the grid)"
    assert grid_note(0.2, grid) == "0.2"
    assert grid_note(0.4, [0.4]) == "0.4 (top of the grid: the true limit may be higher)"  # a 1-point grid
    assert grid_note(0.1, [0.4, 0.1]) == "0.1 (bottom of the grid)"                         # a 2-point grid


def test_rule_helper_linear_r2_matches_numpy():
    rng = np.random.default_rng(0)
    for n in (3, 5, 12):
        y = 0.7 * np.arange(1, n + 1) + rng.normal(0, 1.0, n) + 3.0
        slope, r2 = linear_r2(list(y))
        k = np.arange(1, n + 1)
        assert slope == pytest.approx(np.polyfit(k, y, 1)[0], rel=1e-9)
        assert r2 == pytest.approx(np.corrcoef(k, y)[0, 1] ** 2, rel=1e-9)
    # a flat line: slope exactly 0 (polyfit's rounding gave -4.5e-16 or +4.5e-16 and R^2 = -0.68)
    assert linear_r2([2.0, 2.0, 2.0]) == (0.0, 1.0) and linear_r2([1e6] * 4) == (0.0, 1.0)
    assert linear_r2([2.0, 2.0, 2.0 + 1e-6])[0] > 0               # a real (tiny) rise is still a rise
    # "flat" is a spread of at most 1e-12 of the values' size (and 1e-12 absolute below 1)
    assert linear_r2([1e6, 1e6 + 1e-7, 1e6]) == (0.0, 1.0) and linear_r2([1.0, 1.0 + 1.5e-12, 1.0]) != (0.0, 1.0)
    assert all(math.isnan(v) for v in linear_r2([1.0, float("nan"), 3.0, 4.0]))
    slope, r2 = linear_r2([1.0, 2.0, 3.0])                        # exactly 3 points is enough
    assert slope == pytest.approx(1.0) and r2 == pytest.approx(1.0)


def test_rule_helper_claim_refuses_bad_verdicts_and_the_word_none():
    ok = dict(claim="c", source="s", measured="m", verdict=HOLDS, rule="r")
    Claim(**ok)
    with pytest.raises(ValueError, match="verdict must be one of"):
        Claim(**{**ok, "verdict": "maybe"})
    for key in ("measured", "rule", "paper"):
        with pytest.raises(ValueError, match="not None"):
            Claim(**{**ok, key: "largest lr that trains None"})
    Claim(**{**ok, "measured": "Nonetheless fine"})               # the word, not the letters


def test_rule_helper_agreement_and_unanimous_count_the_seeds():
    from normfree.study.verdicts import agreement

    assert agreement(HOLDS, []) == ""
    assert agreement(HOLDS, [HOLDS]) == "holds in 1 of 1 seed"
    assert agreement(HOLDS, [HOLDS, FAILS, HOLDS]) == "holds in 2 of 3 seeds"
    assert agreement(FAILS, [FAILS, FAILS]) == "does not hold in 2 of 2 seeds"
    assert agreement(UNSURE, [FAILS, HOLDS, HOLDS]) == "seeds: 2 holds, 1 does not hold (of 3)"
    assert agreement(UNSURE, [UNSURE, UNSURE, FAILS]) == "seeds: 1 does not hold, 2 inconclusive (of 3)"
    assert unanimous([]) == UNSURE
    assert unanimous([FAILS]) == FAILS and unanimous([HOLDS, HOLDS, HOLDS]) == HOLDS
    assert unanimous([HOLDS, HOLDS, FAILS]) == UNSURE and unanimous([FAILS, HOLDS]) == UNSURE


def test_rule_helper_the_trains_bar_is_strict_and_needs_a_finite_ok_run():
    from normfree.study.verdicts import Trains, _bar, chance_loss, trains, trains_rule

    assert chance_loss(10) == pytest.approx(math.log(10)) and chance_loss(2) == pytest.approx(math.log(2))
    assert _bar(10) == Trains(10, 0.75) and _bar(Trains(100, 0.5)) == Trains(100, 0.5)
    assert Trains(10).loss == pytest.approx(0.75 * math.log(10))
    bar = 0.75 * math.log(10)
    assert trains({"status": "ok", "final_train_loss": bar - 1e-6}, 10)
    assert trains({"status": "ok", "final_train_loss": 1}, 10)                  # an int loss is a number
    assert not trains({"status": "ok", "final_train_loss": bar}, 10)           # on the bar is not below it
    assert not trains({"status": "diverged", "final_train_loss": 0.1}, 10)
    assert not trains({"status": "ok", "final_train_loss": float("nan")}, 10)
    assert not trains({"status": "ok", "final_train_loss": None}, 10)
    assert not trains({"status": "ok"}, 10) and not trains(None, 10) and not trains({}, 10)
    assert trains_rule(10) == ("a run trains if it did not diverge and its final training loss is below "
                               "0.75 ln(10) = 1.73")


def test_rule_helper_combine_better_and_not_worse_at_their_edges():
    from normfree.study.verdicts import Interval, better, combine, not_worse

    assert combine(HOLDS, HOLDS) == HOLDS and combine(HOLDS, UNSURE) == UNSURE
    assert combine(UNSURE, FAILS, HOLDS) == FAILS and combine(FAILS) == FAILS and combine(UNSURE) == UNSURE
    iv = lambda lo, hi: Interval((lo + hi) / 2, lo, hi, 1, 100)
    assert better(iv(0.001, 0.05)) == HOLDS and better(iv(0.0, 0.05)) == UNSURE      # a tie is not a win
    assert better(iv(-0.05, -0.001)) == FAILS and better(iv(-0.05, 0.0)) == UNSURE
    assert not_worse(iv(-0.029, 0.1), 0.03) == HOLDS and not_worse(iv(-0.03, 0.1), 0.03) == UNSURE
    assert not_worse(iv(-0.1, -0.031), 0.03) == FAILS and not_worse(iv(-0.1, -0.03), 0.03) == UNSURE


def test_rule_helper_pct_and_the_packed_correctness_bits():
    from normfree.study.verdicts import pct

    assert pct(None) == "-" and pct(float("nan")) == "-" and pct(0.1234) == "12.3%" and pct(1) == "100.0%"
    bits = [1, 0, 0, 1, 1, 1, 0, 1, 0, 1, 1, 0, 1]                              # 13: not a multiple of 8
    text = pack_bits(bits)
    assert text == "9d68" and list(unpack_bits(text, 13)) == bits
    assert unpack_bits(text, 13).dtype == np.float64
    with pytest.raises(ValueError, match="holds 16 images, expected 17"):
        unpack_bits(text, 17)


def test_rule_helper_interval_text_and_fmt_exponents():
    from normfree.study.verdicts import Interval, fmt

    assert Interval(0.0123, -0.004, 0.029, 2, 5000).text("bn", "skipinit") == \
        "bn - skipinit = +1.2 points (95% interval -0.4 to +2.9; 2 seeds x 5000 test images)"
    assert Interval(-0.05, -0.08, -0.02, 1, 360).text() == \
        "a - b = -5.0 points (95% interval -8.0 to -2.0; 1 seed x 360 test images)"
    assert fmt(1000.0) == "1.00e+03" and fmt(1200.0) == "1.20e+03" and fmt(999.0) == "999"
    assert Interval(0.3, 0.25, 0.45, 3, 100).text() == \
        "a - b = +30.0 points (95% interval +25.0 to +45.0; 3 seeds x 100 test images)"


def test_rule_helper_bootstrap_defaults_and_shape_checks():
    rng = np.random.default_rng(2)
    a, b = (rng.random((2, 40)) < 0.6).astype(float), (rng.random((2, 40)) < 0.5).astype(float)
    assert paired_bootstrap(a, b) == paired_bootstrap(a, b, resamples=2000, seed=0, level=0.95)  # the defaults
    for x, y in ((np.zeros((2, 2, 2)), np.zeros((2, 2, 2))), (np.zeros((2, 3)), np.zeros((2, 4))),
                 (np.zeros((0, 3)), np.zeros((0, 3)))):
        with pytest.raises(ValueError, match=r"must be \[seeds, images\] arrays of the same shape"):
            paired_bootstrap(x, y)


def test_rule_helper_bootstrap_inputs_one_image_1d_and_bool():
    one = paired_bootstrap(np.array([[1.0]]), np.array([[0.0]]), resamples=50)
    assert (one.diff, one.lo, one.hi, one.seeds, one.images) == (1.0, 1.0, 1.0, 1, 1)
    a = np.array([1, 0, 1, 1, 0, 1, 0, 1], dtype=bool)
    b = np.array([0, 0, 1, 0, 0, 1, 0, 0], dtype=bool)
    flat = paired_bootstrap(a, b, resamples=300, seed=3)                      # 1-d, bool: one seed
    assert flat == paired_bootstrap(a[None].astype(float), b[None].astype(float), resamples=300, seed=3)
    assert flat.diff == pytest.approx(3 / 8) and flat.seeds == 1 and flat.images == 8
    # every image can be drawn: only image 0 differs, so some resamples see it and some do not
    iv = paired_bootstrap(np.array([[1.0, 0, 0, 0]]), np.zeros((1, 4)), resamples=400, seed=0)
    assert iv.lo == 0.0 and iv.hi >= 0.5


def test_rule_helper_bootstrap_interval_has_its_level_and_survives_chunking():
    """One seed, n images, d = a - b with sd s: the 95% percentile interval is about
    diff +- 1.96 s / sqrt(n). Large enough input that the resamples are drawn in chunks."""
    rng = np.random.default_rng(1)
    n = 2500
    a = (rng.random((2, n)) < 0.7).astype(float)
    b = (rng.random((2, n)) < 0.6).astype(float)
    iv = paired_bootstrap(a, b, resamples=4000, seed=0)                        # 4000 x 5000 > 4e6: 3+ chunks
    d = a - b
    # two-stage bootstrap over 2 seeds: the variance of the mean of seed means (seeds drawn, images drawn)
    seed_means = d.mean(axis=1)
    sd = math.sqrt(seed_means.var() / 2 + (d.var(axis=1).mean()) / (2 * n))
    assert iv.lo < iv.diff < iv.hi and iv.diff == pytest.approx(d.mean())
    assert (iv.hi - iv.lo) == pytest.approx(2 * 1.96 * sd, rel=0.08)
    one = paired_bootstrap(a[:1], b[:1], resamples=20000, seed=0)
    sd1 = d[0].std() / math.sqrt(n)
    assert (one.hi - one.lo) == pytest.approx(2 * 1.96 * sd1, rel=0.04)
    assert paired_bootstrap(a[:1], b[:1], resamples=20000, seed=0, level=0.5).hi - \
        paired_bootstrap(a[:1], b[:1], resamples=20000, seed=0, level=0.5).lo == \
        pytest.approx(2 * 0.674 * sd1, rel=0.05)


def test_rule_helper_pack_bits_takes_bools_ints_and_floats():
    for bits in ([True, False, True], [1, 0, 1], [1.0, 0.0, 1.0], np.array([1, 0, 1], dtype=np.uint8)):
        assert pack_bits(bits) == "a0", bits
    assert pack_bits([2, 0, 0, 0, 0, 0, 0, 1]) == "81"                       # any nonzero is "correct"
