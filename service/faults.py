"""Fault points: named places in the worker where a test can pause it, to kill it (or stop
the database) at exactly that moment. Inert unless ``$KDSEARCH_FAULT`` names the point.

``KDSEARCH_FAULT=after-claim:pause=30`` makes a worker sleep 30 s when it reaches the point
``after-claim``; ``after-claim@3:pause=30`` only the third time it does. The points:
``in-claim`` (inside the claim's transaction), ``after-claim`` (the claim committed, its
sampling not done), ``before-record`` (the trial trained, nothing recorded yet),
``in-create`` (inside ``study create``'s transaction), ``in-store`` (an artifact written,
the next not yet). ``in-store@2:raise=enospc`` raises "No space left on device" there. With
``$KDSEARCH_FAULT_REACHED`` set to a file path, the point's name is written there first,
so the test knows the worker is in place.
"""

from __future__ import annotations

import errno
import logging
import os
import time
from pathlib import Path

logger = logging.getLogger(__name__)

FAULT_ENV = "KDSEARCH_FAULT"
REACHED_ENV = "KDSEARCH_FAULT_REACHED"


_reached: dict[str, int] = {}


def fault_point(name: str) -> None:
    armed = os.environ.get(FAULT_ENV)
    if not armed:
        return
    point, _, action = armed.partition(":")
    point, _, nth = point.partition("@")
    if point != name:
        return
    _reached[name] = _reached.get(name, 0) + 1
    if nth and _reached[name] != int(nth):
        return
    logger.warning("fault point %s reached (%s=%s)", name, FAULT_ENV, armed)
    if reached := os.environ.get(REACHED_ENV):
        Path(reached).write_text(name)
    if action.startswith("pause="):
        time.sleep(float(action.removeprefix("pause=")))
    if action == "raise=enospc":
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
