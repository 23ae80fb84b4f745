"""The audit log of a root: ROOT/audit/<seq>.json, a hash chain of typed records.

Every job that touches a root (search, erase, rebuild, index) runs inside ``Job``: it writes a
"started" record before any result and refuses to run if it cannot, then one end record
("succeeded", "failed", or "interrupted" on SIGTERM / SIGINT). Records are
``facelake.schema.AuditRecord``: one ``status`` field for every job, the OS user who ran it
(a name claimed with FACELAKE_USER goes to ``claimed_user``, never replaces it), host, pid,
the Ray job, and job-specific ``details``.

Tamper evidence: record n is created write-if-absent under the name n (zero padded), and holds
the sha256 of the bytes of record n-1, so editing or deleting a record breaks the chain at the
next one; ``verify`` names the first broken link (``facelake audit ROOT --verify``). Deleting
the newest records is only visible against an anchor kept elsewhere (erase anchors the erasure
list; see facelake.record.erasures). On S3 write-if-absent is ``If-None-Match: *``; stores that ignore it
can fork the chain when two jobs append at the same instant, which ``verify`` then reports.

Ids that can name a person are written as ``id_hmac``: HMAC-SHA256 under a key kept out of the
audit log: FACELAKE_AUDIT_KEY when set, else ROOT/secret/audit.key (made on first use, mode
0600 on local roots). Reading records never runs stored code.
"""

from __future__ import annotations

import dataclasses
import hashlib
import hmac
import json
import logging
import os
import re
import secrets
import signal
import socket
import threading
import time
import uuid
from typing import Any

from facelake import storage
from facelake.errors import FacelakeError
from facelake.schema import AuditRecord
from facelake.storage import sha256, utc_now  # noqa: F401  (audit.utc_now / audit.sha256: the one definitions)

log = logging.getLogger(__name__)

AUDIT = "audit"
SEQ_DIGITS = 10
RECORD_NAME = re.compile(r"^(\d{10})\.json$")
CLAIMED_USER_ENV = "FACELAKE_USER"
KEY_ENV = "FACELAKE_AUDIT_KEY"
KEY_FILE = ("secret", "audit.key")
# Appends retried when another job took the same sequence number at the same instant.
APPEND_TRIES = 50
# Longest error text kept in a record.
ERROR_CHARS = 2000


class AuditError(FacelakeError):
    """The audit log cannot be written, or does not verify."""


class JobInterrupted(BaseException):
    """Raised in the main thread on SIGTERM so that a job's end record is written."""


def audit_dir(root: str) -> str:
    return storage.join(root, AUDIT)


def new_job_id(kind: str) -> str:
    """A sortable, unique job id such as search-20261125T120000Z-1a2b3c."""
    return f"{kind}-{time.strftime('%Y%m%dT%H%M%SZ', time.gmtime())}-{uuid.uuid4().hex[:6]}"


def os_user() -> str:
    """The operating-system user of this process (not $USER, which anyone can set)."""
    try:
        import pwd

        return pwd.getpwuid(os.geteuid()).pw_name
    except (ImportError, KeyError):
        return f"uid-{os.geteuid()}" if hasattr(os, "geteuid") else "unknown"


def who() -> dict[str, str | None]:
    """Who a record is attributed to: the OS user, the host, and a claimed name if one was set."""
    claimed = os.environ.get(CLAIMED_USER_ENV) or None
    return {"user": os_user(), "host": socket.gethostname(), "claimed_user": claimed}


# Ray's job supervisor hands a submitted driver its job config (runtime env and metadata) here.
RAY_JOB_CONFIG_ENV = "RAY_JOB_CONFIG_JSON_ENV_VAR"
SUBMITTER_TAG = "facelake_user"   # = facelake.cluster.submit.USER_TAG (core may not import cluster/)


def _ray_job() -> tuple[str | None, str | None]:
    """(Ray submission id, submitter's user tag) when this driver runs as a submitted Ray job."""
    try:
        metadata = json.loads(os.environ.get(RAY_JOB_CONFIG_ENV) or "{}").get("metadata") or {}
    except (ValueError, AttributeError):
        metadata = {}
    return metadata.get("job_submission_id"), metadata.get(SUBMITTER_TAG)


# ------------------------------------------------------------------------------ keyed id hashes

def _key(root: str, options: storage.StorageOptions | None) -> bytes:
    env = os.environ.get(KEY_ENV)
    if env:
        return env.encode()
    uri = storage.join(root, *KEY_FILE)
    try:
        return storage.read_bytes(uri, options).strip()
    except FileNotFoundError:
        pass
    key = secrets.token_hex(32).encode()
    try:
        storage.write_bytes_new(uri, key, options)
        if storage.scheme_of(uri) == "file":
            os.chmod(storage.filesystem(uri, options)[1], 0o600)
    except FileExistsError:  # another job made it first
        return storage.read_bytes(uri, options).strip()
    return key


