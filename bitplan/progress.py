"""Progress reporting: long stages call ``progress(stage, fraction, detail)``.

The CLI draws a bar on stderr; the service (later) writes the same calls to the
job row, so progress looks the same everywhere.
"""

from __future__ import annotations

import sys
from typing import Protocol


class ProgressFn(Protocol):
    def __call__(self, stage: str, fraction: float, detail: str = "") -> None: ...


def no_progress(stage: str, fraction: float, detail: str = "") -> None:
    return None


class StderrProgress:
    """One tqdm bar per stage on stderr (quiet when stderr is not a terminal, unless forced)."""

    def __init__(self, enabled: bool | None = None) -> None:
        self.enabled = sys.stderr.isatty() if enabled is None else enabled
        self._bar = None
        self._stage: str | None = None

    def __call__(self, stage: str, fraction: float, detail: str = "") -> None:
        if not self.enabled:
            return
        from tqdm import tqdm

        if stage != self._stage:
            self.close()
            self._stage = stage
            self._bar = tqdm(total=1000, desc=stage, file=sys.stderr, leave=True,
                             bar_format="{desc:>12} {bar:30} {percentage:3.0f}% {elapsed} {postfix}")
        assert self._bar is not None
        self._bar.n = int(max(0.0, min(1.0, fraction)) * 1000)
        self._bar.set_postfix_str(detail, refresh=False)
        self._bar.refresh()

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None
