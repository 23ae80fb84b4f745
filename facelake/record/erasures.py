"""The erasure list of record: ROOT/erasures/<seq>.parquet, the ids ``facelake erase`` removed for good.

seq = 1, 2, ... (zero padded), each object created write-if-absent and never rewritten. Each
object's Parquet metadata holds its seq and the sha256 of the bytes of object seq-1 (a hash chain,
like the audit log), and every erase anchors the head it wrote (seq, sha256) in the audit log
(facelake.record.audit). Reading the list checks the chain and the newest anchor, so a deleted,
altered or truncated list is refused (``ErasureListError``), never silently obeyed. Every
publisher refuses to make live a version holding an erased id (``refuse_erased``).
Tested in tests/test_erase.py.
"""

from __future__ import annotations

import io
import json
import re

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from facelake import storage
from facelake.errors import FacelakeError
from facelake.record import audit
from facelake.record.tables import ERASURES, uri
from facelake.schema import ERASURE_SCHEMA, AuditRecord
from facelake.storage import StorageOptions, utc_now

ERASURE_META = b"facelake.erasure"
ERASURE_NAME = re.compile(r"^(\d{10})\.parquet$")
ERASURE_ANCHOR_KIND = "erasure-list"


class ErasureListError(FacelakeError):
    """The erasure list of record was deleted, altered or truncated."""


def _erasure_files(root: str, options: StorageOptions | None) -> dict[int, str]:
    """{seq: uri} of the chain's entries; any other file in ROOT/erasures is refused."""
    files = {}
    fs, path = storage.filesystem(uri(root, ERASURES), options)
    fs.invalidate_cache(path)
    for file_uri in storage.list_files(uri(root, ERASURES), options=options):
        name = file_uri.rstrip("/").rsplit("/", 1)[-1]
        match = ERASURE_NAME.match(name)
        if match:
            files[int(match.group(1))] = file_uri
        elif ".tmp-" not in name:
            raise ErasureListError(f"{storage.redact(file_uri)} is not part of the erasure list (added or "
                                   f"renamed): move it out of ROOT/erasures, or restore the folder from a "
                                   f"backup; nothing is published until the list verifies")
    return files


def _anchor(root: str, options: StorageOptions | None) -> dict | None:
    """The newest erasure-list head recorded in the audit log ({"seq", "sha256"}), if any.

    Reads records newest first and stops at the first anchor, so its cost is the number of
    records since the last erase (all of them on a root never erased).
    """
    chain, _other = audit.chain_files(root, options)
    for seq in sorted(chain, reverse=True):
        try:
            record = AuditRecord.from_json(storage.read_bytes(chain[seq], options))
        except (ValueError, TypeError):
            continue  # reported by `facelake audit`; the chain check names it
        if record.kind == ERASURE_ANCHOR_KIND and isinstance(record.details.get("head"), dict):
            return record.details["head"]
    return None


def erasure_log(root: str, options: StorageOptions | None = None) -> tuple[pa.Table, dict | None]:
    """(the erasure list of record, its head {"seq", "sha256"} or None), chain and anchor checked."""
    files = _erasure_files(root, options)
    tables, prev, head = [], None, None
    fix = "restore ROOT/erasures from a backup (facelake audit ROOT lists the erasures); nothing is published until then"
    for seq in range(1, max(files, default=0) + 1):
        if seq not in files:
            raise ErasureListError(f"erasure list entry {seq} is missing (deleted): {fix}")
        data = storage.read_bytes(files[seq], options)
        try:
            table = pq.read_table(io.BytesIO(data))
            meta = json.loads((table.schema.metadata or {})[ERASURE_META])
        except (pa.ArrowException, KeyError, ValueError) as err:
            raise ErasureListError(f"erasure list entry {seq} is unreadable ({type(err).__name__}): {fix}") from err
        if meta.get("seq") != seq or meta.get("prev_sha256") != prev:
            raise ErasureListError(f"erasure list entry {seq} does not follow entry {seq - 1} (altered or "
                                   f"replaced): {fix}")
        prev = storage.sha256(data)
        head = {"seq": seq, "sha256": prev}
        tables.append(table.cast(ERASURE_SCHEMA).replace_schema_metadata(None))
    anchor = _anchor(root, options)
    if anchor is not None:
        at = anchor.get("seq", 0)
        if at > (head or {}).get("seq", 0):
            raise ErasureListError(f"the audit log records {at} erasure list entries but ROOT/erasures holds "
                                   f"{len(files)}: entries were deleted; {fix}")
        if at and storage.sha256(storage.read_bytes(files[at], options)) != anchor.get("sha256"):
            raise ErasureListError(f"erasure list entry {at} differs from what the audit log recorded: {fix}")
    table = pa.concat_tables(tables) if tables else ERASURE_SCHEMA.empty_table()
    return table, head


