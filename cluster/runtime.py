"""Start or join Ray, and describe the resources a job may plan with.

Without an address facelake starts a local Ray without its dashboard and with no fixed port (its
dashboard agent's HTTP port is chosen by the OS instead of Ray's 52365, so a `ray start --head` on
the same machine still gets its own); ``auto``, ``ray://host:port`` or ``host:port`` join an
existing cluster, and inside a Ray job RAY_ADDRESS names it. Storage credentials are never put in
the runtime environment: workers use the AWS credential chain.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import os
from dataclasses import dataclass
from typing import Iterator

import ray

log = logging.getLogger(__name__)

# Environment that every worker needs and that is not secret.
WORKER_ENV_KEYS = ("DEEPFACE_HOME", "DEEPFACE_BACKEND_ENGINE", "FACELAKE_WEIGHTS_FROM",
                   "FACELAKE_S3_ENDPOINT_URL", "AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3",
                   "AWS_DEFAULT_REGION", "PYTHONPATH",
                   "FACELAKE_FAULTS")   # facelake.faults.ENV: unset in production, a folder in tests


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
        runtime_env = {"env_vars": worker_env()}
        if address:
            ray.init(address=address, runtime_env=runtime_env, log_to_driver=True)
        else:
            # address="local": never join a stray cluster another `ray start` left on this machine
            with _no_fixed_agent_port():
                ray.init(address="local", num_cpus=num_cpus, include_dashboard=False, dashboard_host="127.0.0.1",
                         runtime_env=runtime_env, log_to_driver=True,
                         object_store_memory=_local_object_store_bytes())
    return resources()


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
