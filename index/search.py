"""Search shards and merge their top-k lists (faiss conventions: float32 (n, d) in, (D, I) out).

Shard ids are already global faiss ids, so merging is a top-k of the concatenated lists, done
with faiss's own ``ResultHeap``. ``ShardSearcher`` is a Ray actor holding the shards of one
group (``searcher_groups``: one group per node at least, each within the smallest node's memory;
on a GPU when it has one); ``search_version`` cuts a probe batch into one piece per call a
searcher runs at once, fans the pieces out to them and merges.

Compressed (IVF-PQ) shards re-rank: the shard's PQ search returns ``rerank * k`` candidates,
whose full vectors are read from the memory-mapped vectors file and scored exactly, so only
the codes stay in RAM. ``search_rows`` also returns each candidate's id-table row, so a search
job never needs the gallery's id table in one place: a searcher takes the rows of its own
winners only (``merge_rows``), and ``merge_candidates`` keeps the global winners' rows.
"""

from __future__ import annotations

import ctypes
import math
import os
from collections.abc import Callable, Sequence
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
# A searcher joining several shards holds them and their joined lists at once (MergedShards);
# measured at 10M faces: 1,131 MiB of anonymous memory at the peak for 655 MB of resident shards.
JOIN_PEAK = 2.0
# Fewest calls a CPU searcher actor runs at once (see start_searchers).
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


def merged_candidates(k: int, rerank: int, shards: int) -> int:
    """PQ candidates re-ranked per probe by a searcher holding ``shards`` merged shards: rerank*k
    for one shard, growing with the square root of the shards held. Measured at 10M faces (quiet,
    5 shards per searcher, nprobe 512, recall@10 of 2,048 probes): 100 -> 0.979, 200 -> 0.983,
    300 (this rule) -> 0.984; each shard re-ranking 100 apart: 0.985."""
    return k * rerank * math.ceil(math.sqrt(shards))


