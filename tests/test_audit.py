"""The audit log: written first, ended on every path, attributed to the OS user, hash-chained and
verifiable, read past malformed files; CURRENT refused when rolled back. Locally and on loopback S3."""

from __future__ import annotations

import json
import os
import signal

import numpy as np
import pyarrow as pa
import pytest
from typer.testing import CliRunner

from facelake import faults, storage
from facelake.record import audit
from facelake.errors import IndexVersionError
from facelake.index import build, layout, synthetic
from facelake.index.load import open_version
from facelake.jobs import cli, search
from facelake.jobs.status import collect
from facelake.faces.registry import get_model, weights_fingerprint
from facelake.schema import AuditRecord

MODEL = "sface-yunet"
WEIGHTS = weights_fingerprint(get_model(MODEL))


def _app():
    if not cli.app.registered_commands:
        cli._register_all()
    return cli.app


def invoke(*args: str):
    return CliRunner().invoke(_app(), list(args))


def faces_table(xb: np.ndarray, prefix: str = "img") -> pa.Table:
    n, d = xb.shape
    return pa.table({
        "image_id": pa.array([f"{prefix}-{i:05d}" for i in range(n)]),
        "face_index": pa.array(np.zeros(n, np.int32)),
        "uri": pa.array([f"/photos/{prefix}-{i}.jpg" for i in range(n)]),
        "bbox": pa.array([[0, 0, 32, 32]] * n, type=pa.list_(pa.int32(), 4)),
        "embedding": pa.FixedSizeListArray.from_arrays(pa.array(xb.ravel(), pa.float32()), d),
        "model": pa.array([MODEL] * n), "weights_sha256": pa.array([WEIGHTS] * n)})


@pytest.fixture(scope="module")
def indexed(ray_local, tmp_path_factory):
    """A root with one published version of 500 synthetic 128-d faces, and probes."""
    base = tmp_path_factory.mktemp("audit")
    xb = synthetic.clustered(500, 128, seed=3)
    build.build_version(faces_table(xb), str(base / "root"), build.BuildOptions(model=MODEL, weights_sha256=WEIGHTS))
    storage.write_table(str(base / "probes.parquet"), faces_table(synthetic.queries(xb, 300), "q"))
    return base


def _search(base, out, root=None):
    return search.run_search(search.SearchConfig(probes=str(base / "probes.parquet"), root=str(root or base / "root"),
                                                 out=str(out), purpose="audit test", executor="local"))


def test_search_refuses_to_run_when_its_audit_record_cannot_be_written(indexed, tmp_path):
    root = tmp_path / "root"
    for path in (indexed / "root" / "index").iterdir():         # the same index, another root
        if path.is_dir():
            for f in path.iterdir():
                storage.write_bytes_atomic(str(root / "index" / path.name / f.name), f.read_bytes())
        else:
            storage.write_bytes_atomic(str(root / "index" / path.name), path.read_bytes())
    (root / "audit").write_text("not a folder")                 # the audit log cannot be written
    with pytest.raises(audit.AuditError, match="nothing was done"):
        _search(indexed, tmp_path / "out", root=root)
    # before: complete results and no record (exit 1, FileExistsError)
    assert not (tmp_path / "out").exists()


