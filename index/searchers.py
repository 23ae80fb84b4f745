"""Place a version's shards in Ray actors and fan probe batches out to them.

``ShardSearcher`` is a Ray actor (``LocalShardSearcher`` in this process) holding the shards
of one group (``searcher_groups``: one group per node at least, each within the smallest node's
memory; on a GPU when it has one), joined into one index when they are CPU shards
(``facelake.index.joining.MergedShards``). ``start_searchers`` asks Ray for each actor's memory
(``group_memory``), so a gallery larger than one node is spread over several, never swapped.
``search_version`` and ``search_rows`` cut a probe batch into one piece per call a searcher
runs at once, fan the pieces out to every searcher and merge the results.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor

import faiss
import numpy as np
import pyarrow as pa
import ray

from facelake.errors import ConfigError
from facelake.index.joining import MergedShards
from facelake.index.load import VersionHandle, open_shard
from facelake.index.search import (CoarseQuantizer, Result, check_probes, merge_candidates, merge_rows, merge_topk,
                                   search_reranked)

# Ray's memory request of a searcher on top of its shard's resident bytes: faiss search buffers
# and the Python process itself.
SEARCHER_BASE_MEMORY = 256 << 20
# Share of the cluster's CPUs the shard actors reserve together; the rest keeps room for the
# search workers and probe reads (a full reservation deadlocks a one-node cluster).
SEARCHER_CPU_SHARE = 0.5
# A searcher joining several shards holds them and their joined lists at once (MergedShards);
# measured at 10M faces: 1,131 MiB of anonymous memory at the peak for 655 MB of resident shards.
JOIN_PEAK = 2.0
# Fewest calls a CPU searcher actor runs at once (see start_searchers).
SEARCHER_CALLS = 2


class LocalShardSearcher:
    """Shards loaded once (checksum-verified), searched many times, in this process.

    One searcher holds one shard or several (``shards``: a number or a list of them). Several CPU
    shards are merged into one index (``MergedShards``): a batch visits each list once, is
    re-ranked once, and only the winners' id-table rows are taken, so a searcher returns k
    candidates per probe however many shards it holds. GPU shards are searched one by one and
    merged here.
    """

    def __init__(self, handle: VersionHandle, shards: int | Sequence[int], use_gpu: bool = False,
                 threads: int | None = None, cache_dir: str | None = None) -> None:
        if threads:
            faiss.omp_set_num_threads(threads)
        self.shard_nos = [shards] if isinstance(shards, int) else list(shards)
        if not self.shard_nos:
            raise ConfigError("a searcher needs at least one shard")
        # files are hashed while read: one thread per CPU overlaps the shards' verification and
        # parsing (``threads`` is faiss's per call, usually 1: calls run side by side instead)
        with ThreadPoolExecutor(max_workers=min(len(self.shard_nos), max(threads or 1, os.cpu_count() or 1))) as pool:
            self.shards = list(pool.map(lambda s: open_shard(handle, s, cache_dir), self.shard_nos))
        self.merged: MergedShards | None = None
        if use_gpu:
            self._gpu_resources = faiss.StandardGpuResources()
            for shard in self.shards:
                shard.index = faiss.index_cpu_to_gpu(self._gpu_resources, 0, shard.index)
        elif MergedShards.possible(self.shards):
            self.merged = MergedShards(self.shards)

    @property
    def index(self) -> faiss.Index:
        """The faiss index searched: the merged lists of every shard held, or the one shard's."""
        return self.merged.index if self.merged else self.shards[0].index

    def search(self, xq: np.ndarray, k: int, nprobe: int, coarse: Result | None = None) -> Result:
        """Top-k (D, I) over the shards held."""
        if self.merged:
            D, I, _ = self.merged.search(xq, k, nprobe, coarse)
            return D, I
        results = self._each_shard(xq, k, nprobe, coarse)
        return results[0] if len(results) == 1 else merge_topk(results, k)

    def search_rows(self, xq: np.ndarray, k: int, nprobe: int, coarse: Result | None = None
                    ) -> tuple[np.ndarray, np.ndarray, pa.Table]:
        """(D, I, id-table rows of I) of the top-k over the shards held."""
        if self.merged:
            return self.merged.search_rows(xq, k, nprobe, coarse)
        return merge_rows(self.shards, self._each_shard(xq, k, nprobe, coarse), k)

    def _each_shard(self, xq: np.ndarray, k: int, nprobe: int, coarse: Result | None) -> list[Result]:
        coarse = None if hasattr(self, "_gpu_resources") else coarse   # a GPU shard searches its own lists
        return [search_reranked(shard, xq, k, nprobe, coarse) for shard in self.shards]

    def ntotal(self) -> int:
        return int(self.index.ntotal) if self.merged else sum(int(s.index.ntotal) for s in self.shards)

    def node_id(self) -> str | None:
        """The Ray node holding this searcher (None outside Ray)."""
        return ray.get_runtime_context().get_node_id() if ray.is_initialized() else None


