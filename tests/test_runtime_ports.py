"""The local Ray facelake starts holds no fixed port a `ray start --head` on the same machine needs."""

from __future__ import annotations

import socket

import psutil
import pytest

from facelake.cluster import runtime


@pytest.mark.timeout(600)
def test_local_ray_dashboard_agent_is_not_on_52365():
    import ray

    if ray.is_initialized():
        ray.shutdown()
    try:
        runtime.connect(None, num_cpus=1)
        port = runtime.agent_port()
        assert port and port != 52365, port
        # the agent really listens there (so the port Ray reports is the one it took)
        node_ip = ray._private.worker._global_node.node_ip_address
        with socket.create_connection((node_ip, port), timeout=10):
            pass
        # and none of the processes this local Ray started listens on Ray's fixed defaults
        ours = {p.pid for p in psutil.Process().children(recursive=True)}
        fixed = {52365, 8265, 6379, 10001}
        taken = [c.laddr for c in psutil.net_connections("tcp")
                 if c.status == psutil.CONN_LISTEN and c.pid in ours and c.laddr.port in fixed]
        assert not taken, taken
    finally:
        ray.shutdown()
