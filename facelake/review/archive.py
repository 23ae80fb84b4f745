"""Reading an embed run's archive (or a ROOT of record) in a notebook: the faces table, the errors
and what they say, faces per photo, the runs that wrote it. Tested in tests/test_notebooks.py.
"""

from __future__ import annotations

import json
from typing import TYPE_CHECKING

import numpy as np
import pyarrow as pa

from facelake import storage
from facelake.record import tables as record
from facelake.review.outputs import parquet_files, require_pandas
from facelake.schema import ERRORS_SCHEMA
from facelake.storage import StorageOptions

if TYPE_CHECKING:  # pandas is an optional extra, imported when used
    import pandas as pd


def _table_or_empty(uri: str, schema: pa.Schema, options: StorageOptions | None,
                    columns: list[str] | None = None) -> pa.Table:
    if not parquet_files(uri, options):
        empty = schema.empty_table()
        return empty.select(columns) if columns else empty
    return storage.read_table(uri, columns=columns, options=options)


def _of_record(folder: str, kind: str, columns: list[str] | None, options: StorageOptions | None
               ) -> tuple[bool, pa.Table | None]:
    """(True, table or None) when FOLDER is a ROOT of record (ROOT/TABLE), read through facelake.record.tables
    (never by listing ROOT/faces, which may hold orphaned parts); (False, None) otherwise."""
    if record.read_pointer(folder, options) is None:
        return False, None
    return True, record.read_table(folder, kind, columns=columns, options=options)


def read_faces(archive: str, columns: list[str] | None = None, options: StorageOptions | None = None,
               as_pandas: bool = True):
    """The faces of ARCHIVE: an embed job's --out (ARCHIVE/faces) or a ROOT of record (its live table)."""
    managed, table = _of_record(archive, "faces", columns, options)
    if not managed:
        folder = storage.join(archive, "faces")
        if parquet_files(folder, options):
            table = storage.read_table(folder, columns=columns, options=options)
    if table is None:
        raise FileNotFoundError(f"no faces table at {storage.redact(archive)}: run `facelake embed MANIFEST "
                                f"--out {storage.redact(archive)}` (or `facelake rebuild`) first")
    return table.to_pandas() if as_pandas else table


def read_errors(folder: str, options: StorageOptions | None = None) -> "pd.DataFrame":
    """Images that failed: FOLDER/errors of an embed run (ARCHIVE), a search (RESULTS) or a ROOT of
    record; empty when there were none."""
    managed, table = _of_record(folder, "errors", None, options)
    if managed:
        return (table if table is not None else ERRORS_SCHEMA.empty_table()).to_pandas()
    return _table_or_empty(storage.join(folder, "errors"), ERRORS_SCHEMA, options).to_pandas()


def errors_by_reason(folder: str, options: StorageOptions | None = None) -> "pd.DataFrame":
    """Images that failed, counted by stage and error type (most frequent first), with one example."""
    pd = require_pandas()
    errors = read_errors(folder, options)
    if errors.empty:
        return pd.DataFrame(columns=["stage", "error_type", "images", "example"])
    grouped = errors.groupby(["stage", "error_type"], dropna=False)
    table = grouped.agg(images=("image_id", "nunique"), example=("message", "first")).reset_index()
    return table.sort_values(["images", "stage", "error_type"], ascending=[False, True, True], ignore_index=True)


def dropped_by_reason(archive: str, options: StorageOptions | None = None) -> "pd.DataFrame":
    """Faces found but dropped below the quality floor, counted by reason."""
    pd = require_pandas()
    folder = storage.join(archive, "dropped")
    if not parquet_files(folder, options):
        return pd.DataFrame(columns=["reason", "faces", "images"])
    dropped = storage.read_table(folder, columns=["image_id", "reason"], options=options).to_pandas()
    table = dropped.groupby("reason").agg(faces=("image_id", "size"), images=("image_id", "nunique")).reset_index()
    return table.sort_values("faces", ascending=False, ignore_index=True)


def faces_per_photo(archive: str, options: StorageOptions | None = None) -> "pd.DataFrame":
    """How many photos hold 0, 1, 2, ... usable faces (0: photos in the errors table)."""
    pd = require_pandas()
    try:
        faces = read_faces(archive, columns=["image_id"], options=options, as_pandas=False)
    except FileNotFoundError:
        faces = pa.table({"image_id": pa.array([], pa.string())})
    counts = faces.group_by("image_id").aggregate([("image_id", "count")])["image_id_count"].to_numpy()
    failed = read_errors(archive, options)["image_id"].nunique()
    values, photos = np.unique(np.asarray(counts, np.int64), return_counts=True)
    rows = ([{"faces": 0, "photos": int(failed)}] if failed else []) + \
        [{"faces": int(v), "photos": int(n)} for v, n in zip(values, photos)]
    return pd.DataFrame(rows, columns=["faces", "photos"])


def embed_runs(archive: str, options: StorageOptions | None = None) -> "pd.DataFrame":
    """The summaries of the embed runs that wrote ARCHIVE (ARCHIVE/_runs/*.json), oldest first."""
    pd = require_pandas()
    records = [json.loads(storage.read_bytes(u, options))
               for u in storage.list_files(storage.join(archive, "_runs"), ".json", options)]
    return pd.json_normalize(records) if records else pd.DataFrame(columns=["run_id", "images", "faces", "errors"])
