"""Image classification data sets held in memory as uint8 tensors, and fast
batching with augmentation done by tensor ops on whole batches.

Data sets (``load_dataset(name, data_dir, download)``, names in ``DATASETS``):

* ``digits`` (default): scikit-learn's 8x8 handwritten digits (1,797 real
  images, 10 classes), shipped inside normfree (``normfree/resources/digits.npz``,
  45 KB; source and license in ``resources/README.md``), so it needs no download.
  Fixed split: a seed-0 permutation, the first 1,437 images train, the last
  360 test. Pixels 0..16 are mapped to uint8 as round(v * 255 / 16).
* ``mnist`` / ``fashion_mnist``: the original idx files
  (``train-images-idx3-ubyte`` ... ``t10k-labels-idx1-ubyte``, gzipped or not).
* ``cifar10``: the official python-pickle layout (``cifar-10-batches-py``).
* ``folder``: ``root/train/<class>/*.png|jpg`` and ``root/test/<class>/...``,
  or a single ``root/<class>/...`` split deterministically (seed 0, 20% of
  every class to test), decoded with pillow.

Where files are looked for, in order: ``data_dir/<subfolder>`` and
``data_dir`` itself (``data_dir`` defaults to ``~/.cache/normfree``); for
Fashion-MNIST also ``/usr/share/datasets/fashion-mnist`` (Debian package
``dataset-fashion-mnist``). With ``download=True`` missing files are fetched
from the official URLs into ``data_dir/<subfolder>``, written atomically and
checked against their published md5.

Batching (:class:`Batches`): the order and the augmentation of epoch ``e``
are drawn from a ``torch.Generator`` seeded with ``mix_seed(seed, e)`` (a
SHA-256 of both), for the whole epoch at once and indexed by position in the
epoch. So an epoch is a pure function of (seed, epoch): resuming at batch k
(``skip(k)``) and splitting every global batch across ranks give exactly the
batches of one uninterrupted single-process run.
"""
from __future__ import annotations

import difflib
import errno
import gzip
import hashlib
import importlib.resources
import math
import os
import pickle
import shutil
import struct
import tarfile
import tempfile
import urllib.error
import urllib.request
from dataclasses import dataclass
from typing import Dict, Iterator, List, Optional, Sequence, Tuple, Union

import numpy as np
import torch
import torch.nn.functional as F

DATASETS: Dict[str, str] = {
    "digits": "scikit-learn 8x8 digits (built in, no download): 1,437 train / 360 test, 1x8x8, 10 classes",
    "mnist": "MNIST idx files: 60,000 train / 10,000 test, 1x28x28, 10 classes",
    "fashion_mnist": "Fashion-MNIST idx files: 60,000 train / 10,000 test, 1x28x28, 10 classes",
    "cifar10": "CIFAR-10 python pickles (cifar-10-batches-py): 50,000 train / 10,000 test, 3x32x32, 10 classes",
    "folder": "image folder root/[train|test]/<class>/*.png|jpg (pillow)",
}

#: where a data set's files go below ``data_dir`` (the first is used for downloads)
SUBDIRS: Dict[str, Tuple[str, ...]] = {
    "mnist": ("mnist", "MNIST/raw"),
    "fashion_mnist": ("fashion-mnist", "fashion_mnist", "FashionMNIST/raw"),
    "cifar10": ("cifar-10-batches-py",),
}

#: system-wide folders searched after ``data_dir``
SYSTEM_DIRS: Dict[str, Tuple[str, ...]] = {
    "fashion_mnist": ("/usr/share/datasets/fashion-mnist",),
}

IDX_FILES = ("train-images-idx3-ubyte", "train-labels-idx1-ubyte",
             "t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")

MNIST_CLASSES = [str(i) for i in range(10)]
FASHION_MNIST_CLASSES = ["T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
                         "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot"]
CIFAR10_CLASSES = ["airplane", "automobile", "bird", "cat", "deer",
                   "dog", "frog", "horse", "ship", "truck"]
CIFAR10_BATCHES = tuple(f"data_batch_{i}" for i in range(1, 6)) + ("test_batch",)
IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg")

#: the largest idx payload read (MNIST's biggest file holds 47 MB): a header
#: asking for more is refused before anything is read or allocated
MAX_IDX_BYTES = 2 ** 33
#: the largest image side that ``image_size`` may ask for
MAX_IMAGE_SIZE = 4096


class UnreadableFile(ValueError):
    """A data file that cannot be decoded: the message is "cannot read FILE: reason"."""

    def __init__(self, path: str, reason: str):
        super().__init__(f"cannot read {path}: {reason}")
        self.path, self.reason = path, reason


def _reason(e: BaseException) -> str:
    text = str(e).strip()
    return f"{type(e).__name__}: {text}" if text else type(e).__name__


@dataclass(frozen=True)
class Remote:
    """A file to download: its name, published md5 and mirror URLs (tried in order)."""

    filename: str
    md5: str
    urls: Tuple[str, ...]


def _mirrored(files: Sequence[Tuple[str, str]], mirrors: Sequence[str]) -> List[Remote]:
    return [Remote(f, md5, tuple(m + f for m in mirrors)) for f, md5 in files]


