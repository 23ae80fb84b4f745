"""Verification scores and rates (numpy only): genuine and impostor similarities, ROC, TAR at FAR.

A comparison matches at threshold t when its similarity (cosine) is >= t. Tested in
tests/test_evaluate.py.
"""

from __future__ import annotations

import math

import numpy as np

# Impostor pairs beyond this many are sampled (seeded) rather than all enumerated: 10M pairs
# certify FMR down to ~3e-7 and cost ~40 MB of float32 scores.
DEFAULT_MAX_IMPOSTOR_PAIRS = 10_000_000
VERIFICATION_FARS = (1e-1, 1e-2, 1e-3, 1e-4, 1e-5)
DEFAULT_SEED = 0
# Sampled impostor pairs are scored this many at a time (bounds the gathered rows' memory).
_SAMPLE_CHUNK = 1 << 20


def genuine_scores(embeddings: np.ndarray, identities: np.ndarray) -> np.ndarray:
    """Similarity of every pair of photos of the same identity (i < j)."""
    order = np.argsort(identities, kind="stable")
    ids_sorted = identities[order]
    starts = np.flatnonzero(np.r_[True, ids_sorted[1:] != ids_sorted[:-1]])
    ends = np.r_[starts[1:], len(ids_sorted)]
    out = []
    for a, b in zip(starts, ends):
        if b - a < 2:
            continue
        block = embeddings[order[a:b]]
        sims = block @ block.T
        out.append(sims[np.triu_indices(b - a, 1)])
    return np.concatenate(out).astype(np.float32) if out else np.zeros(0, np.float32)


def impostor_scores(embeddings: np.ndarray, identities: np.ndarray, *, max_pairs: int,
                    seed: int = DEFAULT_SEED, block: int = 2048) -> tuple[np.ndarray, bool]:
    """Similarity of impostor pairs: all of them when there are at most ``max_pairs``, else a
    seeded uniform sample (with replacement) of ``max_pairs``. Returns (scores, sampled)."""
    n = len(identities)
    _, codes, counts = np.unique(identities, return_inverse=True, return_counts=True)
    total = n * (n - 1) // 2 - int((counts * (counts - 1) // 2).sum())
    if total <= max_pairs:
        out = []
        for start in range(0, n, block):
            sims = embeddings[start:start + block] @ embeddings.T
            rows = np.arange(start, min(n, start + block))[:, None]
            mask = (np.arange(n)[None, :] > rows) & (codes[start:start + block, None] != codes[None, :])
            out.append(sims[mask])
        return (np.concatenate(out).astype(np.float32) if out else np.zeros(0, np.float32)), False
    rng = np.random.default_rng(seed)
    scores = []
    have = 0
    while have < max_pairs:
        want = int((max_pairs - have) * 1.2) + 1000
        i = rng.integers(0, n, want)
        j = rng.integers(0, n, want)
        keep = codes[i] != codes[j]
        i, j = i[keep][:max_pairs - have], j[keep][:max_pairs - have]
        for s in range(0, len(i), _SAMPLE_CHUNK):
            scores.append(np.einsum("ij,ij->i", embeddings[i[s:s + _SAMPLE_CHUNK]], embeddings[j[s:s + _SAMPLE_CHUNK]]))
        have += len(i)
    return np.concatenate(scores).astype(np.float32), True


def roc(genuine: np.ndarray, impostor: np.ndarray, points: int = 2000) -> dict[str, np.ndarray]:
    """FMR, TAR and thresholds at up to ``points`` thresholds (all distinct tail scores kept)."""
    imp = np.sort(impostor)
    gen = np.sort(genuine)
    # thresholds: the impostor tail at every order statistic up to 1000, then quantiles
    tail = imp[::-1][:min(len(imp), 1000)]
    quant = np.quantile(np.r_[imp, gen] if len(gen) else imp, np.linspace(0, 1, points))
    thresholds = np.unique(np.r_[tail, quant, np.nextafter(imp[-1], np.inf)])
    fmr = (len(imp) - np.searchsorted(imp, thresholds, side="left")) / len(imp)
    fnmr = np.searchsorted(gen, thresholds, side="left") / max(1, len(gen))
    return {"threshold": thresholds, "fmr": fmr, "fnmr": fnmr, "tar": 1 - fnmr}


def empirical_threshold(impostor: np.ndarray, far: float) -> float:
    """The lowest threshold at which at most floor(far * n) impostor scores match."""
    return _threshold_of_sorted(np.sort(impostor), far)


def _threshold_of_sorted(ascending: np.ndarray, far: float) -> float:
    """``empirical_threshold`` of scores already sorted ascending."""
    n = len(ascending)
    allowed = int(math.floor(far * n))
    # accept s >= t; with t just above the allowed-th highest impostor, at most `allowed` pass
    return float(np.nextafter(ascending[n - 1 - allowed], np.inf)) if allowed < n else float(ascending[0])


def tar_at_far(genuine: np.ndarray, impostor: np.ndarray, fars=VERIFICATION_FARS) -> list[dict]:
    """TAR at each FAR (empirical: the lowest threshold with measured FAR <= target), where the
    impostor pairs can show it (at least 1/FAR of them); otherwise 'insufficient impostors'."""
    imp = np.sort(impostor)
    gen = np.sort(genuine)
    out = []
    for far in fars:
        if int(math.floor(far * len(imp))) < 1:
            out.append({"far": far, "tar": None, "threshold": None, "n_impostor": len(imp),
                        "note": f"insufficient impostors ({len(imp):,} < {math.ceil(1 / far):,})"})
            continue
        t = _threshold_of_sorted(imp, far)
        measured = float((len(imp) - np.searchsorted(imp, t, side="left")) / len(imp))
        tar = 1.0 - np.searchsorted(gen, t, side="left") / max(1, len(gen))
        out.append({"far": far, "tar": float(tar), "threshold": t, "measured_far": measured,
                    "n_impostor": len(imp), "n_genuine": len(gen)})
    return out
