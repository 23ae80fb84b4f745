"""Manifests: Parquet tables listing archived images (image_id, uri, carried columns).

Validation runs on the driver before any work starts and streams the file(s), so a
multi-million-row manifest costs one pass over two columns and 8 bytes of memory per row
(bench/manifest_memory.py measures it).
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from facelake import storage
from facelake.errors import ManifestError
from facelake.schema import FACE_COLUMNS, MANIFEST_REQUIRED, SOURCE_STAT_SCHEMA

# Columns facelake writes itself (faces, errors and dropped tables, and the embed workers'
# internal row kind); a manifest may not use these names for carried columns.
RESERVED = tuple(c for c in FACE_COLUMNS if c not in MANIFEST_REQUIRED) + (
    "stage", "error_type", "message", "reason", "frame", "_kind", *SOURCE_STAT_SCHEMA.names)


@dataclass(frozen=True)
class ManifestInfo:
    """What validation learned about a manifest."""

    uri: str
    files: tuple[str, ...]
    schema: pa.Schema
    rows: int
    carried: tuple[str, ...]
    fingerprint: str  # sha256 over (image_id, uri) in file order: ties outputs and audits to input

    @property
    def paths(self) -> list[str]:
        """Paths inside the filesystem (what pyarrow / Ray Data readers take)."""
        return [storage.filesystem(f)[1] for f in self.files]


def validate(uri: str, options: storage.StorageOptions | None = None,
             required: tuple[str, ...] = MANIFEST_REQUIRED) -> ManifestInfo:
    """Check a manifest before work starts; raise ManifestError that says what to fix."""
    storage.check_uri(uri)
    files, schema, expected_rows = _files_and_schema(uri, options)
    missing = [c for c in required if c not in schema.names]
    if missing:
        raise ManifestError(f"manifest {storage.redact(uri)} lacks required column(s) {missing}; "
                            f"it has {schema.names}")
    _refuse_reserved(uri, schema)
    duplicated = sorted({c for c in schema.names if schema.names.count(c) > 1})
    if duplicated:
        raise ManifestError(f"manifest {storage.redact(uri)} has column name(s) {duplicated} more than once; "
                            "give every column its own name")
    rows, fingerprint = _check_rows(uri, options, expected_rows)
    carried = tuple(c for c in schema.names if c not in MANIFEST_REQUIRED)
    return ManifestInfo(uri=uri, files=tuple(files), schema=schema, rows=rows, carried=carried,
                        fingerprint=fingerprint)


def _files_and_schema(uri: str, options: storage.StorageOptions | None) -> tuple[list[str], pa.Schema, int]:
    """The manifest's Parquet files, their one shared schema and their rows by the footers."""
    try:
        files = storage.list_files(uri, ".parquet", options)
    except Exception as err:
        raise ManifestError(f"cannot list manifest {storage.redact(uri)}: {type(err).__name__}: {err} "
                            "(check the path or bucket exists and credentials are set up)") from err
    if not files:
        raise ManifestError(f"no manifest at {storage.redact(uri)}: give a Parquet file or a folder/prefix of them")
    schema = None
    expected_rows = 0
    for file_uri in files:
        try:
            with storage.open_parquet(file_uri, options) as parquet:
                file_schema = parquet.schema_arrow
                expected_rows += parquet.metadata.num_rows
        except Exception as err:
            raise ManifestError(f"{storage.redact(file_uri)} is not a readable Parquet file: {err}") from err
        if schema is None:
            schema = file_schema
        elif not file_schema.equals(schema):
            raise ManifestError(f"{storage.redact(file_uri)} has a different schema from {storage.redact(files[0])}; "
                                "every file of a manifest must share one schema")
    return files, schema, expected_rows


def _check_batch(uri: str, batch: pa.RecordBatch, rows: int) -> None:
    """One batch's image_id and uri: strings, not null, ids by the id rule."""
    image_id, image_uri = batch.column(0), batch.column(1)
    for name, column in (("image_id", image_id), ("uri", image_uri)):
        if not pa.types.is_string(column.type) and not pa.types.is_large_string(column.type):
            raise ManifestError(f"{name} must be a string column, not {column.type}")
    if image_id.null_count or image_uri.null_count:
        raise ManifestError(f"manifest has null image_id or uri values near row {rows}; every row needs both")
    if pc.any(pc.equal(pc.utf8_length(image_id), 0)).as_py():
        raise ManifestError(f"manifest has an empty image_id near row {rows}")
    bad_id = id_rule_violation(image_id)
    if bad_id is not None:
        raise ManifestError(f"manifest {storage.redact(uri)} row {rows + bad_id[0]}: {bad_id[1]}; fix the "
                            f"image_id (no control characters, no surrounding whitespace, at most "
                            f"{MAX_ID_CHARS} characters): it is what `facelake erase` takes")


