"""A search's probe intake: where its probe faces are, checked and counted one file at a time.

Probes are a faces table `facelake embed` wrote (told apart by its ``embedding`` column), checked
against the index's model and weights, or a manifest of photos that the search command has the
embed command embed into RESULTS/probe_faces/ (the embedding runs from the command; this module
claims that folder for one manifest and reads back what the embedding wrote). Nothing here holds
more than one part file. Tested in tests/test_search.py.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass

import pyarrow as pa
import pyarrow.compute as pc

from facelake import storage
from facelake.errors import ConfigError, FacelakeError, IndexVersionError
from facelake.faces.manifest import ManifestInfo
from facelake.faces.registry import get_model, weights_fingerprint
from facelake.schema import ERRORS_SCHEMA, carried_columns

FACES, MANIFEST = "faces", "manifest"


@dataclass(frozen=True)
class ProbeSource:
    """Where the probe faces are (part files of a faces table), the errors of their embedding, the
    carried column names, and counts. Nothing here grows with the number of probes."""

    kind: str                          # FACES | MANIFEST
    files: list[str]
    errors: list[str]
    carried: list[str]
    sha256: str                        # of the faces table's files, or the manifest's fingerprint
    images: int
    faces: int


def parquet_schema(uri: str, options: storage.StorageOptions | None) -> pa.Schema:
    """The Arrow schema of the first Parquet file at ``uri`` (a file or a folder of parts)."""
    files = storage.list_files(uri, ".parquet", options)
    if not files:
        raise FileNotFoundError(f"no Parquet files at {storage.redact(uri)}")
    with storage.open_parquet(files[0], options) as parquet:
        return parquet.schema_arrow


def probes_kind(uri: str, options: storage.StorageOptions | None) -> str:
    """FACES for a faces table (it has an ``embedding`` column), else MANIFEST."""
    try:
        schema = parquet_schema(uri, options)
    except FileNotFoundError as err:
        raise ConfigError(f"no probes at {storage.redact(uri)}: give a Parquet manifest of images "
                          f"(image_id, uri) or a faces table `facelake embed` wrote") from err
    return FACES if "embedding" in schema.names else MANIFEST


def faces_probes(uri: str, options: storage.StorageOptions | None, model: str, index_version: str) -> ProbeSource:
    """A faces table of probes, checked file by file against ``model`` and its weights."""
    files = storage.list_files(uri, ".parquet", options)
    schema = parquet_schema(uri, options)
    missing = [c for c in ("image_id", "face_index", "bbox", "embedding", "model") if c not in schema.names]
    if missing:
        raise ConfigError(f"probe faces table {storage.redact(uri)} lacks column(s) {missing}: pass "
                          f"a manifest of images or the faces table `facelake embed` wrote")
    if schema.field("embedding").type != pa.list_(pa.float32(), get_model(model).dim):
        raise ConfigError(f"probe faces' embedding column is {schema.field('embedding').type}, not "
                          f"{get_model(model).dim} float32 values of model {model}")
    digest = hashlib.sha256()
    faces = images = 0
    for part in files:
        digest.update(_file_sha256(part, options).encode())
        table = storage.read_file(part, [c for c in ("image_id", "model", "weights_sha256") if c in schema.names],
                                  options)
        _check_embedded_with(table, model, index_version)
        faces += table.num_rows
        images += pc.count_distinct(table["image_id"]).as_py()
    if not faces:
        raise ConfigError(f"probe faces table {storage.redact(uri)} is empty: nothing to search")
    return ProbeSource(kind=FACES, files=files, errors=[], carried=carried_columns(schema),
                       sha256=digest.hexdigest(), images=images, faces=faces)


def _check_embedded_with(table: pa.Table, model: str, index_version: str) -> None:
    """Probe faces of another model or other weights than the index's are refused."""
    models = pc.unique(table["model"]).to_pylist()
    if models and models != [model]:
        raise IndexVersionError(f"probe faces were embedded with model(s) {models} but index version "
                                f"{index_version} holds {model!r} faces: pass the probe images' manifest "
                                f"instead (they are then embedded with {model!r}) or rebuild the index")
    if "weights_sha256" in table.column_names:
        wanted = weights_fingerprint(get_model(model))
        other = [w for w in pc.unique(table["weights_sha256"]).to_pylist() if w != wanted]
        if other:
            raise IndexVersionError(f"probe faces were embedded with other {model} weights ({other[0][:12]}...): "
                                    f"re-embed them or pass the probe images' manifest")


