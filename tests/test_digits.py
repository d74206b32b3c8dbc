"""The digits data set ships inside normfree: no scikit-learn needed, same arrays and split."""
import importlib.resources
import subprocess
import sys

import numpy as np
import pytest
import torch

from normfree.data import load_digits


def _packaged():
    path = importlib.resources.files("normfree") / "resources" / "digits.npz"
    with path.open("rb") as fh, np.load(fh) as f:
        return f["images"], f["target"]


def test_packaged_file_is_small_uint8_and_complete():
    images, target = _packaged()
    assert images.shape == (1797, 8, 8) and images.dtype == np.uint8 and int(images.max()) == 16
    assert target.shape == (1797,) and target.dtype == np.uint8
    assert np.bincount(target).tolist() == [178, 182, 177, 183, 181, 182, 181, 179, 174, 180]  # UCI optdigits.tes


def test_packaged_digits_equal_sklearn_and_keep_the_split():
    sk = pytest.importorskip("sklearn.datasets")
    d = sk.load_digits()
    images, target = _packaged()
    assert np.array_equal(images.astype(np.float64), d.images)
    assert np.array_equal(target.astype(np.int64), d.target)
    # the data set is what the sklearn-based loader gave: round(v * 255 / 16), seed-0 permutation, last 360 test
    x = np.rint(d.images * (255.0 / 16.0)).clip(0, 255).astype(np.uint8)[:, None]
    order = np.random.default_rng(0).permutation(len(d.target))
    ds = load_digits()
    assert torch.equal(ds.train_x, torch.from_numpy(x[order[:-360]]))
    assert torch.equal(ds.test_x, torch.from_numpy(x[order[-360:]]))
    assert torch.equal(ds.train_y, torch.from_numpy(d.target[order[:-360]]).long())
    assert torch.equal(ds.test_y, torch.from_numpy(d.target[order[-360:]]).long())


def test_digits_load_without_sklearn():
    code = ("import sys; sys.modules['sklearn'] = None; "  # any `import sklearn...` now raises ImportError
            "from normfree.data import load_dataset; ds = load_dataset('digits'); "
            "print(len(ds.train_y), len(ds.test_y))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["1437", "360"]
