"""Open a published index version and load its shards, checking everything before use.

Every file's bytes are checked against the manifest's sha256 before faiss or Parquet reads
them, and the manifest against CURRENT's checksum; faiss files are deserialized with faiss's
own reader (nothing is ever unpickled).
"""

from __future__ import annotations

import io
from dataclasses import dataclass

import faiss
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from facelake import storage
from facelake.errors import IndexVersionError
from facelake.index import layout
from facelake.schema import ID_TABLE_SCHEMA
from facelake.storage import StorageOptions

MANIFEST_KEYS = ("version", "model", "dim", "metric", "nlist", "nprobe", "shards", "total", "files")


@dataclass(frozen=True)
class VersionHandle:
    """A checked manifest and where its files live; cheap to pass to Ray actors."""

    root: str
    version: str
    manifest: dict
    options: StorageOptions | None = None

    @property
    def model(self) -> str:
        return self.manifest["model"]

    @property
    def dim(self) -> int:
        return int(self.manifest["dim"])

    @property
    def nlist(self) -> int:
        return int(self.manifest["nlist"])

    @property
    def nprobe(self) -> int:
        return int(self.manifest["nprobe"])

    @property
    def shard_count(self) -> int:
        return len(self.manifest["shards"])

    @property
    def total(self) -> int:
        return int(self.manifest["total"])

    def uri(self, name: str) -> str:
        return layout.file_uri(self.root, self.version, name)


def open_version(root: str, version: str | None = None, *, expect_model: str | None = None,
                 expect_dim: int | None = None, options: StorageOptions | None = None) -> VersionHandle:
    """Open ``version`` (the live one by default), refusing another model or dimension."""
    storage.check_uri(root)
    expect_sha = None
    if version is None:
        pointer = layout.read_pointer(root, options)
        if pointer is None:
            raise IndexVersionError(f"no index is published under {storage.redact(root)}: build one with "
                                    f"`facelake index FACES --root {storage.redact(root)}`")
        version, expect_sha = pointer["version"], pointer.get("manifest_sha256")
    manifest = layout.read_manifest(root, version, options, expect_sha256=expect_sha)
    missing = [key for key in MANIFEST_KEYS if key not in manifest]
    if missing or manifest["version"] != version:
        raise IndexVersionError(f"manifest of index version {version} is malformed (missing {missing}): "
                                f"rebuild with `facelake index`")
    if expect_model is not None and manifest["model"] != expect_model:
        raise IndexVersionError(
            f"index version {version} was built with model {manifest['model']!r} but the probes use "
            f"{expect_model!r}: search with --model {manifest['model']} or rebuild the index with "
            f"faces embedded by {expect_model!r}")
    if expect_dim is not None and int(manifest["dim"]) != expect_dim:
        raise IndexVersionError(f"index version {version} holds {manifest['dim']}-d vectors but the probes "
                                f"are {expect_dim}-d: embed probes with model {manifest['model']!r}")
    return VersionHandle(root=root, version=version, manifest=manifest, options=options)


def read_verified(handle: VersionHandle, name: str) -> bytes:
    """One file of the version, refused unless its sha256 matches the manifest."""
    entry = handle.manifest["files"].get(name)
    if entry is None:
        raise IndexVersionError(f"{name} is not listed in the manifest of index version {handle.version}")
    uri = handle.uri(name)
    try:
        data = storage.read_bytes(uri, handle.options)
    except FileNotFoundError as err:
        raise IndexVersionError(f"{storage.redact(uri)} is missing from index version {handle.version}: "
                                f"restore it or rebuild with `facelake index`") from err
    got = layout.sha256(data)
    if got != entry["sha256"]:
        raise IndexVersionError(
            f"{storage.redact(uri)} is corrupt: sha256 {got[:12]}... but the manifest says "
            f"{entry['sha256'][:12]}...; restore the file or rebuild with `facelake index`")
    return data


def _deserialize(data: bytes, what: str) -> faiss.Index:
    try:
        return faiss.deserialize_index(np.frombuffer(data, dtype=np.uint8))
    except RuntimeError as err:
        raise IndexVersionError(f"faiss cannot read {what} (built by a newer faiss?): {err}; "
                                f"rebuild with `facelake index`") from err


def load_trained(handle: VersionHandle) -> faiss.Index:
    """The empty trained index of the version (the quantizer a rebuild can reuse)."""
    return _deserialize(read_verified(handle, layout.TRAINED), handle.uri(layout.TRAINED))


def load_shard(handle: VersionHandle, shard_no: int) -> tuple[faiss.Index, pa.Table]:
    """(faiss index, id table) of one shard, both checksum-verified before parsing."""
    if not 0 <= shard_no < handle.shard_count:
        raise IndexVersionError(f"index version {handle.version} has shards 0..{handle.shard_count - 1}, "
                                f"not {shard_no}")
    entry = handle.manifest["shards"][shard_no]
    index = _deserialize(read_verified(handle, entry["index_file"]), handle.uri(entry["index_file"]))
    ids = pq.read_table(io.BytesIO(read_verified(handle, entry["ids_file"])))
    if index.ntotal != entry["count"] or ids.num_rows != entry["count"] or index.d != handle.dim:
        raise IndexVersionError(f"shard {shard_no} of index version {handle.version} holds {index.ntotal} "
                                f"vectors and {ids.num_rows} ids, the manifest says {entry['count']}: rebuild")
    return index, ids.cast(ID_TABLE_SCHEMA)


def load_ids(handle: VersionHandle) -> pa.Table:
    """All shards' id tables in faiss id order: row i describes faiss id i."""
    tables = [pq.read_table(io.BytesIO(read_verified(handle, s["ids_file"]))) for s in handle.manifest["shards"]]
    return pa.concat_tables(tables).cast(ID_TABLE_SCHEMA)
