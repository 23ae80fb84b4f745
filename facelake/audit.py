"""The audit log of a root: ROOT/audit/<time>-<job id>.json, one new object per job, never rewritten.

Search jobs, erasures and rebuilds each append one record (who, when, what, on which index
version, with which parameters). Records are JSON; reading them never runs stored code.
"""

from __future__ import annotations

import getpass
import json
import socket
import time
import uuid
from typing import Any

from facelake import storage


def audit_dir(root: str) -> str:
    return storage.join(root, "audit")


def new_job_id(kind: str) -> str:
    """A sortable, unique job id such as search-20261125T120000Z-1a2b3c."""
    return f"{kind}-{time.strftime('%Y%m%dT%H%M%SZ', time.gmtime())}-{uuid.uuid4().hex[:6]}"


def who() -> dict[str, str]:
    """The user and host a record is attributed to (FACELAKE_USER overrides the login name)."""
    import os

    return {"user": os.environ.get("FACELAKE_USER") or getpass.getuser(), "host": socket.gethostname()}


def utc_now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())


def write_record(root: str, record: dict[str, Any], options: storage.StorageOptions | None = None) -> str:
    """Append one record (must hold 'job_id' and 'kind'); returns its URI. Never overwrites."""
    if "job_id" not in record or "kind" not in record:
        raise ValueError("an audit record needs 'job_id' and 'kind'")
    body = {"recorded_at": utc_now(), **who(), **record}
    uri = storage.join(audit_dir(root), f"{record['job_id']}.json")
    storage.write_bytes_new(uri, json.dumps(body, indent=2, sort_keys=True, default=str).encode(), options)
    return uri


def list_records(root: str, kind: str | None = None,
                 options: storage.StorageOptions | None = None) -> list[dict[str, Any]]:
    """Every record under ROOT/audit, oldest first, optionally only one kind."""
    records = []
    for uri in storage.list_files(audit_dir(root), ".json", options):
        record = json.loads(storage.read_bytes(uri, options))
        if kind is None or record.get("kind") == kind:
            records.append(record)
    return sorted(records, key=lambda r: (r.get("started_at") or r.get("recorded_at") or "", r["job_id"]))
