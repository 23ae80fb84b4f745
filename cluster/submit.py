"""Submit facelake commands to a Ray cluster through Ray's Job Submission API, and follow them.

A submitted job runs ``facelake <command...>`` as its entrypoint on the cluster's head node (the
job's driver); the laptop or scheduler that submitted it may go away. Jobs are tagged in their
metadata (``facelake_command``, ``facelake_user``, ``facelake_purpose`` for searches) so that
``list_jobs`` shows facelake's jobs only.

How facelake reaches the cluster: it is installed on the cluster's image or nodes (the launcher
YAML and the KubeRay manifests in cluster/schedule/ do it), because its native wheels (faiss,
onnxruntime, opencv; the GPU variants on GPU nodes) are too heavy to install per job. ``pip``
names a facelake requirement to install into the job's runtime environment instead, e.g. for a
version the image does not have; Ray caches that environment per node.

Credentials never travel with a job: not in the entrypoint, the metadata or the runtime
environment, all of which ``ray job list`` shows to anyone who can reach the dashboard. Only the
non-secret configuration of ``cluster.runtime.WORKER_ENV_KEYS`` (endpoint, region, model folder)
is sent; the cluster's nodes read storage credentials from their own AWS credential chain
(instance profile, IRSA / pod identity, or a Kubernetes secret mounted as env on the pods).

This module never imports facelake.jobs: the CLI layer calls it, not the other way round.
"""

from __future__ import annotations

import asyncio
import getpass
import logging
import os
import re
import secrets
import shlex
import sys
import time
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Sequence, TextIO

from facelake.cluster.runtime import WORKER_ENV_KEYS, auth_message
from facelake.errors import ConfigError

log = logging.getLogger(__name__)

# Metadata keys put on every job facelake submits; FACELAKE_TAG marks the job as facelake's.
FACELAKE_TAG = "facelake_command"
USER_TAG = "facelake_user"
PURPOSE_TAG = "facelake_purpose"
VERSION_TAG = "facelake_version"

# Sent to the job's runtime environment. PYTHONPATH is the submitter's own and means nothing
# on the cluster's nodes, so it is left out.
SUBMIT_ENV_KEYS = tuple(key for key in WORKER_ENV_KEYS if key != "PYTHONPATH")

# Names that look like secrets are refused in the runtime environment even if someone adds
# them to WORKER_ENV_KEYS by mistake: env_vars are shown by `ray job list`.
_SECRET_NAME = re.compile(r"SECRET|TOKEN|PASSWORD|PASSWD|CREDENTIAL|ACCESS_KEY|PRIVATE", re.I)
# Environment variables whose values must never appear in what is sent.
SECRET_ENV_KEYS = ("AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_SECURITY_TOKEN", "AWS_ACCESS_KEY_ID")

# Exit codes of `facelake submit --wait` / `facelake jobs status|stop`; 2 stays the CLI's
# code for user errors (FacelakeError).
EXIT_SUCCEEDED = 0
EXIT_FAILED = 1
EXIT_STOPPED = 3
EXIT_NOT_FINISHED = 4

TERMINAL = ("SUCCEEDED", "FAILED", "STOPPED")
# Poll interval while waiting for a status change; the dashboard is cheap to ask once a second.
POLL_S = 1.0
# How long `stop` waits for a job to reach STOPPED before giving up.
STOP_TIMEOUT_S = 60.0


@dataclass(frozen=True)
class JobRow:
    """One facelake job as `facelake jobs list` shows it."""

    job_id: str
    status: str
    command: str
    entrypoint: str
    user: str
    purpose: str | None
    start: datetime | None
    end: datetime | None
    message: str

    @property
    def duration_s(self) -> float | None:
        if self.start is None:
            return None
        end = self.end or datetime.now(timezone.utc)
        return max(0.0, (end - self.start).total_seconds())


