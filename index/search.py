"""Search shards and merge their top-k lists (faiss conventions: float32 (n, d) in, (D, I) out).

Shard ids are already global faiss ids, so merging is a top-k of the concatenated lists, done
with faiss's own ``ResultHeap``. ``ShardSearcher`` is a Ray actor holding the shards of one
group (``searcher_groups``: one group per CPU at least, each within the smallest node's memory;
on a GPU when it has one); ``search_version`` fans a probe batch out to them and merges.

Compressed (IVF-PQ) shards re-rank: the shard's PQ search returns ``rerank * k`` candidates,
whose full vectors are read from the memory-mapped vectors file and scored exactly, so only
the codes stay in RAM. ``search_rows`` also returns each candidate's id-table row, so a search
job never needs the gallery's id table in one place: a searcher takes the rows of its own
winners only (``merge_rows``), and ``merge_candidates`` keeps the global winners' rows.
"""

from __future__ import annotations

from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor

import faiss
import numpy as np
import pyarrow as pa
import ray

from facelake.errors import ConfigError
from facelake.index.load import LoadedShard, VersionHandle, load_trained, open_shard

# Ray's memory request of a searcher on top of its shard's resident bytes: faiss search buffers
# and the Python process itself.
SEARCHER_BASE_MEMORY = 256 << 20
# Share of the cluster's CPUs the shard actors reserve together; the rest keeps room for the
# search workers and probe reads (a full reservation deadlocks a one-node cluster).
SEARCHER_CPU_SHARE = 0.5
# Calls a CPU searcher actor runs at once (see start_searchers).
SEARCHER_CALLS = 2

Result = tuple[np.ndarray, np.ndarray]


def _check(xq: np.ndarray, dim: int, k: int) -> np.ndarray:
    xq = np.ascontiguousarray(xq, dtype=np.float32)
    if xq.ndim != 2 or xq.shape[1] != dim:
        raise ConfigError(f"probes must be float32 of shape (n, {dim}), got {xq.shape}")
    if k < 1:
        raise ConfigError(f"--top-k must be at least 1, got {k}")
    return xq


class CoarseQuantizer:
    """The version's trained coarse quantizer, shared by every shard (they are all built on it):
    the lists a probe visits are found once per batch instead of once per shard. At 10M faces
    (16,384 lists, ten shards) finding them costs more than scanning them."""

    def __init__(self, handle: VersionHandle) -> None:
        self._trained = load_trained(handle)                 # owns the quantizer: keep it alive
        self.quantizer = faiss.extract_index_ivf(self._trained).quantizer

    def assign(self, xq: np.ndarray, nprobe: int) -> Result:
        """(similarities, list numbers) of the ``nprobe`` nearest lists of each probe."""
        return self.quantizer.search(np.ascontiguousarray(xq, np.float32), min(nprobe, self.quantizer.ntotal))


def search_shard(index: faiss.Index, xq: np.ndarray, k: int, nprobe: int, coarse: Result | None = None) -> Result:
    """Top-k (D, I) of one shard; ``nprobe`` is clamped to the shard's nlist. ``coarse`` is the
    probes' list assignment from ``CoarseQuantizer.assign`` (CPU shards use it instead of
    searching their own copy of the quantizer)."""
    xq = _check(xq, index.d, k)
    if nprobe < 1:
        raise ConfigError(f"--nprobe must be at least 1, got {nprobe}")
    try:
        ivf = faiss.extract_index_ivf(index)
    except RuntimeError:
        ivf = None
    if ivf is not None and coarse is not None:
        return _search_preassigned(ivf, xq, k, coarse)
    if ivf is not None:                                     # CPU: per-call parameters, thread-safe
        nprobe = min(nprobe, ivf.nlist)
        return index.search(xq, k, params=faiss.SearchParametersIVF(nprobe=nprobe))
    if hasattr(index, "nprobe"):                            # GPU IVF clone (IndexIVFInterface)
        index.nprobe = min(nprobe, index.nlist)
    return index.search(xq, k)


