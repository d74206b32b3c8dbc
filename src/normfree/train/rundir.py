"""The run directory (``--out``): created, checked and locked before anything
expensive happens.

* Its path must be a directory that can be written: a file in the way, a path
  through a file, a read-only or full file system end the run at once with an
  OSError naming the path.
* One process at a time: an advisory lock (``fcntl.flock`` on ``OUT/.lock``,
  which holds the owner's pid) is taken for the whole run; a second
  ``normfree train`` with the same ``--out`` stops with :class:`RunDirBusy`
  instead of racing the first for its files. The kernel drops the lock when
  the process ends, however it ends.
* Nothing is overwritten by surprise: the directory must be new or empty, or
  hold this run's checkpoint (continued with ``resume``), or a normfree run
  that stopped before its first checkpoint (restarted with ``resume``). Any
  other non-empty directory is refused (:class:`RunDirNotEmpty`); normfree
  writes only inside it.
"""
from __future__ import annotations

import json
import os
from typing import List, Optional

from ..atomic import check_writable
from .checkpoint import CHECKPOINT

LOCK = ".lock"


class RunDirBusy(RuntimeError):
    """Another process holds the run directory's lock."""


class RunDirNotEmpty(ValueError):
    """The run directory holds files that are not this run's."""


def _is_normfree_run(out: str) -> bool:
    """True when ``out/config.json`` is one written by normfree train."""
    try:
        with open(os.path.join(out, "config.json")) as f:
            info = json.load(f)
        return isinstance(info, dict) and isinstance(info.get("config"), dict) and "model" in info["config"]
    except (OSError, ValueError):
        return False


def _is_temporary(name: str) -> bool:
    """Left-over temporary files of interrupted atomic writes (``.NAME.RANDOM.tmp.EXT``)."""
    return name.startswith(".") and ".tmp" in name


class RunDir:
    """A locked, checked run directory (see the module docstring); ``close()`` releases it."""

    def __init__(self, path: str, lock_fd: Optional[int], state: str):
        self.path = path
        self._fd = lock_fd
        self.state = state  # "new", "checkpoint" (resume it) or "restart" (a run without checkpoint)

    @property
    def checkpoint(self) -> str:
        return os.path.join(self.path, CHECKPOINT)

    @classmethod
    def open(cls, path: str, resume: bool) -> "RunDir":
        if os.path.exists(path) and not os.path.isdir(path):
            raise FileExistsError(17, "exists and is not a directory", path)
        os.makedirs(path, exist_ok=True)  # OSError (ENOTDIR, EACCES, EROFS, ENOSPC) names the path
        check_writable(path)
        fd = _lock(path)
        try:
            state = _classify(path, resume)
        except BaseException:
            _unlock(fd)
            raise
        return cls(path, fd, state)

    def close(self) -> None:
        if self._fd is not None:
            _unlock(self._fd)
            self._fd = None

    def __enter__(self) -> "RunDir":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _lock(path: str) -> Optional[int]:
    try:
        import fcntl
    except ImportError:  # no advisory locks on this platform (Windows): run unlocked
        return None
    lock = os.path.join(path, LOCK)
    fd = os.open(lock, os.O_RDWR | os.O_CREAT, 0o666)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        try:
            owner = os.read(fd, 32).decode(errors="replace").strip()
        except OSError:
            owner = ""
        os.close(fd)
        who = f" (pid {owner})" if owner.isdigit() else ""
        raise RunDirBusy(f"another normfree process{who} is using {path}: wait for it to finish, "
                         f"or choose another --out") from None
    os.ftruncate(fd, 0)
    os.write(fd, f"{os.getpid()}\n".encode())
    return fd


def _unlock(fd: Optional[int]) -> None:
    if fd is not None:
        os.close(fd)  # closing the descriptor releases the flock


def _classify(path: str, resume: bool) -> str:
    entries: List[str] = sorted(e for e in os.listdir(path) if e != LOCK and not _is_temporary(e))
    if not entries:
        return "new"
    ckpt = os.path.join(path, CHECKPOINT)
    if os.path.exists(ckpt):
        if not resume:
            raise RunDirNotEmpty(f"{ckpt} exists: pass resume (--resume) to continue that run, "
                                 f"or choose another out directory")
        return "checkpoint"
    if _is_normfree_run(path):
        if not resume:
            raise RunDirNotEmpty(f"{path} holds a normfree run without a checkpoint (it stopped or diverged "
                                 f"before its first one): pass resume (--resume) to start it again from scratch "
                                 f"(its metrics are replaced), or choose another out directory")
        return "restart"
    shown = ", ".join(entries[:5]) + (f", ... ({len(entries)} entries)" if len(entries) > 5 else "")
    raise RunDirNotEmpty(f"{path} is not empty ({shown}) and holds no normfree run: choose a new or empty "
                         f"out directory (normfree train does not write over other files)")
