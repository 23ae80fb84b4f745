"""Build an index version: train on a sample, add shards in parallel Ray tasks, publish atomically.

No vector passes through the driver. It reads only the Parquet footers of the faces table's
part files (row counts and schemas) and hands each task a list of (file, row range) pieces:

1. sample tasks (one per part file) draw that file's share of the training sample;
2. one train task gathers the sample from the object store and trains the IVF quantizer (and
   PQ codebooks) into ``trained.faiss``;
3. shard tasks read their own rows from the part files, drop erased images, add the vectors
   to a clone of the trained index under global faiss ids, and write the shard's files: the
   faiss index, the id table (every column a result row needs: image_id, face_index, bbox, uri
   and the manifest's carried columns) and, for compressed shards, the full vectors for exact
   re-ranking. While the shard is in memory they also search the tuning queries exactly and at
   each nprobe, so the driver can choose nprobe from measured recall@10.

Every shard is an IVF index over the same trained quantizer, so shards are interchangeable.
Faces get faiss ids in input order: part files sorted by name, rows in file order (an image's
faces are in one part). Erased faces leave gaps in the ids; id tables carry the ids explicitly.
The manifest names each shard's ``sources`` (part file, row range, first faiss id) and the
version's ``next_id``, so ``facelake.index.update`` can extend the version later, keeping the
shards whose parts did not change (their ids stay; new faces are numbered from ``next_id``).
"""

from __future__ import annotations

import datetime as dt
import io
import logging
import math
import time
from dataclasses import dataclass
from typing import Callable, Mapping, Sequence

import faiss
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import ray

import facelake
from facelake import device, faults, storage
from facelake.errors import ConfigError
from facelake.index import layout
from facelake.index.load import VersionHandle
from facelake.index.params import TARGET_RECALL, TUNING_QUERIES, TUNING_TURN, IndexParams, choose_params, nprobe_ladder
from facelake.schema import id_table_schema, index_manifest
from facelake.storage import StorageOptions

log = logging.getLogger(__name__)

# One shard per million faces by default: 512 MB (128-d IVF-Flat) or ~50 MB (PQ) per search
# actor, and enough shards to spread search over a cluster at archive scale.
DEFAULT_SHARD_SIZE = 1_000_000
FACE_INPUT_COLUMNS = ("image_id", "face_index", "bbox", "embedding")
TUNING_K = 10
SATURATION_SLACK = 0.002         # recall@10 given up for a smaller nprobe when the target is out of reach
Hooks = Mapping[str, Callable[[str], None]]
HOOK_NAMES = ("before_manifest", "before_pointer")
FacesInput = pa.Table | str | list


def gpu_available() -> bool:
    """True when faiss was built with GPU support and the connected Ray cluster has a GPU."""
    return device.faiss_on_gpu()


def train(xb_sample: np.ndarray, params: IndexParams, use_gpu: bool = False) -> faiss.Index:
    """Train an empty IVF-Flat / IVF-PQ index (inner product) on L2-normalised float32 vectors.

    On a GPU only k-means runs there (faiss's bench_ivf pattern); the result is a CPU index.
    """
    xb_sample = _as_vectors(xb_sample, params.dim)
    index = faiss.index_factory(params.dim, params.factory, faiss.METRIC_INNER_PRODUCT)
    ivf = faiss.downcast_index(faiss.extract_index_ivf(index))
    if isinstance(ivf, faiss.IndexIVFPQ):  # polysemous codes are not searched; training them triples PQ time
        ivf.do_polysemous_training = False
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


# ------------------------------------------------------------------------------ the input

@dataclass(frozen=True)
class Part:
    """One input file of the faces table (or an in-memory table in the object store)."""

    uri: str | None
    rows: int
    first_row: int                      # global row number (= faiss id in a full build) of its first row
    ref: object = None                  # ray.ObjectRef of an in-memory table

    @property
    def name(self) -> str | None:
        """The file name: what a shard's ``sources`` name (parts of record are immutable)."""
        return None if self.uri is None else self.uri.rstrip("/").rsplit("/", 1)[-1]


