"""A table version written by units in Ray tasks (jobs/work/units.py) equals the one written in the
driver (facelake.record.tables map_local), and a unit killed in a task leaves the old version live.

Real files, real local Ray: synthetic parts here (rewrites, staged sources with stats,
compaction), then whole rebuilds and erases on sample photos (task path forced by thresholds 0).
"""

from __future__ import annotations

import os
import shutil

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pytest

from facelake import faults, storage
from facelake.record import tables as rootmod
from facelake.jobs.work import units as tasks
# imported here, not in a test: importing tests.conftest again (as this does) sets a new
# FACELAKE_FAULTS folder, which must happen before Ray starts so that workers see the same one
from tests.helpers import (ADDED, BASE, Crash, assert_record_consistent, crash, fails_at_armed_fault, put_photos, rebuild,
                           write_manifest)

NO_IDS = pa.array([], pa.string())


def _faces(prefix: str, images: int, per_image: int = 2, stats: bool = True) -> pa.Table:
    ids = [f"{prefix}-{i:04d}" for i in range(images) for _ in range(per_image)]
    n = len(ids)
    columns = {"image_id": ids, "face_index": [k % per_image for k in range(n)],
               "embedding": pa.array(list(np.random.default_rng(len(prefix)).random((n, 4), np.float32)),
                                     pa.list_(pa.float32())),
               "uri": [f"/p/{i}.jpg" for i in ids], "content_sha256": ["0" * 64] * n}
    if stats:
        columns.update(source_size=pa.array([1] * n, pa.int64()), source_mtime_ns=pa.array([1] * n, pa.int64()),
                       source_etag=pa.nulls(n, pa.string()))
    return pa.table(columns)


def _errors(prefix: str, images: int) -> pa.Table:
    ids = [f"{prefix}-{i:04d}" for i in range(images)]
    return pa.table({"image_id": ids, "uri": [f"/p/{i}.jpg" for i in ids], "stage": ["decode"] * images,
                     "error_type": ["Corrupt"] * images, "message": ["m"] * images,
                     "content_sha256": pa.nulls(images, pa.string())})


def _base(root: str) -> rootmod.TableVersion:
    """15 small face parts (one more triggers compaction) and two error parts."""
    version = None
    for k in range(15):
        add = {rootmod.FACES: _faces(f"b{k:02d}", 5)}
        if k < 2:
            add[rootmod.ERRORS] = _errors(f"e{k}", 3)
        version = rootmod.write_version(root, version, drop_ids=NO_IDS, add=add, model="m", job_id=f"j{k}")
    return version


def _sorted(root: str, kind: str) -> list[dict]:
    table = rootmod.read_table(root, kind)
    if table is None:
        return []
    keys = ["image_id", "face_index"] if kind == rootmod.FACES else ["image_id"]
    return table.sort_by([(k, "ascending") for k in keys]).to_pylist()


def _change(root: str, staging: str, map_fn) -> rootmod.TableVersion:
    """Drop ids from three parts (and an error), add staged faces and errors with stats of now."""
    base = rootmod.current(root)
    drop = pa.array(["b00-0001", "b03-0000", "b07-0004", "e1-0002", "b05-0002"], pa.string())
    staged = (f"{staging}/faces/s0.parquet", f"{staging}/faces/s1.parquet")
    added = pa.array(["n-0000", "n-0002", "m-0001", "n-0003", "b05-0002"], pa.string())  # n-0001 staged, not wanted
    stats = pa.table({"image_id": added, "source_size": pa.array([7, 8, 9, 10, 11], pa.int64()),
                      "source_mtime_ns": pa.array([70, 80, 90, 100, 110], pa.int64()),
                      "source_etag": pa.nulls(5, pa.string())})
    sources = [rootmod.Added(rootmod.FACES, staged, added),
               rootmod.Added(rootmod.ERRORS, (f"{staging}/errors/s0.parquet",), added),
               # a re-stated image: its rows of record, with the stat of now
               rootmod.Added(rootmod.FACES, (rootmod.uri(root, rootmod.FACES, base.faces[5]),), added)]
    return rootmod.write_version(root, base, drop_ids=drop, sources=sources, stats=stats, model="m", job_id="x",
                                 map_fn=map_fn)


def _stage(staging: str) -> None:
    storage.write_table(f"{staging}/faces/s0.parquet", _faces("n", 3, per_image=3, stats=False))
    storage.write_table(f"{staging}/faces/s1.parquet", _faces("m", 2, stats=False))
    errors = _errors("n", 4).slice(3)
    storage.write_table(f"{staging}/errors/s0.parquet", errors)


