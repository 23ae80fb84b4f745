"""Faults injected into real parts: the driver SIGKILLed mid-job, S3 throttling / 500s / dropped
connections (a loopback proxy in front of the moto server), a shard searcher killed mid-search,
and a Ray worker node removed mid-embed (ray.cluster_utils.Cluster, 3 one-CPU nodes).

What must hold every time: every manifest row ends in exactly one of faces/errors, no face is
written twice, a rerun resumes; a search returns the exact results or fails loudly, never a
silently partial answer.
"""

from __future__ import annotations

import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest
import s3fs

from facelake import faults, storage
from facelake.record import audit
from facelake.jobs.embed import EmbedConfig, run_embed
from facelake.schema import NO_FACE, NO_USABLE_FACE
from tests.helpers import (MODEL, SAMPLE_DIR, WEIGHTS, FaultProxy, assert_exactly_once, faces_table, kill_tree,
                           read_outcomes, sample_manifest)

# Sample photos that each hold at least one usable face (a fixed list: runs are comparable).
PHOTOS = ["img1.jpg", "img2.jpg", "img3.jpg", "img4.jpg", "img5.jpg", "img6.jpg", "img7.jpg",
          "img8.jpg", "img9.jpg", "img10.jpg", "img11.jpg", "img12.jpg", "img13.jpg", "img14.jpg",
          "img15.jpg", "img16.jpg", "img17.jpg", "img18.jpg", "img19.jpg", "couple.jpg"]


# ------------------------------------------------------------------------ driver killed

def _embed_cli(manifest: str, out: str, *extra: str) -> list[str]:
    return [sys.executable, "-m", "facelake.jobs.cli", "embed", manifest, "--out", out, "--batch-size", "1",
            "--shard-rows", "1", "--chunk-images", "2", "--workers", "1", *extra]


def test_driver_sigkilled_mid_job_rerun_resumes_exactly_once(tmp_path, provisioned_weights):
    names = PHOTOS
    manifest_uri = str(tmp_path / "m.parquet")
    storage.write_table(manifest_uri, sample_manifest(names))
    out = str(tmp_path / "out")
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    env["FACELAKE_OBJECT_STORE_BYTES"] = str(200 << 20)
    faces_dir = Path(out) / "faces"

    proc = subprocess.Popen(_embed_cli(manifest_uri, out), env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        deadline = time.monotonic() + 240
        while time.monotonic() < deadline and proc.poll() is None:
            if faces_dir.exists() and any(p.name.endswith(".parquet") for p in faces_dir.iterdir()):
                break
            time.sleep(0.05)
        assert proc.poll() is None, "the first run ended before it could be killed"
        assert any(p.name.endswith(".parquet") for p in faces_dir.iterdir()), "no part file after 240 s"
    finally:
        kill_tree(proc)
    partial, _ = read_outcomes(out)
    done_before = set(partial["image_id"].to_pylist())
    assert 0 < len(done_before) < len(names), "the kill did not land mid-job"
    assert not (Path(out) / "_runs").exists(), "a killed run wrote its summary"

    done = subprocess.run(_embed_cli(manifest_uri, out), env=env, capture_output=True, text=True, timeout=400)
    assert done.returncode == 0, done.stderr[-3000:]
    faces, errors = assert_exactly_once(out, [n[:-4] for n in names])
    assert not errors, errors
    assert "already done and skipped" in done.stdout
    skipped = int(done.stdout.split(" already done and skipped")[0].rsplit(";", 1)[1].strip())
    assert skipped >= len(done_before)
    # faces written before the kill are kept as they were, not recomputed
    before = {(r["image_id"], r["face_index"]): r["embedding"] for r in partial.to_pylist()}
    after = {(r["image_id"], r["face_index"]): r["embedding"] for r in faces.to_pylist()}
    assert all(after[key] == vector for key, vector in before.items())


# ------------------------------------------------------------------------ a 3-node cluster

@pytest.fixture(scope="module")
def cluster3():
    """Head + two worker nodes, one CPU each; the driver is connected to it."""
    import ray
    from ray.cluster_utils import Cluster

    if ray.is_initialized():
        ray.shutdown()
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1, "object_store_memory": 150 << 20})
    for _ in range(2):
        cluster.add_node(num_cpus=1, object_store_memory=150 << 20)
    cluster.wait_for_nodes()
    from facelake.cluster import runtime
    runtime.connect(cluster.address)
    yield cluster
    ray.shutdown()
    cluster.shutdown()


# ------------------------------------------------------------------------ S3 faults

