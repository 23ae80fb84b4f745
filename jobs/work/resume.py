"""What an embed run still has to do: the manifest rows whose image_id OUT does not hold yet.

A first run (OUT holds no faces or errors parts) pays nothing: the embed job reads the manifest
itself. A rerun gets a *todo manifest*, the manifest's rows (every column) less the image ids
already in OUT's faces or errors tables, written under ``OUT/_resume/<run>/todo/``, and the
counts; the embed job then reads the todo manifest instead of the manifest.

Nothing that grows with the archive passes through the driver: the driver lists the part files
and reads the manifest's footers, then a hash-partitioned anti-join runs in Ray tasks through
storage (``OUT/_resume/<run>/``):

1. scatter: each task takes a range of manifest row groups, or a group of OUT's part files, and
   writes its rows (manifest: every column; parts: the distinct image ids) into ``buckets``
   fragments by a hash of image_id;
2. anti-join: one task per bucket reads that bucket's fragments of both sides and writes the
   manifest rows whose id is not done; it returns two counts.

A task holds about 1/``buckets`` of the manifest and of the done ids (BUCKET_ROWS each), so the
work spreads over the cluster and no process holds all ids. A manifest of at most DRIVER_ROWS
rows (and OUT of at most DRIVER_PARTS parts) is checked in the driver instead (its ids, one
part of OUT at a time), without Ray: such a rerun with nothing left starts no Ray and loads no
model; a larger one runs the tasks and, with nothing left, loads no model. Tested in tests/test_resume.py.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import pyarrow as pa
import pyarrow.compute as pc

from facelake import storage
from facelake.faces import manifest as manifestmod
from facelake.errors import ConfigError

# Manifest rows (and about as many done ids) per anti-join task: ~100 MB of ids and uris.
BUCKET_ROWS = 1_000_000
# A manifest this small, against at most this many part files, is checked in the driver (its
# ids, ~10 MB; one part at a time): no Ray, no task start.
DRIVER_ROWS = 100_000
DRIVER_PARTS = 1024
# Manifest rows per scatter task (whole row groups) and OUT's part files per scatter task (a
# part holds at most one chunk of images, 512 by default).
SCATTER_ROWS = 1_000_000
PARTS_PER_TASK = 256
# Light tasks: they must get scheduled beside the model actors (see jobs/embed.py READ_CPUS).
TASK_CPUS = 0.25
RESUME = "_resume"
DONE_TABLES = ("faces", "errors")


@dataclass(frozen=True)
class Todo:
    """What is left: ``files`` (full URIs of the todo manifest; None: the whole manifest, nothing
    is done yet), ``rows`` left to embed and ``done`` manifest rows already in OUT."""

    files: tuple[str, ...] | None
    rows: int
    done: int


def left_to_embed(info: manifestmod.ManifestInfo, out: str, model: str, run_id: str,
                  options: storage.StorageOptions | None = None, *, address: str | None = None,
                  buckets: int | None = None, driver_rows: int | None = None) -> Todo:
    """The manifest rows of ``info`` whose image_id OUT's faces and errors tables do not hold.

    OUT's parts must all be of ``model`` (ConfigError otherwise: one model per OUT). ``buckets``
    (default: manifest rows / BUCKET_ROWS) and ``driver_rows`` (default DRIVER_ROWS) are for tests.
    """
    parts = [f for name in DONE_TABLES for f in storage.list_files(storage.join(out, name), ".parquet", options)]
    if not parts:
        return Todo(None, info.rows, 0)
    for stale in _runs_scratched(out, options):    # left by a killed run (one run per OUT at a time)
        if stale != run_id:
            remove_scratch(out, stale, options)
    scratch = storage.join(out, RESUME, run_id)
    if info.rows <= (DRIVER_ROWS if driver_rows is None else driver_rows) and len(parts) <= DRIVER_PARTS:
        models, todo = _in_driver(info, parts, scratch, options)
    else:
        models, todo = _in_tasks(info, parts, scratch, options, address,
                                 buckets or max(1, math.ceil(info.rows / BUCKET_ROWS)))
    if models - {model}:
        storage.remove(scratch, recursive=True, options=options)
        raise ConfigError(f"{storage.redact(out)} already holds faces or errors made with model(s) "
                          f"{sorted(models - {model})}; write each model to its own --out")
    return todo


def remove_scratch(out: str, run_id: str, options: storage.StorageOptions | None = None) -> None:
    """Delete a run's todo manifest (the embed job calls it when the run is over)."""
    storage.remove(storage.join(out, RESUME, run_id), recursive=True, options=options)


def _runs_scratched(out: str, options) -> list[str]:
    fs, path = storage.filesystem(storage.join(out, RESUME), options)
    if not fs.exists(path):
        return []
    return sorted(p.rstrip("/").rsplit("/", 1)[-1] for p in fs.ls(path, detail=False))


def _done_ids(part: str, options: storage.StorageOptions | None) -> tuple[pa.Array, set[str]]:
    table = storage.read_file(part, columns=["image_id", "model"], options=options)
    return (pc.unique(table["image_id"].cast(pa.string())),
            set(pc.unique(table["model"]).to_pylist()))


