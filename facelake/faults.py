"""Named fault points: where a job may die, tests make it die, through the code that ships.

Production code calls ``point(name, subject)`` at each place where a crash matters (a chunk
written, the lock taken, before a pointer moves). Unarmed, a point does nothing and changes
nothing: there is no test-only path through a job (no stepping, no extra flushes, no skipped
shutdown). A test arms a point for the duration of a ``with`` block:

- ``armed(name, callback)``: ``callback(subject)`` runs at every hit in this process (the
  driver). It may raise (a crash there), send a signal, or do something beside the job (kill a
  shard actor, hold the lock); the job's own control flow is the production one.
- ``armed(name, after=n)``: the first ``n`` hits pass and every later hit raises
  ``FaultInjected``, in any process that has ``$FACELAKE_FAULTS`` set to the same folder: Ray
  workers included, since the folder travels in ``cluster.runtime.WORKER_ENV_KEYS`` and local
  Ray workers inherit the test process's environment (tests/conftest.py sets it before Ray
  starts). Hits are counted across processes (a file lock), so "the worker dies before its
  second chunk" is exact. Every later hit failing is what a dead process does: nothing after
  the fault point runs again. A worker's fault fails the Ray Data job like any worker error; Ray
  keeps that run's actors while the error's traceback is alive, so a test that goes on using
  the cluster drops the error first (tests/helpers.py ``fails_at_armed_fault``).

``POINTS`` names every point and where it sits; arming an unknown name is refused, so a point
renamed in the code cannot leave a test arming nothing. Tested in tests/test_faults.py and by
every crash-and-resume test (embed, rebuild, erase, search, lock, audit).
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
from typing import Any, Callable, Iterator

from facelake.errors import ConfigError

ENV = "FACELAKE_FAULTS"

# name -> where it sits (the one list of fault points)
POINTS = {
    "embed.chunk": "an embed actor or the local executor, before it works on a chunk of manifest rows "
                   "(before any part is written)",
    "embed.counts": "the embed driver, after a chunk's counts arrived (its parts are written)",
    "rebuild.locked": "rebuild, right after ROOT/lock is taken",
    "rebuild.after_embed": "rebuild, new photos staged, before the table version is written",
    "rebuild.before_table_pointer": "rebuild, table version written, before ROOT/TABLE moves",
    "table.part": "a unit of a table version's write (facelake.record.tables: rewrite, record or compact one part; a "
                  "Ray task when the job runs them in tasks), before it writes its parts",
    "erase.after_erasure_list": "erase, ids appended to the erasure list, before anything is rewritten",
    "erase.before_table_pointer": "erase, rewritten parts written, before ROOT/TABLE moves",
    "index.before_manifest": "build_version, shards written, before the version's manifest.json",
    "index.before_pointer": "build_version, manifest written, before ROOT/index/CURRENT moves",
    "search.after_batch": "the search driver, after a batch's counts arrived (its results are written)",
}


class FaultInjected(RuntimeError):
    """Raised by an armed fault point (tests only)."""


_callbacks: dict[str, tuple[Callable[[Any], None], int, list[int]]] = {}


def point(name: str, subject: Any = None) -> None:
    """A place where a job may die. Does nothing unless a test armed ``name``."""
    if name in _callbacks:
        callback, after, hits = _callbacks[name]
        hits[0] += 1
        if hits[0] > after:
            callback(subject)
    folder = os.environ.get(ENV)
    if folder and os.path.exists(os.path.join(folder, name + ".json")):
        _file_point(folder, name)


def _file_point(folder: str, name: str) -> None:
    path = os.path.join(folder, name + ".json")
    try:
        with open(path, "r+") as handle:
            fcntl.flock(handle, fcntl.LOCK_EX)   # one count per hit, whichever process hits
            state = json.load(handle)
            state["hits"] += 1
            handle.seek(0)
            handle.truncate()
            json.dump(state, handle)
    except FileNotFoundError:   # disarmed between the check and the open
        return
    if state["hits"] > state["after"]:
        raise FaultInjected(f"fault injected at {name} (hit {state['hits']}, armed after {state['after']}); "
                            "tests only: see facelake.faults")


@contextlib.contextmanager
def armed(name: str, callback: Callable[[Any], None] | None = None, *, after: int = 0) -> Iterator[None]:
    """Arm fault point ``name`` within the block (see the module docstring)."""
    if name not in POINTS:
        raise ConfigError(f"unknown fault point {name!r}; known: {sorted(POINTS)}")
    if callback is not None:
        _callbacks[name] = (callback, after, [0])
        try:
            yield
        finally:
            _callbacks.pop(name, None)
        return
    folder = os.environ.get(ENV)
    if not folder:
        raise ConfigError(f"set {ENV} to a folder before Ray starts (tests/conftest.py does) to arm "
                          "fault points in workers")
    os.makedirs(folder, exist_ok=True)
    path = os.path.join(folder, name + ".json")
    with open(path + ".tmp", "w") as handle:
        json.dump({"after": after, "hits": 0}, handle)
    os.replace(path + ".tmp", path)
    try:
        yield
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.remove(path)


def hits(name: str) -> int:
    """How often an armed (file) point was hit so far, in every process."""
    folder = os.environ.get(ENV)
    try:
        with open(os.path.join(folder or "", name + ".json")) as handle:
            return json.load(handle)["hits"]
    except FileNotFoundError:
        return 0


def injected(err: BaseException) -> bool:
    """True when ``err`` is, wraps or was caused by a FaultInjected (also when Ray re-raised it)."""
    seen = 0
    while err is not None and seen < 20:
        if isinstance(err, FaultInjected) or "fault injected at" in str(err):
            return True
        err = err.__cause__ or err.__context__
        seen += 1
    return False