def test_s3_throttling_errors_and_resets_retried_then_recorded(s3_endpoint, s3_bucket, cluster3, tmp_path,
                                                              provisioned_weights):
    fs = s3fs.S3FileSystem(endpoint_url=s3_endpoint, skip_instance_cache=True)
    bucket = s3_bucket[len("s3://"):]
    plan = {  # image_id: (photo, fault kind, failing requests)
        "throttled": ("img1.jpg", "503", 3),
        "flaky500": ("img2.jpg", "500", 2),
        "reset": ("img3.jpg", "reset", 2),
        "broken": ("img4.jpg", "500", None),
        "denied": ("img5.jpg", "403", None),
        "clean1": ("img6.jpg", None, 0),
        "clean2": ("img7.jpg", None, 0),
    }
    for image_id, (photo, _, _) in plan.items():
        fs.pipe(f"{bucket}/photos/{image_id}.jpg", (SAMPLE_DIR / photo).read_bytes())
    ids = list(plan)
    manifest = pa.table({"image_id": ids, "uri": [f"{s3_bucket}/photos/{i}.jpg" for i in ids]})
    storage.write_table(f"{s3_bucket}/manifests/m.parquet", manifest)
    out = str(tmp_path / "out")

    with FaultProxy(s3_endpoint) as proxy:
        for image_id, (_, kind, times) in plan.items():
            if kind:
                proxy.faults[f"/photos/{image_id}.jpg"] = (kind, times)
        summary = run_embed(EmbedConfig(manifest=f"{s3_bucket}/manifests/m.parquet", out=out, batch_size=1,
                                        endpoint_url=proxy.url, address=cluster3.address, progress=False))
    faces, errors = assert_exactly_once(out, ids)
    assert set(faces["image_id"].to_pylist()) == {"throttled", "flaky500", "reset", "clean1", "clean2"}
    assert set(errors) == {"broken", "denied"}
    for image_id in ("throttled", "flaky500", "reset"):
        assert len(proxy.seen[f"/photos/{image_id}.jpg"]) > plan[image_id][2], f"{image_id} was not retried"
    # a permanent 500 is retried with growing waits, then recorded at the fetch stage
    attempts = proxy.seen["/photos/broken.jpg"]
    assert len(attempts) >= 3
    gaps = np.diff(attempts)
    assert attempts[-1] - attempts[0] > 0.5 and gaps.max() > 0.1, f"no backoff between attempts: {gaps}"
    assert errors["broken"]["stage"] == "fetch"
    assert errors["denied"]["stage"] == "fetch" and errors["denied"]["error_type"] == "PermissionError"
    assert summary.images == len(ids)


# ------------------------------------------------------------------------ shard searcher killed

def test_shard_searcher_killed_mid_search_fails_loudly_never_partial(cluster3, tmp_path):
    import ray
    from ray.exceptions import RayActorError

    from facelake.index import build, searchers, synthetic
    from facelake.index.load import open_version

    xb = synthetic.clustered(8000, 64, seed=3)
    root = str(tmp_path / "root")
    build.build_version(faces_table(xb), root, build.BuildOptions(
        model=MODEL, weights_sha256=WEIGHTS, shards=3, nlist=32))
    handle = open_version(root)
    xq = synthetic.queries(xb, 2000, seed=4)
    k = 10
    reference = searchers.search_version(handle, xq, k)           # in-process, every shard
    actors = searchers.start_searchers(handle, num_cpus=0.1)
    try:
        D, I = searchers.search_version(handle, xq, k, actors=actors)
        np.testing.assert_array_equal(I, reference[1])

        outcomes: list = []
        answered = threading.Event()

        def hammer():
            for _ in range(30):
                try:
                    outcomes.append(searchers.search_version(handle, xq, k, actors=actors))
                except Exception as err:  # noqa: BLE001 - recorded and checked below
                    outcomes.append(err)
                answered.set()

        thread = threading.Thread(target=hammer)
        thread.start()
        assert answered.wait(120), "no search answered before the kill"
        ray.kill(actors[1], no_restart=True)
        thread.join(timeout=120)
        assert not thread.is_alive()
        results = [o for o in outcomes if not isinstance(o, Exception)]
        failures = [o for o in outcomes if isinstance(o, Exception)]
        for D, I in results:  # every answer given is the whole answer
            np.testing.assert_array_equal(I, reference[1])
            np.testing.assert_allclose(D, reference[0], rtol=1e-5, atol=1e-5)
        assert failures, "searches kept answering although a shard's searcher was dead"
        assert all(isinstance(f, RayActorError) for f in failures), failures
        first_failure = next(i for i, o in enumerate(outcomes) if isinstance(o, Exception))
        assert all(isinstance(o, Exception) for o in outcomes[first_failure:]), "answers after a shard died"
    finally:
        for actor in actors:
            ray.kill(actor)


