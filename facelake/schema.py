"""The one definition of every table and record format facelake reads or writes.

Data flows one way: manifest -> faces (+ errors, dropped) -> index version -> results (+ errors).
Here: the tables' schemas (faces, errors, dropped, embed counts, results and their metadata, id
tables, the erasure list), embed output fingerprints, the index version manifest's keys, and
the typed audit record with its one status.
"""

from __future__ import annotations

import hashlib
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
    ("stage", pa.string()),        # validate | fetch | decode | detect | quality | embed (STAGE_*)
    ("error_type", pa.string()),   # e.g. OutsideRoots, TooManyBytes, DecodeError, NoFace, NoUsableFace
    ("message", pa.string()),
    ("content_sha256", pa.string()),
    ("model", pa.string()),
])

# ---- source stat of record (nightly rebuild at O(change)) ----
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


# Search results: every result file's Parquet schema metadata holds, under this key, a JSON object
# with these fields (facelake.results writes it, facelake.review reads it).
RESULT_METADATA_KEY = b"facelake.search"
RESULT_METADATA_FIELDS = ("job_id", "mode", "index_version", "model", "gallery_size", "threshold",
                          "threshold_how", "calibration")


def result_schema(probe_carried: pa.Schema, gallery_carried: pa.Schema, metadata: bytes) -> pa.Schema:
    """Schema of a results part file: RESULT_COLUMNS, then ``probe_<name>`` for each probe column
    carried through and ``gallery_<name>`` for each id-table column beyond ID_TABLE_SCHEMA;
    ``metadata`` (JSON of RESULT_METADATA_FIELDS) under RESULT_METADATA_KEY."""
    fields = list(RESULT_COLUMNS)
    fields += [pa.field(f"probe_{f.name}", f.type) for f in probe_carried]
    fields += [pa.field(f"gallery_{f.name}", f.type) for f in gallery_carried]
    return pa.schema(fields, metadata={RESULT_METADATA_KEY: metadata})

# The erasure list of record (ROOT/erasures/<seq>.parquet, facelake.record.erasures): one row per erased id.
ERASURE_SCHEMA = pa.schema([
    ("image_id", pa.string()), ("reason", pa.string()), ("user", pa.string()), ("claimed_user", pa.string()),
    ("erased_at", pa.string()), ("job_id", pa.string()),
    ("faces", pa.int64()), ("error_rows", pa.int64()),   # what the root held of the id when it was erased
])

# Embed: faces below the quality floor (OUT/dropped/), with the reason.
DROPPED_SCHEMA = pa.schema([
    ("image_id", pa.string()), ("bbox", BBOX), ("det_score", pa.float32()),
    ("reason", pa.string()), ("model", pa.string()),
])

# What an embed actor call returns to the driver: counts only, never face rows or embeddings.
EMBED_COUNTS_SCHEMA = pa.schema([
    ("images", pa.int64()), ("images_with_faces", pa.int64()), ("faces", pa.int64()),
    ("errors", pa.int64()), ("dropped", pa.int64()),
    ("error_types", pa.string()),  # JSON object: error type -> rows
    ("parts", pa.int64()),         # part files written by the call
])


def embed_outcome_schema(dim: int, carried: pa.Schema) -> pa.Schema:
    """Inside an embed actor: face, error and dropped rows of a batch together, told apart by _kind."""
    faces = faces_schema(dim)
    fields = [pa.field("_kind", pa.string())]
    fields += [faces.field(n) for n in ("image_id", "face_index", "uri", "bbox", "landmarks",
                                        "det_score", "embedding", "content_sha256")]
    fields += [pa.field("stage", pa.string()), pa.field("error_type", pa.string()),
               pa.field("message", pa.string())]
    return pa.schema(fields + list(carried))


def with_carried(schema: pa.Schema, carried: pa.Schema) -> pa.Schema:
    """``schema`` followed by the manifest's carried columns it does not already have."""
    return pa.schema(list(schema) + [f for f in carried if f.name not in schema.names])


def id_table_schema(faces: pa.Schema) -> pa.Schema:
    """The id table schema of a version built from faces of schema ``faces``."""
    extra = [f for f in faces if f.name not in ID_TABLE_SCHEMA.names and f.name not in ID_TABLE_DROPPED]
    return pa.schema(list(ID_TABLE_SCHEMA) + extra)


def carried_columns(schema: pa.Schema, own: tuple[str, ...] = FACE_COLUMNS) -> list[str]:
    """Manifest columns that are not facelake's own and are carried through."""
    return [name for name in schema.names if name not in own]


# ------------------------------------------------------------------------------ index version manifest

