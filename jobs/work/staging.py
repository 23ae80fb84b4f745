"""A rebuild's staging runs: ROOT/staging/<run>/, where the photos of a change plan are embedded
(facelake embed's layout) before the table version of record takes them in.

A run is keyed by the embed job's fingerprint (model, weights, quality floor, read limits), so a
killed rebuild's staged faces are reused by the next run with the same options (``reuse_run``).
The stat of each photo is staged beside its faces before it is embedded (``stage_stats``), and
recorded with them (``stats_of_record``): never a stat taken after its bytes were read. The runs'
embed summaries are kept in ROOT/_runs (``keep_summaries``) before staging is removed.
Tested in tests/test_rebuild.py and tests/test_embed.py.
"""

from __future__ import annotations

import json

import pyarrow as pa
import pyarrow.compute as pc

from facelake import storage
from facelake.jobs.work.changes import Plan
from facelake.record import tables as rootmod
from facelake.schema import SOURCE_STAT_SCHEMA
from facelake.storage import StorageOptions

STAGED_STATS = "stats"
RUN_META = "staging.json"


def reuse_run(root: str, options: StorageOptions, model: str, fingerprint: str) -> str:
    """Reuse the newest staging run made with this embed fingerprint (a killed rebuild's work, same
    model, weights, quality floor and read limits: facelake.schema.OutputFingerprint); drop others."""
    runs = rootmod.staging_runs(root, options)
    chosen = None
    for run in reversed(runs):
        try:
            meta = json.loads(storage.read_bytes(rootmod.uri(root, rootmod.STAGING, run, RUN_META), options))
        except (FileNotFoundError, ValueError):
            meta = {}
        if chosen is None and meta.get("fingerprint") == fingerprint:
            chosen = run
        elif run != chosen:
            rootmod.remove_staging(root, run, options)
    if chosen is None:
        chosen = rootmod.new_name()
        storage.write_bytes_atomic(rootmod.uri(root, rootmod.STAGING, chosen, RUN_META),
                                   json.dumps({"model": model, "fingerprint": fingerprint,
                                               "created_at": rootmod.utc_now()}).encode(), options)
    return chosen


def remove_runs(root: str, options: StorageOptions) -> None:
    """Remove every staging run of ROOT."""
    for run in rootmod.staging_runs(root, options):
        rootmod.remove_staging(root, run, options)


def staged_parts(out: str, kind: str, options: StorageOptions) -> tuple[str, ...]:
    """The staged part files of ``kind`` (faces / errors) under the staging run ``out``; read by the
    units that record them (facelake.record.tables ``record_part``), never here."""
    return tuple(sorted(storage.list_files(storage.join(out, kind), ".parquet", options)))


def stage_stats(out: str, stats: pa.Table, ids: pa.Array, options: StorageOptions) -> None:
    """Keep the stat of the photos about to be embedded beside their staged faces: a killed run's
    staged faces are recorded with the stat taken before their bytes were read, never a later one
    (a photo changed between two runs then shows as changed next time instead of being missed)."""
    sub = stats.filter(pc.is_in(stats["image_id"], value_set=ids))
    storage.write_table(storage.join(out, STAGED_STATS, f"{rootmod.new_name()}.parquet"), sub, options)


def stats_of_record(root: str, run: str | None, stats: pa.Table | None, options: StorageOptions) -> pa.Table:
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


def added(root: str, the_plan: Plan, faces: tuple[str, ...], errors: tuple[str, ...]) -> list[rootmod.Added]:
    """What the new table version adds: the plan's embedded ids from the staged part files, and the
    rows of record of the re-stated ids from the parts that hold them (``the_plan.restat_where``)."""
    out = [rootmod.Added(rootmod.FACES, faces, the_plan.to_embed),
           rootmod.Added(rootmod.ERRORS, errors, the_plan.to_embed)]
    where = the_plan.restat_where
    if len(the_plan.restat) and where is not None:
        for kind in rootmod.KINDS:
            held = where.filter(pc.and_(pc.equal(where["kind"], kind), pc.is_in(where["image_id"],
                                                                                 value_set=the_plan.restat)))
            parts = sorted(pc.unique(held["part"]).to_pylist())
            out.append(rootmod.Added(kind, tuple(rootmod.uri(root, kind, p) for p in parts), the_plan.restat))
    return out


def keep_summaries(root: str, run: str, options: StorageOptions) -> None:
    """Copy the staging run's embed summaries to ROOT/_runs (staging is removed afterwards)."""
    for file_uri in storage.list_files(rootmod.uri(root, rootmod.STAGING, run, "_runs"), ".json", options):
        name = file_uri.rstrip("/").rsplit("/", 1)[-1]
        storage.write_bytes_atomic(rootmod.uri(root, rootmod.RUNS, name), storage.read_bytes(file_uri, options), options)
