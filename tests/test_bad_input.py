"""Bad values are refused where they enter, before any expensive step
(issue 14, class 7), and hostile data files end in one "cannot read FILE:
reason" line (class 8).

Every case runs the real command line (``normfree.cli.main``) and checks:
exit status 2, one error line naming the option or file, no traceback, and
nothing done first (the data are not loaded, no output is written)."""
import gzip
import os
import pickle
import struct
import tarfile

import numpy as np
import pytest

from normfree.cli import main
from normfree.data import load_dataset
from normfree.train import TrainConfig

TRAIN = ["train", "--model", "skipinit_wrn", "--depth", "10", "--batch-size", "32", "--max-train-examples", "64",
         "--no-progress", "--steps", "1"]


def one_error_line(err: str, command: str) -> str:
    lines = [ln for ln in err.splitlines() if ln.startswith(f"normfree {command}: error: ")]
    assert len(lines) == 1 and "Traceback" not in err, err
    return lines[0]


# (extra arguments, text the error must contain); each is a distinct bad input
TRAIN_CASES = {
    "lr_nan": (["--lr", "nan"], "lr must be a finite number"),
    "lr_inf": (["--lr", "inf"], "lr must be a finite number"),
    "lr_negative": (["--lr", "-0.1"], "lr must be a finite number in (0, inf)"),
    "momentum_nan": (["--momentum", "nan"], "momentum must be a finite number in [0, 1)"),
    "momentum_one": (["--momentum", "1"], "momentum must be a finite number in [0, 1)"),
    "weight_decay_inf": (["--weight-decay", "inf"], "weight_decay must be a finite number"),
    "betas_one_value": (["--optimizer", "adamw", "--betas", "0.9"], "betas must be two numbers"),
    "betas_three_values": (["--betas", "0.9", "0.99", "0.999"], "betas must be two numbers"),
    "betas_nan": (["--betas", "0.9", "nan"], "betas[1] must be a finite number"),
    "milestones_outside": (["--milestones", "0.5", "1.5"], "milestones[1] must be a finite number in (0, 1)"),
    "milestones_unordered": (["--milestones", "0.75", "0.5"], "milestones must be in increasing order"),
    "label_smoothing_nan": (["--label-smoothing", "nan"], "label_smoothing must be a finite number"),
    "scalar_lr_mult_zero": (["--scalar-lr-mult", "0"], "scalar_lr_mult must be None or a finite number"),
    "scalar_lr_mult_nan": (["--scalar-lr-mult", "nan"], "scalar_lr_mult must be None or a finite number"),
    "agc_nan": (["--agc", "nan"], "agc must be None or a finite number"),
    "agc_eps_zero": (["--agc-eps", "0"], "agc_eps must be a finite number"),
    "warmup_epochs_nan": (["--warmup-epochs", "nan"], "warmup_epochs must be a finite number"),
    "warmup_both": (["--warmup-epochs", "1", "--warmup-steps", "2"], "give warmup_steps or warmup_epochs"),
    "lr_gamma_inf": (["--lr-gamma", "inf"], "lr_gamma must be a finite number"),
    "epochs_nan": (["--epochs", "nan"], "epochs must be a finite number"),
    "epochs_inf": (["--epochs", "inf"], "epochs must be a finite number"),
    "epochs_huge": (["--epochs", "1e12"], "epochs must be a finite number in (0, 1e+06]"),
    "steps_zero": (["--steps", "0"], "steps must be None or an integer in [1, 1000000000]"),
    "steps_huge": (["--steps", "100000000000000"], "steps must be None or an integer in [1, 1000000000]"),
    "batch_zero": (["--batch-size", "0"], "batch_size must be an integer in [1, 1048576]"),
    "batch_huge": (["--batch-size", "1000000000"], "batch_size must be an integer in [1, 1048576]"),
    "depth_huge": (["--depth", "1000000"], "depth must be None or an integer in [1, 20000]"),
    "width_nan": (["--width", "nan"], "width must be None or a finite number in (0, 100]"),
    "width_inf": (["--width", "inf"], "width must be None or a finite number in (0, 100]"),
    "width_huge": (["--width", "5000"], "width must be None or a finite number in (0, 100]"),
    "seed_negative": (["--seed", "-1"], "seed must be an integer in [0, "),
    "seed_huge": (["--seed", "100000000000000000000000"], "seed must be an integer in [0, "),
    "num_classes_zero": (["--num-classes", "0"], "num_classes must be None or an integer in [1, 1000000]"),
    "num_classes_huge": (["--num-classes", "10000000000"], "num_classes must be None or an integer"),
    "in_chans_zero": (["--in-chans", "0"], "in_chans must be None or an integer in [1, 4096]"),
    "max_train_zero": (["--max-train-examples", "0"], "max_train_examples must be None or an integer"),
    "dropout_nan": (["--dropout", "nan"], "dropout must be None or a finite number in [0, 1)"),
    "drop_path_one": (["--drop-path", "1"], "drop_path must be None or a finite number in [0, 1)"),
    "log_every_zero": (["--log-every", "0"], "log_every must be an integer in [1, "),
    "eval_every_negative": (["--eval-every", "-1"], "eval_every must be an integer in [0, "),
    "checkpoint_every_negative": (["--checkpoint-every", "-2"], "checkpoint_every must be an integer in [0, "),
    "stop_after_zero": (["--stop-after-steps", "0"], "stop_after_steps must be None or an integer"),
    "device_unknown": (["--device", "tpu"], "device must be one of"),
    "device_cuda_garbage": (["--device", "cuda:x"], "device must be one of"),
    "image_size_not_folder": (["--image-size", "8"], "image_size applies to the 'folder' data set only"),
    "name_and_depth_conflict": (["--model", "skipinit_wrn_16_4", "--depth", "10"],
                                "model 'skipinit_wrn_16_4' says depth 16, but depth=10 was also given"),
    "name_and_width_conflict": (["--model", "skipinit_wrn_16_4", "--depth", "16", "--width", "2"],
                                "says width 4, but width=2.0 was also given"),
    "unknown_model": (["--model", "batchnorm_wrn"], "unknown method 'batchnorm'"),
    "unknown_method_option": (["--opt", "alpah=0.2"], "unknown option 'alpah'"),
    "option_without_value": (["--opt", "alpha"], "--opt expects key=value"),
    "option_twice": (["--opt", "drop_path=0.1", "--opt", "drop_path=0.2"], "--opt drop_path is given twice"),
    "resume_without_out": (["--resume"], "resume needs out"),
    "out_empty": (["--out", ""], "out must be a directory path"),
}


