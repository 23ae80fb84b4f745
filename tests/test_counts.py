"""Counts without gathering ids: jobs/work/counts.py (driver and Ray tasks) and the image counts table
versions record (facelake.record.tables), each against a brute-force count; `status` shows them."""

from __future__ import annotations

import json
from collections import Counter

import pyarrow as pa
import pyarrow.compute as pc
import pytest

from facelake import storage
from facelake.record import tables as rootmod
from facelake.jobs.work import counts
from facelake.jobs.status import collect
from facelake.faces.registry import get_model, weights_fingerprint
from tests.helpers import error_rows as _errors, faces_per_image as _faces


def _brute(root: str) -> dict:
    faces = rootmod.read_faces(root, ["image_id"])
    errors = rootmod.read_errors(root, ["stage", "error_type"])
    return {"faces": faces.num_rows, "images": len(set(faces["image_id"].to_pylist())),
            "errors": Counter(f"{r['stage']}/{r['error_type']}" for r in errors.to_pylist()) if errors else {}}


@pytest.mark.parametrize("where,driver_rows", [("local", None), ("local", 0), ("s3", 0)])
def test_distinct_images_over_parts_an_image_spans(where, driver_rows, tmp_path, ray_local, request):
    base = str(tmp_path) if where == "local" else request.getfixturevalue("s3_bucket")
    options = storage.StorageOptions.from_env()
    faces = _faces(900, 3, "p")
    parts = []
    for k, start in enumerate(range(0, 900, 200)):       # 200 rows a part: images straddle parts
        parts.append(f"{base}/part-{k}.parquet")
        storage.write_table(parts[-1], faces.slice(start, 200), options)
    sources = [("parquet", p) for p in parts]
    assert counts.distinct_images(sources, 900, options, driver_rows=driver_rows, buckets=3) == 300
    assert counts.distinct_images(sources[:2], 400, options, driver_rows=driver_rows) == len(
        set(faces.slice(0, 400)["image_id"].to_pylist()))
    errors = _errors(500, "e")
    storage.write_table(f"{base}/e0.parquet", errors.slice(0, 250), options)
    storage.write_table(f"{base}/e1.parquet", errors.slice(250), options)
    tally = counts.errors_by_type([f"{base}/e0.parquet", f"{base}/e1.parquet"], 500, options,
                                  driver_rows=driver_rows)
    assert tally == Counter(f"{r['stage']}/{r['error_type']}" for r in errors.to_pylist())


def test_table_versions_record_image_counts_status_shows_them(tmp_path, ray_local, monkeypatch):
    root = str(tmp_path / "root")
    first = rootmod.write_version(root, None, drop_ids=pa.array([], pa.string()),
                                  add={rootmod.FACES: _faces(600, 3, "a"), rootmod.ERRORS: _errors(40, "x")},
                                  model="sface-yunet", job_id="j1")
    assert first.images == 200 == _brute(root)["images"]
    # a rebuild: some images dropped (changed or removed), new ones added, some errors dropped
    drop = pa.array([f"a-{i:06d}" for i in range(0, 200, 7)] + ["x-3", "not-held"], pa.string())
    second = rootmod.write_version(root, first, drop_ids=drop, add={rootmod.FACES: _faces(90, 2, "b")},
                                   model="sface-yunet", job_id="j2")
    # an erasure
    third = rootmod.write_version(root, second, drop_ids=pa.array(["b-000001", "a-000001"], pa.string()), add={},
                                  model="sface-yunet", job_id="j3")
    brute = _brute(root)
    assert second.images == 200 - len(range(0, 200, 7)) + 45
    assert third.images == brute["images"] == second.images - 2
    info = collect(root)
    assert info["counts"]["faces"] == brute["faces"] and info["counts"]["images"] == brute["images"]
    assert info["errors_by_type"] == brute["errors"] and info["counts"]["errors"] == 39
    assert info["last_errors"][-1]["image_id"] == "x-39" and len(info["last_errors"]) == 5

    # a table version written before image counts were recorded: counted by tasks, same numbers
    path = tmp_path / "root" / rootmod.TABLES / f"{third.name}.json"
    data = json.loads(path.read_text())
    del data["images"]
    path.write_text(json.dumps(data))
    monkeypatch.setattr(counts, "DRIVER_ROWS", 0)
    legacy = collect(root)
    assert legacy["counts"] == info["counts"] and legacy["errors_by_type"] == brute["errors"]
    # and a version built on it cannot know its count: None, never a wrong number
    fourth = rootmod.write_version(root, rootmod.current(root), drop_ids=pa.array(["a-000002"]), add={},
                                   model="sface-yunet", job_id="j4")
    assert fourth.images is None and collect(root)["counts"]["images"] == _brute(root)["images"]


def test_index_root_counts_from_manifest_and_tasks(tmp_path, ray_local, monkeypatch):
    from facelake.index.build import BuildOptions, build_version

    faces = _faces(700, 2, "i")
    storage.write_table(str(tmp_path / "faces" / "part-0.parquet"), faces.slice(0, 333))
    storage.write_table(str(tmp_path / "faces" / "part-1.parquet"), faces.slice(333))
    spec = get_model()
    root = str(tmp_path / "root")
    build_version(str(tmp_path / "faces"), root, BuildOptions(
        model=spec.name, weights_sha256=weights_fingerprint(spec), shards=3))
    monkeypatch.setattr(counts, "DRIVER_ROWS", 0)
    info = collect(root)
    assert info["counts"]["faces"] == 700 and info["counts"]["source"] == "live index"
    assert info["counts"]["images"] == len(pc.unique(faces["image_id"])) == 350