def exit_code(status: str) -> int:
    """The process exit code for a job's status: 0 succeeded, 1 failed, 3 stopped, 4 not finished."""
    return {"SUCCEEDED": EXIT_SUCCEEDED, "FAILED": EXIT_FAILED, "STOPPED": EXIT_STOPPED}.get(
        _status_name(status), EXIT_NOT_FINISHED)


def client(address: str):
    """A JobSubmissionClient for the dashboard at ``address`` (http://HEAD:8265).

    Translates a connection failure into an error that says what to check.
    """
    from ray.exceptions import AuthenticationError
    from ray.job_submission import JobSubmissionClient

    address = _check_address(address)
    try:
        return JobSubmissionClient(address)
    except AuthenticationError as err:
        raise ConfigError(auth_message(f"Ray's job server at {address}", os.environ)) from err
    except (ConnectionError, RuntimeError) as err:
        raise ConfigError(
            f"cannot reach Ray's job server at {address}: {err}. Check the address (the head's "
            "dashboard port, 8265 by default), that the head was started with the dashboard "
            "(ray[default] installed, --dashboard-host reachable from here) and any tunnel or firewall"
        ) from err


def failure_hint(message: str, logs: str = "") -> str | None:
    """What to change when a job failed because the head could not run `facelake` at all."""
    text = f"{message}\n{logs[-4000:]}"
    if "facelake: not found" in text or "facelake: command not found" in text or "exit code 127" in text:
        return ("the cluster could not run `facelake`: install facelake (the same version as here) on the "
                "cluster's image or nodes so it is on the head's PATH, or pass --pip 'facelake==X.Y' "
                "to install it into the job's environment")
    return None


def entrypoint(command: Sequence[str]) -> str:
    """The shell command a job runs: ``facelake`` and the given arguments, each quoted."""
    if not command:
        raise ConfigError("give the facelake command to run after `--`, e.g. "
                          "`facelake submit --address http://HEAD:8265 -- embed MANIFEST --out OUT`")
    args = list(command)
    if args[0] == "facelake":
        args = args[1:]
    if not args or args[0].startswith("-"):
        raise ConfigError(f"the job's command must start with a facelake subcommand, got {shlex.join(args)!r}")
    if args[0] == "submit":
        raise ConfigError("`submit` cannot run as a job itself; give the command to run on the cluster")
    _refuse_secrets(args)
    return shlex.join(["facelake", *args])


def job_metadata(command: Sequence[str], *, user: str | None = None) -> dict[str, str]:
    """Tags for the job: facelake command, user, facelake version and, for searches, the purpose."""
    args = [a for a in command if a != "facelake"]
    if not args:
        raise ConfigError("no facelake command to tag; give the subcommand to run")
    meta = {FACELAKE_TAG: args[0], USER_TAG: user or _user(), VERSION_TAG: _version()}
    purpose = _option_value(args, "--purpose")
    if args[0] == "search" and purpose:
        meta[PURPOSE_TAG] = purpose
    _refuse_secrets(meta.values())
    return meta


def runtime_env(*, pip: Sequence[str] | None = None) -> dict:
    """The job's runtime environment: non-secret facelake configuration, optionally a pip install."""
    env = {key: os.environ[key] for key in SUBMIT_ENV_KEYS if key in os.environ}
    env.setdefault("DEEPFACE_BACKEND_ENGINE", "onnx")
    for key in env:
        if _SECRET_NAME.search(key):
            raise ConfigError(f"{key} looks like a secret and would be shown by `ray job list`; "
                              "let the cluster's nodes read credentials from their own credential chain")
    _refuse_secrets(env.values())
    # The job's driver (facelake's own ray.init through cluster.runtime.connect) passes the same
    # worker env again; Ray refuses such an overlap unless told to merge it (driver values win).
    env["RAY_OVERRIDE_JOB_RUNTIME_ENV"] = "1"
    result: dict = {"env_vars": env}
    if pip:
        _refuse_secrets(pip)
        result["pip"] = list(pip)
    return result


