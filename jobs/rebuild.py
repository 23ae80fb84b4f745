"""`facelake rebuild`: bring ROOT's tables of record and live index up to date with a manifest.

One run, under ROOT's lock (facelake.record.lock):

1. Plan. Compare the manifest with the images of record (faces and errors) and the erasure
   list: ids not in record are new; ids in record whose (resolved) uri changed are changed; ids
   of record not in the manifest are removed; erased ids are never embedded again and are purged
   from record if still there. Changes are found from the source stat, not the bytes: every row
   of record stores what its photo looked like when embedded (facelake.schema.SOURCE_STAT_SCHEMA:
   size and mtime for local files, size and ETag for S3), and the stat of now comes from the
   manifest's own ``size`` / ``etag`` / ``mtime`` columns when it has them, else from
   facelake.faces.reader.source_stats (stat per file, S3 LIST per folder or HEAD per object) in Ray
   tasks, whole folders per task (``stat_images``). Another size: changed. Same size and same
   mtime / ETag: unchanged, never read. Same size, other mtime / ETag: its bytes alone are hashed
   (sha256, no decoding); same hash: only the new stat is recorded ("restat": its rows are
   rewritten, nothing is embedded). Rows without a stat (roots written before it; a fetch that
   failed) are hashed once and then recorded. ``--verify-content`` hashes every photo of record
   (the check before this existed). Images of record that cannot be statted or read now keep
   their record (a transient error must not drop faces) and are counted as "unverified". An
   error of record without a hash (fetch failed) is retried when the image becomes readable.
   `--full` re-embeds everything and retrains.
2. Embed the new and changed photos with facelake embed's ``run_embed`` into
   ROOT/staging/<run>/. A killed run's staging is reused by the next run (run_embed skips the
   image ids already there), so nothing is embedded twice.
3. Write a new table version of record (facelake.record.tables) and point ROOT/TABLE at it: the parts
   holding a dropped id rewritten, the staged parts and re-stated rows recorded with their stat,
   each part by its own unit, in Ray tasks past rebuild_plan.DRIVER_ROWS rows (jobs/work/units.py): no
   embedding of the change passes through this process.
4. Publish an index version of the faces of record, reusing the live version's trained
   quantizer while it fits: the collection is within [1/2, 2] x the size it was trained on, and
   the mean similarity of a sample of faces to their nearest centroid has not dropped by more
   than 10% from its value at training time. Then the live version is extended
   (facelake.index.update): shards whose part files of record are all still in the table are
   kept (files hard-linked or copied server-side), shards that held removed, changed or erased
   faces are rebuilt, new faces go to delta shards, small shards merge tier by tier. Otherwise
   (or with --full, or a live version built before shards recorded their sources) it retrains and
   builds every shard (``build_version``). ROOT/TABLE records the index version built from
   the table version just before CURRENT is written.

A crash before 3 leaves the previous table and version live; between 3 and 4 the table of
record is new and the old version live, and the next run publishes; a run that finds the table
unchanged and CURRENT naming its index does nothing and says so.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import time
from dataclasses import asdict, dataclass, field

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import typer

from facelake import faults, storage
from facelake.record import audit
from facelake.faces import manifest
from facelake.faces import reader
from facelake.record import erasures as erasure_list
from facelake.record import tables as rootmod
from facelake.errors import ConfigError
from facelake.record.lock import DEFAULT_TTL_S, RootLock
from facelake.faces.registry import get_model, weights_fingerprint
from facelake.schema import SOURCE_STAT_SCHEMA
from facelake.storage import StorageOptions

log = logging.getLogger(__name__)

# Retrain bounds (see the module docstring).
RETRAIN_GROWTH = 2.0
RETRAIN_DRIFT = 0.10
DRIFT_SAMPLE = 20_000
# Images per hashing task: enough to amortise a task, few enough to spread over a cluster.
HASH_CHUNK = 256
HASH_CPUS = 0.25
# Photos per stat task: a local stat costs microseconds, a listed S3 key far less than a HEAD,
# so tasks are much larger than hashing tasks (whole folders are kept in one task, see
# stat_images); a manifest of at most this many photos is statted in the driver, without tasks.
STAT_CHUNK = 8192
DEFAULT_KEEP = 3


@dataclass(frozen=True)
class RebuildConfig:
    """Options of one rebuild; ``validate`` checks them before storage or Ray is touched."""

    manifest: str
    root: str
    address: str | None = None
    full: bool = False
    endpoint_url: str | None = None
    keep: int = DEFAULT_KEEP
    model: str | None = None
    batch_size: int = 16
    workers: int | None = None
    weights_from: str | None = None
    lock_ttl_s: float = DEFAULT_TTL_S
    progress: bool = True
    allowed_roots: tuple[str, ...] = ()  # empty: the roots ROOT remembers (ROOT/ALLOWED_ROOTS)
    max_bytes: int = reader.DEFAULT_MAX_BYTES
    verify_content: bool = False       # hash every photo of record (not only those the stat cannot clear)
    shard_size: int | None = None      # faces per index shard (default facelake.index.build.DEFAULT_SHARD_SIZE)

    def validate(self):
        spec = get_model(self.model)
        storage.check_uri(self.manifest)
        storage.check_uri(self.root)
        reader.ReadLimits(self.allowed_roots, self.max_bytes).validate()
        if self.keep < 1:
            raise ConfigError(f"--keep must be at least 1 (the live version is always kept), got {self.keep}")
        if self.batch_size < 1 or (self.workers is not None and self.workers < 1):
            raise ConfigError("--batch-size and --workers must be at least 1")
        if self.lock_ttl_s <= 0:
            raise ConfigError("lock TTL must be positive")
        if self.shard_size is not None and self.shard_size < 1:
            raise ConfigError(f"--shard-size must be at least 1, got {self.shard_size}")
        return spec


@dataclass
class RebuildSummary:
    job_id: str
    outcome: str = "running"           # published | nothing-changed | failed
    manifest_rows: int = 0
    new: int = 0
    changed: int = 0
    removed: int = 0
    erased_skipped: int = 0
    unverified: int = 0
    hashed: int = 0                    # photos whose bytes were read to decide (not every photo)
    restat: int = 0                    # same bytes, new stat: recorded, not re-embedded
    to_embed: int = 0
    embed: dict | None = None          # run_embed's summary when something was embedded
    faces: int = 0
    images: int = 0
    errors: int = 0
    table_version: str | None = None
    index_version: str | None = None
    previous_index_version: str | None = None
    retrained: bool = False
    retrain_reason: str | None = None
    incremental: dict | None = None    # shards kept / built when the live version was extended
    seconds: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        return asdict(self)


# ---------------------------------------------------------------------------- planning

@dataclass
class Plan:
    manifest: pa.Table                 # the manifest, uris resolved
    to_embed: pa.Array                 # image ids to embed (new + changed)
    drop: pa.Array                     # image ids to remove from record (removed + changed + erased + restat)
    stats: pa.Table | None = None      # image_id + SOURCE_STAT_SCHEMA now, per manifest row not erased
    restat: pa.Array = field(default_factory=lambda: pa.array([], pa.string()))  # same bytes, new stat:
    # their rows of record are rewritten with the stat of now (dropped and added back, not re-embedded)
    restat_where: pa.Table | None = None  # rows of record (rootmod.record_ids) of the restat ids
    drop_parts: set[tuple[str, str]] | None = None  # (kind, part) of record holding a dropped id
    hashed: int = 0                    # photos whose bytes were read to decide
    new: int = 0
    changed: int = 0
    removed: int = 0
    erased_skipped: int = 0
    unverified: int = 0


def _resolve_manifest(uri: str, options: StorageOptions,
                      info: manifest.ManifestInfo | None = None) -> tuple[pa.Table, manifest.ManifestInfo]:
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


def _hash_chunk(uris: list[str], options: StorageOptions,
                limits: reader.ReadLimits = reader.ReadLimits()) -> list[str | None]:
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
    """sha256 of each image's bytes (None when unreadable or refused), in parallel Ray tasks.

    Every read goes through facelake.faces.reader: nothing outside ``limits.allowed_roots``, no FIFO
    or device, nothing over ``limits.max_bytes`` is read or hashed.
    """
    import ray

    if not uris:
        return []
    task = ray.remote(num_cpus=HASH_CPUS)(_hash_chunk)
    refs = [task.remote(uris[i:i + HASH_CHUNK], options, limits) for i in range(0, len(uris), HASH_CHUNK)]
    return [h for chunk in ray.get(refs) for h in chunk]


ALLOWED_ROOTS_FILE = "ALLOWED_ROOTS"


def remembered_roots(root: str, options: StorageOptions) -> tuple[str, ...]:
    """The --allow-root values ROOT remembers from the rebuild that last gave them (() if none)."""
    try:
        data = json.loads(storage.read_bytes(storage.join(root, ALLOWED_ROOTS_FILE), options))
    except FileNotFoundError:
        return ()
    return tuple(data.get("allowed_roots", ()))


def effective_roots(config: RebuildConfig, options: StorageOptions) -> tuple[str, ...]:
    """--allow-root when given (and remembered in ROOT for later runs), else what ROOT remembers."""
    if not config.allowed_roots:
        return remembered_roots(config.root, options)
    if remembered_roots(config.root, options) != config.allowed_roots:
        storage.write_bytes_atomic(storage.join(config.root, ALLOWED_ROOTS_FILE),
                                   json.dumps({"allowed_roots": list(config.allowed_roots)}).encode(), options)
    return config.allowed_roots


def _stat_chunk(uris: list[str], options: StorageOptions,
                limits: reader.ReadLimits = reader.ReadLimits()) -> pa.Table:
    stats = reader.source_stats(uris, limits, options)
    return pa.table({"source_size": [s.size if s else None for s in stats],
                     "source_mtime_ns": [s.mtime_ns if s else None for s in stats],
                     "source_etag": [s.etag if s else None for s in stats]}, schema=SOURCE_STAT_SCHEMA)


def stat_images(uris: list[str], options: StorageOptions,
                limits: reader.ReadLimits = reader.ReadLimits()) -> pa.Table:
    """The source stat (facelake.schema.SOURCE_STAT_SCHEMA, nulls where refused or missing) of
    each photo, in ``uris`` order, without reading a byte of any, in parallel Ray tasks.

    Photos are grouped by folder and whole folders are packed into tasks of about STAT_CHUNK
    photos, so an S3 folder is listed by one task (facelake.faces.reader.source_stats chooses LIST or
    HEAD) and 1M-10M photos spread over the cluster's CPUs instead of one process's stat calls.
    """
    import ray

    if not uris:
        return SOURCE_STAT_SCHEMA.empty_table()
    if len(uris) <= STAT_CHUNK:             # one task's worth: no task (nor worker start) at all
        return _stat_chunk(uris, options, limits)
    order = sorted(range(len(uris)), key=lambda i: uris[i])     # folders contiguous
    chunks, current, folder = [], [], None
    for i in order:
        parent = uris[i].rsplit("/", 1)[0]
        if len(current) >= STAT_CHUNK and parent != folder:
            chunks.append(current)
            current = []
        current.append(i)
        folder = parent
    if current:
        chunks.append(current)
    task = ray.remote(num_cpus=HASH_CPUS)(_stat_chunk)
    refs = [task.remote([uris[i] for i in chunk], options, limits) for chunk in chunks]
    stacked = pa.concat_tables(ray.get(refs))
    where = np.empty(len(uris), np.int64)
    where[np.array([i for chunk in chunks for i in chunk], np.int64)] = np.arange(len(uris))
    return stacked.take(pa.array(where))


def _manifest_stats(table: pa.Table) -> pa.Table | None:
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


def _stat_differs(table: pa.Table) -> pa.ChunkedArray:
    """Per row: the mtime (local) or ETag (S3) of now differs from the one of record, or only one
    side has it (the stat came from elsewhere: the bytes must decide)."""
    out = None
    for column in ("source_mtime_ns", "source_etag"):
        now, before = table[column], table[f"rec_{column}"]
        differs = pc.fill_null(pc.not_equal(now, before), False)
        one_side = pc.not_equal(pc.is_null(now), pc.is_null(before))
        part = pc.or_(differs, one_side)
        out = part if out is None else pc.or_(out, part)
    return out


def plan(config: RebuildConfig, table: pa.Table, record: pa.Table, erased: pa.Array,
         options: StorageOptions, *, now: pa.Table | None = None, hasher=None) -> Plan:
    """What to embed, drop and re-stat (see the module docstring). ``now``: the stat of now per
    row of ``table`` when the caller took it (jobs/work/changes.py); ``hasher`` replaces
    hash_images (the same there, inside a task)."""
    ids = table["image_id"]
    is_erased = pc.is_in(ids, value_set=erased)
    wanted = table.filter(pc.invert(is_erased))
    limits = reader.ReadLimits(config.allowed_roots, config.max_bytes)
    stats = _manifest_stats(wanted) if now is None else now.filter(pc.invert(is_erased))
    if stats is None:
        stats = stat_images(wanted["uri"].to_pylist(), options, limits)
    stats = pa.table([wanted["image_id"].combine_chunks().cast(pa.string()), *stats.columns],
                     names=["image_id", *SOURCE_STAT_SCHEMA.names])
    firsts = [("content_sha256", "first"), ("uri", "first")] + [(c, "first") for c in SOURCE_STAT_SCHEMA.names]
    per_image = record.group_by(["image_id"], use_threads=False).aggregate(firsts)
    rec_ids = per_image["image_id"]
    gone = pc.invert(pc.is_in(rec_ids, value_set=ids))
    gone = pc.or_(gone, pc.is_in(rec_ids, value_set=erased))
    removed = rec_ids.filter(gone)
    result = Plan(manifest=table, to_embed=pa.array([], pa.string()), drop=removed.combine_chunks()
                  if isinstance(removed, pa.ChunkedArray) else removed, stats=stats,
                  removed=len(removed), erased_skipped=int(pc.sum(is_erased).as_py() or 0))
    if config.full:
        result.to_embed = wanted["image_id"].combine_chunks()
        result.drop = rec_ids.combine_chunks() if isinstance(rec_ids, pa.ChunkedArray) else rec_ids
        result.changed = int(pc.sum(pc.is_in(result.to_embed, value_set=rec_ids)).as_py() or 0)
        result.new = len(result.to_embed) - result.changed
        result.drop_parts = _holding(record, result.drop)
        return result
    known = pc.is_in(wanted["image_id"], value_set=rec_ids)
    new_ids = wanted["image_id"].filter(pc.invert(known))
    before_names = ["image_id", "rec_sha", "rec_uri", *(f"rec_{c}" for c in SOURCE_STAT_SCHEMA.names)]
    existing = wanted.filter(known).select(["image_id", "uri"]).join(
        per_image.rename_columns(before_names), "image_id").join(stats, "image_id")
    uri_changed = pc.fill_null(pc.not_equal(existing["uri"], existing["rec_uri"]), True)
    changed = existing["image_id"].filter(uri_changed).to_pylist()
    same_uri = existing.filter(pc.invert(uri_changed))
    if config.allowed_roots:
        # outside the roots now: never read; re-embedding records it as a validate error
        inside = pa.array(reader.within_each(same_uri["uri"].to_pylist(), config.allowed_roots), pa.bool_())
        changed += same_uri["image_id"].filter(pc.invert(inside)).to_pylist()
        same_uri = same_uri.filter(inside)
    # Decide from the stat alone where it can: a different size is a change; the same size with
    # the same mtime / ETag is no change. The bytes are read (hashed) only where the stat cannot
    # tell (same size, other mtime / ETag: a touched or rewritten file), where the record has no
    # stat yet (rows written before the columns: hashed once, then recorded), and with
    # --verify-content (every photo, as before).
    size, rec_size = same_uri["source_size"], same_uri["rec_source_size"]
    missing = pc.is_null(size)                          # unreadable or refused now: keep the record
    result.unverified += int(pc.sum(pc.and_(missing, pc.is_valid(same_uri["rec_sha"]))).as_py() or 0)
    readable = same_uri.filter(pc.invert(missing))
    size, rec_size = readable["source_size"], readable["rec_source_size"]
    if config.verify_content:
        hash_it = pa.array(np.ones(readable.num_rows, bool))
        other_size = pa.array(np.zeros(readable.num_rows, bool))
    else:
        other_size = pc.fill_null(pc.not_equal(size, rec_size), False)
        hash_it = pc.or_(pc.is_null(rec_size), pc.and_(pc.invert(other_size), _stat_differs(readable)))
    changed += readable["image_id"].filter(other_size).to_pylist()
    to_hash = readable.filter(hash_it).to_pylist()
    restat = []
    hashes = (hasher or hash_images)([r["uri"] for r in to_hash], options, limits)
    result.hashed = len(to_hash)
    for row, digest in zip(to_hash, hashes):
        if digest is None:
            if row["rec_sha"] is not None:
                result.unverified += 1
        elif digest != row["rec_sha"]:
            changed.append(row["image_id"])
        elif any(row[c] != row[f"rec_{c}"] for c in SOURCE_STAT_SCHEMA.names):
            restat.append(row["image_id"])              # same bytes: record the stat, embed nothing
    changed_arr = pa.array(changed, pa.string())
    result.restat = pa.array(restat, pa.string())
    result.new, result.changed = len(new_ids), len(changed)
    result.to_embed = pa.concat_arrays([new_ids.combine_chunks().cast(pa.string())
                                        if isinstance(new_ids, pa.ChunkedArray) else new_ids.cast(pa.string()),
                                        changed_arr])
    result.drop = pa.concat_arrays([result.drop.cast(pa.string()), changed_arr, result.restat])
    result.restat_where = record.filter(pc.is_in(record["image_id"], value_set=result.restat))
    result.drop_parts = _holding(record, result.drop)
    return result


def _holding(record: pa.Table, ids: pa.Array) -> set[tuple[str, str]]:
    """The (kind, part) of the rows of record holding any of ``ids``."""
    rows = record.filter(pc.is_in(record["image_id"], value_set=ids)).select(["kind", "part"])
    return {(r["kind"], r["part"]) for r in rows.group_by(["kind", "part"], use_threads=False).aggregate([]).to_pylist()}


# ---------------------------------------------------------------------------- retraining

def mean_nearest_similarity(trained_bytes: np.ndarray | bytes, xb: np.ndarray) -> float:
    """Mean inner product of (normalised) vectors to their nearest IVF centroid."""
    import faiss

    index = faiss.deserialize_index(np.frombuffer(trained_bytes, np.uint8))
    quantizer = faiss.extract_index_ivf(index).quantizer
    if len(xb) > DRIFT_SAMPLE:
        xb = xb[np.sort(np.random.default_rng(0).choice(len(xb), DRIFT_SAMPLE, replace=False))]
    D, _ = quantizer.search(np.ascontiguousarray(xb, np.float32), 1)
    return float(D.mean())


def retrain_reason(n: int, quantizer: dict | None, live_manifest: dict | None, model: str,
                   similarity: float | None, full: bool) -> str | None:
    """Why the quantizer must be retrained, or None to reuse it (the bound of the module docstring)."""
    if full:
        return "--full"
    if live_manifest is None or quantizer is None:
        return "no reusable trained index"
    if live_manifest.get("model") != model:
        return f"live index holds model {live_manifest.get('model')}"
    trained_n = quantizer.get("faces") or 0
    if n > RETRAIN_GROWTH * trained_n or n * RETRAIN_GROWTH < trained_n:
        return f"collection is {n} faces, trained on {trained_n} (bound: x{RETRAIN_GROWTH:g} either way)"
    if n < int(live_manifest["nlist"]):
        return f"fewer faces ({n}) than lists ({live_manifest['nlist']})"
    base = quantizer.get("mean_similarity")
    if similarity is not None and base is not None and similarity < base * (1 - RETRAIN_DRIFT):
        return (f"mean similarity to nearest centroid fell from {base:.3f} to {similarity:.3f} "
                f"(bound: {RETRAIN_DRIFT:.0%})")
    return None


def publish_index(root: str, version: rootmod.TableVersion | None, *, model: str, weights_sha256: str, keep: int,
                  full: bool, lock: RootLock, options: StorageOptions, shard_size: int | None = None) -> dict:
    """Publish an index version of the faces of record of table ``version``; returns what it did.

    While the quantizer is reused, the live version's shards whose part files are all still in
    the table are kept and only the others, and the new parts, are built
    (facelake.index.update); on a retrain (or a live version that cannot be extended) every shard
    is built. The shard tasks read the table's part files themselves (no face passes through
    this process); erased ids are left out. Records the version in ROOT/TABLE just before CURRENT
    is written. With no faces left, the index is withdrawn (ROOT/index removed) since an empty
    IVF index cannot be built.
    """
    from facelake.index import layout
    from facelake.index.build import DEFAULT_SHARD_SIZE, NothingToIndex, build_version, sampled_similarity
    from facelake.index.erasure import check_publishable, drop_versions_holding, erased_ids_checked
    from facelake.index.load import open_version, read_verified
    from facelake.index.update import NotIncremental, update_version

    pointer = rootmod.read_pointer(root, options) or {}
    erased = erased_ids_checked(root, options)   # refuses a tampered erasure list
    parts = [rootmod.uri(root, rootmod.FACES, p) for p in version.faces] if version is not None else []
    rows = version.face_part_rows if version is not None else None     # recorded: no footer read
    n = version.face_rows if version is not None else 0     # before erasure: at most this many

    def withdraw() -> dict:
        lock.verify()
        storage.remove(layout.index_root(root), recursive=True, options=options)
        rootmod.write_pointer(root, {**pointer, "index_version": None, "quantizer": None}, options)
        return {"version": None, "retrained": False, "reason": "no faces of record: index withdrawn"}

    if not parts or n == 0:
        return withdraw()
    live = layout.current_version(root, options)
    live_manifest = open_version(root, live, options=options).manifest if live else None
    quantizer = pointer.get("quantizer")
    similarity = None
    if not full and live_manifest is not None and quantizer and live_manifest.get("model") == model:
        similarity = sampled_similarity(parts, read_verified(open_version(root, live, options=options),
                                                             layout.TRAINED), DRIFT_SAMPLE, options, rows)
    reason = retrain_reason(n, quantizer, live_manifest, model, similarity, full)
    shards = min(n, math.ceil(n / (shard_size or DEFAULT_SHARD_SIZE)))
    pq_m = live_manifest.get("pq") if live_manifest else None
    if pq_m is not None and n < 256:
        pq_m = None

    def before_pointer(version_name: str) -> None:
        lock.verify()
        check_publishable(root, version_name, erased, options)
        q = quantizer
        if reason is not None:
            trained = read_verified(open_version(root, version_name, options=options), layout.TRAINED)
            q = {"trained_in": version_name, "faces": n,
                 "mean_similarity": sampled_similarity(parts, trained, DRIFT_SAMPLE, options, rows)}
        rootmod.write_pointer(root, {**(rootmod.read_pointer(root, options) or {}), "index_version": version_name,
                                     "quantizer": q}, options)

    stage_hooks = {"before_pointer": before_pointer}
    source = f"faces of record, table version {version.name}"
    built = None
    if reason is None:
        try:
            built = update_version(parts, root, live=live, model=model, weights_sha256=weights_sha256, keep=keep,
                                   shard_size=shard_size, erased_ids=erased, source=source, options=options,
                                   hooks=stage_hooks)
        except NotIncremental as why:
            log.info("building every shard: %s", why)
        except NothingToIndex:
            return withdraw()
    if built is not None:
        drop_versions_holding(root, erased, built["version"], options)
        return {"version": built["version"], "retrained": False, "reason": None, "factory": built["factory"],
                "nlist": built["nlist"], "nprobe": built["nprobe"], "shards": len(built["shards"]),
                "total": built["total"], "previous": live, "incremental": built["incremental"]}
    try:
        built = build_version(parts, root, model=model, weights_sha256=weights_sha256, shards=shards,
                              pq=pq_m if reason is not None else None, keep=keep,
                              trained_from=None if reason is not None else live, options=options,
                              hooks=stage_hooks, erased_ids=erased, source=source)
    except NothingToIndex:
        return withdraw()
    drop_versions_holding(root, erased, built["version"], options)
    return {"version": built["version"], "retrained": reason is not None, "reason": reason,
            "factory": built["factory"], "nlist": built["nlist"], "nprobe": built["nprobe"],
            "shards": len(built["shards"]), "total": built["total"], "previous": live, "incremental": None}


# ---------------------------------------------------------------------------- the job

def _staging_run(root: str, options: StorageOptions, model: str, fingerprint: str) -> str:
    """Reuse the newest staging run made with this embed fingerprint (a killed rebuild's work, same
    model, weights, quality floor and read limits: facelake.schema.OutputFingerprint); drop others."""
    runs = rootmod.staging_runs(root, options)
    chosen = None
    for run in reversed(runs):
        try:
            meta = json.loads(storage.read_bytes(rootmod.uri(root, rootmod.STAGING, run, "staging.json"), options))
        except (FileNotFoundError, ValueError):
            meta = {}
        if chosen is None and meta.get("fingerprint") == fingerprint:
            chosen = run
        elif run != chosen:
            rootmod.remove_staging(root, run, options)
    if chosen is None:
        chosen = rootmod.new_name()
        storage.write_bytes_atomic(rootmod.uri(root, rootmod.STAGING, chosen, "staging.json"),
                                   json.dumps({"model": model, "fingerprint": fingerprint,
                                               "created_at": rootmod.utc_now()}).encode(), options)
    return chosen


def _staged(out: str, kind: str, options: StorageOptions) -> tuple[str, ...]:
    """The staged part files of ``kind`` (faces / errors) under the staging run ``out``; read by the
    units that record them (facelake.record.tables ``record_part``), never here."""
    return tuple(sorted(storage.list_files(storage.join(out, kind), ".parquet", options)))


def _embed(config: RebuildConfig, spec, the_plan: Plan, run: str,
           options: StorageOptions) -> tuple[dict | None, tuple[str, ...], tuple[str, ...]]:
    """Embed the plan's photos into the staging run (those not staged yet); returns run_embed's
    summary (None when everything was staged already) and the staged faces and errors part files."""
    from facelake.jobs.embed import run_embed

    from facelake.jobs.embed import done_image_ids

    out = rootmod.uri(config.root, rootmod.STAGING, run)
    staged = done_image_ids(out, spec, options)
    if not pc.any(pc.invert(pc.is_in(the_plan.to_embed, value_set=staged))).as_py():
        # a killed run already staged every photo: no embed job (and no model load) at all
        return None, _staged(out, "faces", options), _staged(out, "errors", options)
    _stage_stats(out, the_plan.stats, the_plan.to_embed, options)
    sub = the_plan.manifest.filter(pc.is_in(the_plan.manifest["image_id"], value_set=the_plan.to_embed))
    sub_uri = storage.join(out, "manifest", "to-embed.parquet")
    manifest.write(sub, sub_uri, options)
    summary = run_embed(_embed_config(config, spec, sub_uri, out))
    return summary.to_dict(), _staged(out, "faces", options), _staged(out, "errors", options)


STAGED_STATS = "stats"


def _stage_stats(out: str, stats: pa.Table, ids: pa.Array, options: StorageOptions) -> None:
    """Keep the stat of the photos about to be embedded beside their staged faces: a killed run's
    staged faces are recorded with the stat taken before their bytes were read, never a later one
    (a photo changed between two runs then shows as changed next time instead of being missed)."""
    sub = stats.filter(pc.is_in(stats["image_id"], value_set=ids))
    storage.write_table(storage.join(out, STAGED_STATS, f"{rootmod.new_name()}.parquet"), sub, options)


def _stats_of_record(root: str, run: str | None, stats: pa.Table, options: StorageOptions) -> pa.Table:
    """The stat to record per image: the earliest staged with its faces, else the plan's."""
    if stats is None:
        return pa.table({"image_id": pa.array([], pa.string()), **{f.name: pa.array([], f.type)
                                                                    for f in SOURCE_STAT_SCHEMA}})
    tables = []
    if run is not None:
        for file_uri in sorted(storage.list_files(rootmod.uri(root, rootmod.STAGING, run, STAGED_STATS), ".parquet",
                                                  options)):
            tables.append(storage.read_table(file_uri, options=options).select(stats.column_names).cast(stats.schema))
    if not tables:
        return stats
    staged = pa.concat_tables(tables)
    table = pa.concat_tables([staged, stats])     # earliest first
    first = pc.index_in(pc.unique(table["image_id"]), value_set=table["image_id"])
    return table.take(first)