def _search_preassigned(ivf: faiss.IndexIVF, xq: np.ndarray, k: int, coarse: Result) -> Result:
    """faiss's search over given lists, with the width as a per-call nprobe (the Python wrapper
    wants it set on the shared index, which concurrent callers would race on)."""
    Dq, Iq = (np.ascontiguousarray(a, t) for a, t in zip(coarse, (np.float32, np.int64)))
    if Iq.shape[0] != len(xq):
        raise ConfigError(f"coarse assignment holds {Iq.shape[0]} probes, the batch {len(xq)}")
    D, I = np.empty((len(xq), k), np.float32), np.empty((len(xq), k), np.int64)
    ivf.search_preassigned_c(len(xq), faiss.swig_ptr(xq), k, faiss.swig_ptr(Iq), faiss.swig_ptr(Dq),
                             faiss.swig_ptr(D), faiss.swig_ptr(I), False,
                             faiss.SearchParametersIVF(nprobe=Iq.shape[1]))
    return D, I


def search_reranked(shard: LoadedShard, xq: np.ndarray, k: int, nprobe: int, coarse: Result | None = None) -> Result:
    """Top-k of one shard; compressed shards re-rank ``rerank * k`` PQ candidates exactly."""
    if not shard.rerank or shard.vectors is None:
        return search_shard(shard.index, xq, k, nprobe, coarse)
    xq = _check(xq, shard.index.d, k)
    _, I0 = search_shard(shard.index, xq, max(k, k * shard.rerank), nprobe, coarse)
    scores = exact_scores(xq, shard.vectors, np.where(I0 >= 0, np.searchsorted(shard.faiss_ids, I0), -1))
    order = np.argsort(-scores, axis=1, kind="stable")[:, :k]
    D = np.take_along_axis(scores, order, axis=1)
    I = np.take_along_axis(I0, order, axis=1)
    I[~np.isfinite(D)] = -1
    if D.shape[1] < k:                                   # fewer vectors than k
        pad = k - D.shape[1]
        D = np.pad(D, ((0, 0), (0, pad)), constant_values=-np.inf)
        I = np.pad(I, ((0, 0), (0, pad)), constant_values=-1)
    return D, I


def exact_scores(xq: np.ndarray, vectors: np.ndarray, rows: np.ndarray) -> np.ndarray:
    """Inner products of each probe with its candidate ``rows`` of ``vectors`` (a memory-mapped
    (n, d) float32 array); -inf where the row is -1. faiss's C++ kernel reads only those rows."""
    rows = np.ascontiguousarray(rows, dtype=np.int64)
    scores = np.empty(rows.shape, np.float32)
    if not isinstance(vectors, np.ndarray) or vectors.dtype != np.float32 or not vectors.flags.c_contiguous:
        vectors = np.ascontiguousarray(vectors, dtype=np.float32)
    faiss.fvec_inner_products_by_idx(faiss.swig_ptr(scores), faiss.swig_ptr(xq), faiss.swig_ptr(vectors),
                                     faiss.swig_ptr(rows), xq.shape[1], rows.shape[0], rows.shape[1])
    return scores


def rows_of(shard: LoadedShard, I: np.ndarray) -> pa.Table:
    """Id-table rows of a (nq, k) id array, row-major; null rows where the id is -1."""
    flat = I.reshape(-1)
    missing = flat < 0
    rows = np.searchsorted(shard.faiss_ids, np.where(missing, 0, flat))
    return shard.ids.take(pa.array(rows, pa.int64(), mask=missing))


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


