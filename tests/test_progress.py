"""facelake.progress: counts, rate and ETA on a terminal's stderr; nothing when piped or --quiet.

The CLI test runs `facelake index` with its stderr on a real pseudo-terminal, as a user sees it.
"""

from __future__ import annotations

import io
import os
import subprocess
import sys
import threading

import pytest
from rich.console import Console

from facelake import progress, storage
from tests.helpers import synthetic_faces


def test_tracker_shows_done_total_counters_and_rate():
    out = io.StringIO()
    console = Console(file=out, force_terminal=True, width=160)
    with progress.tracker(10, "embed", True, console=console) as bar:
        bar.advance(images=3, faces=5, errors=1)
        bar.advance(images=2, faces=1)
    text = out.getvalue()
    assert "5/10" in text and "6 faces, 1 errors" in text and "images/s" in text
    assert (bar.done, bar.counts) == (5, {"faces": 6, "errors": 1})


def test_disabled_tracker_prints_nothing_but_counts(capsys):
    with progress.tracker(4, "search", False, unit="probe faces") as bar:
        bar.advance(4)
    assert bar.done == 4
    captured = capsys.readouterr()
    assert captured.out == captured.err == ""


def test_enabled_only_on_a_terminal_and_not_quiet(monkeypatch):
    monkeypatch.delenv(progress.QUIET_ENV, raising=False)
    assert not progress.enabled(stream=io.StringIO())
    master, slave = os.openpty()
    try:
        with os.fdopen(slave, "w", closefd=False) as tty:
            assert progress.enabled(stream=tty)
            assert not progress.enabled(quiet=True, stream=tty)
            monkeypatch.setenv(progress.QUIET_ENV, "1")
            assert not progress.enabled(stream=tty)
    finally:
        os.close(master)
        os.close(slave)


def run_on_a_tty(*args: str, timeout: float = 300) -> tuple[int, str, str]:
    """Run facelake with stderr on a pseudo-terminal; return (exit code, stdout, what the terminal got)."""
    master, slave = os.openpty()
    chunks: list[bytes] = []

    def drain() -> None:
        while True:
            try:
                data = os.read(master, 65536)
            except OSError:
                return
            if not data:
                return
            chunks.append(data)

    reader = threading.Thread(target=drain, daemon=True)
    reader.start()
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", progress.QUIET_ENV)}
    env["COLUMNS"] = "160"
    try:
        proc = subprocess.run([sys.executable, "-m", "facelake.jobs.cli", *args], stdout=subprocess.PIPE,
                              stderr=slave, text=True, timeout=timeout, env=env)
    finally:
        os.close(slave)
        reader.join(timeout=10)
        os.close(master)
    return proc.returncode, proc.stdout, b"".join(chunks).decode(errors="replace")


@pytest.mark.timeout(900)
def test_index_shows_progress_on_a_terminal_and_not_with_quiet(tmp_path):
    faces = tmp_path / "out" / "faces"
    storage.write_table(str(faces / "part-0.parquet"), synthetic_faces(800))
    code, stdout, terminal = run_on_a_tty("index", str(tmp_path / "out"), "--root", str(tmp_path / "r1"))
    assert code == 0, terminal
    assert "published index version" in stdout
    assert "index" in terminal and "3/3" in terminal and "steps/s" in terminal, terminal
    code, stdout, terminal = run_on_a_tty("--quiet", "index", str(tmp_path / "out"), "--root", str(tmp_path / "r2"))
    assert code == 0, terminal
    assert "steps" not in terminal and "published index version" in stdout


@pytest.mark.timeout(900)
def test_search_shows_probe_progress_on_a_terminal(tmp_path):
    faces = tmp_path / "out" / "faces"
    storage.write_table(str(faces / "part-0.parquet"), synthetic_faces(600))
    code, _, terminal = run_on_a_tty("--quiet", "index", str(tmp_path / "out"), "--root", str(tmp_path / "root"))
    assert code == 0, terminal
    code, stdout, terminal = run_on_a_tty("search", str(faces), "--root", str(tmp_path / "root"),
                                          "--out", str(tmp_path / "results"), "--purpose", "progress test")
    assert code == 0, terminal + stdout
    assert "search" in terminal and "600/600" in terminal and "probe faces/s" in terminal, terminal
