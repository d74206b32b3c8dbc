"""Trained checkpoints load back as models, and export as plain-convolution programs."""
import json
import os

import pytest
import torch

from normfree.cli import main
from normfree.fold import export_model
from normfree.train import TrainConfig, load_checkpoint, load_model, train


@pytest.fixture(scope="module")
def nf_run(tmp_path_factory):
    """A few steps of NF-WRN-10-1 on a subset of the digits, with a checkpoint."""
    out = str(tmp_path_factory.mktemp("nf_run"))
    cfg = TrainConfig(model="nf_wrn", depth=10, width=1, data="digits", batch_size=32, lr=0.05, steps=6,
                      max_train_examples=128, max_test_examples=64, log_every=3, progress=False, out=out,
                      model_options={"alpha": 0.3})
    result = train(cfg)
    return out, result


def test_load_model_rebuilds_the_trained_model(nf_run):
    out, result = nf_run
    model = load_model(out)  # the run directory works as well as the file
    assert not model.training and model.in_chans == 1 and model.num_classes == 10
    assert model.blocks[0].branch_const == pytest.approx(0.3)  # method options come back
    trained = result.model.state_dict()
    for k, v in model.state_dict().items():
        assert torch.equal(v, trained[k].cpu()), k
    info = load_checkpoint(out)["input"]
    assert info["shape"] == [1, 8, 8] and len(info["mean"]) == 1 and len(info["classes"]) == 10


def test_export_cli_writes_a_folded_program_equal_to_the_model(nf_run, tmp_path, capsys):
    out, _ = nf_run
    dest = str(tmp_path / "nf.pt2")
    assert main(["export", os.path.join(out, "checkpoint.pt"), "--out", dest]) == 0
    assert "folded into plain convolutions" in capsys.readouterr().out
    program = torch.export.load(dest)
    names = list(program.state_dict)
    assert names and not any("gain" in n for n in names)  # no WS gains or scalar gains left: plain convs
    model = load_model(out)
    x = torch.randn(5, 1, 8, 8)  # another batch size than the export example: the batch is dynamic
    with torch.no_grad():
        torch.testing.assert_close(program.module()(x), model(x), rtol=1e-4, atol=1e-5)
    meta = json.loads((tmp_path / "nf.json").read_text())
    assert meta["folded"] is True and meta["input"]["shape"] == [1, 8, 8] and meta["max_abs_diff"] < 1e-4


def test_export_model_keeps_normalization_models_unfolded(tmp_path):
    import normfree

    model = normfree.create_model("bn_wrn", depth=10, width=1, in_chans=3)
    x = torch.randn(3, 3, 16, 16)
    result = export_model(model, x, str(tmp_path / "bn.pt2"))
    assert result["folded"] is False and model.training  # the caller's mode is restored
    with torch.no_grad():
        torch.testing.assert_close(torch.export.load(str(tmp_path / "bn.pt2")).module()(x), model.eval()(x))
    with pytest.raises(ValueError, match="at least 2"):
        export_model(model, x[:1], str(tmp_path / "one.pt2"))


def test_export_and_load_errors_name_the_bad_input(tmp_path, capsys):
    assert main(["export", str(tmp_path / "missing.pt")]) == 2
    assert "no checkpoint at" in capsys.readouterr().err
    bad = tmp_path / "checkpoint.pt"
    bad.write_bytes(b"not a checkpoint")
    assert main(["export", str(tmp_path)]) == 2
    assert f"cannot read {bad}: not a checkpoint file" in capsys.readouterr().err
    torch.save({"weights": torch.zeros(2)}, str(bad))  # a real torch file, but not ours
    with pytest.raises(ValueError, match="not a normfree checkpoint"):
        load_checkpoint(str(bad))
