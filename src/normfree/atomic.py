"""Atomic file writes: write a uniquely named temporary file beside PATH,
flush it to disk (fsync), then ``os.replace`` it over PATH.

A reader (or a run resumed after a crash or power loss) sees the old file or
the new one, never a partial one. If writing fails (a full disk, an
interrupt), PATH is untouched and the temporary file is removed. Two
processes writing the same PATH each use their own temporary file (random
name), so neither can remove or replace the other's half-written one; the
last rename wins. The temporary file keeps PATH's suffix
(``.model.3f9a2c1e.tmp.pt2`` for ``model.pt2``), which writers that check the
suffix (``torch.export.save``) expect.

An ``OSError`` raised while writing names PATH (not the temporary file), so
that a command can report "disk full: PATH" in one line.
"""
from __future__ import annotations

import contextlib
import os
import secrets
from typing import Iterator


def _temp_name(path: str) -> str:
    folder, base = os.path.split(path)
    stem, ext = os.path.splitext(base)
    return os.path.join(folder, f".{stem}.{secrets.token_hex(4)}.tmp{ext}")


def _fsync_dir(folder: str) -> None:
    """Make the rename itself durable (best effort: not every platform allows it)."""
    try:
        fd = os.open(folder or ".", os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _naming(e: OSError, path: str, tmp: str) -> OSError:
    """``e`` with ``path`` as its file name when it had none or named the
    temporary file; ``previous_kept`` says whether an older ``path`` survives."""
    if e.filename not in (None, tmp) or e.errno is None:
        return e
    new = OSError(e.errno, e.strerror, path)  # the errno picks the subclass (PermissionError, ...)
    new.__cause__ = e
    new.previous_kept = os.path.isfile(path)
    return new


@contextlib.contextmanager
def atomic_path(path: str) -> Iterator[str]:
    """Yields a new, empty temporary file's path to write; on success the file
    is fsynced and replaces ``path``. On any failure ``path`` is untouched and
    the temporary file is removed."""
    path = os.fspath(path)
    for _ in range(100):
        tmp = _temp_name(path)
        try:  # O_EXCL: never reuse a name another process has taken; mode 0o666 & ~umask
            os.close(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666))
            break
        except FileExistsError:
            continue
        except OSError as e:
            raise _naming(e, path, tmp) from None
    else:  # pragma: no cover - 100 collisions of 32 random bits
        raise FileExistsError(f"could not create a temporary file beside {path}")
    try:
        yield tmp
        fd = os.open(tmp, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, path)
    except BaseException as e:
        with contextlib.suppress(OSError):
            os.remove(tmp)
        if isinstance(e, OSError):
            raise _naming(e, path, tmp) from None
        raise
    _fsync_dir(os.path.dirname(path))


def write_text(path: str, text: str) -> None:
    """Write ``text`` to ``path`` atomically."""
    with atomic_path(path) as tmp, open(tmp, "w") as f:
        f.write(text)


def write_bytes(path: str, data: bytes) -> None:
    """Write ``data`` to ``path`` atomically."""
    with atomic_path(path) as tmp, open(tmp, "wb") as f:
        f.write(data)


def check_writable(folder: str) -> None:
    """Raise the OSError (naming ``folder``) that writing a file in ``folder``
    would raise: permission denied, read-only file system, not a directory...
    Creates and removes one empty temporary file; checks early what a long
    command will need at its end."""
    folder = os.fspath(folder) or "."
    tmp = _temp_name(os.path.join(folder, "write-check"))
    try:
        os.close(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666))
    except OSError as e:
        raise _naming(e, folder, tmp) from None
    with contextlib.suppress(OSError):
        os.remove(tmp)
