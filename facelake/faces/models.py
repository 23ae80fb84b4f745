"""The model's parts, built from its registry entry: detector adapter, alignment, recognizer.

A model is one ModelSpec (facelake.faces.registry) plus, when it brings a detector or a preprocessing
facelake does not know yet, an adapter here (DETECTORS, PREPROCESSING). facelake does two things
deepface's own ``represent`` does not do: it keeps the detector's five landmarks and aligns each
face to the recognizer's template with a similarity transform (for SFace its 112x112 template,
the crop it was trained on; deepface's rotate-and-cut crop costs it ~15 points of LFW accuracy),
and it embeds many faces per recognizer call instead of one. The per-image flow (read, decode,
detect, quality floor, align, embed, error rows) is facelake.faces.pipeline's.

YuNet is opened with OpenCV's FaceDetectorYN from the provisioned, checksum-verified file, built
and run exactly as deepface's YuNet client does (same file, same construction, same 640 px
bound), so detections are deepface's; one detector per thread (an OpenCV detector is not
thread-safe, and deepface caches one client per process). The recognizer (the same provisioned
file deepface would load) runs on the runtime facelake.faces.inference picks.
"""

from __future__ import annotations

import logging
import os
import threading
from dataclasses import dataclass
from typing import Callable

import cv2
import numpy as np

from facelake.errors import ConfigError
from facelake.faces.inference import open_recognizer
from facelake.faces.registry import ModelSpec, get_model, weights_fingerprint
from facelake.faces.weights import provision

log = logging.getLogger(__name__)

# YuNet is run at most at this size (as deepface's client does): larger inputs make it miss faces.
DETECT_MAX_SIDE = 640
# Faces are detected at this low score and then filtered by the quality floor, so that
# dropped faces can be recorded with their reason instead of silently vanishing.
DETECT_FLOOR_SCORE = 0.5


@dataclass(frozen=True)
class Detection:
    """One detected face in image pixels."""

    bbox: tuple[int, int, int, int]  # x, y, width, height
    score: float
    landmarks: np.ndarray            # (5, 2) float32: right eye, left eye, nose, mouth corners


@dataclass(frozen=True)
class QualityFloor:
    """Faces below either bound are dropped, with the reason recorded."""

    min_face: int = 24        # px, the smaller side of the box; SFace input is 112 px
    min_score: float = 0.8    # YuNet score

    def reason(self, det: Detection) -> str | None:
        if min(det.bbox[2], det.bbox[3]) < self.min_face:
            return f"face {det.bbox[2]}x{det.bbox[3]} px is smaller than --min-face {self.min_face}"
        if det.score < self.min_score:
            return f"detector score {det.score:.2f} is below --min-score {self.min_score}"
        return None


def similarity_transform(src: np.ndarray, dst: np.ndarray) -> np.ndarray:
    """Least-squares 2x3 similarity transform mapping src points onto dst (Umeyama, 1991).

    Written out (12 lines) rather than taken from scikit-image to avoid a dependency; it is the
    estimate OpenCV's FaceRecognizerSF.alignCrop computes.
    """
    src = np.asarray(src, np.float64)
    dst = np.asarray(dst, np.float64)
    src_mean, dst_mean = src.mean(0), dst.mean(0)
    src_c, dst_c = src - src_mean, dst - dst_mean
    cov = dst_c.T @ src_c / len(src)
    u, s, vt = np.linalg.svd(cov)
    d = np.eye(2)
    if np.linalg.det(u) * np.linalg.det(vt) < 0:
        d[1, 1] = -1
    rotation = u @ d @ vt
    scale = np.trace(np.diag(s) @ d) / src_c.var(0).sum()
    matrix = np.zeros((2, 3))
    matrix[:, :2] = scale * rotation
    matrix[:, 2] = dst_mean - scale * rotation @ src_mean
    return matrix


