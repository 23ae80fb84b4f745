"""Choose a version's nprobe from measured recall@10, before it is published.

The probes are new-photo stand-ins (``tuning_probes``): faces of the training sample turned
towards their nearest other face. While a shard task has its vectors in memory it finds each
sampled face's exact nearest (``facelake.index.shards``); once every shard is written, one Ray
task per shard searches the probes exactly and at each nprobe of the ladder (``tune_shard``),
and ``choose_nprobe`` takes the smallest nprobe whose merged recall@10 reaches the target.
"""

from __future__ import annotations

import faiss
import numpy as np
import ray

from facelake.index.load import LoadedShard, VersionHandle, open_shard
from facelake.index.params import TARGET_RECALL, TUNING_QUERIES, TUNING_TURN, nprobe_ladder
from facelake.index.search import Result, merge_topk, search_reranked, search_shard

TUNING_K = 10
SATURATION_SLACK = 0.002         # recall@10 given up for a smaller nprobe when the target is out of reach


@ray.remote
def _tuning_queries_task(count: int, *samples: tuple[np.ndarray, np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    """A random subset of the training sample, used as probes to tune nprobe (self-excluded)."""
    xb = np.concatenate([s[0] for s in samples])
    ids = np.concatenate([s[1] for s in samples])
    picks = np.random.default_rng(1).choice(len(xb), min(count, len(xb)), replace=False)
    return np.ascontiguousarray(xb[picks]), ids[picks]


def tuning_queries(samples: list, count: int = TUNING_QUERIES):
    """Object ref of (vectors, faiss ids) of ``count`` faces drawn from the training samples
    (``facelake.index.train.sample_faces``): what shard tasks find the nearest of."""
    return _tuning_queries_task.remote(count, *samples)


def tuning_probes(xq: np.ndarray, qids: np.ndarray, nearest: list[Result],
                  seed: int = 2, turn: float = TUNING_TURN) -> np.ndarray:
    """New-photo stand-ins for tuning: each sample face turned, in a random direction on the unit
    sphere, by ``turn`` of the angle between it and its nearest other face of the collection.

    A face of the collection is too easy a probe: it sits exactly where its neighbours are, so
    its recall saturated at small nprobe (bench/scale.py at 2M: 0.998 at nprobe 4 on sample
    faces, 0.970 at nprobe 16 on new photos). A new photo of an archived person differs from the
    archived ones about as much as they differ from each other; the stand-ins move most of
    that way (calibration in facelake.index.params). ``nearest`` holds each shard's exact top-2
    of ``xq`` (the face itself and its nearest).
    """
    D, I = merge_topk(nearest, 2)
    D = np.where(I == qids[:, None], -np.inf, D).max(axis=1)     # the nearest face other than itself
    cosine = np.cos(turn * np.arccos(np.clip(np.where(np.isfinite(D), D, 0.0), -1.0, 1.0)))[:, None]
    rng = np.random.default_rng(seed)
    turn = rng.standard_normal(xq.shape).astype(np.float32)
    turn -= (turn * xq).sum(axis=1, keepdims=True) * xq             # orthogonal to the face
    turn /= np.maximum(np.linalg.norm(turn, axis=1, keepdims=True), 1e-12)
    probes = cosine * xq + np.sqrt(1.0 - cosine ** 2) * turn
    return np.ascontiguousarray(probes / np.linalg.norm(probes, axis=1, keepdims=True), np.float32)


def tune_shard(shard: LoadedShard, xq: np.ndarray, nlist: int, k: int = TUNING_K) -> dict:
    """Exact top-k of ``xq`` over a loaded shard, and its top-k as searched at each nprobe of the
    ladder (re-ranked as searches are)."""
    if shard.vectors is not None:
        D, rows = faiss.knn(xq, np.ascontiguousarray(shard.vectors, np.float32), k,
                            metric=faiss.METRIC_INNER_PRODUCT)
        exact = (D, np.where(rows >= 0, shard.faiss_ids[np.maximum(rows, 0)], -1))
    else:                                                  # IVF-Flat: scanning every list is exact
        exact = search_shard(shard.index, xq, k, nlist)
    return {"exact": exact, "approx": {p: search_reranked(shard, xq, k, p) for p in nprobe_ladder(nlist)}}


@ray.remote
def _tune_task(handle: VersionHandle, shard_no: int, xq: np.ndarray) -> dict:
    """Exact and per-nprobe top-k of the tuning probes over one written shard (``tune_shard``)."""
    faiss.omp_set_num_threads(1)
    return tune_shard(open_shard(handle, shard_no), xq, handle.nlist)


def recall_curve(tuned: list[dict], nlist: int, k: int = TUNING_K) -> dict[int, float]:
    """recall@k per nprobe of the tuning probes, merged over every shard's ``tune_shard`` result."""
    truth = merge_topk([t["exact"] for t in tuned], k)[1]
    valid = int((truth >= 0).sum())
    curve = {}
    for nprobe in nprobe_ladder(nlist):
        found = merge_topk([t["approx"][nprobe] for t in tuned], k)[1]
        hits = sum(len(np.intersect1d(f[f >= 0], t[t >= 0])) for f, t in zip(found, truth))
        curve[nprobe] = round(hits / max(1, valid), 4)
    return curve


def choose_nprobe(curve: dict[int, float], nlist: int, target: float = TARGET_RECALL) -> int:
    """The smallest nprobe whose measured recall@10 on the tuning probes reaches ``target``; when
    none does (compressed shards level off below it, and scanning more lists can even lower
    their recall: more PQ candidates compete for the re-ranked short list), the smallest within
    SATURATION_SLACK of the best measured."""
    best = max(curve.values())
    goal = min(target, best - SATURATION_SLACK) if best < target else target
    for nprobe in sorted(curve):
        if curve[nprobe] >= goal:
            return min(nlist, nprobe)
    return min(nlist, max(curve))


def tune(handle: VersionHandle, tuning, results: list[dict], nprobe: int | None, target_recall: float) -> dict:
    """nprobe (and how it was chosen) for a written, unpublished version: recall@10 of the tuning
    probes (``tuning_probes``) at each nprobe, searched in one Ray task per shard. ``tuning``:
    the ref of ``tuning_queries``; ``results``: the shard tasks' results, in shard order."""
    xq, qids = ray.get(tuning)
    probes = tuning_probes(xq, qids, [r["nearest"] for r in results if "nearest" in r])
    probes_ref = ray.put(probes)
    tuned = ray.get([_tune_task.options(num_cpus=1).remote(handle, i, probes_ref)
                     for i, r in enumerate(results) if r["count"]])
    curve = recall_curve(tuned, handle.nlist)
    return {"nprobe": nprobe or choose_nprobe(curve, handle.nlist, target_recall),
            "nprobe_how": ("explicit --nprobe" if nprobe else f"the smallest with recall@10 >= {target_recall} "
                           f"(or within {SATURATION_SLACK} of the best) on new-photo stand-ins of sample faces"),
            "tuning": {"queries": int(len(probes)), "k": TUNING_K, "probes": "sample faces turned as far as their "
                       "nearest face", "recall_at_10": {str(k): v for k, v in curve.items()}, "target": target_recall}}
