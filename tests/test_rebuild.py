"""`facelake rebuild` on real sample photos, real Ray and faiss: increments, removal, crash recovery.

Crashes are injected at the job's own fault points (facelake.faults) at each stage (in the embed
actor, after embedding, before the table pointer, before the index manifest, before CURRENT), one
after another, each rerun getting past the previous crash point; on local storage and on the
loopback S3 endpoint.
"""

from __future__ import annotations

import json
import shutil

import numpy as np
import pyarrow.compute as pc
import pytest

from facelake import faults, storage
from facelake.record import tables as rootmod
from facelake.index import layout
from facelake.index.load import load_ids, open_version
from facelake.index.searchers import search_version
from facelake.jobs.embed import done_image_ids
from facelake.faces.registry import get_model
from facelake.index.publish import retrain_reason
from tests.helpers import (ADDED, BASE, SAMPLE_DIR, Crash, assert_record_consistent, crash, fails_at_armed_fault,
                           put_photos, rebuild, start_local_ray, write_manifest)


def found_image_ids(root: str, vectors: np.ndarray, k: int = 10) -> set[str]:
    handle = open_version(root)
    _, I = search_version(handle, vectors, k)
    table = load_ids(handle)     # faiss ids are not row numbers (gaps; versions extended by rebuild)
    ids = dict(zip(table["faiss_id"].to_pylist(), table["image_id"].to_pylist()))
    return {ids[i] for i in I.ravel() if i >= 0}


def test_add_change_remove_and_nothing_changed(ray_local, provisioned_weights, tmp_path):
    photos, root = str(tmp_path / "photos"), str(tmp_path / "root")
    manifest_uri = str(tmp_path / "manifest.parquet")
    put_photos(photos, BASE + ADDED[:2])
    write_manifest(manifest_uri, BASE, photos)

    first = rebuild(manifest_uri, root)
    assert first.outcome == "published" and first.embed["images"] == 2 and first.new == 2
    v1 = layout.current_version(root)
    assert v1 == first.index_version and first.retrained

    again = rebuild(manifest_uri, root)
    assert again.outcome == "nothing-changed" and again.embed is None and again.to_embed == 0
    assert layout.list_versions(root) == [v1] and layout.current_version(root) == v1

    write_manifest(manifest_uri, BASE + ADDED[:2], photos)
    added = rebuild(manifest_uri, root)
    assert (added.new, added.changed, added.removed) == (2, 0, 0)
    assert added.embed["manifest_rows"] == 2 and added.embed["images"] == 2   # only the new photos
    assert added.index_version != v1
    # 4 faces is within 2x of 2, so only drift can force a retrain (tiny collections do drift)
    assert open_version(root).manifest["trained_from"] == (None if added.retrained else v1)
    assert added.retrained is False or "fell" in added.retrain_reason
    assert_record_consistent(root)

    # the same image id now holds another photo: detected by content hash, re-embedded alone
    shutil.copy(SAMPLE_DIR / "img4.jpg", f"{photos}/{ADDED[0]}")
    changed = rebuild(manifest_uri, root)
    assert (changed.new, changed.changed, changed.removed) == (0, 1, 0) and changed.embed["images"] == 1
    faces = assert_record_consistent(root)
    sha = faces.filter(pc.equal(faces["image_id"], ADDED[0].split(".")[0]))["content_sha256"].to_pylist()
    from facelake.faces.imaging import content_sha256
    assert set(sha) == {content_sha256((SAMPLE_DIR / "img4.jpg").read_bytes())}

    # a photo no longer listed: its faces leave the record and the search
    gone = "img1"
    vectors = np.array(faces.filter(pc.equal(faces["image_id"], gone))["embedding"].to_pylist(), np.float32)
    assert gone in found_image_ids(root, vectors)
    write_manifest(manifest_uri, [n for n in BASE + ADDED[:2] if n != "img1.jpg"], photos)
    removed = rebuild(manifest_uri, root)
    assert (removed.new, removed.changed, removed.removed) == (0, 0, 1) and removed.embed is None
    faces = assert_record_consistent(root)
    assert gone not in faces["image_id"].to_pylist()
    assert gone not in found_image_ids(root, vectors)
    assert rebuild(manifest_uri, root).outcome == "nothing-changed"