def _added(root: str, the_plan: Plan, faces: tuple[str, ...], errors: tuple[str, ...]) -> list[rootmod.Added]:
    """What the new table version adds: the plan's embedded ids from the staged part files, and the
    rows of record of the re-stated ids from the parts that hold them (``the_plan.restat_where``)."""
    added = [rootmod.Added(rootmod.FACES, faces, the_plan.to_embed),
             rootmod.Added(rootmod.ERRORS, errors, the_plan.to_embed)]
    where = the_plan.restat_where
    if len(the_plan.restat) and where is not None:
        for kind in rootmod.KINDS:
            held = where.filter(pc.and_(pc.equal(where["kind"], kind), pc.is_in(where["image_id"],
                                                                                 value_set=the_plan.restat)))
            parts = sorted(pc.unique(held["part"]).to_pylist())
            added.append(rootmod.Added(kind, tuple(rootmod.uri(root, kind, p) for p in parts), the_plan.restat))
    return added


def _embed_config(config: RebuildConfig, spec, manifest_uri: str, out: str):
    """The embed job a rebuild runs into its staging folder (its fingerprint keys the staging run)."""
    from facelake.jobs.embed import EmbedConfig

    return EmbedConfig(manifest=manifest_uri, out=out, model=spec.name, address=config.address,
                       batch_size=config.batch_size, endpoint_url=config.endpoint_url,
                       weights_from=config.weights_from, workers=config.workers,
                       allowed_roots=config.allowed_roots, max_bytes=config.max_bytes, progress=config.progress)


