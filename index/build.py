"""Build an index version: train once, add shards in parallel Ray tasks, publish atomically.

Every shard is an IVF index over the same trained quantizer (a clone of ``trained.faiss`` with
its own vectors added under global ids), so shards are interchangeable and can be merged
faiss contrib/ondisk style. Faces get faiss ids 0..N-1 in (image_id, face_index) order.

Erasure: a CPU IVF index supports ``remove_ids``, but GPU indexes cannot remove ids and removal
leaves the id tables stale, so erasure rebuilds the affected shards from the faces table (reusing
the quantizer via ``trained_from``) instead of editing shard files in place.
"""

from __future__ import annotations

import datetime as dt
import io
import logging
import math
import time
from typing import Callable, Mapping

import faiss
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import ray

import facelake
from facelake import storage
from facelake.errors import ConfigError
from facelake.index import layout
from facelake.index.params import IndexParams, choose_params
from facelake.schema import ID_TABLE_SCHEMA
from facelake.storage import StorageOptions

log = logging.getLogger(__name__)

# One shard per million faces by default: 512 MB (128-d) to 2 GB (512-d) of IVF-Flat per
# search actor, and enough shards to spread search over a cluster at archive scale.
DEFAULT_SHARD_SIZE = 1_000_000
FACE_INPUT_COLUMNS = ("image_id", "face_index", "bbox", "embedding")
Hooks = Mapping[str, Callable[[str], None]]
HOOK_NAMES = ("before_manifest", "before_pointer")


def gpu_available() -> bool:
    """True when faiss was built with GPU support and the connected Ray cluster has a GPU."""
    if not hasattr(faiss, "StandardGpuResources"):
        return False
    return ray.is_initialized() and ray.cluster_resources().get("GPU", 0) >= 1


def train(xb_sample: np.ndarray, params: IndexParams, use_gpu: bool = False) -> faiss.Index:
    """Train an empty IVF-Flat / IVF-PQ index (inner product) on L2-normalised float32 vectors.

    On a GPU only k-means runs there (faiss's bench_ivf pattern); the result is a CPU index.
    """
    xb_sample = _as_vectors(xb_sample, params.dim)
    index = faiss.index_factory(params.dim, params.factory, faiss.METRIC_INNER_PRODUCT)
    if params.pq_m is not None:  # polysemous codes are not searched; training them triples PQ time
        faiss.downcast_index(faiss.extract_index_ivf(index)).do_polysemous_training = False
    if use_gpu:
        faiss.extract_index_ivf(index).clustering_index = faiss.index_cpu_to_all_gpus(
            faiss.IndexFlatIP(params.dim))
    index.train(xb_sample)
    return index


def _as_vectors(x: np.ndarray, dim: int) -> np.ndarray:
    x = np.ascontiguousarray(x, dtype=np.float32)
    if x.ndim != 2 or x.shape[1] != dim:
        raise ConfigError(f"expected float32 vectors of shape (n, {dim}), got {x.shape}")
    return x


@ray.remote
def _train_task(sample: np.ndarray, params: IndexParams, use_gpu: bool) -> np.ndarray:
    return faiss.serialize_index(train(sample, params, use_gpu))


@ray.remote
def _add_task(trained: np.ndarray, xb: np.ndarray, ids: pa.Table, first_id: int, uris: tuple[str, str],
              options: StorageOptions | None, use_gpu: bool, threads: int) -> dict:
    """Clone the trained index, add one shard under global ids, write its two files."""
    faiss.omp_set_num_threads(threads)
    index = faiss.deserialize_index(trained)
    faiss_ids = np.arange(first_id, first_id + len(xb), dtype=np.int64)
    if use_gpu:
        resources = faiss.StandardGpuResources()
        gpu = faiss.index_cpu_to_gpu(resources, 0, index)
        gpu.add_with_ids(xb, faiss_ids)
        index = faiss.index_gpu_to_cpu(gpu)
    else:
        index.add_with_ids(xb, faiss_ids)
    index_bytes = faiss.serialize_index(index).tobytes()
    del index
    sink = io.BytesIO()
    pq.write_table(ids, sink, compression="zstd")
    files = {}
    for uri, data in zip(uris, (index_bytes, sink.getvalue())):
        storage.write_bytes_atomic(uri, data, options)
        files[uri.rstrip("/").rsplit("/", 1)[-1]] = {"sha256": layout.sha256(data), "bytes": len(data)}
    return files


def read_faces(faces: pa.Table | str, options: StorageOptions | None = None) -> pa.Table:
    """The faces table (from a URI or as given), checked and sorted into faiss id order."""
    if isinstance(faces, str):
        try:
            faces = storage.read_table(faces, columns=None, options=options)
        except FileNotFoundError as err:
            raise ConfigError(f"no faces table at {storage.redact(faces)}: run `facelake embed` "
                              f"first or pass the folder it wrote") from err
    missing = [c for c in FACE_INPUT_COLUMNS if c not in faces.column_names]
    if missing:
        raise ConfigError(f"faces table lacks column(s) {missing}: pass the table `facelake embed` "
                          f"wrote (schema facelake.schema.faces_schema)")
    if not pa.types.is_fixed_size_list(faces.schema.field("embedding").type):
        raise ConfigError("faces.embedding must be a fixed_size_list<float32>: pass the table "
                          "`facelake embed` wrote")
    return faces.sort_by([("image_id", "ascending"), ("face_index", "ascending")])


