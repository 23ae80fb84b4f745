"""Recognizer runtimes: run the provisioned recognizer graph on OpenVINO, onnxruntime or CUDA.

The same checksummed ONNX file (facelake/faces/registry.py) runs on whichever runtime is chosen; the
runtimes differ only in speed and in rounding. Every runtime must give the same embedding for
the same aligned face within ``COSINE_TOLERANCE`` of onnxruntime's CPU result, and move no
similarity by more than ``SIMILARITY_TOLERANCE`` (tests/test_inference.py), so faces embedded
on any runtime share one model name, one weights fingerprint and one calibration. Measured on
LFW faces, CPU time per face on one thread (2-core AMD EPYC with AVX512_BF16, machine under
load): OpenVINO bf16 ~8.6 ms, OpenVINO float32 ~14.7 ms, onnxruntime ~28 ms as shipped (its
PRelu kernel takes ~45% of that), 18-25 ms with PRelu rewritten (batch 1-16), which facelake
does in memory. The int8 SFace (model ``sface-int8-yunet``, facelake/faces/registry.py) is its own
model with its own calibration, run on OpenVINO only (~5.6 ms per face on the same machine).

    "auto"         CUDA when onnxruntime has its CUDA provider and this process may see a GPU,
                   else OpenVINO when installed, else onnxruntime on CPU
    "openvino"     OpenVINO's CPU plugin (pip openvino)
    "onnxruntime"  onnxruntime's CPU provider
    "cuda"         onnxruntime's CUDA provider (onnxruntime-gpu; one H100, onnxruntime-gpu 1.31.1:
                   ~12,100 faces/s at batch 64, ~1,600 at batch 1, cosine to CPU >= 0.999999;
                   bench/gpu_recognizer.py, bench/results/gpu_recognizer.json)
"""

from __future__ import annotations

import importlib.util
import os
import sys
from typing import Literal, Protocol

import numpy as np

from facelake.faces import onnx_rewrite
from facelake.device import onnx_cuda
from facelake.errors import ConfigError

Runtime = Literal["auto", "openvino", "onnxruntime", "cuda"]
Precision = Literal["auto", "f32"]
RUNTIMES: tuple[str, ...] = ("auto", "openvino", "onnxruntime", "cuda")

# Minimum cosine similarity between a runtime's embedding and onnxruntime CPU's for the same
# aligned face, and the most a similarity between two faces may move. Measured over 300 LFW
# faces (44,850 pairs): OpenVINO float32 cosine 1.00000; OpenVINO bf16 (its default on CPUs with
# native bf16) minimum cosine 0.9998, similarity moved by 0.001 median, 0.004 p99, 0.009 max.
COSINE_TOLERANCE = 0.9995
SIMILARITY_TOLERANCE = 0.01


class Recognizer(Protocol):
    """A loaded recognizer graph: float32 (n, 3, H, W) in, raw (n, dim) embeddings out."""

    runtime: str

    def run(self, blob: np.ndarray) -> np.ndarray: ...


def cuda_visible() -> bool:
    """True when onnxruntime has its CUDA provider and this process may use a GPU.

    Inside a Ray actor that means Ray assigned it a GPU (since Ray 2.48 actors without one
    still see every GPU in CUDA_VISIBLE_DEVICES), so CPU actors on GPU nodes stay on CPU
    runtimes; elsewhere an empty CUDA_VISIBLE_DEVICES hides the GPUs.
    """
    assigned = _ray_actor_gpus()
    if assigned is not None:
        if not assigned:
            return False
    elif os.environ.get("CUDA_VISIBLE_DEVICES", None) == "":
        return False
    return onnx_cuda()


def _ray_actor_gpus() -> list | None:
    """The GPU ids Ray assigned to this actor; None when not running inside a Ray actor."""
    ray = sys.modules.get("ray")  # never import Ray just to ask
    if ray is None or not ray.is_initialized() or ray.get_runtime_context().get_actor_id() is None:
        return None
    return list(ray.get_gpu_ids())