def _keep_runs(root: str, run: str, options: StorageOptions) -> None:
    """Copy the staging run's embed summaries to ROOT/_runs (staging is removed afterwards)."""
    for file_uri in storage.list_files(rootmod.uri(root, rootmod.STAGING, run, "_runs"), ".json", options):
        name = file_uri.rstrip("/").rsplit("/", 1)[-1]
        storage.write_bytes_atomic(rootmod.uri(root, rootmod.RUNS, name), storage.read_bytes(file_uri, options), options)


def run_rebuild(config: RebuildConfig) -> RebuildSummary:
    """Bring ROOT up to date with the manifest (see the module docstring); return what it did.

    Audited like every job (facelake.record.audit.Job): "started" before the lock is taken, then
    succeeded / failed / interrupted with the summary."""
    spec = config.validate()
    options = StorageOptions.from_env(config.endpoint_url)
    info = manifest.validate(config.manifest, options)
    job = audit.Job(config.root, "rebuild", options, details={
        "manifest": storage.redact(config.manifest), "manifest_fingerprint": info.fingerprint, "full": config.full,
        "verify_content": config.verify_content})
    with job:
        summary = RebuildSummary(job_id=job.job_id, manifest_rows=info.rows)
        try:
            return _rebuild(config, spec, info, summary, options)
        finally:
            job.details.update({k: v for k, v in summary.to_dict().items() if k != "job_id"})


