"""jobs/work/changes.py: the change detection planned in hash-partitioned Ray tasks finds exactly
the new, changed, removed, erased, touched and unreadable photos, the same as the driver's plan,
with the stat of now from stat tasks (whole folders) or from the manifest's own columns."""

from __future__ import annotations

import os

import pyarrow as pa
import pytest

from facelake import storage
from facelake.faces import manifest
from facelake.record import tables as rootmod
from facelake.faces.imaging import content_sha256
from facelake.jobs.work import changes as rebuild_plan
from facelake.jobs.work.changes import ChangeConfig, plan
from facelake.jobs.work.photos import resolve_manifest

N, HELD = 300, 250


def _archive(tmp_path):
    """Photos p0..p299 in three folders; the record holds p0..p249 as they were; then the changes."""
    photos = tmp_path / "photos"
    paths = []
    for i in range(N):
        folder = photos / f"f{i % 3}"
        folder.mkdir(parents=True, exist_ok=True)
        path = folder / f"p{i}.bin"
        path.write_bytes(f"photo {i} ".encode() * (5 + i % 4))
        paths.append(path)
    faces, errors = [], []
    for i in range(HELD):
        st = os.stat(paths[i])
        row = {"image_id": f"p{i}", "uri": str(paths[i]), "content_sha256": content_sha256(paths[i].read_bytes()),
               "source_size": st.st_size, "source_mtime_ns": st.st_mtime_ns, "source_etag": None}
        if i % 10 == 9:
            errors.append({**row, "stage": "detect", "error_type": "NoFace", "message": "none"})
        else:
            faces += [{**row, "face_index": k} for k in range(1 + i % 2)]     # one or two faces
    root = str(tmp_path / "root")
    schema = pa.schema([("image_id", pa.string()), ("uri", pa.string()), ("content_sha256", pa.string()),
                        ("source_size", pa.int64()), ("source_mtime_ns", pa.int64()), ("source_etag", pa.string())])
    base = rootmod.write_version(root, None, drop_ids=pa.array([], pa.string()), add={
        rootmod.FACES: pa.Table.from_pylist(faces, schema.append(pa.field("face_index", pa.int32()))),
        rootmod.ERRORS: pa.Table.from_pylist(errors, schema.append(pa.field("stage", pa.string()))
                                             .append(pa.field("error_type", pa.string()))
                                             .append(pa.field("message", pa.string())))},
        model="sface-yunet", job_id="seed")
    # the changes since
    for i in range(10, 20):                      # rewritten, another size: changed
        paths[i].write_bytes(paths[i].read_bytes() + b"more")
    for i in range(20, 30):                      # touched: same bytes, new mtime: re-stat only
        os.utime(paths[i], ns=(1, 10**18 + i))
    for i in range(30, 35):                      # same size, other bytes and mtime: hashed, changed
        data = paths[i].read_bytes()
        paths[i].write_bytes(data[::-1])
        os.utime(paths[i], ns=(1, 10**18 + i))
    moved = {}
    for i in range(35, 40):                      # another uri: changed
        moved[i] = photos / "moved" / f"p{i}.bin"
        moved[i].parent.mkdir(exist_ok=True)
        moved[i].write_bytes(paths[i].read_bytes())
    for i in range(45, 50):                      # unreadable now: kept, unverified
        paths[i].unlink()
    rows = [{"image_id": f"p{i}", "uri": str(moved.get(i, paths[i])), "batch": f"b{i % 5}"}
            for i in range(10, N)]               # p0..p9 no longer listed: removed
    erased = pa.array([f"p{i}" for i in range(40, 45)] + ["p260"], pa.string())
    return root, base, pa.Table.from_pylist(rows), erased, paths


