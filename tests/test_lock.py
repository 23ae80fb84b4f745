"""ROOT/lock: one rebuild or erase at a time; stale locks taken over and audited; local and S3."""

from __future__ import annotations

import datetime as dt
import json
import subprocess
import sys
import threading
import time

import pytest

from facelake import faults, storage
from facelake.record import audit
from facelake.errors import LockError
from facelake.jobs.rebuild import RebuildConfig, run_rebuild
from facelake.record.lock import RootLock, lock_uri, read_lock
from tests.helpers import sample_manifest


@pytest.fixture(params=["local", "s3"])
def root(request, tmp_path):
    if request.param == "local":
        return str(tmp_path / "root")
    return request.getfixturevalue("s3_bucket") + "/root"


def _write_lock(root: str, **body) -> None:
    base = {"owner": "ghost", "host": "elsewhere", "pid": 1, "job_id": "rebuild-old", "token": "t0",
            "acquired_at": "2026-01-01T00:00:00Z", "expires_at": "2026-01-01T00:10:00Z", "ttl_s": 600}
    storage.write_bytes_atomic(lock_uri(root), json.dumps({**base, **body}).encode())


def test_second_holder_fails_naming_owner_and_expiry(root):
    with RootLock(root, "rebuild-a") as first:
        with pytest.raises(LockError) as err:
            RootLock(root, "erase-b").acquire()
        text = str(err.value)
        assert "rebuild-a" in text and first.body["expires_at"] in text and first.body["owner"] in text
        first.verify()
    assert read_lock(root) is None
    with RootLock(root, "erase-b"):  # free again after release
        pass


def test_stale_lock_is_taken_over_logged_and_audited(root, caplog):
    _write_lock(root)
    with caplog.at_level("WARNING", logger="facelake.record.lock"):
        with RootLock(root, "rebuild-new") as lock:
            assert lock.taken_over["job_id"] == "rebuild-old"
            assert read_lock(root)["job_id"] == "rebuild-new"
    assert any("took over the stale lock" in r.message and "rebuild-old" in r.message for r in caplog.records)
    (record,) = audit.list_records(root, kind="lock-takeover")
    assert record["previous"]["job_id"] == "rebuild-old" and "token" not in record["previous"]
    assert record["by_job"] == "rebuild-new" and record["reason"].startswith("expired")


def test_lock_of_a_dead_local_process_is_stale_at_once(tmp_path):
    import socket

    root = str(tmp_path / "root")
    proc = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    future = (dt.datetime.now(dt.timezone.utc) + dt.timedelta(hours=1)).isoformat(timespec="seconds")
    _write_lock(root, host=socket.gethostname(), pid=int(proc.stdout), expires_at=future)
    with RootLock(root, "rebuild-next") as lock:
        assert "is gone" in audit.list_records(root, kind="lock-takeover")[0]["reason"]
        assert lock.taken_over["pid"] == int(proc.stdout)


def test_lost_lock_is_noticed_before_commit(root):
    lock = RootLock(root, "rebuild-a", heartbeat=False).acquire()
    _write_lock(root, token="intruder", expires_at="2099-01-01T00:00:00Z", job_id="rebuild-x")
    lock.renew()
    with pytest.raises(LockError, match="lost the lock.*rebuild-x"):
        lock.verify()
    lock.release()  # must not delete the intruder's lock
    assert read_lock(root)["job_id"] == "rebuild-x"


def test_heartbeat_pushes_expiry_forward(tmp_path):
    root = str(tmp_path / "root")
    with RootLock(root, "rebuild-a", ttl_s=0.8) as lock:
        first = read_lock(root)["expires_at"]
        # expires_at has whole seconds: renewals every ttl/4 move it within about a second
        deadline = time.monotonic() + 10
        while read_lock(root)["expires_at"] <= first and time.monotonic() < deadline:
            time.sleep(0.05)
        assert read_lock(root)["expires_at"] > first
        lock.verify()


def test_concurrent_rebuilds_second_fails_while_first_holds_the_lock(tmp_path, ray_local):
    """Two real run_rebuild calls: the second fails with LockError while the first holds ROOT/lock."""
    manifest_uri = str(tmp_path / "m.parquet")
    storage.write_table(manifest_uri, sample_manifest(["img1.jpg", "img2.jpg"]))
    root = str(tmp_path / "root")
    holding, finish = threading.Event(), threading.Event()
    failures = []

    def hold(job_id):
        holding.set()
        finish.wait(30)
        raise RuntimeError("first rebuild stops here (test)")

    def first():
        try:
            with faults.armed("rebuild.locked", hold):
                run_rebuild(RebuildConfig(manifest=manifest_uri, root=root, progress=False))
        except RuntimeError as err:
            failures.append(err)

    thread = threading.Thread(target=first)
    thread.start()
    assert holding.wait(30)
    try:
        with pytest.raises(LockError, match="locked by .*rebuild-"):
            run_rebuild(RebuildConfig(manifest=manifest_uri, root=root, progress=False))
    finally:
        finish.set()
        thread.join(30)
    assert failures and read_lock(root) is None
    failed, refused = sorted(audit.list_records(root, kind="rebuild"), key=lambda r: "LockError" in r["error"])
    assert failed["outcome"] == "failed" and failed["status"] == "failed" and "stops here" in failed["error"]
    assert refused["status"] == "failed" and "LockError" in refused["error"]   # audited before the lock
