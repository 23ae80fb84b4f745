"""The layout of record of a ROOT that `facelake rebuild` / `erase` / `status` manage.

    ROOT/faces/part-<table version>-<n>.parquet    faces of record: immutable part files
    ROOT/errors/part-<table version>-<n>.parquet   errors of record (one row per failed image)
    ROOT/tables/<table version>.json               a table version: which parts make the tables
    ROOT/TABLE                                     pointer: the live table version (+ its index)
    ROOT/erasures/<job id>.parquet                 erasure list of record: append-only objects
    ROOT/staging/<run>/                            an in-progress embed (facelake embed's layout)
    ROOT/_runs/<run>.json                          summaries of the embed runs merged into record
    ROOT/lock                                      facelake.lock
    ROOT/index/..., ROOT/audit/...                 index versions (facelake.index.layout), audit log

A new table version writes new part files only (parts that lose rows are rewritten under new
names, untouched parts are shared), then its JSON, then ROOT/TABLE in one atomic write. A crash
before that write leaves the previous table of record valid; the orphaned parts are removed by the
next job that holds the lock (``collect_garbage``). Read the faces of record with ``read_faces``,
never by listing ROOT/faces: between a crash and the next job the folder may hold orphans.
"""

from __future__ import annotations

import datetime as dt
import json
import logging
import secrets
from dataclasses import dataclass

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from facelake import storage
from facelake.storage import StorageOptions

log = logging.getLogger(__name__)

FACES, ERRORS, TABLES, POINTER, ERASURES, STAGING, RUNS = (
    "faces", "errors", "tables", "TABLE", "erasures", "staging", "_runs")
KINDS = (FACES, ERRORS)
# Rows per part file of record; a part rewritten for a removal costs at most this many rows.
PART_ROWS = 100_000
# Parts below PART_ROWS/4 rows (one per small nightly increment) are merged once this many pile up.
COMPACT_AT = 16

ERASURE_SCHEMA = pa.schema([
    ("image_id", pa.string()), ("reason", pa.string()), ("user", pa.string()),
    ("erased_at", pa.string()), ("job_id", pa.string()),
])


def uri(root: str, *parts: str) -> str:
    return storage.join(root, *parts)


def new_name() -> str:
    """Sortable unique name for table versions and staging runs."""
    now = dt.datetime.now(dt.timezone.utc)
    return f"{now.strftime('%Y%m%dT%H%M%S')}.{now.microsecond // 1000:03d}Z-{secrets.token_hex(3)}"


def utc_now() -> str:
    return dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds").replace("+00:00", "Z")


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

    def to_dict(self) -> dict:
        return {"name": self.name, "faces": list(self.faces), "errors": list(self.errors),
                "face_rows": self.face_rows, "error_rows": self.error_rows, "model": self.model,
                "created_at": self.created_at, "job_id": self.job_id}

    @classmethod
    def from_dict(cls, data: dict) -> "TableVersion":
        return cls(name=data["name"], faces=tuple(data["faces"]), errors=tuple(data["errors"]),
                   face_rows=int(data["face_rows"]), error_rows=int(data["error_rows"]),
                   model=data.get("model"), created_at=data["created_at"], job_id=data.get("job_id"))

    def parts(self, kind: str) -> tuple[str, ...]:
        return self.faces if kind == FACES else self.errors


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
        fs, path = storage.filesystem(uri(root, kind, name), options)
        with fs.open(path, "rb") as handle:
            table = pq.read_table(handle, columns=columns)
        tables.append(table)
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
    """One row per (part, image) of record: kind, part, image_id, content_sha256, uri."""
    tables = []
    if version is not None:
        for kind in KINDS:
            for name in version.parts(kind):
                t = _read_parts(root, kind, (name,), ["image_id", "content_sha256", "uri"], options)
                t = t.group_by(["image_id"], use_threads=False).aggregate(
                    [("content_sha256", "first"), ("uri", "first")])
                tables.append(pa.table({
                    "kind": pa.array([kind] * t.num_rows, pa.string()),
                    "part": pa.array([name] * t.num_rows, pa.string()),
                    "image_id": t["image_id"].cast(pa.string()),
                    "content_sha256": t["content_sha256_first"].cast(pa.string()),
                    "uri": t["uri_first"].cast(pa.string())}))
    if not tables:
        return pa.table({n: pa.array([], pa.string()) for n in ("kind", "part", "image_id", "content_sha256", "uri")})
    return pa.concat_tables(tables)


