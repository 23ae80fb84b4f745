"""Search shards and merge their top-k lists (faiss conventions: float32 (n, d) in, (D, I) out).

Shard ids are already global faiss ids, so merging is a top-k of the concatenated lists, done
with faiss's own ``ResultHeap``. ``ShardSearcher`` is a Ray actor holding one shard (on a GPU
when it has one); ``search_version`` fans a probe batch out to them and merges.
"""

from __future__ import annotations

import faiss
import numpy as np
import ray

from facelake.errors import ConfigError
from facelake.index.load import VersionHandle, load_shard

Result = tuple[np.ndarray, np.ndarray]


def _check(xq: np.ndarray, dim: int, k: int) -> np.ndarray:
    xq = np.ascontiguousarray(xq, dtype=np.float32)
    if xq.ndim != 2 or xq.shape[1] != dim:
        raise ConfigError(f"probes must be float32 of shape (n, {dim}), got {xq.shape}")
    if k < 1:
        raise ConfigError(f"--top-k must be at least 1, got {k}")
    return xq


def search_shard(index: faiss.Index, xq: np.ndarray, k: int, nprobe: int) -> Result:
    """Top-k (D, I) of one shard; ``nprobe`` is clamped to the shard's nlist."""
    xq = _check(xq, index.d, k)
    if nprobe < 1:
        raise ConfigError(f"--nprobe must be at least 1, got {nprobe}")
    try:
        ivf = faiss.extract_index_ivf(index)
    except RuntimeError:
        ivf = None
    if ivf is not None:                                     # CPU: per-call parameters, thread-safe
        nprobe = min(nprobe, ivf.nlist)
        return index.search(xq, k, params=faiss.SearchParametersIVF(nprobe=nprobe))
    if hasattr(index, "nprobe"):                            # GPU IVF clone (IndexIVFInterface)
        index.nprobe = min(nprobe, index.nlist)
    return index.search(xq, k)


def merge_topk(results: list[Result], k: int) -> Result:
    """Merge per-shard (D, I) lists (inner product: larger is better) into one top-k.

    Missing results (id -1, distance -inf / -FLT_MAX padding) sort last and pad the output.
    """
    if not results:
        raise ConfigError("nothing to merge: the index version has no shards")
    nq = results[0][0].shape[0]
    heap = faiss.ResultHeap(nq, k, keep_max=True)
    for D, I in results:
        D = np.where(I < 0, -np.inf, D).astype(np.float32)
        heap.add_result(D, I)
    heap.finalize()
    return heap.D, heap.I


class LocalShardSearcher:
    """One shard loaded once (checksum-verified), searched many times, in this process."""

    def __init__(self, handle: VersionHandle, shard_no: int, use_gpu: bool = False,
                 threads: int | None = None) -> None:
        if threads:
            faiss.omp_set_num_threads(threads)
        self.index, self.ids = load_shard(handle, shard_no)
        self.shard_no = shard_no
        if use_gpu:
            self._gpu_resources = faiss.StandardGpuResources()
            self.index = faiss.index_cpu_to_gpu(self._gpu_resources, 0, self.index)

    def search(self, xq: np.ndarray, k: int, nprobe: int) -> Result:
        return search_shard(self.index, xq, k, nprobe)

    def ntotal(self) -> int:
        return int(self.index.ntotal)


ShardSearcher = ray.remote(LocalShardSearcher)
"""Ray actor class holding one shard: ``ShardSearcher.remote(handle, shard_no)``."""


def start_searchers(handle: VersionHandle, *, use_gpu: bool | None = None, num_cpus: float | None = None,
                    threads: int | None = None) -> list:
    """One ``ShardSearcher`` actor per shard (GPU ones when faiss and the cluster have GPUs).

    ``num_cpus`` per actor defaults to the cluster's CPUs shared by the shards (at most 1), so
    every shard gets an actor even when shards outnumber CPUs.
    """
    if num_cpus is None:
        num_cpus = min(1.0, max(0.01, ray.cluster_resources().get("CPU", 1) / max(1, handle.shard_count)))
    if use_gpu is None:
        use_gpu = hasattr(faiss, "StandardGpuResources") and ray.cluster_resources().get("GPU", 0) >= 1
    opts = {"num_cpus": num_cpus, "num_gpus": 1 if use_gpu else 0}
    return [ShardSearcher.options(**opts).remote(handle, s, use_gpu, threads) for s in range(handle.shard_count)]


def search_version(handle: VersionHandle, xq: np.ndarray, k: int, nprobe: int | None = None,
                   actors: list | None = None) -> Result:
    """Global top-k (D, I) over every shard of a version; I are faiss ids (row of ``load_ids``).

    With ``actors`` (from ``start_searchers``) the batch fans out over Ray; without, each shard
    is loaded and searched in turn in this process (notebooks, small indexes).
    """
    xq = _check(xq, handle.dim, k)
    nprobe = nprobe or handle.nprobe
    if not 1 <= nprobe <= handle.nlist:
        raise ConfigError(f"--nprobe must be within 1..{handle.nlist} (nlist of version {handle.version})")
    if actors:
        ref = ray.put(xq)
        results = ray.get([actor.search.remote(ref, k, nprobe) for actor in actors])
    else:
        results = [search_shard(load_shard(handle, s)[0], xq, k, nprobe) for s in range(handle.shard_count)]
    return merge_topk(results, k)