@pytest.mark.parametrize("own_stats", [False, True])
def test_tasks_find_exactly_the_change(tmp_path, ray_local, own_stats):
    root, base, table, erased, paths = _archive(tmp_path)
    if own_stats:
        stats = [os.stat(u) if os.path.exists(u) else None for u in table["uri"].to_pylist()]
        table = table.append_column("size", pa.array([s.st_size if s else None for s in stats], pa.int64()))
        table = table.append_column("mtime", pa.array([s.st_mtime_ns if s else None for s in stats], pa.int64()))
    uri = str(tmp_path / "manifest")
    storage.write_table(os.path.join(uri, "m0.parquet"), table.slice(0, 150))
    storage.write_table(os.path.join(uri, "m1.parquet"), table.slice(150))
    config = ChangeConfig(manifest=uri, root=root)
    info = manifest.validate(uri)
    options = storage.StorageOptions()
    resolved, _ = resolve_manifest(uri, options, info)
    driver = plan(config, resolved, rootmod.record_ids(root, base), erased, options)
    tasks = rebuild_plan.plan_in_tasks(config, info, base, erased, options, buckets=3)

    ids = lambda r: {f"p{i}" for i in r}                                           # noqa: E731
    expected = {"new": ids(range(HELD, N)) - {"p260"}, "changed": ids(range(10, 20)) | ids(range(30, 40)),
                "removed": ids(range(0, 10)) | ids(range(40, 45)), "restat": ids(range(20, 30))}
    for made in (driver, tasks):
        to_embed = set(made.to_embed.to_pylist())
        assert len(to_embed) == len(made.to_embed)
        assert to_embed == expected["new"] | expected["changed"]
        assert set(made.drop.to_pylist()) == expected["removed"] | expected["changed"] | expected["restat"]
        assert set(made.restat.to_pylist()) == expected["restat"]
        assert (made.new, made.changed, made.removed) == (len(expected["new"]), len(expected["changed"]),
                                                          len(expected["removed"]))
        assert made.unverified == 5 and made.erased_skipped == 6 and made.hashed == 15
        assert set(made.restat_where["image_id"].to_pylist()) == expected["restat"]
        dropped = set(made.drop.to_pylist())
        assert made.drop_parts == {(r["kind"], r["part"]) for r in rootmod.record_ids(root, base).to_pylist()
                                   if r["image_id"] in dropped}
    # what the driver receives from the tasks is the change, with every manifest column
    assert set(tasks.manifest["image_id"].to_pylist()) == set(tasks.to_embed.to_pylist())
    assert tasks.manifest.schema.names == table.schema.names
    assert set(tasks.stats["image_id"].to_pylist()) == set(tasks.to_embed.to_pylist()) | expected["restat"]
    by_id = {r["image_id"]: r for r in driver.stats.to_pylist()}
    assert all(by_id[r["image_id"]] == r for r in tasks.stats.to_pylist())


def test_table_version_from_the_plans_parts_equals_reading_every_part(tmp_path, ray_local, monkeypatch):
    """write_version told which parts hold a dropped id (the plan's drop_parts) reads no other
    part's ids and writes the same table as when it reads them all."""
    monkeypatch.setattr(rootmod, "PART_ROWS", 40)      # a record of many parts, most without a change
    root, base, table, erased, _ = _archive(tmp_path)
    uri = str(tmp_path / "manifest.parquet")
    storage.write_table(uri, table)
    config = ChangeConfig(manifest=uri, root=root)
    info = manifest.validate(uri)
    made = rebuild_plan.plan_in_tasks(config, info, base, erased, storage.StorageOptions(), buckets=2)
    assert len(base.faces) >= 8 and 0 < len(made.drop_parts) < len(base.faces) + len(base.errors) - 4
    versions = [rootmod.write_version(root, base, drop_ids=made.drop, add={}, model=base.model, job_id=f"j{k}",
                                      holding=holding) for k, holding in enumerate((made.drop_parts, None))]
    tables = [{kind: rootmod.read_table(root, kind, ["image_id"], v).sort_by("image_id") for kind in rootmod.KINDS}
              for v in versions]
    assert tables[0] == tables[1]
    assert versions[0].images == versions[1].images == len(set(tables[0][rootmod.FACES]["image_id"].to_pylist()))
    assert (versions[0].face_rows, versions[0].error_rows) == (versions[1].face_rows, versions[1].error_rows)
