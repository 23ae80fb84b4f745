"""The one source of truth for where an index version lives and how it is published.

    ROOT/index/<version>/shard-00000.faiss        serialized faiss index (CPU format)
    ROOT/index/<version>/shard-00000.ids.arrow    faiss_id -> image_id, face_index, bbox, uri,
                                                  carried columns (Arrow IPC: memory-mapped)
    ROOT/index/<version>/shard-00000.vectors.npy  full float32 vectors in id-table order, only
                                                  for compressed (PQ) shards: exact re-ranking
    ROOT/index/<version>/trained.faiss            the empty trained index (reusable quantizer)
    ROOT/index/<version>/manifest.json            parameters, counts, sha256 of every file
    ROOT/index/CURRENT                            {"version": ..., "manifest_sha256": ..., "seq": n}
    ROOT/index/PUBLISHED.<seq>.json               publish log: one entry per publish, never rewritten

A version is complete once its manifest exists; it is live once CURRENT names it. Both are
written last, each with one atomic write, so readers never see a half-written version and a
crashed build leaves the previous version live. Version names sort by creation time.
"""

from __future__ import annotations

import datetime as dt
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
PUBLISHED = "PUBLISHED"   # ROOT/index/PUBLISHED.<seq>.json: the publish log
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


sha256 = storage.sha256   # checksums of a version's files (one definition, in facelake.storage)

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


def _published(root: str, options: StorageOptions | None) -> dict[int, str]:
    """{seq: uri} of the publish log ROOT/index/PUBLISHED.<seq>.json (one entry per publish)."""
    fs, path = storage.filesystem(index_root(root), options)
    fs.invalidate_cache()
    if not fs.exists(path):
        return {}
    entries = {}
    for entry in fs.ls(path, detail=True):
        name = entry["name"].rstrip("/").rsplit("/", 1)[-1]
        if entry["type"] == "file" and name.startswith(PUBLISHED + ".") and name.endswith(".json"):
            try:
                entries[int(name[len(PUBLISHED) + 1:-len(".json")])] = storage.join(index_root(root), name)
            except ValueError:
                continue
    return entries


def publish(root: str, version: str, manifest_sha256: str, options: StorageOptions | None = None) -> None:
    """Make ``version`` live: one atomic write of ROOT/index/CURRENT, the last step of a build.

    Publishing is numbered: CURRENT carries ``seq`` (one more than every publish before), then
    the entry PUBLISHED.<seq>.json is created, never rewritten. ``read_pointer`` refuses a
    CURRENT older than the newest entry (rolled back) or lacking ``manifest_sha256``.
    """
    if not manifest_sha256:
        raise ConfigError("publish needs the manifest's sha256 (write_manifest returns it)")
    entries = _published(root, options)
    try:
        before = read_pointer(root, options)
    except IndexVersionError:
        before = None  # a refused CURRENT is replaced by a valid, newer one
    seq = max([0, *entries, (before or {}).get("seq") or 0]) + 1
    now = dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")
    body = json.dumps({"version": version, "manifest_sha256": manifest_sha256, "published_at": now,
                       "seq": seq}).encode()
    storage.write_bytes_atomic(storage.join(index_root(root), POINTER), body, options)
    storage.write_bytes_new(storage.join(index_root(root), f"{PUBLISHED}.{seq:010d}.json"), body, options)


def read_pointer(root: str, options: StorageOptions | None = None) -> dict | None:
    """CURRENT's content, or None when nothing was ever published (or the index was withdrawn).

    Refused (IndexVersionError) when it is not JSON, lacks ``manifest_sha256`` or ``seq``, or is
    older than the newest entry of the publish log (CURRENT was rolled back by hand).
    """
    for attempt in range(3):  # a publish landing between the two reads below is not a rollback
        try:
            return _checked_pointer(root, options)
        except _RolledBack as err:
            if attempt == 2:
                raise IndexVersionError(str(err)) from None
            time.sleep(0.05)
    return None


class _RolledBack(Exception):
    pass


def _checked_pointer(root: str, options: StorageOptions | None) -> dict | None:
    uri = storage.join(index_root(root), POINTER)
    fix = "publish a new version with `facelake index` or `facelake rebuild` (CURRENT is only written by publishing)"
    try:
        pointer = json.loads(storage.read_bytes(uri, options))
    except FileNotFoundError:
        return None
    except ValueError as err:
        raise IndexVersionError(f"{storage.redact(uri)} is not valid JSON: {fix}") from err
    if not isinstance(pointer, dict) or not pointer.get("version") or not pointer.get("manifest_sha256") \
            or not isinstance(pointer.get("seq"), int):
        raise IndexVersionError(f"{storage.redact(uri)} lacks its version, manifest_sha256 or publish number "
                                f"(written by hand or by an older facelake): {fix}")
    entries = _published(root, options)
    newest = max(entries, default=0)
    if pointer["seq"] < newest:
        raise _RolledBack(f"{storage.redact(uri)} names {pointer['version']} (publish {pointer['seq']}) but "
                                f"publish {newest} came later: CURRENT was rolled back; {fix}")
    if pointer["seq"] in entries:
        try:
            logged = json.loads(storage.read_bytes(entries[pointer["seq"]], options))
        except ValueError:  # being written right now
            logged = pointer
        if (logged.get("version"), logged.get("manifest_sha256")) != (pointer["version"], pointer["manifest_sha256"]):
            raise IndexVersionError(f"{storage.redact(uri)} differs from publish {pointer['seq']} of the publish log "
                                    f"(it was edited): {fix}")
    return pointer


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
