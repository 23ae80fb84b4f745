"""Secrets and trust: nothing read from storage is unpickled; faiss files load only after their
checksum matches; planted credentials never reach logs, outputs, audit records or errors; the
servers a local facelake run starts do not listen beyond loopback where facelake chooses.
"""

from __future__ import annotations

import json
import logging
import re
import time
import uuid
from pathlib import Path

import faiss
import numpy as np
import pyarrow as pa
import pytest
import s3fs

from facelake import storage
from facelake.errors import ConfigError, IndexVersionError
from facelake.index import layout
from tests.helpers import MODEL, SAMPLE_DIR, WEIGHTS, sample_manifest

REPO = Path(__file__).resolve().parents[1]
PACKAGE_DIRS = ("facelake", "jobs", "index", "cluster")

# ----------------------------------------------------------------------- deserialisation

UNSAFE = {
    "pickle": re.compile(r"\b(c?pickle|dill|cloudpickle)\.loads?\s*\("),
    "pickle.Unpickler": re.compile(r"\bUnpickler\s*\("),
    "joblib.load": re.compile(r"\bjoblib\.load\s*\("),
    "np.load(allow_pickle=True)": re.compile(r"allow_pickle\s*=\s*True"),
    "torch.load": re.compile(r"\btorch\.load\s*\("),
    "yaml.load (not safe_load)": re.compile(r"\byaml\.(load|load_all|unsafe_load|full_load)\s*\("),
    "pandas.read_pickle": re.compile(r"\bread_pickle\s*\("),
    "marshal.loads": re.compile(r"\bmarshal\.loads?\s*\("),
    "shelve.open": re.compile(r"\bshelve\.open\s*\("),
    "eval/exec": re.compile(r"(?<![\w.])(eval|exec)\s*\("),
}


def test_package_source_never_deserialises_untrusted_data():
    found = []
    for folder in PACKAGE_DIRS:
        for path in sorted((REPO / folder).rglob("*.py")):
            for number, line in enumerate(path.read_text().splitlines(), 1):
                code = line.split("#", 1)[0]
                for what, pattern in UNSAFE.items():
                    if pattern.search(code) and not ("yaml" in what and "SafeLoader" in code):
                        found.append(f"{path.relative_to(REPO)}:{number}: {what}: {line.strip()}")
    assert not found, "unsafe deserialisation in package source:\n" + "\n".join(found)


def test_the_grep_catches_what_it_should():
    samples = ["pickle.load(f)", "x = pickle.loads(data)", "np.load(p, allow_pickle=True)", "torch.load(p)",
               "yaml.load(text)", "joblib.load(path)", "cloudpickle.loads(b)", "eval(expr)"]
    for sample in samples:
        assert any(p.search(sample) for p in UNSAFE.values()), sample
    assert not any(p.search("json.loads(data)") for p in UNSAFE.values())
    assert not any(p.search("yaml.safe_load(text)") for p in UNSAFE.values())


def _tiny_version(root: str) -> tuple[str, np.ndarray]:
    """A one-shard IVF version written with layout's own functions (no Ray needed)."""
    rng = np.random.default_rng(0)
    xb = rng.standard_normal((200, 8)).astype(np.float32)
    faiss.normalize_L2(xb)
    trained = faiss.index_factory(8, "IVF4,Flat", faiss.METRIC_INNER_PRODUCT)
    trained.train(xb)
    shard = faiss.clone_index(trained)
    shard.add_with_ids(xb, np.arange(200, dtype=np.int64))
    version = layout.new_version_name(root)
    files = {}
    for name, data in ((layout.TRAINED, faiss.serialize_index(trained).tobytes()),
                       (layout.shard_files(0)[0], faiss.serialize_index(shard).tobytes())):
        storage.write_bytes_atomic(layout.file_uri(root, version, name), data)
        files[name] = {"sha256": layout.sha256(data), "bytes": len(data)}
    ids = pa.table({"faiss_id": pa.array(np.arange(200), pa.int64()), "image_id": [f"i{i}" for i in range(200)],
                    "face_index": pa.array(np.zeros(200, np.int32)),
                    "bbox": pa.array([[0, 0, 1, 1]] * 200, pa.list_(pa.int32(), 4))})
    ids_uri = layout.file_uri(root, version, layout.shard_files(0)[1])
    sink = pa.BufferOutputStream()
    with pa.ipc.new_file(sink, ids.schema) as writer:     # id tables are Arrow IPC files
        writer.write_table(ids)
    ids_bytes = sink.getvalue().to_pybytes()
    storage.write_bytes_atomic(ids_uri, ids_bytes)
    files[layout.shard_files(0)[1]] = {"sha256": layout.sha256(ids_bytes), "bytes": len(ids_bytes)}
    manifest = {"format": 2, "version": version, "model": MODEL, "weights_sha256": WEIGHTS, "dim": 8,
                "metric": "inner_product", "nlist": 4, "nprobe": 2, "pq": None,
                "shards": [{"shard": 0, "first_id": 0, "count": 200, "index_file": layout.shard_files(0)[0],
                            "ids_file": layout.shard_files(0)[1]}], "total": 200, "files": files}
    layout.publish(root, version, layout.write_manifest(root, version, manifest))
    return version, xb