#: official download locations and md5s (the ones torchvision also uses)
SOURCES: Dict[str, List[Remote]] = {
    "mnist": _mirrored([("train-images-idx3-ubyte.gz", "f68b3c2dcbeaaa9fbdd348bbdeb94873"),
                        ("train-labels-idx1-ubyte.gz", "d53e105ee54ea40749a09fcbcd1e9432"),
                        ("t10k-images-idx3-ubyte.gz", "9fb629c4189551a2d022fa330f9573f3"),
                        ("t10k-labels-idx1-ubyte.gz", "ec29112dd5afa0611ce80d1b7f02629c")],
                       ["https://ossci-datasets.s3.amazonaws.com/mnist/",
                        "http://yann.lecun.com/exdb/mnist/"]),
    "fashion_mnist": _mirrored([("train-images-idx3-ubyte.gz", "8d4fb7e6c68d591d4c3dfef9ec88bf0d"),
                                ("train-labels-idx1-ubyte.gz", "25c81989df183df01b3e8a0aad5dffbe"),
                                ("t10k-images-idx3-ubyte.gz", "bef4ecab320f06d8554ea6380940ec79"),
                                ("t10k-labels-idx1-ubyte.gz", "bb300cfdad3c16e7a12a480ee83cd310")],
                               ["http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/",
                                "https://raw.githubusercontent.com/zalandoresearch/fashion-mnist/master/data/fashion/"]),
    "cifar10": [Remote("cifar-10-python.tar.gz", "c58f30108f718f92721af3b95e74349a",
                       ("https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz",))],
}


def default_data_dir() -> str:
    """Where data sets live when no ``data_dir`` is given: ``~/.cache/normfree``."""
    return os.path.join(os.path.expanduser("~"), ".cache", "normfree")


# --------------------------------------------------------------------------
# the data set
# --------------------------------------------------------------------------
@dataclass
class Dataset:
    """A classification data set in memory.

    ``train_x`` / ``test_x``: uint8 [N, C, H, W]; ``train_y`` / ``test_y``:
    int64 [N]. ``mean`` / ``std``: per-channel float32 statistics of the train
    split on the [0, 1] pixel scale; :class:`Batches` returns
    ``(x / 255 - mean) / std``. ``augment``, ``pad`` and ``flip``: the
    training augmentation that suits the data (random crop with ``pad``
    zero pixels; horizontal flips only for natural images, not digits).
    """

    name: str
    classes: List[str]
    train_x: torch.Tensor
    train_y: torch.Tensor
    test_x: torch.Tensor
    test_y: torch.Tensor
    mean: torch.Tensor
    std: torch.Tensor
    augment: bool
    pad: int
    flip: bool
    source: str = ""

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    @property
    def in_chans(self) -> int:
        return int(self.train_x.shape[1])

    @property
    def image_size(self) -> Tuple[int, int]:
        return int(self.train_x.shape[2]), int(self.train_x.shape[3])

    def batches(self, split: str = "train", batch_size: int = 128, **options) -> "Batches":
        """:class:`Batches` over ``split`` ("train" or "test") with this data set's
        normalization and augmentation: train shuffles, augments (crop by
        ``self.pad``, flip if ``self.flip``) and drops the last partial batch;
        test does none of these. ``options`` override any :class:`Batches` argument."""
        if split not in ("train", "test"):
            raise ValueError(f"split must be 'train' or 'test', got {split!r}")
        train = split == "train"
        x, y = (self.train_x, self.train_y) if train else (self.test_x, self.test_y)
        kw = dict(shuffle=train, augment=train and self.augment, pad=self.pad, flip=self.flip, drop_last=train)
        kw.update(options)
        return Batches(x, y, batch_size, self.mean, self.std, **kw)

    def summary(self) -> str:
        """A few lines describing the data set (for ``normfree data NAME``)."""
        c, (h, w) = self.in_chans, self.image_size
        fmt = lambda t: "[" + ", ".join(f"{v:.4f}" for v in t.tolist()) + "]"
        names = ", ".join(self.classes[:12]) + (", ..." if self.num_classes > 12 else "")
        return "\n".join([
            f"{self.name}: {len(self.train_y)} train / {len(self.test_y)} test images, {c}x{h}x{w} uint8",
            f"source: {self.source}",
            f"classes ({self.num_classes}): {names}",
            f"train mean {fmt(self.mean)}, std {fmt(self.std)} (pixels / 255)",
            f"augmentation: " + (f"random crop (pad {self.pad})" + (" + horizontal flip" if self.flip else "")
                                 if self.augment else "none"),
        ])

    def __repr__(self) -> str:
        c, (h, w) = self.in_chans, self.image_size
        return (f"Dataset({self.name!r}, train={len(self.train_y)}, test={len(self.test_y)}, "
                f"shape={c}x{h}x{w}, classes={self.num_classes}, source={self.source!r})")