def _file_sha256(uri: str, options: storage.StorageOptions | None) -> str:
    fs, path = storage.filesystem(uri, options)
    digest = hashlib.sha256()
    with fs.open(path, "rb") as handle:
        while chunk := handle.read(8 << 20):
            digest.update(chunk)
    return digest.hexdigest()


def claim_probe_folder(work: str, fingerprint: str, options: storage.StorageOptions | None) -> None:
    """RESULTS/probe_faces/ holds the embedding of one probe manifest only: a rerun into the same
    --out resumes it; another manifest is refused rather than mixed in."""
    marker = storage.join(work, "_probes.json")
    try:
        claimed = json.loads(storage.read_bytes(marker, options)).get("sha256")
    except FileNotFoundError:
        storage.write_bytes_atomic(marker, json.dumps({"sha256": fingerprint}).encode(), options)
        return
    if claimed != fingerprint:
        raise ConfigError(f"{storage.redact(work)} holds the embedded faces of another probe manifest: give this "
                          f"search a new --out")


def embedded_probes(work: str, faces_folder: str, errors_folder: str, info: ManifestInfo,
                    options: storage.StorageOptions | None) -> ProbeSource:
    """The probe faces the embed job wrote under ``work`` for the manifest ``info`` describes;
    every probe image must be in its faces or its errors table."""
    files = storage.list_files(faces_folder, ".parquet", options)
    errors = storage.list_files(errors_folder, ".parquet", options)
    faces = images_with_faces = 0
    for uri in files:   # an image's faces are in one part: distinct counts add up
        table = storage.read_file(uri, ["image_id"], options)
        faces += table.num_rows
        images_with_faces += pc.count_distinct(table["image_id"]).as_py()
    error_rows = sum(_rows_of(uri, options) for uri in errors)
    if images_with_faces + error_rows != info.rows:
        raise FacelakeError(f"the embed job left {info.rows - images_with_faces - error_rows} probe image(s) in "
                            f"neither its faces nor its errors table under {storage.redact(work)}: rerun the "
                            f"search with a new --out")
    return ProbeSource(kind=MANIFEST, files=files, errors=errors, carried=list(info.carried),
                       sha256=info.fingerprint, images=info.rows, faces=faces)


def _rows_of(uri: str, options: storage.StorageOptions | None) -> int:
    with storage.open_parquet(uri, options) as parquet:
        return parquet.metadata.num_rows


def copy_errors(files: list[str], folder: str, job_id: str, options: storage.StorageOptions | None) -> int:
    """Copy the probe images without a usable face into ``folder``, stamped with the job id, one
    part file at a time; the number of rows copied."""
    copied = 0
    for number, uri in enumerate(files):
        errors = storage.read_file(uri, None, options)
        if not errors.num_rows:
            continue
        carried = [c for c in errors.column_names if c not in ERRORS_SCHEMA.names]
        table = errors.select(ERRORS_SCHEMA.names + carried).cast(
            pa.schema(list(ERRORS_SCHEMA) + [errors.schema.field(c) for c in carried]))
        table = table.add_column(0, "job_id", pa.array([job_id] * table.num_rows, pa.string()))
        storage.write_table(storage.join(folder, f"part-{job_id}-{number:05d}.parquet"), table, options)
        copied += table.num_rows
    return copied
