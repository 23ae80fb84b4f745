"""bench/gpu_embed: the whole embed job on one node, recognizer on CUDA when the node has one.

    python bench/gpu_embed.py [--photos N] [--lfw DIR] [--check N] [--json PATH]

Runs the real job, ``facelake.jobs.embed.run_embed`` with the local executor (this process: no
Ray, no deepface), on the first N LFW photos (default 3,000) in name order, preparing on one
thread per CPU of the node, and reports:

1. photos/s and faces/s of the job, wall clock from the call to its return (model loading
   included, measured apart too), and the runtime the recognizer ran on ("cuda" or a CPU one);
2. GPU utilisation during the job (nvidia-smi sampled every 200 ms: median and mean; none
   without a GPU);
3. each stage's share of one photo's CPU time (bench/prepare.py's split, plus the recognizer's
   time per photo at batch 64 on the same runtime), so the cores a GPU needs are known;
4. agreement: the first ``--check`` photos (default 300) embedded again in a child process with
   the GPU hidden (CUDA_VISIBLE_DEVICES=""), every face's cosine to the job's embedding checked
   against facelake.faces.inference.COSINE_TOLERANCE.

On a machine without a GPU it runs the same way on the CPU runtime (then 4 compares two CPU
runs). bench/gpu_node.sh brings what a bare GPU machine lacks and runs this there.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from machine_info import cpu_name, gpu_info  # bench/ is on sys.path: these run as scripts
from prepare import stage_split

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
LFW = REPO.parent / "shared" / "faces" / "lfw_deepfunneled" / "lfw-deepfunneled"


def write_manifest(photos: list[Path], folder: Path) -> str:
    path = folder / "manifest.parquet"
    pq.write_table(pa.table({"image_id": [p.stem for p in photos], "uri": [str(p) for p in photos]}), path)
    return str(path)


def embed(manifest: str, out: str) -> tuple[float, dict]:
    """Run the embed job; seconds and its summary."""
    from facelake.jobs.embed import EmbedConfig, run_embed

    started = time.perf_counter()
    summary = run_embed(EmbedConfig(manifest=manifest, out=out, executor="local", progress=False))
    return time.perf_counter() - started, summary.__dict__


def faces_of(out: str) -> dict[tuple[str, int], np.ndarray]:
    table = pq.read_table(os.path.join(out, "faces"), columns=["image_id", "face_index", "embedding"])
    vectors = np.asarray(table["embedding"].to_pylist(), np.float32)
    return {(i, f): v for i, f, v in zip(table["image_id"].to_pylist(), table["face_index"].to_pylist(), vectors)}


class GpuSampler:
    """nvidia-smi's utilisation.gpu every 200 ms while running; nothing without nvidia-smi."""

    def __init__(self) -> None:
        self.samples: list[int] = []
        self._process: subprocess.Popen | None = None

    def __enter__(self) -> "GpuSampler":
        try:
            self._process = subprocess.Popen(["nvidia-smi", "--query-gpu=utilization.gpu", "--format=csv,noheader,nounits",
                                              "-lms", "200"], stdout=subprocess.PIPE, text=True)
        except OSError:
            return self
        threading.Thread(target=self._read, daemon=True).start()
        return self

    def _read(self) -> None:
        for line in self._process.stdout:
            if line.strip().isdigit():
                self.samples.append(int(line.strip()))

    def __exit__(self, *exc) -> None:
        if self._process is not None:
            self._process.terminate()
            self._process.wait(timeout=10)

    def summary(self) -> dict | None:
        if not self.samples:
            return None
        return {"median": statistics.median(self.samples), "mean": round(statistics.fmean(self.samples), 1),
                "samples": len(self.samples)}


