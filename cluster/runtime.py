"""Start or join Ray, and describe the resources a job may plan with.

Without an address facelake starts a local Ray without its dashboard and with no fixed port (its
dashboard agent's HTTP port is chosen by the OS instead of Ray's 52365, so a `ray start --head` on
the same machine still gets its own); ``auto``, ``ray://host:port`` or ``host:port`` join an
existing cluster, and inside a Ray job RAY_ADDRESS names it. Storage credentials are never put in
the runtime environment: workers use the AWS credential chain.

Ray is quiet unless FACELAKE_VERBOSE is set (`facelake --verbose`): its INFO lines, Ray Data's
execution notes, its C++ core's lines and OpenCV's warnings stay off the terminal (Ray Data's and
Ray's Python logs stay in the session's log files); warnings of Ray's Python loggers still show. Tested in
tests/test_runtime_ports.py and tests/test_cli.py.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import os
from dataclasses import dataclass
from typing import Iterator, Mapping

import ray

from facelake import progress

log = logging.getLogger(__name__)

# Environment that every worker needs and that is not secret.
WORKER_ENV_KEYS = ("DEEPFACE_HOME", "DEEPFACE_BACKEND_ENGINE", "FACELAKE_WEIGHTS_FROM",
                   "FACELAKE_S3_ENDPOINT_URL", "AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3",
                   "AWS_DEFAULT_REGION", "PYTHONPATH", "OPENCV_LOG_LEVEL",
                   "FACELAKE_FAULTS")   # facelake.faults.ENV: unset in production, a folder in tests

_RAY_AUTH_SETUP_LOGGER = "ray._private.authentication.authentication_token_setup"
# Ray Data warns that its progress bars are off; facelake turns them off for its own display.
_RAY_DATA_NOTICES = ("Progress bars disabled",)


@dataclass(frozen=True)
class ClusterResources:
    """What the connected cluster offers right now."""

    cpus: float
    gpus: float
    nodes: int


def worker_env() -> dict[str, str]:
    """Non-secret environment passed to Ray workers (credentials stay in the chain).

    Ray logs a job's runtime environment, so a value carrying ``user:password@`` is refused
    rather than shipped.
    """
    from facelake.errors import ConfigError
    from facelake.storage import redact

    env = {key: os.environ[key] for key in WORKER_ENV_KEYS if key in os.environ}
    for key, value in env.items():
        if redact(value) != value:
            raise ConfigError(f"{key} holds credentials inside its URL; remove them and let each node "
                              "read credentials from the AWS credential chain (environment, profile, role)")
    env.setdefault("DEEPFACE_BACKEND_ENGINE", "onnx")
    return env


def connect(address: str | None = None, *, num_cpus: int | None = None) -> ClusterResources:
    """Join the cluster at ``address``, or start a local Ray when it is None.

    Reuses an already-initialised Ray (notebooks, tests) instead of starting a second one.
    """
    # Inside a Ray job (facelake submit) RAY_ADDRESS names the cluster the job runs on.
    address = address or os.environ.get("RAY_ADDRESS")
    if not ray.is_initialized():
        quiet = not progress.verbose()
        progress.quiet_environment()
        level = logging.WARNING if quiet else logging.INFO
        if address:
            _join(address, level)
        else:
            if quiet:
                # Ray turns token auth on for a new local Ray (when RAY_AUTH_MODE is unset) and
                # warns that it did; that logger says nothing else on this path.
                logging.getLogger(_RAY_AUTH_SETUP_LOGGER).setLevel(logging.ERROR)
            # address="local": never join a stray cluster another `ray start` left on this machine
            with _no_fixed_agent_port():
                ray.init(address="local", num_cpus=num_cpus, include_dashboard=False, dashboard_host="127.0.0.1",
                         runtime_env={"env_vars": worker_env()}, log_to_driver=True, logging_level=level,
                         object_store_memory=_local_object_store_bytes())
        if quiet:
            quiet_ray_data()
    return resources()


def _join(address: str, level: int) -> None:
    """ray.init on an existing cluster; a refused token becomes an error naming both places it may come from."""
    from ray.exceptions import AuthenticationError

    from facelake.errors import ConfigError

    try:
        ray.init(address=address, runtime_env={"env_vars": worker_env()}, log_to_driver=True, logging_level=level)
    except AuthenticationError as err:
        raise ConfigError(auth_message(f"Ray cluster {address}", os.environ)) from err


def auth_message(what: str, env: Mapping[str, str]) -> str:
    """What to change when ``what`` (a cluster or job server) refused this client's token (never the token)."""
    token_from = ("the RAY_AUTH_TOKEN the head was started with (the quick start's way), or the "
                  "contents of the head's ~/.ray/auth_token when Ray generated it there")
    if env.get("RAY_AUTH_TOKEN") or env.get("RAY_AUTH_TOKEN_PATH"):
        fix = f"the token in RAY_AUTH_TOKEN / RAY_AUTH_TOKEN_PATH was refused: set it to the head's token, {token_from}"
    else:
        fix = ("it uses token authentication (on by default since Ray 2.60): set RAY_AUTH_MODE=token and "
               f"RAY_AUTH_TOKEN to the head's token, {token_from}; or RAY_AUTH_TOKEN_PATH to a file holding it")
    return f"{what} refused this client: {fix}"