def test_search_job_with_a_killed_searcher_fails_and_is_audited(cluster3, tmp_path, monkeypatch):
    """A shard actor killed while the job (facelake search) streams: the job either fails clearly
    (raises naming the dead searcher, no _search.json, no result files, audited as failed) or --
    when every batch was already searched before the kill landed -- completes with exact results.
    Never a partial candidate list."""
    import ray

    from facelake.index import build, searchers as index_search, synthetic
    from facelake.jobs import search as search_job

    xb = synthetic.clustered(3000, 128, seed=5)
    root = str(tmp_path / "root")
    build.build_version(faces_table(xb), root, build.BuildOptions(
        model=MODEL, weights_sha256=WEIGHTS, shards=2, nlist=16))
    xq = synthetic.queries(xb, 2000, seed=6)
    storage.write_table(str(tmp_path / "probes.parquet"), faces_table(xq))
    started: list = []
    real_start = index_search.start_searchers

    def spy(handle, **kwargs):
        actors = real_start(handle, **kwargs)
        started.extend(actors)
        return actors

    monkeypatch.setattr(index_search, "start_searchers", spy)

    def kill_one(summary):
        if started:
            ray.kill(started.pop(0), no_restart=True)

    out = tmp_path / "results"
    config = search_job.SearchConfig(probes=str(tmp_path / "probes.parquet"), root=root, out=str(out),
                                     purpose="hardening: shard actor killed", batch_size=10, nprobe=16,
                                     address=cluster3.address)
    try:
        with faults.armed("search.after_batch", kill_one):
            summary = search_job.run_search(config)
    except Exception as failure:
        assert isinstance(failure, ray.exceptions.RayActorError) or "died" in str(failure).lower()
        assert not (out / "_search.json").exists(), "a failed search wrote its success summary"
        assert not storage.list_files(str(out / "results"), ".parquet"), "a failed search kept partial results"
        record = [r for r in audit.list_records(root, kind="search")][-1]
        assert record["status"] == "failed" and record["error"]
        assert record["counts"]["searched_faces"] < 2000
    else:
        import faiss
        flat = faiss.IndexFlatIP(128)
        flat.add(xb)
        table = storage.read_table(str(out / "results"), columns=["probe_image_id", "rank", "gallery_image_id"])
        assert summary.searched_faces == 2000 and table.num_rows == 20_000
        found = {(p, r): g for p, r, g in zip(*(table[c].to_pylist() for c in table.column_names))}
        _, truth = flat.search(xq, 10)
        ids = faces_table(xb)["image_id"].to_pylist()
        probe_ids = faces_table(xq)["image_id"].to_pylist()
        assert all(found[(probe_ids[q], r + 1)] == ids[truth[q, r]] for q in range(2000) for r in range(10))


# ------------------------------------------------------------------------ worker node removed

def _actor_nodes() -> dict[str, int]:
    """node id -> alive actors on it (GCS actor table; no dashboard needed)."""
    import ray

    counts: dict[str, int] = {}
    for info in ray._private.state.actors().values():  # noqa: SLF001 - test introspection only
        if info.get("State") in ("ALIVE", 2) and "MapWorker" in str(info.get("ActorClassName", "")):
            node = info.get("Address", {}).get("NodeID")
            counts[node] = counts.get(node, 0) + 1
    return counts


def test_worker_node_removed_mid_embed_job_completes_exactly_once(cluster3, tmp_path, provisioned_weights):
    """Must run last in this module: it takes a node away from the shared cluster."""
    manifest_uri = str(tmp_path / "m.parquet")
    storage.write_table(manifest_uri, sample_manifest(PHOTOS))
    out = str(tmp_path / "out")
    result: dict = {}

    def job():
        try:
            result["summary"] = run_embed(EmbedConfig(manifest=manifest_uri, out=out, batch_size=1, shard_rows=1,
                                                      address=cluster3.address, progress=False))
        except BaseException as err:  # noqa: BLE001 - re-raised by the assertion below
            result["error"] = err

    thread = threading.Thread(target=job)
    thread.start()
    faces_dir = Path(out) / "faces"
    deadline = time.monotonic() + 180
    while time.monotonic() < deadline and thread.is_alive():
        if faces_dir.exists() and any(p.name.endswith(".parquet") for p in faces_dir.iterdir()):
            break
        time.sleep(0.2)
    assert thread.is_alive(), f"the job ended before the node could be removed: {result}"
    by_node = _actor_nodes()
    workers = list(cluster3.worker_nodes)
    victim = max(workers, key=lambda node: by_node.get(node.node_id, 0))
    killed_actors = by_node.get(victim.node_id, 0)
    cluster3.remove_node(victim, allow_graceful=False)
    removed_while_running = thread.is_alive()
    thread.join(timeout=400)
    assert not thread.is_alive(), "the job hung after losing a node"
    assert "error" not in result, f"the job failed after losing a node: {result.get('error')!r}"
    assert removed_while_running and killed_actors >= 1, (removed_while_running, by_node)
    faces, errors = assert_exactly_once(out, [n[:-4] for n in PHOTOS])
    assert all(e["error_type"] in (NO_FACE, NO_USABLE_FACE) for e in errors.values()), errors
    assert result["summary"].images == len(PHOTOS)