def id_hmac(root: str, ids: list[str], options: storage.StorageOptions | None = None) -> list[str]:
    """HMAC-SHA256 of each id under the root's audit key, as "hmac-sha256:<key id>:<hex>".

    The key id (8 hex digits of the key's sha256) says which key to check with; without the
    key an id cannot be confirmed by guessing.
    """
    key = _key(root, options)
    key_id = sha256(key)[:8]
    return [f"hmac-sha256:{key_id}:{hmac.new(key, i.encode(), hashlib.sha256).hexdigest()}" for i in ids]


# ------------------------------------------------------------------------------ the chain

def record_uri(root: str, seq: int) -> str:
    return storage.join(audit_dir(root), f"{seq:0{SEQ_DIGITS}d}.json")


def chain_files(root: str, options: storage.StorageOptions | None) -> tuple[dict[int, str], list[str]]:
    """({seq: uri} of chain records, [uris of other files under ROOT/audit])."""
    chain, other = {}, []
    fs, path = storage.filesystem(audit_dir(root), options)
    fs.invalidate_cache(path)  # other jobs append here: never trust a cached listing
    for uri in storage.list_files(audit_dir(root), options=options):
        match = RECORD_NAME.match(uri.rstrip("/").rsplit("/", 1)[-1])
        if match:
            chain[int(match.group(1))] = uri
        elif ".tmp-" not in uri:
            other.append(uri)
    return chain, other


def append(root: str, record: AuditRecord, options: storage.StorageOptions | None = None) -> AuditRecord:
    """Append ``record`` as the next link of ROOT's chain; returns it with seq and prev_sha256 set."""
    for _ in range(APPEND_TRIES):
        chain, _other = chain_files(root, options)
        last = max(chain, default=0)
        prev = sha256(storage.read_bytes(chain[last], options)) if last else None
        linked = dataclasses.replace(record, seq=last + 1, prev_sha256=prev, recorded_at=utc_now())
        try:
            storage.write_bytes_new(record_uri(root, last + 1), linked.to_json(), options)
            return linked
        except FileExistsError as err:
            if not storage.exists(record_uri(root, last + 1), options):  # not a race: the path is blocked
                raise AuditError(f"cannot create {storage.redact(record_uri(root, last + 1))}: {err}") from err
            time.sleep(0.01)
    raise AuditError(f"could not append to the audit log of {storage.redact(root)}: {APPEND_TRIES} other "
                     f"records were appended at the same time; retry")


def new_record(job_id: str, kind: str, status: str, *, started_at: str | None = None,
               ended_at: str | None = None, error: str | None = None, details: dict | None = None) -> AuditRecord:
    """A record attributed to this process (seq and chain fields are set by ``append``)."""
    person = who()
    ray_job, submitter = _ray_job()
    now = utc_now()
    return AuditRecord(seq=1, prev_sha256=None, job_id=job_id, kind=kind, status=status, os_user=person["user"],
                       claimed_user=person["claimed_user"], host=person["host"], pid=os.getpid(),
                       ray_job=ray_job, ray_submitter=submitter, started_at=started_at or now, ended_at=ended_at,
                       recorded_at=now, error=error[:ERROR_CHARS] if error else None, details=dict(details or {}))


def write_record(root: str, record: dict[str, Any], options: storage.StorageOptions | None = None) -> str:
    """Append a one-off record (must hold 'job_id' and 'kind'; optional 'status', default
    "succeeded"); the other keys become its details. Returns the record's URI."""
    if "job_id" not in record or "kind" not in record:
        raise ValueError("an audit record needs 'job_id' and 'kind'")
    details = {k: v for k, v in record.items() if k not in ("job_id", "kind", "status", "error")}
    written = append(root, new_record(record["job_id"], record["kind"], record.get("status", "succeeded"),
                                      error=record.get("error"), details=details), options)
    return record_uri(root, written.seq)


# ------------------------------------------------------------------------------ reading

@dataclasses.dataclass
class Log:
    """What was read from ROOT/audit: typed records in chain order, and files that could not be read."""

    records: list[AuditRecord]
    problems: list[str]            # "<file>: <why>" for each malformed or foreign file


def read_log(root: str, options: storage.StorageOptions | None = None) -> Log:
    """Every readable record in chain order; a malformed file is reported in ``problems``, not raised."""
    chain, other = chain_files(root, options)
    records, problems = [], []
    for seq in sorted(chain):
        try:
            record = AuditRecord.from_json(storage.read_bytes(chain[seq], options))
        except (ValueError, TypeError) as err:
            problems.append(f"{storage.redact(chain[seq])}: {str(err)[:200]}")
            continue
        records.append(record)
    for uri in other:
        problems.append(f"{storage.redact(uri)}: not an audit record (facelake writes ROOT/audit/<seq>.json only)")
    return Log(records, problems)


def jobs(records: list[AuditRecord]) -> list[dict[str, Any]]:
    """One flat dict per job (its latest record: the end record once written), oldest first."""
    latest: dict[str, AuditRecord] = {}
    for record in records:
        latest[record.job_id] = record
    return sorted((r.view() for r in latest.values()), key=lambda v: (v["started_at"] or "", v["seq"]))


