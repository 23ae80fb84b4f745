"""One rebuild, erase or index job at a time per ROOT: the lock object ROOT/lock.

The lock is a small JSON object: owner (user), host, pid, job_id, token, acquired_at,
expires_at (UTC), ttl_s. While a job holds it a heartbeat thread pushes expires_at forward every
ttl/4, so a short TTL (DEFAULT_TTL_S) is enough for jobs of any length and a killed job's lock
goes stale within one TTL. Jobs call ``verify()`` right before each commit (table pointer,
index pointer): a job that lost its lock stops before changing what readers see.

Acquire:  create-if-absent (local: write a temporary file, then ``os.link`` it to ROOT/lock,
          which fails if the name exists; S3: PUT with ``If-None-Match: *``), then read the
          object back and compare the token.
Stale:    expires_at in the past, or the holder runs on this host under a pid that is gone.
          It is taken over with a conditional overwrite (S3: PUT ``If-Match`` the stale
          object's ETag; local: under an flock on ROOT/lock.guard, re-read, check it is the same
          stale lock, replace), logged as a WARNING and recorded in the audit log
          (kind "lock-takeover", with the previous holder).
Release:  conditional delete (S3: DELETE ``If-Match`` our ETag; local: only if the token is ours).

Residual race: S3-compatible stores that ignore conditional headers (older MinIO, Ceph RGW
releases) turn create-if-absent into last-writer-wins. The read-back catches a writer that
lands before our read, not one that lands after it; the heartbeat then notices within ttl/4 and
``verify()`` before each commit stops the loser, so the remaining window is a second writer
landing between another job's verify and its commit. Local takeovers rely on flock, which some
network filesystems do not honour.
"""

from __future__ import annotations

import datetime as dt
import fcntl
import json
import logging
import os
import socket
import threading
import uuid
from typing import Any

from facelake import storage
from facelake.record import audit
from facelake.errors import LockError
from facelake.storage import StorageOptions

log = logging.getLogger(__name__)

LOCK_NAME = "lock"
# Short enough that a killed job's lock is taken over well before the next nightly run, long
# enough that a driver paused by a slow storage call keeps it (renewed every TTL/4).
DEFAULT_TTL_S = 600.0


def lock_uri(root: str) -> str:
    return storage.join(root, LOCK_NAME)


def _now() -> dt.datetime:
    return dt.datetime.now(dt.timezone.utc)


def _iso(t: dt.datetime) -> str:
    return t.isoformat(timespec="seconds").replace("+00:00", "Z")


def _parse(text: str) -> dt.datetime:
    return dt.datetime.fromisoformat(text.replace("Z", "+00:00"))


class _Lost(Exception):
    """The object no longer holds the lock body we expected (someone else wrote it)."""