def write_version(root: str, base: TableVersion | None, *, drop_ids: pa.Array, add: dict[str, pa.Table | None],
                  model: str | None, job_id: str, options: StorageOptions | None = None,
                  hook=None) -> TableVersion:
    """Write a new table version = ``base`` minus ``drop_ids`` plus ``add``; publish it last.

    Parts of ``base`` holding a dropped id are rewritten without it under new names; small parts
    are compacted once COMPACT_AT of them pile up. ``hook`` (tests) runs before ROOT/TABLE is
    written. Returns the new version; the old parts stay until ``collect_garbage``.
    """
    name = new_name()
    drop = pa.array(drop_ids, pa.string()) if not isinstance(drop_ids, pa.Array) else drop_ids.cast(pa.string())
    lists: dict[str, list[str]] = {}
    rows: dict[str, int] = {}
    for kind in KINDS:
        counter = [0]

        def emit(table: pa.Table) -> list[str]:
            out = []
            for start in range(0, table.num_rows, PART_ROWS):
                part = f"part-{name}-{counter[0]:05d}.parquet"
                storage.write_table(uri(root, kind, part), table.slice(start, PART_ROWS), options)
                counter[0] += 1
                out.append(part)
            return out

        kept: list[tuple[str, int]] = []
        for part in (base.parts(kind) if base else ()):
            fs, path = storage.filesystem(uri(root, kind, part), options)
            with fs.open(path, "rb") as handle:
                ids = pq.read_table(handle, columns=["image_id"])["image_id"]
            if len(drop) and pc.any(pc.is_in(ids, value_set=drop)).as_py():
                table = _read_parts(root, kind, (part,), None, options)
                table = table.filter(pc.invert(pc.is_in(table["image_id"], value_set=drop)))
                kept += [(p, min(PART_ROWS, table.num_rows - i)) for p, i in
                         zip(emit(table), range(0, table.num_rows, PART_ROWS))]
            else:
                kept.append((part, len(ids)))
        new = add.get(kind)
        if new is not None and new.num_rows:
            kept += [(p, min(PART_ROWS, new.num_rows - i)) for p, i in
                     zip(emit(new), range(0, new.num_rows, PART_ROWS))]
        small = [p for p, n in kept if n < PART_ROWS // 4]
        if len(small) >= COMPACT_AT:
            merged = _read_parts(root, kind, tuple(small), None, options)
            kept = [(p, n) for p, n in kept if p not in small]
            kept += [(p, min(PART_ROWS, merged.num_rows - i)) for p, i in
                     zip(emit(merged), range(0, merged.num_rows, PART_ROWS))]
        lists[kind] = [p for p, _ in kept]
        rows[kind] = sum(n for _, n in kept)
    version = TableVersion(name=name, faces=tuple(lists[FACES]), errors=tuple(lists[ERRORS]),
                           face_rows=rows[FACES], error_rows=rows[ERRORS], model=model,
                           created_at=utc_now(), job_id=job_id)
    storage.write_bytes_atomic(uri(root, TABLES, f"{name}.json"), json.dumps(version.to_dict(), indent=2).encode(),
                               options)
    if hook:
        hook(name)
    pointer = read_pointer(root, options) or {}
    write_pointer(root, {**pointer, "table_version": name, "index_version": None}, options)
    return version


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


# ---------------------------------------------------------------------------- erasures

def erasures(root: str, options: StorageOptions | None = None) -> pa.Table:
    """The erasure list of record (every object under ROOT/erasures), oldest first."""
    files = storage.list_files(uri(root, ERASURES), ".parquet", options)
    if not files:
        return ERASURE_SCHEMA.empty_table()
    tables = []
    for file_uri in files:
        fs, path = storage.filesystem(file_uri, options)
        with fs.open(path, "rb") as handle:
            tables.append(pq.read_table(handle).cast(ERASURE_SCHEMA))
    return pa.concat_tables(tables)


def erased_ids(root: str, options: StorageOptions | None = None) -> pa.Array:
    return pc.unique(erasures(root, options)["image_id"].combine_chunks())


def append_erasure(root: str, ids: list[str], *, reason: str, user: str, job_id: str,
                   options: StorageOptions | None = None) -> str:
    """Append one object to the erasure list (never rewritten); returns its URI."""
    now = utc_now()
    table = pa.table({"image_id": ids, "reason": [reason] * len(ids), "user": [user] * len(ids),
                      "erased_at": [now] * len(ids), "job_id": [job_id] * len(ids)}, schema=ERASURE_SCHEMA)
    import io

    sink = io.BytesIO()
    pq.write_table(table, sink, compression="zstd")
    target = uri(root, ERASURES, f"{job_id}.parquet")
    storage.write_bytes_new(target, sink.getvalue(), options)
    return target


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