def recognizer_ms_per_photo(uris: list[str]) -> tuple[str, float, float]:
    """The recognizer's runtime, its ms per face and per photo at batch 64 on these photos' faces."""
    from facelake.faces.models import FaceEngine
    from facelake.faces.pipeline import FacePipeline

    pipeline = FacePipeline(FaceEngine())
    crops = [face.crop for uri in uris for face in pipeline.prepare({"image_id": uri, "uri": uri}).faces]
    pipeline.engine.embed(crops[:64], batch_size=64)  # warm-up
    started = time.perf_counter()
    pipeline.engine.embed(crops, batch_size=64)
    took = time.perf_counter() - started
    return pipeline.engine.runtime, 1000 * took / len(crops), 1000 * took / len(uris)


def agreement(manifest: str, out: str, job_faces: dict) -> dict:
    """Embed the check photos again with the GPU hidden; cosine of every face to the job's."""
    from facelake.faces.inference import COSINE_TOLERANCE

    env = {**os.environ, "CUDA_VISIBLE_DEVICES": ""}
    subprocess.run([sys.executable, __file__, "--cpu-child", manifest, out], env=env, check=True)
    cpu = faces_of(out)
    common = sorted(set(cpu) & set(job_faces))
    cosines = [float(np.dot(cpu[key], job_faces[key])) for key in common]
    checked_images = {image_id for image_id, _ in cpu}
    job_side = {key for key in job_faces if key[0] in checked_images}
    return {"faces": len(common), "faces_on_one_side_only": len(set(cpu) ^ job_side),
            "cosine_min": min(cosines), "cosine_median": statistics.median(cosines),
            "tolerance": COSINE_TOLERANCE, "within_tolerance": min(cosines) >= COSINE_TOLERANCE}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--photos", type=int, default=3000)
    parser.add_argument("--check", type=int, default=300)
    parser.add_argument("--lfw", type=Path, default=LFW)
    parser.add_argument("--json", type=Path)
    parser.add_argument("--cpu-child", nargs=2, metavar=("MANIFEST", "OUT"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.cpu_child:
        embed(*args.cpu_child)
        return
    photos = sorted(args.lfw.glob("*/*.jpg"))[:args.photos]
    if not photos:
        sys.exit(f"no photos under {args.lfw}")
    load = os.getloadavg()[0]
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        manifest = write_manifest(photos, folder)
        with GpuSampler() as sampler:
            seconds, summary = embed(manifest, str(folder / "out"))
        job_faces = faces_of(str(folder / "out"))
        runtime, ms_face, ms_photo = recognizer_ms_per_photo([str(p) for p in photos[:100]])
        stages = {**stage_split([str(p) for p in photos[:100]]), "recognizer": ms_photo}
        (folder / "check").mkdir()
        check = agreement(write_manifest(photos[:args.check], folder / "check"), str(folder / "check" / "out"),
                          job_faces)
    total = sum(stages.values())
    result = {
        "bench": "gpu_embed", "date": time.strftime("%Y-%m-%d"), "load_at_start": round(load, 2),
        "cpus": os.cpu_count(), "cpu": cpu_name(), "gpu": gpu_info(), "photos": len(photos),
        "executor": summary.get("executor"), "device": summary.get("device"), "recognizer_runtime": runtime,
        "preparing_threads": summary.get("workers"), "faces": summary.get("faces"), "seconds": round(seconds, 2),
        "photos_per_s": round(len(photos) / seconds, 1), "faces_per_s": round(summary.get("faces", 0) / seconds, 1),
        "gpu_utilisation_pct": sampler.summary(), "recognizer_ms_per_face": round(ms_face, 3),
        "stage_ms_per_photo": {k: round(v, 2) for k, v in stages.items()},
        "stage_share": {k: round(v / total, 3) for k, v in stages.items()},
        "agreement": check,
    }
    print(json.dumps(result, indent=2))
    print(f"\n{len(photos)} photos in {seconds:.1f} s: {result['photos_per_s']} photos/s, {result['faces_per_s']} faces/s "
          f"({runtime}, {result['preparing_threads']} preparing threads); GPU util {result['gpu_utilisation_pct']}")
    print("CPU share per stage: " + ", ".join(f"{k} {v:.0%}" for k, v in result["stage_share"].items()))
    if args.json:
        args.json.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
