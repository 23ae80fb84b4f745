"""Benchmark facelake rebuild: add 1% to a 100k-face root, against a full rebuild of the same root.

    python bench/rebuild.py                                  # 100k faces, +1%
    python bench/rebuild.py --faces 20000 --out /tmp/r.json

The root is built directly (synthetic clustered 128-d faces as the faces table of record, then a
published index version), because embedding 100k real photos on this machine would take hours.
The 1% is synthetic too, so both timings cover the part of a rebuild after embedding: writing
the table version of record and publishing an index version (train or reuse the quantizer, add
every shard, write and checksum the files, flip CURRENT). Embedding cost is reported separately as
an estimate from a measured rate (``--embed-rate`` images/s, default from bench/results of the
embed job on this machine when given) since it scales with the photos embedded: 1% vs 100%.

Incremental = write_version(base + 1%) + publish_index(reuse the live trained quantizer).
Full        = write_version(every part rewritten) + publish_index(full=True: retrain on the sample).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import sys
import tempfile
import time

import numpy as np
import pyarrow as pa

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def faces_table(xb: np.ndarray, start: int) -> pa.Table:
    from facelake.registry import get_model, weights_fingerprint
    from facelake.schema import faces_schema

    spec = get_model()
    n, dim = xb.shape
    ids = [f"img{start + i:08d}" for i in range(n)]
    return pa.table({
        "image_id": ids, "face_index": np.zeros(n, np.int32), "uri": [f"/archive/{i}.jpg" for i in ids],
        "bbox": [[0, 0, 100, 100]] * n, "landmarks": [[0.0] * 10] * n, "det_score": np.ones(n, np.float32),
        "embedding": pa.FixedSizeListArray.from_arrays(pa.array(xb.reshape(-1), pa.float32()), dim),
        "model": [spec.name] * n, "detector": [spec.detector] * n, "weights_sha256": [weights_fingerprint(spec)] * n,
        "content_sha256": [f"{i:064x}" for i in range(start, start + n)],
    }, schema=faces_schema(dim))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--faces", type=int, default=100_000)
    parser.add_argument("--add", type=float, default=0.01, help="fraction added by the incremental rebuild")
    parser.add_argument("--repeat", type=int, default=2)
    parser.add_argument("--embed-rate", type=float, default=None, help="measured images/s of the embed job")
    parser.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "results", "rebuild.json"))
    args = parser.parse_args()

    import ray

    from facelake import root as rootmod
    from facelake.cluster import runtime
    from facelake.index.synthetic import clustered
    from facelake.jobs.rebuild import publish_index
    from facelake.lock import RootLock
    from facelake.registry import get_model, weights_fingerprint
    from facelake.storage import StorageOptions

    runtime.connect(None)
    spec = get_model()
    options = StorageOptions()
    added = int(args.faces * args.add)
    xb = clustered(args.faces + added * (args.repeat + 1), spec.dim, seed=0)
    results = {"incremental": [], "full": []}
    for rep in range(args.repeat):
        workdir = tempfile.mkdtemp(prefix="facelake-bench-rebuild-")
        root = os.path.join(workdir, "root")
        try:
            with RootLock(root, f"bench-{rep}", options=options) as lock:
                base = rootmod.write_version(root, None, drop_ids=pa.array([], pa.string()),
                                             add={rootmod.FACES: faces_table(xb[:args.faces], 0)},
                                             model=spec.name, job_id="bench", options=options)
                publish_index(root, rootmod.read_faces(root, version=base), model=spec.name,
                              weights_sha256=weights_fingerprint(spec), keep=5, full=True, lock=lock, options=options)
                lo = args.faces + rep * added
                new = faces_table(xb[lo:lo + added], lo)

                t = time.perf_counter()
                v = rootmod.write_version(root, base, drop_ids=pa.array([], pa.string()), add={rootmod.FACES: new},
                                          model=spec.name, job_id="bench", options=options)
                t_table = time.perf_counter() - t
                out = publish_index(root, rootmod.read_faces(root, version=v), model=spec.name,
                                    weights_sha256=weights_fingerprint(spec), keep=5, full=False, lock=lock, options=options)
                inc = time.perf_counter() - t
                assert not out["retrained"], out
                results["incremental"].append({"seconds": round(inc, 3), "table_seconds": round(t_table, 3),
                                               "faces": out["total"], "factory": out["factory"]})

                everything = rootmod.read_faces(root, version=v)
                t = time.perf_counter()
                v2 = rootmod.write_version(root, v, drop_ids=everything["image_id"].combine_chunks(),
                                           add={rootmod.FACES: everything}, model=spec.name, job_id="bench",
                                           options=options)
                t_table = time.perf_counter() - t
                out = publish_index(root, rootmod.read_faces(root, version=v2), model=spec.name,
                                    weights_sha256=weights_fingerprint(spec), keep=5, full=True, lock=lock, options=options)
                full = time.perf_counter() - t
                assert out["retrained"]
                results["full"].append({"seconds": round(full, 3), "table_seconds": round(t_table, 3),
                                        "faces": out["total"], "factory": out["factory"]})
        finally:
            shutil.rmtree(workdir, ignore_errors=True)
    inc = min(r["seconds"] for r in results["incremental"])
    full = min(r["seconds"] for r in results["full"])
    report = {
        "faces": args.faces, "added": added, "dim": spec.dim, "repeat": args.repeat,
        "incremental_seconds": inc, "full_seconds": full, "ratio_incremental_over_full": round(inc / full, 3),
        "runs": results,
        "covers": "table version of record + index publish (train or reuse, add all shards, checksums, CURRENT); "
                  "synthetic faces, no embedding, no content-hash scan",
        "machine": {"cpus": os.cpu_count(), "python": platform.python_version(), "ray_cpus": ray.cluster_resources().get("CPU")},
    }
    if args.embed_rate:
        report["embed_estimate_seconds"] = {"incremental": round(added / args.embed_rate, 1),
                                            "full": round((args.faces + added) / args.embed_rate, 1),
                                            "images_per_second": args.embed_rate}
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    with open(args.out, "w") as handle:
        json.dump(report, handle, indent=2)
    print(json.dumps({k: v for k, v in report.items() if k != "runs"}, indent=2))
    print(f"\n| rebuild of {args.faces} faces | seconds | of which table |\n|---|---|---|")
    print(f"| +{added} faces, quantizer reused | {inc:.2f} | {min(r['table_seconds'] for r in results['incremental']):.2f} |")
    print(f"| full (rewrite + retrain) | {full:.2f} | {min(r['table_seconds'] for r in results['full']):.2f} |")
    print(f"| ratio | {inc / full:.3f} | |")
    ray.shutdown()


if __name__ == "__main__":
    main()
