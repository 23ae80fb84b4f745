"""The one door every job reads a photo through: roots, file type, size and time checked first.

Order of checks, each refusal an exception whose ``stage`` names where it stopped:

1. resolve: the manifest's uri made absolute (relative paths against the manifest's folder),
   its scheme checked, symlinks and ``..`` resolved, and the result checked against the allowed
   roots (stage ``validate``; nothing is opened).
2. stat / HEAD: only regular files and objects (a FIFO, /dev/zero or a folder is refused without
   reading a byte), and the size from stat or HEAD checked against ``max_bytes`` (stage ``fetch``).
   Local files are opened first (non-blocking: a FIFO cannot hang the open), then what was
   opened is checked: its type and size from the descriptor, and the path the kernel opened
   (/proc/self/fd) against the allowed roots, so a file or folder swapped for a symlink between
   the check of step 1 and the open is still refused. S3 keys holding ``.`` or ``..`` segments
   are refused at step 1 (the store reads the literal key, the roots check would see another).
3. read: at most the stated size, in chunks, within ``timeout_s`` (stage ``fetch``).

The pixel limit is checked afterwards by ``facelake.faces.imaging`` when the bytes are decoded.
"""

from __future__ import annotations

import os
import stat
import time
from dataclasses import dataclass

from facelake import storage
from facelake.errors import ConfigError
from facelake.schema import STAGE_FETCH, STAGE_VALIDATE

# 128 MiB: above an uncompressed 40 Mpx RGB TIFF or any camera JPEG, far below a sparse or
# endless file that would fill an actor's memory.
DEFAULT_MAX_BYTES = 128 * 1024 * 1024
# A photo that takes more than a minute to arrive is stuck; storage.READ_TIMEOUT_S bounds each
# S3 socket read, this bounds the whole object.
DEFAULT_TIMEOUT_S = 60.0
CHUNK_BYTES = 1024 * 1024


class ReadRefused(Exception):
    """A photo was not read; ``stage`` says where it stopped (validate or fetch)."""

    stage = STAGE_FETCH


class OutsideRoots(ReadRefused, PermissionError):
    """The uri resolves outside every allowed root (never opened)."""

    stage = STAGE_VALIDATE


class UnsupportedUri(ReadRefused, ValueError):
    """The uri's scheme is not one facelake reads (never opened)."""

    stage = STAGE_VALIDATE


class NotARegularFile(ReadRefused):
    """A FIFO, device, socket, folder or /proc-style file: refused without reading."""


class TooManyBytes(ReadRefused):
    """The stat or HEAD size is over ``max_bytes`` (never read)."""


class ReadTimeout(ReadRefused, TimeoutError):
    """The object did not arrive within ``timeout_s``."""


@dataclass(frozen=True)
class ReadLimits:
    """What a job may read: under which roots, how large, how slowly. Safe to ship to workers."""

    allowed_roots: tuple[str, ...] = ()
    max_bytes: int = DEFAULT_MAX_BYTES
    timeout_s: float = DEFAULT_TIMEOUT_S

    def validate(self) -> "ReadLimits":
        """Check the limits (ConfigError naming the option); return self."""
        for root in self.allowed_roots:
            storage.check_uri(root)
            if not root.strip():
                raise ConfigError("--allow-root must not be empty: give a folder or s3://bucket/prefix")
        if self.max_bytes < 1:
            raise ConfigError(f"--max-bytes must be at least 1, got {self.max_bytes}")
        if self.timeout_s <= 0:
            raise ConfigError(f"the read timeout must be positive, got {self.timeout_s}")
        return self


def normal(uri: str) -> str:
    """A uri with ``..`` and (locally) symlinks resolved: what is compared with the roots."""
    if storage.scheme_of(uri) == "s3":
        _, rest = uri.split("://", 1)
        return "s3://" + os.path.normpath("/" + rest).lstrip("/")
    path = uri[len("file://"):] if uri.startswith("file://") else uri
    return os.path.realpath(path)


def within(uri: str, roots: tuple[str, ...]) -> bool:
    """True when ``uri`` (resolved) is one of ``roots`` or under one of them."""
    target = normal(uri)
    for root in roots:
        base = normal(root)
        if target == base or target.startswith(base.rstrip("/") + "/"):
            return True
    return False


def resolve(uri: str, base_dir: str, allowed_roots: tuple[str, ...] = ()) -> str:
    """Make a manifest uri absolute (relative to the manifest's folder) and check its roots."""
    scheme = storage.scheme_of(uri)
    if scheme not in storage.SUPPORTED_SCHEMES:
        raise UnsupportedUri(f"unsupported URI scheme {scheme!r}: use a local path, file:// or s3://")
    _refuse_dot_keys(uri)
    if scheme == "file" and not uri.startswith("file://") and not os.path.isabs(uri):
        uri = storage.join(base_dir, uri)
    if allowed_roots and not within(uri, allowed_roots):
        raise OutsideRoots(f"{storage.redact(uri)} is outside the allowed roots "
                           "(add its folder with --allow-root if it should be read)")
    return uri