def _in_driver(info, parts, scratch, options) -> tuple[set[str], Todo]:
    import numpy as np

    table = storage.read_table(info.uri, options=options)
    ids = table["image_id"].cast(pa.string())
    done = pa.array(np.zeros(table.num_rows, bool))
    models: set[str] = set()
    for part in parts:   # one part at a time: memory is the manifest's ids
        part_ids, part_models = _done_ids(part, options)
        models |= part_models
        done = pc.or_(done, pc.is_in(ids, value_set=part_ids))
    left = table.filter(pc.invert(done))
    files: tuple[str, ...] = ()
    if left.num_rows:
        files = (storage.join(scratch, "todo", "part-0.parquet"),)
        storage.write_table(files[0], left, options)
    return models, Todo(files, left.num_rows, table.num_rows - left.num_rows)


def bucket_of(ids: pa.Array | pa.ChunkedArray, buckets: int) -> pa.Array:
    """The bucket (0 .. buckets-1) of each image id: a stable hash, the same in every process."""
    import numpy as np
    import pandas as pd

    values = ids.to_numpy(zero_copy_only=False) if len(ids) else np.array([], object)
    return pa.array((pd.util.hash_array(values.astype(object)) % np.uint64(buckets)).astype(np.int32))


def _scatter(table: pa.Table, buckets: int, folder: str, name: str, options) -> None:
    """Write ``table``'s rows into ``folder``/b=<k>/<name>.parquet by the bucket of their image_id."""
    if not table.num_rows:
        return
    where = bucket_of(table["image_id"].cast(pa.string()), buckets)
    for k in pc.unique(where).to_pylist():
        rows = table.filter(pc.equal(where, k))
        storage.write_table(storage.join(folder, f"b={k}", f"{name}.parquet"), rows, options)


def _scatter_manifest(file_uri: str, row_groups: list[int], buckets: int, folder: str, name: str,
                      options) -> None:
    with storage.open_parquet(file_uri, options) as parquet:
        table = parquet.read_row_groups(row_groups)
    _scatter(table, buckets, folder, name, options)


def _scatter_done(parts: list[str], buckets: int, folder: str, name: str, options) -> set[str]:
    ids, models = [], set()
    for part in parts:
        part_ids, part_models = _done_ids(part, options)
        ids.append(part_ids)
        models |= part_models
    unique = pc.unique(pa.chunked_array(ids, pa.string())) if ids else pa.array([], pa.string())
    _scatter(pa.table({"image_id": unique}), buckets, folder, name, options)
    return models


def _anti_join(k: int, scratch: str, schema: pa.Schema, options) -> tuple[int, int]:
    """Bucket ``k``: write its manifest rows whose id is not done; return (left, done) row counts."""
    rows = storage.list_files(storage.join(scratch, "manifest", f"b={k}"), ".parquet", options)
    if not rows:
        return 0, 0
    table = pa.concat_tables([storage.read_file(f, options=options) for f in rows]).cast(schema)
    total = table.num_rows
    done_files = storage.list_files(storage.join(scratch, "done", f"b={k}"), ".parquet", options)
    if done_files:
        done = pa.chunked_array([storage.read_file(f, options=options)["image_id"] for f in done_files], pa.string())
        table = table.filter(pc.invert(pc.is_in(table["image_id"].cast(pa.string()), value_set=done.combine_chunks())))
    if table.num_rows:
        storage.write_table(storage.join(scratch, "todo", f"part-{k}.parquet"), table, options)
    return table.num_rows, total - table.num_rows


def manifest_pieces(info, options) -> list[tuple[str, list[int]]]:
    """Ranges of whole row groups of about SCATTER_ROWS rows each, from the manifest's footers."""
    pieces = []
    for file_uri in info.files:
        with storage.open_parquet(file_uri, options) as parquet:
            meta = parquet.metadata
        current, rows = [], 0
        for g in range(meta.num_row_groups):
            current.append(g)
            rows += meta.row_group(g).num_rows
            if rows >= SCATTER_ROWS:
                pieces.append((file_uri, current))
                current, rows = [], 0
        if current:
            pieces.append((file_uri, current))
    return pieces


def _in_tasks(info, parts, scratch, options, address, buckets) -> tuple[set[str], Todo]:
    import ray

    from facelake.cluster import runtime

    started_here = not ray.is_initialized()
    runtime.connect(address)
    storage.remove(scratch, recursive=True, options=options)
    try:
        remote = ray.remote(num_cpus=TASK_CPUS)
        waits = [remote(_scatter_manifest).remote(f, groups, buckets, storage.join(scratch, "manifest"), f"m{i}", options)
                 for i, (f, groups) in enumerate(manifest_pieces(info, options))]
        done_refs = [remote(_scatter_done).remote(parts[i:i + PARTS_PER_TASK], buckets, storage.join(scratch, "done"),
                                                  f"d{i}", options) for i in range(0, len(parts), PARTS_PER_TASK)]
        ray.get(waits)
        models = set().union(*ray.get(done_refs))
        counts = ray.get([remote(_anti_join).remote(k, scratch, info.schema, options) for k in range(buckets)])
    finally:
        for side in ("manifest", "done"):
            storage.remove(storage.join(scratch, side), recursive=True, options=options)
    left = sum(c[0] for c in counts)
    done = sum(c[1] for c in counts)
    if not left:
        runtime.shutdown_if_local(started_here and address is None)  # nothing to embed: no Ray left running
    files = tuple(storage.list_files(storage.join(scratch, "todo"), ".parquet", options))
    return models, Todo(files, left, done)
