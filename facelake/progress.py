"""facelake's own progress display: one line on stderr with done / total, rate, ETA and counters.

Off with ``--quiet`` (FACELAKE_QUIET=1) and whenever stderr is not a terminal (logs, cron, CI),
so piped output and job logs stay clean. Jobs use it as::

    with progress.tracker(total=rows, label="embed", unit="images") as bar:
        for block in blocks:
            bar.advance(images=n_images, faces=n_faces, errors=n_errors)

``advance`` moves the bar by ``done`` (or by ``images`` when the unit is images) and adds the
counters shown beside it. A disabled tracker does nothing and costs nothing.

The libraries under facelake (Ray, Ray Data, OpenCV) are quiet on the terminal too unless
``--verbose`` (FACELAKE_VERBOSE=1): ``quiet_environment`` sets their log levels through the
environment, which Ray's local processes and workers inherit; cluster.runtime quiets the rest
when it starts Ray.
"""

from __future__ import annotations

import os
import sys
from typing import TextIO

from rich.console import Console
from rich.progress import (BarColumn, MofNCompleteColumn, Progress, ProgressColumn, SpinnerColumn, Task,
                           TextColumn, TimeElapsedColumn, TimeRemainingColumn)
from rich.text import Text

QUIET_ENV = "FACELAKE_QUIET"
VERBOSE_ENV = "FACELAKE_VERBOSE"
# Set when not verbose (a value the user set wins): OpenCV's DNN module warns about backends on
# every detector load.
QUIET_ENV_DEFAULTS = {"OPENCV_LOG_LEVEL": "ERROR"}
# Redraws per second: enough to look alive, few enough to cost nothing next to the work.
REFRESH_PER_SECOND = 2
COUNTERS = ("faces", "errors")


def enabled(quiet: bool = False, stream: TextIO | None = None) -> bool:
    """Whether to show progress: not --quiet, not FACELAKE_QUIET, and stderr is a terminal."""
    if quiet or os.environ.get(QUIET_ENV, "").strip() not in ("", "0"):
        return False
    stream = stream or sys.stderr
    try:
        return stream.isatty()
    except (AttributeError, ValueError):
        return False


def verbose() -> bool:
    """Whether Ray and OpenCV keep their own log levels on the terminal (FACELAKE_VERBOSE)."""
    return os.environ.get(VERBOSE_ENV, "").strip() not in ("", "0")


def quiet_environment() -> None:
    """Unless verbose, put QUIET_ENV_DEFAULTS in this process's environment (values already set stay)."""
    if not verbose():
        for key, value in QUIET_ENV_DEFAULTS.items():
            os.environ.setdefault(key, value)


class _Rate(ProgressColumn):
    """Units per second over the task's recent window."""

    def __init__(self, unit: str) -> None:
        super().__init__()
        self.unit = unit

    def render(self, task: Task) -> Text:
        speed = task.finished_speed or task.speed
        return Text(f"{speed:,.1f} {self.unit}/s" if speed else f"- {self.unit}/s", style="cyan")


class Tracker:
    """A running progress line (or nothing, when disabled). Use as a context manager."""

    def __init__(self, total: int | None, label: str, *, unit: str = "images", enabled: bool = True,
                 console: Console | None = None) -> None:
        self.total, self.label, self.unit, self.enabled = total, label, unit, enabled
        self.done = 0
        self.counts = {name: 0 for name in COUNTERS}
        self._progress: Progress | None = None
        self._task = None
        if enabled:
            columns = [SpinnerColumn(), TextColumn("[bold]{task.description}"), BarColumn(),
                       MofNCompleteColumn() if total else TextColumn("{task.completed:,} " + unit),
                       _Rate(unit), TextColumn("{task.fields[counts]}"), TimeElapsedColumn()]
            if total:
                columns.append(TimeRemainingColumn())
            self._progress = Progress(*columns, console=console or Console(stderr=True),
                                      refresh_per_second=REFRESH_PER_SECOND, transient=False)
            self._task = self._progress.add_task(label, total=total, counts="")

    def __enter__(self) -> "Tracker":
        if self._progress is not None:
            self._progress.start()
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def advance(self, done: int = 0, *, images: int = 0, faces: int = 0, errors: int = 0) -> None:
        """Move the bar by ``done`` (or ``images``) and add to the face and error counters."""
        step = done or images
        self.done += step
        self.counts["faces"] += faces
        self.counts["errors"] += errors
        if self._progress is not None:
            shown = (", ".join(f"{n:,} {name}" for name, n in self.counts.items())
                     if any(self.counts.values()) else "")
            self._progress.update(self._task, advance=step, counts=shown)

    def describe(self, label: str) -> None:
        """Change the label (e.g. the stage a multi-stage job is in)."""
        self.label = label
        if self._progress is not None:
            self._progress.update(self._task, description=label)

    def close(self) -> None:
        """Stop redrawing; the last state stays on screen."""
        if self._progress is not None:
            self._progress.stop()
            self._progress = None


def tracker(total: int | None, label: str, enabled: bool | None = None, *, unit: str = "images",
            console: Console | None = None) -> Tracker:
    """A progress tracker for ``total`` units (None: unknown, shows a count); ``enabled`` None: ``enabled()``."""
    return Tracker(total, label, unit=unit, enabled=_default_enabled() if enabled is None else enabled,
                   console=console)


_default_enabled = enabled
