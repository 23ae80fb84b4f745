"""The one source of truth for where an index version lives and how it is published.

    ROOT/index/<version>/shard-00000.faiss        serialized faiss index (CPU format)
    ROOT/index/<version>/shard-00000.ids.arrow    faiss_id -> image_id, face_index, bbox, uri,
                                                  carried columns (Arrow IPC: memory-mapped)
    ROOT/index/<version>/shard-00000.vectors.npy  full float32 vectors in id-table order, only
                                                  for compressed (PQ) shards: exact re-ranking
    ROOT/index/<version>/trained.faiss            the empty trained index (reusable quantizer)
    ROOT/index/<version>/manifest.json            parameters, counts, sha256 of every file
    ROOT/index/CURRENT                            {"version": ..., "manifest_sha256": ...}

A version is complete once its manifest exists; it is live once CURRENT names it. Both are
written last, each with one atomic write, so readers never see a half-written version and a
crashed build leaves the previous version live. Version names sort by creation time.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import json
import logging
import secrets
import time

from facelake import storage
from facelake.errors import ConfigError, IndexVersionError
from facelake.storage import StorageOptions

log = logging.getLogger(__name__)

INDEX_DIR = "index"
POINTER = "CURRENT"
MANIFEST = "manifest.json"
TRAINED = "trained.faiss"
VERSION_FORMAT = "%Y%m%dT%H%M%S"


def index_root(root: str) -> str:
    return storage.join(root, INDEX_DIR)


def version_uri(root: str, version: str) -> str:
    return storage.join(index_root(root), version)


def file_uri(root: str, version: str, name: str) -> str:
    return storage.join(version_uri(root, version), name)


def shard_files(shard_no: int) -> tuple[str, str, str]:
    """(index file, id table file, full-vector file) names of one shard."""
    stem = f"shard-{shard_no:05d}"
    return f"{stem}.faiss", f"{stem}.ids.arrow", f"{stem}.vectors.npy"


def new_version_name(root: str | None = None, options: StorageOptions | None = None) -> str:
    """Sortable, unique version name, e.g. 20261125T120000.123Z-1a2b3c.

    With ``root``, the name is also made to sort after every folder already there, so "newest"
    means "built last" even when clocks or quick rebuilds land in the same millisecond.
    """
    latest = max(_children(root, options), default="") if root is not None else ""
    for _ in range(500):  # a folder named far in the future is not waited for beyond ~1 s
        now = dt.datetime.now(dt.timezone.utc)
        name = f"{now.strftime(VERSION_FORMAT)}.{now.microsecond // 1000:03d}Z-{secrets.token_hex(3)}"
        if name > latest:
            break
        time.sleep(0.002)
    return name


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def write_manifest(root: str, version: str, manifest: dict, options: StorageOptions | None = None) -> str:
    """Write manifest.json (the version is then complete); return its sha256."""
    data = json.dumps(manifest, indent=2, sort_keys=True).encode()
    storage.write_bytes_atomic(file_uri(root, version, MANIFEST), data, options)
    return sha256(data)


def read_manifest(root: str, version: str, options: StorageOptions | None = None,
                  expect_sha256: str | None = None) -> dict:
    uri = file_uri(root, version, MANIFEST)
    try:
        data = storage.read_bytes(uri, options)
    except FileNotFoundError as err:
        known = ", ".join(list_versions(root, options)[-5:]) or "none"
        raise IndexVersionError(f"index version {version!r} has no manifest at {storage.redact(uri)} "
                                f"(missing or never finished); complete versions: {known}") from err
    if expect_sha256 and sha256(data) != expect_sha256:
        raise IndexVersionError(f"{storage.redact(uri)} does not match the checksum in {POINTER}: the "
                                f"manifest was changed after publishing; rebuild with `facelake index`")
    try:
        return json.loads(data)
    except ValueError as err:
        raise IndexVersionError(f"{storage.redact(uri)} is not valid JSON: rebuild the index") from err


def publish(root: str, version: str, manifest_sha256: str, options: StorageOptions | None = None) -> None:
    """Make ``version`` live: one atomic write of ROOT/index/CURRENT, the last step of a build."""
    now = dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")
    body = {"version": version, "manifest_sha256": manifest_sha256, "published_at": now}
    storage.write_bytes_atomic(storage.join(index_root(root), POINTER), json.dumps(body).encode(), options)


def read_pointer(root: str, options: StorageOptions | None = None) -> dict | None:
    """CURRENT's content, or None when nothing was ever published."""
    uri = storage.join(index_root(root), POINTER)
    try:
        return json.loads(storage.read_bytes(uri, options))
    except FileNotFoundError:
        return None
    except ValueError as err:
        raise IndexVersionError(f"{storage.redact(uri)} is not valid JSON: rewrite it naming a version "
                                f"from `list_versions` or rebuild with `facelake index`") from err


def current_version(root: str, options: StorageOptions | None = None) -> str | None:
    """The live version's name, or None when no index was published under ``root``."""
    pointer = read_pointer(root, options)
    return pointer["version"] if pointer else None


def _children(root: str, options: StorageOptions | None) -> list[str]:
    """Names of the folders directly under ROOT/index (sorted)."""
    fs, path = storage.filesystem(index_root(root), options)
    fs.invalidate_cache()  # other processes (Ray workers, other builds) write here too
    if not fs.exists(path):
        return []
    return sorted(entry["name"].rstrip("/").rsplit("/", 1)[-1]
                  for entry in fs.ls(path, detail=True) if entry["type"] == "directory")


def _has_manifest(root: str, version: str, options: StorageOptions | None) -> bool:
    return storage.exists(file_uri(root, version, MANIFEST), options)


def list_versions(root: str, options: StorageOptions | None = None) -> list[str]:
    """Complete versions (those with a manifest), oldest first."""
    return [v for v in _children(root, options) if _has_manifest(root, v, options)]


def prune(root: str, keep: int, options: StorageOptions | None = None) -> list[str]:
    """Remove all but the newest ``keep`` complete versions; return the removed names.

    The live version is never removed (it counts toward ``keep``). Folders without a manifest
    are removed only when older than the live version (crashed builds); newer ones may be a
    build in progress and are left alone.
    """
    if keep < 1:
        raise ConfigError(f"--keep must be at least 1 (the live version is always kept), got {keep}")
    live = current_version(root, options)
    complete = list_versions(root, options)
    kept = set(complete[-keep:]) | ({live} if live else set())
    doomed = [v for v in complete if v not in kept]
    if live:
        doomed += [v for v in _children(root, options) if v < live and v not in complete]
    for version in sorted(doomed):
        log.info("pruning index version %s", version)
        storage.remove(version_uri(root, version), recursive=True, options=options)
    return sorted(doomed)
