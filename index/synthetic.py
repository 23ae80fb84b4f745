"""Synthetic clustered unit vectors standing in for face embeddings (tests and benchmarks).

Face embeddings are lumpy in two levels: photos of one person sit close together (cosine about
0.6 to 0.8), and people form broader groups. ``clustered`` draws group centres, person centres
around them, then photos around those, and L2-normalises everything, so IVF recall measured on
it is not flattered by one easy level of clusters nor ruined by uniform noise.
"""

from __future__ import annotations

import numpy as np

PER_PERSON = 10        # photos per synthetic person
PER_GROUP = 1000       # photos per broad group
GROUP_SPREAD = 1.0     # person centres around their group centre
PHOTO_SPREAD = 0.8     # photos around their person: cosine to the person ~0.78


def _unit(x: np.ndarray) -> np.ndarray:
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    return x


def clustered(n: int, dim: int, *, seed: int = 0) -> np.ndarray:
    """``n`` L2-normalised float32 vectors of size ``dim``: groups -> persons -> photos."""
    rng = np.random.default_rng(seed)
    groups = _unit(rng.standard_normal((max(1, n // PER_GROUP), dim), dtype=np.float32))
    persons = max(1, n // PER_PERSON)
    centres = groups[rng.integers(0, len(groups), persons)]
    centres = _unit(centres + rng.standard_normal(centres.shape, dtype=np.float32) * (GROUP_SPREAD / np.sqrt(dim)))
    out = np.empty((n, dim), np.float32)
    step = 1 << 16
    for start in range(0, n, step):
        stop = min(n, start + step)
        block = centres[rng.integers(0, persons, stop - start)]
        block = block + rng.standard_normal(block.shape, dtype=np.float32) * (PHOTO_SPREAD / np.sqrt(dim))
        out[start:stop] = _unit(block)
    return out


def queries(xb: np.ndarray, nq: int, *, seed: int = 1) -> np.ndarray:
    """``nq`` probes near random base vectors (new photos of people already in the gallery)."""
    rng = np.random.default_rng(seed)
    picks = xb[rng.integers(0, len(xb), nq)]
    xq = picks + rng.standard_normal(picks.shape, dtype=np.float32) * (PHOTO_SPREAD / np.sqrt(xb.shape[1]))
    return np.ascontiguousarray(_unit(xq), np.float32)


def recall_at_k(found: np.ndarray, exact: np.ndarray, k: int = 10) -> float:
    """Share of the exact top-k ids found in the approximate top-k (the usual recall@k)."""
    hits = sum(len(np.intersect1d(f[:k], e[:k][e[:k] >= 0])) for f, e in zip(found, exact))
    return hits / max(1, int((exact[:, :k] >= 0).sum()))