def list_records(root: str, kind: str | None = None,
                 options: storage.StorageOptions | None = None) -> list[dict[str, Any]]:
    """One flat dict per job under ROOT/audit (see ``jobs``), oldest first, optionally one kind.

    Malformed files are skipped with a warning; ``read_log`` reports them.
    """
    log_ = read_log(root, options)
    for problem in log_.problems:
        log.warning("audit log: %s", problem)
    return [r for r in jobs(log_.records) if kind is None or r["kind"] == kind]


def verify(root: str, options: storage.StorageOptions | None = None) -> tuple[int, str | None]:
    """(records checked, None) when the chain is intact, else (records before the break, why)."""
    chain, other = chain_files(root, options)
    if other:
        return 0, f"{storage.redact(other[0])} is not part of the chain (added, renamed or pre-chain)"
    prev = None
    for seq in range(1, max(chain, default=0) + 1):
        if seq not in chain:
            return seq - 1, f"record {seq} is missing ({storage.redact(record_uri(root, seq))} was deleted)"
        data = storage.read_bytes(chain[seq], options)
        try:
            record = AuditRecord.from_json(data)
        except (ValueError, TypeError) as err:
            return seq - 1, f"record {seq} is malformed: {str(err)[:200]}"
        if record.seq != seq:
            return seq - 1, f"record {seq} says it is record {record.seq} (moved or copied)"
        if record.prev_sha256 != prev:
            return seq - 1, (f"record {seq} does not follow record {seq - 1}: its prev_sha256 does not match "
                             f"(record {seq - 1} was changed, or {seq} was rewritten)")
        prev = sha256(data)
    return len(chain), None


# ------------------------------------------------------------------------------ one job

class Job:
    """Audit one job: "started" before any work, one end record after it.

        with audit.Job(root, "search", options, details={...}) as job:
            ...                              # job.details.update(...) as the job learns things

    Entering writes the started record; if that fails the job is refused (AuditError) before
    it does anything. A job that ends without error is "succeeded", or ``job.end_status`` ("skipped"). SIGTERM in the main thread raises JobInterrupted; it, KeyboardInterrupt
    (SIGINT) and SystemExit end as "interrupted", other exceptions as "failed" with the error.
    """

    def __init__(self, root: str, kind: str, options: storage.StorageOptions | None = None, *,
                 job_id: str | None = None, details: dict | None = None) -> None:
        self.root, self.kind, self.options = root, kind, options
        self.job_id = job_id or new_job_id(kind)
        self.details: dict = dict(details or {})
        self.started_at = utc_now()
        self.status: str | None = None
        self.end_status = "succeeded"   # a job that finds nothing to do sets "skipped"
        self._previous_handler = None

    def __enter__(self) -> "Job":
        try:
            append(self.root, new_record(self.job_id, self.kind, "started", started_at=self.started_at,
                                         details=self.details), self.options)
        except Exception as err:
            raise AuditError(f"cannot write the audit record of {self.kind} job {self.job_id} under "
                             f"{storage.redact(audit_dir(self.root))} ({type(err).__name__}: {err}); nothing "
                             f"was done: make the audit folder writable (permissions, space) and rerun") from err
        if threading.current_thread() is threading.main_thread():
            self._previous_handler = signal.signal(signal.SIGTERM, _raise_interrupted)
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if self._previous_handler is not None:
            signal.signal(signal.SIGTERM, self._previous_handler)
        error = None
        interrupt = interruption(exc)
        if exc is None:
            self.status = self.end_status
        elif interrupt is not None:
            self.status, error = "interrupted", f"{type(interrupt).__name__}: {interrupt}"
            if interrupt is not exc:
                error += f" (then, while stopping: {type(exc).__name__}: {storage.redact(str(exc))})"
        else:
            self.status, error = "failed", f"{type(exc).__name__}: {storage.redact(str(exc))}"
        try:
            append(self.root, new_record(self.job_id, self.kind, self.status, started_at=self.started_at,
                                         ended_at=utc_now(), error=error, details=self.details), self.options)
        except Exception as err:
            if exc is not None:  # never hide the job's own error behind the audit's
                log.error("could not write the end record of %s: %s", self.job_id, err)
                return
            raise AuditError(f"{self.kind} job {self.job_id} finished but its end record could not be written "
                             f"under {storage.redact(audit_dir(self.root))}: {err}") from err


def interruption(exc: BaseException | None) -> BaseException | None:
    """The interrupt (JobInterrupted, KeyboardInterrupt, SystemExit) that ``exc`` is, or that it
    was raised while handling: a signal landing inside ``import ray`` leaves the module half
    initialised, and the cleanup that follows fails with an AttributeError whose context is the
    signal's exception. The job was still interrupted, not failed."""
    seen = set()
    while exc is not None and id(exc) not in seen:
        if isinstance(exc, (JobInterrupted, KeyboardInterrupt, SystemExit)):
            return exc
        seen.add(id(exc))
        exc = exc.__cause__ or exc.__context__
    return None


def _raise_interrupted(signum, frame) -> None:
    raise JobInterrupted(f"signal {signal.Signals(signum).name}")