def test_units_in_tasks_write_the_same_tables_as_in_the_driver(ray_local, tmp_path):
    local, in_tasks, staging = str(tmp_path / "local"), str(tmp_path / "tasks"), str(tmp_path / "staging")
    _base(local)
    shutil.copytree(local, in_tasks)
    _stage(staging)
    one = _change(local, staging, rootmod.map_local)
    two = _change(in_tasks, staging, tasks.ray_map)
    for kind in rootmod.KINDS:
        assert _sorted(local, kind) == _sorted(in_tasks, kind)
    assert (one.face_rows, one.error_rows, one.images) == (two.face_rows, two.error_rows, two.images)
    faces = rootmod.read_faces(in_tasks)
    assert two.images == len(pc.unique(faces["image_id"])) and two.face_rows == faces.num_rows
    assert len(two.faces) < 15, "the small parts were compacted"
    got = {r["image_id"]: r["source_size"] for r in faces.select(["image_id", "source_size"]).to_pylist()}
    assert "n-0001" not in got and got["n-0002"] == 8 and got["m-0001"] == 9 and got["b05-0002"] == 11
    assert not {"b00-0001", "b03-0000", "b07-0004"} & set(got)
    assert "e1-0002" not in rootmod.read_errors(in_tasks)["image_id"].to_pylist()
    assert set(rootmod.read_errors(in_tasks)["image_id"].to_pylist()) >= {"n-0003"}


def test_the_task_map_only_past_the_threshold(ray_local):
    assert tasks.table_map(10) is rootmod.map_local
    assert tasks.table_map(10, driver_rows=0) is tasks.ray_map
    assert tasks.table_map(0, driver_rows=0) is rootmod.map_local


@pytest.mark.parametrize("path", ["tasks", "local"])
def test_a_unit_killed_before_the_pointer_leaves_the_old_version_live(path, ray_local, tmp_path):
    root, staging = str(tmp_path / "root"), str(tmp_path / "staging")
    before = _base(root)
    _stage(staging)
    rows = {kind: _sorted(root, kind) for kind in rootmod.KINDS}
    map_fn = tasks.ray_map if path == "tasks" else rootmod.map_local
    with faults.armed("table.part", after=2):   # two units write their parts, the third dies
        fails_at_armed_fault(lambda: _change(root, staging, map_fn))
    assert rootmod.current(root) == before
    assert {kind: _sorted(root, kind) for kind in rootmod.KINDS} == rows
    orphans = rootmod.collect_garbage(root)
    assert orphans and all(f"part-{before.name}" not in o for o in orphans)
    after = _change(root, staging, map_fn)
    faces = rootmod.read_faces(root)
    keys = list(zip(faces["image_id"].to_pylist(), faces["face_index"].to_pylist()))
    assert len(keys) == len(set(keys)) == after.face_rows
    assert after.images == len(pc.unique(faces["image_id"]))


# ---------------------------------------------------------------------------- whole jobs