def merge_candidates(results: list[tuple[np.ndarray, np.ndarray, pa.Table]], k: int
                     ) -> tuple[np.ndarray, np.ndarray, pa.Table]:
    """Merge per-shard (D, I, rows) into the global top-k (D, I) and the winners' rows (row-major,
    null where there is no candidate)."""
    if not results:
        raise ConfigError("nothing to merge: the index version has no shards")
    nq = results[0][0].shape[0]
    widths = [D.shape[1] for D, _, _ in results]
    D_all = np.concatenate([np.where(I < 0, -np.inf, D) for D, I, _ in results], axis=1).astype(np.float32)
    I_all = np.concatenate([I for _, I, _ in results], axis=1)
    order = np.argsort(-D_all, axis=1, kind="stable")[:, :k]
    D = np.take_along_axis(D_all, order, axis=1)
    I = np.take_along_axis(I_all, order, axis=1)
    # the table rows of shard s are its (nq, width_s) candidates, row-major, after shards < s
    offsets = np.cumsum([0] + [nq * w for w in widths[:-1]])
    shard_of = np.searchsorted(np.cumsum(widths), order, side="right")
    column = order - np.concatenate([[0], np.cumsum(widths)[:-1]])[shard_of]
    positions = offsets[shard_of] + np.arange(nq)[:, None] * np.asarray(widths)[shard_of] + column
    rows = pa.concat_tables([r for _, _, r in results], promote_options="permissive")
    rows = rows.take(pa.array(positions.reshape(-1), pa.int64()))
    if D.shape[1] < k:
        pad = k - D.shape[1]
        D = np.pad(D, ((0, 0), (0, pad)), constant_values=-np.inf)
        I = np.pad(I, ((0, 0), (0, pad)), constant_values=-1)
        rows = _pad_rows(rows, nq, k - pad, k)
    return D, I, rows


def _pad_rows(rows: pa.Table, nq: int, have: int, k: int) -> pa.Table:
    index = np.full((nq, k), -1, np.int64)
    index[:, :have] = np.arange(nq * have).reshape(nq, have)
    flat = index.reshape(-1)
    return rows.take(pa.array(np.where(flat < 0, 0, flat), pa.int64(), mask=flat < 0))


class LocalShardSearcher:
    """Shards loaded once (checksum-verified), searched many times, in this process.

    One searcher holds one shard or several (``shards``: a number or a list of them): a batch is
    searched on each, re-ranked per shard, merged here, and only the winners' id-table rows are
    taken, so a node's searcher returns k candidates per probe however many shards it holds.
    """

    def __init__(self, handle: VersionHandle, shards: int | Sequence[int], use_gpu: bool = False,
                 threads: int | None = None, cache_dir: str | None = None) -> None:
        if threads:
            faiss.omp_set_num_threads(threads)
        self.shard_nos = [shards] if isinstance(shards, int) else list(shards)
        if not self.shard_nos:
            raise ConfigError("a searcher needs at least one shard")
        # files are hashed while read: the threads overlap the shards' verification and parsing
        with ThreadPoolExecutor(max_workers=min(len(self.shard_nos), threads or 1)) as pool:
            self.shards = list(pool.map(lambda s: open_shard(handle, s, cache_dir), self.shard_nos))
        self._pool = None
        if use_gpu:
            self._gpu_resources = faiss.StandardGpuResources()
            for shard in self.shards:
                shard.index = faiss.index_cpu_to_gpu(self._gpu_resources, 0, shard.index)
        elif len(self.shards) > 1 and (threads or 1) > 1:
            # one shard per thread, one OpenMP thread each: a shard's re-rank and sort are serial,
            # so searching shards side by side keeps every core busy where OpenMP alone would not
            self._pool = ThreadPoolExecutor(max_workers=threads, initializer=faiss.omp_set_num_threads,
                                            initargs=(1,))

    @property
    def shard(self) -> LoadedShard:
        """The first (with one shard: the) shard held."""
        return self.shards[0]

    @property
    def index(self) -> faiss.Index:
        return self.shard.index

    def search(self, xq: np.ndarray, k: int, nprobe: int, coarse: Result | None = None) -> Result:
        """Top-k (D, I) over the shards held."""
        results = self._each_shard(xq, k, nprobe, coarse)
        return results[0] if len(results) == 1 else merge_topk(results, k)

    def search_rows(self, xq: np.ndarray, k: int, nprobe: int, coarse: Result | None = None
                    ) -> tuple[np.ndarray, np.ndarray, pa.Table]:
        """(D, I, id-table rows of I) of the top-k over the shards held."""
        return merge_rows(self.shards, self._each_shard(xq, k, nprobe, coarse), k)

    def _each_shard(self, xq: np.ndarray, k: int, nprobe: int, coarse: Result | None) -> list[Result]:
        coarse = self._usable(coarse)
        search = lambda shard: search_reranked(shard, xq, k, nprobe, coarse)   # noqa: E731
        return list(self._pool.map(search, self.shards) if self._pool else map(search, self.shards))

    def _usable(self, coarse: Result | None) -> Result | None:
        return None if hasattr(self, "_gpu_resources") else coarse   # a GPU shard searches its own lists

    def ntotal(self) -> int:
        return sum(int(shard.index.ntotal) for shard in self.shards)

    def node_id(self) -> str | None:
        """The Ray node holding this searcher (None outside Ray)."""
        return ray.get_runtime_context().get_node_id() if ray.is_initialized() else None


