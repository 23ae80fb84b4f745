"""Benchmark facelake search side by side with exact faiss and DeepFace.find, in one run.

    python bench/search.py                               # 100k gallery (+ real LFW part), 1M synthetic
    python bench/search.py --big 0 --real 300            # quicker: no 1M gallery, fewer photos

Gallery: ``--gallery`` faces = synthetic clustered 128-d vectors (index.synthetic.clustered) plus
the real SFace embeddings of ``--real`` LFW photos (embedded by facelake in this process). Probes:
``--nq`` new-photo queries near random gallery faces (synthetic.queries). On that gallery:

- facelake search, the job itself (``run_search``, faces-table probes, default nprobe, results
  written): sharded IVF held by Ray actors, and the same shards held in this process;
- exact faiss IndexFlatIP over the same vectors, batched, on all threads (the recall reference);
- DeepFace.find (model SFace, detector yunet) over a copy of the same real photos, for
  ``--deepface-probes`` held-out photos of gallery people: its first call builds deepface's
  representation file (timed apart); each probe is then timed, and DeepFace.represent on the
  probe alone is timed too, so its search share is find minus represent.

``--big N`` repeats facelake (Ray) vs exact Flat on N synthetic faces (default 1M, 128-d).
Peak memory is sampled (psutil, 50 ms) over this process and its descendants (Ray's workers):
object-store pages mapped by several processes are counted in each, so it is an upper bound.
Writes JSON to --out (bench/results/search.json) and prints a table.
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
from pathlib import Path

os.environ.setdefault("DEEPFACE_HOME", tempfile.mkdtemp(prefix="facelake-bench-deepface-"))
os.environ.setdefault("DEEPFACE_BACKEND_ENGINE", "onnx")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("FACELAKE_OBJECT_STORE_BYTES", str(2 << 30))

import faiss  # noqa: E402
import numpy as np  # noqa: E402
import psutil  # noqa: E402
import pyarrow as pa  # noqa: E402

from facelake import storage  # noqa: E402
from facelake.index import build, synthetic  # noqa: E402
from facelake.faces.registry import get_model, weights_fingerprint  # noqa: E402

CPUS = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
LFW = "/work/shared/faces/lfw_deepfunneled/lfw-deepfunneled"
K = 10
MODEL = "sface-yunet"

from peak_rss import PeakRSS  # noqa: E402  (bench/ is on sys.path when run as a script)




def faces_table(xb: np.ndarray, ids: list[str]) -> pa.Table:
    n, d = xb.shape
    return pa.table({
        "image_id": pa.array(ids), "face_index": pa.array(np.zeros(n, np.int32)),
        "bbox": pa.array([[0, 0, 32, 32]] * n, type=pa.list_(pa.int32(), 4)),
        "embedding": pa.FixedSizeListArray.from_arrays(pa.array(xb.ravel(), pa.float32()), d),
        "model": pa.array([MODEL] * n), "weights_sha256": pa.array([weights_fingerprint(get_model(MODEL))] * n),
    })


def pick_lfw(root: str, photos: int, probes: int) -> tuple[list[Path], list[Path]]:
    """Gallery photos (people with >= 2 photos, whole people, sorted) and one held-out photo of
    each of the first ``probes`` people (its other photos stay in the gallery)."""
    gallery, held = [], []
    for person in sorted(Path(root).iterdir()):
        files = sorted(person.glob("*.jpg"))
        if len(files) < 2:
            continue
        if len(held) < probes:
            held.append(files[-1])
            files = files[:-1]
        gallery.extend(files)
        if len(gallery) >= photos:
            break
    return gallery[:photos], held


def exact_search(xb: np.ndarray, xq: np.ndarray) -> dict:
    faiss.omp_set_num_threads(CPUS)
    with PeakRSS() as mem:
        flat = faiss.IndexFlatIP(xb.shape[1])
        flat.add(xb)
        flat.search(xq[:100], K)                               # warm up
        started = time.perf_counter()
        D, I = flat.search(xq, K)
        seconds = time.perf_counter() - started
    del flat
    return {"qps": round(len(xq) / seconds, 1), "seconds": round(seconds, 3), "peak_rss_gib": mem.gib, "I": I}


def facelake_search(root: str, probes_uri: str, out: str, executor: str, truth: np.ndarray, nq: int) -> dict:
    from facelake.jobs.search import SearchConfig, outputs, run_search

    with PeakRSS() as mem:
        started = time.perf_counter()
        summary = run_search(SearchConfig(probes=probes_uri, root=root, out=out, top_k=K, executor=executor,
                                          purpose="bench/search.py benchmark"))
        wall = time.perf_counter() - started
    table = storage.read_table(outputs(out)["results"], columns=["probe_image_id", "rank", "gallery_image_id"])
    position = {f"q-{i:07d}": i for i in range(nq)}
    found = np.full((nq, K), -1, np.int64)
    gallery_row = table["gallery_image_id"].to_pylist()
    for p, r, g in zip(table["probe_image_id"].to_pylist(), table["rank"].to_pylist(), gallery_row):
        found[position[p], r - 1] = int(g.rsplit("#", 1)[1])
    return {"qps": round(summary.queries_per_second, 1), "search_seconds": summary.search_seconds,
            "job_wall_seconds": round(wall, 3), "recall_at_10": round(synthetic.recall_at_k(found, truth, K), 4),
            "peak_rss_gib": mem.gib, "nprobe": None, "threshold": summary.threshold}


def gallery_ids(n: int, real_names: list[str] | None = None) -> list[str]:
    """Image ids that end in '#<row>' so results map back to rows of xb."""
    real_names = real_names or []
    return [f"{real_names[i] if i < len(real_names) else 'syn'}#{i}" for i in range(n)]


def run_gallery(label: str, xb: np.ndarray, names: list[str], nq: int, shards: int, work: str,
                executors: tuple[str, ...]) -> dict:
    xq = synthetic.queries(xb, nq, seed=11)
    started = time.perf_counter()
    root = os.path.join(work, f"root-{label}")
    with PeakRSS() as mem:
        manifest = build.build_version(faces_table(xb, gallery_ids(len(xb), names)), root, build.BuildOptions(
            model=MODEL, weights_sha256=weights_fingerprint(get_model(MODEL)), shards=shards))
    build_info = {"seconds": round(time.perf_counter() - started, 1), "peak_rss_gib": mem.gib,
                  "factory": manifest["factory"], "nprobe": manifest["nprobe"], "shards": shards}
    probes_uri = os.path.join(work, f"probes-{label}.parquet")
    storage.write_table(probes_uri, faces_table(xq, [f"q-{i:07d}" for i in range(nq)]))
    exact = exact_search(xb, xq)
    truth = exact.pop("I")
    row = {"gallery": len(xb), "dim": xb.shape[1], "nq": nq, "build": build_info, "exact_flat": exact}
    for executor in executors:
        result = facelake_search(root, probes_uri, os.path.join(work, f"out-{label}-{executor}"), executor, truth, nq)
        result["nprobe"] = manifest["nprobe"]
        result["speedup_vs_exact"] = round(result["qps"] / exact["qps"], 1)
        row[f"facelake_{executor}"] = result
    shutil.rmtree(root, ignore_errors=True)
    return row


def deepface_find(gallery: list[Path], probes: list[Path], work: str) -> dict:
    """DeepFace.find over a temporary copy of the gallery photos (it writes its cache there)."""
    from deepface import DeepFace

    folder = Path(work) / "deepface-db"
    for path in gallery:
        (folder / path.parent.name).mkdir(parents=True, exist_ok=True)
        shutil.copy(path, folder / path.parent.name / path.name)
    kwargs = dict(db_path=str(folder), model_name="SFace", detector_backend="yunet", silent=True,
                  enforce_detection=False)
    with PeakRSS() as mem:
        started = time.perf_counter()
        DeepFace.find(img_path=str(probes[0]), **kwargs)      # builds the representation file
        build_seconds = time.perf_counter() - started
        times, matches, correct, rank1 = [], [], [], []
        for probe in probes:
            started = time.perf_counter()
            frames = DeepFace.find(img_path=str(probe), **kwargs)
            times.append(time.perf_counter() - started)
            frame = frames[0]
            people = [Path(p).parent.name for p in frame["identity"]] if len(frame) else []
            matches.append(len(people))
            correct.append(sum(p == probe.parent.name for p in people))
            rank1.append(bool(people) and people[0] == probe.parent.name)
        represent = []
        for probe in probes:
            started = time.perf_counter()
            DeepFace.represent(img_path=str(probe), model_name="SFace", detector_backend="yunet",
                               enforce_detection=False)
            represent.append(time.perf_counter() - started)
    per_probe = float(np.median(times))
    search_share = max(1e-6, per_probe - float(np.median(represent)))
    shutil.rmtree(folder, ignore_errors=True)
    return {"gallery_photos": len(gallery), "probes": len(probes), "build_representations_seconds": round(build_seconds, 1),
            "seconds_per_probe": round(per_probe, 3), "probes_per_second": round(1 / per_probe, 2),
            "represent_seconds_per_probe": round(float(np.median(represent)), 3),
            "search_seconds_per_probe": round(search_share, 4), "search_only_probes_per_second": round(1 / search_share, 1),
            "median_matches_per_probe": float(np.median(matches)), "median_correct_matches": float(np.median(correct)),
            "rank1_correct": round(float(np.mean(rank1)), 3), "peak_rss_gib": mem.gib}


def facelake_real_probes(xb: np.ndarray, names: list[str], probe_vectors: np.ndarray, probes: list[Path]) -> dict:
    """Rank-1 identity of the held-out real probes against the whole gallery (exact top-1)."""
    flat = faiss.IndexFlatIP(xb.shape[1])
    flat.add(xb)
    ok = ~np.isnan(probe_vectors).any(axis=1)
    _, I = flat.search(np.ascontiguousarray(probe_vectors[ok]), 1)
    people = [names[i].split("/")[0] if i < len(names) else "synthetic" for i in I[:, 0]]
    truth = [p.parent.name for p, good in zip(probes, ok) if good]
    return {"probes_embedded": int(ok.sum()), "rank1_correct": round(float(np.mean([a == b for a, b in zip(people, truth)])), 3)}


def table_text(report: dict) -> str:
    lines = [f"{'gallery':>9} {'method':<36} {'q/s':>10} {'recall@10':>9} {'peak GiB':>8} {'vs exact':>8}"]
    for row in report["galleries"]:
        e = row["exact_flat"]
        lines.append(f"{row['gallery']:>9,} {'exact IndexFlatIP':<36} {e['qps']:>10,.0f} {1.0:>9.3f} {e['peak_rss_gib']:>8.2f} {1.0:>8.1f}")
        for key in ("facelake_ray", "facelake_local"):
            if key in row:
                r = row[key]
                name = f"facelake {key.split('_')[1]} ({row['build']['factory']}, np {r['nprobe']})"
                lines.append(f"{row['gallery']:>9,} {name:<36} {r['qps']:>10,.0f} {r['recall_at_10']:>9.3f} "
                             f"{r['peak_rss_gib']:>8.2f} {r['speedup_vs_exact']:>8.1f}")
    d = report.get("deepface_find")
    if d:
        lines.append(f"{d['gallery_photos']:>9,} {'DeepFace.find (SFace+yunet)':<36} {d['probes_per_second']:>10,.2f} "
                     f"{'-':>9} {d['peak_rss_gib']:>8.2f} {'-':>8}")
        lines.append(f"{'':>9} {'  its search share only':<36} {d['search_only_probes_per_second']:>10,.1f}")
    for key, value in report.get("ratios", {}).items():
        lines.append(f"ratio {key}: {value:,}")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--gallery", type=int, default=100_000, help="faces in the main gallery (synthetic + real)")
    parser.add_argument("--real", type=int, default=1000, help="LFW photos embedded into the gallery and given to DeepFace.find")
    parser.add_argument("--deepface-probes", type=int, default=5, help="held-out photos searched with DeepFace.find")
    parser.add_argument("--nq", type=int, default=2000, help="probes searched on the main gallery")
    parser.add_argument("--big", type=int, default=1_000_000, help="synthetic gallery for facelake vs exact (0: skip)")
    parser.add_argument("--big-nq", type=int, default=1000)
    parser.add_argument("--shards", type=int, default=2)
    parser.add_argument("--lfw", default=LFW)
    parser.add_argument("--out", default="bench/results/search.json")
    args = parser.parse_args()

    import ray

    from facelake.cluster import runtime
    from facelake.evaluation.embeddings import embed_largest_faces_local
    from facelake.faces.weights import provision

    provision(get_model(MODEL))
    runtime.connect(None)
    started_all = time.perf_counter()
    work = tempfile.mkdtemp(prefix="facelake-bench-search-")
    report: dict = {"machine": {"cpus": CPUS, "memory_gib": round(psutil.virtual_memory().total / 2**30, 1),
                                "platform": platform.platform(), "python": sys.version.split()[0],
                                "faiss": faiss.__version__, "ray": ray.__version__,
                                "gpu": bool(ray.cluster_resources().get("GPU", 0))},
                    "args": vars(args), "galleries": []}
    try:
        gallery_photos, held = pick_lfw(args.lfw, args.real, args.deepface_probes) if args.real else ([], [])
        names, real = [], np.zeros((0, 128), np.float32)
        if gallery_photos:
            started = time.perf_counter()
            vectors, errors = embed_largest_faces_local([str(p) for p in gallery_photos], MODEL, face="central")
            ok = ~np.isnan(vectors).any(axis=1)
            real = vectors[ok]
            names = [f"{p.parent.name}/{p.name}" for p, good in zip(gallery_photos, ok) if good]
            report["real_embedding"] = {"photos": len(gallery_photos), "embedded": int(ok.sum()),
                                        "errors": len(errors), "seconds": round(time.perf_counter() - started, 1)}
            print(f"embedded {ok.sum()} of {len(gallery_photos)} LFW photos", flush=True)
        synth = synthetic.clustered(max(0, args.gallery - len(real)), 128, seed=0)
        xb = np.ascontiguousarray(np.vstack([real, synth]).astype(np.float32))
        del synth
        report["galleries"].append(run_gallery("main", xb, names, args.nq, args.shards, work, ("ray", "local")))
        print(json.dumps(report["galleries"][-1]), flush=True)
        if held:
            probe_vectors, _ = embed_largest_faces_local([str(p) for p in held], MODEL, face="central")
            report["facelake_real_probes"] = facelake_real_probes(xb, names, probe_vectors, held)
            report["deepface_find"] = deepface_find(gallery_photos, held, work)
            print(json.dumps(report["deepface_find"]), flush=True)
        del xb
        if args.big:
            big = synthetic.clustered(args.big, 128, seed=5)
            report["galleries"].append(run_gallery("big", big, [], args.big_nq, args.shards, work, ("ray",)))
            print(json.dumps(report["galleries"][-1]), flush=True)
            del big
        main_row = report["galleries"][0]
        ratios = {}
        if "deepface_find" in report:
            d = report["deepface_find"]
            ratios["facelake_ray_qps_vs_deepface_find"] = round(main_row["facelake_ray"]["qps"] * d["seconds_per_probe"], 1)
            ratios["facelake_ray_qps_vs_deepface_find_search_share"] = round(
                main_row["facelake_ray"]["qps"] * d["search_seconds_per_probe"], 1)
        for row in report["galleries"]:
            ratios[f"facelake_ray_vs_exact_at_{row['gallery']}"] = row["facelake_ray"]["speedup_vs_exact"]
        report["ratios"] = ratios
    finally:
        shutil.rmtree(work, ignore_errors=True)
        ray.shutdown()
    report["total_seconds"] = round(time.perf_counter() - started_all, 1)
    print(json.dumps(report, indent=2))
    print(table_text(report))
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(report, indent=2) + "\n")


if __name__ == "__main__":
    main()
