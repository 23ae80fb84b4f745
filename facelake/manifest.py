"""Manifests: Parquet tables listing archived images (image_id, uri, carried columns).

Validation runs on the driver before any work starts and streams the file(s), so a
multi-million-row manifest costs one pass over two columns.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from facelake import storage
from facelake.errors import ManifestError
from facelake.schema import FACE_COLUMNS, MANIFEST_REQUIRED

# Columns facelake writes itself; a manifest may not use these names for carried columns.
RESERVED = tuple(c for c in FACE_COLUMNS if c not in MANIFEST_REQUIRED) + (
    "stage", "error_type", "message")


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
    try:
        files = storage.list_files(uri, ".parquet", options)
    except Exception as err:
        raise ManifestError(f"cannot list manifest {storage.redact(uri)}: {type(err).__name__}: {err} "
                            "(check the path or bucket exists and credentials are set up)") from err
    if not files:
        raise ManifestError(f"no manifest at {storage.redact(uri)}: give a Parquet file or a folder/prefix of them")
    schema = None
    for file_uri in files:
        fs, path = storage.filesystem(file_uri, options)
        try:
            with fs.open(path, "rb") as handle:
                file_schema = pq.read_schema(handle)
        except Exception as err:
            raise ManifestError(f"{storage.redact(file_uri)} is not a readable Parquet file: {err}") from err
        if schema is None:
            schema = file_schema
        elif not file_schema.equals(schema):
            raise ManifestError(f"{storage.redact(file_uri)} has a different schema from {storage.redact(files[0])}; "
                                "every file of a manifest must share one schema")
    missing = [c for c in required if c not in schema.names]
    if missing:
        raise ManifestError(f"manifest {storage.redact(uri)} lacks required column(s) {missing}; "
                            f"it has {schema.names}")
    clash = [c for c in schema.names if c in RESERVED]
    if clash:
        raise ManifestError(f"manifest columns {clash} collide with columns facelake writes; rename them")
    ids: list[pa.Array] = []
    digest = hashlib.sha256()
    rows = 0
    for batch in storage.iter_batches(uri, columns=["image_id", "uri"], options=options):
        image_id, image_uri = batch.column(0), batch.column(1)
        if not pa.types.is_string(image_id.type) and not pa.types.is_large_string(image_id.type):
            raise ManifestError(f"image_id must be a string column, not {image_id.type}")
        if image_id.null_count or image_uri.null_count:
            raise ManifestError(f"manifest has null image_id or uri values near row {rows}; every row needs both")
        if pc.any(pc.equal(pc.utf8_length(image_id), 0)).as_py():
            raise ManifestError(f"manifest has an empty image_id near row {rows}")
        ids.append(image_id.cast(pa.string()))
        digest.update(b"".join(s.encode() + b"\0" for s in image_id.to_pylist()))
        digest.update(b"".join(s.encode() + b"\0" for s in image_uri.to_pylist()))
        rows += len(batch)
    if rows == 0:
        raise ManifestError(f"manifest {storage.redact(uri)} has no rows")
    all_ids = pa.chunked_array(ids)
    counts = pc.value_counts(all_ids)
    dupes = counts.filter(pc.greater(counts.field("counts"), 1))
    if len(dupes):
        sample = [d["values"] for d in dupes.to_pylist()[:5]]
        raise ManifestError(f"image_id must be unique: {len(dupes)} duplicated, e.g. {sample}")
    carried = tuple(c for c in schema.names if c not in MANIFEST_REQUIRED)
    return ManifestInfo(uri=uri, files=tuple(files), schema=schema, rows=rows, carried=carried,
                        fingerprint=digest.hexdigest())


def write(table: pa.Table, uri: str, options: storage.StorageOptions | None = None) -> None:
    """Write a manifest table as one Parquet file (helper for demos, tests and benches)."""
    storage.write_table(uri, table, options)