@pytest.mark.parametrize("name", sorted(TRAIN_CASES))
def test_train_refuses_bad_values_before_any_work(name, tmp_path, capsys, monkeypatch):
    extra, text = TRAIN_CASES[name]
    monkeypatch.setattr("normfree.data.load_dataset", lambda *a, **k: pytest.fail("data loaded before the check"))
    out = tmp_path / "run"
    args = TRAIN + extra + ([] if "--out" in extra or "--resume" in extra else ["--out", str(out)])
    assert main(args) == 2
    line = one_error_line(capsys.readouterr().err, "train")
    assert text in line, line
    assert not out.exists()  # nothing written


@pytest.mark.parametrize("values, text", [
    (dict(lr=float("nan")), "lr must be a finite number"),
    (dict(lr="0.1"), "lr must be a finite number"),
    (dict(batch_size=True), "batch_size must be an integer"),
    (dict(batch_size=32.0), "batch_size must be an integer"),
    (dict(betas=(0.9,)), "betas must be two numbers"),
    (dict(milestones=()), "milestones must be one or more fractions"),
    (dict(model_options=["alpha"]), "model_options must be a dict"),
    (dict(data=3), "data must be a data set name"),
    (dict(depth=10.5), "depth must be None or an integer"),
])
def test_train_config_refuses_bad_python_values(values, text):
    with pytest.raises(ValueError, match=text.replace("(", r"\(").replace(")", r"\)")):
        TrainConfig(**values)