def read(uri: str, limits: ReadLimits = ReadLimits(),
         options: storage.StorageOptions | None = None) -> bytes:
    """The bytes of one photo, read only after the roots, type and size checks pass."""
    if limits.allowed_roots and not within(uri, limits.allowed_roots):
        raise OutsideRoots(f"{storage.redact(uri)} is outside the allowed roots "
                           "(add its folder with --allow-root if it should be read)")
    deadline = time.monotonic() + limits.timeout_s
    if storage.scheme_of(uri) == "s3":
        _refuse_dot_keys(uri)
        return _read_object(uri, limits, options, deadline)
    return _read_local(normal(uri), uri, limits, deadline)


def _refuse_dot_keys(uri: str) -> None:
    """S3 keys are literal: ``a/../b`` names an object of its own, not ``b``."""
    if storage.scheme_of(uri) == "s3" and {".", ".."} & set(uri.split("://", 1)[1].split("/")):
        raise UnsupportedUri(f"{storage.redact(uri)} has a '.' or '..' segment: S3 reads such keys "
                             "literally; list the object's plain key")


def _opened_path(fd: int, path: str) -> str:
    """The path the kernel opened for ``fd`` (symlinks resolved at open time)."""
    try:
        return os.readlink(f"/proc/self/fd/{fd}")
    except OSError:  # no /proc (not Linux): the path resolved just before the open
        return path


def _under(path: str, roots: tuple[str, ...]) -> bool:
    """``path`` (already real) is one of ``roots`` (resolved) or under one."""
    return any(path == base or path.startswith(base.rstrip("/") + "/") for base in map(normal, roots))


def _too_big(uri: str, size: int, limits: ReadLimits) -> TooManyBytes:
    return TooManyBytes(f"{storage.redact(uri)} is {size:,} bytes, over the limit of {limits.max_bytes:,} "
                        "(raise --max-bytes if such photos are expected)")


def _read_local(path: str, uri: str, limits: ReadLimits, deadline: float) -> bytes:
    flags = os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_NOCTTY", 0)
    fd = os.open(path, flags)
    try:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode):
            raise NotARegularFile(f"{uri} is not a regular file ({_kind(info.st_mode)}); "
                                  "list only photo files in the manifest")
        opened = _opened_path(fd, path)
        if limits.allowed_roots and not _under(opened, limits.allowed_roots):
            raise OutsideRoots(f"{storage.redact(uri)} is outside the allowed roots once opened (a symlink "
                               "changed during the read?); add its folder with --allow-root if it should be read")
        if _pseudo(opened):
            raise NotARegularFile(f"{uri} is a kernel pseudo-file (/proc, /sys, /dev); "
                                  "list only photo files in the manifest")
        if info.st_size > limits.max_bytes:
            raise _too_big(uri, info.st_size, limits)
        os.set_blocking(fd, True)
        chunks, left = [], info.st_size
        while left > 0:
            chunk = os.read(fd, min(CHUNK_BYTES, left))
            if not chunk:
                break  # shorter than stat said (truncated meanwhile): decode decides
            chunks.append(chunk)
            left -= len(chunk)
            _check_deadline(uri, deadline, limits)
        return b"".join(chunks)
    finally:
        os.close(fd)


def _read_object(uri: str, limits: ReadLimits, options: storage.StorageOptions | None,
                 deadline: float) -> bytes:
    fs, path = storage.filesystem(uri, options)
    info = fs.info(path)  # HEAD
    if info.get("type") != "file":
        raise NotARegularFile(f"{storage.redact(uri)} is a {info.get('type', 'non-object')}, not an object; "
                              "list only photo objects in the manifest")
    size = int(info.get("size") or 0)
    if size > limits.max_bytes:
        raise _too_big(uri, size, limits)
    chunks, left = [], size
    with fs.open(path, "rb", block_size=CHUNK_BYTES, cache_type="none", size=size) as handle:
        while left > 0:
            chunk = handle.read(min(CHUNK_BYTES, left))
            if not chunk:
                break
            chunks.append(chunk)
            left -= len(chunk)
            _check_deadline(uri, deadline, limits)
    return b"".join(chunks)


def _check_deadline(uri: str, deadline: float, limits: ReadLimits) -> None:
    if time.monotonic() > deadline:
        raise ReadTimeout(f"reading {storage.redact(uri)} took over {limits.timeout_s:g}s; "
                          "check the storage, or raise the read timeout")


def _pseudo(path: str) -> bool:
    return any(path == top or path.startswith(top + "/") for top in ("/proc", "/sys", "/dev"))


def _kind(mode: int) -> str:
    for test, name in ((stat.S_ISFIFO, "a FIFO"), (stat.S_ISCHR, "a character device"),
                       (stat.S_ISBLK, "a block device"), (stat.S_ISSOCK, "a socket"),
                       (stat.S_ISDIR, "a folder")):
        if test(mode):
            return name
    return "not a regular file"


def stage_of(err: BaseException) -> str:
    """The errors-table stage of a failed read: validate for refused uris, fetch otherwise."""
    return getattr(err, "stage", STAGE_FETCH) if isinstance(err, ReadRefused) else STAGE_FETCH