def _rebuild(config: RebuildConfig, spec, info: manifest.ManifestInfo, summary: RebuildSummary,
             options: StorageOptions) -> RebuildSummary:
    import ray

    from facelake.cluster import runtime
    from facelake.index import layout
    from facelake.jobs.work import changes as rebuild_plan

    job_id = summary.job_id
    clock = time.monotonic()
    started_ray = False
    with RootLock(config.root, job_id, ttl_s=config.lock_ttl_s, options=options) as lock:
        try:
            faults.point("rebuild.locked", job_id)
            config = dataclasses.replace(config, allowed_roots=effective_roots(config, options))
            rootmod.collect_garbage(config.root, options)
            base = rootmod.current(config.root, options)
            if base is not None and base.model not in (None, spec.name):
                raise ConfigError(f"{storage.redact(config.root)} holds faces of model {base.model!r}, not "
                                  f"{spec.name!r}: use one root per model")
            erased = erasure_list.erased_ids(config.root, options)
            started_ray = not ray.is_initialized()
            runtime.connect(config.address)
            t = time.monotonic()
            if rebuild_plan.in_driver(info, base):
                table, _ = _resolve_manifest(config.manifest, options, info)
                the_plan = plan(config, table, rootmod.record_ids(config.root, base, options), erased, options)
            else:   # archive scale: compared in hash-partitioned tasks, the driver gets the change only
                the_plan = rebuild_plan.plan_in_tasks(config, info, base, erased, options)
            summary.seconds["plan"] = round(time.monotonic() - t, 3)
            for name in ("new", "changed", "removed", "erased_skipped", "unverified", "hashed"):
                setattr(summary, name, getattr(the_plan, name))
            summary.restat = len(the_plan.restat)
            summary.to_embed = len(the_plan.to_embed)
            if summary.unverified:
                log.warning("%d image(s) of record could not be read to check for changes; their faces are kept",
                            summary.unverified)
            pointer = rootmod.read_pointer(config.root, options) or {}
            live = layout.current_version(config.root, options)
            summary.previous_index_version = live
            table_changes = len(the_plan.to_embed) + len(the_plan.drop)
            if not table_changes and base is None:
                raise ConfigError("the manifest lists no image to embed (all erased?) and ROOT holds none")
            if not table_changes and live and pointer.get("index_version") == live and not config.full:
                for run in rootmod.staging_runs(config.root, options):
                    rootmod.remove_staging(config.root, run, options)
                summary.outcome = "nothing-changed"
                summary.index_version = live
                summary.table_version = base.name
                summary.faces, summary.errors = base.face_rows, base.error_rows
                summary.images = _images(config.root, base, options)
                return summary
            version = base
            if table_changes:
                faces = errors = ()
                run = None
                if len(the_plan.to_embed):
                    run = _staging_run(config.root, options, spec.name,
                                       _embed_config(config, spec, "", "").fingerprint().digest)
                    t = time.monotonic()
                    summary.embed, faces, errors = _embed(config, spec, the_plan, run, options)
                    summary.seconds["embed"] = round(time.monotonic() - t, 3)
                faults.point("rebuild.after_embed", job_id)
                lock.verify()
                t = time.monotonic()
                version = _write_table(config.root, base, the_plan, run, faces, errors, info, job_id,
                                       spec.name, lock, options)
                summary.seconds["table"] = round(time.monotonic() - t, 3)
                if run is not None:
                    _keep_runs(config.root, run, options)
            t = time.monotonic()
            published = publish_index(config.root, version, model=spec.name,
                                      weights_sha256=weights_fingerprint(spec), keep=config.keep,
                                      full=config.full, lock=lock, options=options,
                                      shard_size=config.shard_size)
            summary.seconds["index"] = round(time.monotonic() - t, 3)
            summary.index_version = published["version"]
            summary.retrained, summary.retrain_reason = published["retrained"], published["reason"]
            summary.incremental = published.get("incremental")
            summary.table_version = version.name
            summary.faces, summary.errors = version.face_rows, version.error_rows
            summary.images = _images(config.root, version, options)
            for run in rootmod.staging_runs(config.root, options):
                rootmod.remove_staging(config.root, run, options)
            rootmod.collect_garbage(config.root, options)
            summary.outcome = "published"
            return summary
        except BaseException:
            summary.outcome = "failed"
            raise
        finally:
            summary.seconds["total"] = round(time.monotonic() - clock, 3)
            runtime.shutdown_if_local(started_ray and config.address is None)


