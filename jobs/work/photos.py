"""The photos a manifest names, as they are now, learnt without embedding them: their resolved
uris, their source stat and, where the stat cannot decide, the sha256 of their bytes.

- ``resolve_manifest`` / ``resolved_rows``: manifest rows with string ids and resolved uris.
- ``manifest_stats``: the stat of now from the manifest's own ``size`` / ``etag`` / ``mtime``
  columns, when it carries them.
- ``stat_images``: the stat of now (facelake.schema.SOURCE_STAT_SCHEMA: size and mtime for local
  files, size and ETag for S3) from facelake.faces.reader.source_stats, in Ray tasks holding
  whole folders (one S3 LIST per folder instead of a HEAD per photo); nothing is read.
- ``hash_images``: the sha256 of each photo's bytes (no decoding), in Ray tasks.
- ``effective_roots``: the --allow-root values a rebuild reads under, remembered in
  ROOT/ALLOWED_ROOTS for later runs.

Every read goes through facelake.faces.reader: nothing outside the allowed roots, no FIFO or
device, nothing over the byte limit. Tested in tests/test_rebuild_plan.py and
tests/test_rebuild_roots.py.
"""

from __future__ import annotations

import json

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from facelake import storage
from facelake.errors import ConfigError
from facelake.faces import manifest, reader
from facelake.schema import SOURCE_STAT_SCHEMA
from facelake.storage import StorageOptions

# Images per hashing task: enough to amortise a task, few enough to spread over a cluster.
HASH_CHUNK = 256
TASK_CPUS = 0.25
# Photos per stat task: a local stat costs microseconds, a listed S3 key far less than a HEAD,
# so tasks are much larger than hashing tasks (whole folders are kept in one task, see
# stat_images); at most this many photos are statted in the driver, without tasks.
STAT_CHUNK = 8192
ALLOWED_ROOTS_FILE = "ALLOWED_ROOTS"


def resolve_manifest(uri: str, options: StorageOptions,
                     info: manifest.ManifestInfo | None = None) -> tuple[pa.Table, manifest.ManifestInfo]:
    """The manifest at ``uri`` (validated unless ``info`` is given), ids as strings, uris resolved."""
    info = info or manifest.validate(uri, options)
    return resolved_rows(storage.read_table(uri, options=options), manifest.base_dir(uri, options)), info


def resolved_rows(table: pa.Table, base: str) -> pa.Table:
    """Manifest rows with image_id as strings and each uri resolved against ``base``."""
    resolved = []
    for value in table["uri"].to_pylist():
        try:
            resolved.append(reader.resolve(value, base))
        except reader.ReadRefused:
            resolved.append(value)  # the embed job records it as a validate error
    table = table.set_column(table.schema.get_field_index("uri"), "uri", pa.array(resolved, pa.string()))
    return table.set_column(table.schema.get_field_index("image_id"), "image_id",
                            table["image_id"].cast(pa.string()))


def hash_chunk(uris: list[str], options: StorageOptions,
               limits: reader.ReadLimits = reader.ReadLimits()) -> list[str | None]:
    """sha256 of each image's bytes (None when unreadable or refused), in this process."""
    from facelake.faces.imaging import content_sha256

    out = []
    for value in uris:
        try:
            out.append(content_sha256(reader.read(value, limits, options)))
        except Exception:  # unreadable or refused now: the caller keeps the record as it is
            out.append(None)
    return out


def hash_images(uris: list[str], options: StorageOptions,
                limits: reader.ReadLimits = reader.ReadLimits()) -> list[str | None]:
    """``hash_chunk`` of every image, HASH_CHUNK images per Ray task."""
    import ray

    if not uris:
        return []
    task = ray.remote(num_cpus=TASK_CPUS)(hash_chunk)
    refs = [task.remote(uris[i:i + HASH_CHUNK], options, limits) for i in range(0, len(uris), HASH_CHUNK)]
    return [h for chunk in ray.get(refs) for h in chunk]


def stat_chunk(uris: list[str], options: StorageOptions,
               limits: reader.ReadLimits = reader.ReadLimits()) -> pa.Table:
    """The source stat of each photo (nulls where refused or missing), in this process."""
    stats = reader.source_stats(uris, limits, options)
    return pa.table({"source_size": [s.size if s else None for s in stats],
                     "source_mtime_ns": [s.mtime_ns if s else None for s in stats],
                     "source_etag": [s.etag if s else None for s in stats]}, schema=SOURCE_STAT_SCHEMA)


