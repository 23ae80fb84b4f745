"""Where the heavy work runs, GPU or CPU: one policy for onnxruntime (the recognizer) and faiss
(index build and search), so no job guesses on its own.

- ``onnx_cuda``: onnxruntime has its CUDA provider (onnxruntime-gpu is installed).
- ``faiss_gpu``: faiss was built with GPU support (faiss-gpu).
- ``cluster_gpus``: the GPUs the connected Ray cluster offers (0 without Ray).
- ``embed_on_gpu``: embed asks Ray for GPU actors: the cluster has a GPU and onnxruntime can use it.
- ``faiss_on_gpu``: index build and shard searchers go to GPUs: faiss can, and the cluster has one.

Within a process, whether the recognizer may use a GPU Ray did not give it is decided by
``facelake.faces.inference.cuda_visible``, which asks ``onnx_cuda`` last. `make install-gpu` swaps the
CPU wheels for the GPU ones. Tested in tests/test_device.py (which also checks no other module
probes the providers itself).
"""

from __future__ import annotations

import sys


def onnx_cuda() -> bool:
    """onnxruntime can run on CUDA here (its CUDA provider is available)."""
    try:
        import onnxruntime as ort
    except ImportError:
        return False
    return "CUDAExecutionProvider" in ort.get_available_providers()


def faiss_gpu() -> bool:
    """faiss was built with GPU support."""
    import faiss

    return hasattr(faiss, "StandardGpuResources")


def cluster_gpus() -> float:
    """GPUs of the connected Ray cluster (0 when Ray is not initialised; never starts Ray)."""
    ray = sys.modules.get("ray")
    if ray is None or not ray.is_initialized():
        return 0.0
    return float(ray.cluster_resources().get("GPU", 0))


def embed_on_gpu(gpus: float | None = None) -> bool:
    """The embed job runs its model actors on GPUs (``gpus``: the cluster's, when already known)."""
    return (cluster_gpus() if gpus is None else gpus) >= 1 and onnx_cuda()


def faiss_on_gpu() -> bool:
    """Index build (training, adding) and shard searchers use GPUs."""
    return faiss_gpu() and cluster_gpus() >= 1