SPP_CASES = {
    "width_nan": (["--width", "nan"], "argument --width: must be a finite number in (0, 100]"),
    "batch_zero": (["--batch", "0"], "argument --batch: must be an integer in [1, 65536]"),
    "resolution_huge": (["--resolution", "100000"], "argument --resolution: must be an integer in [1, 4096]"),
    "in_chans_zero": (["--in-chans", "0"], "argument --in-chans: must be an integer in [1, 4096]"),
    "chunk_zero": (["--chunk", "0"], "argument --chunk: must be an integer"),
    "seed_negative": (["--seed", "-3"], "argument --seed: must be an integer"),
    "depth_text": (["--depth", "ten"], "argument --depth: must be an integer"),
    "name_and_depth_conflict": (["--model", "nf_wrn_16_4", "--depth", "10"], "says depth 16, but --depth 10"),
    "unknown_compare": (["--compare", "nf_wrn", "bnn_wrn"], "unknown method 'bnn'"),
}


@pytest.mark.parametrize("name", sorted(SPP_CASES))
def test_spp_refuses_bad_values_before_measuring(name, tmp_path, capsys, monkeypatch):
    extra, text = SPP_CASES[name]
    monkeypatch.setattr("normfree.signal.compare_models", lambda *a, **k: pytest.fail("measured before the check"))
    out = tmp_path / "spp.png"
    args = ["spp"] + ([] if "--model" in extra else ["--model", "nf_wrn"]) + extra + ["--out", str(out)]
    if text.startswith("argument"):  # refused by the option's type: argparse's usage line + error, status 2
        with pytest.raises(SystemExit) as e:
            main(args)
        err = capsys.readouterr().err
        assert e.value.code == 2 and f"normfree spp: error: {text}" in err and "Traceback" not in err
    else:
        assert main(args) == 2
        assert text in one_error_line(capsys.readouterr().err, "spp")
    assert not os.listdir(tmp_path)


def test_argparse_errors_exit_with_status_2(capsys):
    with pytest.raises(SystemExit) as e:
        main(["spp", "--model", "nf_wrn", "--width", "inf"])
    assert e.value.code == 2


@pytest.mark.parametrize("size, text", [(["0", "8"], "argument --size: must be an integer in [1, 4096]"),
                                        (["100000", "8"], "argument --size: must be an integer in [1, 4096]")])