def _write_table(root: str, base: rootmod.TableVersion | None, the_plan: Plan, run: str | None,
                 faces: tuple[str, ...], errors: tuple[str, ...], info: manifest.ManifestInfo, job_id: str,
                 model: str, lock: RootLock, options: StorageOptions) -> rootmod.TableVersion:
    """The new table version: the plan's drops, the staged faces and errors of its embedded ids and
    its re-stated rows, all with the stat of record. Parts are read and written by Ray tasks past
    rebuild_plan.DRIVER_ROWS rows (jobs/work/units.py): this process ships the change's ids and stats
    (no embedding) and gets part names and counts back."""
    from facelake.jobs.work import changes as rebuild_plan
    from facelake.jobs.work import units as tasks

    stats = _stats_of_record(root, run, the_plan.stats, options)
    stats = stats.filter(pc.is_in(stats["image_id"], value_set=pa.concat_arrays(
        [the_plan.to_embed.cast(pa.string()), the_plan.restat.cast(pa.string())])))
    rows = info.rows + ((base.face_rows + base.error_rows) if base is not None else 0)
    return rootmod.write_version(
        root, base, drop_ids=the_plan.drop, sources=_added(root, the_plan, faces, errors), stats=stats,
        holding=the_plan.drop_parts, model=model, job_id=job_id, options=options,
        hook=lambda name: _before_table_pointer(lock, name),
        map_fn=tasks.table_map(rows, rebuild_plan.DRIVER_ROWS))


