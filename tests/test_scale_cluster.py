"""A gallery larger than one node's memory, searched on a real 3-node Ray cluster (issue 13).

Each node offers Ray less memory than the whole index needs; shard actors ask for their
shard's memory, so they land on different nodes. Results must equal exact search; a node
lost mid-search either fails the job clearly (audited, no results kept) or the job completes
with exact results: never a partial candidate list.
"""

from __future__ import annotations

import threading

import numpy as np
import pytest

from facelake import faults, storage
from facelake.record import audit
from facelake.index import build, load, searchers, synthetic
from facelake.jobs import search as search_job
from tests.helpers import MODEL, WEIGHTS, exact, faces_table, ranked_ids, results

NODE_MEMORY = 400 << 20          # each shard searcher asks for ~280 MB: one fits a node, two do not


@pytest.fixture
def memory_cluster():
    import ray
    from ray.cluster_utils import Cluster

    from facelake.cluster import runtime

    if ray.is_initialized():
        ray.shutdown()
    node = {"num_cpus": 1, "memory": NODE_MEMORY, "object_store_memory": 100 << 20}
    cluster = Cluster(initialize_head=True, head_node_args=node)
    workers = [cluster.add_node(**node) for _ in range(2)]
    cluster.wait_for_nodes()
    runtime.connect(cluster.address)
    yield cluster, workers
    ray.shutdown()
    cluster.shutdown()


def _gallery(tmp_path, n=9000, seed=31):
    xb = synthetic.clustered(n, 128, seed=seed)
    root = str(tmp_path / "root")
    manifest = build.build_version(faces_table(xb), root,
                                   build.BuildOptions(model=MODEL, weights_sha256=WEIGHTS, shards=3, nlist=16))
    handle = load.open_version(root)
    whole = sum(searchers.shard_memory(handle, s) for s in range(handle.shard_count))
    assert whole > NODE_MEMORY, "the index must not fit one node for this test to mean anything"
    return xb, root, manifest, handle


def test_shards_spread_over_nodes_and_results_equal_exact(memory_cluster, tmp_path):
    import ray

    xb, root, manifest, handle = _gallery(tmp_path)
    actors = searchers.start_searchers(handle)
    try:
        nodes = ray.get([actor.node_id.remote() for actor in actors], timeout=300)
    finally:
        for actor in actors:
            ray.kill(actor)
    assert len(set(nodes)) == 3, f"three shards on {len(set(nodes))} node(s)"

    xq = synthetic.queries(xb, 300, seed=32)
    storage.write_table(str(tmp_path / "probes.parquet"), faces_table(xq, "q"))
    summary = search_job.run_search(search_job.SearchConfig(
        probes=str(tmp_path / "probes.parquet"), root=root, out=str(tmp_path / "out"), purpose="3-node test",
        nprobe=handle.nlist, batch_size=50))
    found = ranked_ids(results(tmp_path / "out"), 300, 10)
    np.testing.assert_array_equal(found, exact(xb, xq, 10)[1])
    assert summary.searched_faces == 300 and summary.result_rows == 3000


def test_node_lost_mid_search_fails_clearly_or_completes_exactly(memory_cluster, tmp_path):
    cluster, workers = memory_cluster
    xb, root, _, handle = _gallery(tmp_path, seed=33)
    xq = synthetic.queries(xb, 2000, seed=34)
    storage.write_table(str(tmp_path / "probes.parquet"), faces_table(xq, "q"))
    out = tmp_path / "out"
    removed = threading.Event()

    def lose_a_node(summary):
        if not removed.is_set():
            removed.set()
            cluster.remove_node(workers[0])

    config = search_job.SearchConfig(probes=str(tmp_path / "probes.parquet"), root=root, out=str(out),
                                     purpose="3-node test: node lost", nprobe=handle.nlist, batch_size=20)
    try:
        with faults.armed("search.after_batch", lose_a_node):
            summary = search_job.run_search(config)
    except Exception as err:   # failed clearly: named, audited, nothing partial kept
        assert "died" in str(err).lower() or "rerun" in str(err).lower(), err
        assert not (out / "_search.json").exists()
        assert not storage.list_files(str(out / "results"), ".parquet")
        record = audit.list_records(root, kind="search")[-1]
        assert record["status"] == "failed" and record["error"]
    else:                      # or completed exactly
        assert removed.is_set() and summary.searched_faces == 2000
        found = ranked_ids(results(out), 2000, 10)
        np.testing.assert_array_equal(found, exact(xb, xq, 10)[1])