def test_rebuild_and_erase_write_the_same_record_in_tasks_and_in_the_driver(ray_local, provisioned_weights,
                                                                           tmp_path, monkeypatch):
    from facelake.jobs.work import changes as rebuild_plan
    from facelake.jobs.erase import EraseConfig, run_erase

    photos, manifest_uri = str(tmp_path / "photos"), str(tmp_path / "m.parquet")
    local, in_tasks = str(tmp_path / "local"), str(tmp_path / "tasks")
    put_photos(photos, BASE + ADDED)
    write_manifest(manifest_uri, BASE, photos)
    rebuild(manifest_uri, local)
    # the change: img1 removed, img3 touched (same bytes, new mtime: re-stated), ADDED new
    write_manifest(manifest_uri, BASE[1:] + ADDED, photos)
    os.utime(f"{photos}/img3.jpg", ns=(1_800_000_000 * 10**9, 1_800_000_000 * 10**9))
    with faults.armed("rebuild.after_embed", crash), pytest.raises(Crash):
        rebuild(manifest_uri, local)      # both roots then record the same staged faces
    shutil.copytree(local, in_tasks)

    in_driver = rebuild(manifest_uri, local)
    monkeypatch.setattr(rebuild_plan, "DRIVER_ROWS", 0)       # archive-scale paths: plan and table in tasks
    assert tasks.table_map(1, rebuild_plan.DRIVER_ROWS) is tasks.ray_map
    by_tasks = rebuild(manifest_uri, in_tasks)
    for summary in (in_driver, by_tasks):
        assert (summary.outcome, summary.new, summary.removed, summary.restat) == ("published", len(ADDED), 1, 1)
    assert (in_driver.faces, in_driver.images, in_driver.errors) == (by_tasks.faces, by_tasks.images, by_tasks.errors)
    for kind in rootmod.KINDS:
        assert _sorted(local, kind) == _sorted(in_tasks, kind)
    assert_record_consistent(in_tasks)

    for root, driver_rows in ((local, None), (in_tasks, 0)):   # 0: Ray tasks for the scan and the rewrite
        run_erase(EraseConfig(root=root, ids=("img6",), reason="test", driver_rows=driver_rows))
    for kind in rootmod.KINDS:
        assert _sorted(local, kind) == _sorted(in_tasks, kind)
    assert rootmod.current(local).images == rootmod.current(in_tasks).images
    assert "img6" not in rootmod.read_faces(in_tasks)["image_id"].to_pylist()

    # killed between the tasks' writes and ROOT/TABLE: the old version stays live, a rerun completes
    write_manifest(manifest_uri, BASE[1:] + ADDED[:2], photos)           # img10 removed
    before = rootmod.current(in_tasks)
    with faults.armed("table.part", after=0):
        fails_at_armed_fault(lambda: rebuild(manifest_uri, in_tasks))
    assert rootmod.current(in_tasks) == before
    done = rebuild(manifest_uri, in_tasks)
    assert done.outcome == "published" and done.removed == 1
    faces = assert_record_consistent(in_tasks)
    assert "img10" not in faces["image_id"].to_pylist() and done.images == len(pc.unique(faces["image_id"]))

    before = rootmod.current(in_tasks)
    erase = EraseConfig(root=in_tasks, ids=("img3",), reason="test", driver_rows=0)
    with faults.armed("erase.before_table_pointer", crash), pytest.raises(Crash):
        run_erase(erase)
    assert rootmod.current(in_tasks) == before
    run_erase(erase)
    faces = assert_record_consistent(in_tasks)
    assert set(faces["image_id"].to_pylist()) == {"img2"}
    assert rootmod.current(in_tasks).images == len(pc.unique(faces["image_id"]))


def _footers(root: str, version: rootmod.TableVersion, kind: str) -> tuple[int, ...]:
    return tuple(rootmod._rows_of(root, kind, part, None) for part in version.parts(kind))


def test_kept_parts_take_their_row_counts_from_the_record(tmp_path, monkeypatch):
    """A version records each part's rows; the next version keeps the untouched parts without
    reading their footers (one read per part of the archive, every night, in the driver); a
    version written before counts were recorded still counts from its footers."""
    import dataclasses

    root = str(tmp_path / "root")
    base = _base(root)
    for kind in rootmod.KINDS:
        assert base.part_rows(kind) == _footers(root, base, kind) and sum(base.part_rows(kind)) > 0
    assert rootmod.current(root).face_part_rows == base.face_part_rows          # as read back from JSON
    footer_reads = []
    read_footer = rootmod._rows_of
    monkeypatch.setattr(rootmod, "_rows_of", lambda *a: footer_reads.append(a[2]) or read_footer(*a))

    drop = pa.array(["b03-0000"], pa.string())
    new = rootmod.write_version(root, base, drop_ids=drop, holding={(rootmod.FACES, base.faces[3])},
                                model="m", job_id="y")
    assert footer_reads == []
    for kind in rootmod.KINDS:
        assert new.part_rows(kind) == _footers(root, new, kind)
    assert new.face_rows == rootmod.read_faces(root).num_rows == base.face_rows - 2     # both its faces

    footer_reads.clear()                                # _footers above read them through the spy
    legacy = dataclasses.replace(new, face_part_rows=None, error_part_rows=None)
    drop = pa.array(["b04-0001"], pa.string())
    newer = rootmod.write_version(root, legacy, drop_ids=drop, holding={(rootmod.FACES, new.faces[4])},
                                  model="m", job_id="z")
    assert len(footer_reads) == len(new.faces) + len(new.errors) - 1
    assert newer.face_rows == rootmod.read_faces(root).num_rows == new.face_rows - 2
    assert rootmod.TableVersion.from_dict({**newer.to_dict(), "face_part_rows": [1]}).face_part_rows is None
