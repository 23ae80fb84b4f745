"""The `facelake` command as a user runs it: a subprocess, its output and its exit code."""

from __future__ import annotations

import json
import os
import re
import stat
import subprocess
import sys

import pyarrow as pa

from facelake import storage
from facelake.jobs import cli
from tests.helpers import sample_manifest, synthetic_faces

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


def test_log_is_private_to_the_user_and_holds_a_user_error_as_one_line(tmp_path):
    """Without FACELAKE_LOG the log is under XDG_STATE_HOME, folder 0700, file 0600; a user error
    is logged as its message, an unexpected one with its traceback."""
    state = tmp_path / "state"
    env = {"XDG_STATE_HOME": str(state), "FACELAKE_LOG": ""}
    missing = tmp_path / "nothing"
    refused = facelake_env(env, "status", str(missing))
    assert refused.returncode == 2, refused.stderr
    log = state / "facelake" / "facelake.log"
    assert stat.S_IMODE(log.parent.stat().st_mode) == 0o700
    assert stat.S_IMODE(log.stat().st_mode) == 0o600
    text = log.read_text()
    assert "ConfigError: ROOT" in text and "does not exist" in text and "Traceback" not in text
    body = [ln for ln in text.splitlines() if not ln.startswith("--- ")]
    assert len(body) == 1, text
    root = tmp_path / "root"
    root.mkdir()
    (root / "TABLE").write_text("{not json")
    failed = facelake_env(env, "status", str(root))
    assert failed.returncode == 1 and str(log) in failed.stderr
    assert "Traceback" in log.read_text()


def _heavy_modules_after(*args: str) -> list[str]:
    """The heavy libraries loaded by `facelake ARGS` run in a fresh interpreter."""
    code = ("import json, sys\nfrom facelake.jobs import cli\ntry:\n    cli.main(sys.argv[1:])\n"
            "except SystemExit:\n    pass\n"
            "heavy = ('ray', 'faiss', 'deepface', 'cv2', 'pyarrow', 'onnxruntime', 'openvino', 'onnx')\n"
            "print(json.dumps(sorted(m for m in heavy if m in sys.modules)))")
    result = subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout.strip().splitlines()[-1])


def test_help_imports_no_job_library():
    assert _heavy_modules_after("--help") == []
    assert _heavy_modules_after() == []
    assert "pyarrow" in _heavy_modules_after("status", "--help")   # a command's help loads its module only


def test_command_summaries_are_the_commands_docstrings():
    """`facelake --help` lists COMMANDS' summaries without importing the modules: they must agree."""
    registered = {}
    for entry in cli.COMMANDS.values():
        registered.update(cli.load_module_commands(entry.module))
    assert set(registered) == set(cli.COMMANDS)
    for name, entry in cli.COMMANDS.items():
        first = " ".join(registered[name].help.split("\n\n")[0].split())
        assert (first, registered[name].hidden) == (entry.summary, entry.hidden), name


def test_options_required_at_run_time_show_as_required():
    for command in ("search", "calibrate"):
        params = {p.name: p for p in cli.load_module_commands(cli.COMMANDS[command].module)[command].params}
        assert params["purpose"].required, command
    shown = facelake("search", "--help")
    assert shown.returncode == 0
    purpose = shown.stdout[shown.stdout.index("--purpose"):shown.stdout.index("--mode")]
    assert "required" in purpose, shown.stdout


# What Ray, Ray Data and OpenCV print unless --verbose: the token-auth warning, Ray's and Ray
# Data's INFO lines, Ray Data's progress-bar notice, OpenCV's "[ WARN:0@1.2] ..." from workers.
# Not here: Ray's C++ core logs "... E ... core_worker.cc: Actor ... has constructor arguments in
# the object store" on the driver's stderr for every Ray Data actor pool, past any log level.
NOISE = re.compile(r"Token authentication|\bINFO\b|Progress bars disabled|\[ ?WARN:|Started a local Ray|"
                   r"\[[\d-]+ [\d:,]+ [WI] \d+ \d+\]")


def test_ray_commands_are_quiet_unless_verbose(tmp_path, provisioned_weights):
    manifest = tmp_path / "m.parquet"
    storage.write_table(str(manifest), sample_manifest(["img1.jpg", "img2.jpg"]))
    embedded = facelake("embed", str(manifest), "--out", str(tmp_path / "out"), "--workers", "1")
    assert embedded.returncode == 0, embedded.stderr
    assert not NOISE.search(embedded.stderr), embedded.stderr
    root = tmp_path / "root"
    built = facelake("index", str(tmp_path / "out"), "--root", str(root))
    assert built.returncode == 0 and not NOISE.search(built.stderr), built.stderr
    loud = facelake("--verbose", "index", str(tmp_path / "out"), "--root", str(root))
    assert loud.returncode == 0 and "Started a local Ray" in loud.stderr, loud.stderr


def facelake_env(extra: dict, *args: str, timeout: int = 300) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    env.update(extra)
    return subprocess.run([sys.executable, "-m", "facelake.jobs.cli", *args], capture_output=True,
                          text=True, timeout=timeout, env=env)
