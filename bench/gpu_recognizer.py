"""bench/gpu_recognizer: the recognizer on onnxruntime's CUDA provider, checked against onnxruntime CPU and timed.

    python bench/gpu_recognizer.py prepare --out DIR [--photos N]
    python bench/gpu_recognizer.py measure --inputs DIR --model PATH [--json PATH] [--cpu-only]
                                           [--repeats R] [--cpu-threads T]

``prepare`` (on the machine holding the photos; onnxruntime CPU): the first N LFW photos in name
order (../shared/faces/lfw_deepfunneled), each photo's largest face passing the default quality
floor, cut by facelake's own detector and alignment (facelake.faces.models.FaceEngine: YuNet, 5-point
similarity transform to SFace's 112x112 template), saved as uint8 BGR crops (crops.npy, n x 112 x
112 x 3), and the reference: the raw embeddings of the same crops from
``facelake.faces.inference.OrtRecognizer(path, threads=None, cuda=False)`` (cpu_ref.npy), batches of 64.

``measure`` (on the GPU machine): opens the same graph with
``OrtRecognizer(path, threads=None, cuda=True)`` -- facelake's "cuda" runtime -- and reports

1. the providers onnxruntime offers and the ones the session really uses;
2. correctness: cosine of each CUDA embedding to the CPU reference (min, median), against
   facelake.faces.inference.COSINE_TOLERANCE, and how far every pairwise similarity moved (median,
   p99, max), against SIMILARITY_TOLERANCE; the same for onnxruntime CPU on this machine;
3. throughput: faces/s of the CUDA recognizer at batch 1, 16, 64 and 256 (warm-up first; wall
   clock around ``run``, which returns only once the embeddings are back on the host; median
   of R repeats, each at least 512 faces, rotating over the crops); and onnxruntime CPU
   (``OrtRecognizer(path, threads=T, cuda=False)``, T = all cores) against CUDA at batch 64,
   alternated A B A B.

Input blobs are built once (facelake.faces.models.preprocessing); the times are the recognizer call
alone: host-to-device copy, the graph, device-to-host copy. ``--cpu-only`` skips the CUDA side
(to test the script without a GPU).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import numpy as np

from machine_info import cpu_name, gpu_info  # bench/ is on sys.path: these run as scripts

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from facelake.faces.inference import COSINE_TOLERANCE, SIMILARITY_TOLERANCE, OrtRecognizer  # noqa: E402
from facelake.faces.registry import get_model  # noqa: E402

LFW = REPO.parent / "shared" / "faces" / "lfw_deepfunneled" / "lfw-deepfunneled"
MODEL = "sface-yunet"
BATCHES = (1, 16, 64, 256)
REF_BATCH = 64  # facelake's embed batch (FaceEmbedder.embed)


def _blob(crops: np.ndarray) -> np.ndarray:
    from facelake.faces.models import preprocessing

    return preprocessing(get_model(MODEL))(crops)


def _embed(recognizer: OrtRecognizer, blob: np.ndarray, batch: int = REF_BATCH) -> np.ndarray:
    return np.concatenate([recognizer.run(blob[i:i + batch]) for i in range(0, len(blob), batch)]).astype(np.float32)


def _unit(vectors: np.ndarray) -> np.ndarray:
    return vectors / np.maximum(np.linalg.norm(vectors, axis=1, keepdims=True), 1e-12)


def sha256(path: str | Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def prepare(out: Path, photos: int) -> None:
    import cv2

    from facelake.faces.models import FaceEngine, QualityFloor

    engine = FaceEngine(MODEL, runtime="onnxruntime", recognizer=False, threads=1)
    floor = QualityFloor()
    crops, names, scanned = [], [], 0
    for path in sorted(LFW.glob("*/*.jpg")):
        if len(crops) == photos:
            break
        scanned += 1
        image = cv2.imread(str(path), cv2.IMREAD_COLOR)
        faces = [d for d in engine.detect(image) if floor.reason(d) is None] if image is not None else []
        if faces:
            crops.append(engine.align(image, faces[0].landmarks))
            names.append(str(path.relative_to(LFW)))
    stack = np.stack(crops).astype(np.uint8)
    from facelake.faces.weights import provision

    spec = get_model(MODEL)
    graph = provision(spec)[spec.recognizer_weight.file_name]
    import onnxruntime as ort

    recognizer = OrtRecognizer(str(graph), threads=None, cuda=False)
    reference = _embed(recognizer, _blob(stack))
    out.mkdir(parents=True, exist_ok=True)
    np.save(out / "crops.npy", stack)
    np.save(out / "cpu_ref.npy", reference)
    (out / "meta.json").write_text(json.dumps({
        "faces": len(stack), "photos_scanned": scanned, "photos_source": "LFW deep-funneled, first photos in name order, largest face "
        "passing the default quality floor, facelake.faces.models.FaceEngine detect + align",
        "first": names[0], "last": names[-1], "model": MODEL, "graph": graph.name, "graph_sha256": sha256(graph),
        "reference": f"OrtRecognizer(cuda=False, threads=None), batch {REF_BATCH}, onnxruntime {ort.__version__}, "
                     f"{platform.machine()} {cpu_name()}",
    }, indent=2) + "\n")
    print(f"prepared {len(stack)} crops from {scanned} photos ({names[0]} .. {names[-1]}) in {out}")


def agreement(embeddings: np.ndarray, reference: np.ndarray) -> dict:
    """Cosine of each embedding to its reference, and how far each pairwise similarity moved."""
    a, b = _unit(embeddings.astype(np.float64)), _unit(reference.astype(np.float64))
    cosine = (a * b).sum(1)
    upper = np.triu_indices(len(a), 1)
    moved = np.abs((a @ a.T)[upper] - (b @ b.T)[upper])
    return {
        "faces": len(a), "pairs": int(len(moved)),
        "cosine_min": float(cosine.min()), "cosine_median": float(np.median(cosine)),
        "similarity_moved_median": float(np.median(moved)), "similarity_moved_p99": float(np.quantile(moved, 0.99)),
        "similarity_moved_max": float(moved.max()),
        "within_tolerance": bool(cosine.min() >= COSINE_TOLERANCE and moved.max() <= SIMILARITY_TOLERANCE),
    }


def _batches(blob: np.ndarray, batch: int) -> list[np.ndarray]:
    """Contiguous batches rotating over the crops (wrapping around), enough for one repeat."""
    per_repeat = max(4, -(-512 // batch))
    tiled = np.concatenate([blob] * (-(-(batch * per_repeat) // len(blob)) + 1))
    return [np.ascontiguousarray(tiled[(k * batch) % len(blob):(k * batch) % len(blob) + batch])
            for k in range(per_repeat)]


def _repeat(recognizer: OrtRecognizer, batches: list[np.ndarray]) -> float:
    """Faces per second over one pass of the batches (wall clock; run returns host arrays)."""
    start = time.perf_counter()
    for batch in batches:
        recognizer.run(batch)
    return sum(len(b) for b in batches) / (time.perf_counter() - start)


def throughput(recognizer: OrtRecognizer, blob: np.ndarray, batch: int, repeats: int) -> dict:
    batches = _batches(blob, batch)
    for warm in batches[:3]:  # first runs per shape: cuDNN algorithm search, allocations
        recognizer.run(warm)
    rates = [_repeat(recognizer, batches) for _ in range(repeats)]
    median = statistics.median(rates)
    return {"batch": batch, "faces_per_repeat": sum(len(b) for b in batches), "repeats": repeats,
            "faces_per_s_median": median, "faces_per_s_min": min(rates), "faces_per_s_max": max(rates),
            "ms_per_batch_median": 1000 * batch / median}


def measure(inputs: Path, model: Path, cpu_only: bool, repeats: int, cpu_threads: int) -> dict:
    import onnxruntime as ort

    spec = get_model(MODEL)
    graph_sha = sha256(model)
    if graph_sha != spec.recognizer_weight.sha256:
        raise SystemExit(f"{model}: sha256 {graph_sha} is not the registered {spec.recognizer_weight.sha256}")
    crops = np.load(inputs / "crops.npy")
    reference = np.load(inputs / "cpu_ref.npy")
    meta = json.loads((inputs / "meta.json").read_text())
    blob = _blob(crops)
    result: dict = {
        "what": "facelake's recognizer (sface-yunet float SFace graph) on onnxruntime's CUDA provider "
                "(facelake.faces.inference.OrtRecognizer(cuda=True)) vs onnxruntime CPU",
        "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "gpu": gpu_info(), "cpu": {"name": cpu_name(), "cores": os.cpu_count(), "loadavg_start": os.getloadavg()},
        "onnxruntime": {"version": ort.__version__, "available_providers": ort.get_available_providers()},
        "graph": {"file": model.name, "sha256": graph_sha},
        "faces": meta, "reference": meta["reference"],
        "tolerances": {"cosine": COSINE_TOLERANCE, "similarity": SIMILARITY_TOLERANCE},
    }
    cpu = OrtRecognizer(str(model), threads=cpu_threads, cuda=False)
    result["cpu_here"] = {"threads": cpu_threads, "providers": cpu.session.get_providers(),
                          "agreement": agreement(_embed(cpu, blob), reference)}
    if not cpu_only:
        gpu = OrtRecognizer(str(model), threads=None, cuda=True)
        providers = gpu.session.get_providers()
        result["cuda"] = {"providers": providers, "runtime": gpu.runtime,
                          "provider_options": gpu.session.get_provider_options().get("CUDAExecutionProvider", {})}
        if "CUDAExecutionProvider" not in providers:
            raise SystemExit(f"the session does not use CUDAExecutionProvider: {providers}")
        result["cuda"]["agreement"] = agreement(_embed(gpu, blob), reference)
        result["cuda"]["throughput"] = [throughput(gpu, blob, b, repeats) for b in BATCHES]
    # same machine, batch 64: CUDA (A) and CPU (B) alternated A B A B
    sides = {"cpu": cpu} if cpu_only else {"cuda": gpu, "cpu": cpu}
    b64 = _batches(blob, 64)
    for recognizer in sides.values():
        for warm in b64[:3]:
            recognizer.run(warm)
    rounds: dict[str, list[float]] = {side: [] for side in sides}
    for _ in range(max(3, repeats // 2)):
        for side, recognizer in sides.items():
            rounds[side].append(_repeat(recognizer, b64))
    result["batch64_alternated"] = {side: {"faces_per_s": rates, "faces_per_s_median": statistics.median(rates)}
                                    for side, rates in rounds.items()}
    if not cpu_only:
        result["batch64_alternated"]["cuda_over_cpu"] = (result["batch64_alternated"]["cuda"]["faces_per_s_median"]
                                                         / result["batch64_alternated"]["cpu"]["faces_per_s_median"])
    result["cpu"]["loadavg_end"] = os.getloadavg()
    return result


def table(result: dict) -> str:
    lines = [f"gpu: {result['gpu'] or '-'}; cpu: {result['cpu']['name']} x{result['cpu']['cores']}; "
             f"onnxruntime {result['onnxruntime']['version']}; load {result['cpu']['loadavg_start']}"]
    for side in ("cuda", "cpu_here"):
        if side in result:
            a = result[side]["agreement"]
            lines.append(f"{side:8s} vs reference: cosine min {a['cosine_min']:.6f} median {a['cosine_median']:.6f}; "
                         f"similarity moved median {a['similarity_moved_median']:.2e} p99 {a['similarity_moved_p99']:.2e}"
                         f" max {a['similarity_moved_max']:.2e}; within tolerance: {a['within_tolerance']}")
    if "cuda" in result:
        lines.append(f"cuda session providers: {result['cuda']['providers']}")
        lines.append("| batch | faces/s (median) | min | max | ms per batch |")
        lines.append("| --- | --- | --- | --- | --- |")
        for row in result["cuda"]["throughput"]:
            lines.append(f"| {row['batch']} | {row['faces_per_s_median']:,.0f} | {row['faces_per_s_min']:,.0f} | "
                         f"{row['faces_per_s_max']:,.0f} | {row['ms_per_batch_median']:.2f} |")
    for side, row in result["batch64_alternated"].items():
        if isinstance(row, dict):
            lines.append(f"batch 64 alternated, {side}: median {row['faces_per_s_median']:,.0f} faces/s "
                         f"({', '.join(f'{r:,.0f}' for r in row['faces_per_s'])})")
    if "cuda_over_cpu" in result["batch64_alternated"]:
        lines.append(f"cuda / cpu at batch 64: {result['batch64_alternated']['cuda_over_cpu']:.1f}x")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("prepare")
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--photos", type=int, default=512, help="faces to cut (one per photo)")
    m = sub.add_parser("measure")
    m.add_argument("--inputs", type=Path, required=True)
    m.add_argument("--model", type=Path, required=True)
    m.add_argument("--json", type=Path)
    m.add_argument("--cpu-only", action="store_true", help="skip the CUDA side (no GPU here)")
    m.add_argument("--repeats", type=int, default=7)
    m.add_argument("--cpu-threads", type=int, default=os.cpu_count())
    args = parser.parse_args()
    if args.command == "prepare":
        prepare(args.out, args.photos)
        return
    result = measure(args.inputs, args.model, args.cpu_only, args.repeats, args.cpu_threads)
    text = json.dumps(result, indent=2) + "\n"
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(text)
    print(text)
    print(table(result))


if __name__ == "__main__":
    main()