def resolve_runtime(runtime: str = "auto") -> str:
    """The concrete runtime "auto" stands for here; unknown or unavailable choices name the fix."""
    if runtime not in RUNTIMES:
        raise ConfigError(f"unknown recognizer runtime {runtime!r}; choose one of {', '.join(RUNTIMES)}")
    if runtime == "auto":
        if cuda_visible():
            return "cuda"
        return "openvino" if importlib.util.find_spec("openvino") else "onnxruntime"
    if runtime == "openvino" and not importlib.util.find_spec("openvino"):
        raise ConfigError("runtime 'openvino' needs the openvino package: pip install openvino "
                          "(or choose runtime 'onnxruntime')")
    if runtime == "cuda" and not cuda_visible():
        raise ConfigError("runtime 'cuda' needs onnxruntime-gpu and a visible GPU: run `make install-gpu` on GPU "
                          "nodes (or choose runtime 'openvino' / 'onnxruntime')")
    return runtime


class OrtRecognizer:
    """onnxruntime session (CPU or CUDA provider) with bounded threads."""

    def __init__(self, path: str, *, threads: int | None, cuda: bool) -> None:
        import onnxruntime as ort

        options = ort.SessionOptions()
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL  # a chain of convs: nothing to overlap
        options.inter_op_num_threads = 1
        if threads:
            options.intra_op_num_threads = threads
        options.log_severity_level = 3
        providers = (["CUDAExecutionProvider", "CPUExecutionProvider"] if cuda else ["CPUExecutionProvider"])
        with open(path, "rb") as handle:
            graph = handle.read()
        if not cuda:  # onnxruntime's CPU PRelu is slow; same outputs, 1.2-1.5x faster (onnx_rewrite)
            graph = onnx_rewrite.prelu_as_relu(graph)
        self.session = ort.InferenceSession(graph, sess_options=options, providers=providers)
        self.runtime = "cuda" if cuda else "onnxruntime"
        self._input = self.session.get_inputs()[0].name

    def run(self, blob: np.ndarray) -> np.ndarray:
        return self.session.run(None, {self._input: blob})[0]


class OpenVinoRecognizer:
    """OpenVINO CPU plugin, dynamic batch, latency mode, threads not pinned.

    Pinning is off because several single-thread actors share a node's cores; pinned, they can
    land on the same core. Precision "auto" is OpenVINO's own choice: bfloat16 arithmetic on CPUs
    with native bf16 (AVX512_BF16, AMX), float32 elsewhere; "f32" forces float32 everywhere.
    """

    def __init__(self, path: str, *, threads: int | None, precision: Precision = "f32") -> None:
        import openvino as ov

        core = ov.Core()
        model = core.read_model(path)
        shape = list(model.inputs[0].get_partial_shape())
        model.reshape({model.inputs[0].any_name: ov.PartialShape([-1, *shape[1:]])})
        config: dict = {"PERFORMANCE_HINT": "LATENCY", "NUM_STREAMS": 1, "ENABLE_CPU_PINNING": False}
        if precision == "f32":
            config["INFERENCE_PRECISION_HINT"] = "f32"
        if threads:
            config["INFERENCE_NUM_THREADS"] = threads
        compiled = core.compile_model(model, "CPU", config)
        self._request = compiled.create_infer_request()
        self.runtime = "openvino"
        self.precision = compiled.get_property("INFERENCE_PRECISION_HINT").get_type_name()

    def run(self, blob: np.ndarray) -> np.ndarray:
        return np.array(self._request.infer({0: blob})[0], copy=True)


def open_recognizer(path: str, *, runtime: str = "auto", threads: int | None = None,
                    precision: Precision = "f32") -> Recognizer:
    """Load a provisioned recognizer graph on the chosen runtime ("auto" picks, see module doc).

    ``precision`` applies to OpenVINO ("f32", the default: what the shipped calibration was
    measured with; "auto": bf16 where the CPU has it natively, faster, FMR bounds moved by a few %).
    """
    if precision not in ("auto", "f32"):
        raise ConfigError(f"unknown recognizer precision {precision!r}; choose auto or f32")
    chosen = resolve_runtime(runtime)
    if chosen == "openvino":
        return OpenVinoRecognizer(path, threads=threads, precision=precision)
    return OrtRecognizer(path, threads=threads, cuda=chosen == "cuda")