def list_parts(faces: FacesInput, options: StorageOptions | None) -> tuple[list[Part], pa.Schema]:
    """The faces table's parts with row counts, and their unified schema (footers only)."""
    if isinstance(faces, pa.Table):
        return [Part(uri=None, rows=faces.num_rows, first_row=0, ref=ray.put(faces))], faces.schema
    uris = faces if isinstance(faces, list) else storage.list_files(faces, ".parquet", options)
    if not uris:
        raise ConfigError(f"no faces table at {storage.redact(str(faces))}: run `facelake embed` first or "
                          f"pass the folder it wrote")
    parts, schemas, first = [], [], 0
    for uri in sorted(uris) if not isinstance(faces, list) else uris:
        with storage.open_parquet(uri, options) as meta:
            rows, schema = meta.metadata.num_rows, meta.schema_arrow
        parts.append(Part(uri=uri, rows=rows, first_row=first))
        schemas.append(schema)
        first += rows
    return parts, pa.unify_schemas(schemas, promote_options="permissive")


def check_schema(schema: pa.Schema) -> int:
    """The embedding dimension, after checking the faces table has what an index needs."""
    missing = [c for c in FACE_INPUT_COLUMNS if c not in schema.names]
    if missing:
        raise ConfigError(f"faces table lacks column(s) {missing}: pass the table `facelake embed` "
                          f"wrote (schema facelake.schema.faces_schema)")
    if not pa.types.is_fixed_size_list(schema.field("embedding").type):
        raise ConfigError("faces.embedding must be a fixed_size_list<float32>: pass the table "
                          "`facelake embed` wrote")
    return schema.field("embedding").type.list_size


def _read_rows(part: Part, start: int, stop: int, columns: list[str] | None,
               options: StorageOptions | None) -> pa.Table:
    """Rows [start, stop) (part-local) of one part, reading only the row groups that hold them."""
    if part.ref is not None:
        table = ray.get(part.ref)
        return table.slice(start, stop - start).select([c for c in columns or table.column_names
                                                        if c in table.column_names])
    with storage.open_parquet(part.uri, options) as reader:
        groups, first, offset = [], None, 0
        for g in range(reader.metadata.num_row_groups):
            n = reader.metadata.row_group(g).num_rows
            if offset + n > start and offset < stop:
                groups.append(g)
                first = offset if first is None else first
            offset += n
        wanted = [c for c in (columns or reader.schema_arrow.names) if c in reader.schema_arrow.names]
        table = reader.read_row_groups(groups, columns=wanted) if groups else reader.schema_arrow.empty_table()
    return table.slice(start - (first or 0), stop - start)


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


def read_faces(faces: pa.Table | str, options: StorageOptions | None = None) -> pa.Table:
    """The whole faces table, checked (small tables, tests and notebooks; jobs never call it)."""
    if isinstance(faces, str):
        try:
            faces = storage.read_table(faces, columns=None, options=options)
        except FileNotFoundError as err:
            raise ConfigError(f"no faces table at {storage.redact(faces)}: run `facelake embed` "
                              f"first or pass the folder it wrote") from err
    check_schema(faces.schema)
    return faces


def shard_bounds(n: int, shards: int | None, shard_size: int | None) -> list[tuple[int, int]]:
    """Contiguous [start, stop) row ranges, as even as possible."""
    if shards is not None and shard_size is not None:
        raise ConfigError("give --shards or --shard-size, not both")
    if shards is not None and not 1 <= shards <= n:
        raise ConfigError(f"--shards must be within 1..{n} (the number of faces), got {shards}")
    if shard_size is not None and shard_size < 1:
        raise ConfigError(f"--shard-size must be positive, got {shard_size}")
    count = shards or math.ceil(n / (shard_size or DEFAULT_SHARD_SIZE))
    edges = np.linspace(0, n, count + 1).round().astype(int)
    return [(int(a), int(b)) for a, b in zip(edges[:-1], edges[1:])]


