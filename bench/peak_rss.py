"""Peak memory of a benchmark: summed RSS of this process and its children, sampled in a thread.

Shared by the bench scripts (run as `python bench/<name>.py`, so this folder is on sys.path).
Ray's workers are children of the raylet, not of the driver: a local Ray's actors are counted
only where the script starts them as its own children.
"""

from __future__ import annotations

import threading
import time

import psutil


class PeakRSS:
    """Peak summed RSS of this process tree, sampled in a thread."""

    def __init__(self) -> None:
        self.peak = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _sample(self) -> int:
        me = psutil.Process()
        total = 0
        for proc in [me, *me.children(recursive=True)]:
            try:
                total += proc.memory_info().rss
            except psutil.Error:
                pass
        return total

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, self._sample())
            time.sleep(0.05)

    def __enter__(self) -> "PeakRSS":
        self.base = self._sample()
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()

    @property
    def gib(self) -> float:
        return round(self.peak / 2**30, 2)
