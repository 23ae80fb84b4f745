"""A rebuild's change plan: the manifest compared with the images of record (faces and errors) and
the erasure list, image by image, in the driver or hash-partitioned over Ray tasks.

``plan`` decides per image_id: ids not in record are new; ids in record whose (resolved) uri
changed are changed; ids of record not in the manifest are removed; erased ids are never embedded
again and are dropped from record if still there. Changes are found from the source stat, not the
bytes: every row of record stores what its photo looked like when embedded
(facelake.schema.SOURCE_STAT_SCHEMA), and the stat of now comes from the manifest's own columns or
from stat tasks (jobs/work/photos.py). Another size: changed. Same size and same mtime / ETag:
unchanged, never read. Same size, other mtime / ETag: its bytes alone are hashed (sha256, no
decoding); same hash: only the new stat is recorded ("restat": its rows are rewritten, nothing is
embedded). Rows without a stat (a fetch that failed) are hashed once and then recorded.
``verify_content`` hashes every photo of record. Images of record that cannot be statted or read
now keep their record (a transient error must not drop faces) and are counted as "unverified".
``full`` re-embeds everything.

Past DRIVER_ROWS rows (manifest and record), ``plan_in_tasks`` runs the same ``plan`` once per
bucket of image ids, in a task, on that bucket's rows only:

1. manifest tasks read ranges of the manifest's row groups, resolve each uri (as the driver does)
   and take the stat of now from the manifest's own size / etag / mtime columns; without them,
   rows go first by a hash of their *folder* to stat tasks (whole folders per task, so an S3
   folder is still listed, not HEADed: facelake.faces.reader.source_stats), which stat them;
2. record tasks read groups of parts of record (one row per part and image, rootmod.part_record);
3. both sides go by a hash of image_id to ``buckets`` compare tasks (through the object store;
   nothing is written to ROOT), each running ``plan`` (hashing the photos it must read itself);
4. the driver concatenates what the compare tasks return: the ids to embed and to drop, the
   manifest rows and stats of the photos to embed or re-stat, the rows of record of those to
   re-stat, the parts of record holding a dropped id (the table version rewrites those and reads
   no other part's ids), and counts: all of the size of the change, not of the archive.

``full`` re-embeds every photo, so its plan is the archive's size wherever it is made.
Tested in tests/test_rebuild_plan.py (tasks against the driver) and tests/test_rebuild*.py.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from facelake import storage
from facelake.faces import manifest as manifestmod
from facelake.faces import reader
from facelake.jobs.work import photos
from facelake.jobs.work.resume import bucket_of, manifest_pieces
from facelake.record import tables as rootmod
from facelake.schema import SOURCE_STAT_SCHEMA
from facelake.storage import StorageOptions

# Manifest rows plus rows of record at most this many: the driver plans (no task start).
DRIVER_ROWS = 200_000
# Rows per compare task (manifest and record each), and parts of record per reading task.
BUCKET_ROWS = 1_000_000
PARTS_PER_TASK = 64
# Photos per stat task on average (whole folders; a local stat costs microseconds, a listed S3
# key less): few enough tasks that the driver's object refs (manifest pieces x stat tasks)
# stay in the hundreds of thousands at 100M photos.
STAT_TASK_ROWS = 65_536
TASK_CPUS = 0.25


@dataclass(frozen=True)
class ChangeConfig:
    """What a change plan needs of a rebuild's options (jobs/rebuild.py ``RebuildConfig.change_config``)."""

    manifest: str
    root: str
    allowed_roots: tuple[str, ...] = ()    # the effective roots (photos.effective_roots)
    max_bytes: int = reader.DEFAULT_MAX_BYTES
    full: bool = False                     # every photo re-embedded
    verify_content: bool = False           # every photo of record hashed

    @property
    def limits(self) -> reader.ReadLimits:
        return reader.ReadLimits(self.allowed_roots, self.max_bytes)


@dataclass
class Plan:
    """What a rebuild embeds, drops and re-states, and the counts it reports."""

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


def in_driver(info: manifestmod.ManifestInfo, base: rootmod.TableVersion | None) -> bool:
    """Whether this rebuild is small enough to plan in the driver."""
    held = (base.face_rows + base.error_rows) if base is not None else 0
    return info.rows + held <= DRIVER_ROWS


# ---------------------------------------------------------------------------- one table of rows