def erasures(root: str, options: StorageOptions | None = None) -> pa.Table:
    """The erasure list of record, oldest first (ErasureListError when it does not verify)."""
    return erasure_log(root, options)[0]


def erased_ids(root: str, options: StorageOptions | None = None) -> pa.Array:
    """Every image id ever erased from ROOT (ErasureListError when the list does not verify)."""
    return pc.unique(erasures(root, options)["image_id"].combine_chunks())


def append_erasure(root: str, counts: dict[str, tuple[int, int]], *, reason: str, job_id: str,
                   options: StorageOptions | None = None) -> dict:
    """Append ids with their (faces, error rows) counts as the next link; returns the new head.

    The head is then anchored in the audit log (kind "erasure-list"), so removing this entry
    later is detected.
    """
    person = audit.who()
    for _ in range(20):
        _table, head = erasure_log(root, options)
        seq = (head or {}).get("seq", 0) + 1
        now = utc_now()
        ids = sorted(counts)
        table = pa.table({
            "image_id": ids, "reason": [reason] * len(ids), "user": [person["user"]] * len(ids),
            "claimed_user": [person["claimed_user"]] * len(ids), "erased_at": [now] * len(ids),
            "job_id": [job_id] * len(ids), "faces": [counts[i][0] for i in ids],
            "error_rows": [counts[i][1] for i in ids]}, schema=ERASURE_SCHEMA)
        table = table.replace_schema_metadata({ERASURE_META: json.dumps(
            {"seq": seq, "prev_sha256": (head or {}).get("sha256"), "job_id": job_id}).encode()})
        data = storage.parquet_bytes(table)
        try:
            storage.write_bytes_new(uri(root, ERASURES, f"{seq:010d}.parquet"), data, options)
        except FileExistsError:
            continue
        new_head = {"seq": seq, "sha256": storage.sha256(data)}
        audit.write_record(root, {"job_id": f"{job_id}-list", "kind": ERASURE_ANCHOR_KIND, "erase_job": job_id,
                                  "head": new_head, "ids_count": len(ids)}, options)
        return new_head
    raise ErasureListError(f"could not append to the erasure list of {storage.redact(root)}: it kept changing; retry")


def refuse_erased(image_ids: pa.Array | pa.ChunkedArray, erased: pa.Array, what: str) -> None:
    """Raise ErasureListError if ``image_ids`` (a version about to be published) hold an erased id.

    Every publisher (index, rebuild, erase) calls this with the image ids of the version it is
    about to make live, just before it writes the pointer.
    """
    if not len(erased) or not len(image_ids):
        return
    held = pc.unique(pc.filter(image_ids, pc.is_in(image_ids, value_set=erased)))
    if len(held):
        raise ErasureListError(f"refusing to publish {what}: it holds {len(held)} erased image id(s) "
                               f"(the erasure list of record names them); the publisher must filter the "
                               f"erasure list (index, rebuild and erase do) - nothing was published")
