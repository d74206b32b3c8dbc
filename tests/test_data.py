"""Data sets in their real on-disk formats, downloads, and batching/augmentation.

Every test writes small files in the real format (idx, CIFAR-10 pickles,
tar.gz archives, PNG/JPEG folders) and loads them through load_dataset, the
code a user runs."""
import gzip
import hashlib
import io
import os
import pickle
import struct
import tarfile

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from normfree import data
from normfree.data import DATASETS, Batches, Remote, crop_flip, load_dataset


# --------------------------------------------------------------------------
# writers of the real formats
# --------------------------------------------------------------------------
def idx_bytes(a: np.ndarray) -> bytes:
    a = np.asarray(a, dtype=np.uint8)
    return bytes([0, 0, 0x08, a.ndim]) + struct.pack(f">{a.ndim}I", *a.shape) + a.tobytes()


def fake_mnist(n_train=12, n_test=6, size=28, seed=0):
    rng = np.random.default_rng(seed)
    return {"train-images-idx3-ubyte": rng.integers(0, 256, (n_train, size, size)),
            "train-labels-idx1-ubyte": rng.integers(0, 10, n_train),
            "t10k-images-idx3-ubyte": rng.integers(0, 256, (n_test, size, size)),
            "t10k-labels-idx1-ubyte": rng.integers(0, 10, n_test)}


def write_idx(folder, arrays, gz=True):
    os.makedirs(folder, exist_ok=True)
    for name, a in arrays.items():
        path = os.path.join(folder, name + (".gz" if gz else ""))
        with (gzip.open if gz else open)(path, "wb") as fh:
            fh.write(idx_bytes(a))
    return folder


def fake_cifar(n=4, seed=0):
    rng = np.random.default_rng(seed)
    return {f: (rng.integers(0, 256, (n, 3072), dtype=np.uint8), rng.integers(0, 10, n).tolist())
            for f in data.CIFAR10_BATCHES}


class Py2Pickler(pickle._Pickler):
    """Writes bytes as Python 2 wrote its str (SHORT_BINSTRING / BINSTRING), like
    the official CIFAR-10 files, which Python 2 pickled."""

    def save_py2_str(self, obj):
        n = len(obj)
        head = pickle.SHORT_BINSTRING + bytes([n]) if n < 256 else pickle.BINSTRING + struct.pack("<i", n)
        self.write(head + obj)
        self.memoize(obj)

    dispatch = dict(pickle._Pickler.dispatch)
    dispatch[bytes] = save_py2_str


def dump(obj, fh, protocol):
    if protocol != "py2":
        return pickle.dump(obj, fh, protocol=protocol)
    buf = io.BytesIO()
    Py2Pickler(buf, protocol=2).dump(obj)
    fh.write(buf.getvalue().replace(b"numpy._core.multiarray", b"numpy.core.multiarray"))


def write_cifar(folder, batches, protocol=2, meta=True):
    os.makedirs(folder, exist_ok=True)
    for f, (x, y) in batches.items():
        with open(os.path.join(folder, f), "wb") as fh:
            dump({b"batch_label": f.encode(), b"data": x, b"labels": y}, fh, protocol)
    if meta:
        with open(os.path.join(folder, "batches.meta"), "wb") as fh:
            dump({b"label_names": [f"c{i}".encode() for i in range(10)]}, fh, protocol)
    return folder


def md5(path):
    return hashlib.md5(open(path, "rb").read()).hexdigest()


def url(path):
    return "file://" + os.path.abspath(path)


