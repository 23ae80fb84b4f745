"""How many distinct images a set of part files or index shards holds, without gathering ids.

Table versions written by rebuild and erase record their image count (facelake.record.tables
TableVersion.images) and `status` shows that. This module counts where nothing was recorded: a
table version written before the count existed, and a root made by `facelake index` (its live
version's id tables). An image's faces can span two parts or two shards, so per-source counts
cannot be added up; instead Ray tasks read the sources (a group each), send each bucket of their
distinct ids (by a hash of the id) through the object store to that bucket's counting task, and
the driver adds the buckets' counts. No process holds more than its sources or one bucket; no
scratch is written (status is a read-only command). At most DRIVER_ROWS rows are counted in the
driver instead, without Ray. ``errors_by_type`` tallies error rows per stage and type the same
way (one row per image: the tasks' tallies add up). ``held`` finds, per source, how many rows
name each of a small set of ids (what `erase` removes and where): each task filters its own
sources against the set and returns only the matching (id, rows) counts. Tested in
tests/test_counts.py and tests/test_erase_holdings.py.
"""

from __future__ import annotations

import math

import pyarrow as pa
import pyarrow.compute as pc

from facelake import storage
from facelake.jobs.work.resume import bucket_of

# Rows counted in the driver (ids of a small root: ~10 MB), without starting Ray.
DRIVER_ROWS = 200_000
# Distinct ids per counting task, and sources per reading task.
BUCKET_ROWS = 2_000_000
SOURCES_PER_TASK = 64
TASK_CPUS = 0.25

# A source: ("parquet", file uri) or ("shard", (root, index version, shard number)).
Source = tuple[str, object]


def _read_ids(source: Source, options: storage.StorageOptions | None) -> pa.Array:
    return pc.unique(_id_column(source, options))


def _id_column(source: Source, options: storage.StorageOptions | None) -> pa.Array:
    """Every row's image_id of one source, as strings (one source in memory at a time)."""
    kind, where = source
    if kind == "parquet":
        ids = storage.read_file(where, ["image_id"], options)["image_id"]
    else:
        from facelake.index.load import open_version, shard_ids

        root, version, shard = where
        ids = shard_ids(open_version(root, version, options=options), shard)["image_id"]
    ids = ids.cast(pa.string())
    return ids.combine_chunks() if isinstance(ids, pa.ChunkedArray) else ids


def _scatter(sources: list[Source], buckets: int, options) -> list[pa.Array]:
    ids = pc.unique(pa.chunked_array([_read_ids(s, options) for s in sources], pa.string()))
    where = bucket_of(ids, buckets)
    return [ids.filter(pc.equal(where, k)) for k in range(buckets)]


def _count(*parts: pa.Array) -> int:
    return len(pc.unique(pa.chunked_array(parts, pa.string()))) if parts else 0


def distinct_images(sources: list[Source], rows: int, options: storage.StorageOptions | None = None, *,
                    address: str | None = None, buckets: int | None = None,
                    driver_rows: int | None = None) -> int:
    """Distinct image ids over ``sources``; ``rows`` (their row count, from metadata) decides
    between the driver (at most ``driver_rows``, default DRIVER_ROWS) and Ray tasks."""
    if not sources:
        return 0
    if rows <= (DRIVER_ROWS if driver_rows is None else driver_rows):
        return _count(*(_read_ids(s, options) for s in sources))
    import ray

    from facelake.cluster import runtime

    started_here = not ray.is_initialized()
    runtime.connect(address)
    try:
        buckets = max(2, buckets or math.ceil(rows / BUCKET_ROWS))   # num_returns=1 would not be a list
        scatter = ray.remote(num_cpus=TASK_CPUS, num_returns=buckets)(_scatter)
        refs = [scatter.remote(sources[i:i + SOURCES_PER_TASK], buckets, options)
                for i in range(0, len(sources), SOURCES_PER_TASK)]
        count = ray.remote(num_cpus=TASK_CPUS)(_count)
        return sum(ray.get([count.remote(*[r[k] for r in refs]) for k in range(buckets)]))
    finally:
        runtime.shutdown_if_local(started_here and address is None)


def _tally(parts: list[str], options) -> dict[str, int]:
    tally: dict[str, int] = {}
    for part in parts:
        table = storage.read_file(part, ["stage", "error_type"], options)
        counts = table.group_by(["stage", "error_type"], use_threads=False).aggregate([("stage", "count")])
        for row in counts.to_pylist():
            key = f"{row['stage']}/{row['error_type']}"
            tally[key] = tally.get(key, 0) + row["stage_count"]
    return tally


def errors_by_type(parts: list[str], rows: int, options: storage.StorageOptions | None = None, *,
                   address: str | None = None, driver_rows: int | None = None) -> dict[str, int]:
    """Error rows per "stage/error_type" over error part files (one row per image, so per-part
    tallies add up): in the driver up to ``driver_rows`` rows, else in Ray tasks."""
    if rows <= (DRIVER_ROWS if driver_rows is None else driver_rows):
        return _tally(parts, options)
    import ray

    from facelake.cluster import runtime

    started_here = not ray.is_initialized()
    runtime.connect(address)
    try:
        task = ray.remote(num_cpus=TASK_CPUS)(_tally)
        total: dict[str, int] = {}
        for tally in ray.get([task.remote(parts[i:i + SOURCES_PER_TASK], options)
                              for i in range(0, len(parts), SOURCES_PER_TASK)]):
            for key, n in tally.items():
                total[key] = total.get(key, 0) + n
        return total
    finally:
        runtime.shutdown_if_local(started_here and address is None)


def _held_in(sources: list[Source], ids: pa.Array, options) -> list[dict[str, int]]:
    """Per source, {id: rows naming it} for the ``ids`` it holds (nothing else leaves the task)."""
    out = []
    for source in sources:
        column = _id_column(source, options)
        hit = column.filter(pc.is_in(column, value_set=ids))
        out.append({r["values"]: r["counts"] for r in pc.value_counts(hit).to_pylist()} if len(hit) else {})
    return out


def held(sources: list[Source], ids: pa.Array, rows: int, options: storage.StorageOptions | None = None, *,
         address: str | None = None, driver_rows: int | None = None) -> list[dict[str, int]]:
    """For each of ``sources`` (in order), {image_id: rows} of the ``ids`` it holds; ids it does
    not hold are absent. ``rows`` (the sources' row count, from metadata) decides between the
    driver (at most ``driver_rows``, default DRIVER_ROWS) and Ray tasks (SOURCES_PER_TASK sources
    each, the id set shipped once through the object store). The driver holds only the matches."""
    ids = pc.unique(pa.array(ids, pa.string()) if not isinstance(ids, pa.Array) else ids.cast(pa.string()))
    if not sources or not len(ids):
        return [{} for _ in sources]
    if rows <= (DRIVER_ROWS if driver_rows is None else driver_rows):
        return _held_in(sources, ids, options)
    import ray

    from facelake.cluster import runtime

    started_here = not ray.is_initialized()
    runtime.connect(address)
    try:
        task = ray.remote(num_cpus=TASK_CPUS)(_held_in)
        wanted = ray.put(ids)
        results = ray.get([task.remote(sources[i:i + SOURCES_PER_TASK], wanted, options)
                           for i in range(0, len(sources), SOURCES_PER_TASK)])
        return [found for group in results for found in group]
    finally:
        runtime.shutdown_if_local(started_here and address is None)
