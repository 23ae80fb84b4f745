"""Join several shards of one version into one faiss index, searched as one (``MergedShards``).

A version's shards are all built on its trained quantizer and codebooks, so their inverted
lists can be moved into one index (``join_lists``): a probe then visits each of its lists once
per searcher instead of once per shard. Fast-scan lists are repacked here rather than by faiss's
``merge_from`` (see ``join_lists``), and the heap pages freed by joining are handed back to the
system (``_return_freed_memory``).
"""

from __future__ import annotations

import ctypes
import math
from collections.abc import Callable, Sequence

import faiss
import numpy as np
import pyarrow as pa

from facelake.index.load import LoadedShard
from facelake.index.search import IdLocator, Result, check_probes, exact_scores, rows_at, search_shard


def merged_candidates(k: int, rerank: int, shards: int) -> int:
    """PQ candidates re-ranked per probe by a searcher holding ``shards`` merged shards: rerank*k
    for one shard, growing with the square root of the shards held. Measured at 10M faces (quiet,
    5 shards per searcher, nprobe 512, recall@10 of 2,048 probes): 100 -> 0.979, 200 -> 0.983,
    300 (this rule) -> 0.984; each shard re-ranking 100 apart: 0.985."""
    return k * rerank * math.ceil(math.sqrt(shards))


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
        xq = check_probes(xq, self.index.d, k)
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
        return D, I, rows_at(self.shards, where[..., 0].reshape(-1), where[..., 1].reshape(-1))
