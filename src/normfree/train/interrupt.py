"""Stopping a run from outside: Ctrl-C (SIGINT) and SIGTERM (what ``kill``,
SLURM and container runtimes send) both finish the running step, write the
checkpoint and raise :class:`Interrupted`; a second signal aborts at once."""
from __future__ import annotations

import signal
from typing import Callable, Optional

STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)


class Interrupted(KeyboardInterrupt):
    """The run was stopped by signal ``signum`` (``normfree train`` exits with 128 + signum)."""

    def __init__(self, signum: int = signal.SIGINT):
        super().__init__(signal.Signals(signum).name)
        self.signum = int(signum)


class StopRequests:
    """While active (``with StopRequests(...) as stop``), SIGINT and SIGTERM
    set ``stop.signum`` when they arrive inside a step (``stop.in_step``) and
    raise :class:`Interrupted` when they arrive between steps or a second time.
    Outside the main thread signals cannot be caught; Ctrl-C then raises directly."""

    def __init__(self, say: Callable[[str], None]):
        self.say = say
        self.in_step = False
        self.signum: Optional[int] = None
        self._old = {}

    @property
    def requested(self) -> bool:
        return self.signum is not None

    def _handle(self, signum, frame):
        if self.signum is not None or not self.in_step:
            raise Interrupted(signum)
        self.signum = signum
        name = signal.Signals(signum).name
        self.say(f"{name}: finishing this step and writing the checkpoint (send it again to abort)")

    def __enter__(self) -> "StopRequests":
        for s in STOP_SIGNALS:
            try:
                self._old[s] = signal.signal(s, self._handle)
            except ValueError:  # not the main thread
                pass
        return self

    def __exit__(self, *exc) -> None:
        for s, old in self._old.items():
            signal.signal(s, old)
        self._old.clear()