# --------------------------------------------------------------------------
# digits (the built-in default)
# --------------------------------------------------------------------------
def test_digits_default_is_real_and_fixed():
    ds = load_dataset()
    assert ds.name == "digits" and ds.num_classes == 10 and ds.in_chans == 1 and ds.image_size == (8, 8)
    assert ds.train_x.dtype == torch.uint8 and ds.train_y.dtype == torch.int64
    assert (len(ds.train_y), len(ds.test_y)) == (1437, 360)
    assert set(ds.test_y.tolist()) == set(range(10))
    assert ds.augment and not ds.flip and ds.pad == 1
    again = load_dataset("digits")
    assert torch.equal(ds.test_x, again.test_x) and torch.equal(ds.train_y, again.train_y)
    from sklearn.datasets import load_digits
    sk = load_digits()
    assert int(ds.train_x.max()) == 255 and len(ds.train_y) + len(ds.test_y) == len(sk.target)
    # mean / std are the train split's, on the [0, 1] scale
    x = ds.train_x.double() / 255
    assert torch.allclose(ds.mean.double(), x.mean().reshape(1), atol=1e-6)
    assert torch.allclose(ds.std.double(), x.std(unbiased=False).reshape(1), atol=1e-6)


def test_unknown_dataset_name():
    with pytest.raises(ValueError, match="did you mean 'cifar10'"):
        load_dataset("cifar01")
    assert set(DATASETS) == {"digits", "mnist", "fashion_mnist", "cifar10", "folder"}


# --------------------------------------------------------------------------
# MNIST / Fashion-MNIST idx files
# --------------------------------------------------------------------------
@pytest.mark.parametrize("gz", [True, False])
def test_mnist_idx(tmp_path, gz):
    arrays = fake_mnist()
    write_idx(tmp_path / "mnist", arrays, gz=gz)
    ds = load_dataset("mnist", str(tmp_path))
    assert ds.name == "mnist" and ds.in_chans == 1 and ds.image_size == (28, 28) and not ds.flip
    assert torch.equal(ds.train_x[:, 0], torch.as_tensor(arrays["train-images-idx3-ubyte"], dtype=torch.uint8))
    assert torch.equal(ds.test_y, torch.as_tensor(arrays["t10k-labels-idx1-ubyte"]))
    assert ds.pad == 4


def test_fashion_mnist_in_debian_location(tmp_path, monkeypatch):
    arrays = fake_mnist(size=10)
    debian = write_idx(str(tmp_path / "usr-share-datasets-fashion-mnist"), arrays, gz=False)
    monkeypatch.setitem(data.SYSTEM_DIRS, "fashion_mnist", (debian,))
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    ds = load_dataset("fashion-mnist")          # data_dir None: ~/.cache/normfree, then the Debian folder
    assert ds.name == "fashion_mnist" and ds.source == debian and ds.classes[9] == "Ankle boot"
    assert torch.equal(ds.test_x[:, 0], torch.as_tensor(arrays["t10k-images-idx3-ubyte"], dtype=torch.uint8))