def quiet_ray_data() -> None:
    """Keep Ray Data's INFO lines (plans, parquet estimates, "execution finished") in its log file only.

    Ray Data's logging configuration gives the "ray.data" logger a file handler and a console
    handler; the console one is raised to WARNING, minus the notices in _RAY_DATA_NOTICES.
    """
    import ray.data  # noqa: F401  (configures the "ray.data" logger on import)
    from ray.data._internal.logging import SessionFileHandler

    for handler in logging.getLogger("ray.data").handlers:
        if not isinstance(handler, SessionFileHandler) and handler.level < logging.WARNING:
            handler.setLevel(logging.WARNING)
            handler.addFilter(lambda record: not record.getMessage().startswith(_RAY_DATA_NOTICES))


@contextlib.contextmanager
def _no_fixed_agent_port() -> Iterator[None]:
    """Let the OS choose the local dashboard agent's HTTP port while ``ray.init`` starts a node.

    Ray's agent listens on 52365 unless told otherwise, and ``ray.init`` has no option for it
    (``ray start`` has --dashboard-agent-listen-port); a head started later on this machine then
    cannot start its own agent. RayParams takes 0 as "any free port", so ray.init's RayParams
    gets that default for the duration of the call.
    """
    from ray._private import parameter

    original = parameter.RayParams.__init__

    @functools.wraps(original)
    def init(self, *args, **kwargs):
        kwargs.setdefault("dashboard_agent_listen_port", 0)
        original(self, *args, **kwargs)

    parameter.RayParams.__init__ = init
    try:
        yield
    finally:
        parameter.RayParams.__init__ = original


def agent_port() -> int | None:
    """The HTTP port of this process's local Ray dashboard agent (None when not a local node)."""
    node = getattr(ray._private.worker, "_global_node", None)
    return getattr(node, "dashboard_agent_listen_port", None) if node is not None else None


def resources() -> ClusterResources:
    total = ray.cluster_resources()
    nodes = sum(1 for node in ray.nodes() if node.get("Alive"))
    return ClusterResources(cpus=float(total.get("CPU", 0)), gpus=float(total.get("GPU", 0)), nodes=nodes)


def _local_object_store_bytes() -> int:
    """A modest object store for a local Ray: faces and vectors are small; 1 GiB is plenty."""
    return int(os.environ.get("FACELAKE_OBJECT_STORE_BYTES", 1 << 30))


def shutdown_if_local(started_here: bool) -> None:
    if started_here and ray.is_initialized():
        ray.shutdown()
