"""bench/prepare: what feeds the recognizer, measured alone: photos/s of the face pipeline's
preparation (resolve, read, hash, decode, detect, quality floor, align) at 1 and 2 workers, as
threads and as processes, and each stage's share of one photo's CPU time.

    python bench/prepare.py [--photos N] [--rounds R] [--no-save]

The recognizer is left out here (and only here): ``FacePipeline.prepare`` is the code the embed
job runs on every photo before the recognizer's batch call. Sides, alternated A B C D for R rounds
(default 3) on the first N LFW photos (default 300) in name order, models loaded before timing:

- ``threads-1`` / ``threads-2``: one pipeline, ``prepare`` on a pool of 1 or 2 threads (each thread
  keeps its own detector: facelake.faces.models.FaceEngine.detector_for_thread);
- ``processes-1`` / ``processes-2``: a pool of 1 or 2 forked processes, each with its own pipeline,
  sending the aligned crops back (the recognizer would need them in the parent).

The per-stage split runs the same public functions ``prepare`` calls, one photo after another
on one thread, timing each with the thread's CPU clock. The JSON also gives the per-core rate and
how many such cores keep one GPU recognizer fed (bench/results/gpu_recognizer.json: faces/s at
batch 64), since one photo holds ``faces_per_photo`` faces on average.

Saved to bench/results/prepare.json only when the 1-minute load average at start is below 0.5.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from concurrent.futures import ProcessPoolExecutor, ThreadPoolExecutor
from pathlib import Path

from machine_info import cpu_name  # bench/ is on sys.path: these run as scripts

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
LFW = REPO.parent / "shared" / "faces" / "lfw_deepfunneled" / "lfw-deepfunneled"
RESULTS = REPO / "bench" / "results"
MAX_LOAD = 0.5
SIDES = ("threads-1", "threads-2", "processes-1", "processes-2")

_PIPELINE = None  # one per process (the process pool's workers and this one)


def _pipeline():
    global _PIPELINE
    if _PIPELINE is None:
        from facelake.faces.models import FaceEngine
        from facelake.faces.pipeline import FacePipeline

        _PIPELINE = FacePipeline(FaceEngine(threads=1))
    return _PIPELINE


def _prepare(uri: str) -> list:
    """The crops of one photo (what the recognizer would receive)."""
    return [face.crop for face in _pipeline().prepare({"image_id": uri, "uri": uri}).faces]


def _run(side: str, uris: list[str], pools: dict) -> tuple[float, int]:
    started = time.perf_counter()
    faces = sum(len(crops) for crops in pools[side].map(_prepare, uris, chunksize=8))
    return time.perf_counter() - started, faces


def stage_split(uris: list[str]) -> dict[str, float]:
    """CPU milliseconds per photo of each stage ``prepare`` runs, one thread."""
    from facelake.faces import reader
    from facelake.faces.imaging import content_sha256, decode_bgr

    pipeline, clock = _pipeline(), time.thread_time
    spent = dict.fromkeys(("read", "sha256", "decode", "detect", "align"), 0.0)
    for uri in uris:
        t0 = clock()
        data = reader.read(reader.resolve(uri, "", ()), pipeline.limits)
        t1 = clock()
        content_sha256(data)
        t2 = clock()
        image = decode_bgr(data, pipeline.max_pixels)
        t3 = clock()
        detections = [d for d in pipeline.engine.detect(image) if not pipeline.floor.reason(d)]
        t4 = clock()
        for det in detections:
            pipeline.engine.align(image, det.landmarks)
        t5 = clock()
        for stage, took in zip(spent, (t1 - t0, t2 - t1, t3 - t2, t4 - t3, t5 - t4)):
            spent[stage] += took
    return {stage: 1000 * took / len(uris) for stage, took in spent.items()}


def _gpu_faces_per_s() -> float | None:
    path = RESULTS / "gpu_recognizer.json"
    if not path.exists():
        return None
    for row in json.loads(path.read_text())["cuda"]["throughput"]:
        if row["batch"] == 64:
            return row["faces_per_s_median"]
    return None


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--photos", type=int, default=300)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--no-save", action="store_true")
    args = parser.parse_args()
    if not LFW.is_dir():
        sys.exit(f"LFW not found at {LFW} (../shared/faces beside the repository)")
    load = os.getloadavg()[0]
    uris = [str(p) for p in sorted(LFW.glob("*/*.jpg"))[:args.photos]]
    _prepare(uris[0])  # this process's model, loaded before any pool forks
    pools = {"threads-1": ThreadPoolExecutor(1), "threads-2": ThreadPoolExecutor(2),
             "processes-1": ProcessPoolExecutor(1), "processes-2": ProcessPoolExecutor(2)}
    for side in SIDES:  # warm every pool: each worker loads its model before timing
        _run(side, uris[:16], pools)
    runs: dict[str, list[float]] = {side: [] for side in SIDES}
    faces = 0
    for _ in range(args.rounds):
        for side in SIDES:
            seconds, faces = _run(side, uris, pools)
            runs[side].append(len(uris) / seconds)
    for pool in pools.values():
        pool.shutdown()
    stages = stage_split(uris[:100])
    total = sum(stages.values())
    per_core = statistics.median(runs["threads-1"])
    gpu_rate = _gpu_faces_per_s()
    result = {
        "bench": "prepare", "date": time.strftime("%Y-%m-%d"), "photos": len(uris), "rounds": args.rounds,
        "load_at_start": round(load, 2), "cpus": os.cpu_count(), "cpu": cpu_name(), "python": platform.python_version(),
        "faces_per_photo": round(faces / len(uris), 3),
        "photos_per_s": {side: {"median": round(statistics.median(r), 1), "min": round(min(r), 1),
                                "max": round(max(r), 1)} for side, r in runs.items()},
        "ratio_2_workers": {kind: round(statistics.median(runs[f"{kind}-2"]) / statistics.median(runs[f"{kind}-1"]), 2)
                            for kind in ("threads", "processes")},
        "stage_ms_per_photo": {stage: round(ms, 2) for stage, ms in stages.items()},
        "stage_share": {stage: round(ms / total, 3) for stage, ms in stages.items()},
        "per_core_photos_per_s": round(per_core, 1),
        "gpu_faces_per_s_batch64": gpu_rate,
        "cores_to_feed_one_gpu": (round(gpu_rate / (per_core * faces / len(uris)), 1) if gpu_rate else None),
    }
    print(json.dumps(result, indent=2))
    print(f"\n{'side':<13} {'photos/s (median, min-max)':>28}")
    for side, r in result["photos_per_s"].items():
        print(f"{side:<13} {r['median']:>10} ({r['min']}-{r['max']})")
    print("stage CPU ms/photo: " + ", ".join(f"{s} {ms}" for s, ms in result["stage_ms_per_photo"].items()))
    if args.no_save or load >= MAX_LOAD:
        print(f"not saved (load {load:.2f} at start, --no-save {args.no_save}): a loaded run is not a result")
        return
    (RESULTS / "prepare.json").write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
