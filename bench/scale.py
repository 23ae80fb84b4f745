"""Archive scale: build and search sharded indexes of 1M-10M faces on this machine, side by side
with exact search, and measure where the memory goes.

    python bench/scale.py                          # 1M faces
    python bench/scale.py --sizes 1000000 2000000 --probes 50000 20000 --rounds 2

For each size N the orchestrator (this process, not measured) writes N synthetic clustered
128-d faces (``index.synthetic`` model, generated chunk by chunk) as a real faces table of
Parquet parts, with probes near random gallery faces. Then, each in a fresh subprocess so that
memory is measured per role:

- build: ``facelake index`` (``run_index``) on a local Ray: driver peak RSS (its own
  ``ru_maxrss``), the largest Ray worker's peak RSS (sampled), build time, the version's
  factory / nprobe / resident bytes per face;
- search, alternating A B A B: A = the facelake search job (faces-table probes in, result files
  out, Ray actors per shard; Ray start-up and shard loading stated apart; its probes/s counts
  from the shards loaded to the last result file written (the search workers start while the
  shards load; what is left of their start-up is in it), and is also given after the first
  batch), B = exact
  ``IndexFlatIP`` over the same gallery in one process with every thread; probes/s of each and
  their ratio per round, medians;
- recall@10 of facelake's results against exact top-10 computed in chunks over the parts;
- whole job, both sides: facelake's command from Ray start to its last result file against
  exact search's reading the vectors, adding them to IndexFlatIP, reading the probes and searching.

``--phase build`` prepares data and builds only (saved to work/build-N.json with the load
average at its start: a build's memory does not need a quiet machine); ``--phase search`` runs
the A B A B rounds on that saved build.

Records the 1-minute load average at start and refuses to write results above 0.5 (the figures
are still printed). Writes bench/results/scale.json and prints a table.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("FACELAKE_OBJECT_STORE_BYTES", str(1 << 30))

import faiss  # noqa: E402
import numpy as np  # noqa: E402
import psutil  # noqa: E402
import pyarrow as pa  # noqa: E402

from facelake import storage  # noqa: E402
from facelake.index import synthetic  # noqa: E402
from facelake.faces.registry import get_model, weights_fingerprint  # noqa: E402

MODEL = "sface-yunet"
DIM = 128
K = 10
PART_ROWS = 100_000
HERE = Path(__file__).resolve().parent
CPUS = len(os.sched_getaffinity(0))


# ------------------------------------------------------------------------------ data

def write_gallery(folder: Path, n: int, seed: int = 0) -> None:
    """N clustered faces as faces-table parts, generated chunk by chunk (bounded memory)."""
    done = folder / "_SUCCESS"
    if done.exists():
        return
    rng = np.random.default_rng(seed)
    unit = lambda x: x / np.linalg.norm(x, axis=1, keepdims=True)  # noqa: E731
    groups = unit(rng.standard_normal((max(1, n // synthetic.PER_GROUP), DIM), dtype=np.float32))
    persons = max(1, n // synthetic.PER_PERSON)
    centres = groups[rng.integers(0, len(groups), persons)]
    centres = unit(centres + rng.standard_normal(centres.shape, dtype=np.float32)
                   * (synthetic.GROUP_SPREAD / np.sqrt(DIM))).astype(np.float32)
    wsha = weights_fingerprint(get_model(MODEL))
    for number, start in enumerate(range(0, n, PART_ROWS)):
        stop = min(n, start + PART_ROWS)
        block = centres[rng.integers(0, persons, stop - start)]
        block = unit(block + rng.standard_normal(block.shape, dtype=np.float32)
                     * (synthetic.PHOTO_SPREAD / np.sqrt(DIM))).astype(np.float32)
        rows = stop - start
        table = pa.table({
            "image_id": pa.array([f"img-{i:09d}" for i in range(start, stop)]),
            "face_index": pa.array(np.zeros(rows, np.int32)),
            "uri": pa.array([f"s3://archive/photos/{i:09d}.jpg" for i in range(start, stop)]),
            "bbox": pa.array([[0, 0, 64, 64]] * rows, type=pa.list_(pa.int32(), 4)),
            "embedding": pa.FixedSizeListArray.from_arrays(pa.array(block.ravel()), DIM),
            "model": pa.array([MODEL] * rows), "weights_sha256": pa.array([wsha] * rows),
        })
        storage.write_table(str(folder / f"part-{number:05d}.parquet"), table)
    done.write_text("ok")


def gallery_vectors(folder: Path):
    """(first row, vectors) of each part, one part at a time."""
    first = 0
    for part in sorted(folder.glob("part-*.parquet")):
        table = storage.read_table(str(part), columns=["embedding"])
        xb = table["embedding"].combine_chunks().flatten().to_numpy().reshape(-1, DIM).astype(np.float32)
        yield first, xb
        first += len(xb)


def make_probes(folder: Path, n: int, nq: int, path: Path) -> np.ndarray:
    """nq probes near random gallery faces (new photos of archived people), as a faces table."""
    rng = np.random.default_rng(7)
    picks = np.sort(rng.choice(n, nq, replace=False))
    base = np.empty((nq, DIM), np.float32)
    for first, xb in gallery_vectors(folder):
        inside = picks[(picks >= first) & (picks < first + len(xb))]
        base[np.searchsorted(picks, inside)] = xb[inside - first]
    xq = base + rng.standard_normal(base.shape, dtype=np.float32) * (synthetic.PHOTO_SPREAD / np.sqrt(DIM))
    xq = np.ascontiguousarray(xq / np.linalg.norm(xq, axis=1, keepdims=True), np.float32)
    wsha = weights_fingerprint(get_model(MODEL))
    storage.write_table(str(path), pa.table({
        "image_id": pa.array([f"q-{i:07d}" for i in range(nq)]),
        "face_index": pa.array(np.zeros(nq, np.int32)),
        "bbox": pa.array([[0, 0, 64, 64]] * nq, type=pa.list_(pa.int32(), 4)),
        "embedding": pa.FixedSizeListArray.from_arrays(pa.array(xq.ravel()), DIM),
        "model": pa.array([MODEL] * nq), "weights_sha256": pa.array([wsha] * nq)}))
    return xq


def exact_topk(folder: Path, xq: np.ndarray) -> np.ndarray:
    """Exact top-K gallery rows of each probe, one part at a time (the recall reference)."""
    from facelake.index.search import merge_topk

    results = []
    for first, xb in gallery_vectors(folder):
        flat = faiss.IndexFlatIP(DIM)
        flat.add(xb)
        D, I = flat.search(xq, K)
        results = [merge_topk(results + [(D, I + first)], K)] if results else [(D, I + first)]
    return results[0][1]


# ------------------------------------------------------------------------------ measured roles

def _anon_rss(pid: int) -> int:
    """Anonymous resident bytes of a process (RssAnon: its own memory, not the file pages it
    maps, such as a searcher's memory-mapped vectors that the page cache can drop)."""
    with open(f"/proc/{pid}/status") as status:
        for line in status:
            if line.startswith("RssAnon:"):
                return int(line.split()[1]) * 1024
    return 0


class WorkerPeak:
    """Peak RSS of the single largest Ray worker process (children of this process), sampled;
    ``anon_peak``: the largest anonymous part of it (RssAnon)."""

    def __init__(self, match: str = "ray::") -> None:
        self.match, self.peak, self.anon_peak, self._stop = match, 0, 0, threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        me = psutil.Process()
        while not self._stop.is_set():
            for proc in me.children(recursive=True):
                try:
                    if self.match in " ".join(proc.cmdline()[:1]):
                        self.peak = max(self.peak, proc.memory_info().rss)
                        self.anon_peak = max(self.anon_peak, _anon_rss(proc.pid))
                except (psutil.Error, OSError):
                    pass
            time.sleep(0.2)

    def __enter__(self) -> "WorkerPeak":
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()


def role_build(faces: str, root: str) -> dict:
    from facelake.jobs.index_cmd import run_index

    started = time.perf_counter()
    with WorkerPeak() as workers:
        manifest = run_index(faces, root)
    seconds = time.perf_counter() - started
    resident = sum(s["resident_bytes"] for s in manifest["shards"])
    return {"seconds": round(seconds, 1), "driver_peak_rss_mib": round(_self_peak() / 2**20),
            "largest_worker_peak_rss_mib": round(workers.peak / 2**20), "factory": manifest["factory"],
            "nlist": manifest["nlist"], "nprobe": manifest["nprobe"], "rerank": manifest.get("rerank"),
            "shards": len(manifest["shards"]), "resident_bytes_per_face": round(resident / manifest["total"], 1),
            "tuning_recall_at_10": manifest["tuning"]["recall_at_10"], "train_seconds": manifest["build"]["train_seconds"]}


def role_facelake(root: str, probes: str, out: str) -> dict:
    from facelake.cluster import runtime
    from facelake.jobs.search import SearchConfig, outputs, run_search

    started = time.perf_counter()
    runtime.connect(None)
    ray_start = time.perf_counter() - started
    with WorkerPeak("ray::LocalShardSearcher") as searchers:   # ShardSearcher = ray.remote(LocalShardSearcher)
        summary = run_search(SearchConfig(probes=probes, root=root, out=out, top_k=K,
                                          purpose="bench/scale.py benchmark"))
    wall = time.perf_counter() - started
    table = storage.read_table(outputs(out)["results"], columns=["probe_image_id", "rank", "gallery_image_id"])
    nq = summary.searched_faces
    found = np.full((nq, K), -1, np.int64)
    for p, r, g in zip(*(table[c].to_pylist() for c in ("probe_image_id", "rank", "gallery_image_id"))):
        found[int(p[2:]), r - 1] = int(g[4:])
    np.save(Path(out) / "found.npy", found)
    return {"probes_per_s": round(summary.searched_faces / summary.search_seconds, 1),
            "steady_probes_per_s": round(summary.steady_queries_per_second, 1),
            "search_seconds": summary.search_seconds, "first_batch_seconds": summary.first_batch_seconds,
            "job_wall_seconds": round(wall, 1),
            "ray_start_seconds": round(ray_start, 1), "driver_peak_rss_mib": round(_self_peak() / 2**20),
            "searcher_peak_rss_mib": round(searchers.peak / 2**20),
            "searcher_peak_anon_mib": round(searchers.anon_peak / 2**20)}


def role_exact(faces: str, probes: str) -> dict:
    started = time.perf_counter()
    faiss.omp_set_num_threads(CPUS)
    flat = faiss.IndexFlatIP(DIM)
    for _, xb in gallery_vectors(Path(faces)):
        flat.add(xb)
    xq = storage.read_table(probes, columns=["embedding"])["embedding"].combine_chunks().flatten() \
        .to_numpy().reshape(-1, DIM).astype(np.float32)
    load_seconds = time.perf_counter() - started
    flat.search(xq[:64], K)                                    # warm up
    searched = time.perf_counter()
    flat.search(xq, K)
    seconds = time.perf_counter() - searched
    return {"probes_per_s": round(len(xq) / seconds, 1), "search_seconds": round(seconds, 2),
            "load_seconds": round(load_seconds, 1), "job_wall_seconds": round(time.perf_counter() - started, 1),
            "peak_rss_mib": round(_self_peak() / 2**20)}


def _self_peak() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def run_role(*args: str) -> dict:
    """Run one measured role in a fresh Python process; return its JSON."""
    done = subprocess.run([sys.executable, __file__, "--role", *args], capture_output=True, text=True)
    if done.returncode:
        raise RuntimeError(f"role {args[0]} failed:\n{done.stderr[-4000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


# ------------------------------------------------------------------------------ orchestration

def prepare_and_build(n: int, work: Path, nq: int) -> dict:
    """Data, exact reference (kept between runs: data, not measurements) and a fresh build of
    size ``n``; the build's figures are saved to work/build-N.json with the load at its start."""
    folder, root = work / f"faces-{n}", work / f"root-{n}"
    t = time.perf_counter()
    write_gallery(folder, n)
    probes, cached = work / f"probes-{n}-{nq}.parquet", work / f"truth-{n}-{nq}.npy"
    if not (probes.exists() and cached.exists()):
        np.save(cached, exact_topk(folder, make_probes(folder, n, nq, probes)))
    prepare = round(time.perf_counter() - t, 1)
    storage.remove(str(root), recursive=True)
    load = os.getloadavg()[0]
    build = {**run_role("build", str(folder), str(root)), "load_average_at_start": round(load, 2),
             "prepare_seconds": prepare}
    (work / f"build-{n}.json").write_text(json.dumps(build, indent=2))
    return build


def bench_size(n: int, work: Path, nq: int, rounds: int, phase: str) -> dict:
    """One size: build (unless phase is "search": the saved build is reused), then the search
    sides A B A B (unless phase is "build")."""
    folder, root = work / f"faces-{n}", work / f"root-{n}"
    if phase == "search":
        saved = work / f"build-{n}.json"
        if not saved.exists() or not (work / f"truth-{n}-{nq}.npy").exists():
            sys.exit(f"no saved build of {n} faces with {nq} probes in {work}: run --phase build first")
        build = json.loads(saved.read_text())
    else:
        build = prepare_and_build(n, work, nq)
    if phase == "build":
        return {"faces": n, "probes": nq, "build": build}
    probes, truth = work / f"probes-{n}-{nq}.parquet", np.load(work / f"truth-{n}-{nq}.npy")
    sides: dict[str, list[dict]] = {"facelake": [], "exact": []}
    for round_no in range(rounds):                                      # A B A B ...
        out = work / f"out-{n}-{round_no}"
        storage.remove(str(out), recursive=True)
        sides["facelake"].append(run_role("facelake", str(root), str(probes), str(out)))
        sides["exact"].append(run_role("exact", str(folder), str(probes)))
    found = np.load(work / f"out-{n}-0" / "found.npy")
    fl = [r["probes_per_s"] for r in sides["facelake"]]
    steady = [r["steady_probes_per_s"] for r in sides["facelake"]]
    ex = [r["probes_per_s"] for r in sides["exact"]]
    ratios = [a / b for a, b in zip(fl, ex)]
    steady_ratios = [a / b for a, b in zip(steady, ex)]
    job_ratios = [e["job_wall_seconds"] / f["job_wall_seconds"] for f, e in zip(sides["facelake"], sides["exact"])]
    return {"faces": n, "probes": nq, "build": build,
            "recall_at_10": round(synthetic.recall_at_k(found, truth, K), 4),
            "facelake": sides["facelake"], "exact": sides["exact"],
            "median_probes_per_s": {"facelake": statistics.median(fl), "facelake_steady": statistics.median(steady),
                                    "exact": statistics.median(ex)},
            "median_ratio": round(statistics.median(ratios), 2),
            "ratio_range": [round(min(ratios), 2), round(max(ratios), 2)],
            "median_steady_ratio": round(statistics.median(steady_ratios), 2),
            "median_job_wall_ratio": round(statistics.median(job_ratios), 2),
            "median_first_batch_seconds": statistics.median(r["first_batch_seconds"] for r in sides["facelake"]),
            "largest_searcher_peak_rss_mib": max(r["searcher_peak_rss_mib"] for r in sides["facelake"]),
            "largest_searcher_peak_anon_mib": max(r.get("searcher_peak_anon_mib", 0) for r in sides["facelake"])}


def table(report: dict) -> str:
    lines = ["| faces | build s | driver peak MiB | largest worker MiB | bytes/face resident | factory, nprobe | "
             "recall@10 | probes | facelake probes/s (whole search; after 1st batch) | exact probes/s | "
             "ratio (median, range) | ratio after 1st batch | whole-job ratio | largest searcher MiB (RSS; anonymous) |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in report["sizes"]:
        b = r["build"]
        lines.append(f"| {r['faces']:,} | {b['seconds']} | {b['driver_peak_rss_mib']} | {b['largest_worker_peak_rss_mib']} "
                     f"| {b['resident_bytes_per_face']} | {b['factory']}, {b['nprobe']} | {r['recall_at_10']} "
                     f"| {r['probes']:,} | {r['median_probes_per_s']['facelake']:,.0f}; "
                     f"{r['median_probes_per_s']['facelake_steady']:,.0f} | {r['median_probes_per_s']['exact']:,.1f} "
                     f"| {r['median_ratio']}x ({r['ratio_range'][0]}-{r['ratio_range'][1]}) "
                     f"| {r['median_steady_ratio']}x | {r['median_job_wall_ratio']}x "
                     f"| {r.get('largest_searcher_peak_rss_mib', '-')}; {r.get('largest_searcher_peak_anon_mib', '-')} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--role", nargs="+", help=argparse.SUPPRESS)
    parser.add_argument("--sizes", type=int, nargs="+", default=[1_000_000])
    parser.add_argument("--probes", type=int, nargs="+", default=[50_000],
                        help="probes per size (one value per --sizes entry; the last one repeats)")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--phase", choices=("all", "build", "search"), default="all",
                        help="build: data, exact reference and index only (no quiet machine needed for "
                             "memory; its time is labelled with its load); search: the A B A B rounds on "
                             "the saved build (needs a quiet machine)")
    parser.add_argument("--work", default=str(HERE / "results" / "tmp" / "scale"))
    parser.add_argument("--out", default=str(HERE / "results" / "scale.json"))
    args = parser.parse_args()
    if args.role:
        role, *rest = args.role
        print(json.dumps({"build": role_build, "facelake": role_facelake, "exact": role_exact}[role](*rest)))
        return
    load = os.getloadavg()[0]
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    report = {"machine": {"cpus": CPUS, "memory_gib": round(psutil.virtual_memory().total / 2**30, 1),
                          "load_average_at_start": round(load, 2)},
              "faiss": faiss.__version__, "sizes": []}
    for i, n in enumerate(args.sizes):
        report["sizes"].append(bench_size(n, work, args.probes[min(i, len(args.probes) - 1)], args.rounds,
                                          args.phase))
        print(json.dumps(report["sizes"][-1]), flush=True)
    report["machine"]["load_average_at_end"] = round(os.getloadavg()[0], 2)
    if args.phase == "build":
        return
    print(table(report))
    if load > 0.5:
        print(f"load average at start was {load:.2f} > 0.5: not a result, {args.out} not written", file=sys.stderr)
        sys.exit(3)
    Path(args.out).write_text(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