def test_sigterm_and_sigint_end_the_record_as_interrupted(indexed, tmp_path):
    def signal_self(signum):
        def hook(summary):
            os.kill(os.getpid(), signum)
        return hook

    with pytest.raises(audit.JobInterrupted), faults.armed("search.after_batch", signal_self(signal.SIGTERM)):
        search.run_search(search.SearchConfig(probes=str(indexed / "probes.parquet"), root=str(indexed / "root"),
                                              out=str(tmp_path / "a"), purpose="sigterm", executor="local",
                                              batch_size=100))
    # a shell starts background jobs with SIGINT ignored (Python then raises no KeyboardInterrupt):
    # give this process the interactive default that a Ctrl-C meets
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        with pytest.raises(KeyboardInterrupt), faults.armed("search.after_batch", signal_self(signal.SIGINT)):
            search.run_search(search.SearchConfig(probes=str(indexed / "probes.parquet"), root=str(indexed / "root"),
                                                  out=str(tmp_path / "b"), purpose="sigint", executor="local",
                                                  batch_size=100))
    finally:
        signal.signal(signal.SIGINT, previous)
    assert signal.getsignal(signal.SIGTERM) is not audit._raise_interrupted       # handler restored
    by_purpose = {r["purpose"]: r for r in audit.list_records(str(indexed / "root"), "search")}
    for purpose in ("sigterm", "sigint"):
        record = by_purpose[purpose]
        assert record["status"] == "interrupted" and record["counts"]["searched_faces"] == 100
        assert record["out"] == str(tmp_path / ("a" if purpose == "sigterm" else "b"))
    assert not list((tmp_path / "a").glob("results/*.parquet"))     # no partial candidate list
    # before: status listed failed jobs by rebuild's `outcome`, so failed searches never showed
    failed = {j["job_id"] for j in collect(str(indexed / "root"))["failed_jobs"]}
    assert {by_purpose["sigterm"]["job_id"], by_purpose["sigint"]["job_id"]} <= failed