class FaceEmbedder:
    """The recognizer alone: aligned faces in, embeddings out. Build once per worker.

    What a GPU actor needs when CPU workers beside it decode, detect and align: it never loads
    the detector.
    """

    def __init__(self, model: str | ModelSpec | None = None, *, weights_from: str | None = None,
                 threads: int | None = None, runtime: str = "auto", precision: str = "f32") -> None:
        """Provision the model's weights and open its recognizer on ``runtime`` (facelake.faces.inference:
        auto, openvino, onnxruntime, cuda) with ``precision`` on OpenVINO (f32 by default: the
        shipped calibration was measured in float32, and bf16 -- "auto" on CPUs with native bf16 --
        moved its FMR bounds by -2.5%/+6.4% and would make nodes with and without bf16 disagree)
        and at most ``threads`` threads (None: the runtime's default).
        """
        self.spec = model if isinstance(model, ModelSpec) else get_model(model)
        if self.spec.runtimes:  # a model calibrated on some runtimes only (facelake.faces.registry)
            if runtime == "auto":
                runtime = self.spec.runtimes[0]
            elif runtime not in self.spec.runtimes:
                raise ConfigError(f"model {self.spec.name} runs on {', '.join(self.spec.runtimes)} only (its "
                                  f"calibration was measured there): choose that runtime, or model sface-yunet")
        paths = provision(self.spec, weights_from)
        # The recognizer is the provisioned, checksum-verified file deepface would load; facelake
        # opens it itself so that it runs on the fastest runtime at hand (same embeddings within
        # facelake.faces.inference's tolerances), not only on deepface's onnxruntime session.
        self._recognizer = open_recognizer(str(paths[self.spec.recognizer_weight.file_name]),
                                           runtime=runtime, threads=threads, precision=precision)
        self.runtime = self._recognizer.runtime
        self.weights_sha256 = weights_fingerprint(self.spec)
        self._preprocess = preprocessing(self.spec)

    def embed(self, faces_bgr: list[np.ndarray] | np.ndarray, batch_size: int = 64) -> np.ndarray:
        """L2-normalised embeddings (n, dim) float32 for aligned faces, many per model call.

        For a model registered with ``flip`` (test-time flip), each face is embedded twice, as
        aligned and mirrored left-right, and the embedding is the normalised mean of the two
        normalised vectors: two recognizer calls per face.
        """
        if len(faces_bgr) == 0:
            return np.zeros((0, self.spec.dim), np.float32)
        blob = self._preprocess(np.asarray(faces_bgr, dtype=np.uint8))
        vectors = self._run(blob, batch_size)
        if self.spec.flip:
            vectors = _l2(vectors + self._run(np.ascontiguousarray(blob[..., ::-1]), batch_size))
        return vectors

    def _run(self, blob: np.ndarray, batch_size: int) -> np.ndarray:
        """The recognizer over (n, 3, H, W) in batches; L2-normalised (n, dim) float32."""
        out = [self._recognizer.run(blob[i:i + batch_size]) for i in range(0, len(blob), batch_size)]
        return _l2(np.concatenate(out).astype(np.float32))


def _l2(vectors: np.ndarray) -> np.ndarray:
    norms = np.linalg.norm(vectors, axis=1, keepdims=True)
    return vectors / np.maximum(norms, 1e-12)


class FaceEngine:
    """A model's detector, alignment and recognizer, built from its ModelSpec. Build once per worker.

    ``detect`` and ``align`` may be called from several threads (each thread gets its own
    detector); ``embed`` from one thread at a time.
    """

    def __init__(self, model: str | ModelSpec | None = None, *, weights_from: str | None = None,
                 threads: int | None = None, runtime: str = "auto", precision: str = "f32",
                 recognizer: bool = True, recognizer_threads: int | None = None) -> None:
        """Provision the model's weights, open its detector and, unless ``recognizer`` is False
        (detect-and-align workers feeding a FaceEmbedder elsewhere), its recognizer.

        ``threads`` bounds OpenCV's threads per detector call (process-wide; None: OpenCV's
        default) and the recognizer's threads (``recognizer_threads`` when given: several
        detecting threads beside one recognizer want OpenCV at 1 and the recognizer at all); ``runtime`` and ``precision`` choose the
        recognizer's runtime (see FaceEmbedder).
        """
        self.spec = model if isinstance(model, ModelSpec) else get_model(model)
        self.weights_from = weights_from
        paths = provision(self.spec, weights_from)
        if self.spec.detector not in DETECTORS:
            raise ConfigError(f"model {self.spec.name} names detector {self.spec.detector!r}, which has no adapter "
                              f"in facelake.faces.models.DETECTORS ({', '.join(sorted(DETECTORS))})")
        self._detector_path = str(paths[self.spec.detector_weight.file_name])
        self._local = threading.local()
        self.detector_for_thread()  # open (and check) the first detector now, not in the first image
        if threads:
            cv2.setNumThreads(threads)
        self._embedder = FaceEmbedder(self.spec, weights_from=weights_from, threads=recognizer_threads or threads,
                                      runtime=runtime,
                                      precision=precision) if recognizer else None
        self.runtime = self._embedder.runtime if self._embedder else None
        self.weights_sha256 = weights_fingerprint(self.spec)
        self._template = np.asarray(self.spec.template, np.float32)

    @property
    def providers(self) -> list[str]:
        """Where the recognizer runs, e.g. ["openvino"] or ["cuda"]."""
        return [self.runtime] if self.runtime else []

    def detector_for_thread(self) -> "YuNetDetector":
        """This thread's detector (opened on first use in each thread)."""
        detector = getattr(self._local, "detector", None)
        if detector is None:
            detector = self._local.detector = DETECTORS[self.spec.detector](self._detector_path)
        return detector

    def detect(self, image_bgr: np.ndarray) -> list[Detection]:
        """All faces the detector finds (score >= DETECT_FLOOR_SCORE), largest first."""
        return self.detector_for_thread().detect(image_bgr)

    def align(self, image_bgr: np.ndarray, landmarks: np.ndarray) -> np.ndarray:
        """Cut the face the recognizer expects (its input_size), from five landmarks."""
        matrix = similarity_transform(landmarks, self._template)
        return cv2.warpAffine(image_bgr, matrix, self.spec.input_size, flags=cv2.INTER_LINEAR)

    def embed(self, faces_bgr: list[np.ndarray] | np.ndarray, batch_size: int = 64) -> np.ndarray:
        """L2-normalised embeddings (n, dim) float32 for aligned faces, many per model call."""
        if self._embedder is None:
            raise ConfigError("this FaceEngine was built with recognizer=False: embed its aligned faces "
                              "with a FaceEmbedder, or build it with recognizer=True")
        return self._embedder.embed(faces_bgr, batch_size)


