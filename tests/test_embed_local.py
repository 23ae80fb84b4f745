"""`facelake embed --executor local`: the same job in this process, without Ray (real photos).

- the local and the Ray executor write the same faces, errors and dropped tables (sorted) for
  the same manifest: one ChunkEmbedder, one face pipeline;
- the local path keeps the job's promises: part files and names, the run summary, resume
  without duplicates after a fault at "embed.chunk", the output fingerprint refusal;
- ``auto`` picks local or Ray by the documented rule; a local run imports no Ray at all.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pyarrow as pa
import pyarrow.compute as pc
import pytest

from facelake import faults, storage
from facelake.errors import ConfigError
from facelake.jobs.embed import LOCAL_MAX_ROWS, EmbedConfig, choose_executor, outputs, run_embed
from tests.helpers import SAMPLE_DIR, faceless_jpeg, sample_manifest

NAMES = ["img1.jpg", "img2.jpg", "img3.jpg", "img5.jpg", "img6.jpg", "img7.jpg", "img8.jpg", "couple.jpg"]


def _manifest(tmp_path) -> str:
    """Sample photos, the couple, a photo without a face and a missing file; carried 'identity'."""
    (tmp_path / "faceless.jpg").write_bytes(faceless_jpeg())
    table = sample_manifest(NAMES)
    extra = pa.table({"image_id": ["faceless", "gone"], "uri": [str(tmp_path / "faceless.jpg"),
                                                              str(tmp_path / "gone.jpg")],
                      "identity": ["nobody", None]}, schema=table.schema)
    uri = str(tmp_path / "m.parquet")
    storage.write_table(uri, pa.concat_tables([table, extra]))
    return uri


def _sorted_tables(out: str) -> dict[str, pa.Table]:
    layout = outputs(out)
    keys = {"faces": [("image_id", "ascending"), ("face_index", "ascending")],
            "errors": [("image_id", "ascending")],
            "dropped": [("image_id", "ascending"), ("det_score", "ascending")]}
    return {name: storage.read_table(layout[name]).sort_by(keys[name])
            for name in keys if storage.list_files(layout[name], ".parquet")}


@pytest.mark.slow
def test_local_and_ray_executors_write_the_same_tables(tmp_path, ray_local, provisioned_weights):
    manifest_uri = _manifest(tmp_path)
    runs = {}
    for executor in ("ray", "local"):
        out = str(tmp_path / executor)
        # a 600 px floor: faces kept, a couple's face dropped, five photos without a usable face
        summary = run_embed(EmbedConfig(manifest=manifest_uri, out=out, batch_size=3, chunk_images=4,
                                        min_face=600, progress=False, executor=executor))
        assert summary.executor == executor and summary.images == len(NAMES) + 2
        runs[executor] = (summary, _sorted_tables(out))
    (ray_summary, ray_tables), (local_summary, local_tables) = runs["ray"], runs["local"]
    assert set(ray_tables) == set(local_tables) and {"faces", "errors", "dropped"} <= set(local_tables)
    for name in ray_tables:
        assert local_tables[name].schema.equals(ray_tables[name].schema), name
        assert local_tables[name].equals(ray_tables[name]), f"{name} differ between the executors"
    for field in ("faces", "errors", "errors_by_type", "dropped_faces", "images_with_faces"):
        assert getattr(local_summary, field) == getattr(ray_summary, field), field
    assert local_summary.errors_by_type == {"FileNotFoundError": 1, "NoFace": 1, "NoUsableFace": 5}
    assert local_tables["dropped"]["image_id"].to_pylist() == ["couple"]


def test_local_run_keeps_the_jobs_promises(tmp_path, provisioned_weights):
    manifest_uri = _manifest(tmp_path)
    out = str(tmp_path / "out")
    config = EmbedConfig(manifest=manifest_uri, out=out, batch_size=2, chunk_images=3, progress=False,
                         executor="local", workers=2)

    # a fault before the second chunk: the first chunk's parts are all that was written
    def die(_):
        raise RuntimeError("killed")

    with faults.armed("embed.chunk", die, after=1), pytest.raises(RuntimeError, match="killed"):
        run_embed(config)
    partial = _sorted_tables(out)
    assert 0 < partial["faces"].num_rows and len(set(partial["faces"]["image_id"].to_pylist())) <= 3
    assert not storage.list_files(outputs(out)["_runs"], ".json"), "a failed run wrote its summary"

    counted = []
    with faults.armed("embed.counts", lambda summary: counted.append(summary.images)):
        summary = run_embed(config)
    assert summary.executor == "local" and summary.workers == 2
    assert summary.skipped_done == len(set(partial["faces"]["image_id"].to_pylist()))
    assert counted and counted[-1] == summary.images == len(NAMES) + 2 - summary.skipped_done
    tables = _sorted_tables(out)
    faces, errors = tables["faces"], tables["errors"]
    keys = list(zip(faces["image_id"].to_pylist(), faces["face_index"].to_pylist()))
    assert len(keys) == len(set(keys)), "a face was written twice"
    assert set(faces["image_id"].to_pylist()) == {n[:-4] for n in NAMES}
    assert sorted(errors["image_id"].to_pylist()) == ["faceless", "gone"]
    assert faces.filter(pc.equal(faces["image_id"], "couple")).num_rows == 2
    assert set(faces["identity"].to_pylist()) - {None}  # carried columns travel
    # part names carry the run; the summary is written last
    (run_file,) = storage.list_files(outputs(out)["_runs"], ".json")
    written = json.loads(storage.read_bytes(run_file))
    assert written["executor"] == "local" and written["faces"] == summary.faces
    parts = [f for name in ("faces", "errors", "dropped") for f in storage.list_files(outputs(out)[name], ".parquet")]
    assert len([f for f in parts if f"/part-{summary.run_id}-" in f]) == summary.parts > 0
    # a rerun has nothing left to do; other options into the same OUT are refused before any work
    assert run_embed(config).images == 0
    with pytest.raises(ConfigError, match="other options .*min_score.*--overwrite"):
        run_embed(EmbedConfig(manifest=manifest_uri, out=out, min_score=0.5, progress=False, executor="local"))


def test_auto_picks_local_for_small_jobs_without_a_cluster(monkeypatch, tmp_path):
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    small = EmbedConfig(manifest="m.parquet", out="o")
    ray = sys.modules.get("ray")
    if ray is None or not ray.is_initialized():
        assert choose_executor(small, LOCAL_MAX_ROWS) == "local"
        assert choose_executor(small, LOCAL_MAX_ROWS + 1) == "ray"
        monkeypatch.setenv("RAY_ADDRESS", "http://head:8265")   # inside a Ray job: the job's cluster
        assert choose_executor(small, 10) == "ray"
    assert choose_executor(EmbedConfig(manifest="m.parquet", out="o", address="auto"), 10) == "ray"
    assert choose_executor(EmbedConfig(manifest="m.parquet", out="o", executor="local"), 10 * LOCAL_MAX_ROWS) == "local"
    assert choose_executor(EmbedConfig(manifest="m.parquet", out="o", executor="ray"), 1) == "ray"
    with pytest.raises(ConfigError, match="--executor must be one of auto, local, ray"):
        EmbedConfig(manifest="m.parquet", out="o", executor="threads").validate()
    with pytest.raises(ConfigError, match="drop --address"):
        EmbedConfig(manifest="m.parquet", out="o", executor="local", address="auto").validate()


def test_cli_embed_of_a_small_manifest_runs_without_importing_ray(tmp_path, provisioned_weights):
    manifest_uri = str(tmp_path / "m.parquet")
    storage.write_table(manifest_uri, sample_manifest(["img1.jpg", "couple.jpg"]))
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    done = subprocess.run([sys.executable, "-X", "importtime", "-m", "facelake.jobs.cli", "--quiet", "embed",
                           manifest_uri, "--out", str(tmp_path / "out")], env=env, capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "local executor" in done.stdout and "3 face(s)" in done.stdout, done.stdout
    imported = {line.rsplit("|", 1)[-1].strip() for line in done.stderr.splitlines() if line.startswith("import time:")}
    assert "facelake.faces.pipeline" in imported
    assert not {name for name in imported if name == "ray" or name.startswith("ray.")}, "the local path imported Ray"


def test_local_executor_reads_and_writes_s3(s3_endpoint, s3_bucket, provisioned_weights):
    """Manifest, photos and OUT on loopback S3, through the storage options; allowed roots apply."""
    import s3fs

    fs = s3fs.S3FileSystem(endpoint_url=s3_endpoint, skip_instance_cache=True)
    names = ["img1.jpg", "couple.jpg"]
    for name in names:
        fs.pipe(f"{s3_bucket[len('s3://'):]}/photos/{name}", (SAMPLE_DIR / name).read_bytes())
    table = sample_manifest(names, base=f"{s3_bucket}/photos")
    table = pa.concat_tables([table, pa.table({"image_id": ["outside"], "uri": [f"{s3_bucket}/elsewhere/x.jpg"],
                                               "identity": [None]}, schema=table.schema)])
    storage.write_table(f"{s3_bucket}/manifests/m.parquet", table)
    out = f"{s3_bucket}/out"
    config = EmbedConfig(manifest=f"{s3_bucket}/manifests/", out=out, endpoint_url=s3_endpoint, progress=False,
                         allowed_roots=(f"{s3_bucket}/photos",), executor="local")
    summary = run_embed(config)
    assert summary.executor == "local" and (summary.faces, summary.errors) == (3, 1)
    tables = _sorted_tables(out)
    assert tables["faces"]["image_id"].to_pylist() == ["couple", "couple", "img1"]
    (error,) = tables["errors"].to_pylist()
    assert error["image_id"] == "outside" and error["stage"] == "validate"
    assert storage.list_files(outputs(out)["_runs"], ".json") and run_embed(config).images == 0