def plan(config: ChangeConfig, table: pa.Table, record: pa.Table, erased: pa.Array,
         options: StorageOptions, *, now: pa.Table | None = None, hasher=None) -> Plan:
    """What to embed, drop and re-stat (see the module docstring) for the manifest rows ``table``
    (photos.resolved_rows) against ``record`` (rootmod.record_ids). ``now``: the stat of now per
    row of ``table`` when the caller took it; ``hasher`` replaces photos.hash_images (inside a task)."""
    is_erased = pc.is_in(table["image_id"], value_set=erased)
    wanted = table.filter(pc.invert(is_erased))
    stats = _stats_now(config, wanted, None if now is None else now.filter(pc.invert(is_erased)), options)
    firsts = [("content_sha256", "first"), ("uri", "first")] + [(c, "first") for c in SOURCE_STAT_SCHEMA.names]
    per_image = record.group_by(["image_id"], use_threads=False).aggregate(firsts)
    rec_ids = _array(per_image["image_id"])
    gone = pc.or_(pc.invert(pc.is_in(rec_ids, value_set=table["image_id"])), pc.is_in(rec_ids, value_set=erased))
    removed = rec_ids.filter(gone)
    result = Plan(manifest=table, to_embed=pa.array([], pa.string()), drop=removed, stats=stats,
                  removed=len(removed), erased_skipped=int(pc.sum(is_erased).as_py() or 0))
    if config.full:
        result.to_embed = wanted["image_id"].combine_chunks()
        result.drop = rec_ids
        result.changed = int(pc.sum(pc.is_in(result.to_embed, value_set=rec_ids)).as_py() or 0)
        result.new = len(result.to_embed) - result.changed
        result.drop_parts = _holding(record, result.drop)
        return result
    known = pc.is_in(wanted["image_id"], value_set=rec_ids)
    new_ids = _array(wanted["image_id"].filter(pc.invert(known))).cast(pa.string())
    before_names = ["image_id", "rec_sha", "rec_uri", *(f"rec_{c}" for c in SOURCE_STAT_SCHEMA.names)]
    existing = wanted.filter(known).select(["image_id", "uri"]).join(
        per_image.rename_columns(before_names), "image_id").join(stats, "image_id")
    changed, restat = _changes_of_record(config, existing, result, options, hasher or photos.hash_images)
    changed_ids = pa.array(changed, pa.string())
    result.restat = pa.array(restat, pa.string())
    result.new, result.changed = len(new_ids), len(changed)
    result.to_embed = pa.concat_arrays([new_ids, changed_ids])
    result.drop = pa.concat_arrays([result.drop.cast(pa.string()), changed_ids, result.restat])
    result.restat_where = record.filter(pc.is_in(record["image_id"], value_set=result.restat))
    result.drop_parts = _holding(record, result.drop)
    return result


def _stats_now(config: ChangeConfig, wanted: pa.Table, now: pa.Table | None, options: StorageOptions) -> pa.Table:
    """image_id and the stat of now of each row of ``wanted``: ``now`` when given, else the
    manifest's own columns, else statted (photos.stat_images)."""
    stats = photos.manifest_stats(wanted) if now is None else now
    if stats is None:
        stats = photos.stat_images(wanted["uri"].to_pylist(), options, config.limits)
    return pa.table([wanted["image_id"].combine_chunks().cast(pa.string()), *stats.columns],
                    names=["image_id", *SOURCE_STAT_SCHEMA.names])


def _changes_of_record(config: ChangeConfig, existing: pa.Table, result: Plan, options: StorageOptions,
                       hasher) -> tuple[list[str], list[str]]:
    """(changed ids, restat ids) among ``existing``: the manifest rows of record joined with their
    row of record (``rec_*``) and stat of now. Counts the photos hashed and unverified in ``result``."""
    uri_changed = pc.fill_null(pc.not_equal(existing["uri"], existing["rec_uri"]), True)
    changed = existing["image_id"].filter(uri_changed).to_pylist()
    same_uri = existing.filter(pc.invert(uri_changed))
    if config.allowed_roots:
        # outside the roots now: never read; re-embedding records it as a validate error
        inside = pa.array(reader.within_each(same_uri["uri"].to_pylist(), config.allowed_roots), pa.bool_())
        changed += same_uri["image_id"].filter(pc.invert(inside)).to_pylist()
        same_uri = same_uri.filter(inside)
    missing = pc.is_null(same_uri["source_size"])          # unreadable or refused now: keep the record
    result.unverified += int(pc.sum(pc.and_(missing, pc.is_valid(same_uri["rec_sha"]))).as_py() or 0)
    readable = same_uri.filter(pc.invert(missing))
    other_size, hash_it = _stat_decides(readable, config.verify_content)
    changed += readable["image_id"].filter(other_size).to_pylist()
    to_hash = readable.filter(hash_it).to_pylist()
    restat = []
    hashes = hasher([r["uri"] for r in to_hash], options, config.limits)
    result.hashed = len(to_hash)
    for row, digest in zip(to_hash, hashes):
        if digest is None:
            if row["rec_sha"] is not None:
                result.unverified += 1
        elif digest != row["rec_sha"]:
            changed.append(row["image_id"])
        elif any(row[c] != row[f"rec_{c}"] for c in SOURCE_STAT_SCHEMA.names):
            restat.append(row["image_id"])              # same bytes: record the stat, embed nothing
    return changed, restat