def _check_model(faces: pa.Table, model: str, weights_sha256: str) -> None:
    for column, expected in (("model", model), ("weights_sha256", weights_sha256)):
        if column in faces.column_names:
            found = [v for v in pc.unique(faces.column(column)).to_pylist() if v != expected]
            if found:
                raise ConfigError(f"faces table holds {column} {found[:3]}, not {expected!r}: index "
                                  f"faces of one model at a time (re-embed with --model {model})")


def embeddings(faces: pa.Table) -> np.ndarray:
    """(n, dim) float32 L2-normalised vectors of a faces table (renormalised defensively)."""
    dim = faces.schema.field("embedding").type.list_size
    values = faces.column("embedding").combine_chunks().flatten()
    xb = np.ascontiguousarray(values.to_numpy(zero_copy_only=False), dtype=np.float32).reshape(-1, dim)
    if not np.isfinite(xb).all():
        bad = int((~np.isfinite(xb).all(axis=1)).argmax())
        raise ConfigError(f"face {faces.column('image_id')[bad]} has a non-finite embedding: re-embed it")
    faiss.normalize_L2(xb)
    return xb


def shard_bounds(n: int, shards: int | None, shard_size: int | None) -> list[tuple[int, int]]:
    """Contiguous [start, stop) faiss id ranges, as even as possible."""
    if shards is not None and shard_size is not None:
        raise ConfigError("give --shards or --shard-size, not both")
    if shards is not None and not 1 <= shards <= n:
        raise ConfigError(f"--shards must be within 1..{n} (the number of faces), got {shards}")
    if shard_size is not None and shard_size < 1:
        raise ConfigError(f"--shard-size must be positive, got {shard_size}")
    count = shards or math.ceil(n / (shard_size or DEFAULT_SHARD_SIZE))
    edges = np.linspace(0, n, count + 1).round().astype(int)
    return [(int(a), int(b)) for a, b in zip(edges[:-1], edges[1:])]


def _sample(xb: np.ndarray, size: int) -> np.ndarray:
    if size >= len(xb):
        return xb
    picks = np.sort(np.random.default_rng(0).choice(len(xb), size, replace=False))
    return xb[picks]


def _id_table(faces: pa.Table, start: int, stop: int) -> pa.Table:
    part = faces.slice(start, stop - start)
    return pa.table({
        "faiss_id": pa.array(np.arange(start, stop, dtype=np.int64)),
        "image_id": part.column("image_id").cast(pa.string()),
        "face_index": part.column("face_index").cast(pa.int32()),
        "bbox": part.column("bbox").cast(ID_TABLE_SCHEMA.field("bbox").type),
    }, schema=ID_TABLE_SCHEMA)


def _reuse_trained(root: str, version: str, model: str, dim: int, nlist: int | None, pq_m: int | None,
                   options: StorageOptions | None) -> tuple[np.ndarray, dict]:
    from facelake.index.load import open_version, read_verified

    handle = open_version(root, version, expect_model=model, expect_dim=dim, options=options)
    old = handle.manifest
    if (nlist and nlist != old["nlist"]) or (pq_m is not None and pq_m != old["pq"]):
        raise ConfigError(f"--trained-from {version} has nlist {old['nlist']} and pq {old['pq']}: drop "
                          f"--nlist/--pq or build without --trained-from")
    return np.frombuffer(read_verified(handle, layout.TRAINED), np.uint8), old


