import json
import os
import pickle

import numpy as np
import pytest
import torch

from normfree import cli
from normfree.study import EXPERIMENTS, FAILS, HOLDS, UNSURE, run_study

VERDICTS = {HOLDS, FAILS, UNSURE}


@pytest.fixture(scope="module")
def quick(tmp_path_factory):
    out = str(tmp_path_factory.mktemp("study"))
    result = run_study("quick", out, jobs=1, progress=False, log=lambda s: None)
    return out, result


def test_quick_study_writes_a_complete_report(quick):
    out, result = quick
    assert result["executed"] > 0
    md = open(os.path.join(out, "report.md")).read()
    page = open(os.path.join(out, "report.html")).read()
    # every experiment has its section, in md and html
    for title in ["Signal propagation", "Trainability against depth", "Batch size and learning rate",
                  "Regularized SkipInit", "Shallow paths", "Adaptive gradient clipping"]:
        assert title in md and title in page
    # the html is self-contained: figures embedded, none linked
    assert page.count("data:image/png;base64,") >= 7 and "src='figures/" not in page
    for fig in ["spp", "spp_none", "depth", "batch_lr", "paths_tracking", "lesion", "agc"]:
        for ext in ("png", "svg"):
            assert os.path.getsize(os.path.join(out, "figures", f"{fig}.{ext}")) > 1000
    assert "platform" in md and "torch" in md  # configuration and machine


def test_claims_are_computed_with_a_rule_and_a_verdict(quick):
    out, result = quick
    claims = result["claims"]
    assert len(claims) >= 12
    assert json.load(open(os.path.join(out, "claims.json"))) == claims
    for c in claims:
        assert c["verdict"] in VERDICTS and c["rule"] and c["measured"] and c["source"]
    by_text = {c["claim"]: c for c in claims}
    # properties that hold at any size: SkipInit blocks are the identity, nf_he drifts
    skip = next(c for t, c in by_text.items() if t.startswith("SkipInit (alpha = 0)"))
    assert skip["verdict"] == HOLDS
    drift = next(c for t, c in by_text.items() if t.startswith("With He init alone"))
    assert drift["verdict"] == HOLDS


def test_restarted_study_reuses_finished_runs(quick, tmp_path):
    out, first = quick
    again = run_study("quick", out, jobs=1, progress=False, log=lambda s: None)
    assert again["executed"] == 0 and again["reused"] > 0
    assert [c["verdict"] for c in again["claims"]] == [c["verdict"] for c in first["claims"]]
    # a run record removed (as if the study was interrupted before it) is run again, alone
    runs = sorted(os.listdir(os.path.join(out, "runs")))
    os.remove(os.path.join(out, "runs", runs[0]))
    third = run_study("quick", out, jobs=1, progress=False, log=lambda s: None)
    assert third["executed"] == 1


def _fake_cifar(root, n=20):
    folder = os.path.join(root, "cifar-10-batches-py")
    os.makedirs(folder)
    rng = np.random.default_rng(0)
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        with open(os.path.join(folder, name), "wb") as f:
            pickle.dump({b"data": rng.integers(0, 256, (n, 3072), dtype=np.uint8),
                         b"labels": [int(i % 10) for i in range(n)]}, f)
    with open(os.path.join(folder, "batches.meta"), "wb") as f:
        pickle.dump({b"label_names": [f"c{i}".encode() for i in range(10)]}, f)


def test_full_preset_starts_on_cifar10(tmp_path, capsys):
    _fake_cifar(str(tmp_path / "data"))
    code = cli.main(["study", "--full", "--plan", "--data-dir", str(tmp_path / "data"), "--out", str(tmp_path / "o")])
    assert code == 0
    text = capsys.readouterr().out
    assert "depth 1000" in text and "depth" in text and "agc" in text


def test_cli_runs_one_experiment(tmp_path, capsys):
    before = torch.get_num_threads()
    torch.set_num_threads(2)  # the study runs on 1 thread and must give the caller's setting back
    try:
        code = cli.main(["study", "--quick", "--experiments", "spp", "--out", str(tmp_path), "--no-progress",
                     "--set", "spp_depth=16"])
        assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(before)
    assert code == 0
    out = capsys.readouterr().out
    assert "WRN-16-1 (6 residual blocks)" in open(tmp_path / "report.md").read()
    assert HOLDS in out and "SkipInit (alpha = 0)" in out
    assert os.path.exists(tmp_path / "report.html")


def test_bad_study_arguments(tmp_path, capsys):
    assert cli.main(["study", "--quick", "--experiments", "spp,bogus", "--out", str(tmp_path)]) == 2
    assert "unknown experiment(s) ['bogus']" in capsys.readouterr().err
    assert cli.main(["study", "--quick", "--set", "depths=ten", "--out", str(tmp_path)]) == 2
    assert "bad value in size override 'depths=ten'" in capsys.readouterr().err
    assert cli.main(["study", "--quick", "--set", "dept=10", "--out", str(tmp_path)]) == 2
    assert "bad size override 'dept=10'" in capsys.readouterr().err
    with pytest.raises(ValueError, match="unknown preset 'huge'"):
        run_study("huge", str(tmp_path))
    assert set(EXPERIMENTS) == {"spp", "depth", "batch", "regularized", "paths", "agc"}
