"""Embed workers write their own part files; the driver sees only counts (real Ray, real photos).

- what the driver iterates is one tiny counts row per actor call, while the faces, errors and
  dropped rows sit in part files bounded by the chunk size, each image in exactly one part;
- a chunk processed twice (as Ray does when it retries a chunk after losing its actor) rewrites
  the same part files instead of adding a second copy;
- a SIGKILLed driver (`facelake embed` in a subprocess, with its local Ray) leaves whole parts,
  lost at most the chunk each actor was working on, and the rerun completes exactly once.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections import defaultdict
from pathlib import Path

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import s3fs

from facelake import storage
from facelake.schema import EMBED_COUNTS_SCHEMA
from facelake.jobs.embed import EmbedConfig, EmbedWorker, add_counts, embed_dataset, outputs
from facelake.faces.registry import get_model, weights_fingerprint
from facelake.storage import StorageOptions
from tests.helpers import SAMPLE_DIR, FaultProxy, assert_exactly_once, kill_tree, sample_manifest

PHOTOS = sorted(p.name for p in SAMPLE_DIR.glob("img*.jpg"))  # the bundled photos, 64 with couple & co.


def _files_by_image(folder: str) -> dict[str, set[str]]:
    """image_id -> the part files holding its rows."""
    where: dict[str, set[str]] = defaultdict(set)
    for uri in storage.list_files(folder, ".parquet"):
        for image_id in pq.read_table(uri, columns=["image_id"])["image_id"].to_pylist():
            where[image_id].add(uri)
    return where


def test_driver_iterates_counts_only_while_workers_write_bounded_parts(tmp_path, ray_local, provisioned_weights):
    names = PHOTOS[:13] + ["couple.jpg"]
    manifest = sample_manifest(names)
    manifest = pa.concat_tables([manifest, pa.table({"image_id": ["gone"], "uri": [str(tmp_path / "gone.jpg")],
                                                     "identity": [None]}, schema=manifest.schema)])
    manifest_uri = str(tmp_path / "m.parquet")
    storage.write_table(manifest_uri, manifest)
    out = str(tmp_path / "out")
    chunk = 4

    plan = embed_dataset(EmbedConfig(manifest=manifest_uri, out=out, batch_size=2, chunk_images=chunk,
                                     workers=1, progress=False))
    summary = plan.summary
    blocks = [ray_local.get(ref) for ref in plan.dataset.materialize().to_arrow_refs()]
    # what reaches the driver: counts, one row per actor call, no face rows and no embeddings
    assert blocks and all(block.schema.equals(EMBED_COUNTS_SCHEMA) for block in blocks), [b.schema for b in blocks]
    counts = pa.concat_tables(blocks)
    assert counts.num_rows >= -(-manifest.num_rows // chunk) and max(counts["images"].to_pylist()) <= chunk
    assert sum(block.nbytes for block in blocks) < 100 * counts.num_rows
    add_counts(summary, counts)

    layout = outputs(out)
    faces = storage.read_table(layout["faces"])
    errors = storage.read_table(layout["errors"])
    assert summary.images == manifest.num_rows and summary.faces == faces.num_rows
    assert summary.errors == errors.num_rows == 1 and summary.errors_by_type == {"FileNotFoundError": 1}
    assert summary.images_with_faces == len(set(faces["image_id"].to_pylist())) == len(names)
    assert faces.filter(pc.equal(faces["image_id"], "couple")).num_rows == 2
    assert set(faces["model"].to_pylist()) == {"sface-yunet"}
    assert set(faces["weights_sha256"].to_pylist()) == {weights_fingerprint(get_model())}
    identity = dict(zip(manifest["image_id"].to_pylist(), manifest["identity"].to_pylist()))
    assert all(row["identity"] == identity[row["image_id"]] for row in faces.select(["image_id", "identity"]).to_pylist())
    # the parts: written by the workers, named by the run, bounded by the chunk, an image in one part
    files = [f for name in ("faces", "errors", "dropped") for f in storage.list_files(layout[name], ".parquet")]
    assert len(files) == summary.parts and all(f"part-{summary.run_id}-" in f for f in files)
    for name in ("faces", "errors"):
        by_image = _files_by_image(layout[name])
        assert all(len(parts) == 1 for parts in by_image.values()), f"an image split across {name} parts"
        per_part: dict[str, int] = defaultdict(int)
        for parts in by_image.values():
            per_part[next(iter(parts))] += 1
        assert per_part and max(per_part.values()) <= chunk
    assert len(storage.list_files(layout["faces"], ".parquet")) >= len(names) // chunk


def test_a_chunk_done_twice_rewrites_its_own_parts(tmp_path, provisioned_weights):
    """Ray retries a chunk whose actor died after writing: the same names, so no second copy."""
    manifest = sample_manifest(["img1.jpg", "couple.jpg", "img2.jpg"])
    out = str(tmp_path / "out")
    spec = get_model()
    worker = EmbedWorker(model=spec.name, weights_from=None, min_face=24, min_score=0.8, max_pixels=50_000_000,
                         options=StorageOptions(), allowed_roots=(), base_dir=str(tmp_path), threads=1,
                         carried=("identity",), carried_schema=pa.schema([manifest.schema.field("identity")]),
                         out=out, run_id="run1", batch_size=2, shard_rows=1, weights_sha256=weights_fingerprint(spec))
    first = worker(manifest)
    assert first.schema.equals(EMBED_COUNTS_SCHEMA) and first.to_pylist()[0]["faces"] == 4
    files = storage.list_files(outputs(out)["faces"], ".parquet")
    # shard_rows=1 cuts at image boundaries only: the couple's two faces share one part
    assert len(files) == 3 and sorted(pq.read_table(f).num_rows for f in files) == [1, 1, 2]
    again = worker(manifest)
    assert again.equals(first)
    assert storage.list_files(outputs(out)["faces"], ".parquet") == files
    assert storage.read_table(outputs(out)["faces"]).num_rows == 4


def _embed_cli(manifest: str, out: str, chunk: int, workers: int) -> list[str]:
    return [sys.executable, "-m", "facelake.jobs.cli", "embed", manifest, "--out", out, "--batch-size", "2",
            "--chunk-images", str(chunk), "--workers", str(workers), "--executor", "ray"]


def test_driver_sigkilled_loses_at_most_a_chunk_per_actor(s3_endpoint, s3_bucket, tmp_path, provisioned_weights):
    """Photos on loopback S3 behind a proxy that notes every photo fetched: what the killed run
    fetched but did not write is the work lost, and the rerun fetches exactly that again."""
    names, chunk, workers = PHOTOS[:32], 4, 2
    fs = s3fs.S3FileSystem(endpoint_url=s3_endpoint, skip_instance_cache=True)
    for name in names:
        fs.pipe(f"{s3_bucket[len('s3://'):]}/photos/{name}", (SAMPLE_DIR / name).read_bytes())
    ids = [n[:-4] for n in names]
    manifest_uri = str(tmp_path / "m.parquet")
    storage.write_table(manifest_uri, pa.table({"image_id": ids, "uri": [f"{s3_bucket}/photos/{n}" for n in names]}))
    out = str(tmp_path / "out")
    faces_dir = Path(out) / "faces"

    with FaultProxy(s3_endpoint) as proxy:
        for name in names:
            proxy.faults[f"/photos/{name}"] = ("500", 0)  # no fault: only note each fetch
        env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
        env["FACELAKE_S3_ENDPOINT_URL"] = proxy.url
        env["FACELAKE_OBJECT_STORE_BYTES"] = str(200 << 20)
        proc = subprocess.Popen(_embed_cli(manifest_uri, out, chunk, workers), env=env, stdout=subprocess.DEVNULL,
                                stderr=subprocess.DEVNULL, start_new_session=True)
        try:
            deadline = time.monotonic() + 240
            while time.monotonic() < deadline and proc.poll() is None:
                if faces_dir.exists() and any(p.name.endswith(".parquet") for p in faces_dir.iterdir()):
                    break
                time.sleep(0.05)
            assert proc.poll() is None, "the first run ended before it could be killed"
        finally:
            kill_tree(proc)
        fetched = {key.rsplit("/", 1)[1][:-4] for key in proxy.seen}
        # only whole parts: every file reads, none holds more than a chunk of images
        for folder in (Path(out) / "faces", Path(out) / "errors"):
            for part in (folder.glob("*.parquet") if folder.exists() else []):
                assert len(set(pq.read_table(part)["image_id"].to_pylist())) <= chunk
        done_before = set(_files_by_image(outputs(out)["faces"])) | set(_files_by_image(outputs(out)["errors"]))
        assert 0 < len(done_before) < len(ids), "the kill did not land mid-job"
        assert done_before <= fetched
        lost = fetched - done_before
        print(f"killed run: {len(done_before)} of {len(ids)} images written, {len(lost)} fetched but not written")
        assert len(lost) <= chunk * workers, f"{len(lost)} images fetched but not written by the killed run"
        assert not (Path(out) / "_runs").exists(), "a killed run wrote its summary"

        proxy.seen.clear()
        done = subprocess.run(_embed_cli(manifest_uri, out, chunk, workers), env=env, capture_output=True,
                              text=True, timeout=400)
        assert done.returncode == 0, done.stderr[-3000:]
        refetched = {key.rsplit("/", 1)[1][:-4] for key in proxy.seen}
    assert refetched == set(ids) - done_before, "the rerun read a photo that was already done, or missed one"
    assert refetched & fetched == lost  # the work redone after the kill: at most a chunk per actor
    faces, errors = assert_exactly_once(out, ids)
    assert not errors, errors
    (run_file,) = storage.list_files(outputs(out)["_runs"], ".json")
    run = json.loads(Path(run_file).read_text())
    assert run["skipped_done"] == len(done_before) and run["images"] == len(ids) - len(done_before)
