"""Progress for long work (imports, compiles), on stderr."""

from __future__ import annotations

import sys
import time


class Progress:
    """`progress(done, total, item)`: a live line on a terminal; elsewhere (logs, CI) a
    line every 10% or 10 s, so output stays short."""

    def __init__(self, label: str, stream=None):
        self.label = label
        self.stream = stream or sys.stderr
        self.tty = self.stream.isatty()
        self._last_pct = -10
        self._last_time = 0.0
        self._open = False

    def __call__(self, done: int, total: int, item: str = "") -> None:
        pct = 100 * done // max(total, 1)
        if self.tty:
            self.stream.write(f"\r{self.label}: {done}/{total} ({pct}%) {item:<40.40}")
            self._open = done < total
            if not self._open:
                self.stream.write("\n")
        elif done == total or pct >= self._last_pct + 10 or time.monotonic() > self._last_time + 10:
            self.stream.write(f"{self.label}: {done}/{total} ({pct}%) {item}\n")
            self._last_pct, self._last_time = pct, time.monotonic()
        self.stream.flush()

    def close(self) -> None:
        """End an open live line (before an error message)."""
        if self._open:
            self.stream.write("\n")
            self._open = False