class YuNetDetector:
    """YuNet on OpenCV's FaceDetectorYN, opened as deepface's YuNet client opens it
    (``cv2.FaceDetectorYN_create(file, "", (0, 0))``: its default NMS 0.3 and top-k 5000) and
    run as that client runs it (at most DETECT_MAX_SIDE px). Not thread-safe: one per thread."""

    def __init__(self, weights_path: str) -> None:
        self._net = cv2.FaceDetectorYN_create(weights_path, "", (0, 0))

    def detect(self, image_bgr: np.ndarray) -> list[Detection]:
        """All faces YuNet finds (score >= DETECT_FLOOR_SCORE), largest first."""
        height, width = image_bgr.shape[:2]
        scale = min(1.0, DETECT_MAX_SIDE / max(height, width))
        small = image_bgr if scale == 1.0 else cv2.resize(
            image_bgr, (max(1, round(width * scale)), max(1, round(height * scale))), interpolation=cv2.INTER_AREA)
        self._net.setInputSize((small.shape[1], small.shape[0]))
        self._net.setScoreThreshold(DETECT_FLOOR_SCORE)
        _, rows = self._net.detect(small)
        if rows is None:
            return []
        found = []
        for row in rows:
            x, y, w, h = (row[:4] / scale).tolist()
            x0, y0 = max(0.0, x), max(0.0, y)
            x1, y1 = min(float(width), x + w), min(float(height), y + h)
            if x1 <= x0 or y1 <= y0:
                continue
            bbox = (int(round(x0)), int(round(y0)), int(round(x1 - x0)), int(round(y1 - y0)))
            landmarks = (row[4:14].reshape(5, 2) / scale).astype(np.float32)
            found.append(Detection(bbox=bbox, score=float(row[14]), landmarks=landmarks))
        found.sort(key=lambda d: d.bbox[2] * d.bbox[3], reverse=True)
        return found


# Detector adapters by ModelSpec.detector: built from the detector's provisioned weights file,
# ``detect(image_bgr) -> list[Detection]`` (image pixels, five landmarks, largest first).
DETECTORS: dict[str, Callable[[str], YuNetDetector]] = {"yunet": YuNetDetector}


def _rgb_chw_0_255(stack: np.ndarray) -> np.ndarray:
    """SFace's input: RGB, channels first, 0..255 float32 (as OpenCV's FaceRecognizerSF.feature feeds it)."""
    return np.ascontiguousarray(stack[..., ::-1].transpose(0, 3, 1, 2), dtype=np.float32)


# Preprocessing by ModelSpec.preprocess: aligned BGR uint8 crops (n, H, W, 3) -> recognizer blob.
PREPROCESSING: dict[str, Callable[[np.ndarray], np.ndarray]] = {"rgb-chw-0-255": _rgb_chw_0_255}


def preprocessing(spec: ModelSpec) -> Callable[[np.ndarray], np.ndarray]:
    """The spec's preprocessing function, or an error naming the registered ones."""
    if spec.preprocess not in PREPROCESSING:
        raise ConfigError(f"model {spec.name} names preprocessing {spec.preprocess!r}, which facelake.faces.models."
                          f"PREPROCESSING does not have ({', '.join(sorted(PREPROCESSING))})")
    return PREPROCESSING[spec.preprocess]


def default_threads() -> int:
    """Threads per engine when not told: the CPUs this process may use."""
    return max(1, len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1)
