"""Plain helpers shared by test modules (fixtures are in conftest.py): manifests of the bundled
sample and of bad inputs, synthetic faces tables, the rebuild steps tests repeat, an S3 fault
proxy, and the session's local Ray. Test modules import shared code only from here."""

from __future__ import annotations

import csv
import http.client
import io
import os
import signal
import subprocess
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import faiss
import numpy as np
import psutil
import pyarrow as pa
from PIL import Image

from facelake import storage
from facelake.faces.registry import get_model, weights_fingerprint
from facelake.index.load import load_ids, open_version
from facelake.index.synthetic import clustered
from facelake.jobs import search
from facelake.jobs.embed import outputs
from facelake.jobs.rebuild import RebuildConfig, run_rebuild
from facelake.record import tables as record_tables
from facelake.schema import faces_schema

REPO = Path(__file__).resolve().parents[1]
SAMPLE_DIR = REPO / "samples" / "faces"
MODEL = "sface-yunet"
WEIGHTS = weights_fingerprint(get_model(MODEL))
# Real labeled faces beside the project root (LFW, ORL, deepface_testset): ../shared/faces, README there
SHARED_FACES = Path(__file__).resolve().parents[2] / "shared" / "faces"


def sample_identities() -> dict[str, str]:
    """image file name -> identity, for the 61 labeled sample photos."""
    with open(SAMPLE_DIR / "identities_derived.csv") as handle:
        return {row["image"]: row["identity_id"] for row in csv.DictReader(handle)}


def sample_manifest(names: list[str] | None = None, base: str | None = None) -> pa.Table:
    """Manifest of sample photos with absolute uris (or under ``base``) and identities."""
    ids = sample_identities()
    names = names or sorted(ids)
    prefix = base or str(SAMPLE_DIR)
    return pa.table({
        "image_id": [n.rsplit(".", 1)[0] for n in names],
        "uri": [f"{prefix}/{n}" for n in names],
        "identity": [ids.get(n) for n in names],
    })


def faceless_jpeg() -> bytes:
    """A real photo region with no face: the top-left corner of a sample photo's background."""
    image = Image.open(SAMPLE_DIR / "img1.jpg").convert("RGB")
    corner = image.crop((0, 0, 300, 180))
    out = io.BytesIO()
    corner.save(out, format="JPEG")
    return out.getvalue()


