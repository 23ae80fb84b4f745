"""jobs/work/resume.py: the todo manifest of a rerun is exactly the manifest less the ids OUT holds
(compared with a set difference), in the driver and in hash-partitioned Ray tasks, locally and
on the loopback S3 endpoint; a first run pays nothing; another model's OUT is refused."""

from __future__ import annotations

import io
import random

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from facelake import storage
from facelake.faces import manifest
from facelake.errors import ConfigError
from facelake.jobs.work import resume

MODEL = "sface-yunet"


def _archive(base: str, n: int = 3000, done: int = 1700, seed: int = 0) -> tuple[list[str], set[str]]:
    """A manifest of ``n`` rows in two files (small row groups) and an OUT whose faces and errors
    parts hold ``done`` of its ids (faces repeated per face) and ids the manifest does not list."""
    rng = random.Random(seed)
    ids = [f"img-{i:06d}-{rng.randrange(10**6)}" for i in range(n)]
    table = pa.table({"image_id": ids, "uri": [f"photos/{i}.jpg" for i in ids],
                      "batch": [f"b{i % 7}" for i in range(n)], "size": list(range(n))})
    half = n // 2
    for k, part in enumerate((table.slice(0, half), table.slice(half))):
        sink = io.BytesIO()
        pq.write_table(part, sink, row_group_size=200)
        storage.write_bytes_atomic(storage.join(base, "manifest", f"m{k}.parquet"), sink.getvalue())
    done_ids = rng.sample(ids, done)
    faces = done_ids[: done // 2]
    errors = done_ids[done // 2:]
    for name, chosen, repeat in (("faces", faces, 2), ("errors", errors, 1)):
        for k in range(0, len(chosen), 97):
            chunk = [i for i in chosen[k:k + 97] for _ in range(repeat)] + [f"elsewhere-{name}-{k}"]
            storage.write_table(storage.join(base, "out", name, f"part-{k}.parquet"),
                                pa.table({"image_id": chunk, "model": [MODEL] * len(chunk)}))
    return ids, set(done_ids)


def _todo_rows(todo: resume.Todo) -> pa.Table:
    return pa.concat_tables([storage.read_file(f) for f in todo.files])


def _check(base: str, ids: list[str], done: set[str], todo: resume.Todo) -> None:
    expected = set(ids) - done
    rows = _todo_rows(todo)
    got = rows["image_id"].to_pylist()
    assert len(got) == len(set(got)), "a row was planned twice"
    assert set(got) == expected and todo.rows == len(expected) and todo.done == len(done)
    # every column of the manifest travels unchanged
    full = storage.read_table(storage.join(base, "manifest"))
    by_id = {r["image_id"]: r for r in full.to_pylist()}
    assert rows.schema.names == full.schema.names
    assert all(by_id[r["image_id"]] == r for r in rows.to_pylist())


def test_driver_checks_a_small_manifest_without_ray(tmp_path):
    import ray

    ray.shutdown()   # the session's shared Ray, if a test before left it up (ray_local starts it again)
    base = str(tmp_path)
    ids, done = _archive(base)
    info = manifest.validate(storage.join(base, "manifest"))
    todo = resume.left_to_embed(info, storage.join(base, "out"), MODEL, "run-a")
    _check(base, ids, done, todo)
    assert not ray.is_initialized()


def test_first_run_pays_nothing(tmp_path):
    base = str(tmp_path)
    _archive(base)
    storage.remove(storage.join(base, "out"), recursive=True)
    info = manifest.validate(storage.join(base, "manifest"))
    todo = resume.left_to_embed(info, storage.join(base, "out"), MODEL, "run-a", driver_rows=0)
    assert todo == resume.Todo(None, info.rows, 0)
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("buckets", [1, 5])
def test_tasks_pick_exactly_the_missing_rows(tmp_path, ray_local, monkeypatch, buckets):
    base = str(tmp_path)
    ids, done = _archive(base, seed=buckets)
    monkeypatch.setattr(resume, "SCATTER_ROWS", 500)       # several scatter tasks per manifest file
    monkeypatch.setattr(resume, "PARTS_PER_TASK", 4)
    storage.write_bytes_atomic(storage.join(base, "out", resume.RESUME, "killed-run", "todo", "part-0.parquet"), b"x")
    info = manifest.validate(storage.join(base, "manifest"))
    todo = resume.left_to_embed(info, storage.join(base, "out"), MODEL, "run-b", buckets=buckets, driver_rows=0)
    _check(base, ids, done, todo)
    assert len(todo.files) == buckets
    # only the todo manifest is left, and a killed run's is gone
    assert sorted(p.name for p in (tmp_path / "out" / resume.RESUME).iterdir()) == ["run-b"]
    assert [p.name for p in (tmp_path / "out" / resume.RESUME / "run-b").iterdir()] == ["todo"]
    resume.remove_scratch(storage.join(base, "out"), "run-b")
    assert not (tmp_path / "out" / resume.RESUME / "run-b").exists()


def test_everything_done_leaves_nothing(tmp_path, ray_local):
    base = str(tmp_path)
    ids, _ = _archive(base, n=400, done=400)
    info = manifest.validate(storage.join(base, "manifest"))
    for driver_rows in (None, 0):
        todo = resume.left_to_embed(info, storage.join(base, "out"), MODEL, "run-c", buckets=3,
                                    driver_rows=driver_rows)
        assert todo.rows == 0 and todo.done == len(ids) and todo.files == ()


def test_another_model_is_refused(tmp_path, ray_local):
    base = str(tmp_path)
    _archive(base, n=300, done=100)
    storage.write_table(storage.join(base, "out", "errors", "other.parquet"),
                        pa.table({"image_id": ["x"], "model": ["facenet-retina"]}))
    info = manifest.validate(storage.join(base, "manifest"))
    for driver_rows in (None, 0):
        with pytest.raises(ConfigError, match="facenet-retina.*its own --out"):
            resume.left_to_embed(info, storage.join(base, "out"), MODEL, "run-d", buckets=2, driver_rows=driver_rows)


def test_tasks_on_s3(s3_endpoint, s3_bucket, ray_local):
    options = storage.StorageOptions.from_env(s3_endpoint)
    base = f"{s3_bucket}/archive"
    ids, done = _archive(base, n=1200, done=700)
    info = manifest.validate(storage.join(base, "manifest"), options)
    todo = resume.left_to_embed(info, storage.join(base, "out"), MODEL, "run-e", options, buckets=3, driver_rows=0)
    _check(base, ids, done, todo)
    assert all(f.startswith("s3://") for f in todo.files)