def merge_rows(shards: list[LoadedShard], results: list[Result], k: int) -> tuple[np.ndarray, np.ndarray, pa.Table]:
    """Merge the (D, I) of ``shards`` into the top-k and take the id-table rows of the winners
    only (row-major, null where there is no candidate)."""
    if len(results) == 1:
        D, I = results[0]
        return D, I, rows_of(shards[0], I)
    D_all = np.concatenate([np.where(I < 0, -np.inf, D) for D, I in results], axis=1).astype(np.float32)
    I_all = np.concatenate([I for _, I in results], axis=1)
    owner_all = np.concatenate([np.full(I.shape, s, np.int64) for s, (_, I) in enumerate(results)], axis=1)
    order = np.argsort(-D_all, axis=1, kind="stable")[:, :k]
    D, I, owner = (np.take_along_axis(a, order, axis=1) for a in (D_all, I_all, owner_all))
    I[~np.isfinite(D)] = -1
    flat_ids, flat_owner = I.reshape(-1), owner.reshape(-1)
    position = np.full(flat_ids.size, -1, np.int64)
    tables, taken = [], 0
    for s, shard in enumerate(shards):
        won = np.flatnonzero((flat_owner == s) & (flat_ids >= 0))
        if len(won):
            tables.append(shard.ids.take(pa.array(np.searchsorted(shard.faiss_ids, flat_ids[won]), pa.int64())))
            position[won] = taken + np.arange(len(won))
            taken += len(won)
    table = pa.concat_tables(tables or [shards[0].ids.slice(0, 0)], promote_options="permissive")
    rows = table.take(pa.array(np.where(position < 0, 0, position), pa.int64(), mask=position < 0))
    if D.shape[1] < k:                                    # fewer candidates than k in every shard
        pad = k - D.shape[1]
        D = np.pad(D, ((0, 0), (0, pad)), constant_values=-np.inf)
        I = np.pad(I, ((0, 0), (0, pad)), constant_values=-1)
        rows = _pad_rows(rows, len(D), k - pad, k)
    return D, I, rows


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
    """Bytes of RAM a searcher holding these shards asks Ray for."""
    return sum(_resident(handle, s) for s in shard_nos) + SEARCHER_BASE_MEMORY


def searcher_groups(handle: VersionHandle, nodes: Sequence[dict]) -> list[list[int]]:
    """Shards split into consecutive groups, one searcher each: at least one group per CPU of the
    cluster (at 10M faces on 2 CPUs, quiet: 729 probes/s in A B A B rounds, one searcher per
    node 742, the earlier one actor per shard 875 -- see README: at 10M this rule is slower),
    each group within the smallest node's memory (so
    Ray can place it), never more groups than shards.

    ``nodes``: the alive nodes' Ray resources (``ray.nodes()[i]["Resources"]``)."""
    count = handle.shard_count
    capacity = min((n.get("memory", 0) for n in nodes), default=0) or None
    wanted = min(count, max(1, int(sum(n.get("CPU", 1) for n in nodes))))
    while True:
        groups = [list(g) for g in np.array_split(np.arange(count), wanted) if len(g)]
        if wanted >= count or capacity is None or all(group_memory(handle, g) <= capacity for g in groups):
            return [[int(s) for s in g] for g in groups]
        wanted += 1


