"""Write a version's shards in parallel Ray tasks, one task per shard.

A shard task reads its own rows from the part files (``facelake.index.parts.read_rows``), drops
erased images, adds the vectors to a clone of the trained index under their global faiss ids
(on a GPU for IVF-Flat when asked) and writes the shard's files: the faiss index, the id table
(every column a result row needs: image_id, face_index, bbox, uri and the manifest's carried
columns) and, for compressed shards, the full vectors for exact re-ranking. While the vectors
are in memory it also finds each tuning query's exact nearest two faces, which the tuning
probes are made from (``facelake.index.tune``). Every shard is an IVF index over the same
trained quantizer, so shards are interchangeable.
"""

from __future__ import annotations

import io
import math
from dataclasses import dataclass
from typing import Iterable

import faiss
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import ray

from facelake import device, storage
from facelake.errors import ConfigError
from facelake.index import layout
from facelake.index.params import IndexParams
from facelake.index.parts import Part, Piece, embeddings, read_rows
from facelake.storage import StorageOptions


def gpu_available() -> bool:
    """True when faiss was built with GPU support and the connected Ray cluster has a GPU."""
    return device.faiss_on_gpu()


def threads_per_task(tasks: int) -> int:
    """CPUs (and faiss threads) per add task: the smallest node's CPUs shared by the tasks on it."""
    nodes = [node["Resources"].get("CPU", 1) for node in ray.nodes() if node.get("Alive")] or [1]
    per_node = math.ceil(tasks / len(nodes))
    return max(1, int(min(nodes) // max(1, per_node)))


@dataclass(frozen=True)
class ShardJob:
    """What one shard task builds: its rows, where its files go, how."""

    shard_no: int
    pieces: list[Piece]                         # faiss ids ascending
    uris: tuple[str, str, str]
    id_schema: pa.Schema
    model: str
    weights_sha256: str
    params: IndexParams
    use_gpu: bool
    threads: int


def run_shards(groups: list[list[Piece]], shard_numbers: Iterable[int], parts: list[Part], root: str,
               version: str, trained_ref, erased, tuning, *, id_schema: pa.Schema, model: str,
               weights_sha256: str, params: IndexParams, use_gpu: bool, threads: int,
               options: StorageOptions | None) -> list[dict]:
    """Build shard ``shard_numbers[i]`` of ``version`` from the pieces ``groups[i]`` in parallel
    Ray tasks; return each task's result: its ``files`` (name -> sha256, bytes), ``count``,
    ``erased``, ``resident_bytes`` and, given ``tuning`` queries, their ``nearest`` (D, faiss ids).
    ``trained_ref``, ``erased`` (the erased image ids, or None) and ``tuning`` are object refs."""
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


@ray.remote
def _shard_task(job: ShardJob, parts: list[Part], trained: np.ndarray, erased: pa.Array | None,
                tuning: tuple[np.ndarray, np.ndarray] | None, options: StorageOptions | None) -> dict:
    """Read one shard's rows, add them to a clone of the trained index, write its files."""
    faiss.omp_set_num_threads(job.threads)
    table, erased_count = _read_shard(job, parts, erased, options)
    xb = embeddings(table)
    ids = table.select(job.id_schema.names).cast(job.id_schema)
    faiss_ids = ids.column("faiss_id").to_numpy()
    index_bytes = faiss.serialize_index(_add(job, trained, xb, faiss_ids)).tobytes()
    payloads = [(job.uris[0], index_bytes), (job.uris[1], _ipc_bytes(ids))]
    if job.params.rerank:
        payloads.append((job.uris[2], _npy_bytes(xb)))
    files = {}
    for uri, data in payloads:
        storage.write_bytes_atomic(uri, data, options)
        files[uri.rstrip("/").rsplit("/", 1)[-1]] = {"sha256": layout.sha256(data), "bytes": len(data)}
    result = {"files": files, "count": len(xb), "erased": erased_count,
              "resident_bytes": len(index_bytes) + faiss_ids.nbytes}
    if tuning is not None and len(xb):
        D, rows = faiss.knn(tuning[0], xb, 2, metric=faiss.METRIC_INNER_PRODUCT)
        result["nearest"] = (D, np.where(rows >= 0, faiss_ids[np.maximum(rows, 0)], -1))
    return result


def _read_shard(job: ShardJob, parts: list[Part], erased: pa.Array | None,
                options: StorageOptions | None) -> tuple[pa.Table, int]:
    """The shard's rows with their faiss ids, erased images left out; and how many faces were."""
    wanted = list(job.id_schema.names[1:]) + ["embedding", "model", "weights_sha256"]
    tables = []
    for number, start, stop, first in job.pieces:
        table = read_rows(parts[number], start, stop, wanted, options)
        tables.append(table.append_column("faiss_id", pa.array(np.arange(first, first + table.num_rows))))
    table = pa.concat_tables(tables, promote_options="permissive") if tables else None
    _check_model(table, job.model, job.weights_sha256)
    if erased is None or not len(erased):
        return table, 0
    keep = pc.invert(pc.is_in(table["image_id"], value_set=erased))
    return table.filter(keep), table.num_rows - pc.sum(keep).as_py()


def _add(job: ShardJob, trained: np.ndarray, xb: np.ndarray, faiss_ids: np.ndarray) -> faiss.Index:
    """A clone of the trained index holding ``xb`` under ``faiss_ids``."""
    index = faiss.deserialize_index(trained)
    if job.use_gpu and job.params.pq_m is None:   # faiss GPU has no fast-scan PQ: those add on CPU
        resources = faiss.StandardGpuResources()
        gpu = faiss.index_cpu_to_gpu(resources, 0, index)
        gpu.add_with_ids(xb, faiss_ids)
        return faiss.index_gpu_to_cpu(gpu)
    index.add_with_ids(xb, faiss_ids)
    return index


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
