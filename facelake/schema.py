"""The one definition of every table facelake reads or writes.

Data flows one way: manifest -> faces (+ errors) -> index version -> results (+ errors).
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field, fields

import pyarrow as pa

# Manifest: one row per archived image. Every other column is carried through to outputs.
MANIFEST_REQUIRED = ("image_id", "uri")

BBOX = pa.list_(pa.int32(), 4)  # x, y, width, height in pixels of the EXIF-upright image
LANDMARKS = pa.list_(pa.float32(), 10)  # (x, y) of right eye, left eye, nose, mouth corners

# Columns facelake itself writes in the faces table; carried manifest columns come after.
FACE_COLUMNS = (
    "image_id", "face_index", "uri", "bbox", "landmarks", "det_score", "embedding",
    "model", "detector", "weights_sha256", "content_sha256",
)


def faces_schema(dim: int) -> pa.Schema:
    """Schema of the faces table for embeddings of size ``dim`` (without carried columns)."""
    return pa.schema([
        ("image_id", pa.string()),
        ("face_index", pa.int32()),
        ("uri", pa.string()),
        ("bbox", BBOX),
        ("landmarks", LANDMARKS),
        ("det_score", pa.float32()),
        ("embedding", pa.list_(pa.float32(), dim)),  # L2-normalised
        ("model", pa.string()),
        ("detector", pa.string()),
        ("weights_sha256", pa.string()),
        ("content_sha256", pa.string()),
    ])


ERRORS_SCHEMA = pa.schema([
    ("image_id", pa.string()),
    ("uri", pa.string()),
    ("stage", pa.string()),        # fetch | decode | detect | quality | embed
    ("error_type", pa.string()),   # e.g. FileNotFoundError, DecodeError, NoFace, FaceTooSmall
    ("message", pa.string()),
    ("content_sha256", pa.string()),
    ("model", pa.string()),
])

# ---- source stat of record (issue 13, item 5: nightly rebuild at O(change)) ----
# `facelake rebuild` stores, on every faces and errors row of record, what the photo's source
# looked like when it was embedded, so the next night finds changes from a listing (stat / S3
# LIST or HEAD) instead of reading every photo's bytes. Local files: size and st_mtime_ns (etag
# null); S3 objects: size and ETag (mtime null). Rows written before these columns existed have
# no such columns (or nulls): their photo is hashed once and the columns are recorded then.
SOURCE_STAT_SCHEMA = pa.schema([
    ("source_size", pa.int64()),
    ("source_mtime_ns", pa.int64()),
    ("source_etag", pa.string()),
])
# A manifest may describe its objects itself (an S3 Inventory-style listing): with `size` and one of
# `etag` / `mtime` (int ns or timestamp) among its columns, rebuild uses them and lists nothing.
MANIFEST_STAT_COLUMNS = ("size", "etag", "mtime")
# ---- end source stat ----

# Stages and error types written to the errors table, so tests and reports name them once.
STAGE_FETCH, STAGE_DECODE, STAGE_DETECT, STAGE_QUALITY, STAGE_EMBED, STAGE_VALIDATE = (
    "fetch", "decode", "detect", "quality", "embed", "validate")
NO_FACE = "NoFace"
NO_USABLE_FACE = "NoUsableFace"

RESULT_COLUMNS = pa.schema([
    ("job_id", pa.string()),
    ("probe_image_id", pa.string()),
    ("probe_face_index", pa.int32()),
    ("probe_bbox", BBOX),
    ("rank", pa.int32()),
    ("gallery_image_id", pa.string()),
    ("gallery_face_index", pa.int32()),
    ("gallery_bbox", BBOX),
    ("similarity", pa.float32()),
    ("est_false_match_rate", pa.float64()),
    ("above_threshold", pa.bool_()),
    ("index_version", pa.string()),
])

# Id table stored beside every index shard: faiss id -> face. These columns always come first;
# after them the shard keeps every other column of the faces table (uri and the manifest's
# carried columns) except those in ID_TABLE_DROPPED, so a search result row needs nothing but
# the shard that found it.
ID_TABLE_SCHEMA = pa.schema([
    ("faiss_id", pa.int64()),
    ("image_id", pa.string()),
    ("face_index", pa.int32()),
    ("bbox", BBOX),
])
# Faces-table columns an id table does not keep: the vector lives in the shard, the model's
# provenance in the version manifest, and landmarks/content hashes are not needed to review.
ID_TABLE_DROPPED = ("embedding", "landmarks", "model", "detector", "weights_sha256", "content_sha256",
                    *SOURCE_STAT_SCHEMA.names)


def id_table_schema(faces: pa.Schema) -> pa.Schema:
    """The id table schema of a version built from faces of schema ``faces``."""
    extra = [f for f in faces if f.name not in ID_TABLE_SCHEMA.names and f.name not in ID_TABLE_DROPPED]
    return pa.schema(list(ID_TABLE_SCHEMA) + extra)


def carried_columns(schema: pa.Schema, own: tuple[str, ...] = FACE_COLUMNS) -> list[str]:
    """Manifest columns that are not facelake's own and are carried through."""
    return [name for name in schema.names if name not in own]


# ------------------------------------------------------------------------------ audit records

AUDIT_FORMAT = 1
# The one status field every job's records carry: "started" is written before any result,
# then exactly one of the others when the job ends (none when it was killed outright).
AUDIT_STATUSES = ("started", "succeeded", "failed", "interrupted", "skipped")   # skipped: nothing to do


@dataclass(frozen=True)
class AuditRecord:
    """One record of ROOT/audit/ (facelake.audit): common fields typed, job-specific ones in ``details``.

    ``seq`` numbers the records of a root from 1; ``prev_sha256`` is the sha256 of the bytes of
    record ``seq - 1`` (None for the first), which makes the log a hash chain.
    """

    seq: int
    prev_sha256: str | None
    job_id: str
    kind: str                          # search | erase | rebuild | index | lock-takeover
    status: str                        # one of AUDIT_STATUSES
    os_user: str                       # the operating-system user running the job
    claimed_user: str | None           # FACELAKE_USER, as claimed (not verified)
    host: str
    pid: int
    ray_job: str | None                # the Ray job (submission id) the job ran in, if any
    ray_submitter: str | None          # the submitter's user tag of that Ray job, if known
    started_at: str
    ended_at: str | None
    recorded_at: str
    error: str | None = None
    details: dict = field(default_factory=dict)
    format: int = AUDIT_FORMAT

    def to_json(self) -> bytes:
        return json.dumps(asdict(self), indent=2, sort_keys=True, default=str).encode()

    @classmethod
    def from_json(cls, data: bytes) -> "AuditRecord":
        """Parse and type-check one stored record; raises ValueError naming what is wrong."""
        raw = json.loads(data)
        if not isinstance(raw, dict):
            raise ValueError("not a JSON object")
        names = {f.name for f in fields(cls)}
        missing = sorted(n for n in names if n not in raw and n not in ("error", "details", "format"))
        extra = sorted(set(raw) - names)
        if missing or extra:
            raise ValueError(f"not an audit record (missing {missing}, unknown {extra})")
        record = cls(**raw)
        if not isinstance(record.seq, int) or record.seq < 1 or record.status not in AUDIT_STATUSES \
                or not isinstance(record.details, dict):
            raise ValueError(f"bad seq {record.seq!r}, status {record.status!r} or details")
        return record

    def view(self) -> dict:
        """The flat dict readers use: details first, then the common fields (``user`` = os_user)."""
        common = {k: v for k, v in asdict(self).items() if k != "details"}
        return {**self.details, **common, "user": self.os_user}
