"""Open a published index version and load its shards, checking everything before use.

Every file's bytes are checked against the manifest's sha256 before faiss or Parquet reads
them, and the manifest against CURRENT's checksum; faiss files are deserialized with faiss's
own reader (nothing is ever unpickled).
"""

from __future__ import annotations

import hashlib
import os
import tempfile
from dataclasses import dataclass

import faiss
import numpy as np
import pyarrow as pa

from facelake import storage
from facelake.errors import IndexVersionError
from facelake.index import layout
from facelake.schema import index_manifest_problems
from facelake.storage import StorageOptions

HASH_CHUNK = 8 << 20


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

    @property
    def rerank(self) -> int:
        return int(self.manifest.get("rerank") or 0)

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
    problems = index_manifest_problems(manifest, version)
    if problems:
        raise IndexVersionError(f"index version {version} cannot be read by this facelake ({'; '.join(problems)}): "
                                f"publish a new version with `facelake index` or `facelake rebuild --full`")
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


def verified_local_path(handle: VersionHandle, name: str, cache_dir: str | None = None) -> str:
    """A local path to one file of the version, checked against the manifest's sha256 while it
    streams (never whole in memory): the file itself for local roots, else a copy downloaded
    into ``cache_dir`` (a temporary folder by default). Memory-mapped files are read from it."""
    entry = handle.manifest["files"].get(name)
    if entry is None:
        raise IndexVersionError(f"{name} is not listed in the manifest of index version {handle.version}")
    uri = handle.uri(name)
    fs, path = storage.filesystem(uri, handle.options)
    digest = hashlib.sha256()
    local = path if storage.scheme_of(uri) == "file" else None
    try:
        with fs.open(path, "rb") as src:
            sink = None
            if local is None:
                folder = os.path.join(_download_dir(cache_dir), handle.version)
                os.makedirs(folder, exist_ok=True)
                local = os.path.join(folder, name)
                sink = open(local, "wb")
            try:
                while chunk := src.read(HASH_CHUNK):
                    digest.update(chunk)
                    if sink:
                        sink.write(chunk)
            finally:
                if sink:
                    sink.close()
    except FileNotFoundError as err:
        raise IndexVersionError(f"{storage.redact(uri)} is missing from index version {handle.version}: "
                                f"restore it or rebuild with `facelake index`") from err
    if digest.hexdigest() != entry["sha256"]:
        raise IndexVersionError(
            f"{storage.redact(uri)} is corrupt: sha256 {digest.hexdigest()[:12]}... but the manifest says "
            f"{entry['sha256'][:12]}...; restore the file or rebuild with `facelake index`")
    return local


def _download_dir(cache_dir: str | None) -> str:
    """Where shard files of an object-store root are copied to be memory-mapped: ``cache_dir``,
    or one temporary folder per process."""
    global _DOWNLOADS
    if cache_dir:
        return cache_dir
    if _DOWNLOADS is None:
        _DOWNLOADS = tempfile.mkdtemp(prefix="facelake-shards-")
    return _DOWNLOADS


_DOWNLOADS: str | None = None


def read_id_table(path: str) -> pa.Table:
    """An id table file (Arrow IPC) memory-mapped: its pages are read only when rows are taken."""
    return pa.ipc.open_file(pa.memory_map(path, "r")).read_all()


@dataclass
class LoadedShard:
    """One shard ready to search: faiss index in RAM, id table and full vectors memory-mapped."""

    index: faiss.Index
    ids: pa.Table
    faiss_ids: np.ndarray
    vectors: np.ndarray | None
    rerank: int


def open_shard(handle: VersionHandle, shard_no: int, cache_dir: str | None = None) -> LoadedShard:
    """Load one shard, every file checksum-verified before it is parsed or mapped."""
    if not 0 <= shard_no < handle.shard_count:
        raise IndexVersionError(f"index version {handle.version} has shards 0..{handle.shard_count - 1}, "
                                f"not {shard_no}")
    entry = handle.manifest["shards"][shard_no]
    index = _deserialize(read_verified(handle, entry["index_file"]), handle.uri(entry["index_file"]))
    ids = read_id_table(verified_local_path(handle, entry["ids_file"], cache_dir))
    if index.ntotal != entry["count"] or ids.num_rows != entry["count"] or index.d != handle.dim:
        raise IndexVersionError(f"shard {shard_no} of index version {handle.version} holds {index.ntotal} "
                                f"vectors and {ids.num_rows} ids, the manifest says {entry['count']}: rebuild")
    vectors = None
    if handle.rerank:
        vectors = np.load(verified_local_path(handle, entry["vectors_file"], cache_dir), mmap_mode="r")
        if vectors.shape != (entry["count"], handle.dim):
            raise IndexVersionError(f"shard {shard_no} of index version {handle.version}: vectors file holds "
                                    f"{vectors.shape}, expected ({entry['count']}, {handle.dim}): rebuild")
    if storage.scheme_of(handle.root) != "file" and cache_dir is None:
        _unlink_downloads(handle, entry)     # mapped pages stay readable; no copy is left behind
    faiss_ids = ids.column("faiss_id").to_numpy()
    return LoadedShard(index=index, ids=ids, faiss_ids=faiss_ids, vectors=vectors, rerank=handle.rerank)


def _unlink_downloads(handle: VersionHandle, entry: dict) -> None:
    for key in ("ids_file", "vectors_file"):
        if key in entry:
            path = os.path.join(_download_dir(None), handle.version, entry[key])
            if os.path.exists(path):
                os.remove(path)


def load_shard(handle: VersionHandle, shard_no: int) -> tuple[faiss.Index, pa.Table]:
    """(faiss index, id table) of one shard, both checksum-verified before parsing."""
    shard = open_shard(handle, shard_no)
    return shard.index, shard.ids


def shard_ids(handle: VersionHandle, shard_no: int) -> pa.Table:
    """One shard's id table, checksum-verified: memory-mapped for a local root, read into memory
    (one shard) for an object store, leaving no copy behind."""
    name = handle.manifest["shards"][shard_no]["ids_file"]
    if storage.scheme_of(handle.root) == "file":
        return read_id_table(verified_local_path(handle, name))
    return pa.ipc.open_file(pa.py_buffer(read_verified(handle, name))).read_all()


def load_ids(handle: VersionHandle, columns: list[str] | None = None) -> pa.Table:
    """All shards' id tables in faiss id order (small versions, tests and notebooks: this reads
    every row; jobs read one shard at a time)."""
    tables = [shard_ids(handle, s) for s in range(handle.shard_count)]
    table = pa.concat_tables(tables, promote_options="permissive")
    return table.select(columns) if columns else table