def _stat_decides(readable: pa.Table, verify_content: bool) -> tuple[pa.Array, pa.Array]:
    """Per row: (another size: changed, the bytes must decide: hashed).

    The stat decides where it can: a different size is a change; the same size with the same
    mtime / ETag is no change. The bytes are read only where the stat cannot tell (same size,
    other mtime / ETag: a touched or rewritten file), where the record has no stat (hashed once,
    then recorded), and with ``verify_content`` (every photo)."""
    if verify_content:
        return pa.array(np.zeros(readable.num_rows, bool)), pa.array(np.ones(readable.num_rows, bool))
    size, rec_size = readable["source_size"], readable["rec_source_size"]
    other_size = pc.fill_null(pc.not_equal(size, rec_size), False)
    return other_size, pc.or_(pc.is_null(rec_size), pc.and_(pc.invert(other_size), _stat_differs(readable)))


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


def _holding(record: pa.Table, ids: pa.Array) -> set[tuple[str, str]]:
    """The (kind, part) of the rows of record holding any of ``ids``."""
    rows = record.filter(pc.is_in(record["image_id"], value_set=ids)).select(["kind", "part"])
    return {(r["kind"], r["part"]) for r in rows.group_by(["kind", "part"], use_threads=False).aggregate([]).to_pylist()}


def _array(values: pa.Array | pa.ChunkedArray) -> pa.Array:
    return values.combine_chunks() if isinstance(values, pa.ChunkedArray) else values


# ---------------------------------------------------------------------------- in Ray tasks

def _split(table: pa.Table, key: pa.Array, buckets: int) -> list[pa.Table]:
    where = bucket_of(key, buckets)
    return [table.filter(pc.equal(where, k)) for k in range(buckets)]


def _resolved_piece(file_uri: str, row_groups: list[int], base: str, options) -> pa.Table:
    with storage.open_parquet(file_uri, options) as parquet:
        return photos.resolved_rows(parquet.read_row_groups(row_groups), base)


def _manifest_by_id(file_uri, row_groups, base, buckets, options) -> list[tuple[pa.Table, pa.Table]]:
    """A piece of a manifest carrying its own stats: (rows, stat of now) per id bucket."""
    table = _resolved_piece(file_uri, row_groups, base, options)
    now = photos.manifest_stats(table)
    return list(zip(_split(table, table["image_id"], buckets), _split(now, table["image_id"], buckets)))


def _manifest_by_folder(file_uri, row_groups, base, folders, options) -> list[pa.Table]:
    table = _resolved_piece(file_uri, row_groups, base, options)
    folder = pa.array([u.rsplit("/", 1)[0] for u in table["uri"].to_pylist()], pa.string())
    return _split(table, folder, folders)


def _stat_by_id(buckets, limits, options, *pieces: pa.Table) -> list[tuple[pa.Table, pa.Table]]:
    """One folder bucket (whole folders): stat its photos, then split rows and stats by id bucket."""
    tables = [p for p in pieces if p.num_rows]
    if not tables:
        return [(None, None)] * buckets
    table = pa.concat_tables(tables)
    now = photos.stat_chunk(table["uri"].to_pylist(), options, limits)
    return list(zip(_split(table, table["image_id"], buckets), _split(now, table["image_id"], buckets)))


def _record_by_id(root, parts, buckets, options) -> list[pa.Table]:
    record = pa.concat_tables([rootmod.part_record(root, kind, name, options) for kind, name in parts])
    return _split(record, record["image_id"], buckets)


