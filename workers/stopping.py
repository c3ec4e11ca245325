"""Stop signals: SIGTERM / SIGINT turned into ``StopRequested`` at a safe point.

Standard library only, so the CLI installs this handler before it imports anything
heavy (pydantic, torch): a stop that arrives while those load is deferred to the first
safe point instead of interrupting an import halfway.
"""

from __future__ import annotations

import signal
from collections.abc import Iterator
from contextlib import contextmanager
from types import FrameType


class StopRequested(BaseException):
    """SIGTERM or SIGINT arrived: fail the current trial (so it is re-queued) and exit."""


class GracefulStop:
    """Turns SIGTERM / SIGINT into ``StopRequested`` at a safe point.

    Inside ``interruptible()`` (the trial's computation, asset building, waiting) the
    signal raises at once; elsewhere it is deferred to the next ``check()``.
    """

    def __init__(self) -> None:
        self.requested: str | None = None
        self._interruptible = False

    def _handler(self, signum: int, frame: FrameType | None) -> None:
        self.requested = signal.Signals(signum).name
        if self._interruptible:
            self._interruptible = False
            raise StopRequested(self.requested)

    def check(self) -> None:
        if self.requested:
            raise StopRequested(self.requested)

    @contextmanager
    def installed(self) -> Iterator[None]:
        previous = {s: signal.signal(s, self._handler) for s in (signal.SIGTERM, signal.SIGINT)}
        try:
            yield
        finally:
            for s, h in previous.items():
                signal.signal(s, h)

    @contextmanager
    def interruptible(self) -> Iterator[None]:
        self.check()
        self._interruptible = True
        try:
            yield
        finally:
            self._interruptible = False
