"""A search's results table: one batch of search hits -> result rows (format in facelake.schema).

A batch of probe faces, its merged top-k (similarities ``D`` and gallery positions ``I``, -1 where
none), the winners' id-table rows and their estimated false-match rates become one table of
schema.result_schema: one row per kept candidate, ordered by probe face then rank, and one row
with rank and gallery columns null for a probe face with no candidate kept. Tested in
tests/test_search.py.
"""

from __future__ import annotations

import json
from dataclasses import dataclass

import numpy as np
import pyarrow as pa

from facelake.schema import FACE_COLUMNS, ID_TABLE_SCHEMA, RESULT_METADATA_FIELDS, result_schema

# Columns of the probe faces a search reads besides the carried ones.
PROBE_FACE_COLUMNS = ("image_id", "face_index", "bbox", "embedding")


@dataclass(frozen=True)
class ResultSpec:
    """What every result row of one search job carries, and which candidates it keeps."""

    job_id: str
    index_version: str
    mode: str                          # "identify" keeps only candidates at or above the threshold
    threshold: float | None
    probe_carried: tuple[str, ...]     # the probe faces' carried columns (probe_<name> in results)
    metadata: str                      # JSON stored in every result file's schema metadata


def probe_carried(carried: list[str] | tuple[str, ...]) -> list[str]:
    """The probe columns results carry as ``probe_<name>``: the photo's uri and the carried columns."""
    return [c for c in ["uri", *carried] if c not in FACE_COLUMNS or c == "uri"]


def probe_columns(carried: list[str] | tuple[str, ...]) -> list[str]:
    """The probe-face columns a search reads: what it searches with and what results carry."""
    return [*PROBE_FACE_COLUMNS, *probe_carried(carried)]


def result_metadata(summary: object) -> str:
    """The JSON of RESULT_METADATA_FIELDS, read from the attributes of a search's summary."""
    return json.dumps({name: getattr(summary, name) for name in RESULT_METADATA_FIELDS})


def result_table(spec: ResultSpec, probes: pa.Table, D: np.ndarray, I: np.ndarray, gallery_rows: pa.Table,
                 fmr: np.ndarray) -> tuple[pa.Table, int, int]:
    """Result rows of one batch, the number of candidate rows and of probe faces with no
    candidate (one row each, rank and gallery null)."""
    n, k = I.shape
    keep = I >= 0
    if spec.mode == "identify":
        keep &= D >= spec.threshold
    empty = ~keep.any(axis=1)
    positions = np.concatenate([np.flatnonzero(keep.reshape(-1)), np.full(int(empty.sum()), -1)])
    owners = np.concatenate([np.flatnonzero(keep.reshape(-1)) // k, np.flatnonzero(empty)])
    order = np.argsort(owners, kind="stable")
    positions, owners = positions[order], owners[order]
    none = positions < 0
    at = np.where(none, 0, positions)
    sims = D.reshape(-1)[at].astype(np.float32)
    rates = np.asarray(fmr, np.float64).reshape(-1)[at]
    gallery = gallery_rows.take(pa.array(at, pa.int64(), mask=none))
    probe = probes.take(pa.array(owners, pa.int64()))
    above = (pa.nulls(len(owners), pa.bool_()) if spec.threshold is None
             else pa.array(sims >= spec.threshold, mask=none))
    columns = {
        "job_id": pa.array([spec.job_id] * len(owners), pa.string()),
        "probe_image_id": probe["image_id"],
        "probe_face_index": probe["face_index"],
        "probe_bbox": probe["bbox"],
        "rank": pa.array((at % k + 1).astype(np.int32), pa.int32(), mask=none),
        "gallery_image_id": gallery["image_id"],
        "gallery_face_index": gallery["face_index"],
        "gallery_bbox": gallery["bbox"],
        "similarity": pa.array(sims, pa.float32(), mask=none),
        "est_false_match_rate": pa.array(rates, pa.float64(), mask=none | np.isnan(rates)),
        "above_threshold": above,
        "index_version": pa.array([spec.index_version] * len(owners), pa.string()),
    }
    probe_fields = [probe.schema.field(c) for c in probe_carried(spec.probe_carried) if c in probe.column_names]
    gallery_fields = [f for f in gallery.schema if f.name not in ID_TABLE_SCHEMA.names]
    columns.update({f"probe_{f.name}": probe[f.name] for f in probe_fields})
    columns.update({f"gallery_{f.name}": gallery[f.name] for f in gallery_fields})
    schema = result_schema(pa.schema(probe_fields), pa.schema(gallery_fields), spec.metadata.encode())
    return pa.table(columns).cast(schema), int((~none).sum()), int(empty.sum())