def submission_id(command: Sequence[str]) -> str:
    """facelake-<cmd>-<UTC timestamp>-<hex>: readable in `ray job list`, unique per submission."""
    args = [a for a in command if a != "facelake"]
    cmd = re.sub(r"[^a-z0-9]+", "-", (args[0] if args else "job").lower()).strip("-") or "job"
    stamp = datetime.now(timezone.utc).strftime("%Y%m%d-%H%M%S")
    return f"facelake-{cmd}-{stamp}-{secrets.token_hex(3)}"


def submit(address: str, command: Sequence[str], *, pip: Sequence[str] | None = None,
           entrypoint_num_cpus: float | None = None, entrypoint_num_gpus: float | None = None,
           user: str | None = None) -> str:
    """Submit ``facelake <command...>`` as a Ray job; return its submission id at once.

    Everything is validated before the cluster is contacted.
    """
    line = entrypoint(command)
    args = shlex.split(line)[1:]
    meta = job_metadata(args, user=user)
    env = runtime_env(pip=pip)
    job_id = submission_id(args)
    for value, name in ((entrypoint_num_cpus, "entrypoint_num_cpus"), (entrypoint_num_gpus, "entrypoint_num_gpus")):
        if value is not None and value < 0:
            raise ConfigError(f"{name} must be >= 0, got {value}")
    jobs = client(address)
    return jobs.submit_job(entrypoint=line, submission_id=job_id, metadata=meta, runtime_env=env,
                           entrypoint_num_cpus=entrypoint_num_cpus, entrypoint_num_gpus=entrypoint_num_gpus)


def follow(address: str, job_id: str, *, out: TextIO | None = None) -> str:
    """Stream a job's logs to ``out`` until it ends; return its final status name.

    Streams through the job server's websocket (tail_job_logs); if that connection drops, goes
    on by polling the logs from where the stream stopped, so no line is printed twice.
    """
    out = out or sys.stdout
    jobs = client(address)
    _info(jobs, job_id)  # unknown id -> clear error before streaming
    printed = 0

    async def _stream() -> None:
        nonlocal printed
        async for chunk in jobs.tail_job_logs(job_id):
            out.write(chunk)
            out.flush()
            printed += len(chunk)

    # Ray's SDK logs the websocket's closing at INFO; the job's own lines are what matter here.
    logging.getLogger("ray.dashboard.modules.job.sdk").setLevel(logging.WARNING)
    try:
        asyncio.run(_stream())
    except Exception as err:  # websocket refused or dropped: fall back to polling
        log.info("log stream for %s ended (%s: %s); polling instead", job_id, type(err).__name__, err)
    status = _wait_terminal(jobs, job_id, out=out, printed=printed)
    return status


def status(address: str, job_id: str) -> JobRow:
    """One facelake job's row (status, times, command)."""
    return _row(_info(client(address), job_id))


def logs(address: str, job_id: str) -> str:
    """All the logs a job has written so far."""
    jobs = client(address)
    _info(jobs, job_id)
    return jobs.get_job_logs(job_id)


def stop(address: str, job_id: str, *, timeout_s: float = STOP_TIMEOUT_S) -> str:
    """Ask a job to stop and wait until it has ended; return its final status name.

    A job that had already ended keeps its status (SUCCEEDED, FAILED or STOPPED).
    """
    jobs = client(address)
    current = _status_name(_info(jobs, job_id).status)
    if current in TERMINAL:
        return current
    jobs.stop_job(job_id)
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        current = _status_name(jobs.get_job_status(job_id))
        if current in TERMINAL:
            return current
        time.sleep(POLL_S)
    raise ConfigError(f"job {job_id} did not stop within {timeout_s:.0f}s (still {current}); "
                      "check the head's logs, or run `ray job stop` on the head")


def list_jobs(address: str) -> list[JobRow]:
    """facelake's jobs on the cluster (others' Ray jobs are left out), oldest first."""
    rows = [_row(info) for info in client(address).list_jobs() if FACELAKE_TAG in (info.metadata or {})]
    return sorted(rows, key=lambda r: (r.start or datetime.max.replace(tzinfo=timezone.utc), r.job_id))


