"""Benchmark facelake.index: build time, peak memory, bytes/vector and recall@10 for IVF-Flat and
IVF-PQ on synthetic clustered vectors, plus queries/s of sharded IVF search vs exact IndexFlatIP.

    python bench/index.py                          # 100k and 1M at 128-d and 512-d
    python bench/index.py --sizes 100000 --dims 128 --out bench/results/index-small.json

Builds go through ``build_version`` (Ray tasks, default parameters, --shards shards), searches
through ``ShardSearcher`` actors; the exact reference is IndexFlatIP on all threads, batched.
Peak memory is sampled (psutil, every 50 ms) over this process and all its descendants (Ray's
workers): shared object-store pages are counted once per process mapping them, so it is an
upper bound. ``driver_maxrss`` is getrusage's peak of this process alone.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import shutil
import sys
import tempfile
import time

import faiss
import numpy as np
import psutil
import pyarrow as pa
import ray

from facelake.index import build, load, searchers, synthetic

from peak_rss import PeakRSS  # noqa: E402  (bench/ is on sys.path when run as a script)

K = 10
NQ = 1000
PQ_M = {128: 32, 512: 64}    # 4 dims per sub-quantizer at 128-d, 8 at 512-d: 32 / 64 bytes codes




def faces_table(xb: np.ndarray) -> pa.Table:
    n, d = xb.shape
    return pa.table({
        "image_id": pa.array([f"{i:09d}" for i in range(n)]),
        "face_index": pa.array(np.zeros(n, np.int32)),
        "bbox": pa.FixedSizeListArray.from_arrays(pa.array(np.zeros(4 * n, np.int32)), 4).cast(pa.list_(pa.int32(), 4)),
        "embedding": pa.FixedSizeListArray.from_arrays(pa.array(xb.ravel()), d),
    })


def qps(fn, xq: np.ndarray, repeat: int = 2) -> tuple[float, object]:
    fn(xq[:10])                       # warm up (actors, caches)
    best, out = float("inf"), None
    for _ in range(repeat):
        start = time.perf_counter()
        out = fn(xq)
        best = min(best, time.perf_counter() - start)
    return len(xq) / best, out


def run_one(n: int, dim: int, kinds: list[str], shards: int, workdir: str) -> list[dict]:
    xb = synthetic.clustered(n, dim)
    xq = synthetic.queries(xb, NQ)
    flat = faiss.IndexFlatIP(dim)
    flat.add(xb)
    flat_qps, (_, truth) = qps(lambda q: flat.search(q, K), xq, repeat=1 if n >= 1_000_000 else 2)
    del flat
    table = faces_table(xb)
    del xb
    rows = []
    for kind in kinds:
        root = tempfile.mkdtemp(dir=workdir)
        with PeakRSS() as mem:
            start = time.perf_counter()
            manifest = build.build_version(table, root, build.BuildOptions(
                model="bench", weights_sha256="bench", shards=shards, pq=PQ_M[dim] if kind == "pq" else None))
            seconds = time.perf_counter() - start
        handle = load.open_version(root)
        actors = searchers.start_searchers(handle)
        ivf_qps, (_, found) = qps(lambda q: searchers.search_version(handle, q, K, actors=actors), xq)
        for actor in actors:
            ray.kill(actor)
        shard_bytes = sum(v["bytes"] for name, v in manifest["files"].items() if name.endswith(".faiss")
                          and name.startswith("shard-"))
        row = {
            "n": n, "dim": dim, "kind": kind, "factory": manifest["factory"], "shards": shards,
            "nprobe": manifest["nprobe"], "train_size": manifest["train_size"],
            "build_s": round(seconds, 2), "train_s": manifest["build"]["train_seconds"],
            "peak_rss_tree_gb": round(mem.peak / 2**30, 2), "rss_before_gb": round(mem.base / 2**30, 2),
            "bytes_per_vector": round(shard_bytes / n, 1),
            "recall_at_10": round(synthetic.recall_at_k(found, truth, K), 4),
            "ivf_sharded_qps": round(ivf_qps), "exact_flat_qps": round(flat_qps),
        }
        row["speedup_vs_flat"] = round(ivf_qps / flat_qps, 1)
        rows.append(row)
        print(json.dumps(row), flush=True)
        shutil.rmtree(root, ignore_errors=True)
    return rows


def table_text(rows: list[dict]) -> str:
    cols = ["n", "dim", "factory", "nprobe", "build_s", "peak_rss_tree_gb", "bytes_per_vector", "recall_at_10",
            "ivf_sharded_qps", "exact_flat_qps", "speedup_vs_flat"]
    lines = [" | ".join(cols), " | ".join("---" for _ in cols)]
    lines += [" | ".join(str(r[c]) for c in cols) for r in rows]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[100_000, 1_000_000])
    parser.add_argument("--dims", type=int, nargs="+", default=[128, 512])
    parser.add_argument("--kinds", nargs="+", default=["flat", "pq"], choices=["flat", "pq"])
    parser.add_argument("--skip", nargs="*", default=[], help="n:dim pairs to skip, e.g. 1000000:512")
    parser.add_argument("--shards", type=int, default=2)
    parser.add_argument("--out", default="bench/results/index.json")
    args = parser.parse_args()

    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    largest = max(args.sizes) * max(args.dims) * 4
    ray.init(address="local", num_cpus=os.cpu_count(), include_dashboard=False, log_to_driver=False,
             object_store_memory=max(1 << 30, int(largest * 1.5)))
    workdir = tempfile.mkdtemp(prefix="facelake-bench-index-")
    started = time.perf_counter()
    rows = []
    try:
        for dim in args.dims:
            for n in args.sizes:
                if f"{n}:{dim}" in args.skip:
                    continue
                rows += run_one(n, dim, args.kinds, args.shards, workdir)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
        ray.shutdown()
    result = {
        "machine": {"cpus": os.cpu_count(), "memory_gb": round(psutil.virtual_memory().total / 2**30, 1),
                    "platform": platform.platform(), "faiss": faiss.__version__, "gpu": faiss.get_num_gpus(),
                    "note": "shared machine: other engineers' jobs ran concurrently"},
        "queries": NQ, "k": K, "skipped": args.skip, "total_s": round(time.perf_counter() - started, 1),
        "driver_maxrss_gb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, 2),
        "rows": rows,
    }
    os.makedirs(os.path.dirname(args.out) or ".", exist_ok=True)
    with open(args.out, "w") as handle:
        json.dump(result, handle, indent=2)
    print(json.dumps(result, indent=2))
    print(table_text(rows), file=sys.stderr)


if __name__ == "__main__":
    main()