class _LocalBackend:
    def __init__(self, path: str) -> None:
        self.path = path
        self.guard = path + ".guard"

    def read(self) -> tuple[bytes, str | None]:
        with open(self.path, "rb") as handle:
            return handle.read(), None

    def _tmp(self, data: bytes) -> str:
        os.makedirs(os.path.dirname(self.path), exist_ok=True)
        tmp = f"{self.path}.tmp-{uuid.uuid4().hex}"
        with open(tmp, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        return tmp

    def create(self, data: bytes) -> str | None:
        tmp = self._tmp(data)
        try:
            os.link(tmp, self.path)  # atomic, fails with FileExistsError, content already complete
        finally:
            os.unlink(tmp)
        return None

    def _guarded(self, expect_token: str, action) -> None:
        os.makedirs(os.path.dirname(self.path), exist_ok=True)
        with open(self.guard, "a+b") as guard:
            fcntl.flock(guard.fileno(), fcntl.LOCK_EX)
            try:
                try:
                    current = json.loads(self.read()[0])
                except (FileNotFoundError, ValueError) as err:
                    raise _Lost() from err
                if current.get("token") != expect_token:
                    raise _Lost()
                action()
            finally:
                fcntl.flock(guard.fileno(), fcntl.LOCK_UN)

    def replace(self, data: bytes, expect_token: str, expect_etag: str | None) -> str | None:
        def action():
            os.replace(self._tmp(data), self.path)
        self._guarded(expect_token, action)
        return None

    def delete(self, expect_token: str, expect_etag: str | None) -> None:
        self._guarded(expect_token, lambda: os.unlink(self.path))


class _S3Backend:
    def __init__(self, uri: str, options: StorageOptions | None) -> None:
        self.fs, path = storage.filesystem(uri, options)
        self.bucket, self.key = path.split("/", 1)
        self.path = path

    def _call(self, method: str, **kwargs):
        from fsspec.asyn import sync

        return sync(self.fs.loop, self.fs._call_s3, method, Bucket=self.bucket, Key=self.key, **kwargs)

    def read(self) -> tuple[bytes, str | None]:
        from fsspec.asyn import sync

        async def get():
            response = await self.fs._call_s3("get_object", Bucket=self.bucket, Key=self.key)
            return await response["Body"].read(), response["ETag"]
        return sync(self.fs.loop, get)

    def create(self, data: bytes) -> str | None:
        out = self.fs.pipe_file(self.path, data, mode="create")  # If-None-Match: *
        return (out or {}).get("ETag")

    def replace(self, data: bytes, expect_token: str, expect_etag: str | None) -> str | None:
        try:
            out = self.fs.pipe_file(self.path, data, IfMatch=expect_etag)
        except (OSError, FileNotFoundError) as err:  # 412 Precondition Failed, or gone
            raise _Lost() from err
        return (out or {}).get("ETag")

    def delete(self, expect_token: str, expect_etag: str | None) -> None:
        try:
            self._call("delete_object", IfMatch=expect_etag)
        except FileNotFoundError:
            pass
        except OSError as err:
            raise _Lost() from err


def _backend(root: str, options: StorageOptions | None):
    uri = lock_uri(root)
    if storage.scheme_of(uri) == "s3":
        return _S3Backend(uri, options)
    return _LocalBackend(storage.filesystem(uri, options)[1])


def read_lock(root: str, options: StorageOptions | None = None) -> dict | None:
    """The lock's body (without its token), or None when ROOT is not locked."""
    try:
        data, _ = _backend(root, options).read()
    except FileNotFoundError:
        return None
    try:
        body = json.loads(data)
    except ValueError:
        return {"owner": "?", "expires_at": "?", "unreadable": True}
    body.pop("token", None)
    return body


def describe(body: dict) -> str:
    return (f"{body.get('owner')}@{body.get('host')} pid {body.get('pid')} (job {body.get('job_id')}), "
            f"acquired {body.get('acquired_at')}, expires {body.get('expires_at')}")


def _pid_gone(body: dict) -> bool:
    if body.get("host") != socket.gethostname() or not isinstance(body.get("pid"), int):
        return False
    try:
        os.kill(body["pid"], 0)
    except ProcessLookupError:
        return True
    except PermissionError:
        return False
    return False


def is_stale(body: dict, now: dt.datetime | None = None) -> str | None:
    """Why a lock body is stale ("expired ..." / "holder pid ... is gone"), or None if it is live."""
    now = now or _now()
    try:
        expires = _parse(body["expires_at"])
    except (KeyError, ValueError, TypeError):
        return "unreadable lock body"
    if expires <= now:
        return f"expired at {body['expires_at']}"
    if _pid_gone(body):
        return f"holder pid {body['pid']} on {body['host']} is gone"
    return None


class RootLock:
    """``with RootLock(root, job_id):`` holds ROOT/lock for one job; see the module docstring."""

    def __init__(self, root: str, job_id: str, *, ttl_s: float = DEFAULT_TTL_S,
                 options: StorageOptions | None = None, heartbeat: bool = True) -> None:
        if ttl_s <= 0:
            raise ValueError("ttl_s must be positive")
        self.root, self.job_id, self.ttl_s, self.options = root, job_id, ttl_s, options
        self.token = uuid.uuid4().hex
        self.backend = _backend(root, options)
        self.etag: str | None = None
        self.body: dict[str, Any] = {}
        self.lost: str | None = None
        self.taken_over: dict | None = None
        self._heartbeat = heartbeat
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._mutex = threading.Lock()

    def _new_body(self) -> dict:
        now = _now()
        who = audit.who()
        return {"owner": who["user"], "host": who["host"], "pid": os.getpid(), "job_id": self.job_id,
                "token": self.token, "acquired_at": self.body.get("acquired_at", _iso(now)),
                "expires_at": _iso(now + dt.timedelta(seconds=self.ttl_s)), "ttl_s": self.ttl_s}

    def acquire(self) -> "RootLock":
        body = self._new_body()
        data = json.dumps(body, indent=2).encode()
        for _ in range(3):
            try:
                self.etag = self.backend.create(data)
                break
            except FileExistsError:
                pass
            try:
                raw, etag = self.backend.read()
            except FileNotFoundError:
                continue  # released between our create and read: try again
            try:
                held = json.loads(raw)
            except ValueError:
                held = {"token": None, "expires_at": "?"}
            reason = is_stale(held)
            if reason is None:
                raise LockError(
                    f"{storage.redact(self.root)} is locked by {describe(held)}; only one rebuild or "
                    f"erase runs at a time: wait for it (see `facelake status`), or if that job is dead "
                    f"its lock is taken over automatically after it expires")
            try:
                self.etag = self.backend.replace(data, held.get("token"), etag)
            except _Lost:
                continue  # another job took it over first; look again
            self.taken_over = {k: v for k, v in held.items() if k != "token"}
            log.warning("took over the stale lock of %s on %s (%s)", describe(held),
                        storage.redact(self.root), reason)
            audit.write_record(self.root, {
                "job_id": f"{self.job_id}-lock-takeover", "kind": "lock-takeover", "by_job": self.job_id,
                "reason": reason, "previous": self.taken_over}, self.options)
            break
        else:
            raise LockError(f"could not acquire the lock of {storage.redact(self.root)}: it changed hands "
                            f"three times while trying; retry")
        self.body = body
        self._check_read_back()
        if self._heartbeat:
            self._thread = threading.Thread(target=self._beat, name=f"lock-heartbeat-{self.job_id}", daemon=True)
            self._thread.start()
        return self

    def _check_read_back(self) -> None:
        try:
            raw, etag = self.backend.read()
            held = json.loads(raw)
        except (FileNotFoundError, ValueError) as err:
            raise LockError(f"the lock of {storage.redact(self.root)} vanished right after it was "
                            f"acquired: another job is racing for it; retry") from err
        if held.get("token") != self.token:
            raise LockError(f"{storage.redact(self.root)} was locked at the same moment by {describe(held)}; "
                            f"retry after it finishes")
        self.etag = etag or self.etag

    def renew(self) -> None:
        """Push expires_at forward; marks the lock lost if someone else holds it now."""
        with self._mutex:
            if self.lost:
                return
            body = self._new_body()
            try:
                self.etag = self.backend.replace(json.dumps(body, indent=2).encode(), self.token, self.etag) or self.etag
                self.body = body
            except _Lost:
                holder = read_lock(self.root, self.options)
                self.lost = f"now held by {describe(holder)}" if holder else "the lock object was removed"
                log.error("job %s lost the lock of %s: %s", self.job_id, storage.redact(self.root), self.lost)
            except Exception as err:  # a storage hiccup: try again at the next beat
                log.warning("could not renew the lock of %s: %s", storage.redact(self.root), err)

    def _beat(self) -> None:
        while not self._stop.wait(self.ttl_s / 4):
            self.renew()

    def verify(self) -> None:
        """Raise LockError unless this job still holds the lock (call right before each commit)."""
        if not self.lost:
            try:
                held = json.loads(self.backend.read()[0])
            except (FileNotFoundError, ValueError):
                held = None
            if held is None:
                self.lost = "the lock object was removed"
            elif held.get("token") != self.token:
                self.lost = f"now held by {describe(held)}"
        if self.lost:
            raise LockError(f"job {self.job_id} lost the lock of {storage.redact(self.root)} ({self.lost}); "
                            f"nothing was published by this job after that; rerun it")

    def release(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=30)
        with self._mutex:
            if self.lost:
                return
            try:
                self.backend.delete(self.token, self.etag)
            except _Lost:
                log.warning("the lock of %s was no longer ours at release", storage.redact(self.root))

    def __enter__(self) -> "RootLock":
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()
