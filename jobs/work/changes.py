"""A rebuild's change detection at archive scale: the comparison of the manifest with the record,
hash-partitioned over Ray tasks, so that the driver receives only what changed.

jobs/rebuild.py's ``plan`` compares one table of manifest rows with the rows of record and the
stat of now, image by image; every decision is about one image_id. Here the same ``plan`` runs
once per bucket of image ids, in a task, on that bucket's rows only:

1. manifest tasks read ranges of the manifest's row groups, resolve each uri (as the driver did)
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

``--full`` re-embeds every photo, so its plan is the archive's size wherever it is made.
Below DRIVER_ROWS rows (manifest and record) the rebuild plans in the driver, as before.
Tested in tests/test_rebuild_plan.py (against the driver's plan) and tests/test_rebuild*.py.
"""

from __future__ import annotations

import math

import pyarrow as pa
import pyarrow.compute as pc

from facelake import storage
from facelake.faces import manifest as manifestmod
from facelake.faces import reader
from facelake.record import tables as rootmod
from facelake.jobs.work.resume import bucket_of, manifest_pieces
from facelake.schema import SOURCE_STAT_SCHEMA

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


def in_driver(info: manifestmod.ManifestInfo, base: rootmod.TableVersion | None) -> bool:
    """Whether this rebuild is small enough to plan in the driver."""
    held = (base.face_rows + base.error_rows) if base is not None else 0
    return info.rows + held <= DRIVER_ROWS


def _split(table: pa.Table, key: pa.Array, buckets: int) -> list[pa.Table]:
    where = bucket_of(key, buckets)
    return [table.filter(pc.equal(where, k)) for k in range(buckets)]


def _resolved_piece(file_uri: str, row_groups: list[int], base: str, options) -> pa.Table:
    from facelake.jobs.rebuild import resolved_rows

    with storage.open_parquet(file_uri, options) as parquet:
        return resolved_rows(parquet.read_row_groups(row_groups), base)


def _manifest_by_id(file_uri, row_groups, base, buckets, options) -> list[tuple[pa.Table, pa.Table]]:
    """A piece of a manifest carrying its own stats: (rows, stat of now) per id bucket."""
    from facelake.jobs.rebuild import _manifest_stats

    table = _resolved_piece(file_uri, row_groups, base, options)
    now = _manifest_stats(table)
    return list(zip(_split(table, table["image_id"], buckets), _split(now, table["image_id"], buckets)))


def _manifest_by_folder(file_uri, row_groups, base, folders, options) -> list[pa.Table]:
    table = _resolved_piece(file_uri, row_groups, base, options)
    folder = pa.array([u.rsplit("/", 1)[0] for u in table["uri"].to_pylist()], pa.string())
    return _split(table, folder, folders)


def _stat_by_id(buckets, limits, options, *pieces: pa.Table) -> list[tuple[pa.Table, pa.Table]]:
    """One folder bucket (whole folders): stat its photos, then split rows and stats by id bucket."""
    from facelake.jobs.rebuild import _stat_chunk

    tables = [p for p in pieces if p.num_rows]
    if not tables:
        return [(None, None)] * buckets
    table = pa.concat_tables(tables)
    now = _stat_chunk(table["uri"].to_pylist(), options, limits)
    return list(zip(_split(table, table["image_id"], buckets), _split(now, table["image_id"], buckets)))


def _record_by_id(root, parts, buckets, options) -> list[pa.Table]:
    record = pa.concat_tables([rootmod.part_record(root, kind, name, options) for kind, name in parts])
    return _split(record, record["image_id"], buckets)


def _compare(config, erased, schema, options, n_manifest: int, *sides):
    """One id bucket: ``plan`` on its manifest rows (with the stat of now) and rows of record."""
    from facelake.jobs.rebuild import _hash_chunk, plan

    manifest_sides = [s for s in sides[:n_manifest] if s[0] is not None and s[0].num_rows]
    table = pa.concat_tables([s[0] for s in manifest_sides]).cast(schema) if manifest_sides else schema.empty_table()
    now = pa.concat_tables([s[1] for s in manifest_sides]) if manifest_sides else SOURCE_STAT_SCHEMA.empty_table()
    records = [r for r in sides[n_manifest:] if r.num_rows]
    record = pa.concat_tables(records) if records else rootmod.part_record_schema().empty_table()
    result = plan(config, table, record, erased, options, now=now, hasher=_hash_chunk)
    keep = pc.is_in(result.manifest["image_id"], value_set=result.to_embed)
    result.manifest = result.manifest.filter(keep)
    result.stats = result.stats.filter(pc.is_in(result.stats["image_id"],
                                                value_set=pa.concat_arrays([result.to_embed, result.restat])))
    return result


def plan_in_tasks(config, info: manifestmod.ManifestInfo, base: rootmod.TableVersion | None, erased: pa.Array,
                  options: storage.StorageOptions, *, buckets: int | None = None):
    """The rebuild's Plan (jobs/rebuild.py), made in Ray tasks (see the module docstring).
    ``config.allowed_roots`` must already be the effective roots. Ray must be connected."""
    import ray

    from facelake.jobs.rebuild import Plan

    held = (base.face_rows + base.error_rows) if base is not None else 0
    buckets = max(2, buckets or math.ceil(max(info.rows, held) / BUCKET_ROWS))   # num_returns=1 is no list
    remote = ray.remote(num_cpus=TASK_CPUS)
    base_dir = manifestmod.base_dir(config.manifest, options)
    pieces = manifest_pieces(info, options)
    limits = reader.ReadLimits(config.allowed_roots, config.max_bytes)
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
    plans = ray.get([remote(_compare).remote(config, erased, schema, options, len(manifest_refs),
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