def _before_table_pointer(lock: RootLock, name: str) -> None:
    faults.point("rebuild.before_table_pointer", name)
    lock.verify()


def _images(root: str, version, options: StorageOptions) -> int:
    """Recorded with the version (facelake.record.tables); counted by tasks for versions written before."""
    from facelake.jobs.work import counts

    if version.images is not None:
        return version.images
    return counts.distinct_images([("parquet", rootmod.uri(root, rootmod.FACES, p)) for p in version.faces],
                                  version.face_rows, options)


def print_summary(summary: RebuildSummary) -> None:
    if summary.outcome == "nothing-changed":
        typer.echo(f"nothing changed: {summary.manifest_rows} manifest row(s) match the record "
                   f"({summary.erased_skipped} erased, {summary.unverified} unverified); no embedding, "
                   f"no new version; live version {summary.index_version}")
        return
    typer.echo(f"plan: {summary.new} new, {summary.changed} changed, {summary.removed} removed, "
               f"{summary.erased_skipped} erased (never embedded), {summary.unverified} unverified; "
               f"{summary.hashed} photo(s) read to decide, {summary.restat} touched but unchanged")
    if summary.embed:
        e = summary.embed
        typer.echo(f"embedded {e['images']} image(s): {e['faces']} face(s), {e['errors']} error(s) "
                   f"({e['skipped_done']} already staged by an earlier run)")
    else:
        typer.echo("embedded nothing")
    typer.echo(f"record: {summary.faces} face(s) of {summary.images} image(s), {summary.errors} error(s); "
               f"table version {summary.table_version}")
    typer.echo(f"published index version {summary.index_version} (was {summary.previous_index_version}); "
               + (f"retrained: {summary.retrain_reason}" if summary.retrained else "reused the trained quantizer"))
    if summary.incremental:
        inc = summary.incremental
        typer.echo(f"index shards: {len(inc['reused_shards'])} kept as they were, {len(inc['built_shards'])} built "
                   f"({inc['built_faces']} face(s))")
    typer.echo("seconds: " + ", ".join(f"{k} {v}" for k, v in summary.seconds.items()))