def test_records_are_typed_chained_and_attributed_to_the_os_user(indexed, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("FACELAKE_USER", "someone-else")
    summary = _search(indexed, tmp_path / "out")
    log = audit.read_log(str(indexed / "root"))
    mine = [r for r in log.records if r.job_id == summary.job_id]
    assert [r.status for r in mine] == ["started", "succeeded"]          # started first, then the end
    assert all(isinstance(r, AuditRecord) for r in log.records) and not log.problems
    end = mine[-1]
    assert end.os_user == audit.os_user() and end.claimed_user == "someone-else" and end.os_user != "someone-else"
    assert end.details["out"] == str(tmp_path / "out") and end.ended_at >= end.started_at
    assert [r.seq for r in log.records] == list(range(1, len(log.records) + 1))
    assert audit.verify(str(indexed / "root")) == (len(log.records), None)
    listing = invoke("audit", str(indexed / "root"))
    assert listing.exit_code == 0 and "(as someone-else)" in listing.output


def _chain(root: str, n: int = 5) -> None:
    for i in range(n):
        audit.write_record(root, {"job_id": f"job-{i}", "kind": "test", "status": "succeeded", "i": i})


@pytest.mark.parametrize("where", ["local", "s3"])
def test_verify_names_the_first_broken_link(where, tmp_path, request):
    root = str(tmp_path / "root") if where == "local" else f"{request.getfixturevalue('s3_bucket')}/root"
    _chain(root)
    assert audit.verify(root) == (5, None)
    ok = invoke("audit", root, "--verify")
    assert ok.exit_code == 0 and "5 record(s), hash chain intact" in ok.output
    third = audit.record_uri(root, 3)
    edited = json.loads(storage.read_bytes(third))
    edited["details"]["i"] = 99                                   # an edit anyone could make before
    storage.write_bytes_atomic(third, json.dumps(edited, indent=2, sort_keys=True).encode())
    assert audit.verify(root) == (3, audit.verify(root)[1]) and "record 4 does not follow record 3" in audit.verify(root)[1]
    broken = invoke("audit", root, "--verify")
    assert broken.exit_code == 1 and "record 4 does not follow record 3" in broken.output
    storage.remove(audit.record_uri(root, 2))
    assert "record 2 is missing" in audit.verify(root)[1]


@pytest.mark.parametrize("where", ["local", "s3"])
def test_audit_and_status_report_a_malformed_file_and_go_on(where, tmp_path, request):
    root = str(tmp_path / "root") if where == "local" else f"{request.getfixturevalue('s3_bucket')}/root"
    _chain(root, 2)
    storage.write_bytes_atomic(f"{root}/audit/notes.json", b"{not json")
    storage.write_bytes_atomic(f"{root}/audit/rebuild-old.json", json.dumps(   # a record-like file off the chain
        {"job_id": "rebuild-old", "kind": "rebuild", "outcome": "failed", "user": "u", "error": "boom"}).encode())
    storage.write_bytes_atomic(f"{root}/_runs/broken.json", b"\x00\x01")
    listing = invoke("audit", root)
    assert listing.exit_code == 1 and "job-0" in listing.output and "job-1" in listing.output
    assert "notes.json" in listing.output
    # not a record of the chain: reported as a problem, never listed as a job
    assert any("rebuild-old.json" in p for p in audit.read_log(root).problems)
    assert not [r for r in audit.read_log(root).records if r.job_id == "rebuild-old"]
    assert "is not part of the chain" in audit.verify(root)[1]
    info = collect(root)
    assert len(info["last_jobs"]) == 2 and any("notes.json" in p for p in info["problems"])
    assert any("rebuild-old.json" in p for p in info["problems"]) and not info["failed_jobs"]
    assert any("broken.json" in p for p in info["problems"])
    status = invoke("status", root)
    assert status.exit_code == 0 and "malformed (skipped)" in status.output


def test_ids_are_hashed_with_a_key_kept_out_of_the_log(tmp_path, monkeypatch):
    root = str(tmp_path / "root")
    monkeypatch.delenv(audit.KEY_ENV, raising=False)
    first = audit.id_hmac(root, ["img1"])[0]
    key_file = tmp_path / "root" / "secret" / "audit.key"
    assert key_file.exists() and oct(key_file.stat().st_mode & 0o777) == "0o600"
    assert first == audit.id_hmac(root, ["img1"])[0] and "img1" not in first
    import hashlib
    assert hashlib.sha256(b"img1").hexdigest() not in first        # the unsalted hash that was guessed back
    monkeypatch.setenv(audit.KEY_ENV, "operator-held key")
    assert audit.id_hmac(root, ["img1"])[0] != first


@pytest.mark.parametrize("where", ["local", "s3"])
def test_current_rolled_back_or_without_its_hash_is_refused(where, tmp_path, request):
    root = str(tmp_path) if where == "local" else f"{request.getfixturevalue('s3_bucket')}/root"
    names = []
    for i in range(2):
        version = layout.new_version_name(root)
        manifest = {"version": version, "total": 0}
        layout.publish(root, version, layout.write_manifest(root, version, manifest))
        names.append(version)
    old_body = storage.read_bytes(f"{root}/index/PUBLISHED.{1:010d}.json")
    assert layout.current_version(root) == names[1]
    storage.write_bytes_atomic(f"{root}/index/CURRENT", old_body)          # rolled back by hand
    with pytest.raises(IndexVersionError, match="rolled back"):
        open_version(root)
    body = json.loads(old_body)
    body.pop("manifest_sha256")
    body["seq"] = 9
    storage.write_bytes_atomic(f"{root}/index/CURRENT", json.dumps(body).encode())
    with pytest.raises(IndexVersionError, match="lacks its version, manifest_sha256"):
        layout.current_version(root)
    assert "index pointer" in " ".join(collect(root)["problems"])           # status reports it, goes on
    layout.publish(root, names[0], layout.sha256(storage.read_bytes(f"{root}/index/{names[0]}/manifest.json")))
    assert layout.current_version(root) == names[0]                       # publishing again is the way back


def test_a_ray_jobs_submitter_is_recorded_beside_the_os_user(tmp_path, monkeypatch):
    # what Ray's job supervisor sets for a submitted driver (facelake submit tags facelake_user)
    monkeypatch.setenv(audit.RAY_JOB_CONFIG_ENV, json.dumps(
        {"runtime_env": {}, "metadata": {"job_submission_id": "facelake-search-x", "facelake_user": "alice"}}))
    with audit.Job(str(tmp_path / "root"), "test") as job:
        job.details["n"] = 1
    (record,) = audit.list_records(str(tmp_path / "root"))
    assert (record["ray_job"], record["ray_submitter"], record["user"]) == ("facelake-search-x", "alice", audit.os_user())
    assert record["status"] == "succeeded" and record["n"] == 1


@pytest.mark.parametrize("where", ["local", "s3"])
def test_concurrent_appends_keep_one_chain(where, tmp_path, request):
    import threading

    root = str(tmp_path / "root") if where == "local" else f"{request.getfixturevalue('s3_bucket')}/root"
    errors = []

    def writer(w):
        try:
            for i in range(8):
                audit.write_record(root, {"job_id": f"w{w}-{i}", "kind": "test"})
        except BaseException as err:  # noqa: BLE001 - reported below
            errors.append(err)

    threads = [threading.Thread(target=writer, args=(w,)) for w in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert not errors and audit.verify(root) == (32, None)
    assert len({r["job_id"] for r in audit.list_records(root)}) == 32


def test_sigterm_under_rays_own_handler_still_ends_as_interrupted(tmp_path):
    import sys

    root = str(tmp_path / "root")
    with pytest.raises(SystemExit):
        with audit.Job(root, "test"):
            # what ray.init installs in a driver that starts Ray inside the job: sys.exit(signum)
            signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(signum))
            os.kill(os.getpid(), signal.SIGTERM)
    (record,) = audit.list_records(root)
    assert record["status"] == "interrupted" and "SystemExit" in record["error"]


def test_the_cli_killed_with_sigterm_leaves_an_interrupted_record(indexed, tmp_path):
    """The user's case: `facelake search` sent SIGTERM (a scheduler stopping it) used to leave no record."""
    import subprocess
    import sys
    import time

    root = str(indexed / "root")
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    proc = subprocess.Popen([sys.executable, "-m", "facelake.jobs.cli", "search", str(indexed / "probes.parquet"),
                             "--root", root, "--out", str(tmp_path / "out"), "--purpose", "cli sigterm"],
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, start_new_session=True)
    try:
        deadline = time.monotonic() + 120
        while not any(r["purpose"] == "cli sigterm" for r in audit.list_records(root, "search")):
            assert proc.poll() is None and time.monotonic() < deadline, "the search never wrote its started record"
            time.sleep(0.05)
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=120)
    finally:
        try:
            os.killpg(proc.pid, signal.SIGKILL)   # anything the killed driver left (its local Ray)
        except ProcessLookupError:
            pass
    (record,) = [r for r in audit.list_records(root, "search") if r["purpose"] == "cli sigterm"]
    assert record["status"] == "interrupted" and record["ended_at"], proc.stderr.read().decode()[-2000:]
    assert proc.returncode != 0 and not list((tmp_path / "out").glob("results/*.parquet"))


def test_a_failure_while_stopping_after_a_signal_still_ends_as_interrupted(tmp_path):
    """SIGTERM inside `import ray` leaves the module half initialised; the cleanup that follows
    fails with an AttributeError whose context is the signal's exception (seen once in the CLI
    SIGTERM test): the record must still say interrupted, and name both."""
    root = str(tmp_path / "root")
    with pytest.raises(AttributeError):
        with audit.Job(root, "search", details={"purpose": "stopping"}):
            try:
                raise audit.JobInterrupted("signal SIGTERM")
            finally:
                raise AttributeError("partially initialized module 'ray' has no attribute '_private'")
    with pytest.raises(RuntimeError):
        with audit.Job(root, "search", details={"purpose": "plain failure"}):
            raise RuntimeError("boom")
    records = {r["purpose"]: r for r in audit.list_records(root, "search") if r["status"] != "started"}
    assert records["stopping"]["status"] == "interrupted"
    assert "JobInterrupted" in records["stopping"]["error"] and "AttributeError" in records["stopping"]["error"]
    assert records["plain failure"]["status"] == "failed"