def channel_stats(x: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """Per-channel mean and (population) std of uint8 images [N, C, H, W] on the
    [0, 1] scale, exactly, from a 256-bin histogram per channel (no float copy)."""
    values = torch.arange(256, dtype=torch.float64) / 255.0
    means, stds = [], []
    for c in range(x.shape[1]):
        hist = torch.bincount(x[:, c].reshape(-1), minlength=256).to(torch.float64)
        p = hist / hist.sum()
        m = (p * values).sum()
        var = (p * (values - m) ** 2).sum()
        means.append(m)
        stds.append(var.sqrt())
    std = torch.stack(stds).clamp_min(1e-3)  # a constant channel must not divide by 0
    return torch.stack(means).float(), std.float()


def default_pad(image_size: Tuple[int, int]) -> int:
    """Crop padding that scales with the image: 4 for 32x32 and 28x28, 1 for 8x8."""
    return max(1, int(round(min(image_size) / 8)))


def _make(name, classes, train, test, augment, flip, source) -> Dataset:
    (xtr, ytr), (xte, yte) = train, test
    xtr, xte = torch.as_tensor(xtr).contiguous(), torch.as_tensor(xte).contiguous()
    ytr, yte = torch.as_tensor(ytr).long(), torch.as_tensor(yte).long()
    for split, y in (("train", ytr), ("test", yte)):
        if len(y) and (int(y.min()) < 0 or int(y.max()) >= len(classes)):
            raise ValueError(f"{source}: {split} labels must lie in [0, {len(classes)}), "
                             f"found {int(y.min())}..{int(y.max())}")
    mean, std = channel_stats(xtr)
    return Dataset(name, list(classes), xtr, ytr, xte, yte, mean, std, augment,
                   default_pad(tuple(xtr.shape[2:])), flip, source)


def _canonical(name: str) -> str:
    if not isinstance(name, str):
        raise TypeError(f"dataset name must be a string, got {type(name).__name__}")
    key = name.lower().replace("-", "_")
    key = {"fashionmnist": "fashion_mnist", "cifar_10": "cifar10", "imagefolder": "folder"}.get(key, key)
    if key not in DATASETS:
        close = difflib.get_close_matches(key, list(DATASETS), n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        raise ValueError(f"unknown dataset {name!r}{hint}; allowed: {list(DATASETS)}")
    return key


def load_dataset(name: str = "digits", data_dir: Optional[str] = None, download: bool = False, *,
                 image_size: Optional[Union[int, Tuple[int, int]]] = None) -> Dataset:
    """Load data set ``name`` (see ``DATASETS``) into memory.

    Args:
        name: "digits" (default, built in), "mnist", "fashion_mnist", "cifar10", "folder".
        data_dir: where the files are (see the module docstring); required for "folder".
        download: fetch missing MNIST / Fashion-MNIST / CIFAR-10 files from the
            official URLs (md5-checked) into ``data_dir``.
        image_size: "folder" only: resize every image to this (H, W) (or H = W);
            without it all images must already have the same size.
    """
    key = _canonical(name)
    if image_size is not None and key != "folder":
        raise ValueError(f"image_size applies to the 'folder' dataset only, not {key!r}")
    if key == "digits":
        return load_digits()
    if key == "folder":
        if data_dir is None:
            raise ValueError("the 'folder' dataset needs data_dir (CLI: --data-dir): a folder with "
                             "train/<class>/*.png|jpg and test/<class>/..., or just <class>/*.png|jpg")
        return load_image_folder(data_dir, image_size=image_size)
    root = os.path.expanduser(data_dir) if data_dir is not None else default_data_dir()
    if key == "cifar10":
        return load_cifar10(root, download)
    return load_idx_dataset(key, root, download)


# --------------------------------------------------------------------------
# digits (built in)
# --------------------------------------------------------------------------
def load_digits(test_size: int = 360, seed: int = 0) -> Dataset:
    """scikit-learn's 8x8 digits (the UCI optical digits test set, 1,797 images,
    CC BY 4.0), read from the copy shipped in ``normfree/resources/digits.npz``
    (the same arrays as ``sklearn.datasets.load_digits``, which is not needed),
    split by a seeded permutation into 1,437 train and 360 test images."""
    path = importlib.resources.files("normfree") / "resources" / "digits.npz"
    with path.open("rb") as fh, np.load(fh) as f:
        images, target = f["images"], f["target"]
    x = np.rint(images * (255.0 / 16.0)).clip(0, 255).astype(np.uint8)[:, None]
    y = target.astype(np.int64)
    order = np.random.default_rng(seed).permutation(len(y))
    tr, te = order[:-test_size], order[-test_size:]
    return _make("digits", [str(i) for i in range(10)], (x[tr], y[tr]), (x[te], y[te]),
                 augment=True, flip=False, source="normfree/resources/digits.npz (sklearn.datasets.load_digits)")


# --------------------------------------------------------------------------
# downloads
# --------------------------------------------------------------------------
def file_md5(path: str) -> str:
    h = hashlib.md5(usedforsecurity=False)
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def fetch(remote: Remote, folder: str, timeout: float = 60.0) -> str:
    """Fetch ``remote`` into ``folder`` atomically (temporary file, md5 check,
    rename) and return its path. Mirrors are tried in order.

    Raises ValueError naming the file and the expected / actual md5 when the
    content is wrong, FileNotFoundError saying where to put the file by hand
    when no mirror can be reached.
    """
    os.makedirs(folder, exist_ok=True)
    dest = os.path.join(folder, remote.filename)
    failures, bad_sums = [], []
    for url in remote.urls:
        fd, tmp = tempfile.mkstemp(prefix=remote.filename + ".", suffix=".part", dir=folder)
        try:
            h = hashlib.md5(usedforsecurity=False)
            with os.fdopen(fd, "wb") as out, urllib.request.urlopen(url, timeout=timeout) as resp:
                for chunk in iter(lambda: resp.read(1 << 20), b""):
                    h.update(chunk)
                    out.write(chunk)
            actual = h.hexdigest()
            if actual == remote.md5:
                os.replace(tmp, dest)
                return dest
            bad_sums.append(f"{url}: expected md5 {remote.md5}, got {actual}")
        except (urllib.error.URLError, OSError, ValueError) as e:
            failures.append(f"{url}: {getattr(e, 'reason', e)}")
        finally:
            if os.path.exists(tmp):
                os.remove(tmp)
    if bad_sums:
        raise ValueError(f"checksum mismatch for {remote.filename} (not saved to {dest}): "
                         + "; ".join(bad_sums))
    raise FileNotFoundError(
        f"could not download {remote.filename} ({'; '.join(failures)}). Without network, fetch it "
        f"by hand from {remote.urls[0]} (md5 {remote.md5}) and put it at {dest}")


# --------------------------------------------------------------------------
# MNIST / Fashion-MNIST (idx)
# --------------------------------------------------------------------------
def read_idx(path: str) -> np.ndarray:
    """Read an idx file of unsigned bytes (magic 0x00000803 images,
    0x00000801 labels; gzipped if the name ends in .gz) and check its size.
    The header is read first and the payload only up to the size it states,
    so neither a lying header nor a decompression bomb can exhaust memory.
    Any failure raises :class:`UnreadableFile` ("cannot read PATH: reason")."""
    opener = gzip.open if path.endswith(".gz") else open
    again = "delete it and fetch it again"
    try:
        with opener(path, "rb") as fh:
            magic = fh.read(4)
            if len(magic) < 4 or magic[:2] != b"\x00\x00" or magic[2] != 0x08 or not 1 <= magic[3] <= 4:
                raise UnreadableFile(path, f"not an idx file of unsigned bytes (first bytes {magic.hex() or 'none'}, "
                                           f"expected 000008 then the number of dimensions)")
            ndim = magic[3]
            raw = fh.read(4 * ndim)
            if len(raw) < 4 * ndim:
                raise UnreadableFile(path, f"truncated idx header ({4 + len(raw)} bytes); {again}")
            dims = struct.unpack(f">{ndim}I", raw)
            expected = math.prod(dims)
            if expected > MAX_IDX_BYTES:
                raise UnreadableFile(path, f"its idx header asks for {dims} = {expected} bytes, more than the "
                                           f"{MAX_IDX_BYTES} allowed: corrupt or not a data set file")
            data = bytearray()
            while len(data) <= expected:  # one byte more than the header says tells a too long file
                chunk = fh.read(min(1 << 24, expected + 1 - len(data)))
                if not chunk:
                    break
                data += chunk
    except UnreadableFile:
        raise
    except Exception as e:  # OSError, gzip.BadGzipFile, EOFError, zlib.error, ...: any decoder failure
        raise UnreadableFile(path, f"corrupt or truncated ({_reason(e)}); {again}") from None
    if len(data) != expected:
        found = f"{len(data)}" if len(data) < expected else f"more than {expected}"
        raise UnreadableFile(path, f"truncated or corrupt idx file: its header says {dims} "
                                   f"({expected} bytes of data), the file holds {found}; {again}")
    return np.frombuffer(bytes(data), dtype=np.uint8).reshape(dims).copy()


def _find_idx(folder: str) -> Dict[str, Optional[str]]:
    """Each idx file's path in ``folder`` (.gz preferred) or None."""
    found = {}
    for base in IDX_FILES:
        found[base] = next((os.path.join(folder, base + ext) for ext in (".gz", "")
                            if os.path.isfile(os.path.join(folder, base + ext))), None)
    return found


def _search_dirs(key: str, root: str) -> List[str]:
    dirs = [os.path.join(root, sub) for sub in SUBDIRS[key]] + [root]
    return dirs + list(SYSTEM_DIRS.get(key, ()))


def _pretty(key: str) -> str:
    return {"mnist": "MNIST", "fashion_mnist": "Fashion-MNIST", "cifar10": "CIFAR-10"}[key]


def load_idx_dataset(key: str, root: str, download: bool = False) -> Dataset:
    """MNIST or Fashion-MNIST from the four idx files (see ``IDX_FILES``)."""
    partial = None
    for folder in _search_dirs(key, root):
        found = _find_idx(folder)
        if all(found.values()):
            return _idx_from(key, found, folder)
        if any(found.values()) and partial is None:
            partial = (folder, found)
    if partial is not None and not download:
        folder, found = partial
        missing = [b for b, p in found.items() if p is None]
        raise FileNotFoundError(f"{_pretty(key)} in {folder} is incomplete: missing "
                                f"{', '.join(os.path.join(folder, m + '.gz') for m in missing)} "
                                f"(gzipped or not); pass download=True (CLI: --download) to fetch them")
    target = os.path.join(root, SUBDIRS[key][0])
    if not download:
        names = ", ".join(b + ".gz" for b in IDX_FILES)
        raise FileNotFoundError(
            f"{_pretty(key)} not found: expected {names} (gzipped or not) in {target} "
            f"(also searched: {', '.join(d for d in _search_dirs(key, root) if d != target)}). "
            f"Pass download=True (CLI: --download) to fetch them, or download them by hand "
            f"from {os.path.dirname(SOURCES[key][0].urls[0])}/ into {target}")
    found = _find_idx(target)
    for remote in SOURCES[key]:
        base = remote.filename[:-3] if remote.filename.endswith(".gz") else remote.filename
        if found.get(base) is None:
            found[base] = fetch(remote, target)
    return _idx_from(key, found, target)


def _idx_from(key: str, files: Dict[str, str], folder: str) -> Dataset:
    arrays = {b: read_idx(p) for b, p in files.items()}
    splits = []
    for split in ("train", "t10k"):
        ipath, lpath = files[f"{split}-images-idx3-ubyte"], files[f"{split}-labels-idx1-ubyte"]
        x, y = arrays[f"{split}-images-idx3-ubyte"], arrays[f"{split}-labels-idx1-ubyte"]
        if x.ndim != 3:
            raise ValueError(f"{ipath}: expected images of shape (N, H, W), got {x.shape}")
        if y.ndim != 1:
            raise ValueError(f"{lpath}: expected labels of shape (N,), got {y.shape}")
        if len(x) != len(y):
            raise ValueError(f"{ipath} holds {len(x)} images but {lpath} holds {len(y)} labels")
        splits.append((x[:, None], y.astype(np.int64)))
    classes = MNIST_CLASSES if key == "mnist" else FASHION_MNIST_CLASSES
    return _make(key, classes, splits[0], splits[1], augment=True, flip=False, source=folder)


# --------------------------------------------------------------------------
# CIFAR-10 (python pickles)
# --------------------------------------------------------------------------
def _numpy_globals() -> Dict[Tuple[str, str], object]:
    try:
        from numpy._core import multiarray, numeric
        core = "numpy._core"
    except ImportError:  # numpy < 2
        from numpy.core import multiarray, numeric
        core = "numpy.core"
    allowed = {}
    for mod in {core, "numpy.core", "numpy._core"}:
        allowed[(f"{mod}.multiarray", "_reconstruct")] = multiarray._reconstruct
        allowed[(f"{mod}.multiarray", "scalar")] = multiarray.scalar
        allowed[(f"{mod}.numeric", "_frombuffer")] = numeric._frombuffer
    allowed[("numpy", "ndarray")] = np.ndarray
    allowed[("numpy", "dtype")] = np.dtype
    import _codecs

    allowed[("_codecs", "encode")] = _codecs.encode  # bytes in protocol-2 pickles
    return allowed


class _RestrictedUnpickler(pickle.Unpickler):
    """Unpickles dicts, lists, strings, bytes, numbers and numpy arrays only:
    any other global (the way a pickle runs code) is refused."""

    allowed = _numpy_globals()

    def find_class(self, module, name):
        try:
            return self.allowed[(module, name)]
        except KeyError:
            raise pickle.UnpicklingError(f"refusing to load global {module}.{name}: only numpy "
                                         f"arrays and builtin containers are allowed") from None


def load_cifar_pickle(path: str) -> dict:
    """Load one CIFAR-10 batch file (a pickle, the data set's documented format).

    Only these files are unpickled, and with a restricted Unpickler that
    accepts nothing but builtin containers, bytes, numbers and numpy arrays
    (numpy's array-reconstruct functions), so a tampered file cannot run code.
    Python-2 pickles (the official files) are read with latin-1 strings; keys
    come back as ``str``.
    """
    try:
        with open(path, "rb") as fh:
            obj = _RestrictedUnpickler(fh, encoding="latin1").load()
    except FileNotFoundError:
        raise
    except pickle.UnpicklingError as e:
        raise UnreadableFile(path, f"not a CIFAR-10 batch: {e}") from None
    except Exception as e:  # anything a hostile pickle can make the unpickler raise
        raise UnreadableFile(path, f"not a CIFAR-10 batch (corrupt or truncated?): {_reason(e)}") from None
    if not isinstance(obj, dict):
        raise UnreadableFile(path, f"not a CIFAR-10 batch: expected a dict, the pickle holds a {type(obj).__name__}")
    return {(k.decode("latin1") if isinstance(k, bytes) else k): v for k, v in obj.items()}


def _cifar_batch(path: str) -> Tuple[np.ndarray, np.ndarray]:
    d = load_cifar_pickle(path)
    if "data" not in d or "labels" not in d:
        raise UnreadableFile(path, f"a CIFAR-10 batch needs keys 'data' and 'labels', found {sorted(map(str, d))}")
    try:
        x, y = np.asarray(d["data"]), np.asarray(d["labels"], dtype=np.int64)
    except (TypeError, ValueError, OverflowError) as e:
        raise UnreadableFile(path, f"its 'data' or 'labels' are not arrays ({_reason(e)})") from None
    if x.dtype != np.uint8 or x.ndim != 2 or x.shape[1] != 3072:
        raise UnreadableFile(path, f"'data' must be uint8 of shape (N, 3072), got {x.dtype} {x.shape}")
    if y.shape != (len(x),):
        raise UnreadableFile(path, f"{len(x)} images but labels of shape {y.shape}")
    return x.reshape(-1, 3, 32, 32), y


def _cifar_dir(root: str) -> Optional[str]:
    for d in (os.path.join(root, "cifar-10-batches-py"), root):
        if os.path.isdir(d) and any(os.path.exists(os.path.join(d, f)) for f in CIFAR10_BATCHES):
            return d
    return None


def extract_tar(archive: str, dest: str) -> None:
    """Extract ``archive`` into ``dest`` refusing links and paths that leave ``dest``."""
    try:
        with tarfile.open(archive) as tar:
            members = tar.getmembers()
            for m in members:
                target = os.path.realpath(os.path.join(dest, m.name))
                if not (m.isfile() or m.isdir()) or not target.startswith(os.path.realpath(dest) + os.sep):
                    raise UnreadableFile(archive, f"refusing unsafe member {m.name!r} (a link, or a path "
                                                  f"leaving {dest})")
            tmp = tempfile.mkdtemp(prefix=".extract-", dir=dest)
            try:
                if hasattr(tarfile, "data_filter"):
                    tar.extractall(tmp, members=members, filter="data")
                else:
                    tar.extractall(tmp, members=members)
                for top in os.listdir(tmp):
                    final = os.path.join(dest, top)
                    if os.path.exists(final):
                        shutil.rmtree(final) if os.path.isdir(final) else os.remove(final)
                    os.replace(os.path.join(tmp, top), final)
            finally:
                shutil.rmtree(tmp, ignore_errors=True)
    except UnreadableFile:
        raise
    except OSError as e:
        if e.filename is not None and e.errno in (errno.ENOSPC, errno.EDQUOT, errno.EACCES, errno.EROFS):
            raise  # a problem of the destination, not of the archive: the command names it
        raise UnreadableFile(archive, f"corrupt or truncated archive ({_reason(e)}); delete it and fetch it "
                                      f"again") from None
    except Exception as e:  # tarfile.TarError, EOFError, zlib.error, lzma/bz2 errors, ...
        raise UnreadableFile(archive, f"corrupt or truncated archive ({_reason(e)}); delete it and fetch it "
                                      f"again") from None


def load_cifar10(root: str, download: bool = False) -> Dataset:
    """CIFAR-10 from ``root/cifar-10-batches-py`` (or ``root`` itself): the five
    ``data_batch_*`` files for train, ``test_batch`` for test, class names from
    ``batches.meta``. If only the official archive ``cifar-10-python.tar.gz`` is
    in ``root`` it is md5-checked and extracted; ``download=True`` fetches it."""
    remote = SOURCES["cifar10"][0]
    folder = _cifar_dir(root)
    if folder is None:
        archive = os.path.join(root, remote.filename)
        if not os.path.isfile(archive):
            if not download:
                raise FileNotFoundError(
                    f"CIFAR-10 not found: expected {os.path.join(root, 'cifar-10-batches-py', 'data_batch_1')} "
                    f"(... data_batch_5, test_batch) or the archive {archive}. Pass download=True "
                    f"(CLI: --download) to fetch it, or download {remote.urls[0]} (md5 {remote.md5}) "
                    f"by hand into {root}")
            archive = fetch(remote, root)
        else:
            actual = file_md5(archive)
            if actual != remote.md5:
                raise ValueError(f"checksum mismatch for {archive}: expected md5 {remote.md5}, got {actual}; "
                                 f"delete it and fetch it again")
        extract_tar(archive, root)
        folder = _cifar_dir(root)
        if folder is None:
            raise ValueError(f"{archive} did not contain cifar-10-batches-py/data_batch_1 ... test_batch")
    missing = [f for f in CIFAR10_BATCHES if not os.path.isfile(os.path.join(folder, f))]
    if missing:
        raise FileNotFoundError(f"CIFAR-10 in {folder} is incomplete: missing "
                                f"{', '.join(os.path.join(folder, m) for m in missing)}")
    parts = [_cifar_batch(os.path.join(folder, f)) for f in CIFAR10_BATCHES]
    train = (np.concatenate([p[0] for p in parts[:5]]), np.concatenate([p[1] for p in parts[:5]]))
    classes = CIFAR10_CLASSES
    meta = os.path.join(folder, "batches.meta")
    if os.path.isfile(meta):
        names = load_cifar_pickle(meta).get("label_names")
        if names:
            classes = [n.decode() if isinstance(n, bytes) else str(n) for n in names]
    return _make("cifar10", classes, train, parts[5], augment=True, flip=True, source=folder)


# --------------------------------------------------------------------------
# image folders
# --------------------------------------------------------------------------
def _list_images(root: str) -> Dict[str, List[str]]:
    if not os.path.isdir(root):
        raise FileNotFoundError(f"image folder {root} does not exist")
    out = {}
    for cls in sorted(os.listdir(root)):
        d = os.path.join(root, cls)
        if cls.startswith(".") or not os.path.isdir(d):
            continue
        files = sorted(os.path.join(d, f) for f in os.listdir(d)
                       if f.lower().endswith(IMAGE_EXTENSIONS) and not f.startswith("."))
        if files:
            out[cls] = files
    return out


def _decode(paths: List[str], size: Optional[Tuple[int, int]], gray: bool) -> np.ndarray:
    from PIL import Image

    arrays, first = [], None
    for p in paths:
        try:
            with Image.open(p) as im:
                im = im.convert("L" if gray else "RGB")
                if size is not None and im.size != (size[1], size[0]):
                    im = im.resize((size[1], size[0]), Image.BILINEAR)
                a = np.asarray(im, dtype=np.uint8)
        except Exception as e:  # UnidentifiedImageError, OSError, DecompressionBombError, SyntaxError, ...
            raise UnreadableFile(p, f"not a decodable image ({_reason(e)})") from None
        if first is None:
            first = (p, a.shape)
        elif a.shape != first[1]:
            raise ValueError(f"{p} is {a.shape[1]}x{a.shape[0]} but {first[0]} is {first[1][1]}x{first[1][0]}: "
                             f"all images must have one size; resize them with image_size= "
                             f"(CLI: --image-size)")
        arrays.append(a[None] if gray else a.transpose(2, 0, 1))
    return np.stack(arrays)


def _all_gray(paths: List[str]) -> bool:
    from PIL import Image

    for p in paths:
        try:
            with Image.open(p) as im:
                if im.mode not in ("L", "1", "I;16", "I"):
                    return False
        except Exception as e:  # UnidentifiedImageError, OSError, DecompressionBombError, ...
            raise UnreadableFile(p, f"not a decodable image ({_reason(e)})") from None
    return True


def load_image_folder(root: str, image_size: Optional[Union[int, Tuple[int, int]]] = None,
                      test_fraction: float = 0.2, seed: int = 0) -> Dataset:
    """Images in ``root/train/<class>/`` and ``root/test/<class>/`` (or in
    ``root/<class>/``, split per class by a seed-``seed`` permutation with
    ``test_fraction`` of each class, at least one image, to test). Classes are
    the sorted sub-folder names; grayscale if every image is, else RGB."""
    root = os.path.expanduser(root)
    size = (image_size, image_size) if isinstance(image_size, int) else image_size
    if size is not None and not (isinstance(size, (tuple, list)) and len(size) == 2 and all(
            isinstance(s, int) and not isinstance(s, bool) and 0 < s <= MAX_IMAGE_SIZE for s in size)):
        raise ValueError(f"image_size must be an int or (H, W) in [1, {MAX_IMAGE_SIZE}], got {image_size!r}")
    if os.path.isdir(os.path.join(root, "train")):
        train = _list_images(os.path.join(root, "train"))
        test_dir = os.path.join(root, "test")
        if not os.path.isdir(test_dir):
            raise FileNotFoundError(f"{root} has train/ but no test/ folder ({test_dir}): add one, or "
                                    f"put the class folders directly in {root} to split automatically")
        test = _list_images(test_dir)
        if not train:
            raise FileNotFoundError(f"no images (*.png, *.jpg) in {os.path.join(root, 'train')}/<class>/")
        unknown = sorted(set(test) - set(train))
        if unknown:
            raise ValueError(f"{test_dir} has classes {unknown} that {os.path.join(root, 'train')} lacks")
        if not test:
            raise FileNotFoundError(f"no images (*.png, *.jpg) in {test_dir}/<class>/")
    else:
        if os.path.isdir(os.path.join(root, "test")):
            raise FileNotFoundError(f"{root} has test/ but no train/ folder")
        found = _list_images(root)
        if not found:
            raise FileNotFoundError(f"no images in {root}: expected {root}/<class>/*.png|jpg, or "
                                    f"{root}/train/<class>/... and {root}/test/<class>/...")
        if not 0.0 < test_fraction < 1.0:
            raise ValueError(f"test_fraction must be in (0, 1), got {test_fraction!r}")
        rng = np.random.default_rng(seed)
        train, test = {}, {}
        for cls, files in found.items():
            order = rng.permutation(len(files))
            k = max(1, int(round(test_fraction * len(files)))) if len(files) > 1 else 0
            test[cls] = [files[i] for i in sorted(order[:k])]
            train[cls] = [files[i] for i in sorted(order[k:])]
        if not any(test.values()):
            raise ValueError(f"{root}: every class has a single image, too few to split into train and "
                             f"test; add images or use {root}/train/<class>/ and {root}/test/<class>/")
    classes = sorted(train)
    splits = []
    every = [p for d in (train, test) for fs in d.values() for p in fs]
    gray = _all_gray(every)
    for d in (train, test):
        paths = [p for c in classes for p in d.get(c, [])]
        labels = np.array([i for i, c in enumerate(classes) for _ in d.get(c, [])], dtype=np.int64)
        splits.append((_decode(paths, size, gray), labels))
    if splits[0][0].shape[1:] != splits[1][0].shape[1:]:
        raise ValueError(f"train images are {splits[0][0].shape[1:]} but test images "
                         f"{splits[1][0].shape[1:]} in {root}; resize them with image_size= (CLI: --image-size)")
    return _make("folder", classes, splits[0], splits[1], augment=True, flip=True, source=root)


# --------------------------------------------------------------------------
# batching and augmentation
# --------------------------------------------------------------------------
def mix_seed(seed: int, epoch: int) -> int:
    """A 63-bit seed for epoch ``epoch`` of a run seeded ``seed`` (SHA-256 of both),
    the same in every process and Python session."""
    digest = hashlib.sha256(f"normfree:{int(seed)}:{int(epoch)}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)


def crop_flip(x: torch.Tensor, pad: int, top: torch.Tensor, left: torch.Tensor,
              flip: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Random-crop-with-zero-padding and horizontal flip of a whole batch at once.

    Sample i is ``zero_pad(x[i], pad)[:, top[i]:top[i]+H, left[i]:left[i]+W]``,
    mirrored left-right where ``flip[i]``; offsets lie in [0, 2 pad]. One
    ``gather`` on the padded batch, no Python loop over samples.
    """
    b, c, h, w = x.shape
    xp = F.pad(x, (pad, pad, pad, pad)) if pad > 0 else x
    wp = w + 2 * pad
    dev = x.device
    rows = top.to(dev)[:, None] + torch.arange(h, device=dev)                     # [B, H]
    cols = torch.arange(w, device=dev).expand(b, w)
    if flip is not None:
        cols = torch.where(flip.to(dev)[:, None], w - 1 - cols, cols)
    cols = left.to(dev)[:, None] + cols                                           # [B, W]
    index = (rows[:, :, None] * wp + cols[:, None, :]).reshape(b, 1, h * w).expand(b, c, h * w)
    return xp.flatten(2).gather(2, index).view(b, c, h, w)


class Batches:
    """Mini-batches of an in-memory uint8 data set, normalized (and augmented)
    on ``device``: ``for xb, yb in batches`` gives float32 ``(x/255 - mean)/std``
    [B, C, H, W] and int64 labels.

    Reproducibility: epoch ``e`` (``set_epoch(e)``; after a complete pass the
    epoch advances by one by itself) draws its permutation and every sample's
    crop offsets and flip from ``torch.Generator().manual_seed(mix_seed(seed, e))``
    -- for the whole epoch, indexed by position -- so it is a pure function of
    (seed, e). ``skip(k)`` starts the next pass at batch k with exactly the
    batches an uninterrupted pass would give there. A ``generator`` may be
    given instead of ``seed``: its ``initial_seed()`` is used as the seed.

    Distributed: with ``world_size`` W each global batch holds
    ``batch_size * W`` samples of the shared permutation and rank r takes
    slice r, so W ranks at batch B/W see the global batches of one process at
    batch B. Without ``drop_last`` the last, partial global batch is split as
    evenly as possible (a rank's share may be empty); every rank yields the
    same number of batches (``len(batches)``).

    Augmentation (``augment=True``): random crop after zero-padding by ``pad``
    pixels (default :func:`default_pad`) and, if ``flip``, a horizontal flip
    with probability 1/2, by :func:`crop_flip` on the whole batch.
    """

    def __init__(self, x: torch.Tensor, y: torch.Tensor, batch_size: int, mean, std, shuffle: bool = True,
                 augment: bool = False, pad: Optional[int] = None, flip: bool = True, drop_last: bool = True,
                 generator: Optional[torch.Generator] = None, device: Union[str, torch.device] = "cpu",
                 rank: int = 0, world_size: int = 1, seed: int = 0):
        if not isinstance(x, torch.Tensor) or x.dtype != torch.uint8 or x.dim() != 4:
            raise ValueError(f"x must be a uint8 tensor [N, C, H, W], got "
                             f"{getattr(x, 'dtype', type(x).__name__)} {tuple(getattr(x, 'shape', ()))}")
        y = torch.as_tensor(y)
        if y.dim() != 1 or len(y) != len(x):
            raise ValueError(f"y must be a 1-d tensor with one label per image ({len(x)}), got shape {tuple(y.shape)}")
        if not (isinstance(batch_size, int) and batch_size > 0):
            raise ValueError(f"batch_size must be a positive integer, got {batch_size!r}")
        if not (isinstance(world_size, int) and world_size >= 1 and isinstance(rank, int) and 0 <= rank < world_size):
            raise ValueError(f"need 0 <= rank < world_size, got rank={rank!r}, world_size={world_size!r}")
        c = x.shape[1]
        mean = torch.as_tensor(mean, dtype=torch.float32).reshape(-1)
        std = torch.as_tensor(std, dtype=torch.float32).reshape(-1)
        if mean.numel() not in (1, c) or std.numel() not in (1, c):
            raise ValueError(f"mean and std need 1 or {c} values (one per channel), got {mean.numel()} and {std.numel()}")
        if bool((std <= 0).any()):
            raise ValueError(f"std must be > 0, got {std.tolist()}")
        self.device = torch.device(device)
        self.x = x.to(self.device).contiguous()
        self.y = y.to(self.device, torch.int64)
        # (x/255 - mean)/std == x * scale + shift
        self.scale = (1.0 / (255.0 * std)).expand(c).reshape(1, c, 1, 1).to(self.device)
        self.shift = (-mean / std).expand(c).reshape(1, c, 1, 1).to(self.device)
        self.batch_size, self.shuffle, self.augment = batch_size, shuffle, augment
        self.pad = default_pad(tuple(x.shape[2:])) if pad is None else int(pad)
        if self.pad < 0:
            raise ValueError(f"pad must be >= 0, got {pad!r}")
        self.flip, self.drop_last = flip, drop_last
        self.rank, self.world_size = rank, world_size
        self.seed = generator.initial_seed() if generator is not None else int(seed)
        self.epoch = 0
        self._start = 0

    @property
    def global_batch_size(self) -> int:
        return self.batch_size * self.world_size

    @property
    def num_samples(self) -> int:
        return len(self.y)

    def __len__(self) -> int:
        n, g = self.num_samples, self.global_batch_size
        return n // g if self.drop_last else -(-n // g)

    def set_epoch(self, epoch: int) -> None:
        """Make the next pass epoch ``epoch`` (order and augmentation)."""
        if not isinstance(epoch, int) or epoch < 0:
            raise ValueError(f"epoch must be a non-negative integer, got {epoch!r}")
        self.epoch = epoch

    def skip(self, k: int) -> "Batches":
        """Start the next pass at batch ``k`` (0 <= k <= len): resume mid-epoch."""
        if not isinstance(k, int) or not 0 <= k <= len(self):
            raise ValueError(f"skip needs 0 <= k <= {len(self)} (batches per epoch), got {k!r}")
        self._start = k
        return self

    def plan(self, epoch: int) -> Tuple[torch.Tensor, Optional[Tuple[torch.Tensor, ...]]]:
        """The epoch's sample order and per-position (top, left, flip) draws (CPU)."""
        n = self.num_samples
        g = torch.Generator().manual_seed(mix_seed(self.seed, epoch))
        order = torch.randperm(n, generator=g) if self.shuffle else torch.arange(n)
        if not self.augment:
            return order, None
        top = torch.randint(0, 2 * self.pad + 1, (n,), generator=g)
        left = torch.randint(0, 2 * self.pad + 1, (n,), generator=g)
        flip = torch.rand(n, generator=g) < 0.5 if self.flip else None
        return order, (top, left, flip)

    def _positions(self, b: int) -> slice:
        g, bs, n = self.global_batch_size, self.batch_size, self.num_samples
        lo = b * g
        if lo + g <= n:
            return slice(lo + self.rank * bs, lo + (self.rank + 1) * bs)
        rem = n - lo  # last partial global batch: split as evenly as possible
        share, extra = divmod(rem, self.world_size)
        start = lo + self.rank * share + min(self.rank, extra)
        return slice(start, start + share + (1 if self.rank < extra else 0))

    def __iter__(self) -> Iterator[Tuple[torch.Tensor, torch.Tensor]]:
        epoch, start = self.epoch, self._start
        self._start = 0
        order, aug = self.plan(epoch)
        for b in range(start, len(self)):
            pos = self._positions(b)
            idx = order[pos].to(self.device)
            xb = self.x.index_select(0, idx)
            if aug is not None:
                top, left, flip = aug
                xb = crop_flip(xb, self.pad, top[pos], left[pos], None if flip is None else flip[pos])
            xb = xb.to(torch.float32).mul_(self.scale).add_(self.shift)
            yield xb, self.y.index_select(0, idx)
        self.epoch = epoch + 1

    def __repr__(self) -> str:
        return (f"Batches(n={self.num_samples}, batch_size={self.batch_size}, batches={len(self)}, "
                f"shuffle={self.shuffle}, augment={self.augment}, pad={self.pad}, flip={self.flip}, "
                f"rank={self.rank}/{self.world_size}, seed={self.seed}, epoch={self.epoch})")
