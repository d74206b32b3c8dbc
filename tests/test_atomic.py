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


def test_concurrent_writers_never_see_or_leave_a_broken_file(tmp_path):
    """Two writers of one path (two runs, two study workers): each writes its own
    temporary file, so neither removes or replaces the other's; the result is
    one writer's complete text and no temporary is left."""
    import threading

    path = str(tmp_path / "record.json")
    texts = {w: (w * 200_000) for w in "ab"}
    errors = []

    def writer(w):
        try:
            for _ in range(20):
                write_text(path, texts[w])
        except Exception as e:  # pragma: no cover - the failure this test guards against
            errors.append(e)

    threads = [threading.Thread(target=writer, args=(w,)) for w in "ab"]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    assert open(path).read() in texts.values()
    assert os.listdir(tmp_path) == ["record.json"]


def test_temporary_names_are_unique_and_keep_the_suffix(tmp_path):
    path = str(tmp_path / "model.pt2")
    with atomic_path(path) as a, atomic_path(path) as b:
        assert a != b and os.path.exists(a) and os.path.exists(b)
        assert a.endswith(".tmp.pt2") and b.endswith(".tmp.pt2")
        open(a, "w").write("first")
        open(b, "w").write("second")
    assert open(path).read() == "first"  # the outer block finished last
    assert os.listdir(tmp_path) == ["model.pt2"]


def test_fsync_failure_keeps_the_old_file_and_names_the_target(tmp_path, monkeypatch):
    import errno

    path = str(tmp_path / "checkpoint.pt")
    write_text(path, "good")

    def failing_fsync(fd):
        raise OSError(errno.EIO, "Input/output error")

    monkeypatch.setattr(os, "fsync", failing_fsync)
    with pytest.raises(OSError) as e:
        write_text(path, "new")
    assert e.value.errno == errno.EIO and e.value.filename == path and e.value.previous_kept
    monkeypatch.undo()
    assert open(path).read() == "good" and os.listdir(tmp_path) == ["checkpoint.pt"]


def test_missing_folder_error_names_the_target(tmp_path):
    path = str(tmp_path / "missing" / "file.json")
    with pytest.raises(FileNotFoundError) as e:
        write_text(path, "x")
    assert e.value.filename == path


def test_check_writable(tmp_path):
    from normfree.atomic import check_writable

    check_writable(str(tmp_path))
    assert os.listdir(tmp_path) == []  # the probe file is gone
    (tmp_path / "f").write_text("x")
    with pytest.raises(NotADirectoryError) as e:
        check_writable(str(tmp_path / "f"))
    assert e.value.filename == str(tmp_path / "f")
