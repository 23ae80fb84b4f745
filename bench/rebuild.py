"""Benchmark `facelake rebuild`: one nightly run adding 1% new photos to a root of N photos in local
files (scan + embed + publish), against the plain full rebuild (`rebuild --full`) of the same root.

    python bench/rebuild.py --photos 1000000                  # the issue's figure (quiet machine)
    python bench/rebuild.py --photos 20000 --no-save          # a smoke run on a busy machine

The archive: N photo files made as hard links (one directory entry each, no bytes, no inode) to
the bundled sample photos under distinct names, 1,000 per folder. Its faces of record are seeded
without embedding N photos: one synthetic clustered 128-d face per photo, with the photo's real
size, mtime and content sha256, written as a real table of record through facelake.record.tables's
table-version code in parts of 100,000 rows, then an index version published from it with the
same ``publish_index`` a rebuild uses (a full build: train + every shard). None of that is timed.

Timed (one process, Ray started once before both, so neither pays Ray's start):

- nightly: ``run_rebuild`` with a manifest of the N photos plus 1% new ones (also hard links to
  the sample photos, so real photos are embedded): stat of every photo in Ray tasks, the 1%
  embedded, table version of record, index version extended from the live one;
- full: ``run_rebuild(full=True)``: every photo re-embedded and every shard rebuilt. Above
  ``--full-direct`` photos it cannot run here in reasonable time (embedding 1M photos on 2 cores
  takes about a day), so it is measured on two subset roots (``--full-subset``, e.g. 500 and
  1500 photos, seeded the same way) and extrapolated linearly from the marginal per-photo
  rate: t(N) = t(M1) + (t(M2) - t(M1)) / (M2 - M1) * (N - M1). Labelled "extrapolated".

Prints JSON and a table; writes bench/results/rebuild.json only when the 1-minute load average
at start is at most 0.5 (as bench/embed.py and bench/scale.py) and --no-save is not given.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import platform
import shutil
import sys
import time
from pathlib import Path

import numpy as np
import pyarrow as pa

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

MAX_LOAD = 0.5
PER_FOLDER = 1000
SEED_ROWS = 100_000             # faces of record written per table version while seeding
SAMPLES = REPO / "samples" / "faces"


def sample_photos() -> list[Path]:
    return sorted(p for p in SAMPLES.glob("img*.jpg"))


def photo_path(photos: Path, i: int) -> Path:
    return photos / f"d{i // PER_FOLDER:05d}" / f"p{i:08d}.jpg"


def make_photos(photos: Path, n: int, sources: list[Path]) -> float:
    """Hard links p00000000.jpg ... under ``photos``; existing ones are kept. Returns seconds."""
    t = time.perf_counter()
    for i in range(n):
        path = photo_path(photos, i)
        if i % PER_FOLDER == 0:
            path.parent.mkdir(parents=True, exist_ok=True)
        if not path.exists():
            os.link(sources[i % len(sources)], path)
    return time.perf_counter() - t


def manifest_table(photos: Path, n: int) -> pa.Table:
    return pa.table({"image_id": [f"p{i:08d}" for i in range(n)], "uri": [str(photo_path(photos, i)) for i in range(n)]})


def seed_root(root: str, photos: Path, n: int, sources: list[Path]) -> dict:
    """Faces of record for photos 0..n-1 (synthetic embeddings, real stat and sha256), then a
    published index version, through the root / table-version / publish code a rebuild uses."""
    from facelake.record import tables as rootmod
    from facelake.index.synthetic import clustered
    from facelake.index.publish import publish_index
    from facelake.record.lock import RootLock
    from facelake.faces.registry import get_model, weights_fingerprint
    from facelake.schema import faces_schema
    from facelake.storage import StorageOptions

    spec = get_model()
    options = StorageOptions()
    stats = [os.stat(s) for s in sources]            # every link shares its source's inode
    shas = [hashlib.sha256(s.read_bytes()).hexdigest() for s in sources]
    t = time.perf_counter()
    with RootLock(root, "bench-seed", options=options) as lock:
        version = None
        for lo in range(0, n, SEED_ROWS):
            hi = min(n, lo + SEED_ROWS)
            xb = clustered(hi - lo, spec.dim, seed=lo)
            which = np.arange(lo, hi) % len(sources)
            table = pa.table({
                "image_id": [f"p{i:08d}" for i in range(lo, hi)], "face_index": np.zeros(hi - lo, np.int32),
                "uri": [str(photo_path(photos, i)) for i in range(lo, hi)],
                "bbox": [[0, 0, 100, 100]] * (hi - lo), "landmarks": [[0.0] * 10] * (hi - lo),
                "det_score": np.ones(hi - lo, np.float32),
                "embedding": pa.FixedSizeListArray.from_arrays(pa.array(xb.reshape(-1), pa.float32()), spec.dim),
                "model": [spec.name] * (hi - lo), "detector": [spec.detector] * (hi - lo),
                "weights_sha256": [weights_fingerprint(spec)] * (hi - lo),
                "content_sha256": [shas[w] for w in which],
            }, schema=faces_schema(spec.dim))
            table = table.append_column("source_size", pa.array([stats[w].st_size for w in which], pa.int64()))
            table = table.append_column("source_mtime_ns", pa.array([stats[w].st_mtime_ns for w in which], pa.int64()))
            table = table.append_column("source_etag", pa.nulls(hi - lo, pa.string()))
            version = rootmod.write_version(root, version, drop_ids=pa.array([], pa.string()),
                                            add={rootmod.FACES: table}, model=spec.name, job_id="bench-seed",
                                            options=options)
        rootmod.collect_garbage(root, options)
        published = publish_index(root, version, model=spec.name, weights_sha256=weights_fingerprint(spec), keep=3,
                                  full=True, lock=lock, options=options)
    return {"seconds": round(time.perf_counter() - t, 1), "faces": published["total"],
            "shards": published["shards"], "factory": published["factory"]}


def timed_rebuild(manifest: str, root: str, full: bool) -> dict:
    from facelake.jobs.rebuild import RebuildConfig, run_rebuild

    t = time.perf_counter()
    summary = run_rebuild(RebuildConfig(manifest=manifest, root=root, full=full, progress=False))
    seconds = time.perf_counter() - t
    return {"seconds": round(seconds, 2), "stages": summary.seconds, "new": summary.new, "changed": summary.changed,
            "hashed": summary.hashed, "embedded": (summary.embed or {}).get("images", 0),
            "faces": summary.faces, "retrained": summary.retrained, "incremental": summary.incremental,
            "outcome": summary.outcome}


def full_on_subset(workdir: Path, photos: Path, m: int, sources: list[Path]) -> dict:
    root = workdir / f"root-full-{m}"
    shutil.rmtree(root, ignore_errors=True)
    seed_root(str(root), photos, m, sources)
    manifest = workdir / f"manifest-{m}.parquet"
    from facelake import storage
    storage.write_table(str(manifest), manifest_table(photos, m))
    out = timed_rebuild(str(manifest), str(root), full=True)
    shutil.rmtree(root, ignore_errors=True)
    return {"photos": m, **out}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--photos", type=int, default=1_000_000, help="photos in the archive (N)")
    parser.add_argument("--add", type=float, default=0.01, help="fraction of new photos the nightly run adds")
    parser.add_argument("--workdir", default="/work/facelake-bench-rebuild",
                        help="where the photo links and roots go (kept between runs: links are reused)")
    parser.add_argument("--full-direct", type=int, default=5000,
                        help="up to this many photos the full rebuild runs on the root itself")
    parser.add_argument("--full-subset", type=int, nargs=2, default=(500, 1500), metavar=("M1", "M2"),
                        help="above --full-direct: subset sizes whose full rebuilds give the per-photo rate")
    parser.add_argument("--no-save", action="store_true", help="measure on a busy machine; write nothing")
    parser.add_argument("--out", default=str(REPO / "bench" / "results" / "rebuild.json"))
    args = parser.parse_args()
    os.environ.setdefault("DEEPFACE_HOME", str(REPO / ".deepface-home"))
    os.environ.setdefault("DEEPFACE_BACKEND_ENGINE", "onnx")
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    m1, m2 = args.full_subset
    if not 0 < args.add <= 1 or args.photos < 100 or not 0 < m1 < m2:
        parser.error("need --photos >= 100, 0 < --add <= 1 and 0 < M1 < M2")
    load = os.getloadavg()[0]
    if load > MAX_LOAD and not args.no_save:
        print(f"refusing to measure: the 1-minute load average is {load:.2f} (> {MAX_LOAD}); other work would be "
              f"timed too. Wait until the machine is quiet, or pass --no-save to measure anyway without "
              f"writing results.", file=sys.stderr)
        return 2
    workdir = Path(args.workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    added = max(1, int(args.photos * args.add))
    # faces of record ~300 B/face, index ~700 B/face per version (3 kept), links ~100 B each
    need = args.photos * (300 + 3 * 700 + 100) * 1.5
    free = shutil.disk_usage(workdir).free
    if free < need:
        print(f"refusing: {free / 1e9:.1f} GB free under {workdir}, about {need / 1e9:.1f} GB needed: "
              f"pick another --workdir", file=sys.stderr)
        return 2

    from facelake import storage
    from facelake.cluster import runtime
    from facelake.faces.registry import get_model
    from facelake.faces.weights import provision

    provision(get_model())
    sources = sample_photos()
    photos = workdir / "photos"
    link_seconds = make_photos(photos, args.photos + added, sources)
    print(f"{args.photos + added} photo links ready ({link_seconds:.0f} s)", file=sys.stderr)
    runtime.connect(None)
    import ray

    root = workdir / "root"
    shutil.rmtree(root, ignore_errors=True)
    seeded = seed_root(str(root), photos, args.photos, sources)
    print(f"seeded {seeded}", file=sys.stderr)
    night = workdir / "manifest-night.parquet"
    storage.write_table(str(night), manifest_table(photos, args.photos + added))

    nightly = timed_rebuild(str(night), str(root), full=False)
    print(f"nightly +{added}: {nightly}", file=sys.stderr)
    if args.photos + added <= args.full_direct:
        full = {"how": "measured", **timed_rebuild(str(night), str(root), full=True)}
        full_seconds = full["seconds"]
    else:
        a = full_on_subset(workdir, photos, m1, sources)
        b = full_on_subset(workdir, photos, m2, sources)
        rate = (b["seconds"] - a["seconds"]) / (m2 - m1)
        full_seconds = a["seconds"] + rate * (args.photos + added - m1)
        full = {"how": f"extrapolated from full rebuilds of {m1} and {m2} photos (marginal rate)",
                "seconds_per_photo": round(rate, 5), "subsets": [a, b]}
    shutil.rmtree(root, ignore_errors=True)
    load_after = os.getloadavg()[0]
    report = {
        "bench": "rebuild-nightly", "photos": args.photos, "added": added,
        "nightly_seconds": nightly["seconds"], "full_seconds": round(full_seconds, 1),
        "ratio_nightly_over_full": round(nightly["seconds"] / full_seconds, 4), "goal": "<= 0.10",
        "nightly": nightly, "full": full, "seed": seeded, "link_seconds": round(link_seconds, 1),
        "covers": "nightly: stat of every photo (Ray tasks) + embed of the new 1% (real photos) + table version + "
                  "index version extended from the live one; full: rebuild --full (re-embed all, retrain, every shard)",
        "load_average_at_start": round(load, 2), "load_average_at_end": round(load_after, 2),
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform(), "python": platform.python_version(),
                    "ray_cpus": ray.cluster_resources().get("CPU")},
        "measured_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    ray.shutdown()
    print(json.dumps(report, indent=2))
    print(f"\n| rebuild, {args.photos:,} photos in local files | seconds |\n|---|---|")
    print(f"| nightly +{added:,} new photos (stat all, embed new, extend index) | {nightly['seconds']:.1f} |")
    print(f"| full rebuild (`rebuild --full`){' - extrapolated' if full['how'] != 'measured' else ''} | {full_seconds:.1f} |")
    print(f"| ratio (goal <= 0.10) | {report['ratio_nightly_over_full']:.4f} |")
    if args.no_save:
        print("\n--no-save: nothing written (not a result)", file=sys.stderr)
        return 0
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    with open(args.out, "w") as handle:
        json.dump(report, handle, indent=2)
    print(f"\nsaved {args.out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
