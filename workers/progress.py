"""Training progress: a bar at a terminal, plain key=value log lines elsewhere (containers,
CI, log files). Losses are read from the device only at update points: reading them every
step would synchronise the GPU every step."""

from __future__ import annotations

import logging
import sys
import time
from typing import IO

from kdsearch.service.record import ProgressSnapshot

logger = logging.getLogger(__name__)


# The training running in this process (one at a time): the heartbeat thread publishes
# its progress to the study, for ``kdsearch status --watch``.
_ACTIVE: Progress | None = None


def snapshot() -> ProgressSnapshot | None:
    """Where the running training is, or None."""
    active = _ACTIVE
    if active is None:
        return None
    elapsed = round(time.monotonic() - active.start, 1)
    return ProgressSnapshot(active.label, active.step, active.total, elapsed)


class Progress:
    def __init__(self, total_steps: int, label: str, stream: IO[str] | None = None) -> None:
        global _ACTIVE
        self.total = total_steps
        self.label = label
        self.stream = stream or sys.stderr
        self.step = 0
        self.start = time.monotonic()
        self.interactive = bool(getattr(self.stream, "isatty", lambda: False)())
        # At a terminal: redraw every few steps; in logs: about ten lines per run.
        self.every = 5 if self.interactive else max(1, total_steps // 10)
        self._bar = None
        if self.interactive:
            from tqdm.auto import tqdm

            self._bar = tqdm(total=total_steps, desc=label, file=self.stream, leave=False)
        _ACTIVE = self

    def due(self) -> bool:
        """Whether the next ``advance`` reports (so the caller reads the loss only then)."""
        return (self.step + 1) % self.every == 0 or self.step + 1 == self.total

    def advance(
        self, epoch: int | None = None, epochs: int | None = None, loss: float | None = None
    ) -> None:
        """One step done. Reports when due: training passes the loss (read only then)."""
        reporting = self.due()
        self.step += 1
        if self._bar is not None:
            self._bar.update(1)
            if loss is not None:
                self._bar.set_postfix(epoch=f"{epoch}/{epochs}", loss=f"{loss:.4f}")
            return
        if not reporting:
            return
        elapsed = time.monotonic() - self.start
        eta = elapsed / self.step * (self.total - self.step)
        fields = f" epoch={epoch}/{epochs}" if epoch is not None else ""
        fields += f" loss={loss:.6f}" if loss is not None else ""
        logger.info(
            "progress label=%s step=%d/%d%s elapsed_s=%.1f eta_s=%.1f",
            self.label, self.step, self.total, fields, elapsed, eta,
        )  # fmt: skip

    def close(self) -> None:
        global _ACTIVE
        if _ACTIVE is self:
            _ACTIVE = None
        if self._bar is not None:
            self._bar.close()
