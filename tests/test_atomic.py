"""Atomic writes: the old file survives a failed write, and no temporary is left."""
import os

import pytest

from normfree.atomic import atomic_path, write_text


def test_write_text_replaces_the_file(tmp_path):
    path = str(tmp_path / "a.json")
    write_text(path, "old")
    write_text(path, "new")
    assert open(path).read() == "new"
    assert os.listdir(tmp_path) == ["a.json"]


def test_failed_write_keeps_the_old_file_and_removes_the_temporary(tmp_path):
    path = str(tmp_path / "ckpt.pt")
    write_text(path, "good")
    with pytest.raises(RuntimeError, match="disk full"):
        with atomic_path(path) as tmp:
            with open(tmp, "w") as f:
                f.write("half")
            raise RuntimeError("disk full")
    assert open(path).read() == "good"
    assert os.listdir(tmp_path) == ["ckpt.pt"]