# ROOT/index/<version>/manifest.json (facelake.index.build writes it, facelake.index.load reads it).
INDEX_FORMAT = 2   # 2: id tables as memory-mappable Arrow IPC files, tuned nprobe
# What a reader needs; a manifest without them is refused as malformed.
INDEX_MANIFEST_REQUIRED = ("version", "model", "dim", "metric", "nlist", "nprobe", "shards", "total", "files")
# Every key a version manifest of INDEX_FORMAT holds (besides "format").
INDEX_MANIFEST_KEYS = INDEX_MANIFEST_REQUIRED + (
    "weights_sha256", "factory", "pq", "rerank", "nprobe_how", "tuning", "train_size", "columns",
    "erased_faces", "source", "created_at", "facelake_version", "faiss_version", "trained_from",
    "erased_ids_count", "erased_ids_sha256", "build", "next_id")
# Keys only some versions hold: "incremental" in a version extended from the live one
# (facelake.index.update: which shards it kept and which it built).
INDEX_MANIFEST_OPTIONAL = ("incremental",)


def index_manifest(values: dict) -> dict:
    """A version manifest of INDEX_FORMAT from ``values``, which must hold every INDEX_MANIFEST_KEYS
    key and nothing beyond them and INDEX_MANIFEST_OPTIONAL."""
    missing = [k for k in INDEX_MANIFEST_KEYS if k not in values]
    unknown = sorted(set(values) - set(INDEX_MANIFEST_KEYS) - set(INDEX_MANIFEST_OPTIONAL))
    if missing or unknown:
        raise ValueError(f"index manifest: missing {missing}, unknown {unknown} (facelake.schema.INDEX_MANIFEST_KEYS)")
    return {"format": INDEX_FORMAT, **values}


def index_manifest_problems(manifest: dict, version: str) -> list[str]:
    """What makes a stored version manifest unreadable by this facelake ([] when nothing)."""
    problems = []
    if int(manifest.get("format", 1)) < INDEX_FORMAT:
        problems.append(f"old layout format {manifest.get('format', 1)} (id tables in Parquet)")
    missing = [k for k in INDEX_MANIFEST_REQUIRED if k not in manifest]
    if missing:
        problems.append(f"missing {missing}")
    elif manifest["version"] != version:
        problems.append(f"names version {manifest['version']!r}")
    return problems


# ------------------------------------------------------------------------------ audit records

AUDIT_FORMAT = 1
# The one status field every job's records carry: "started" is written before any result,
# then exactly one of the others when the job ends (none when it was killed outright).
AUDIT_STATUSES = ("started", "succeeded", "failed", "interrupted", "skipped")   # skipped: nothing to do


@dataclass(frozen=True)
class AuditRecord:
    """One record of ROOT/audit/ (facelake.record.audit): common fields typed, job-specific ones in ``details``.

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


# ------------------------------------------------------------------------------ output fingerprints

FINGERPRINT_FORMAT = 1


@dataclass(frozen=True)
class OutputFingerprint:
    """What produced an embed output folder (OUT/_fingerprint.json, written before its first part).

    Every option that changes which rows an image gets, or their values: the model, its detector
    and weights, the quality floor, and the read limits (an image refused by one run's limits is
    an error row another run would have embedded). Options that only change speed or file layout
    (workers, batch size, chunk and part sizes, the recognizer runtime within its tolerance) are
    not part of it. A rerun into the same folder must carry an equal fingerprint.
    """

    model: str
    detector: str
    weights_sha256: str
    dim: int
    min_face: int
    min_score: float
    max_pixels: int
    max_bytes: int
    allowed_roots: tuple[str, ...]
    format: int = FINGERPRINT_FORMAT

    def to_json(self) -> bytes:
        return json.dumps(asdict(self), indent=2, sort_keys=True).encode()

    @property
    def digest(self) -> str:
        """sha256 of the canonical JSON: a short key for the whole fingerprint."""
        return hashlib.sha256(self.to_json()).hexdigest()

    @classmethod
    def from_json(cls, data: bytes) -> "OutputFingerprint":
        """Parse a stored fingerprint; raises ValueError naming what is wrong."""
        raw = json.loads(data)
        names = {f.name for f in fields(cls)}
        if not isinstance(raw, dict) or set(raw) != names:
            raise ValueError(f"not an output fingerprint (keys {sorted(raw) if isinstance(raw, dict) else raw!r}, "
                             f"expected {sorted(names)})")
        return cls(**{**raw, "allowed_roots": tuple(raw["allowed_roots"])})

    def differences(self, other: "OutputFingerprint") -> list[str]:
        """'name: mine vs other' for every field that differs."""
        mine, theirs = asdict(self), asdict(other)
        return [f"{k}: {mine[k]!r} vs {theirs[k]!r}" for k in mine if mine[k] != theirs[k]]