class IdLocator:
    """Which shard (and which row of its id table) holds a faiss id, for several shards' sorted
    ``faiss_id`` columns. Shards of one build hold disjoint id ranges: their bounds alone find the
    shard; otherwise (ranges interleaved) one sorted copy of every id is kept."""

    def __init__(self, id_columns: Sequence[np.ndarray]) -> None:
        self.columns = [np.asarray(c, np.int64) for c in id_columns]
        held = [s for s, c in enumerate(self.columns) if len(c)]
        held.sort(key=lambda s: self.columns[s][0])
        self._held = np.array(held, np.int64)
        self._lows = np.array([self.columns[s][0] for s in held], np.int64)
        highs = [self.columns[s][-1] for s in held]
        self._sorted = None
        if any(highs[i] >= self._lows[i + 1] for i in range(len(held) - 1)):
            every = np.concatenate(self.columns)
            order = np.argsort(every, kind="stable")
            self._sorted = every[order]
            owners = np.concatenate([np.full(len(c), s, np.int64) for s, c in enumerate(self.columns)])
            rows = np.concatenate([np.arange(len(c), dtype=np.int64) for c in self.columns])
            self._owner, self._row = owners[order], rows[order]

    def locate(self, ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(shard number, row) of each id, same shape; -1 for -1 ids and ids no shard holds."""
        ids = np.asarray(ids, np.int64)
        owner, row = np.full(ids.shape, -1, np.int64), np.full(ids.shape, -1, np.int64)
        valid = ids >= 0
        if not len(self._held) or not valid.any():
            return owner, row
        if self._sorted is not None:
            pos = np.minimum(np.searchsorted(self._sorted, ids), len(self._sorted) - 1)
            found = valid & (self._sorted[pos] == ids)
            owner[found], row[found] = self._owner[pos[found]], self._row[pos[found]]
            return owner, row
        slot = np.searchsorted(self._lows, ids, side="right") - 1
        candidate = np.where(valid & (slot >= 0), self._held[np.maximum(slot, 0)], -1)
        for s in np.unique(candidate[candidate >= 0]):
            where = candidate == s
            column = self.columns[s]
            pos = np.minimum(np.searchsorted(column, ids[where]), len(column) - 1)
            hit = column[pos] == ids[where]
            owner[where] = np.where(hit, s, -1)
            row[where] = np.where(hit, pos, -1)
        return owner, row


def _ivf_of(index: faiss.Index | None) -> faiss.IndexIVF | None:
    """The index itself when it is a plain (CPU) IVF index, else None."""
    if index is None:
        return None
    index = faiss.downcast_index(index)
    return index if isinstance(index, faiss.IndexIVF) else None


def _same_training(a: faiss.IndexIVF, b: faiss.IndexIVF) -> bool:
    """Same coarse centroids (and PQ codebooks): lists of one may be merged into the other."""
    if type(a) is not type(b) or a.nlist != b.nlist or a.d != b.d or a.code_size != b.code_size:
        return False
    qa, qb = faiss.downcast_index(a.quantizer), faiss.downcast_index(b.quantizer)
    if not (isinstance(qa, faiss.IndexFlat) and isinstance(qb, faiss.IndexFlat)):
        return False
    if not np.array_equal(faiss.vector_to_array(qa.codes), faiss.vector_to_array(qb.codes)):
        return False
    pq_a, pq_b = getattr(a, "pq", None), getattr(b, "pq", None)
    return pq_a is None or np.array_equal(faiss.vector_to_array(pq_a.centroids),
                                          faiss.vector_to_array(pq_b.centroids))


def join_lists(base: faiss.IndexIVF, others: Sequence[faiss.IndexIVF],
               release: Callable[[int], None] = lambda i: None) -> None:
    """Move the inverted lists of ``others`` (same training as ``base``) into ``base``, one index
    after the other; ``release(i)`` is called once ``others[i]`` has been read, so its memory can
    go before the next one is (``others[i]`` must not be used after it).

    Fast-scan lists (``BlockInvertedLists``: codes packed 32 to a block) are joined here, not by
    faiss's ``merge_from``: its ``BlockInvertedLists::add_entries`` tests an entry count against
    the block's byte size and, for a list already holding a multiple of 1,024 entries, copies a
    whole list's bytes past the end of the buffer (heap corruption, seen joining ten 1M shards;
    faiss 1.15.1 and its main branch). Each list is sized once for all (no growth by doubling),
    and the codes are unpacked and packed again, from a list's last partial block on, with the
    index's own code packer, so the layout is faiss's."""
    into = faiss.downcast_InvertedLists(base.invlists)
    if not isinstance(into, faiss.BlockInvertedLists):
        for i, other in enumerate(others):
            base.merge_from(other, 0)
            release(i)
        return
    sources = [faiss.downcast_InvertedLists(other.invlists) for other in others]
    sizes = np.array([[il.list_size(n) for n in range(base.nlist)] for il in sources], np.int64).reshape(-1, base.nlist)
    cursor = np.array([into.list_size(n) for n in range(base.nlist)], np.int64)
    for list_no in np.flatnonzero(sizes.sum(axis=0)):
        into.resize(int(list_no), int(cursor[list_no] + sizes[:, list_no].sum()))
    for i, (other, source) in enumerate(zip(others, sources)):
        for list_no in np.flatnonzero(sizes[i]):
            _append_list(into, source, int(list_no), int(cursor[list_no]), int(sizes[i, list_no]))
            cursor[list_no] += sizes[i, list_no]
        base.ntotal += other.ntotal
        release(i)


def _append_list(into: faiss.BlockInvertedLists, source: faiss.BlockInvertedLists, list_no: int, at: int,
                 size: int) -> None:
    """Write ``size`` codes and ids of ``source``'s list at entry ``at`` of ``into``'s (sized)."""
    packer = into.packer
    per_block, block_bytes, code_size = into.n_per_block, into.block_size, packer.code_size
    blocks = lambda n: -(-n // per_block)                     # noqa: E731
    one_block = np.empty((per_block, code_size), np.uint8)
    first, kept = divmod(at, per_block)                       # repacked from block `first` on
    codes = np.zeros((blocks(kept + size) * per_block, code_size), np.uint8)
    target = faiss.rev_swig_ptr(into.get_codes(list_no), blocks(into.list_size(list_no)) * block_bytes)
    if kept:
        packer.unpack_all(faiss.swig_ptr(target[first * block_bytes:]), faiss.swig_ptr(one_block))
        codes[:kept] = one_block[:kept]
    packed = faiss.rev_swig_ptr(source.get_codes(list_no), blocks(size) * block_bytes)
    for b in range(blocks(size)):
        packer.unpack_all(faiss.swig_ptr(packed[b * block_bytes:]), faiss.swig_ptr(one_block))
        take = min(per_block, size - b * per_block)
        codes[kept + b * per_block:kept + b * per_block + take] = one_block[:take]
    for b in range(len(codes) // per_block):
        packer.pack_all(faiss.swig_ptr(codes[b * per_block:]), faiss.swig_ptr(target[(first + b) * block_bytes:]))
    faiss.rev_swig_ptr(into.get_ids(list_no), at + size)[at:] = faiss.rev_swig_ptr(source.get_ids(list_no), size)


def _return_freed_memory() -> None:
    """Hand the heap pages freed by joining back to the system (glibc ``malloc_trim``; ctypes
    because no maintained package wraps it). The shards' lists are many small allocations that
    glibc otherwise keeps: at 10M faces a searcher's anonymous memory after joining was 1,131 MiB,
    548 MiB once trimmed. A no-op where the C library has no malloc_trim."""
    try:
        ctypes.CDLL(None).malloc_trim(0)
    except (OSError, AttributeError):
        pass


class MergedShards:
    """Several shards of one version searched as one faiss index.

    A version's shards are all built on its trained quantizer and codebooks, so their inverted
    lists can be joined (``join_lists``): a probe then visits each of its lists once per searcher
    instead of once per shard. At 10M faces (16,384 lists, 61 faces a
    list in each 1M shard) that per-list cost was most of the scan: quiet, one thread, nprobe
    512, five shards, 802 -> 323 us per probe. The shards keep their id tables and memory-mapped
    vectors (``LoadedShard.index`` is None once merged); compressed shards re-rank
    ``merged_candidates`` PQ candidates exactly from their own shard's vectors.
    """

    def __init__(self, shards: Sequence[LoadedShard]) -> None:
        self.shards = list(shards)
        self.index = shards[0].index

        def release(i: int) -> None:            # frees that shard's codes before the next one's
            shards[i + 1].index = None

        join_lists(_ivf_of(self.index), [_ivf_of(s.index) for s in shards[1:]], release)
        shards[0].index = None
        _return_freed_memory()
        self.rerank = shards[0].rerank if all(s.vectors is not None for s in shards) else 0
        self.locator = IdLocator([s.faiss_ids for s in shards])

    @staticmethod
    def possible(shards: Sequence[LoadedShard]) -> bool:
        """Every shard is a CPU IVF index with the first one's training."""
        ivfs = [_ivf_of(s.index) for s in shards]
        return len(shards) > 1 and all(ivfs) and all(_same_training(ivfs[0], ivf) for ivf in ivfs[1:])

    def search(self, xq: np.ndarray, k: int, nprobe: int, coarse: Result | None = None
               ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Top-k (D, I) over the merged shards and the (shard, row) of each winner, as an
        (nq, k, 2) array (-1 where there is none)."""
        xq = _check(xq, self.index.d, k)
        wanted = merged_candidates(k, self.rerank, len(self.shards)) if self.rerank else k
        D, I = search_shard(self.index, xq, wanted, nprobe, coarse)
        owner, row = self.locator.locate(I)
        if self.rerank:
            D = np.full(I.shape, -np.inf, np.float32)
            for s in np.unique(owner[owner >= 0]):
                D = np.maximum(D, exact_scores(xq, self.shards[s].vectors, np.where(owner == s, row, -1)))
            order = np.argsort(-D, axis=1, kind="stable")[:, :k]
            D, I, owner, row = (np.take_along_axis(a, order, axis=1) for a in (D, I, owner, row))
        D, I = np.where(I < 0, -np.inf, D).astype(np.float32), I.copy()
        I[~np.isfinite(D)] = -1
        if D.shape[1] < k:
            pad = ((0, 0), (0, k - D.shape[1]))
            D, I = np.pad(D, pad, constant_values=-np.inf), np.pad(I, pad, constant_values=-1)
            owner, row = np.pad(owner, pad, constant_values=-1), np.pad(row, pad, constant_values=-1)
        owner[I < 0], row[I < 0] = -1, -1
        return D, I, np.stack([owner, row], axis=2)

    def search_rows(self, xq: np.ndarray, k: int, nprobe: int, coarse: Result | None = None
                    ) -> tuple[np.ndarray, np.ndarray, pa.Table]:
        """(D, I, id-table rows of I) of the top-k over the merged shards."""
        D, I, where = self.search(xq, k, nprobe, coarse)
        return D, I, _rows_at(self.shards, where[..., 0].reshape(-1), where[..., 1].reshape(-1))


def _rows_at(shards: Sequence[LoadedShard], owner: np.ndarray, row: np.ndarray) -> pa.Table:
    """Id-table rows at (shard ``owner``, ``row``), in order; null where the owner is -1."""
    position = np.full(owner.size, -1, np.int64)
    tables, taken = [], 0
    for s, shard in enumerate(shards):
        won = np.flatnonzero(owner == s)
        if len(won):
            tables.append(shard.ids.take(pa.array(row[won], pa.int64())))
            position[won] = taken + np.arange(len(won))
            taken += len(won)
    table = pa.concat_tables(tables or [shards[0].ids.slice(0, 0)], promote_options="permissive")
    return table.take(pa.array(np.where(position < 0, 0, position), pa.int64(), mask=position < 0))


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
    flat_ids, flat_owner = I.reshape(-1), np.where(I < 0, -1, owner).reshape(-1)
    flat_row = np.zeros(flat_ids.size, np.int64)
    for s, shard in enumerate(shards):
        won = flat_owner == s
        flat_row[won] = np.searchsorted(shard.faiss_ids, flat_ids[won])
    rows = _rows_at(shards, flat_owner, flat_row)
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
    xq = _check(xq, handle.dim, k)
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
    xq = _check(xq, handle.dim, k)
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