ShardSearcher = ray.remote(LocalShardSearcher)
"""Ray actor class holding one or several shards: ``ShardSearcher.remote(handle, shard_nos)``."""


def shard_memory(handle: VersionHandle, shard_no: int) -> int:
    """Bytes of RAM a searcher holding only this shard asks Ray for (its resident index plus a base)."""
    return _resident(handle, shard_no) + SEARCHER_BASE_MEMORY


def _resident(handle: VersionHandle, shard_no: int) -> int:
    entry = handle.manifest["shards"][shard_no]
    resident = entry.get("resident_bytes") or handle.manifest["files"][entry["index_file"]]["bytes"]
    return int(resident * 1.2)


def group_memory(handle: VersionHandle, shard_nos: Sequence[int]) -> int:
    """Bytes of RAM a searcher holding these shards asks Ray for: while it joins several shards'
    lists it holds the shards and the joined lists (``JOIN_PEAK`` times their resident bytes)."""
    resident = sum(_resident(handle, s) for s in shard_nos)
    return int(resident * (JOIN_PEAK if len(shard_nos) > 1 else 1)) + SEARCHER_BASE_MEMORY


def searcher_groups(handle: VersionHandle, nodes: Sequence[dict]) -> list[list[int]]:
    """Shards split into consecutive groups, one searcher each: one group per node at least,
    each within the smallest node's memory (so Ray can place it), never more groups than shards.

    A searcher joins its group's lists (``MergedShards``), so fewer, larger groups scan less:
    at 10M faces on one 2-CPU node (quiet, one thread, nprobe 512) a probe costs 0.97 ms of CPU
    with one group of ten shards, 1.15 ms with two groups of five, 1.94 ms searched shard by shard.
    A node's CPUs are used by concurrent calls instead (``start_searchers``).

    ``nodes``: the alive nodes' Ray resources (``ray.nodes()[i]["Resources"]``)."""
    count = handle.shard_count
    capacity = min((n.get("memory", 0) for n in nodes), default=0) or None
    wanted = min(count, max(1, len(nodes)))
    while True:
        groups = [list(g) for g in np.array_split(np.arange(count), wanted) if len(g)]
        if wanted >= count or capacity is None or all(group_memory(handle, g) <= capacity for g in groups):
            return [[int(s) for s in g] for g in groups]
        wanted += 1


class Searchers(list):
    """The searcher actors of a version (a list), and ``calls``: how many calls each runs at once,
    so a batch is split into that many pieces (``search_rows``) and one batch keeps every CPU of
    the searchers' nodes busy."""

    calls: int = 1

    def __init__(self, actors: Sequence = (), calls: int = 1) -> None:
        super().__init__(actors)
        self.calls = calls