def start_searchers(handle: VersionHandle, *, use_gpu: bool | None = None, num_cpus: float | None = None,
                    threads: int | None = None, reserve_memory: bool = True,
                    groups: list[list[int]] | None = None) -> list:
    """``ShardSearcher`` actors holding the version's shards (GPU ones when faiss and the cluster
    have GPUs), spread over the nodes, each asking Ray for the memory its shards need, so a
    gallery larger than one node's memory is placed over several nodes (or refused by Ray,
    never swapped). ``groups`` (default ``searcher_groups``): the shards each actor holds.

    ``num_cpus`` per actor defaults to half the cluster's CPUs shared by the actors (at most 1),
    so the search workers and probe reads that feed them can still be scheduled (faiss threads
    are not bound by it: each actor searches with its node's CPUs shared by the actors there).
    """
    nodes = [n["Resources"] for n in ray.nodes() if n.get("Alive")] or [{"CPU": 1}]
    groups = groups or searcher_groups(handle, nodes)
    if num_cpus is None:
        share = SEARCHER_CPU_SHARE * ray.cluster_resources().get("CPU", 1) / len(groups)
        num_cpus = min(1.0, max(0.01, share))
    if use_gpu is None:   # faiss GPU has no fast-scan PQ: compressed shards are searched on CPUs
        from facelake.device import faiss_on_gpu

        use_gpu = faiss_on_gpu() and not handle.manifest.get("pq")
    if threads is None:   # Ray caps OpenMP at an actor's num_cpus: give faiss the node's share
        per_node = -(-len(groups) // len(nodes))
        threads = max(1, int(min(n.get("CPU", 1) for n in nodes) // per_node))
    # CPU searchers take two calls at once: one search worker's batch is scanned while another's
    # is merged (faiss releases the GIL; searches of one index are read-only, parameters per
    # call). GPU ones one at a time: faiss GPU resources are not thread-safe, nprobe is set on
    # the index.
    opts = {"num_cpus": num_cpus, "num_gpus": 1 if use_gpu else 0, "scheduling_strategy": "SPREAD",
            "max_concurrency": 1 if use_gpu else SEARCHER_CALLS}
    return [ShardSearcher.options(**opts, **({"memory": group_memory(handle, g)} if reserve_memory else {}))
            .remote(handle, g, use_gpu, threads) for g in groups]


def search_version(handle: VersionHandle, xq: np.ndarray, k: int, nprobe: int | None = None,
                   actors: list | None = None) -> Result:
    """Global top-k (D, I) over every shard of a version; I are faiss ids (see ``search_rows`` /
    ``load_ids`` for the faces they name).

    With ``actors`` (from ``start_searchers``) the batch fans out over Ray; without, each shard
    is loaded and searched in turn in this process (notebooks, small indexes).
    """
    xq = _check(xq, handle.dim, k)
    nprobe = _nprobe(handle, nprobe)
    if actors:
        ref = ray.put(xq)
        results = ray.get([actor.search.remote(ref, k, nprobe) for actor in actors])
    else:
        results = [search_reranked(open_shard(handle, s), xq, k, nprobe) for s in range(handle.shard_count)]
    return merge_topk(results, k)


def search_rows(handle: VersionHandle, xq: np.ndarray, k: int, nprobe: int | None = None,
                actors: list | None = None, searchers: list | None = None,
                coarse: CoarseQuantizer | None = None) -> tuple[np.ndarray, np.ndarray, pa.Table]:
    """Global top-k (D, I) and the winners' id-table rows (row-major, null where none), from
    Ray ``actors`` or in-process ``searchers`` (LocalShardSearcher). With ``coarse`` each
    probe's lists are found once here, not once per shard."""
    xq = _check(xq, handle.dim, k)
    nprobe = _nprobe(handle, nprobe)
    assigned = coarse.assign(xq, nprobe) if coarse is not None else None
    if actors:
        ref, lists = ray.put(xq), ray.put(assigned) if assigned is not None else None
        results = ray.get([actor.search_rows.remote(ref, k, nprobe, lists) for actor in actors])
    else:
        searchers = searchers or [LocalShardSearcher(handle, list(range(handle.shard_count)))]
        results = [s.search_rows(xq, k, nprobe, assigned) for s in searchers]
    return merge_candidates(results, k)


def _nprobe(handle: VersionHandle, nprobe: int | None) -> int:
    nprobe = nprobe or handle.nprobe
    if not 1 <= nprobe <= handle.nlist:
        raise ConfigError(f"--nprobe must be within 1..{handle.nlist} (nlist of version {handle.version})")
    return nprobe