def test_export_refuses_bad_sizes(size, text, tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        main(["export", str(tmp_path), "--size", *size])
    assert e.value.code == 2 and text in capsys.readouterr().err


def test_data_refuses_bad_image_size(capsys):
    with pytest.raises(SystemExit) as e:
        main(["data", "folder", "--image-size", "0"])
    assert e.value.code == 2 and "argument --image-size: must be an integer in [1, 4096]" in capsys.readouterr().err
    with pytest.raises(ValueError, match=r"image_size must be an int or \(H, W\) in \[1, 4096\]"):
        load_dataset("folder", "/nonexistent", image_size=(8, 10 ** 6))


# ------------------------------------------------------------------ class 8: hostile data files
def _idx(a):
    a = np.asarray(a, dtype=np.uint8)
    return bytes([0, 0, 8, a.ndim]) + struct.pack(f">{a.ndim}I", *a.shape) + a.tobytes()


def _mnist(folder, spoil=None):
    os.makedirs(folder, exist_ok=True)
    rng = np.random.default_rng(0)
    files = {"train-images-idx3-ubyte": _idx(rng.integers(0, 256, (8, 28, 28))),
             "train-labels-idx1-ubyte": _idx(rng.integers(0, 10, 8)),
             "t10k-images-idx3-ubyte": _idx(rng.integers(0, 256, (4, 28, 28))),
             "t10k-labels-idx1-ubyte": _idx(rng.integers(0, 10, 4))}
    if spoil:
        name, blob = spoil
        files[name] = blob
    for name, blob in files.items():
        with gzip.open(os.path.join(folder, name + ".gz"), "wb") as f:
            f.write(blob)
    return os.path.join(folder, "train-images-idx3-ubyte.gz")


class _Reduce:
    def __init__(self, fn, args):
        self.fn, self.args = fn, args

    def __reduce__(self):
        return (self.fn, self.args)


def _cifar(folder, first):
    os.makedirs(folder, exist_ok=True)
    rng = np.random.default_rng(0)
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        with open(os.path.join(folder, name), "wb") as f:
            pickle.dump({"data": rng.integers(0, 256, (2, 3072), dtype=np.uint8), "labels": [1, 2]}, f)
    path = os.path.join(folder, "data_batch_1")
    with open(path, "wb") as f:
        f.write(first)
    return path


def _images(root, broken, mode="RGB"):
    """Two good images per class and split, and ``broken`` as train/a/bad.png.
    (With grayscale images every file is opened once to find the colour mode
    before any is decoded: a second reading path.)"""
    from PIL import Image

    for split in ("train", "test"):
        for cls in ("a", "b"):
            os.makedirs(os.path.join(root, split, cls), exist_ok=True)
            for i in range(2):
                Image.new(mode, (6, 6), 50 * i).save(os.path.join(root, split, cls, f"{i}.png"))
    path = os.path.join(root, "train", "a", "bad.png")
    with open(path, "wb") as f:
        f.write(broken)
    return path


def _png_claiming(width, height):
    """A well-formed PNG (valid chunks and CRCs) that claims width x height RGB
    pixels but holds the data of a single row: a decompression bomb when the
    size is huge, a truncated image when it is small."""
    import zlib

    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    row = zlib.compress(b"\x00" + b"\x7f" * 3 * min(width, 64))
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", row) + chunk(b"IEND", b"")


def _cut_png():
    """A real 32x32 PNG of noise, cut off in the middle of its pixel data."""
    import io

    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (32, 32, 3), dtype=np.uint8)).save(buf, "PNG")
    return buf.getvalue()[: len(buf.getvalue()) // 2]


def _tar(root, members):
    import io
    archive = os.path.join(root, "cifar-10-python.tar.gz")
    os.makedirs(root, exist_ok=True)
    with tarfile.open(archive, "w:gz") as tar:
        for name, kind in members:
            info = tarfile.TarInfo(name)
            if kind == "link":
                info.type, info.linkname = tarfile.SYMTYPE, "/etc/passwd"
                tar.addfile(info)
            else:
                info.size = 3
                tar.addfile(info, io.BytesIO(b"abc"))
    return archive


# name -> (builds the files under a root and returns the bad file, `normfree data` arguments, reason text)
DATA_CASES = {
    "idx_gzip_truncated": (lambda r: _truncate_gz(_mnist(r)), ["mnist"], "corrupt or truncated"),
    "idx_not_gzip": (lambda r: _overwrite(_mnist(r), b"plain bytes, not gzip"), ["mnist"], "corrupt or truncated"),
    "idx_wrong_magic": (lambda r: _mnist(r, ("train-images-idx3-ubyte", b"\x89PNG....")), ["mnist"],
                        "not an idx file"),
    "idx_header_lies_huge": (lambda r: _mnist(r, ("train-images-idx3-ubyte",
                                                  bytes([0, 0, 8, 3]) + struct.pack(">3I", 2 ** 31, 2 ** 20, 64))),
                             ["mnist"], "more than the 8589934592 allowed"),
    "idx_header_truncated": (lambda r: _mnist(r, ("train-images-idx3-ubyte", bytes([0, 0, 8, 3, 0, 0]))),
                             ["mnist"], "truncated idx header"),
    "idx_too_long": (lambda r: _mnist(r, ("train-images-idx3-ubyte", _idx(np.zeros((8, 28, 28))) + b"extra")),
                     ["mnist"], "the file holds more than"),
    "cifar_truncated_pickle": (lambda r: _cifar(r, pickle.dumps({"data": b"x" * 100})[:20]), ["cifar10"],
                               "not a CIFAR-10 batch"),
    "cifar_code_in_pickle": (lambda r: _cifar(r, pickle.dumps({"data": _Reduce(os.system, ("true",))})),
                             ["cifar10"], "refusing to load global"),
    "cifar_bad_reconstruct_args": (lambda r: _cifar(r, pickle.dumps(
        {"data": _Reduce(np.ndarray, ("not", "a", "shape"))})), ["cifar10"], "not a CIFAR-10 batch"),
    "cifar_deep_nesting": (lambda r: _cifar(r, b"(" * 100000 + b"."), ["cifar10"], "not a CIFAR-10 batch"),
    "cifar_not_a_dict": (lambda r: _cifar(r, pickle.dumps([1, 2, 3])), ["cifar10"], "expected a dict"),
    "cifar_wrong_dtype": (lambda r: _cifar(r, pickle.dumps({"data": np.zeros((2, 3072), np.float32),
                                                           "labels": [1, 2]})), ["cifar10"], "'data' must be uint8"),
    "cifar_labels_not_array": (lambda r: _cifar(r, pickle.dumps({"data": np.zeros((2, 3072), np.uint8),
                                                                "labels": {"a": object}})), ["cifar10"],
                               "refusing to load global"),
    "tar_escapes_folder": (lambda r: _tar(r, [("../evil.txt", "file")]), ["cifar10"], "refusing unsafe member"),
    "tar_symlink": (lambda r: _tar(r, [("cifar-10-batches-py/data_batch_1", "link")]), ["cifar10"],
                    "refusing unsafe member"),
    "tar_truncated": (lambda r: _truncate(_tar(r, [("cifar-10-batches-py/x", "file")]), 30), ["cifar10"],
                      "corrupt or truncated archive"),
    "image_not_an_image": (lambda r: _images(r, b"\x89PNG\r\n\x1a\n broken"), ["folder"], "not a decodable image"),
    "image_decompression_bomb": (lambda r: _images(r, _png_claiming(60000, 60000)), ["folder"],
                                 "DecompressionBombError"),
    "image_truncated_data": (lambda r: _images(r, _cut_png()), ["folder"], "truncated"),
    "image_bomb_among_gray": (lambda r: _images(r, _png_claiming(60000, 60000), mode="L"), ["folder"],
                              "DecompressionBombError"),
    "image_not_an_image_among_gray": (lambda r: _images(r, b"GIF89a broken", mode="L"), ["folder"],
                                      "not a decodable image"),
}


def _overwrite(path, blob):
    with open(path, "wb") as f:
        f.write(blob)
    return path


def _truncate(path, n=None):
    blob = open(path, "rb").read()
    return _overwrite(path, blob[: (n if n is not None else len(blob) // 2)])


def _truncate_gz(path):
    return _truncate(path)


@pytest.mark.parametrize("name", sorted(DATA_CASES))
def test_hostile_data_file_is_one_cannot_read_line(name, tmp_path, capsys, monkeypatch):
    build, args, reason = DATA_CASES[name]
    root = str(tmp_path / "data")
    if args == ["cifar10"] and not name.startswith("tar"):
        bad = build(os.path.join(root, "cifar-10-batches-py"))
    else:
        bad = build(root)
    if name.startswith("tar"):  # the archive is taken as the official one: skip its md5 check here
        monkeypatch.setattr("normfree.data.file_md5", lambda p: "c58f30108f718f92721af3b95e74349a")
    monkeypatch.chdir(tmp_path)
    assert main(["data", *args, "--data-dir", root]) == 2
    line = one_error_line(capsys.readouterr().err, "data")
    assert line.startswith(f"normfree data: error: cannot read {bad}: "), line
    assert reason in line, line
    assert not os.path.exists(tmp_path / "evil.txt")
