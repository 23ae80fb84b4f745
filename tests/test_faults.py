"""facelake.faults: points are no-ops unless armed; armed points act in this process (callbacks) or
in any process sharing $FACELAKE_FAULTS (counted across processes); every point is listed."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

from facelake import faults
from facelake.errors import ConfigError

REPO = Path(__file__).resolve().parents[1]


def test_unarmed_points_do_nothing_and_unknown_names_are_refused():
    faults.point("embed.chunk")
    faults.point("search.after_batch", object())
    with pytest.raises(ConfigError, match="unknown fault point 'embed.chunks'"):
        with faults.armed("embed.chunks"):
            pass


def test_callback_runs_after_the_first_hits_and_is_disarmed_after_the_block():
    seen = []
    with faults.armed("search.after_batch", seen.append, after=2):
        for n in range(5):
            faults.point("search.after_batch", n)
    faults.point("search.after_batch", 99)
    assert seen == [2, 3, 4]


def test_file_armed_point_fails_every_hit_after_n_in_every_process():
    child = ("from facelake import faults\n"
             "try:\n    faults.point('embed.chunk')\nexcept faults.FaultInjected:\n    raise SystemExit(3)\n")
    with faults.armed("embed.chunk", after=2):
        faults.point("embed.chunk")                                   # hit 1, this process: passes
        passed = subprocess.run([sys.executable, "-c", child], cwd=REPO)  # hit 2, another process: passes
        assert passed.returncode == 0
        with pytest.raises(faults.FaultInjected, match="fault injected at embed.chunk") as err:
            faults.point("embed.chunk")                               # hit 3: fails
        failed = subprocess.run([sys.executable, "-c", child], cwd=REPO)  # hit 4, other process: fails too
        assert failed.returncode == 3 and faults.hits("embed.chunk") == 4
    assert faults.injected(RuntimeError("wrapped")) is False
    wrapped = RuntimeError("a Ray task failed")
    wrapped.__cause__ = err.value
    assert faults.injected(wrapped)
    faults.point("embed.chunk")                                       # disarmed: nothing


def test_every_listed_point_is_in_the_code_and_every_point_in_the_code_is_listed():
    found = set()
    for folder in ("facelake", "jobs", "index", "cluster"):
        for path in (REPO / folder).rglob("*.py"):
            text = path.read_text()
            found |= set(re.findall(r'faults\.point\("([a-z_.]+)"', text))
            if 'faults.point(f"index.{name}"' in text:   # build_version's two points share one call
                found |= {"index.before_manifest", "index.before_pointer"}
    assert found == set(faults.POINTS)


def test_no_job_takes_test_hooks_any_more():
    """Jobs have one code path; tests reach it through facelake.faults (build_version's hooks are
    production callbacks: the CLI's progress and the publishers' lock and erasure checks)."""
    offenders = []
    for folder in ("facelake", "jobs", "index", "cluster"):
        for path in (REPO / folder).rglob("*.py"):
            for line_no, line in enumerate(path.read_text().splitlines(), 1):
                if re.search(r"HOOK_NAMES|after_block|stepped|Turns\b", line) and path.name != "build.py":
                    offenders.append(f"{path.relative_to(REPO)}:{line_no}: {line.strip()}")
    assert not offenders, "\n".join(offenders)