def format_duration(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    seconds = int(round(seconds))
    hours, rest = divmod(seconds, 3600)
    minutes, secs = divmod(rest, 60)
    return f"{hours}h{minutes:02d}m{secs:02d}s" if hours else f"{minutes}m{secs:02d}s"


# --- internals -----------------------------------------------------------------------------


def _check_address(address: str | None) -> str:
    if not address:
        raise ConfigError("give the cluster's job server with --address http://HEAD:8265 "
                          "(or set RAY_API_SERVER_ADDRESS)")
    if address.startswith("ray://"):
        raise ConfigError(f"{address} is a Ray Client address; jobs are submitted to the dashboard's "
                          "HTTP address instead, e.g. http://HEAD:8265")
    if "://" not in address:
        address = f"http://{address}"
    if not address.startswith(("http://", "https://")):
        raise ConfigError(f"unsupported job server address {address!r}: use http://HEAD:8265 or https://...")
    if "@" in address.split("://", 1)[1].split("/", 1)[0]:
        raise ConfigError("do not put credentials in the job server address; it is logged and shown")
    return address.rstrip("/")


def _refuse_secrets(values) -> None:
    """Refuse to send anything that holds the value of a credential from this environment."""
    planted = [os.environ[k] for k in SECRET_ENV_KEYS if len(os.environ.get(k, "")) >= 8]
    for value in values:
        text = str(value)
        for secret in planted:
            if secret in text:
                raise ConfigError(
                    "a storage credential from this environment appears in the job's command, "
                    "metadata or environment, which `ray job list` shows to everyone; remove it and "
                    "let the cluster's nodes use their own credential chain (instance or pod role, "
                    "or a Kubernetes secret mounted as env)")
        if re.search(r"://[^/@\s]+:[^/@\s]+@", text):
            raise ConfigError("a URI with user:password@ appears in the job's command; "
                              "give credentials to the cluster's nodes instead")


def _option_value(args: Sequence[str], name: str) -> str | None:
    for i, arg in enumerate(args):
        if arg == name and i + 1 < len(args):
            return args[i + 1]
        if arg.startswith(name + "="):
            return arg.split("=", 1)[1]
    return None


def _user() -> str:
    try:
        return getpass.getuser()
    except Exception:  # no login name (some containers): still tag the job
        return "unknown"


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("facelake")
    except PackageNotFoundError:
        return "unknown"


def _status_name(value) -> str:
    return str(getattr(value, "value", value))


def _info(jobs, job_id: str):
    try:
        return jobs.get_job_info(job_id)
    except RuntimeError as err:
        if "does not exist" in str(err) or "404" in str(err):
            raise ConfigError(f"no job {job_id!r} on this cluster; `facelake jobs list` shows facelake's jobs") from err
        raise


def _row(info) -> JobRow:
    meta = info.metadata or {}
    return JobRow(
        job_id=info.submission_id or info.job_id or "?",
        status=_status_name(info.status),
        command=meta.get(FACELAKE_TAG, "?"),
        entrypoint=info.entrypoint,
        user=meta.get(USER_TAG, "?"),
        purpose=meta.get(PURPOSE_TAG),
        start=_time(info.start_time),
        end=_time(info.end_time),
        message=info.message or "",
    )


def _time(ms: int | None) -> datetime | None:
    return datetime.fromtimestamp(ms / 1000, tz=timezone.utc) if ms else None


def _wait_terminal(jobs, job_id: str, *, out: TextIO, printed: int) -> str:
    """Poll until the job ends, printing any log text after the first ``printed`` characters."""
    while True:
        current = _status_name(jobs.get_job_status(job_id))
        text = jobs.get_job_logs(job_id)
        if len(text) > printed:
            out.write(text[printed:])
            out.flush()
            printed = len(text)
        if current in TERMINAL:
            return current
        time.sleep(POLL_S)