def register(app: typer.Typer) -> None:
    @app.command("rebuild")
    def rebuild_command(
        manifest_uri: str = typer.Argument(..., metavar="MANIFEST", help="Parquet manifest (file or folder): local, file:// or s3://"),
        root: str = typer.Option(..., "--root", help="ROOT holding the faces of record and the index versions"),
        address: str = typer.Option(None, help="Ray cluster to join (auto, ray://host:port); default: start a local Ray"),
        full: bool = typer.Option(False, "--full", help="re-embed every photo and retrain the quantizer"),
        endpoint_url: str = typer.Option(None, "--endpoint-url", help="S3-compatible endpoint (credentials come from the AWS chain)"),
        keep: int = typer.Option(DEFAULT_KEEP, "--keep", help="index versions to keep (the live one always)"),
        weights_from: str = typer.Option(None, "--weights-from", help="folder or s3:// prefix with the weight files"),
        allow_root: list[str] = typer.Option([], "--allow-root", help="only read photos under this root (repeatable; ROOT remembers them for later rebuilds)"),
        max_bytes: int = typer.Option(reader.DEFAULT_MAX_BYTES, "--max-bytes", help="refuse photos larger than this many bytes (from stat / HEAD, before reading)"),
        verify_content: bool = typer.Option(False, "--verify-content", help="read and hash every photo of record (default: only those whose size/mtime/ETag cannot clear them)"),
        shard_size: int = typer.Option(None, "--shard-size", help="faces per index shard (default 1,000,000)"),
    ) -> None:
        """Embed new and changed photos, drop removed ones, publish a new index version."""
        summary = run_rebuild(RebuildConfig(manifest=manifest_uri, root=root, address=address, full=full,
                                            endpoint_url=endpoint_url, keep=keep, weights_from=weights_from,
                                            allowed_roots=tuple(allow_root), max_bytes=max_bytes,
                                            verify_content=verify_content, shard_size=shard_size))
        print_summary(summary)
