"""Search shards and merge their top-k lists (faiss conventions: float32 (n, d) in, (D, I) out).

Shard ids are already global faiss ids, so merging is a top-k of the concatenated lists, done
with faiss's own ``ResultHeap``. Compressed (IVF-PQ) shards re-rank: the shard's PQ search
returns ``rerank * k`` candidates, whose full vectors are read from the memory-mapped vectors
file and scored exactly (``exact_scores``), so only the codes stay in RAM. ``CoarseQuantizer``
finds a batch's lists once for every shard of a version. A search job never needs the gallery's
id table in one place: a searcher takes the rows of its own winners only (``merge_rows``), and
``merge_candidates`` keeps the global winners' rows. No Ray here: ``facelake.index.searchers``
places shards in Ray actors and fans batches out to them, ``facelake.index.joining`` joins
several shards' lists into one index.
"""

from __future__ import annotations

from collections.abc import Sequence

import faiss
import numpy as np
import pyarrow as pa

from facelake.errors import ConfigError
from facelake.index.load import LoadedShard, VersionHandle, load_trained

Result = tuple[np.ndarray, np.ndarray]


def check_probes(xq: np.ndarray, dim: int, k: int) -> np.ndarray:
    """``xq`` as contiguous float32, after checking its shape and ``k``."""
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
    xq = check_probes(xq, index.d, k)
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
    xq = check_probes(xq, shard.index.d, k)
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


def rows_at(shards: Sequence[LoadedShard], owner: np.ndarray, row: np.ndarray) -> pa.Table:
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
    rows = rows_at(shards, flat_owner, flat_row)
    if D.shape[1] < k:                                    # fewer candidates than k in every shard
        pad = k - D.shape[1]
        D = np.pad(D, ((0, 0), (0, pad)), constant_values=-np.inf)
        I = np.pad(I, ((0, 0), (0, pad)), constant_values=-1)
        rows = _pad_rows(rows, len(D), k - pad, k)
    return D, I, rows