def test_faiss_file_with_wrong_checksum_is_refused_before_faiss_reads_it(tmp_path, monkeypatch):
    from facelake.index.load import load_shard, load_trained, open_version

    root = str(tmp_path / "root")
    version, xb = _tiny_version(root)
    read: list[int] = []
    real = faiss.deserialize_index

    def spy(data):
        read.append(len(data))
        return real(data)

    monkeypatch.setattr(faiss, "deserialize_index", spy)
    index, _ = load_shard(open_version(root), 0)   # untouched: loads
    assert index.ntotal == 200 and len(read) == 1
    # plant another, perfectly valid faiss index in place of the shard (and of trained.faiss)
    planted = faiss.IndexFlatIP(8)
    planted.add(np.ones((3, 8), np.float32))
    for name in (layout.shard_files(0)[0], layout.TRAINED):
        Path(layout.file_uri(root, version, name)).write_bytes(faiss.serialize_index(planted).tobytes())
    read.clear()
    with pytest.raises(IndexVersionError, match="corrupt: sha256"):
        load_shard(open_version(root), 0)
    with pytest.raises(IndexVersionError, match="corrupt: sha256"):
        load_trained(open_version(root))
    assert read == [], "faiss parsed a file whose checksum did not match the manifest"
    # and a manifest edited after publishing is refused as well (CURRENT holds its checksum)
    manifest_path = Path(layout.file_uri(root, version, layout.MANIFEST))
    manifest = json.loads(manifest_path.read_text())
    manifest["files"][layout.TRAINED]["sha256"] = layout.sha256(faiss.serialize_index(planted).tobytes())
    manifest_path.write_text(json.dumps(manifest))
    with pytest.raises(IndexVersionError, match="checksum"):
        open_version(root)
    assert read == []


# ----------------------------------------------------------------------- planted secrets

def _files_under(path: Path) -> list[Path]:
    return [p for p in path.rglob("*") if p.is_file()] if path.exists() else []


def _wait_until_written(folder: Path, quiet_s: float = 0.5, timeout_s: float = 5) -> None:
    """Wait until no file under ``folder`` appears or grows for ``quiet_s``, at most ``timeout_s``
    (Ray's processes write their logs a little after the work that logs)."""
    sizes, deadline = None, time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        now = {p: p.stat().st_size for p in _files_under(folder) if p.exists()}
        if now == sizes:
            return
        sizes = now
        time.sleep(quiet_s)


def _leaks(secrets: list[str], blobs: dict[str, bytes]) -> list[str]:
    return [f"{where} holds {secret[:12]}..." for where, data in blobs.items() for secret in secrets
            if secret.encode() in data]


