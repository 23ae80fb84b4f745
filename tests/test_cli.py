"""The `facelake` command as a user runs it: a subprocess, its output and its exit code."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pyarrow as pa

from facelake import storage
from tests.helpers import synthetic_faces

COMMANDS = ("weights", "embed", "index", "search", "audit", "rebuild", "erase", "status",
            "evaluate", "submit", "jobs", "demo")


def facelake(*args: str, timeout: int = 300) -> subprocess.CompletedProcess:
    env = {**os.environ, "RAY_ADDRESS": ""}
    env.pop("RAY_ADDRESS")
    return subprocess.run([sys.executable, "-m", "facelake.jobs.cli", *args], capture_output=True,
                          text=True, timeout=timeout, env=env)


def test_help_lists_every_command():
    result = facelake("--help")
    assert result.returncode == 0, result.stderr
    for command in COMMANDS:
        assert command in result.stdout, f"`facelake --help` does not list {command}"


def test_index_then_status_from_the_command_line(tmp_path):
    faces = tmp_path / "faces"
    storage.write_table(str(faces / "part-0.parquet"), synthetic_faces(3000))
    root = tmp_path / "root"
    built = facelake("index", str(faces), "--root", str(root), "--shards", "2")
    assert built.returncode == 0, built.stderr
    live = json.loads((root / "index" / "CURRENT").read_text())["version"]
    assert live in built.stdout
    manifest = json.loads((root / "index" / live / "manifest.json").read_text())
    assert manifest["total"] == 3000 and len(manifest["shards"]) == 2
    assert f"nlist {manifest['nlist']}" in built.stdout or str(manifest["nlist"]) in built.stdout

    status = facelake("status", str(root))
    assert status.returncode == 0, status.stderr
    assert live in status.stdout


def test_user_errors_exit_2_with_one_clear_line(tmp_path):
    both = facelake("index", str(tmp_path), "--root", str(tmp_path / "r"), "--shards", "2", "--shard-size", "5")
    assert both.returncode == 2 and "not both" in both.stderr
    missing = facelake("embed", str(tmp_path / "nothing.parquet"), "--out", str(tmp_path / "o"))
    assert missing.returncode == 2 and "no manifest" in missing.stderr
    assert "Traceback" not in missing.stderr


def _one_error_line(result: subprocess.CompletedProcess) -> str:
    """The user error as printed: exactly one stderr line, starting "error:", and exit code 2."""
    lines = [ln for ln in result.stderr.splitlines() if ln.strip()]
    assert result.returncode == 2, (result.returncode, result.stderr)
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    return lines[0]


def test_embed_out_folder_is_accepted_by_index_and_counted_by_status(tmp_path):
    """`index OUT` after `embed --out OUT`: OUT holds faces/, errors/ and _runs/ of other schemas."""
    out = tmp_path / "out"
    storage.write_table(str(out / "faces" / "part-0.parquet"), synthetic_faces(600))
    storage.write_table(str(out / "errors" / "part-0.parquet"),
                        pa.table({"image_id": ["bad"], "uri": ["x.jpg"], "stage": ["decode"]}))
    (out / "_runs").mkdir()
    (out / "_runs" / "r.json").write_text("{}")
    root = tmp_path / "root"
    built = facelake("index", str(out), "--root", str(root), "--shards", "1")
    assert built.returncode == 0, built.stderr
    status = facelake("status", str(root))
    assert status.returncode == 0, status.stderr
    assert "the live index holds 600 faces of 600 images" in status.stdout, status.stdout


def test_reserved_manifest_column_refused_naming_it(tmp_path):
    manifest = tmp_path / "m.parquet"
    storage.write_table(str(manifest), pa.table({"image_id": ["a"], "uri": ["a.jpg"], "_kind": ["x"],
                                                 "stage": ["y"], "note": ["fine"]}))
    line = _one_error_line(facelake("embed", str(manifest), "--out", str(tmp_path / "o")))
    assert "['_kind', 'stage']" in line and "rename" in line
    assert not (tmp_path / "o").exists()


def test_usage_errors_are_one_error_line_exit_2(tmp_path):
    assert "--out" in _one_error_line(facelake("search", "p", "--root", str(tmp_path)))
    assert "MANIFEST" in _one_error_line(facelake("embed"))
    assert "frob" in _one_error_line(facelake("frob"))
    assert "--bogus" in _one_error_line(facelake("index", "x", "--root", "y", "--bogus"))
    assert "--purpose is required" in _one_error_line(
        facelake("search", "p", "--root", str(tmp_path), "--out", str(tmp_path / "o")))


def test_mistyped_root_is_never_created(tmp_path):
    missing = tmp_path / "roott"
    for args in (("status", str(missing)), ("audit", str(missing)),
                 ("search", "p.parquet", "--root", str(missing), "--out", str(tmp_path / "o"), "--purpose", "x"),
                 ("erase", "a", "--root", str(missing), "--reason", "test")):
        line = _one_error_line(facelake(*args))
        assert "does not exist" in line and str(missing) in line
        assert not missing.exists(), args


def test_traceback_only_with_debug_and_always_in_the_log(tmp_path):
    """A failure that is not a user error: exit 1, one line naming the log; --debug prints the traceback."""
    root = tmp_path / "root"
    root.mkdir()
    (root / "TABLE").write_text("{not json")  # a raw JSONDecodeError inside root.py today
    log = tmp_path / "facelake.log"
    env_log = {"FACELAKE_LOG": str(log)}
    plain = facelake_env(env_log, "status", str(root))
    lines = [ln for ln in plain.stderr.splitlines() if ln.strip()]
    assert plain.returncode == 1 and len(lines) == 1 and lines[0].startswith("error: "), plain.stderr
    assert str(log) in lines[0] and "--debug" in lines[0]
    assert "Traceback" in log.read_text()
    debug = facelake_env(env_log, "--debug", "status", str(root))
    assert debug.returncode == 1 and "Traceback" in debug.stderr


def facelake_env(extra: dict, *args: str, timeout: int = 300) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    env.update(extra)
    return subprocess.run([sys.executable, "-m", "facelake.jobs.cli", *args], capture_output=True,
                          text=True, timeout=timeout, env=env)
