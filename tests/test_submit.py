"""`facelake submit` / `facelake jobs` against a real Ray head started here (dashboard + job server on 127.0.0.1).

The head is `ray start --head --block` run as a subprocess in its own process group with its own
ports and temp dir, and stopped by signalling that group: `ray stop` would kill every Ray on the
machine, other people's test clusters included. Jobs' drivers run in their own sessions, so the
teardown also ends any process whose environment points at this head, and checks none is left.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from facelake.cluster import runtime
from facelake.cluster import submit as jobsubmit
from facelake.errors import ConfigError

REPO = Path(__file__).resolve().parents[1]
VENV_BIN = Path(sys.executable).parent
FACELAKE = str(VENV_BIN / "facelake")
RAY = str(VENV_BIN / "ray")
PLANTED_SECRET = "planted-SECRET-value-9f3c1d7e"  # must never leave this process

pytestmark = pytest.mark.slow


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class RayHead:
    """A Ray head node owned by this test module: started with --block, stopped by its process group."""

    def __init__(self, auth_token: str | None = None) -> None:
        self.auth_token = auth_token
        self.temp_dir = tempfile.mkdtemp(prefix="flray-", dir="/tmp")
        self.gcs_port = _free_port()
        self.dashboard_port = _free_port()
        self.address = f"http://127.0.0.1:{self.dashboard_port}"
        ports = {  # every fixed default port moved, so this head never collides with another one
            "--ray-client-server-port": _free_port(), "--dashboard-agent-listen-port": _free_port(),
            "--dashboard-agent-grpc-port": _free_port(), "--runtime-env-agent-port": _free_port(),
            "--metrics-export-port": _free_port(), "--node-manager-port": _free_port(),
            "--object-manager-port": _free_port(),
        }
        # Two logical CPUs (not cores): Ray Data's ListFiles stage asks for a whole CPU next to
        # embed's 0.5-CPU actor, so a 1-CPU head would wait forever. The work itself stays small.
        cmd = [RAY, "start", "--head", "--block", f"--port={self.gcs_port}", "--num-cpus=2", "--num-gpus=0",
               "--include-dashboard=true", "--dashboard-host=127.0.0.1", f"--dashboard-port={self.dashboard_port}",
               f"--temp-dir={self.temp_dir}", f"--object-store-memory={200 * 1024 * 1024}", "--disable-usage-stats",
               *[f"{k}={v}" for k, v in ports.items()]]
        # Ray enables token auth on a new head when ~/.ray/auth_token exists (any local ray.init()
        # may have written it); this head states its mode so the tests do not depend on that file.
        env = dict(os.environ, RAY_USAGE_STATS_ENABLED="0", RAY_AUTH_MODE="disabled")
        if auth_token:  # README's quick start: token auth with the token given in the environment
            env.update(RAY_AUTH_MODE="token", RAY_AUTH_TOKEN=auth_token)
        # Job entrypoints run `facelake` from the head's PATH, as on a cluster whose image has it
        # installed; here that is this virtualenv's bin folder (not on PATH under `make test`).
        env["PATH"] = os.path.dirname(sys.executable) + os.pathsep + env.get("PATH", "")
        self.log = open(os.path.join(self.temp_dir, "head.log"), "wb")
        self.proc = subprocess.Popen(cmd, stdout=self.log, stderr=subprocess.STDOUT, env=env,
                                     start_new_session=True, cwd=self.temp_dir)

    def wait_ready(self, timeout_s: float = 300) -> None:  # a loaded 2-core machine needs minutes
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"ray head exited: {Path(self.log.name).read_text()[-3000:]}")
            try:
                if not self.auth_token:  # a token head refuses this unauthenticated request
                    with urllib.request.urlopen(f"{self.address}/api/version", timeout=2) as resp:
                        json.load(resp)
                jobsubmit.client(self.address).list_jobs()
                return
            except ConfigError as err:
                if self.auth_token and "refused this client" in str(err):
                    return  # up, and refusing this process, which holds no token
                time.sleep(1)
            except Exception:
                time.sleep(1)
        raise RuntimeError(f"ray head not ready in {timeout_s}s: {Path(self.log.name).read_text()[-3000:]}")

    def _own_pids(self) -> list[int]:
        """Processes of this head: its process group, or an environment naming its GCS port or temp dir."""
        marks = (f":{self.gcs_port}".encode(), self.temp_dir.encode())
        found = []
        for entry in os.listdir("/proc"):
            if not entry.isdigit() or int(entry) == os.getpid():
                continue
            pid = int(entry)
            try:
                if os.getpgid(pid) == self.proc.pid:
                    found.append(pid)
                    continue
                with open(f"/proc/{pid}/environ", "rb") as handle:
                    environ = handle.read().split(b"\0")
                with open(f"/proc/{pid}/cmdline", "rb") as handle:
                    cmdline = handle.read()
            except (OSError, ProcessLookupError):
                continue
            ray_address = [v for v in environ if v.startswith(b"RAY_ADDRESS=")]
            if any(m in v for v in ray_address for m in marks) or self.temp_dir.encode() in cmdline:
                found.append(pid)
        return found

    def stop(self) -> list[int]:
        """Stop the head and everything it started; return pids still alive afterwards (should be [])."""
        if self.auth_token:
            os.environ.update(RAY_AUTH_MODE="token", RAY_AUTH_TOKEN=self.auth_token)
        try:
            jobs = jobsubmit.client(self.address)
            for info in jobs.list_jobs():
                if str(getattr(info.status, "value", info.status)) not in jobsubmit.TERMINAL:
                    jobs.stop_job(info.submission_id)
        except Exception:
            pass
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)  # --block drains, then ends its processes
            try:
                self.proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                pass
        for _ in range(3):
            pids = self._own_pids()
            if not pids:
                break
            for pid in pids:
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
            time.sleep(1)
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(timeout=10)
        self.log.close()
        left = self._own_pids()
        shutil.rmtree(self.temp_dir, ignore_errors=True)
        return left


@pytest.fixture(scope="module")
def ray_head():
    head = RayHead()
    try:
        head.wait_ready()
        yield head
    finally:
        left = head.stop()
        assert not left, f"processes of the test's Ray head still running: {left}"


def facelake(*args: str, timeout: float = 300, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([FACELAKE, *args], capture_output=True, text=True, timeout=timeout,
                          env=env or dict(os.environ), cwd=REPO)


def _job_id_from(stdout: str) -> str:
    ids = re.findall(r"\bfacelake-[a-z0-9-]+-\d{8}-\d{6}-[0-9a-f]{6}\b", stdout)
    assert ids, stdout
    return ids[-1]


# --- validation, no cluster needed ----------------------------------------------------------


def test_entrypoint_quotes_arguments_and_needs_a_subcommand():
    assert jobsubmit.entrypoint(["embed", "my photos.parquet", "--out", "s3://b/out"]) == \
        "facelake embed 'my photos.parquet' --out s3://b/out"
    assert jobsubmit.entrypoint(["facelake", "weights"]) == "facelake weights"
    for bad in ([], ["--wait"], ["submit", "weights"]):
        with pytest.raises(ConfigError):
            jobsubmit.entrypoint(bad)


def test_metadata_tags_command_user_and_search_purpose():
    meta = jobsubmit.job_metadata(["search", "q.parquet", "--index", "ix", "--purpose", "fraud review #12"], user="ana")
    assert meta[jobsubmit.FACELAKE_TAG] == "search"
    assert meta[jobsubmit.USER_TAG] == "ana"
    assert meta[jobsubmit.PURPOSE_TAG] == "fraud review #12"
    assert jobsubmit.PURPOSE_TAG not in jobsubmit.job_metadata(["embed", "m", "--out", "o"], user="ana")
    assert jobsubmit.job_metadata(["search", "q", "--purpose=audit"])[jobsubmit.PURPOSE_TAG] == "audit"


def test_submission_id_names_the_command():
    one, two = jobsubmit.submission_id(["rebuild", "m"]), jobsubmit.submission_id(["rebuild", "m"])
    assert one.startswith("facelake-rebuild-") and one != two


def test_secrets_are_refused_and_never_in_runtime_env(monkeypatch):
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", PLANTED_SECRET)
    monkeypatch.setenv("AWS_SESSION_TOKEN", PLANTED_SECRET + "-token")
    monkeypatch.setenv("FACELAKE_S3_ENDPOINT_URL", "http://minio:9000")
    env = jobsubmit.runtime_env()
    assert env["env_vars"]["FACELAKE_S3_ENDPOINT_URL"] == "http://minio:9000"
    assert PLANTED_SECRET not in json.dumps(env)
    assert not any(k.startswith("AWS_SECRET") or k.endswith("TOKEN") for k in env["env_vars"])
    with pytest.raises(ConfigError, match="credential"):
        jobsubmit.entrypoint(["embed", "m", "--out", f"s3://b/o?key={PLANTED_SECRET}"])
    with pytest.raises(ConfigError, match="user:password"):
        jobsubmit.entrypoint(["embed", "s3://ana:hunter22@bucket/m", "--out", "o"])


def test_token_error_names_the_environment_variable_and_the_heads_file():
    """The quick start keeps the token in RAY_AUTH_TOKEN; a head that generated one has it in a file."""
    for env in ({}, {"RAY_AUTH_TOKEN": "the-secret-token-value"}):
        message = runtime.auth_message("Ray's job server at http://head:8265", env)
        assert "RAY_AUTH_TOKEN" in message and "~/.ray/auth_token" in message, message
        assert "the-secret-token-value" not in message
    assert "RAY_AUTH_MODE=token" in runtime.auth_message("Ray cluster head:6379", {})


def test_address_is_checked_before_contacting_anything():
    for bad in (None, "", "ray://head:10001", "ftp://head:8265", "http://ana:pw@head:8265"):
        with pytest.raises(ConfigError):
            jobsubmit.client(bad)


def test_unreachable_job_server_says_what_to_check():
    with pytest.raises(ConfigError, match="cannot reach Ray's job server"):
        jobsubmit.client(f"http://127.0.0.1:{_free_port()}")


def test_cli_unreachable_exits_2():
    result = facelake("jobs", "list", "--address", f"http://127.0.0.1:{_free_port()}", timeout=120)
    assert result.returncode == 2, result.stderr
    assert "cannot reach Ray's job server" in result.stderr


# --- against the real head --------------------------------------------------------------------


def test_submit_wait_succeeds_and_jobs_show_it(ray_head, provisioned_weights, monkeypatch):
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", PLANTED_SECRET)
    result = facelake("submit", "--address", ray_head.address, "--wait", "--", "weights")
    assert result.returncode == 0, result.stdout + result.stderr
    assert "ok  " in result.stdout  # the job's own output, streamed back
    job_id = _job_id_from(result.stderr)
    assert job_id.startswith("facelake-weights-")

    row = jobsubmit.status(ray_head.address, job_id)
    assert row.status == "SUCCEEDED" and row.command == "weights" and row.entrypoint == "facelake weights"

    listed = facelake("jobs", "list", "--address", ray_head.address)
    assert listed.returncode == 0, listed.stderr
    line = next(l for l in listed.stdout.splitlines() if job_id in l)
    assert "SUCCEEDED" in line and "facelake weights" in line

    logs = facelake("jobs", "logs", job_id, "--address", ray_head.address)
    assert logs.returncode == 0 and "ok  " in logs.stdout

    status = facelake("jobs", "status", job_id, "--address", ray_head.address)
    assert status.returncode == 0 and "SUCCEEDED" in status.stdout

    # The planted secret is nowhere in what the cluster holds or shows about the job.
    info = jobsubmit.client(ray_head.address).get_job_info(job_id)
    assert PLANTED_SECRET not in info.model_dump_json()
    ray_list = subprocess.run([RAY, "job", "list", "--address", ray_head.address],
                              capture_output=True, text=True, timeout=120)
    assert ray_list.returncode == 0, ray_list.stderr
    assert job_id in ray_list.stdout and PLANTED_SECRET not in ray_list.stdout


def test_submit_without_wait_prints_the_id_and_returns(ray_head):
    result = facelake("submit", "--address", ray_head.address, "--", "sleep", "1")
    assert result.returncode == 0, result.stderr
    job_id = result.stdout.strip()
    assert job_id.startswith("facelake-sleep-")
    assert jobsubmit.follow(ray_head.address, job_id, out=open(os.devnull, "w")) == "SUCCEEDED"


def test_failing_job_ends_failed_with_its_error(ray_head):
    result = facelake("submit", "--address", ray_head.address, "--wait", "--", "weights", "--model", "nope")
    assert result.returncode == jobsubmit.EXIT_FAILED, result.stdout + result.stderr
    job_id = _job_id_from(result.stderr)
    assert "FAILED" in result.stderr
    assert "nope" in result.stdout  # the CLI's one-line error, streamed from the job
    row = jobsubmit.status(ray_head.address, job_id)
    assert row.status == "FAILED"
    assert "error:" in jobsubmit.logs(ray_head.address, job_id)
    status = facelake("jobs", "status", job_id, "--address", ray_head.address)
    assert status.returncode == jobsubmit.EXIT_FAILED


def test_head_without_facelake_on_path_is_named(ray_head):
    """A job whose shell finds no `facelake` (a head without it installed) gets a hint naming the fix."""
    jobs = jobsubmit.client(ray_head.address)
    job_id = jobs.submit_job(entrypoint="facelake weights", runtime_env={"env_vars": {"PATH": "/usr/bin:/bin"}})
    deadline = time.monotonic() + 300
    while jobsubmit.status(ray_head.address, job_id).status not in jobsubmit.TERMINAL and time.monotonic() < deadline:
        time.sleep(1)
    row = jobsubmit.status(ray_head.address, job_id)
    assert row.status == "FAILED", row
    hint = jobsubmit.failure_hint(row.message, jobsubmit.logs(ray_head.address, job_id))
    assert hint and "--pip" in hint and "PATH" in hint, (row.message, hint)
    assert jobsubmit.failure_hint("Job entrypoint command failed with exit code 1") is None


def test_stop_ends_a_long_job(ray_head):
    job_id = jobsubmit.submit(ray_head.address, ["sleep", "600"])
    deadline = time.monotonic() + 120
    while "sleeping" not in jobsubmit.logs(ray_head.address, job_id):
        assert time.monotonic() < deadline, "the long job never started"
        time.sleep(1)
    still = facelake("jobs", "status", job_id, "--address", ray_head.address)
    assert still.returncode == jobsubmit.EXIT_NOT_FINISHED and "RUNNING" in still.stdout
    stopped = facelake("jobs", "stop", job_id, "--address", ray_head.address)
    assert stopped.returncode == 0, stopped.stdout + stopped.stderr
    assert "STOPPED" in stopped.stdout
    assert jobsubmit.status(ray_head.address, job_id).status == "STOPPED"
    after = facelake("jobs", "status", job_id, "--address", ray_head.address)
    assert after.returncode == jobsubmit.EXIT_STOPPED
    assert "slept" not in jobsubmit.logs(ray_head.address, job_id)


def test_unknown_job_is_a_clear_error(ray_head):
    result = facelake("jobs", "logs", "facelake-nope-0", "--address", ray_head.address)
    assert result.returncode == 2 and "no job 'facelake-nope-0'" in result.stderr


def test_list_shows_only_facelakes_jobs(ray_head):
    jobs = jobsubmit.client(ray_head.address)
    other = jobs.submit_job(entrypoint="echo not-facelake")
    rows = jobsubmit.list_jobs(ray_head.address)
    assert other not in {r.job_id for r in rows}
    assert all(r.job_id.startswith("facelake-") for r in rows)


def test_submitted_embed_writes_its_output(ray_head, provisioned_weights, tmp_path):
    photos = ["img1.jpg", "img2.jpg", "img3.jpg"]
    shutil.copytree(REPO / "samples" / "faces", tmp_path / "faces",
                    ignore=lambda d, names: [n for n in names if n not in photos])
    manifest = tmp_path / "manifest.parquet"
    pq.write_table(pa.table({"image_id": [p[:-4] for p in photos], "uri": [str(tmp_path / "faces" / p) for p in photos]}),
                   manifest)
    out = tmp_path / "out"
    result = facelake("submit", "--address", ray_head.address, "--wait", "--",
                      "embed", str(manifest), "--out", str(out), "--workers", "1", "--address", "auto", timeout=600)
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-2000:]
    assert list((out / "faces").glob("*.parquet")), result.stdout[-4000:]
    assert list((out / "_runs").glob("*.json"))
    faces = pq.read_table(out / "faces")
    assert set(faces.column("image_id").to_pylist()) <= {p[:-4] for p in photos}

    bad = facelake("submit", "--address", ray_head.address, "--wait", "--",
                   "embed", str(tmp_path / "missing.parquet"), "--out", str(tmp_path / "out2"), "--address", "auto",
                   timeout=600)
    assert bad.returncode == jobsubmit.EXIT_FAILED, bad.stdout + bad.stderr
    assert "manifest" in jobsubmit.logs(ray_head.address, _job_id_from(bad.stderr)).lower()


def test_cluster_package_never_imports_jobs():
    for path in (REPO / "cluster").rglob("*.py"):
        text = path.read_text()
        assert not re.search(r"^\s*(from|import)\s+facelake\.jobs", text, re.M), path
        assert "from facelake import jobs" not in text, path


# --- README's "Run on a Ray cluster" quick start: a head with token auth, then submit ------

@pytest.fixture(scope="module")
def token_head():
    head = RayHead(auth_token="facelake-test-token-" + os.urandom(8).hex())
    saved = {k: os.environ.get(k) for k in ("RAY_AUTH_MODE", "RAY_AUTH_TOKEN")}
    try:
        head.wait_ready()
        yield head
    finally:
        left = head.stop()
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
        assert not left, f"processes of the test's Ray head still running: {left}"


def test_quick_start_token_head_refuses_without_token_then_runs_the_job(token_head, provisioned_weights):
    bare = {k: v for k, v in os.environ.items() if k not in ("RAY_AUTH_MODE", "RAY_AUTH_TOKEN")}
    for args in (("jobs", "list", "--address", token_head.address),
                 ("submit", "--address", token_head.address, "--", "weights")):
        refused = facelake(*args, env=bare)
        lines = [ln for ln in refused.stderr.splitlines() if ln.strip()]
        assert refused.returncode == 2, refused.stderr
        assert len(lines) == 1 and lines[0].startswith("error: "), refused.stderr
        assert "RAY_AUTH_MODE=token" in lines[0] and "RAY_AUTH_TOKEN" in lines[0]
        assert token_head.auth_token not in refused.stderr
    wrong = facelake("jobs", "list", "--address", token_head.address,
                     env={**bare, "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": "not-the-token"})
    assert wrong.returncode == 2 and "was refused" in wrong.stderr and "not-the-token" not in wrong.stderr
    with_token = {**bare, "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": token_head.auth_token}
    done = facelake("submit", "--address", token_head.address, "--wait", "--", "weights", env=with_token, timeout=600)
    assert done.returncode == 0, done.stdout + done.stderr
    listed = facelake("jobs", "list", "--address", token_head.address, env=with_token)
    assert listed.returncode == 0 and "weights" in listed.stdout and "SUCCEEDED" in listed.stdout, listed.stdout