def png_with_alpha(name: str = "img2.jpg") -> bytes:
    image = Image.open(SAMPLE_DIR / name).convert("RGBA")
    alpha = Image.new("L", image.size, 255)
    alpha.paste(0, (0, 0, image.size[0] // 8, image.size[1] // 8))  # a transparent corner
    image.putalpha(alpha)
    out = io.BytesIO()
    image.save(out, format="PNG")
    return out.getvalue()


def greyscale_jpeg(name: str = "img3.jpg") -> bytes:
    out = io.BytesIO()
    Image.open(SAMPLE_DIR / name).convert("L").save(out, format="JPEG")
    return out.getvalue()


def corrupt_jpeg(name: str = "img4.jpg") -> bytes:
    data = (SAMPLE_DIR / name).read_bytes()
    return data[:200] + bytes(np.random.RandomState(0).randint(0, 256, 300, dtype=np.uint8))


def fails_at_armed_fault(call, *, free_cpus: bool = True) -> None:
    """Run ``call``, which an armed worker fault (facelake.faults) must fail, and drop its error.

    Ray Data keeps a failed run's actors (and the CPUs they hold) while the error's traceback is
    alive; a test that goes on using the cluster must not keep it (pytest.raises would)."""
    import gc
    import sys
    import time

    from facelake import faults

    try:
        call()
    except Exception as err:   # Ray wraps the worker's FaultInjected in its own error types
        injected, message = faults.injected(err), f"{type(err).__name__}: {err}"[:1000]
    else:
        raise AssertionError("the armed fault did not fail the job")
    gc.collect()
    assert injected, message
    ray = sys.modules.get("ray")
    if free_cpus and ray is not None and ray.is_initialized():   # a failed run's actors must not starve the next job
        total, deadline = ray.cluster_resources().get("CPU", 0), time.monotonic() + 60
        while ray.available_resources().get("CPU", 0) < total and time.monotonic() < deadline:
            time.sleep(0.2)
        assert ray.available_resources().get("CPU", 0) == total, "a failed run's actors still hold CPUs"


# ------------------------------------------------------------------ the session's local Ray

_LOCAL_RAY: dict[str, str] = {}


def start_local_ray():
    """(Re)start the small real local Ray the tests use (2 CPUs, 300 MB object store)."""
    import ray

    if ray.is_initialized():
        ray.shutdown()
    ray.init(address="local", num_cpus=2, include_dashboard=False, object_store_memory=300 * 1024 * 1024,
             runtime_env={"env_vars": {"DEEPFACE_HOME": os.environ["DEEPFACE_HOME"]}})
    _LOCAL_RAY["gcs_address"] = ray.get_runtime_context().gcs_address
    return ray


def ensure_local_ray():
    """The local Ray ``start_local_ray`` started, if it still runs and is the one connected; else a new one."""
    import ray

    if ray.is_initialized() and ray.get_runtime_context().gcs_address == _LOCAL_RAY.get("gcs_address"):
        return ray
    return start_local_ray()


# ------------------------------------------------------------------ synthetic faces tables

def faces_table(xb: np.ndarray, prefix: str = "img", **extra) -> pa.Table:
    """A faces table as `facelake embed` writes it (the columns search reads) for vectors xb."""
    n, d = xb.shape
    columns = {
        "image_id": pa.array([f"{prefix}-{i:07d}" for i in range(n)]),
        "face_index": pa.array(np.zeros(n, np.int32)),
        "uri": pa.array([f"/photos/{prefix}-{i}.jpg" for i in range(n)]),
        "bbox": pa.array([[i % 50, 0, 32, 32] for i in range(n)], type=pa.list_(pa.int32(), 4)),
        "embedding": pa.FixedSizeListArray.from_arrays(pa.array(xb.ravel(), pa.float32()), d),
        "model": pa.array([MODEL] * n),
        "weights_sha256": pa.array([WEIGHTS] * n),
    }
    columns.update(extra)
    return pa.table(columns)


def synthetic_faces(n: int) -> pa.Table:
    """``n`` faces rows with every column of the faces schema (clustered synthetic embeddings)."""
    spec = get_model()
    vectors = clustered(n, spec.dim, seed=3)
    schema = faces_schema(spec.dim)
    return pa.table({
        "image_id": [f"photo-{i:06d}" for i in range(n)],
        "face_index": pa.array(np.zeros(n, np.int32)),
        "uri": [f"s3://archive/photo-{i:06d}.jpg" for i in range(n)],
        "bbox": pa.array([[0, 0, 100, 100]] * n, schema.field("bbox").type),
        "landmarks": pa.array([[0.0] * 10] * n, schema.field("landmarks").type),
        "det_score": pa.array(np.full(n, 0.9, np.float32)),
        "embedding": pa.FixedSizeListArray.from_arrays(pa.array(vectors.reshape(-1)), spec.dim),
        "model": [spec.name] * n,
        "detector": [spec.detector] * n,
        "weights_sha256": [weights_fingerprint(spec)] * n,
        "content_sha256": ["0" * 64] * n,
    }, schema=schema)


def faces_per_image(n: int, per_image: int, prefix: str) -> pa.Table:
    """``n`` face rows, ``per_image`` faces per image (ids ``prefix``-k)."""
    table = synthetic_faces(n)
    ids = [f"{prefix}-{i // per_image:06d}" for i in range(n)]
    return table.set_column(0, "image_id", pa.array(ids, pa.string()))


def error_rows(n: int, prefix: str) -> pa.Table:
    """``n`` errors rows over three stages (every third a NoFace)."""
    stages = ["decode", "fetch", "detect"]
    return pa.table({"image_id": [f"{prefix}-{i}" for i in range(n)], "stage": [stages[i % 3] for i in range(n)],
                     "error_type": [("NoFace" if i % 3 == 2 else f"E{i % 2}") for i in range(n)],
                     "message": [f"m{i}" for i in range(n)]})


# ------------------------------------------------------------------ search results

def results(out) -> pa.Table:
    """The results table a search job wrote under ``out``."""
    return storage.read_table(search.outputs(str(out))["results"])


def exact(xb: np.ndarray, xq: np.ndarray, k: int):
    """Exact inner-product top-k (faiss IndexFlatIP): the reference for every search."""
    flat = faiss.IndexFlatIP(xb.shape[1])
    flat.add(xb)
    return flat.search(xq, k)


def ranked_ids(table: pa.Table, nq: int, k: int, prefix: str = "img") -> np.ndarray:
    """(nq, k) gallery row numbers from a results table of probes q-0000000.. (-1 where missing)."""
    found = np.full((nq, k), -1, np.int64)
    for row in table.select(["probe_image_id", "rank", "gallery_image_id"]).to_pylist():
        if row["rank"] is not None:
            found[int(row["probe_image_id"].split("-")[1]), row["rank"] - 1] = int(row["gallery_image_id"].split("-")[1])
    return found


# ------------------------------------------------------------------ rebuild steps

BASE = ["img1.jpg", "img3.jpg"]
ADDED = ["img2.jpg", "img6.jpg", "img10.jpg"]


class Crash(RuntimeError):
    """What ``crash`` raises at an armed fault point."""


def crash(*_):
    raise Crash("killed here (test)")


def rebuild(manifest_uri: str, root: str, **kwargs):
    """`facelake rebuild` one photo per batch, one worker, no progress bar."""
    return run_rebuild(RebuildConfig(manifest=manifest_uri, root=root, progress=False, batch_size=1, workers=1,
                                     **kwargs))


def put_photos(base: str, names: list[str]) -> None:
    for name in names:
        storage.write_bytes_atomic(storage.join(base, name), (SAMPLE_DIR / name).read_bytes())


def write_manifest(uri: str, names: list[str], base: str) -> None:
    storage.write_table(uri, sample_manifest(names, base=base))


def assert_record_consistent(root: str) -> pa.Table:
    """No face twice in the record, no image in both faces and errors, the index holds exactly the record."""
    faces = record_tables.read_faces(root)
    keys = [f"{a}/{b}" for a, b in zip(faces["image_id"].to_pylist(), faces["face_index"].to_pylist())]
    assert len(keys) == len(set(keys)), "a face is duplicated in the record"
    errors = record_tables.read_errors(root)
    if errors is not None:
        assert not set(errors["image_id"].to_pylist()) & set(faces["image_id"].to_pylist())
    handle = open_version(root)
    assert handle.total == faces.num_rows
    assert sorted(load_ids(handle)["image_id"].to_pylist()) == sorted(faces["image_id"].to_pylist())
    faiss_ids = load_ids(handle)["faiss_id"].to_pylist()
    assert len(faiss_ids) == len(set(faiss_ids)), "a faiss id is used twice in the version"
    return faces


# ------------------------------------------------------------------ embed outcomes

def read_outcomes(out: str) -> tuple[pa.Table | None, pa.Table | None]:
    layout = outputs(out)
    faces = storage.read_table(layout["faces"]) if storage.list_files(layout["faces"], ".parquet") else None
    errors = storage.read_table(layout["errors"]) if storage.list_files(layout["errors"], ".parquet") else None
    return faces, errors


def assert_exactly_once(out: str, manifest_ids: list[str]) -> tuple[pa.Table, dict]:
    """Every manifest row in exactly one of faces/errors; no (image_id, face_index) twice."""
    faces, errors = read_outcomes(out)
    face_ids = set(faces["image_id"].to_pylist()) if faces is not None else set()
    error_rows = errors.to_pylist() if errors is not None else []
    error_ids = [r["image_id"] for r in error_rows]
    assert len(error_ids) == len(set(error_ids)), "an image has two error rows"
    assert not face_ids & set(error_ids), f"in both faces and errors: {face_ids & set(error_ids)}"
    assert face_ids | set(error_ids) == set(manifest_ids), \
        f"lost: {set(manifest_ids) - face_ids - set(error_ids)}; unknown: {(face_ids | set(error_ids)) - set(manifest_ids)}"
    if faces is not None:
        keys = list(zip(faces["image_id"].to_pylist(), faces["face_index"].to_pylist()))
        assert len(keys) == len(set(keys)), "a face was written twice"
    return faces, {r["image_id"]: r for r in error_rows}


def kill_tree(proc: subprocess.Popen) -> None:
    """SIGKILL a process we started and every process it started (its local Ray included)."""
    try:
        family = [psutil.Process(proc.pid)] + psutil.Process(proc.pid).children(recursive=True)
    except psutil.NoSuchProcess:
        family = []
    for member in family:
        try:
            member.send_signal(signal.SIGKILL)
        except psutil.NoSuchProcess:
            pass
    proc.wait(timeout=30)
    psutil.wait_procs(family, timeout=30)


# ------------------------------------------------------------------ images

def grey(name: str = "img1.jpg") -> np.ndarray:
    return np.asarray(Image.open(SAMPLE_DIR / name).convert("L"))


def encode(image: Image.Image, fmt: str, **kwargs) -> bytes:
    out = io.BytesIO()
    image.save(out, format=fmt, **kwargs)
    return out.getvalue()


def png16(name: str = "img1.jpg") -> bytes:
    """A 16-bit greyscale PNG of a sample photo (each 8-bit value v stored as v * 257)."""
    return encode(Image.fromarray(grey(name).astype(np.uint16) * 257), "PNG")


# ------------------------------------------------------------------ S3 faults

class FaultProxy:
    """A loopback HTTP proxy in front of the moto server that fails chosen object keys.

    ``faults[key] = (kind, times)``: kind is "503" (SlowDown), "500" (InternalError), "403"
    (AccessDenied) or "reset" (connection closed without a response); ``times`` requests fail,
    then they pass (None: fail forever). Every request for a faulted key is timestamped.
    """

    BODIES = {"503": ("SlowDown", "Please reduce your request rate."),
              "500": ("InternalError", "We encountered an internal error. Please try again."),
              "403": ("AccessDenied", "Access Denied")}

    def __init__(self, upstream: str) -> None:
        self.upstream = upstream.split("://", 1)[1]
        self.faults: dict[str, tuple[str, int | None]] = {}
        self.seen: dict[str, list[float]] = {}
        self.lock = threading.Lock()
        proxy = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args):  # quiet
                pass

            def _any(self):
                key = self.path.split("?", 1)[0]
                fault = proxy._fault_for(key)
                length = int(self.headers.get("Content-Length") or 0)
                body = self.rfile.read(length) if length else None
                if fault == "reset":
                    self.close_connection = True
                    return
                if fault:
                    code, message = proxy.BODIES[fault]
                    payload = (f'<?xml version="1.0" encoding="UTF-8"?><Error><Code>{code}</Code>'
                               f'<Message>{message}</Message><RequestId>fault</RequestId></Error>').encode()
                    self.send_response(int(fault))
                    self.send_header("Content-Type", "application/xml")
                    self.send_header("Content-Length", str(0 if self.command == "HEAD" else len(payload)))
                    self.end_headers()
                    if self.command != "HEAD":
                        self.wfile.write(payload)
                    return
                conn = http.client.HTTPConnection(proxy.upstream, timeout=30)
                headers = {k: v for k, v in self.headers.items() if k.lower() not in ("connection",)}
                conn.request(self.command, self.path, body=body, headers=headers)
                response = conn.getresponse()
                data = response.read()
                self.send_response(response.status)
                for k, v in response.getheaders():
                    if k.lower() not in ("transfer-encoding", "connection", "content-length"):
                        self.send_header(k, v)
                self.send_header("Content-Length", response.getheader("Content-Length", str(len(data)))
                                 if self.command == "HEAD" else str(len(data)))
                self.end_headers()
                if self.command != "HEAD":
                    self.wfile.write(data)
                conn.close()

            do_GET = do_HEAD = do_PUT = do_POST = do_DELETE = _any

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def _fault_for(self, path: str) -> str | None:
        with self.lock:
            for key, (kind, times) in self.faults.items():
                if path.endswith(key):
                    self.seen.setdefault(key, []).append(time.monotonic())
                    if times is None:
                        return kind
                    if times > 0:
                        self.faults[key] = (kind, times - 1)
                        return kind
                    return None
        return None

    def __enter__(self) -> "FaultProxy":
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.server.shutdown()
        self.server.server_close()
