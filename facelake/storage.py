"""Storage paths: local folders (the embedded default), file:// and s3:// through fsspec.

The one place for: opening a URI (``filesystem``), atomic and write-if-absent writes, the one
Parquet part writer (``write_table``) and readers (``read_table`` for a folder, ``read_file``
and ``open_parquet`` for one file), and the names, times and hashes stored objects carry
(``new_name``, ``utc_now``, ``sha256``).

Credentials are never taken as options: s3fs reads them from the AWS credential chain
(environment, ~/.aws, instance or pod roles) on whichever node opens the path, so nothing
secret is pickled into Ray tasks or written to logs. Only the endpoint and region travel.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import hashlib
import io
import os
import posixpath
import secrets
import shutil
import time
import uuid
from dataclasses import dataclass
from typing import Iterator

import fsspec
import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from facelake.errors import ConfigError

SUPPORTED_SCHEMES = ("file", "s3")
ENDPOINT_ENV = "FACELAKE_S3_ENDPOINT_URL"
# botocore's defaults are 60 s each; photos are small objects, so a slow answer is a stuck one.
CONNECT_TIMEOUT_S = 10
READ_TIMEOUT_S = 30


@dataclass(frozen=True)
class StorageOptions:
    """Non-secret settings for object storage; safe to log and to ship to workers."""

    endpoint_url: str | None = None
    region: str | None = None

    def __post_init__(self) -> None:
        # user:password@ in an endpoint would travel to workers and into logs, and S3 clients
        # cannot send it anyway (it clashes with the signed Authorization header).
        if self.endpoint_url and redact(self.endpoint_url) != self.endpoint_url:
            raise ConfigError(f"the S3 endpoint URL {redact(self.endpoint_url)!r} carries credentials: give "
                              "the endpoint without user:password@ and the keys through the AWS credential "
                              "chain (AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY, ~/.aws, instance or pod roles)")

    @classmethod
    def from_env(cls, endpoint_url: str | None = None, region: str | None = None) -> "StorageOptions":
        """Explicit values win, then FACELAKE_S3_ENDPOINT_URL / AWS_ENDPOINT_URL_S3 / AWS_ENDPOINT_URL."""
        endpoint = (
            endpoint_url
            or os.environ.get(ENDPOINT_ENV)
            or os.environ.get("AWS_ENDPOINT_URL_S3")
            or os.environ.get("AWS_ENDPOINT_URL")
        )
        return cls(endpoint_url=endpoint, region=region or os.environ.get("AWS_DEFAULT_REGION"))


def scheme_of(uri: str) -> str:
    """Return the URI scheme, 'file' for plain paths."""
    if "://" not in uri:
        return "file"
    return uri.split("://", 1)[0].lower()


def check_uri(uri: str) -> None:
    """Refuse schemes facelake does not read or write, naming the supported ones."""
    scheme = scheme_of(uri)
    if scheme not in SUPPORTED_SCHEMES:
        raise ConfigError(
            f"unsupported URI scheme {scheme!r} in {redact(uri)!r}: use a local path, file:// or s3://"
        )


def redact(uri: str) -> str:
    """Drop any user:password@ part of a URI before it is shown anywhere."""
    if "://" in uri and "@" in uri.split("://", 1)[1].split("/", 1)[0]:
        scheme, rest = uri.split("://", 1)
        host_and_path = rest.split("@", 1)[1]
        return f"{scheme}://***@{host_and_path}"
    return uri


_FS_CACHE: dict[tuple, fsspec.AbstractFileSystem] = {}


def filesystem(uri: str, options: StorageOptions | None = None) -> tuple[fsspec.AbstractFileSystem, str]:
    """Return (fsspec filesystem, path inside it) for a URI."""
    check_uri(uri)
    options = options or StorageOptions.from_env()
    scheme = scheme_of(uri)
    if scheme == "file":
        path = uri[len("file://"):] if uri.startswith("file://") else uri
        key = ("file",)
        if key not in _FS_CACHE:
            _FS_CACHE[key] = fsspec.filesystem("file")
        return _FS_CACHE[key], os.path.abspath(os.path.expanduser(path))
    key = ("s3", options.endpoint_url, options.region)
    if key not in _FS_CACHE:
        client_kwargs = {"region_name": options.region} if options.region else {}
        # Retries with backoff for throttling / 5xx are botocore's standard mode.
        _FS_CACHE[key] = fsspec.filesystem(
            "s3",
            endpoint_url=options.endpoint_url,
            client_kwargs=client_kwargs,
            # a hung connection or read fails over to the next retry instead of waiting minutes
            config_kwargs={"retries": {"max_attempts": 5, "mode": "standard"},
                           "connect_timeout": CONNECT_TIMEOUT_S, "read_timeout": READ_TIMEOUT_S},
            use_listings_cache=False,
            skip_instance_cache=True,
        )
    return _FS_CACHE[key], uri.split("://", 1)[1]


def join(uri: str, *parts: str) -> str:
    """Join path parts onto a URI (posix separators for s3)."""
    if scheme_of(uri) == "s3":
        return posixpath.join(uri, *parts)
    return os.path.join(uri, *parts)


def arrow_filesystem(uri: str, options: StorageOptions | None = None) -> tuple[pafs.FileSystem, str]:
    """A pyarrow filesystem over the same fsspec filesystem, for pyarrow and Ray Data readers."""
    fs, path = filesystem(uri, options)
    return pafs.PyFileSystem(pafs.FSSpecHandler(fs)), path


def exists(uri: str, options: StorageOptions | None = None) -> bool:
    fs, path = filesystem(uri, options)
    return fs.exists(path)


def read_bytes(uri: str, options: StorageOptions | None = None) -> bytes:
    fs, path = filesystem(uri, options)
    with fs.open(path, "rb") as handle:
        return handle.read()


def write_bytes_atomic(uri: str, data: bytes, options: StorageOptions | None = None) -> None:
    """Write an object so that readers see either nothing or all of it.

    Local files go to a temporary name in the same folder and are renamed over the target;
    an S3 PUT is already all-or-nothing.
    """
    fs, path = filesystem(uri, options)
    if scheme_of(uri) == "file":
        os.makedirs(os.path.dirname(path), exist_ok=True)
        tmp = f"{path}.tmp-{uuid.uuid4().hex}"
        with open(tmp, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    else:
        fs.pipe_file(path, data)


def link_or_copy(src: str, dst: str, options: StorageOptions | None = None) -> None:
    """Make ``dst`` hold the bytes of ``src`` without passing them through this process.

    Local: a hard link (no bytes copied; one more name for the same inode, which is safe because
    facelake never rewrites a file in place: every write is a new file renamed over the name),
    made under a temporary name and renamed, so ``dst`` appears whole; a copy where the file system
    refuses links. S3: a server-side copy (CopyObject; the bytes stay in the object store)."""
    fs, src_path = filesystem(src, options)
    _, dst_path = filesystem(dst, options)
    if scheme_of(src) == "file":
        os.makedirs(os.path.dirname(dst_path), exist_ok=True)
        tmp = f"{dst_path}.tmp-{uuid.uuid4().hex}"
        try:
            os.link(src_path, tmp)
        except OSError:
            shutil.copyfile(src_path, tmp)
        os.replace(tmp, dst_path)
    else:
        fs.copy(src_path, dst_path)


def write_bytes_new(uri: str, data: bytes, options: StorageOptions | None = None) -> None:
    """Create ``uri`` whole, failing with FileExistsError if it exists: write-if-absent for
    append-only logs and claims (local: a hard link of a complete temporary file, which fails if
    the name exists; S3: a conditional PUT, If-None-Match)."""
    fs, path = filesystem(uri, options)
    if scheme_of(uri) == "file":
        os.makedirs(os.path.dirname(path), exist_ok=True)
        tmp = f"{path}.tmp-{uuid.uuid4().hex}"
        with open(tmp, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        try:
            os.link(tmp, path)  # atomic, fails if the name exists
        finally:
            os.unlink(tmp)
        return
    try:
        fs.pipe_file(path, data, mode="create")
    except FileExistsError:
        raise
    except OSError as err:  # 412 Precondition Failed comes back as an OSError
        if "PreconditionFailed" in str(err) or "412" in str(err):
            raise FileExistsError(redact(uri)) from err
        raise


def list_files(uri: str, suffix: str = "", options: StorageOptions | None = None) -> list[str]:
    """Files under a folder/prefix (recursive), as full URIs, sorted; [] if it does not exist."""
    fs, path = filesystem(uri, options)
    if not fs.exists(path):
        return []
    if fs.isfile(path):
        return [uri]
    found = sorted(p for p in fs.find(path) if p.endswith(suffix))
    prefix = "s3://" if scheme_of(uri) == "s3" else ""
    return [f"{prefix}{p}" for p in found]


def remove(uri: str, recursive: bool = False, options: StorageOptions | None = None) -> None:
    fs, path = filesystem(uri, options)
    if fs.exists(path):
        fs.rm(path, recursive=recursive)


def parquet_bytes(table: pa.Table) -> bytes:
    """A table as the bytes of one Parquet part file (zstd; the schema's metadata kept)."""
    sink = io.BytesIO()
    pq.write_table(table, sink, compression="zstd")
    return sink.getvalue()


def write_table(uri: str, table: pa.Table, options: StorageOptions | None = None) -> None:
    """Write one Parquet part file atomically (temporary object, then rename / single PUT)."""
    write_bytes_atomic(uri, parquet_bytes(table), options)


def read_table(uri: str, columns: list[str] | None = None, options: StorageOptions | None = None) -> pa.Table:
    """Read one Parquet file or every *.parquet under a folder/prefix into one table."""
    files = list_files(uri, ".parquet", options)
    if not files:
        raise FileNotFoundError(f"no Parquet files at {redact(uri)}")
    fs, _ = arrow_filesystem(uri, options)
    paths = [filesystem(f, options)[1] for f in files]
    dataset = pq.ParquetDataset(paths, filesystem=fs)
    return dataset.read(columns=columns)


def iter_batches(uri: str, columns: list[str] | None = None, batch_size: int = 65536,
                 options: StorageOptions | None = None) -> Iterator[pa.RecordBatch]:
    """Stream record batches from one Parquet file or a folder of them (bounded memory)."""
    files = list_files(uri, ".parquet", options)
    if not files:
        raise FileNotFoundError(f"no Parquet files at {redact(uri)}")
    for file_uri in files:
        with open_parquet(file_uri, options) as parquet:
            yield from parquet.iter_batches(batch_size=batch_size, columns=columns)


def read_file(uri: str, columns: list[str] | None = None, options: StorageOptions | None = None) -> pa.Table:
    """Read one Parquet file (an object, not a folder) into a table."""
    with open_parquet(uri, options) as parquet:
        return parquet.read(columns=columns)


@contextlib.contextmanager
def open_parquet(uri: str, options: StorageOptions | None = None) -> Iterator[pq.ParquetFile]:
    """One Parquet file, opened for its footer (row counts, schema) or row groups."""
    fs, path = filesystem(uri, options)
    with fs.open(path, "rb") as handle:
        yield pq.ParquetFile(handle)


# ------------------------------------------------------------------------------ names, times, hashes

def sha256(data: bytes) -> str:
    """Hex sha256 of bytes: content hashes, checksums of stored files, hash chains."""
    return hashlib.sha256(data).hexdigest()


def utc_now() -> str:
    """UTC time to the millisecond (ISO 8601, Z), so that records of one second still sort in order."""
    now = time.time()
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(now)) + f".{int(now * 1000) % 1000:03d}Z"


def new_name() -> str:
    """A sortable, unique name for stored runs and versions, e.g. 20261125T120000.123Z-1a2b3c."""
    now = dt.datetime.now(dt.timezone.utc)
    return f"{now.strftime('%Y%m%dT%H%M%S')}.{now.microsecond // 1000:03d}Z-{secrets.token_hex(3)}"