def test_idx_truncated_gzip_names_file(tmp_path):
    folder = write_idx(tmp_path / "mnist", fake_mnist())
    bad = os.path.join(folder, "train-images-idx3-ubyte.gz")
    blob = open(bad, "rb").read()
    open(bad, "wb").write(blob[: len(blob) // 2])
    with pytest.raises(ValueError, match="cannot read .*train-images-idx3-ubyte.gz: corrupt or truncated"):
        load_dataset("mnist", str(tmp_path))


def test_idx_truncated_data_names_file(tmp_path):
    arrays = fake_mnist()
    folder = write_idx(tmp_path / "mnist", arrays, gz=False)
    bad = os.path.join(folder, "t10k-images-idx3-ubyte")
    open(bad, "wb").write(idx_bytes(arrays["t10k-images-idx3-ubyte"])[:-100])
    with pytest.raises(ValueError, match=r"cannot read .*t10k-images-idx3-ubyte: truncated or corrupt idx file"):
        load_dataset("mnist", str(tmp_path))
    open(bad, "wb").write(b"\x89PNG not idx")
    with pytest.raises(ValueError, match="cannot read .*t10k-images-idx3-ubyte: not an idx file"):
        load_dataset("mnist", str(tmp_path))


def test_idx_mismatched_counts(tmp_path):
    arrays = fake_mnist()
    arrays["train-labels-idx1-ubyte"] = arrays["train-labels-idx1-ubyte"][:-1]
    write_idx(tmp_path / "mnist", arrays)
    with pytest.raises(ValueError, match="12 images but .*train-labels-idx1-ubyte.gz holds 11 labels"):
        load_dataset("mnist", str(tmp_path))


def test_idx_missing_split_and_missing_dataset(tmp_path):
    folder = write_idx(tmp_path / "mnist", fake_mnist())
    os.remove(os.path.join(folder, "t10k-labels-idx1-ubyte.gz"))
    with pytest.raises(FileNotFoundError, match=r"incomplete: missing .*t10k-labels-idx1-ubyte.gz.*--download"):
        load_dataset("mnist", str(tmp_path))
    empty = tmp_path / "empty"
    with pytest.raises(FileNotFoundError) as e:
        load_dataset("mnist", str(empty))
    msg = str(e.value)
    assert str(empty / "mnist") in msg and "train-images-idx3-ubyte.gz" in msg and "--download" in msg


def test_mnist_download_from_mirror(tmp_path, monkeypatch):
    arrays = fake_mnist()
    mirror = write_idx(tmp_path / "mirror", arrays)
    remotes = [Remote(n + ".gz", md5(os.path.join(mirror, n + ".gz")),
                      (url(tmp_path / "down" / (n + ".gz")), url(os.path.join(mirror, n + ".gz"))))
               for n in data.IDX_FILES]   # the first mirror is unreachable: the second is used
    monkeypatch.setitem(data.SOURCES, "mnist", remotes)
    root = tmp_path / "root"
    ds = load_dataset("mnist", str(root), download=True)
    assert torch.equal(ds.train_y, torch.as_tensor(arrays["train-labels-idx1-ubyte"]))
    assert sorted(os.listdir(root / "mnist")) == sorted(n + ".gz" for n in data.IDX_FILES)  # no .part left


# --------------------------------------------------------------------------
# CIFAR-10 pickles and the official archive
# --------------------------------------------------------------------------
@pytest.mark.parametrize("protocol", ["py2", 2, 4])
def test_cifar10_pickles(tmp_path, protocol):
    batches = fake_cifar()
    write_cifar(tmp_path / "cifar-10-batches-py", batches, protocol=protocol)
    ds = load_dataset("cifar10", str(tmp_path))
    assert ds.image_size == (32, 32) and ds.in_chans == 3 and ds.flip and ds.pad == 4
    assert ds.classes == [f"c{i}" for i in range(10)]                     # from batches.meta
    assert len(ds.train_y) == 20 and len(ds.test_y) == 4
    x1, y1 = batches["data_batch_2"]
    # official layout: 1024 red, then 1024 green, then 1024 blue values, row-major
    assert ds.train_x[4, 1, 2, 3] == x1[0, 1024 + 2 * 32 + 3]
    assert ds.train_y[4:8].tolist() == y1
    assert torch.equal(ds.test_x.reshape(4, -1), torch.as_tensor(batches["test_batch"][0]))


def test_cifar10_truncated_and_missing(tmp_path):
    folder = write_cifar(tmp_path / "cifar-10-batches-py", fake_cifar())
    bad = os.path.join(folder, "data_batch_3")
    blob = open(bad, "rb").read()
    open(bad, "wb").write(blob[:200])
    with pytest.raises(ValueError, match="cannot read .*data_batch_3: not a CIFAR-10 batch"):
        load_dataset("cifar10", str(tmp_path))
    os.remove(os.path.join(folder, "test_batch"))
    with pytest.raises(FileNotFoundError, match="incomplete: missing .*test_batch"):
        load_dataset("cifar10", str(tmp_path))


class _Evil:
    def __reduce__(self):
        return (os.system, ("touch pwned",))


def test_cifar10_pickle_cannot_run_code(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    folder = write_cifar(tmp_path / "cifar-10-batches-py", fake_cifar())
    with open(os.path.join(folder, "data_batch_1"), "wb") as fh:
        pickle.dump({b"data": _Evil(), b"labels": []}, fh)
    with pytest.raises(ValueError, match=r"cannot read .*data_batch_1: .*refusing to load global .*system"):
        load_dataset("cifar10", str(tmp_path))
    assert not os.path.exists(tmp_path / "pwned")


def make_cifar_archive(tmp_path):
    src = write_cifar(tmp_path / "src" / "cifar-10-batches-py", fake_cifar())
    archive = tmp_path / "server" / "cifar-10-python.tar.gz"
    archive.parent.mkdir()
    with tarfile.open(archive, "w:gz") as tar:
        tar.add(src, arcname="cifar-10-batches-py")
    return str(archive)


def test_cifar10_download_checksum_and_offline(tmp_path, monkeypatch):
    archive = make_cifar_archive(tmp_path)
    good = Remote("cifar-10-python.tar.gz", md5(archive), (url(archive),))

    # wrong checksum: clear error naming the file and both md5s, nothing saved
    monkeypatch.setitem(data.SOURCES, "cifar10", [Remote(good.filename, "0" * 32, good.urls)])
    bad_root = tmp_path / "bad"
    with pytest.raises(ValueError) as e:
        load_dataset("cifar10", str(bad_root), download=True)
    assert "cifar-10-python.tar.gz" in str(e.value) and "0" * 32 in str(e.value) and md5(archive) in str(e.value)
    assert os.listdir(bad_root) == []

    # no network: says where to put the file by hand
    monkeypatch.setitem(data.SOURCES, "cifar10", [Remote(good.filename, good.md5, (url(tmp_path / "nowhere.tgz"),))])
    with pytest.raises(FileNotFoundError, match=f"put it at {tmp_path / 'off' / 'cifar-10-python.tar.gz'}"):
        load_dataset("cifar10", str(tmp_path / "off"), download=True)

    # without download: names the expected files and the option
    with pytest.raises(FileNotFoundError, match=r"cifar-10-batches-py/data_batch_1.*--download"):
        load_dataset("cifar10", str(tmp_path / "off"))

    # a good download: fetched, verified, extracted, loaded
    monkeypatch.setitem(data.SOURCES, "cifar10", [good])
    root = tmp_path / "root"
    ds = load_dataset("cifar10", str(root), download=True)
    assert len(ds.train_y) == 20 and (root / "cifar-10-batches-py" / "test_batch").is_file()
    assert md5(root / "cifar-10-python.tar.gz") == good.md5


def test_cifar10_archive_by_hand_is_checked(tmp_path):
    archive = make_cifar_archive(tmp_path)
    root = tmp_path / "root"
    root.mkdir()
    target = root / "cifar-10-python.tar.gz"
    target.write_bytes(open(archive, "rb").read())
    # the test archive is not the official one: its md5 differs from the published one
    with pytest.raises(ValueError, match=f"checksum mismatch for {target}: expected md5 c58f30108f718f92721af3b95e74349a"):
        load_dataset("cifar10", str(root))


# --------------------------------------------------------------------------
# image folders
# --------------------------------------------------------------------------
def write_images(folder, n_per_class=3, classes=("cat", "dog"), size=(6, 5), fmt="png", mode="RGB", seed=0):
    from PIL import Image
    rng = np.random.default_rng(seed)
    arrays = {}
    for c in classes:
        os.makedirs(os.path.join(folder, c), exist_ok=True)
        for i in range(n_per_class):
            shape = (size[0], size[1], 3) if mode == "RGB" else size
            a = rng.integers(0, 256, shape, dtype=np.uint8)
            p = os.path.join(folder, c, f"{i}.{fmt}")
            Image.fromarray(a, mode).save(p)
            arrays[p] = a
    return arrays


def test_image_folder_train_test(tmp_path):
    train = write_images(tmp_path / "train", n_per_class=3)
    write_images(tmp_path / "test", n_per_class=1, fmt="jpg", seed=1)
    ds = load_dataset("folder", str(tmp_path))
    assert ds.classes == ["cat", "dog"] and ds.in_chans == 3 and ds.image_size == (6, 5)
    assert ds.train_y.tolist() == [0, 0, 0, 1, 1, 1] and ds.test_y.tolist() == [0, 1]
    png = train[str(tmp_path / "train" / "dog" / "1.png")]
    assert torch.equal(ds.train_x[4], torch.as_tensor(png).permute(2, 0, 1))  # PNG is lossless
    assert ds.flip and ds.augment


def test_image_folder_single_root_split_and_gray(tmp_path):
    write_images(tmp_path, n_per_class=5, classes=("a", "b", "c"), mode="L")
    ds = load_dataset("folder", str(tmp_path))
    assert ds.in_chans == 1 and len(ds.train_y) == 12 and len(ds.test_y) == 3
    assert ds.test_y.tolist() == [0, 1, 2]
    again = load_dataset("folder", str(tmp_path))
    assert torch.equal(ds.test_x, again.test_x)          # deterministic split
    resized = load_dataset("folder", str(tmp_path), image_size=4)
    assert resized.image_size == (4, 4)


def test_image_folder_errors(tmp_path):
    write_images(tmp_path / "train")
    with pytest.raises(FileNotFoundError, match="no test/ folder"):
        load_dataset("folder", str(tmp_path))
    write_images(tmp_path / "test", size=(7, 7))
    with pytest.raises(ValueError, match=r"image_size= \(CLI: --image-size\)"):
        load_dataset("folder", str(tmp_path))
    (tmp_path / "train" / "cat" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n broken")
    with pytest.raises(ValueError, match="cannot read .*broken.png: not a decodable image"):
        load_dataset("folder", str(tmp_path), image_size=6)
    with pytest.raises(ValueError, match="needs data_dir"):
        load_dataset("folder")
    write_images(tmp_path / "single", n_per_class=1)
    with pytest.raises(ValueError, match="too few to split"):
        load_dataset("folder", str(tmp_path / "single"))


# --------------------------------------------------------------------------
# batching and augmentation
# --------------------------------------------------------------------------
def toy(n=50, c=3, h=8, w=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randint(0, 256, (n, c, h, w), dtype=torch.uint8, generator=g)
    y = torch.arange(n) % 7
    return x, y, torch.tensor([0.4, 0.5, 0.6]), torch.tensor([0.2, 0.25, 0.3])


def collect(batches):
    return [(xb.clone(), yb.clone()) for xb, yb in batches]


def test_normalization_and_full_epoch():
    x, y, mean, std = toy()
    b = Batches(x, y, 16, mean, std, shuffle=False, augment=False, drop_last=False)
    out = collect(b)
    assert len(b) == len(out) == 4 and [len(yb) for _, yb in out] == [16, 16, 16, 2]
    xb = torch.cat([o[0] for o in out])
    ref = (x.double() / 255 - mean.double().view(1, 3, 1, 1)) / std.double().view(1, 3, 1, 1)
    assert xb.dtype == torch.float32 and torch.allclose(xb.double(), ref, atol=1e-5)
    # a shuffled epoch visits every sample exactly once, label with its image
    b = Batches(x, y, 16, mean, std, shuffle=True, drop_last=False, seed=3)
    xs, ys = zip(*collect(b))
    xs, ys = torch.cat(xs), torch.cat(ys)
    raw = torch.round((xs * std.view(1, 3, 1, 1) + mean.view(1, 3, 1, 1)) * 255).to(torch.uint8)
    match = [int(torch.nonzero((x == r).flatten(1).all(1))[0]) for r in raw]
    assert sorted(match) == list(range(50)) and torch.equal(ys, y[match])
    assert len(Batches(x, y, 16, mean, std)) == 3           # drop_last by default


def test_crop_flip_matches_per_sample_reference():
    x, *_ = toy(n=20)
    g = torch.Generator().manual_seed(0)
    pad = 3
    top, left = torch.randint(0, 2 * pad + 1, (20,), generator=g), torch.randint(0, 2 * pad + 1, (20,), generator=g)
    flip = torch.rand(20, generator=g) < 0.5
    out = crop_flip(x, pad, top, left, flip)
    for i in range(20):
        crop = F.pad(x[i], (pad,) * 4)[:, top[i]:top[i] + 8, left[i]:left[i] + 8]
        assert torch.equal(out[i], crop.flip(-1) if flip[i] else crop)
    assert torch.equal(crop_flip(x, 0, torch.zeros(20, dtype=torch.long), torch.zeros(20, dtype=torch.long)), x)


def test_augmentation_crop_only_without_flip():
    x, y, mean, std = toy(n=64, c=1, h=8, w=8)
    x = x[:, :1]
    b = Batches(x, y[:64], 64, [0.0], [1.0], shuffle=False, augment=True, pad=2, flip=False, seed=1)
    top, left, flip = b.plan(0)[1]
    assert flip is None and top.min() >= 0 and top.max() <= 4 and len(set(top.tolist())) > 1
    xb, _ = next(iter(b))
    ref = crop_flip(x, 2, top, left)
    assert torch.allclose(xb, ref.float() / 255, atol=1e-6)


def test_epochs_are_reproducible_and_differ():
    x, y, mean, std = toy()
    mk = lambda **kw: Batches(x, y, 8, mean, std, augment=True, seed=5, **kw)
    a, b = mk(), mk()
    a.set_epoch(2)
    b.set_epoch(2)
    ea, eb = collect(a), collect(b)
    assert all(torch.equal(p[0], q[0]) and torch.equal(p[1], q[1]) for p, q in zip(ea, eb))
    assert a.epoch == 3                                     # a finished pass advances the epoch
    e3 = collect(a)
    assert not torch.equal(e3[0][0], ea[0][0])
    other = Batches(x, y, 8, mean, std, augment=True, generator=torch.Generator().manual_seed(6))
    assert other.seed == 6


def test_skip_resumes_mid_epoch_exactly():
    x, y, mean, std = toy()
    full = Batches(x, y, 8, mean, std, augment=True, seed=1)
    full.set_epoch(4)
    want = collect(full)
    resumed = Batches(x, y, 8, mean, std, augment=True, seed=1)
    resumed.set_epoch(4)
    got = collect(resumed.skip(2))
    assert len(got) == len(want) - 2
    assert all(torch.equal(p[0], q[0]) and torch.equal(p[1], q[1]) for p, q in zip(got, want[2:]))
    with pytest.raises(ValueError, match="skip needs 0 <= k <= 6"):
        resumed.skip(7)


@pytest.mark.parametrize("drop_last", [True, False])
def test_ranks_see_the_global_batches(drop_last):
    x, y, mean, std = toy(n=53)
    one = Batches(x, y, 12, mean, std, augment=True, seed=2, drop_last=drop_last)
    one.set_epoch(1)
    ranks = []
    for r in range(3):
        b = Batches(x, y, 4, mean, std, augment=True, seed=2, drop_last=drop_last, rank=r, world_size=3)
        b.set_epoch(1)
        assert len(b) == len(one)
        ranks.append(collect(b))
    for i, (xg, yg) in enumerate(collect(one)):
        assert torch.equal(torch.cat([ranks[r][i][0] for r in range(3)]), xg)
        assert torch.equal(torch.cat([ranks[r][i][1] for r in range(3)]), yg)


def test_dataset_batches_helper_and_bad_arguments():
    ds = load_dataset("digits")
    train, test = ds.batches("train", 100), ds.batches("test", 100)
    assert train.augment and not train.flip and train.pad == 1 and len(train) == 14
    assert not test.augment and not test.shuffle and len(test) == 4
    x, y, mean, std = toy()
    with pytest.raises(ValueError, match="batch_size"):
        Batches(x, y, 0, mean, std)
    with pytest.raises(ValueError, match="rank"):
        Batches(x, y, 4, mean, std, rank=2, world_size=2)
    with pytest.raises(ValueError, match="uint8"):
        Batches(x.float(), y, 4, mean, std)
    with pytest.raises(ValueError, match="one per channel"):
        Batches(x, y, 4, [0.1, 0.2], std)


def test_cli_data_command(tmp_path, capsys):
    from normfree.cli import main
    assert main(["data"]) == 0
    assert "cifar10" in capsys.readouterr().out
    assert main(["data", "digits"]) == 0
    assert "1437 train / 360 test" in capsys.readouterr().out
    assert main(["data", "cifar10", "--data-dir", str(tmp_path)]) == 2
    assert "--download" in capsys.readouterr().err
