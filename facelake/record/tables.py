"""The layout of record of a ROOT that `facelake rebuild` / `erase` / `status` manage.

    ROOT/faces/part-<table version>-<unit>-<n>.parquet   faces of record: immutable part files
    ROOT/errors/part-<table version>-<unit>-<n>.parquet  errors of record (one row per failed image)
    ROOT/tables/<table version>.json                     a table version: which parts make the tables
    ROOT/TABLE                                           pointer: the live table version (+ its index)
    ROOT/erasures/<seq>.parquet                          erasure list of record (facelake.record.erasures)
    ROOT/staging/<run>/                                  an in-progress embed (facelake embed's layout)
    ROOT/_runs/<run>.json                                summaries of the embed runs merged into record
    ROOT/lock                                            facelake.record.lock
    ROOT/index/..., ROOT/audit/...                       index versions (facelake.index.layout), audit log

A new table version writes new part files only (parts that lose rows are rewritten under new
names, untouched parts are shared), then its JSON, then ROOT/TABLE in one atomic write. A crash
before that write leaves the previous table of record valid; the orphaned parts are removed by the
next job that holds the lock (``collect_garbage``). Read the faces of record with ``read_faces``,
never by listing ROOT/faces: between a crash and the next job the folder may hold orphans. The
parts are written by units of one part each (``write_version``), in Ray tasks when the job passes
their map (facelake.jobs.work.units), else in this process.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from typing import Callable, Sequence

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from facelake import faults, storage
from facelake.schema import SOURCE_STAT_SCHEMA
from facelake.storage import StorageOptions

log = logging.getLogger(__name__)

FACES, ERRORS, TABLES, POINTER, ERASURES, STAGING, RUNS = (
    "faces", "errors", "tables", "TABLE", "erasures", "staging", "_runs")
KINDS = (FACES, ERRORS)
# Rows per part file of record; a part rewritten for a removal costs at most this many rows.
PART_ROWS = 100_000
# Parts below PART_ROWS/4 rows (one per small nightly increment) are merged once this many pile up.
COMPACT_AT = 16


def uri(root: str, *parts: str) -> str:
    return storage.join(root, *parts)


new_name = storage.new_name   # names of table versions and staging runs
utc_now = storage.utc_now


# ---------------------------------------------------------------------------- table versions

@dataclass(frozen=True)
class TableVersion:
    """One version of the tables of record: its part files (names under ROOT/faces, ROOT/errors)."""

    name: str
    faces: tuple[str, ...]
    errors: tuple[str, ...]
    face_rows: int
    error_rows: int
    model: str | None
    created_at: str
    job_id: str | None = None
    images: int | None = None   # distinct images with faces; None: written before it was recorded
    # rows of each part, in the order of faces / errors; None: written before they were recorded
    face_part_rows: tuple[int, ...] | None = None
    error_part_rows: tuple[int, ...] | None = None

    def to_dict(self) -> dict:
        return {"name": self.name, "faces": list(self.faces), "errors": list(self.errors),
                "face_rows": self.face_rows, "error_rows": self.error_rows, "model": self.model,
                "created_at": self.created_at, "job_id": self.job_id, "images": self.images,
                "face_part_rows": _listed(self.face_part_rows), "error_part_rows": _listed(self.error_part_rows)}

    @classmethod
    def from_dict(cls, data: dict) -> "TableVersion":
        return cls(name=data["name"], faces=tuple(data["faces"]), errors=tuple(data["errors"]),
                   face_rows=int(data["face_rows"]), error_rows=int(data["error_rows"]),
                   model=data.get("model"), created_at=data["created_at"], job_id=data.get("job_id"),
                   images=None if data.get("images") is None else int(data["images"]),
                   face_part_rows=_counts(data.get("face_part_rows"), data["faces"]),
                   error_part_rows=_counts(data.get("error_part_rows"), data["errors"]))

    def parts(self, kind: str) -> tuple[str, ...]:
        return self.faces if kind == FACES else self.errors

    def part_rows(self, kind: str) -> tuple[int, ...] | None:
        """Rows of each of ``parts(kind)``, as recorded when the version was written (None for
        versions written before: their parts' footers hold them)."""
        return self.face_part_rows if kind == FACES else self.error_part_rows


def _listed(counts: tuple[int, ...] | None) -> list[int] | None:
    return None if counts is None else list(counts)


def _counts(counts: list | None, parts: list) -> tuple[int, ...] | None:
    """Recorded part row counts, or None when absent or not one per part (then footers count)."""
    if counts is None or len(counts) != len(parts):
        return None
    return tuple(int(n) for n in counts)


def read_pointer(root: str, options: StorageOptions | None = None) -> dict | None:
    """ROOT/TABLE: {"table_version", "index_version", "quantizer", "updated_at"}, or None."""
    try:
        return json.loads(storage.read_bytes(uri(root, POINTER), options))
    except FileNotFoundError:
        return None


def write_pointer(root: str, pointer: dict, options: StorageOptions | None = None) -> None:
    storage.write_bytes_atomic(uri(root, POINTER), json.dumps({**pointer, "updated_at": utc_now()},
                                                               indent=2).encode(), options)


def read_version(root: str, name: str, options: StorageOptions | None = None) -> TableVersion:
    return TableVersion.from_dict(json.loads(storage.read_bytes(uri(root, TABLES, f"{name}.json"), options)))


def current(root: str, options: StorageOptions | None = None) -> TableVersion | None:
    """The live table version of ROOT, or None when nothing was recorded yet."""
    pointer = read_pointer(root, options)
    return read_version(root, pointer["table_version"], options) if pointer else None


def _read_parts(root: str, kind: str, names: tuple[str, ...], columns: list[str] | None,
                options: StorageOptions | None) -> pa.Table | None:
    tables = []
    for name in names:
        tables.append(storage.read_file(uri(root, kind, name), columns, options))
    if not tables:
        return None
    return pa.concat_tables(tables, promote_options="permissive")


def read_table(root: str, kind: str, columns: list[str] | None = None, version: TableVersion | None = None,
               options: StorageOptions | None = None) -> pa.Table | None:
    """The faces or errors of record (live table version unless given); None when empty."""
    version = version or current(root, options)
    if version is None:
        return None
    return _read_parts(root, kind, version.parts(kind), columns, options)


def read_faces(root: str, columns: list[str] | None = None, version: TableVersion | None = None,
               options: StorageOptions | None = None) -> pa.Table | None:
    return read_table(root, FACES, columns, version, options)


def read_errors(root: str, columns: list[str] | None = None, version: TableVersion | None = None,
                options: StorageOptions | None = None) -> pa.Table | None:
    return read_table(root, ERRORS, columns, version, options)


def record_ids(root: str, version: TableVersion | None, options: StorageOptions | None = None) -> pa.Table:
    """One row per (part, image) of record: kind, part, image_id, content_sha256, uri and the
    source stat of record (facelake.schema.SOURCE_STAT_SCHEMA; nulls for rows written before it)."""
    tables = []
    if version is not None:
        for kind in KINDS:
            for name in version.parts(kind):
                tables.append(part_record(root, kind, name, options))
    if not tables:
        return part_record_schema().empty_table()
    return pa.concat_tables(tables)


def part_record_schema() -> pa.Schema:
    """The rows of ``record_ids`` / ``part_record``."""
    return pa.schema([*(pa.field(n, pa.string()) for n in ("kind", "part", "image_id", "content_sha256", "uri")),
                      *SOURCE_STAT_SCHEMA])


def part_record(root: str, kind: str, name: str, options: StorageOptions | None = None) -> pa.Table:
    """``record_ids``' rows of one part of record (one per image it holds)."""
    fs, path = storage.filesystem(uri(root, kind, name), options)
    with fs.open(path, "rb") as handle:
        present = pq.ParquetFile(handle).schema_arrow.names
    stat_cols = [c for c in SOURCE_STAT_SCHEMA.names if c in present]
    t = _read_parts(root, kind, (name,), ["image_id", "content_sha256", "uri", *stat_cols], options)
    t = t.group_by(["image_id"], use_threads=False).aggregate(
        [(c, "first") for c in ("content_sha256", "uri", *stat_cols)])
    columns = {
        "kind": pa.array([kind] * t.num_rows, pa.string()),
        "part": pa.array([name] * t.num_rows, pa.string()),
        "image_id": t["image_id"].cast(pa.string()),
        "content_sha256": t["content_sha256_first"].cast(pa.string()),
        "uri": t["uri_first"].cast(pa.string())}
    for f in SOURCE_STAT_SCHEMA:
        columns[f.name] = (t[f"{f.name}_first"].cast(f.type) if f.name in stat_cols
                           else pa.nulls(t.num_rows, f.type))
    return pa.table(columns, schema=part_record_schema())


# ---------------------------------------------------------------------------- writing a version
#
# A table version is written as units of work over ONE part each (``rewrite_part``,
# ``record_part``, ``compact_parts``): pure functions of their arguments that read and write part
# files and return only part names, row counts and O(change) image ids (``Written``). ``write_version``
# runs them through ``map_fn``: in this process by default (``map_local``); jobs pass a map that runs
# each unit as a Ray task (facelake.jobs.work.units). A unit's part names are fixed by the version's name
# and the unit's tag, so a retried unit overwrites its own files; nothing is live until ROOT/TABLE.


@dataclass(frozen=True)
class Written:
    """What one unit of a version's write returns: (part name, rows) of record, and the distinct
    image ids of faces it dropped (``rewrite_part``) or added (``record_part``): O(change)."""

    parts: tuple[tuple[str, int], ...]
    image_ids: pa.Array


@dataclass(frozen=True)
class Added:
    """Rows a new version adds from part files of one kind: those of ``ids`` in each of ``uris``
    (staged parts of an embed run, or parts of record whose rows are re-stated)."""

    kind: str
    uris: tuple[str, ...]
    ids: pa.Array


Unit = tuple[Callable[..., Written], dict]
MapFn = Callable[[list[Unit]], list[Written]]


def map_local(units: list[Unit]) -> list[Written]:
    """Run each unit in this process, in order (``write_version``'s default map)."""
    return [fn(**kwargs) for fn, kwargs in units]


_NO_IDS = pa.array([], pa.string())


def _emit(root: str, kind: str, table: pa.Table, version: str, tag: str,
          options: StorageOptions | None) -> tuple[tuple[str, int], ...]:
    """Write ``table`` as parts of record part-<version>-<tag>-<n> of at most PART_ROWS rows."""
    out = []
    for n, start in enumerate(range(0, table.num_rows, PART_ROWS)):
        part = f"part-{version}-{tag}-{n:03d}.parquet"
        piece = table.slice(start, PART_ROWS)
        storage.write_table(uri(root, kind, part), piece, options)
        out.append((part, piece.num_rows))
    return tuple(out)


def _face_ids(kind: str, ids: pa.Array | pa.ChunkedArray) -> pa.Array:
    if kind != FACES or not len(ids):
        return _NO_IDS
    unique = pc.unique(ids.cast(pa.string()))
    return unique.combine_chunks() if isinstance(unique, pa.ChunkedArray) else unique


def rewrite_part(*, root: str, kind: str, part: str, drop: pa.Array, version: str, tag: str,
                 options: StorageOptions | None = None) -> Written:
    """One part of record less the rows of ``drop``: kept as it is (only its ids read) when it holds
    none of them, else rewritten under version ``version``'s names; returns the dropped face ids."""
    faults.point("table.part", part)
    ids = storage.read_file(uri(root, kind, part), ["image_id"], options)["image_id"]
    hit = pc.is_in(ids, value_set=drop)
    if not len(drop) or not pc.any(hit).as_py():
        return Written(((part, len(ids)),), _NO_IDS)
    table = storage.read_file(uri(root, kind, part), None, options)
    table = table.filter(pc.invert(pc.is_in(table["image_id"], value_set=drop)))
    return Written(_emit(root, kind, table, version, tag, options), _face_ids(kind, ids.filter(hit)))


def record_part(*, root: str, kind: str, source: str, ids: pa.Array, stats: pa.Table | None, version: str,
                tag: str, options: StorageOptions | None = None) -> Written:
    """The rows of ``ids`` in the part file ``source`` (staged, or of record), with the source stat
    of ``stats`` set when given (``with_stats``), written as parts of record; returns their face ids."""
    faults.point("table.part", source)
    table = storage.read_file(source, None, options)
    table = table.filter(pc.is_in(table["image_id"].cast(pa.string()), value_set=ids))
    if stats is not None:
        table = with_stats(table, stats)
    return Written(_emit(root, kind, table, version, tag, options), _face_ids(kind, table["image_id"]))


def compact_parts(*, root: str, kind: str, parts: list[str], version: str, tag: str,
                  options: StorageOptions | None = None) -> Written:
    """Small parts of record merged into parts of up to PART_ROWS rows."""
    faults.point("table.part", tag)
    merged = _read_parts(root, kind, tuple(parts), None, options)
    return Written(_emit(root, kind, merged, version, tag, options), _NO_IDS)


def with_stats(table: pa.Table, stats: pa.Table) -> pa.Table:
    """``table`` (rows keyed by image_id) with the source stat columns of ``stats`` (image_id +
    SOURCE_STAT_SCHEMA, one row per id) set, replacing any it had."""
    at = pc.index_in(table["image_id"].cast(pa.string()), value_set=stats["image_id"])
    table = table.drop_columns([c for c in SOURCE_STAT_SCHEMA.names if c in table.column_names])
    for f in SOURCE_STAT_SCHEMA:
        table = table.append_column(f, stats[f.name].take(at))
    return table


def _rows_of(root: str, kind: str, part: str, options: StorageOptions | None) -> int:
    with storage.open_parquet(uri(root, kind, part), options) as parquet:
        return parquet.metadata.num_rows


def write_version(root: str, base: TableVersion | None, *, drop_ids: pa.Array,
                  add: dict[str, pa.Table | None] | None = None, sources: Sequence[Added] = (),
                  stats: pa.Table | None = None, model: str | None, job_id: str,
                  options: StorageOptions | None = None, hook=None, holding: set[tuple[str, str]] | None = None,
                  map_fn: MapFn = map_local) -> TableVersion:
    """Write a new table version = ``base`` minus ``drop_ids`` plus what is added; publish it last.

    Added: ``sources`` (rows the units read from part files, with the source stat of ``stats`` set
    when given) and ``add`` (tables this process already holds, written here). Parts of ``base``
    holding a dropped id are rewritten without it under new names; small parts are compacted once
    COMPACT_AT of them pile up. Rewrites, added sources and compaction are units of work run by
    ``map_fn`` (see above): this process sees part names, row counts and the face ids dropped or
    added, never rows. ``hook`` (tests) runs before ROOT/TABLE is written. Returns the new version;
    the old parts stay until ``collect_garbage``. ``holding``: the (kind, part) of ``base`` that
    hold a dropped id, when the caller knows them (rebuild's plan, erase's scan): the other parts
    are kept, their ids unread, their row counts taken from ``base``'s record (from their footers
    for a base written before counts were recorded); None has every part's ids read (by the units).

    The version records its distinct images with faces (``images``, what `status` shows), counted
    from the change alone: ``base``'s count, less the distinct dropped ids its faces held, plus the
    distinct ids of the added faces (never already held: rebuild drops an id before adding it back).
    A base written before the count was recorded leaves it None.
    """
    name = new_name()
    drop = pa.array(drop_ids, pa.string()) if not isinstance(drop_ids, pa.Array) else drop_ids.cast(pa.string())
    units, slots = _units(root, base, drop, sources, stats, name, options, holding)
    done = map_fn(units)
    parts = {kind: [p for slot in slots[kind] for p in (done[slot].parts if isinstance(slot, int) else (slot,))]
             for kind in KINDS}
    for kind, table in (add or {}).items():
        if table is not None and table.num_rows:
            parts[kind] += _emit(root, kind, table, name, "d00000", options)
    small = {kind: [p for p, n in parts[kind] if n < PART_ROWS // 4] for kind in KINDS}
    small = {kind: names for kind, names in small.items() if len(names) >= COMPACT_AT}
    merged = map_fn([(compact_parts, {"root": root, "kind": kind, "parts": names, "version": name,
                                      "tag": "c00000", "options": options}) for kind, names in small.items()])
    for (kind, names), written in zip(small.items(), merged):
        parts[kind] = [(p, n) for p, n in parts[kind] if p not in set(names)] + list(written.parts)
    images = None
    if base is None or base.images is not None:
        dropped = [w.image_ids for (fn, _), w in zip(units, done) if fn is rewrite_part]
        added = [w.image_ids for (fn, _), w in zip(units, done) if fn is record_part]
        held = (add or {}).get(FACES)
        if held is not None:
            added.append(_face_ids(FACES, held["image_id"]))
        images = (base.images if base else 0) - _distinct(dropped) + _distinct(added)
    version = TableVersion(name=name, faces=tuple(p for p, _ in parts[FACES]),
                           errors=tuple(p for p, _ in parts[ERRORS]),
                           face_rows=sum(n for _, n in parts[FACES]), error_rows=sum(n for _, n in parts[ERRORS]),
                           model=model, created_at=utc_now(), job_id=job_id, images=images,
                           face_part_rows=tuple(n for _, n in parts[FACES]),
                           error_part_rows=tuple(n for _, n in parts[ERRORS]))
    storage.write_bytes_atomic(uri(root, TABLES, f"{name}.json"), json.dumps(version.to_dict(), indent=2).encode(),
                               options)
    if hook:
        hook(name)
    pointer = read_pointer(root, options) or {}
    write_pointer(root, {**pointer, "table_version": name, "index_version": None}, options)
    return version


def _distinct(arrays: list[pa.Array]) -> int:
    return len(pc.unique(pa.chunked_array(arrays, pa.string()))) if arrays else 0


def _units(root: str, base: TableVersion | None, drop: pa.Array, sources: Sequence[Added], stats: pa.Table | None,
           name: str, options: StorageOptions | None,
           holding: set[tuple[str, str]] | None) -> tuple[list[Unit], dict[str, list[tuple[str, int] | int]]]:
    """The units that rewrite ``base``'s parts and record ``sources``, and per kind the new version's
    parts in order: (part, rows) kept as it is, or the index of the unit that writes them."""
    units: list[Unit] = []
    slots: dict[str, list[tuple[str, int] | int]] = {kind: [] for kind in KINDS}
    for kind in KINDS:
        recorded = base.part_rows(kind) if base else None
        for i, part in enumerate(base.parts(kind) if base else ()):
            if not len(drop) or (holding is not None and (kind, part) not in holding):
                rows = recorded[i] if recorded is not None else _rows_of(root, kind, part, options)
                slots[kind].append((part, rows))
                continue
            slots[kind].append(len(units))
            units.append((rewrite_part, {"root": root, "kind": kind, "part": part, "drop": drop, "version": name,
                                         "tag": f"r{i:05d}", "options": options}))
        files = [(source, added.ids) for added in sources if added.kind == kind for source in added.uris]
        for i, (source, ids) in enumerate(files):
            slots[kind].append(len(units))
            units.append((record_part, {"root": root, "kind": kind, "source": source, "ids": ids, "stats": stats,
                                        "version": name, "tag": f"a{i:05d}", "options": options}))
    return units, slots


def collect_garbage(root: str, options: StorageOptions | None = None) -> list[str]:
    """Remove part files and table versions the live table does not use (call under the lock)."""
    live = current(root, options)
    removed = []
    for kind in KINDS:
        used = set(live.parts(kind)) if live else set()
        for file_uri in storage.list_files(uri(root, kind), options=options):
            if file_uri.rstrip("/").rsplit("/", 1)[-1] not in used:
                storage.remove(file_uri, options=options)
                removed.append(file_uri)
    for file_uri in storage.list_files(uri(root, TABLES), ".json", options):
        if live is None or not file_uri.endswith(f"/{live.name}.json"):
            storage.remove(file_uri, options=options)
            removed.append(file_uri)
    return removed


# ---------------------------------------------------------------------------- staging

def staging_runs(root: str, options: StorageOptions | None = None) -> list[str]:
    """Names of the staging runs under ROOT/staging, oldest first."""
    fs, path = storage.filesystem(uri(root, STAGING), options)
    fs.invalidate_cache()
    if not fs.exists(path):
        return []
    return sorted(e["name"].rstrip("/").rsplit("/", 1)[-1] for e in fs.ls(path, detail=True)
                  if e["type"] == "directory")


def remove_staging(root: str, run: str, options: StorageOptions | None = None) -> None:
    storage.remove(uri(root, STAGING, run), recursive=True, options=options)