def pieces(parts: list[Part], start: int, stop: int) -> list[tuple[int, int, int, int]]:
    """(part number, part-local start, part-local stop, faiss id of the first row) covering global
    rows [start, stop); in a full build a row's faiss id is its global row number."""
    out = []
    for number, part in enumerate(parts):
        lo, hi = max(start, part.first_row), min(stop, part.first_row + part.rows)
        if lo < hi:
            out.append((number, lo - part.first_row, hi - part.first_row, lo))
    return out


def sources(parts: list[Part], shard_pieces: list[tuple[int, int, int, int]]) -> list[dict]:
    """A shard's pieces as the manifest records them: part file name, row range, first faiss id.
    ``facelake.index.update`` reuses a shard whose parts are all still in the table of record."""
    return [{"part": parts[number].name, "part_rows": parts[number].rows, "start": start, "stop": stop,
             "first_id": first} for number, start, stop, first in shard_pieces]


# ------------------------------------------------------------------------------ tasks

@ray.remote
def _sample_task(part: Part, size: int, seed: int, options: StorageOptions | None) -> tuple[np.ndarray, np.ndarray]:
    """``size`` random rows of one part: (normalised vectors, global row numbers)."""
    picks = np.sort(np.random.default_rng(seed).choice(part.rows, size, replace=False))
    table = _read_rows(part, 0, part.rows, ["image_id", "embedding"], options).take(pa.array(picks))
    return embeddings(table), picks + part.first_row


@ray.remote
def _train_task(params: IndexParams, use_gpu: bool, *samples: tuple[np.ndarray, np.ndarray]) -> np.ndarray:
    xb = np.concatenate([s[0] for s in samples])
    return faiss.serialize_index(train(xb, params, use_gpu))