def start_searchers(handle: VersionHandle, *, use_gpu: bool | None = None, num_cpus: float | None = None,
                    threads: int | None = None, reserve_memory: bool = True,
                    groups: list[list[int]] | None = None) -> Searchers:
    """``ShardSearcher`` actors holding the version's shards (GPU ones when faiss and the cluster
    have GPUs), spread over the nodes, each asking Ray for the memory its shards need, so a
    gallery larger than one node's memory is placed over several nodes (or refused by Ray,
    never swapped). ``groups`` (default ``searcher_groups``): the shards each actor holds.

    ``num_cpus`` per actor defaults to half the cluster's CPUs shared by the actors (at most 1),
    so the search workers and probe reads that feed them can still be scheduled (calls are not
    bound by it: each actor runs as many calls at once as its node has CPUs for it, ``threads``
    OpenMP threads each, default 1).
    """
    nodes = [n["Resources"] for n in ray.nodes() if n.get("Alive")] or [{"CPU": 1}]
    groups = groups or searcher_groups(handle, nodes)
    if num_cpus is None:
        share = SEARCHER_CPU_SHARE * ray.cluster_resources().get("CPU", 1) / len(groups)
        num_cpus = min(1.0, max(0.01, share))
    if use_gpu is None:   # faiss GPU has no fast-scan PQ: compressed shards are searched on CPUs
        from facelake.device import faiss_on_gpu

        use_gpu = faiss_on_gpu() and not handle.manifest.get("pq")
    # CPU searchers run as many one-thread calls at once as their node has CPUs for them (at least
    # SEARCHER_CALLS: one batch scanned while another's is merged; faiss releases the GIL and a
    # search only reads the index, with per-call parameters): calls, unlike OpenMP threads in one
    # call, also run the re-rank and merge side by side. GPU ones one call at a time: faiss GPU
    # resources are not thread-safe and nprobe is set on the index.
    per_node = -(-len(groups) // len(nodes))
    calls = 1 if use_gpu else max(SEARCHER_CALLS, int(min(n.get("CPU", 1) for n in nodes) // per_node))
    threads = threads or 1
    opts = {"num_cpus": num_cpus, "num_gpus": 1 if use_gpu else 0, "scheduling_strategy": "SPREAD",
            "max_concurrency": calls}
    return Searchers([ShardSearcher.options(**opts, **({"memory": group_memory(handle, g)} if reserve_memory else {}))
                      .remote(handle, g, use_gpu, threads) for g in groups], calls)


def _pieces(n: int, actors: Sequence) -> list[slice]:
    """A batch of ``n`` probes cut into one piece per call each searcher runs at once."""
    count = max(1, min(n, getattr(actors, "calls", 1)))
    bounds = np.linspace(0, n, count + 1).astype(int)
    return [slice(a, b) for a, b in zip(bounds[:-1], bounds[1:]) if b > a]


def search_version(handle: VersionHandle, xq: np.ndarray, k: int, nprobe: int | None = None,
                   actors: list | None = None) -> Result:
    """Global top-k (D, I) over every shard of a version; I are faiss ids (see ``search_rows`` /
    ``load_ids`` for the faces they name).

    With ``actors`` (from ``start_searchers``) the batch fans out over Ray; without, each shard
    is loaded and searched in turn in this process (notebooks, small indexes).
    """
    xq = check_probes(xq, handle.dim, k)
    nprobe = _nprobe(handle, nprobe)
    if actors:
        pieces = _pieces(len(xq), actors)
        refs = [ray.put(xq[piece]) for piece in pieces]
        pending = [[actor.search.remote(ref, k, nprobe) for actor in actors] for ref in refs]
        merged = [merge_topk(ray.get(calls), k) for calls in pending]
        return np.concatenate([D for D, _ in merged]), np.concatenate([I for _, I in merged])
    results = [search_reranked(open_shard(handle, s), xq, k, nprobe) for s in range(handle.shard_count)]
    return merge_topk(results, k)


def search_rows(handle: VersionHandle, xq: np.ndarray, k: int, nprobe: int | None = None,
                actors: list | None = None, searchers: list | None = None,
                coarse: CoarseQuantizer | None = None) -> tuple[np.ndarray, np.ndarray, pa.Table]:
    """Global top-k (D, I) and the winners' id-table rows (row-major, null where none), from
    Ray ``actors`` or in-process ``searchers`` (LocalShardSearcher). With ``coarse`` each
    probe's lists are found once here, not once per shard."""
    xq = check_probes(xq, handle.dim, k)
    nprobe = _nprobe(handle, nprobe)
    assigned = coarse.assign(xq, nprobe) if coarse is not None else None
    if actors:
        pending = []
        for piece in _pieces(len(xq), actors):
            ref = ray.put(xq[piece])
            lists = ray.put((assigned[0][piece], assigned[1][piece])) if assigned is not None else None
            pending.append([actor.search_rows.remote(ref, k, nprobe, lists) for actor in actors])
        merged = [merge_candidates(ray.get(calls), k) for calls in pending]
        if len(merged) == 1:
            return merged[0]
        return (np.concatenate([D for D, _, _ in merged]), np.concatenate([I for _, I, _ in merged]),
                pa.concat_tables([rows for _, _, rows in merged], promote_options="permissive"))
    else:
        searchers = searchers or [LocalShardSearcher(handle, list(range(handle.shard_count)))]
        results = [s.search_rows(xq, k, nprobe, assigned) for s in searchers]
    return merge_candidates(results, k)


def _nprobe(handle: VersionHandle, nprobe: int | None) -> int:
    nprobe = nprobe or handle.nprobe
    if not 1 <= nprobe <= handle.nlist:
        raise ConfigError(f"--nprobe must be within 1..{handle.nlist} (nlist of version {handle.version})")
    return nprobe