def _check_rows(uri: str, options: storage.StorageOptions | None, expected_rows: int) -> tuple[int, str]:
    """Stream the rows once: each batch checked, ids unique, and the manifest's fingerprint.

    Uniqueness in bounded memory: one 64-bit hash per row (8 bytes, not the id strings), sorted;
    equal hashes are then checked exactly in a second pass over only those ids. Python's str
    hash is SipHash keyed per process, so a manifest cannot be crafted to collide on purpose.
    """
    hashes = np.empty(expected_rows, np.int64)
    digest = hashlib.sha256()
    rows = 0
    try:
        for batch in storage.iter_batches(uri, columns=["image_id", "uri"], options=options):
            _check_batch(uri, batch, rows)
            if rows + len(batch) > expected_rows:
                raise ManifestError(f"manifest {storage.redact(uri)} changed while it was validated; rerun")
            id_list = batch.column(0).to_pylist()
            hashes[rows:rows + len(batch)] = np.fromiter(map(hash, id_list), np.int64, len(id_list))
            # sha256 of "id\0" for each id, then of "uri\0" for each uri, batch by batch
            digest.update(("\0".join(id_list) + "\0").encode() if id_list else b"")
            uris = batch.column(1).to_pylist()
            digest.update(("\0".join(uris) + "\0").encode() if uris else b"")
            rows += len(batch)
    except ManifestError:
        raise
    except (pa.ArrowException, OSError, ValueError) as err:
        raise ManifestError(f"cannot read manifest {storage.redact(uri)}: {type(err).__name__}: {err}") from err
    if rows == 0:
        raise ManifestError(f"manifest {storage.redact(uri)} has no rows")
    hashes = hashes[:rows]
    hashes.sort()
    clashing = np.unique(hashes[1:][hashes[1:] == hashes[:-1]])
    del hashes
    if len(clashing):
        _refuse_duplicates(uri, options, set(clashing.tolist()))
    return rows, digest.hexdigest()


# The one rule for image ids: what a manifest may hold is exactly what `facelake erase` accepts.
MAX_ID_CHARS = 1024          # file paths of deep archives fit; longer is a data error
_CONTROL = r"[\x{00}-\x{1f}\x{7f}-\x{9f}]"


def id_rule_violation(ids: pa.Array | pa.ChunkedArray | list[str]) -> tuple[int, str] | None:
    """(position, what is wrong) of the first id breaking the id rule, or None when all keep it.

    The rule: a non-empty string of at most MAX_ID_CHARS characters, without control characters
    (newline, tab, NUL, ...) and without leading or trailing whitespace. Vectorised (pyarrow).
    """
    ids = pa.array(ids, pa.string()) if isinstance(ids, list) else ids.cast(pa.string())
    checks = (
        (pc.is_null(ids), "is null"),
        (pc.equal(pc.utf8_length(ids), 0), "is empty"),
        (pc.match_substring_regex(ids, _CONTROL), "holds a control character"),
        (pc.not_equal(pc.utf8_trim_whitespace(ids), ids), "has leading or trailing whitespace"),
        (pc.greater(pc.utf8_length(ids), MAX_ID_CHARS), f"is longer than {MAX_ID_CHARS} characters"),
    )
    first = None
    for mask, why in checks:
        hits = pc.indices_nonzero(pc.fill_null(mask, False)) if len(ids) else pa.array([], pa.uint64())
        if len(hits) and (first is None or hits[0].as_py() < first[0]):
            position = hits[0].as_py()
            first = (position, f"image_id {str(ids[position].as_py())[:80]!r} {why}")
    return first


def _refuse_reserved(uri: str, schema: pa.Schema) -> None:
    """Carried columns may not take a name facelake writes itself (they would clash in outputs)."""
    clash = [c for c in schema.names if c in RESERVED]
    if clash:
        raise ManifestError(f"manifest {storage.redact(uri)} has column(s) {clash} whose names facelake uses for "
                            f"its own output columns; rename them (reserved: {', '.join(RESERVED)})")


def _refuse_duplicates(uri: str, options: storage.StorageOptions | None, clashing: set[int]) -> None:
    """Second pass: count exactly the ids whose hashes clashed; raise if any id repeats."""
    counts: dict[str, int] = {}
    for batch in storage.iter_batches(uri, columns=["image_id"], options=options):
        for image_id in batch.column(0).to_pylist():
            if hash(image_id) in clashing:
                counts[image_id] = counts.get(image_id, 0) + 1
    dupes = [image_id for image_id, count in counts.items() if count > 1]
    if dupes:
        raise ManifestError(f"image_id must be unique: {len(dupes)} duplicated, e.g. {sorted(dupes)[:5]}")


def base_dir(uri: str, options: storage.StorageOptions | None = None) -> str:
    """The folder a manifest's relative uris resolve against (the manifest file's folder, or the
    manifest folder itself); ``facelake.faces.reader.resolve`` makes each uri absolute against it."""
    fs, path = storage.filesystem(uri, options)
    folder = path if fs.isdir(path) else os.path.dirname(path)
    return ("s3://" + folder) if storage.scheme_of(uri) == "s3" else folder


def write(table: pa.Table, uri: str, options: storage.StorageOptions | None = None) -> None:
    """Write a manifest table as one Parquet file (helper for demos, tests and benches)."""
    storage.write_table(uri, table, options)
