"""facelake.device: one GPU/CPU policy, checked against what this machine's onnxruntime and faiss
really offer; and no other module probes onnxruntime's providers or faiss's GPU build itself."""

from __future__ import annotations

import re
from pathlib import Path

import faiss
import onnxruntime as ort

from facelake import device

REPO = Path(__file__).resolve().parents[1]


def test_policy_matches_the_installed_runtimes():
    import ray

    assert device.onnx_cuda() == ("CUDAExecutionProvider" in ort.get_available_providers())
    assert device.faiss_gpu() == hasattr(faiss, "StandardGpuResources")
    gpus = ray.cluster_resources().get("GPU", 0) if ray.is_initialized() else 0
    assert device.cluster_gpus() == gpus
    assert device.embed_on_gpu() == (gpus >= 1 and device.onnx_cuda())
    assert device.faiss_on_gpu() == (gpus >= 1 and device.faiss_gpu())
    assert device.embed_on_gpu(0) is False and device.embed_on_gpu(1) == device.onnx_cuda()


def test_gpu_detection_lives_in_one_place():
    probes = re.compile(r"get_available_providers\(|hasattr\(faiss, .StandardGpuResources.\)|get_num_gpus")
    found = [f"{path.relative_to(REPO)}:{n}" for folder in ("facelake", "jobs", "index", "cluster")
             for path in sorted((REPO / folder).glob("*.py")) if path.name != "device.py"
             for n, line in enumerate(path.read_text().splitlines(), 1) if probes.search(line)]
    assert not found, "GPU detection outside facelake/device.py:\n" + "\n".join(found)