def test_planted_credentials_never_reach_logs_outputs_or_errors(s3_endpoint, s3_bucket, tmp_path, monkeypatch,
                                                                caplog, capfd, provisioned_weights):
    """embed + index + search against the loopback S3 with a planted secret key and session token;
    every log line, output object, audit record and error is then searched for them."""
    import psutil
    import ray

    from facelake.cluster import runtime
    from facelake.index.build import BuildOptions, build_version
    from facelake.jobs import search
    from facelake.jobs.embed import EmbedConfig, run_embed

    secret = f"planted-secret-XYZ-{uuid.uuid4().hex}"
    password = f"planted-password-{uuid.uuid4().hex[:12]}"
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", secret)
    monkeypatch.setenv("FACELAKE_OBJECT_STORE_BYTES", str(200 << 20))
    caplog.set_level(logging.INFO)
    if ray.is_initialized():
        ray.shutdown()
    fs = s3fs.S3FileSystem(endpoint_url=s3_endpoint, skip_instance_cache=True)
    bucket = s3_bucket[len("s3://"):]
    names = ["img1.jpg", "img2.jpg", "couple.jpg"]
    for name in names:
        fs.pipe(f"{bucket}/photos/{name}", (SAMPLE_DIR / name).read_bytes())
    storage.write_table(f"{s3_bucket}/manifests/m.parquet", sample_manifest(names, base=f"{s3_bucket}/photos"))
    missing = pa.table({"image_id": ["gone"], "uri": [f"{s3_bucket}/photos/not-there.jpg"]})
    storage.write_table(f"{s3_bucket}/manifests/probes.parquet", missing)
    errors_seen: list[str] = []
    session_dir = None
    try:
        runtime.connect(num_cpus=2)
        session_dir = Path(ray._private.worker._global_node.get_session_dir_path())  # noqa: SLF001
        run_embed(EmbedConfig(manifest=f"{s3_bucket}/manifests/m.parquet", out=f"{s3_bucket}/gallery",
                              batch_size=2, progress=False))
        build_version(f"{s3_bucket}/gallery/faces", f"{s3_bucket}/root", BuildOptions(
            model=MODEL, weights_sha256=WEIGHTS, shards=1))
        search.run_search(search.SearchConfig(probes=f"{s3_bucket}/gallery/faces", root=f"{s3_bucket}/root",
                                              out=f"{s3_bucket}/results", purpose="hardening: planted secret"))
        # a probe manifest whose image is missing: an error row and an error path exercised
        search.run_search(search.SearchConfig(probes=f"{s3_bucket}/manifests/probes.parquet",
                                              root=f"{s3_bucket}/root", out=f"{s3_bucket}/results2",
                                              purpose="hardening: planted secret, failing probe"))
        # credentials inside an endpoint URL are refused up front, without repeating them
        leaky = s3_endpoint.replace("http://", f"http://facelake:{password}@")
        for attempt in (
            lambda: run_embed(EmbedConfig(manifest=f"{s3_bucket}/manifests/m.parquet", out=str(tmp_path / "o"),
                                          endpoint_url=leaky, progress=False)),
            lambda: search.run_search(search.SearchConfig(probes=f"{s3_bucket}/gallery/faces",
                                                          root=f"{s3_bucket}/root", out=str(tmp_path / "r"),
                                                          purpose="x", endpoint_url=leaky)),
            lambda: storage.read_bytes(f"{s3_bucket}/photos/img1.jpg", storage.StorageOptions(endpoint_url=leaky)),
        ):
            with pytest.raises(ConfigError, match="carries credentials") as refused:
                attempt()
            errors_seen.append(repr(refused.value) + str(refused.value))
        # listeners of everything this run started (checked while it runs)
        me = psutil.Process()
        family = {p.pid: p for p in [me] + me.children(recursive=True)}
        listeners = []
        for conn in psutil.net_connections(kind="inet"):
            if conn.status == psutil.CONN_LISTEN and conn.pid in family:
                try:
                    listeners.append((conn.laddr.ip, conn.laddr.port, family[conn.pid].name(),
                                      " ".join(family[conn.pid].cmdline())[:200]))
                except psutil.Error:
                    pass
    finally:
        ray.shutdown()
    if session_dir is not None:
        _wait_until_written(session_dir / "logs")
    captured = capfd.readouterr()
    blobs: dict[str, bytes] = {"caplog": caplog.text.encode(), "stdout": captured.out.encode(),
                               "stderr": captured.err.encode(), "errors": "\n".join(errors_seen).encode()}
    for key in fs.find(bucket):
        if not key.endswith(".jpg"):
            blobs[f"s3://{key}"] = fs.cat(key)
    for path in _files_under(tmp_path) + _files_under(session_dir / "logs"):
        blobs[str(path)] = path.read_bytes()
    assert any("/audit/" in k for k in blobs) and any("/results/" in k for k in blobs)
    assert any(k.endswith("manifest.json") for k in blobs) and any("/_runs/" in k for k in blobs)
    assert len([k for k in blobs if str(session_dir) in k]) > 5, "Ray's worker logs were not collected"
    leaks = _leaks([secret, password], blobs)
    assert not leaks, "\n".join(leaks)

    # the dashboard's HTTP server is off or on loopback; nothing but Ray's own gRPC servers (GCS,
    # raylet, agents, workers: they bind every interface by Ray's design, token auth guards them)
    # listens beyond it
    ray_internal = ("gcs_server", "raylet", "ray::", "python", "default_worker", "agent")
    exposed = [l for l in listeners if l[0] not in ("127.0.0.1", "::1")]
    http_ports = {8265} | {int(m) for l in listeners for m in re.findall(r"dashboard\.py.*?--port=(\d+)", l[3])}
    assert not [l for l in exposed if l[1] in http_ports], f"the dashboard's HTTP port is exposed: {exposed}"
    assert all(any(tag in l[2] or tag in l[3] for tag in ray_internal) for l in exposed), exposed


def test_endpoint_credentials_in_the_environment_never_reach_ray_logs(monkeypatch, s3_endpoint):
    """FACELAKE_S3_ENDPOINT_URL with user:password@ must not be copied into Ray's runtime_env
    (and from there into the runtime-env agent's log and every worker)."""
    import ray

    from facelake.cluster import runtime

    password = f"planted-password-{uuid.uuid4().hex[:12]}"
    monkeypatch.setenv("FACELAKE_S3_ENDPOINT_URL", s3_endpoint.replace("http://", f"http://facelake:{password}@"))
    monkeypatch.setenv("FACELAKE_OBJECT_STORE_BYTES", str(100 << 20))
    if ray.is_initialized():
        ray.shutdown()
    try:
        try:
            runtime.connect(num_cpus=1)
        except ConfigError as refused:  # refusing the endpoint up front is a fine answer too
            assert password not in str(refused)
            return
        session_dir = Path(ray._private.worker._global_node.get_session_dir_path())  # noqa: SLF001

        @ray.remote(num_cpus=0.1)
        def ping():
            return 1

        assert ray.get(ping.remote()) == 1
        _wait_until_written(session_dir / "logs")
    finally:
        ray.shutdown()
    leaks = _leaks([password], {str(p): p.read_bytes() for p in _files_under(session_dir / "logs")})
    assert not leaks, ("DEFECT (cluster/runtime.py, worker_env): the endpoint URL's password reached Ray's "
                       "logs via runtime_env env_vars:\n" + "\n".join(leaks))