@ray.remote
def _tuning_queries_task(count: int, *samples: tuple[np.ndarray, np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    """A random subset of the training sample, used as probes to tune nprobe (self-excluded)."""
    xb = np.concatenate([s[0] for s in samples])
    ids = np.concatenate([s[1] for s in samples])
    picks = np.random.default_rng(1).choice(len(xb), min(count, len(xb)), replace=False)
    return np.ascontiguousarray(xb[picks]), ids[picks]


@ray.remote
def _similarity_task(trained: np.ndarray, *samples: tuple[np.ndarray, np.ndarray]) -> float:
    xb = np.concatenate([s[0] for s in samples])
    index = faiss.deserialize_index(trained)          # kept: the quantizer belongs to it
    quantizer = faiss.extract_index_ivf(index).quantizer
    D, _ = quantizer.search(np.ascontiguousarray(xb, np.float32), 1)
    return float(D.mean())


def sampled_similarity(faces: FacesInput, trained: bytes | np.ndarray, size: int,
                       options: StorageOptions | None = None, rows: Sequence[int] | None = None) -> float:
    """Mean inner product of ``size`` sampled faces to their nearest centroid of ``trained`` (how
    well a trained quantizer still fits the collection), computed in Ray tasks. ``rows``: each
    part's row count when ``faces`` is a list of parts whose counts are known (a table version's
    record), so no footer is read here."""
    if rows is not None and isinstance(faces, list) and len(rows) == len(faces):
        first = np.concatenate([[0], np.cumsum(rows)[:-1]]).astype(int)
        parts = [Part(uri=u, rows=int(n), first_row=int(f)) for u, n, f in zip(faces, rows, first)]
    else:
        parts, _ = list_parts(faces, options)
    samples = [_sample_task.options(num_cpus=0.5).remote(p, n, i, options)
               for i, (p, n) in enumerate(zip(parts, _sample_sizes(parts, size))) if n]
    return ray.get(_similarity_task.remote(np.frombuffer(trained, np.uint8), *samples))


class NothingToIndex(ConfigError):
    """Every face is erased (or the faces table is empty): there is nothing to publish."""


@dataclass(frozen=True)
class ShardJob:
    """What one shard task builds: its rows, where its files go, how."""

    shard_no: int
    pieces: list[tuple[int, int, int, int]]     # (part number, start, stop, first faiss id), ids ascending
    uris: tuple[str, str, str]
    id_schema: pa.Schema
    model: str
    weights_sha256: str
    params: IndexParams
    use_gpu: bool
    threads: int


@ray.remote
def _shard_task(job: ShardJob, parts: list[Part], trained: np.ndarray, erased: pa.Array | None,
                tuning: tuple[np.ndarray, np.ndarray] | None, options: StorageOptions | None) -> dict:
    """Read one shard's rows, add them to a clone of the trained index, write its files."""
    faiss.omp_set_num_threads(job.threads)
    wanted = list(job.id_schema.names[1:]) + ["embedding", "model", "weights_sha256"]
    tables = []
    for number, start, stop, first in job.pieces:
        table = _read_rows(parts[number], start, stop, wanted, options)
        tables.append(table.append_column("faiss_id", pa.array(np.arange(first, first + table.num_rows))))
    table = pa.concat_tables(tables, promote_options="permissive") if tables else None
    _check_model(table, job.model, job.weights_sha256)
    erased_count = 0
    if erased is not None and len(erased):
        keep = pc.invert(pc.is_in(table["image_id"], value_set=erased))
        erased_count = table.num_rows - pc.sum(keep).as_py()
        table = table.filter(keep)
    xb = embeddings(table)
    ids = table.select(job.id_schema.names).cast(job.id_schema)
    faiss_ids = ids.column("faiss_id").to_numpy()
    index = faiss.deserialize_index(trained)
    if job.use_gpu and job.params.pq_m is None:   # faiss GPU has no fast-scan PQ: those add on CPU
        resources = faiss.StandardGpuResources()
        gpu = faiss.index_cpu_to_gpu(resources, 0, index)
        gpu.add_with_ids(xb, faiss_ids)
        index = faiss.index_gpu_to_cpu(gpu)
    else:
        index.add_with_ids(xb, faiss_ids)

    files = {}
    index_bytes = faiss.serialize_index(index).tobytes()
    payloads = [(job.uris[0], index_bytes), (job.uris[1], _ipc_bytes(ids))]
    if job.params.rerank:
        payloads.append((job.uris[2], _npy_bytes(xb)))
    for uri, data in payloads:
        storage.write_bytes_atomic(uri, data, options)
        files[uri.rstrip("/").rsplit("/", 1)[-1]] = {"sha256": layout.sha256(data), "bytes": len(data)}
    result = {"files": files, "count": len(xb), "erased": erased_count,
              "resident_bytes": len(index_bytes) + faiss_ids.nbytes}
    if tuning is not None and len(xb):
        D, rows = faiss.knn(tuning[0], xb, 2, metric=faiss.METRIC_INNER_PRODUCT)
        result["nearest"] = (D, np.where(rows >= 0, faiss_ids[np.maximum(rows, 0)], -1))
    return result


@ray.remote
def _tune_task(handle, shard_no: int, xq: np.ndarray) -> dict:
    """Exact and per-nprobe top-k of the tuning probes over one written shard (``tune_shard``)."""
    from facelake.index.load import open_shard

    faiss.omp_set_num_threads(1)
    return tune_shard(open_shard(handle, shard_no), xq, handle.nlist)


def tune_shard(shard, xq: np.ndarray, nlist: int, k: int = TUNING_K) -> dict:
    """Exact top-k of ``xq`` over a loaded shard, and its top-k as searched at each nprobe of the
    ladder (re-ranked as searches are)."""
    from facelake.index.search import search_reranked, search_shard

    if shard.vectors is not None:
        D, rows = faiss.knn(xq, np.ascontiguousarray(shard.vectors, np.float32), k,
                            metric=faiss.METRIC_INNER_PRODUCT)
        exact = (D, np.where(rows >= 0, shard.faiss_ids[np.maximum(rows, 0)], -1))
    else:                                                  # IVF-Flat: scanning every list is exact
        exact = search_shard(shard.index, xq, k, nlist)
    return {"exact": exact, "approx": {p: search_reranked(shard, xq, k, p) for p in nprobe_ladder(nlist)}}


def _ipc_bytes(table: pa.Table) -> bytes:
    sink = pa.BufferOutputStream()
    with pa.ipc.new_file(sink, table.schema) as writer:   # one batch: take() on a memory-mapped
        writer.write_table(table.combine_chunks())         # many-chunk table concatenates per call
    return sink.getvalue().to_pybytes()


def _npy_bytes(xb: np.ndarray) -> bytes:
    sink = io.BytesIO()
    np.save(sink, np.ascontiguousarray(xb, dtype=np.float32))
    return sink.getvalue()


def _check_model(faces: pa.Table, model: str, weights_sha256: str) -> None:
    for column, expected in (("model", model), ("weights_sha256", weights_sha256)):
        if column in faces.column_names:
            found = [v for v in pc.unique(faces.column(column)).to_pylist() if v != expected]
            if found:
                raise ConfigError(f"faces table holds {column} {found[:3]}, not {expected!r}: index "
                                  f"faces of one model at a time (re-embed with --model {model})")


# ------------------------------------------------------------------------------ tuning

def tuning_probes(xq: np.ndarray, qids: np.ndarray, nearest: list[tuple[np.ndarray, np.ndarray]],
                  seed: int = 2, turn: float = TUNING_TURN) -> np.ndarray:
    """New-photo stand-ins for tuning: each sample face turned, in a random direction on the unit
    sphere, by ``turn`` of the angle between it and its nearest other face of the collection.

    A face of the collection is too easy a probe: it sits exactly where its neighbours are, so
    its recall saturated at small nprobe (bench/scale.py at 2M: 0.998 at nprobe 4 on sample
    faces, 0.970 at nprobe 16 on new photos). A new photo of an archived person differs from the
    archived ones about as much as they differ from each other; the stand-ins move most of
    that way (calibration in facelake.index.params). ``nearest`` holds each shard's exact top-2
    of ``xq`` (the face itself and its nearest).
    """
    from facelake.index.search import merge_topk

    D, I = merge_topk(nearest, 2)
    D = np.where(I == qids[:, None], -np.inf, D).max(axis=1)     # the nearest face other than itself
    cosine = np.cos(turn * np.arccos(np.clip(np.where(np.isfinite(D), D, 0.0), -1.0, 1.0)))[:, None]
    rng = np.random.default_rng(seed)
    turn = rng.standard_normal(xq.shape).astype(np.float32)
    turn -= (turn * xq).sum(axis=1, keepdims=True) * xq             # orthogonal to the face
    turn /= np.maximum(np.linalg.norm(turn, axis=1, keepdims=True), 1e-12)
    probes = cosine * xq + np.sqrt(1.0 - cosine ** 2) * turn
    return np.ascontiguousarray(probes / np.linalg.norm(probes, axis=1, keepdims=True), np.float32)


def recall_curve(tuned: list[dict], nlist: int, k: int = TUNING_K) -> dict[int, float]:
    """recall@k per nprobe of the tuning probes, merged over every shard's ``tune_shard`` result."""
    from facelake.index.search import merge_topk

    truth = merge_topk([t["exact"] for t in tuned], k)[1]
    valid = int((truth >= 0).sum())
    curve = {}
    for nprobe in nprobe_ladder(nlist):
        found = merge_topk([t["approx"][nprobe] for t in tuned], k)[1]
        hits = sum(len(np.intersect1d(f[f >= 0], t[t >= 0])) for f, t in zip(found, truth))
        curve[nprobe] = round(hits / max(1, valid), 4)
    return curve


def choose_nprobe(curve: dict[int, float], nlist: int, target: float = TARGET_RECALL) -> int:
    """The smallest nprobe whose measured recall@10 on the tuning probes reaches ``target``; when
    none does (compressed shards level off below it, and scanning more lists can even lower
    their recall: more PQ candidates compete for the re-ranked short list), the smallest within
    SATURATION_SLACK of the best measured."""
    best = max(curve.values())
    goal = min(target, best - SATURATION_SLACK) if best < target else target
    for nprobe in sorted(curve):
        if curve[nprobe] >= goal:
            return min(nlist, nprobe)
    return min(nlist, max(curve))


# ------------------------------------------------------------------------------ the build

def _reuse_trained(root: str, version: str, model: str, dim: int, nlist: int | None, pq_m: int | None,
                   options: StorageOptions | None) -> tuple[np.ndarray, dict]:
    from facelake.index.load import open_version, read_verified

    handle = open_version(root, version, expect_model=model, expect_dim=dim, options=options)
    old = handle.manifest
    if (nlist and nlist != old["nlist"]) or (pq_m is not None and pq_m and pq_m != old["pq"]):
        raise ConfigError(f"--trained-from {version} has nlist {old['nlist']} and pq {old['pq']}: drop "
                          f"--nlist/--pq or build without --trained-from")
    return np.frombuffer(read_verified(handle, layout.TRAINED), np.uint8), old


def _sample_sizes(parts: list[Part], total: int) -> list[int]:
    """Rows drawn from each part so that the sample is ``total`` rows, proportional to size."""
    n = sum(p.rows for p in parts)
    sizes = [min(p.rows, math.ceil(total * p.rows / n)) for p in parts]
    return sizes


def build_version(faces: FacesInput, root: str, *, model: str, weights_sha256: str,
                  shards: int | None = None, shard_size: int | None = None, nlist: int | None = None,
                  pq: int | None = None, nprobe: int | None = None, rerank: int | None = None, keep: int = 3,
                  trained_from: str | None = None, use_gpu: bool | None = None,
                  erased_ids: pa.Array | None = None, target_recall: float = TARGET_RECALL,
                  source: str | None = None, options: StorageOptions | None = None,
                  hooks: Hooks | None = None) -> dict:
    """Build, publish and return the manifest of a new index version under ROOT/index/.

    ``faces`` is the URI of the Parquet dataset ``facelake embed`` wrote, a list of its part
    URIs (a root's faces of record), or an in-memory table (tests, notebooks). Faces of
    ``erased_ids`` are left out of every shard. Needs a connected Ray (``ray.init`` or
    ``facelake.cluster.runtime.connect``). ``hooks`` maps "before_manifest" / "before_pointer" to
    callables given the version name (tests crash there on purpose). Older versions beyond
    ``keep`` are pruned afterwards.
    """
    storage.check_uri(root)
    if keep < 1:
        raise ConfigError(f"--keep must be at least 1 (the live version is always kept), got {keep}")
    if not model or not weights_sha256:
        raise ConfigError("model and weights_sha256 are required: they are checked at load time")
    unknown = set(hooks or {}) - set(HOOK_NAMES)
    if unknown:
        raise ConfigError(f"unknown hook(s) {sorted(unknown)}; known: {HOOK_NAMES}")
    if not 0.0 < target_recall <= 1.0:
        raise ConfigError(f"target recall must be within (0, 1], got {target_recall}")
    if isinstance(faces, str):
        storage.check_uri(faces)
    if not ray.is_initialized():
        raise ConfigError("build_version needs a running Ray: call facelake.cluster.runtime.connect() "
                          "(or ray.init()) first")
    options = options or StorageOptions.from_env()
    started = time.perf_counter()

    parts, schema = list_parts(faces, options)
    dim = check_schema(schema)
    n = sum(p.rows for p in parts)
    trained = None
    if trained_from:
        trained, old = _reuse_trained(root, trained_from, model, dim, nlist, pq, options)
        nlist, pq, rerank = old["nlist"], old["pq"] or 0, old.get("rerank", 0)
    params = choose_params(n, dim, nlist=nlist, pq=pq, nprobe=nprobe, rerank=rerank)
    if trained_from and old.get("factory") != params.factory:
        raise ConfigError(f"--trained-from {trained_from} holds a {old.get('factory')} quantizer, this facelake "
                          f"builds {params.factory}: build without --trained-from (`facelake rebuild --full` "
                          f"retrains)")
    if use_gpu and not device.faiss_gpu():
        raise ConfigError("use_gpu=True but this faiss has no GPU support: install faiss-gpu "
                          "(make install-gpu) or leave use_gpu unset")
    use_gpu = gpu_available() if use_gpu is None else use_gpu
    if use_gpu and ray.cluster_resources().get("GPU", 0) < 1:
        raise ConfigError("use_gpu=True but the Ray cluster has no GPU: leave use_gpu unset")
    bounds = shard_bounds(n, shards, shard_size)
    version = layout.new_version_name(root, options)
    log.info("index %s: %d faces in %d part(s), dim %d, %s, train on %d, %d shard(s), %s", version, n,
             len(parts), dim, params.factory, params.train_size, len(bounds), "GPU" if use_gpu else "CPU")
    gpus = {"num_gpus": 1} if use_gpu else {}

    samples = [_sample_task.options(num_cpus=0.5).remote(p, size, i, options)
               for i, (p, size) in enumerate(zip(parts, _sample_sizes(parts, max(params.train_size,
                                                                                TUNING_QUERIES)))) if size]
    train_started = time.perf_counter()
    if trained is None:
        trained = ray.get(_train_task.options(**gpus).remote(params, use_gpu, *samples))
    trained_seconds = round(time.perf_counter() - train_started, 3)
    trained_bytes = trained.tobytes()
    storage.write_bytes_atomic(layout.file_uri(root, version, layout.TRAINED), trained_bytes, options)
    files = {layout.TRAINED: {"sha256": layout.sha256(trained_bytes), "bytes": len(trained_bytes)}}
    tuning = _tuning_queries_task.remote(TUNING_QUERIES, *samples)

    id_schema = id_table_schema(schema)
    threads = _threads_per_task(len(bounds))
    trained_ref = ray.put(trained)
    erased_list = pa.array([], pa.string()) if erased_ids is None else pc.unique(pa.array(erased_ids).cast(pa.string()))
    erased = ray.put(erased_list) if len(erased_list) else None
    groups = [pieces(parts, start, stop) for start, stop in bounds]
    results = run_shards(groups, range(len(groups)), parts, root, version, trained_ref, erased, tuning,
                         id_schema=id_schema, model=model, weights_sha256=weights_sha256, params=params,
                         use_gpu=use_gpu, threads=threads, options=options)
    for result in results:
        files.update(result["files"])
    total = sum(r["count"] for r in results)
    if total == 0:
        raise NothingToIndex("no faces left to index: every face is erased or the faces table is empty")

    manifest = {
        "version": version,
        "model": model,
        "weights_sha256": weights_sha256,
        "dim": dim,
        "metric": params.metric,
        "factory": params.factory,
        "nlist": params.nlist,
        "pq": params.pq_m,
        "rerank": params.rerank,
        "nprobe": nprobe or params.nprobe,
        "train_size": params.train_size,
        "columns": id_schema.names,
        "shards": [{"shard": i, "first_id": a, "count": r["count"], "erased": r["erased"],
                    "resident_bytes": r["resident_bytes"],
                    "index_file": layout.shard_files(i)[0], "ids_file": layout.shard_files(i)[1],
                    **({"vectors_file": layout.shard_files(i)[2]} if params.rerank else {}),
                    "sources": sources(parts, group)}
                   for i, ((a, _), r, group) in enumerate(zip(bounds, results, groups))],
        "next_id": n,                                   # faiss ids of this version are below it
        "total": total,
        "erased_faces": sum(r["erased"] for r in results),
        "files": files,
        "source": source or (storage.redact(faces) if isinstance(faces, str) else
                             f"<{len(parts)} part file(s)>" if isinstance(faces, list) else "<in-memory table>"),
        "created_at": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "facelake_version": facelake.__version__,
        "faiss_version": faiss.__version__,
        "trained_from": trained_from,
        "erased_ids_count": len(erased_list),       # distinct ids of the erasure list left out
        "erased_ids_sha256": layout.sha256("\0".join(sorted(erased_list.to_pylist())).encode()),
        "build": {"gpu": bool(use_gpu), "train_seconds": trained_seconds,
                  "seconds": round(time.perf_counter() - started, 3)},
    }
    manifest.update(tune(VersionHandle(root, version, manifest, options), tuning, results, nprobe, target_recall))
    manifest["build"]["seconds"] = round(time.perf_counter() - started, 3)
    return publish_manifest(root, version, index_manifest(manifest), keep=keep, hooks=hooks, options=options)


def tune(handle: VersionHandle, tuning, results: list[dict], nprobe: int | None, target_recall: float) -> dict:
    """nprobe (and how it was chosen) for a written, unpublished version: recall@10 of the tuning
    probes (``tuning_probes``) at each nprobe, searched in one Ray task per shard."""
    xq, qids = ray.get(tuning)
    probes = tuning_probes(xq, qids, [r["nearest"] for r in results if "nearest" in r])
    probes_ref = ray.put(probes)
    tuned = ray.get([_tune_task.options(num_cpus=1).remote(handle, i, probes_ref)
                     for i, r in enumerate(results) if r["count"]])
    curve = recall_curve(tuned, handle.nlist)
    return {"nprobe": nprobe or choose_nprobe(curve, handle.nlist, target_recall),
            "nprobe_how": ("explicit --nprobe" if nprobe else f"the smallest with recall@10 >= {target_recall} "
                           f"(or within {SATURATION_SLACK} of the best) on new-photo stand-ins of sample faces"),
            "tuning": {"queries": int(len(probes)), "k": TUNING_K, "probes": "sample faces turned as far as their "
                       "nearest face", "recall_at_10": {str(k): v for k, v in curve.items()}, "target": target_recall}}


def publish_manifest(root: str, version: str, manifest: dict, *, keep: int, hooks: Hooks | None,
                     options: StorageOptions | None) -> dict:
    """Write a version's manifest, then move CURRENT to it (the one publish step of every
    builder: hooks and fault points before each), and prune to ``keep`` versions."""
    _run_hook(hooks, "before_manifest", version)
    manifest_sha = layout.write_manifest(root, version, manifest, options)
    _run_hook(hooks, "before_pointer", version)
    layout.publish(root, version, manifest_sha, options)
    layout.prune(root, keep, options)
    return manifest


def run_shards(groups: list[list[tuple[int, int, int, int]]], shard_numbers, parts: list[Part], root: str,
               version: str, trained_ref, erased, tuning, *, id_schema: pa.Schema, model: str,
               weights_sha256: str, params: IndexParams, use_gpu: bool, threads: int,
               options: StorageOptions | None) -> list[dict]:
    """Build shard ``shard_numbers[i]`` of ``version`` from the pieces ``groups[i]`` in parallel
    Ray tasks (``_shard_task``); return each task's result (files, count, erased, tuning)."""
    gpus = {"num_gpus": 1} if use_gpu else {}
    tasks = []
    for shard_no, group in zip(shard_numbers, groups):
        job = ShardJob(shard_no=shard_no, pieces=group,
                       uris=tuple(layout.file_uri(root, version, name) for name in layout.shard_files(shard_no)),
                       id_schema=id_schema, model=model, weights_sha256=weights_sha256, params=params,
                       use_gpu=use_gpu, threads=threads)
        tasks.append(_shard_task.options(num_cpus=threads, **gpus).remote(job, parts, trained_ref, erased, tuning,
                                                                          options))
    return ray.get(tasks)


def _run_hook(hooks: Hooks | None, name: str, version: str) -> None:
    faults.point(f"index.{name}", version)
    if hooks and name in hooks:
        hooks[name](version)


def _threads_per_task(tasks: int) -> int:
    """CPUs (and faiss threads) per add task: the smallest node's CPUs shared by the tasks on it."""
    nodes = [node["Resources"].get("CPU", 1) for node in ray.nodes() if node.get("Alive")] or [1]
    per_node = math.ceil(tasks / len(nodes))
    return max(1, int(min(nodes) // max(1, per_node)))