def build_version(faces: pa.Table | str, root: str, *, model: str, weights_sha256: str,
                  shards: int | None = None, shard_size: int | None = None, nlist: int | None = None,
                  pq: int | None = None, nprobe: int | None = None, keep: int = 3,
                  trained_from: str | None = None, use_gpu: bool | None = None,
                  options: StorageOptions | None = None, hooks: Hooks | None = None,
                  erased_ids: pa.Array | None = None) -> dict:
    """Build, publish and return the manifest of a new index version under ROOT/index/.

    ``erased_ids`` (the root's erasure list) are dropped from the faces before anything is
    added; their count and sha256 go to the manifest.
    ``faces`` is a faces table or the URI of the Parquet dataset ``facelake embed`` wrote.
    ``hooks`` maps "before_manifest" / "before_pointer" to callables given the version name
    (tests crash there on purpose). Older versions beyond ``keep`` are pruned afterwards.
    """
    storage.check_uri(root)
    if keep < 1:
        raise ConfigError(f"--keep must be at least 1 (the live version is always kept), got {keep}")
    if not model or not weights_sha256:
        raise ConfigError("model and weights_sha256 are required: they are checked at load time")
    unknown = set(hooks or {}) - set(HOOK_NAMES)
    if unknown:
        raise ConfigError(f"unknown hook(s) {sorted(unknown)}; known: {HOOK_NAMES}")
    if isinstance(faces, str):
        storage.check_uri(faces)
    options = options or StorageOptions.from_env()
    started = time.perf_counter()

    table = read_faces(faces, options)
    erased = pa.array([], pa.string()) if erased_ids is None else pc.unique(erased_ids.cast(pa.string()))
    if len(erased):
        table = table.filter(pc.invert(pc.is_in(table["image_id"].cast(pa.string()), value_set=erased)))
    _check_model(table, model, weights_sha256)
    n = table.num_rows
    dim = table.schema.field("embedding").type.list_size
    bounds = shard_bounds(n, shards, shard_size) if n else []
    trained = old = None
    if trained_from:
        trained, old = _reuse_trained(root, trained_from, model, dim, nlist, pq, options)
        nlist, pq = old["nlist"], old["pq"]
    params = choose_params(n, dim, nlist=nlist, pq=pq, nprobe=nprobe)
    if use_gpu and not hasattr(faiss, "StandardGpuResources"):
        raise ConfigError("use_gpu=True but this faiss has no GPU support: install faiss-gpu-cu12 "
                          "(make install-gpu) or leave use_gpu unset")

    if not ray.is_initialized():
        from facelake.cluster.runtime import connect
        connect()
    use_gpu = gpu_available() if use_gpu is None else use_gpu
    if use_gpu and ray.cluster_resources().get("GPU", 0) < 1:
        raise ConfigError("use_gpu=True but the Ray cluster has no GPU: leave use_gpu unset")
    version = layout.new_version_name(root, options)
    log.info("index %s: %d faces, dim %d, %s, nprobe %d, train on %d, %d shard(s), %s",
             version, n, dim, params.factory, params.nprobe, params.train_size, len(bounds),
             "GPU" if use_gpu else "CPU")

    xb = embeddings(table)
    gpus = {"num_gpus": 1} if use_gpu else {}
    if trained is None:
        train_started = time.perf_counter()
        trained = ray.get(_train_task.options(**gpus).remote(_sample(xb, params.train_size), params, use_gpu))
        trained_seconds = round(time.perf_counter() - train_started, 3)
    else:
        trained_seconds = 0.0
    trained_bytes = trained.tobytes()
    storage.write_bytes_atomic(layout.file_uri(root, version, layout.TRAINED), trained_bytes, options)
    files = {layout.TRAINED: {"sha256": layout.sha256(trained_bytes), "bytes": len(trained_bytes)}}

    threads = _threads_per_task(len(bounds))
    trained_ref = ray.put(trained)
    tasks = []
    for shard_no, (start, stop) in enumerate(bounds):
        uris = tuple(layout.file_uri(root, version, name) for name in layout.shard_files(shard_no))
        tasks.append(_add_task.options(num_cpus=threads, **gpus).remote(
            trained_ref, xb[start:stop], _id_table(table, start, stop), start, uris, options, use_gpu, threads))
    for shard_files in ray.get(tasks):
        files.update(shard_files)

    manifest = {
        "format": 1,
        "version": version,
        "model": model,
        "weights_sha256": weights_sha256,
        "dim": dim,
        "metric": params.metric,
        "factory": params.factory,
        "nlist": params.nlist,
        "pq": params.pq_m,
        "nprobe": params.nprobe,
        "train_size": params.train_size,
        "shards": [{"shard": i, "first_id": a, "count": b - a,
                    "index_file": layout.shard_files(i)[0], "ids_file": layout.shard_files(i)[1]}
                   for i, (a, b) in enumerate(bounds)],
        "total": n,
        "files": files,
        "source": storage.redact(faces) if isinstance(faces, str) else "<in-memory table>",
        "created_at": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "facelake_version": facelake.__version__,
        "faiss_version": faiss.__version__,
        "trained_from": trained_from,
        "erased_ids_count": len(erased),
        "erased_ids_sha256": layout.sha256("\0".join(sorted(erased.to_pylist())).encode()),
        "build": {"gpu": bool(use_gpu), "train_seconds": trained_seconds,
                  "seconds": round(time.perf_counter() - started, 3)},
    }
    _run_hook(hooks, "before_manifest", version)
    manifest_sha = layout.write_manifest(root, version, manifest, options)
    _run_hook(hooks, "before_pointer", version)
    layout.publish(root, version, manifest_sha, options)
    layout.prune(root, keep, options)
    return manifest


def _run_hook(hooks: Hooks | None, name: str, version: str) -> None:
    if hooks and name in hooks:
        hooks[name](version)


def _threads_per_task(tasks: int) -> int:
    """CPUs (and faiss threads) per add task: the smallest node's CPUs shared by the tasks on it."""
    nodes = [node["Resources"].get("CPU", 1) for node in ray.nodes() if node.get("Alive")] or [1]
    per_node = math.ceil(tasks / len(nodes))
    return max(1, int(min(nodes) // max(1, per_node)))