# ------------------------------------------------------------------------------ stat without reading

# An S3 folder holding at least this many of the photos asked about is listed (one LIST request
# per 1,000 keys) instead of HEADing each (one request per photo): listing wins unless the folder
# holds over 1,000x more objects than the manifest names there, which a folder of 64+ listed
# photos rarely does; a folder with fewer is HEADed photo by photo (a LIST of a huge folder for
# a handful of photos would be the larger cost).
LIST_FROM = 64


@dataclass(frozen=True)
class SourceStat:
    """What a photo's source looks like now, learnt without reading a byte of it."""

    size: int
    mtime_ns: int | None = None      # local files
    etag: str | None = None          # S3 objects (quotes stripped)


def source_stats(uris: list[str], limits: ReadLimits = ReadLimits(),
                 options: storage.StorageOptions | None = None) -> list[SourceStat | None]:
    """The size and mtime (local) or ETag (S3) of each photo, None where refused or missing.

    The same door as ``read``: a uri outside ``limits.allowed_roots`` is neither statted nor listed,
    and only regular files / objects count (a FIFO, device, folder or /proc file gives None).
    Local files: one ``os.stat`` each (on Linux a folder listing costs one stat per entry too, so
    statting the photos asked about is never more syscalls than listing their folders). S3: one
    LIST per folder holding ``LIST_FROM`` or more of the photos (``ls(detail=True)``: 1,000 keys
    per request, with size and ETag), one HEAD per photo otherwise.
    """
    out: list[SourceStat | None] = [None] * len(uris)
    by_folder: dict[str, list[int]] = {}
    folders: dict[str, str] = {}        # folder -> its resolved path (one realpath per folder)
    bases = [normal(r).rstrip("/") for r in limits.allowed_roots]
    for i, uri in enumerate(uris):
        if storage.scheme_of(uri) == "s3":
            if not limits.allowed_roots or within(uri, limits.allowed_roots):
                by_folder.setdefault(normal(uri).rsplit("/", 1)[0], []).append(i)
        else:
            out[i] = _stat_local(uri, folders, bases)
    for folder, members in by_folder.items():
        fs, _ = storage.filesystem(folder + "/", options)
        listed = None
        if len(members) >= LIST_FROM and (not limits.allowed_roots or within(folder, limits.allowed_roots)):
            try:
                fs.invalidate_cache(folder[len("s3://"):])
                listed = {e["name"]: e for e in fs.ls(folder[len("s3://"):], detail=True)}
            except (FileNotFoundError, PermissionError, OSError):
                listed = None
        for i in members:
            path = normal(uris[i])[len("s3://"):]
            try:
                entry = listed.get(path) if listed is not None else fs.info(path)
            except (FileNotFoundError, PermissionError, OSError):
                entry = None
            if entry is not None and entry.get("type") == "file":
                etag = entry.get("ETag") or entry.get("etag")
                out[i] = SourceStat(size=int(entry.get("size") or 0), etag=str(etag).strip('"') if etag else None)
    return out


def within_each(uris: list[str], roots: tuple[str, ...]) -> list[bool]:
    """``within(uri, roots)`` for many uris, resolving each folder once (what the rebuild's plan
    checks for every photo of record)."""
    folders: dict[str, str] = {}
    bases = [normal(r).rstrip("/") for r in roots]
    out = []
    for uri in uris:
        if storage.scheme_of(uri) == "s3":
            out.append(within(uri, roots))
        else:
            path = _resolve_local(uri, folders)[0]
            out.append(any(path == b or path.startswith(b + "/") for b in bases))
    return out


def _resolve_local(uri: str, folders: dict[str, str]) -> tuple[str, os.stat_result | None]:
    """(``normal(uri)``, its lstat or stat) with one realpath per folder: the file itself costs
    one lstat, a symlink is resolved in full; (path, None) when it does not exist."""
    path = uri[len("file://"):] if uri.startswith("file://") else uri
    if ".." in path.split("/"):
        path = os.path.realpath(path)       # `..` after a symlinked folder: resolve it as realpath does
    else:
        folder, name = os.path.split(os.path.abspath(path))
        real = folders.get(folder)
        if real is None:
            real = folders[folder] = os.path.realpath(folder)
        path = os.path.join(real, name)
    try:
        info = os.lstat(path)
        if stat.S_ISLNK(info.st_mode):
            path = os.path.realpath(path)
            info = os.stat(path)
    except OSError:
        return path, None
    return path, info


def _stat_local(uri: str, folders: dict[str, str], bases: list[str]) -> SourceStat | None:
    """stat of one local photo, resolved as ``normal`` resolves it (symlinks and ``..``)."""
    path, info = _resolve_local(uri, folders)
    if info is None:
        return None
    if bases and not any(path == b or path.startswith(b + "/") for b in bases):
        return None
    if _pseudo(path) or not stat.S_ISREG(info.st_mode):
        return None
    return SourceStat(size=int(info.st_size), mtime_ns=int(info.st_mtime_ns))