@pytest.mark.parametrize("where", ["local", "s3"])
def test_crash_at_each_stage_then_resume_without_duplicates(where, ray_local, provisioned_weights, tmp_path, request,
                                                            monkeypatch):
    # archive-scale paths, forced: the change detection (jobs/work/changes.py) and the staging's
    # resume (jobs/work/resume.py) run in hash-partitioned tasks (the other tests here plan in the driver)
    from facelake.jobs.work import changes as rebuild_plan
    from facelake.jobs.work import resume
    monkeypatch.setattr(rebuild_plan, "DRIVER_ROWS", 0)
    monkeypatch.setattr(resume, "DRIVER_ROWS", 0)
    base = str(tmp_path) if where == "local" else request.getfixturevalue("s3_bucket")
    photos, root, manifest_uri = f"{base}/photos", f"{base}/root", f"{base}/manifest/m.parquet"
    put_photos(photos, BASE + ADDED)
    write_manifest(manifest_uri, BASE, photos)
    v0 = rebuild(manifest_uri, root).index_version
    table0 = rootmod.read_pointer(root)["table_version"]
    write_manifest(manifest_uri, BASE + ADDED, photos)

    def old_still_live(table_moved: bool = False) -> None:
        assert layout.current_version(root) == v0
        assert (rootmod.read_pointer(root)["table_version"] != table0) == table_moved
        assert found_image_ids(root, np.array(rootmod.read_faces(root)["embedding"].to_pylist()[:1], np.float32))

    # The embed actor's own death runs locally only: on the S3 run Ray Data kept the failed run's
    # actor (and its CPU) alive after the error was dropped, which starves the next build (open).
    stages = [("embed.chunk", False)] if where == "local" else []
    staged_by_killed = 0
    for stage, table_moved in stages + [("rebuild.after_embed", False), ("rebuild.before_table_pointer", False),
                                        ("index.before_manifest", True), ("index.before_pointer", True)]:
        if stage == "embed.chunk":   # the one embed actor dies before its second chunk (in its own process)
            with faults.armed(stage, after=1):
                fails_at_armed_fault(lambda: rebuild(manifest_uri, root), free_cpus=False)
            # Open problem (README, Noticed): Ray Data may keep the failed run's actor and its CPU;
            # in the full suite that starved the next stage. A fresh local Ray, as after a crash.
            start_local_ray()
        else:
            with faults.armed(stage, crash), pytest.raises(Crash):
                rebuild(manifest_uri, root)
        old_still_live(table_moved)
        if stage == "embed.chunk":
            (run,) = rootmod.staging_runs(root)  # the killed run's staged faces are kept for the next run
            staged_by_killed = len(done_image_ids(f"{root}/staging/{run}", get_model()))
            assert 1 <= staged_by_killed < len(ADDED)
        if stage == "rebuild.after_embed":  # the run after the killed one embedded only what was not staged yet
            (run,) = rootmod.staging_runs(root)
            (summary_uri,) = storage.list_files(f"{root}/staging/{run}/_runs", ".json")
            staged = json.loads(storage.read_bytes(summary_uri))
            assert staged["skipped_done"] == staged_by_killed and staged["skipped_done"] + staged["images"] == len(ADDED)
    # every crashed run after the first found the staged images and embedded only the rest
    done = rebuild(manifest_uri, root)
    assert done.outcome == "published" and done.embed is None and done.to_embed == 0
    assert layout.current_version(root) == done.index_version != v0
    faces = assert_record_consistent(root)
    assert set(faces["image_id"].to_pylist()) == {n.split(".")[0] for n in BASE + ADDED}
    assert not rootmod.staging_runs(root)
    # base run + the run that finished embedding; later runs found everything staged and embedded nothing
    runs = [json.loads(storage.read_bytes(u)) for u in storage.list_files(f"{root}/_runs", ".json")]
    assert len(runs) == 2 and sum(r["images"] for r in runs) + staged_by_killed == len(BASE) + len(ADDED)
    assert rebuild(manifest_uri, root).outcome == "nothing-changed"


def test_retrain_bound():
    live = {"model": "m", "nlist": 4}
    q = {"faces": 1000, "mean_similarity": 0.5}
    assert retrain_reason(1500, q, live, "m", 0.48, False) is None
    assert "x2" in retrain_reason(2001, q, live, "m", 0.5, False)
    assert "x2" in retrain_reason(499, q, live, "m", 0.5, False)
    assert "fell" in retrain_reason(1000, q, live, "m", 0.44, False)
    assert retrain_reason(1000, q, live, "m", 0.5, True) == "--full"
    assert retrain_reason(1000, None, None, "m", None, False)