def _compare_bucket(config: ChangeConfig, erased, schema, options, n_manifest: int, *sides) -> Plan:
    """One id bucket: ``plan`` on its manifest rows (with the stat of now) and rows of record."""
    manifest_sides = [s for s in sides[:n_manifest] if s[0] is not None and s[0].num_rows]
    table = pa.concat_tables([s[0] for s in manifest_sides]).cast(schema) if manifest_sides else schema.empty_table()
    now = pa.concat_tables([s[1] for s in manifest_sides]) if manifest_sides else SOURCE_STAT_SCHEMA.empty_table()
    records = [r for r in sides[n_manifest:] if r.num_rows]
    record = pa.concat_tables(records) if records else rootmod.part_record_schema().empty_table()
    result = plan(config, table, record, erased, options, now=now, hasher=photos.hash_chunk)
    keep = pc.is_in(result.manifest["image_id"], value_set=result.to_embed)
    result.manifest = result.manifest.filter(keep)
    result.stats = result.stats.filter(pc.is_in(result.stats["image_id"],
                                                value_set=pa.concat_arrays([result.to_embed, result.restat])))
    return result


def plan_in_tasks(config: ChangeConfig, info: manifestmod.ManifestInfo, base: rootmod.TableVersion | None,
                  erased: pa.Array, options: storage.StorageOptions, *, buckets: int | None = None) -> Plan:
    """``plan``'s Plan, made in hash-partitioned Ray tasks (see the module docstring); the driver
    receives the change only. Ray must be connected."""
    import ray

    held = (base.face_rows + base.error_rows) if base is not None else 0
    buckets = max(2, buckets or math.ceil(max(info.rows, held) / BUCKET_ROWS))   # num_returns=1 is no list
    remote = ray.remote(num_cpus=TASK_CPUS)
    base_dir = manifestmod.base_dir(config.manifest, options)
    pieces = manifest_pieces(info, options)
    limits = config.limits
    names = set(info.schema.names)
    if "size" in names and {"etag", "mtime"} & names:
        by_id = remote(_manifest_by_id).options(num_returns=buckets)
        manifest_refs = [by_id.remote(f, groups, base_dir, buckets, options) for f, groups in pieces]
    else:
        folders = max(2, math.ceil(info.rows / STAT_TASK_ROWS))
        by_folder = remote(_manifest_by_folder).options(num_returns=folders)
        folder_refs = [by_folder.remote(f, groups, base_dir, folders, options) for f, groups in pieces]
        stat = remote(_stat_by_id).options(num_returns=buckets)
        manifest_refs = [stat.remote(buckets, limits, options, *[r[k] for r in folder_refs]) for k in range(folders)]
    parts = [(kind, name) for kind in rootmod.KINDS for name in (base.parts(kind) if base else ())]
    record = remote(_record_by_id).options(num_returns=buckets)
    record_refs = [record.remote(config.root, parts[i:i + PARTS_PER_TASK], buckets, options)
                   for i in range(0, len(parts), PARTS_PER_TASK)]
    schema = _resolved_schema(info.schema)
    plans = ray.get([remote(_compare_bucket).remote(config, erased, schema, options, len(manifest_refs),
                                             *[r[k] for r in manifest_refs], *[r[k] for r in record_refs])
                     for k in range(buckets)])
    out = Plan(manifest=pa.concat_tables([p.manifest for p in plans]),
               to_embed=_cat([p.to_embed for p in plans]), drop=_cat([p.drop for p in plans]),
               stats=pa.concat_tables([p.stats for p in plans]), restat=_cat([p.restat for p in plans]),
               restat_where=pa.concat_tables([p.restat_where for p in plans if p.restat_where is not None]
                                             or [rootmod.part_record_schema().empty_table()]))
    out.drop_parts = set().union(*(p.drop_parts for p in plans))
    for name in ("hashed", "new", "changed", "removed", "erased_skipped", "unverified"):
        setattr(out, name, sum(getattr(p, name) for p in plans))
    return out


def _cat(arrays: list[pa.Array]) -> pa.Array:
    return pa.concat_arrays([a.cast(pa.string()) for a in arrays]) if arrays else pa.array([], pa.string())


def _resolved_schema(schema: pa.Schema) -> pa.Schema:
    """The manifest's schema once ids are strings and uris resolved strings."""
    for name in ("image_id", "uri"):
        schema = schema.set(schema.get_field_index(name), pa.field(name, pa.string()))
    return schema
