"""Progress of a long stage: a Prefect progress artifact, a CLI bar, and the stage timeout."""

from __future__ import annotations

import logging
import os
import sys
import time

from prefect.artifacts import create_progress_artifact, update_progress_artifact
from prefect.context import TaskRunContext
from tqdm import tqdm

from nwbflow.errors import StageTimeoutError

log = logging.getLogger(__name__)

#: Seconds between progress-artifact updates (each one is an API call).
ARTIFACT_EVERY_S = 2.0


def bars_enabled() -> bool:
    """Progress bars on an interactive terminal, never under CI (``CI=true``)."""
    return os.environ.get("CI", "").lower() not in ("true", "1") and sys.stderr.isatty()


class StageProgress:
    """Callable ``(done, total)`` handed to a kernel; raises StageTimeoutError past the deadline."""

    def __init__(self, stage: str, total: int, timeout_s: float | None, unit: str = "samples"):
        self.stage, self.total, self.timeout_s = stage, max(int(total), 1), timeout_s
        self.started = self._last_artifact = time.monotonic()
        self._bar = tqdm(total=self.total, desc=stage, unit=unit, unit_scale=True, leave=False,
                         disable=not bars_enabled())
        self._artifact = None
        if TaskRunContext.get() is not None:
            self._artifact = create_progress_artifact(progress=0.0, description=f"{stage}: progress (%)")

    def __call__(self, done: int, total: int | None = None) -> None:
        now = time.monotonic()
        self._bar.update(max(int(done) - self._bar.n, 0))
        if self._artifact is not None and (now - self._last_artifact >= ARTIFACT_EVERY_S or done >= self.total):
            update_progress_artifact(self._artifact, progress=100.0 * min(done / self.total, 1.0))
            self._last_artifact = now
        if self.timeout_s is not None and now - self.started > self.timeout_s:
            raise StageTimeoutError(f"stage {self.stage} ran past its limit of {self.timeout_s:g} s "
                                    f"({100 * done / self.total:.0f} % done); raise stage_timeout_s or "
                                    "give it a faster device")

    def close(self) -> None:
        self._bar.close()