def stat_images(uris: list[str], options: StorageOptions,
                limits: reader.ReadLimits = reader.ReadLimits()) -> pa.Table:
    """``stat_chunk`` of every photo, in ``uris`` order, in parallel Ray tasks.

    Photos are grouped by folder and whole folders are packed into tasks of about STAT_CHUNK
    photos, so an S3 folder is listed by one task (facelake.faces.reader.source_stats chooses LIST or
    HEAD) and 1M-10M photos spread over the cluster's CPUs instead of one process's stat calls.
    """
    import ray

    if not uris:
        return SOURCE_STAT_SCHEMA.empty_table()
    if len(uris) <= STAT_CHUNK:             # one task's worth: no task (nor worker start) at all
        return stat_chunk(uris, options, limits)
    chunks = _folder_chunks(uris)
    task = ray.remote(num_cpus=TASK_CPUS)(stat_chunk)
    stacked = pa.concat_tables(ray.get([task.remote([uris[i] for i in chunk], options, limits) for chunk in chunks]))
    where = np.empty(len(uris), np.int64)
    where[np.array([i for chunk in chunks for i in chunk], np.int64)] = np.arange(len(uris))
    return stacked.take(pa.array(where))


def _folder_chunks(uris: list[str]) -> list[list[int]]:
    """Positions of ``uris`` in chunks of whole folders, each closed past STAT_CHUNK photos."""
    chunks, current, folder = [], [], None
    for i in sorted(range(len(uris)), key=lambda i: uris[i]):     # folders contiguous
        parent = uris[i].rsplit("/", 1)[0]
        if len(current) >= STAT_CHUNK and parent != folder:
            chunks.append(current)
            current = []
        current.append(i)
        folder = parent
    if current:
        chunks.append(current)
    return chunks


def manifest_stats(table: pa.Table) -> pa.Table | None:
    """The manifest's own size / etag / mtime columns as source stats, when it carries them."""
    names = table.column_names
    if "size" not in names or not ({"etag", "mtime"} & set(names)):
        return None
    try:
        return _stats_from_columns(table, names)
    except (pa.ArrowInvalid, pa.ArrowNotImplementedError) as err:
        raise ConfigError(f"the manifest's size / etag / mtime columns cannot be read as source stats ({err}): "
                          f"give size as an integer, etag as a string and mtime as a timestamp or integer "
                          f"nanoseconds, or rename those columns so that rebuild stats the photos itself") from err


def _stats_from_columns(table: pa.Table, names: list[str]) -> pa.Table:
    columns = {"source_size": table["size"].cast(pa.int64()),
               "source_mtime_ns": pa.nulls(table.num_rows, pa.int64()),
               "source_etag": pa.nulls(table.num_rows, pa.string())}
    if "mtime" in names:
        mtime = table["mtime"]
        if pa.types.is_timestamp(mtime.type):
            mtime = mtime.cast(pa.timestamp("ns", tz=mtime.type.tz)).cast(pa.int64())
        columns["source_mtime_ns"] = mtime.cast(pa.int64())
    if "etag" in names:
        columns["source_etag"] = pc.utf8_trim(table["etag"].cast(pa.string()), '"')
    return pa.table(columns, schema=SOURCE_STAT_SCHEMA)


def remembered_roots(root: str, options: StorageOptions) -> tuple[str, ...]:
    """The --allow-root values ROOT remembers from the rebuild that last gave them (() if none)."""
    try:
        data = json.loads(storage.read_bytes(storage.join(root, ALLOWED_ROOTS_FILE), options))
    except FileNotFoundError:
        return ()
    return tuple(data.get("allowed_roots", ()))


def effective_roots(root: str, given: tuple[str, ...], options: StorageOptions) -> tuple[str, ...]:
    """``given`` (--allow-root) when not empty, remembered in ROOT for later runs; else what ROOT
    remembers."""
    if not given:
        return remembered_roots(root, options)
    if remembered_roots(root, options) != given:
        storage.write_bytes_atomic(storage.join(root, ALLOWED_ROOTS_FILE),
                                   json.dumps({"allowed_roots": list(given)}).encode(), options)
    return given
