"""Evaluation protocols over labeled embeddings (numpy only): an LFW-format pairs file with k-fold
accuracy, 1:N identification on a seeded gallery split, and error rates per group.

Tested in tests/test_evaluate.py; the LFW run is bench/eval.py.
"""

from __future__ import annotations

import math

import numpy as np

from facelake import storage
from facelake.calibration import Calibration, CalibrationError, wilson_upper
from facelake.errors import ConfigError
from facelake.evaluation.embeddings import LabeledEmbeddings
from facelake.evaluation.metrics import empirical_threshold, genuine_scores, impostor_scores, tar_at_far

IDENTIFICATION_FPIRS = (1e-1, 1e-2, 1e-3)
RANKS = (1, 10)
# Share of identities held out of the gallery to supply non-mated probes.
DEFAULT_NON_MATED_FRACTION = 0.3

Pairs = list[tuple[str, str, bool]]  # (photo a, photo b, same identity)


def read_pairs(uri: str) -> tuple[Pairs, np.ndarray, int]:
    """Parse an LFW pairs.txt: header 'folds n', then n same and n different pairs per fold.

    Same: 'Name i j'; different: 'Name1 i Name2 j'. Returns ([(a, b, same)], fold per pair, folds)
    with photo keys 'Name_000i'.
    """
    lines = [ln.split() for ln in storage.read_bytes(uri).decode().splitlines() if ln.strip()]
    try:
        folds, per = int(lines[0][0]), int(lines[0][1])
        pairs = []
        for parts in lines[1:]:
            if len(parts) == 3:
                pairs.append((f"{parts[0]}_{int(parts[1]):04d}", f"{parts[0]}_{int(parts[2]):04d}", True))
            elif len(parts) == 4:
                pairs.append((f"{parts[0]}_{int(parts[1]):04d}", f"{parts[2]}_{int(parts[3]):04d}", False))
            else:
                raise ValueError(f"line {' '.join(parts)!r} has {len(parts)} fields, not 3 or 4")
    except (IndexError, ValueError) as err:
        raise ConfigError(f"{storage.redact(uri)} is not an LFW-format pairs file ({err}): expected a "
                          "'folds n' header, then 'Name i j' (same) and 'Name1 i Name2 j' (different) lines") from err
    if len(pairs) != folds * 2 * per:
        raise ConfigError(f"{storage.redact(uri)} declares {folds} folds x {2 * per} pairs but holds {len(pairs)}")
    return pairs, np.arange(len(pairs)) // (2 * per), folds


def best_threshold(scores: np.ndarray, same: np.ndarray) -> float:
    """The threshold that maximises accuracy on these pairs (midpoint between adjacent scores)."""
    order = np.argsort(scores)
    s, y = scores[order], same[order]
    # accept s >= t. Placing t just below s[k]: accepted = k.., correct = (#diff below) + (#same from k)
    diff_below = np.r_[0, np.cumsum(~y)]
    same_from = np.r_[np.cumsum(y[::-1])[::-1], 0]
    k = int(np.argmax(diff_below + same_from))
    if k == 0:
        return float(s[0]) - 1e-6
    if k == len(s):
        return float(s[-1]) + 1e-6
    return float((s[k - 1] + s[k]) / 2)


def pairs_protocol(emb: LabeledEmbeddings, pairs: Pairs, fold_of: np.ndarray, folds: int,
                   uris: dict[str, int]) -> dict:
    """k-fold verification accuracy on given pairs: threshold chosen on k-1 folds, tested on the
    held-out one. ``uris`` maps a pair's photo key to its row in ``emb``. A pair with a failed
    photo counts as an error ('strict', the headline figure); 'excluding_failed' drops such pairs."""
    same = np.array([p[2] for p in pairs], bool)
    idx_a = np.array([uris.get(p[0], -1) for p in pairs])
    idx_b = np.array([uris.get(p[1], -1) for p in pairs])
    unknown = int(((idx_a < 0) | (idx_b < 0)).sum())
    ok = emb.ok
    valid = (idx_a >= 0) & (idx_b >= 0)
    valid[valid] &= ok[idx_a[valid]] & ok[idx_b[valid]]
    scores = np.full(len(pairs), np.nan)
    scores[valid] = np.einsum("ij,ij->i", emb.embeddings[idx_a[valid]], emb.embeddings[idx_b[valid]])
    strict, excluding, thresholds = [], [], []
    for k in range(folds):
        train = (fold_of != k) & valid
        test = fold_of == k
        t = best_threshold(scores[train], same[train])
        thresholds.append(t)
        correct = valid[test] & ((scores[test] >= t) == same[test])
        strict.append(float(correct.sum() / test.sum()))
        tv = test & valid
        excluding.append(float((((scores[tv] >= t) == same[tv]).sum()) / max(1, tv.sum())))
    gen, imp = scores[valid & same], scores[valid & ~same]
    return {
        "pairs": len(pairs), "folds": folds, "pairs_with_failed_photo": int((~valid).sum()),
        "pairs_with_unknown_photo": unknown,
        "accuracy": float(np.mean(strict)), "accuracy_std": float(np.std(strict)),
        "accuracy_excluding_failed": float(np.mean(excluding)),
        "fold_accuracy": strict, "fold_thresholds": thresholds,
        "failed_pair_rule": "a pair with a photo that failed (no usable face) counts as an error in 'accuracy'; "
                            "'accuracy_excluding_failed' leaves such pairs out",
        "tar_at_far": tar_at_far(gen, imp),
        "genuine_mean": float(gen.mean()) if len(gen) else None,
        "impostor_mean": float(imp.mean()) if len(imp) else None,
        "_genuine": gen, "_impostor": imp,
    }


def identification(emb: LabeledEmbeddings, *, non_mated_fraction: float, seed: int,
                   calibration: Calibration | None = None) -> dict:
    """1:N: one photo of each enrolled identity in the gallery, one other photo of it as a mated
    probe; every photo of the held-out identities is a non-mated probe.

    A mated search succeeds at rank R when the mate is among the R highest scores; FNIR at a
    threshold counts a mated search as missed unless its mate is at rank 1 with score >= threshold.
    FPIR is the share of non-mated searches whose top score is >= threshold.
    """
    ok = emb.ok
    ids, vectors = emb.identities[ok], emb.embeddings[ok]
    split = _gallery_split(ids, non_mated_fraction, seed)
    if split is None:
        return {"note": "too few identities for an identification split"}
    gallery, mated, non_mated, held_out = split
    result: dict = {"gallery_size": len(gallery), "mated_probes": len(mated), "non_mated_probes": len(non_mated),
                    "enrolled_identities": len(gallery), "held_out_identities": held_out, "seed": seed}
    if not mated:
        result["note"] = "no enrolled identity has a second photo to probe with"
        return result
    g, gallery_ids = vectors[gallery], ids[gallery]
    sims = vectors[mated] @ g.T
    mate_col = np.array([np.flatnonzero(gallery_ids == ids[p])[0] for p in mated])
    mate_score = sims[np.arange(len(mated)), mate_col]
    rank = 1 + (sims > mate_score[:, None]).sum(axis=1)
    for r in RANKS:
        result[f"rank{r}"] = float((rank <= r).mean())
        if r > len(gallery):
            result[f"rank{r}_note"] = f"gallery has only {len(gallery)} entries"
    top_non = (vectors[non_mated] @ g.T).max(axis=1) if non_mated else np.zeros(0)
    result["fnir_at_fpir"] = _fnir_at_fpir(rank == 1, mate_score, top_non)
    if calibration is not None:
        result["calibrated_thresholds"] = _calibrated_fnir(calibration, len(gallery), rank == 1, mate_score, top_non)
    result["_mate_score"], result["_top_non_mated"] = mate_score, top_non
    return result


def _gallery_split(ids: np.ndarray, non_mated_fraction: float, seed: int
                   ) -> tuple[list[int], list[int], list[int], int] | None:
    """Seeded (gallery rows, mated probe rows, non-mated probe rows, held-out identities), or
    None when every identity would be held out."""
    rng = np.random.default_rng(seed)
    names = np.unique(ids)
    rng.shuffle(names)
    multi = {n for n, c in zip(*np.unique(ids, return_counts=True)) if c >= 2}
    held = set(names[:max(1, int(round(len(names) * non_mated_fraction)))].tolist())
    if len(held) == len(names):
        return None
    by_id: dict[str, list[int]] = {}
    for i, name in enumerate(ids):
        by_id.setdefault(name, []).append(i)
    gallery, mated = [], []
    for name in names:
        if name in held:
            continue
        photos = rng.permutation(by_id[name])
        gallery.append(photos[0])
        if name in multi:
            mated.append(photos[1])
    non_mated = [i for name in held for i in by_id[name]]
    return gallery, mated, non_mated, len(held)


def _fnir_at_fpir(at_rank1: np.ndarray, mate_score: np.ndarray, top_non: np.ndarray) -> list[dict]:
    """FNIR at the lowest threshold whose measured FPIR is at most each target."""
    rows = []
    for fpir in IDENTIFICATION_FPIRS:
        if int(math.floor(fpir * len(top_non))) < 1:
            rows.append({"fpir": fpir, "fnir": None,
                         "note": f"insufficient non-mated probes ({len(top_non)} < {math.ceil(1 / fpir)})"})
            continue
        t = empirical_threshold(top_non, fpir)
        rows.append({"fpir": fpir, "threshold": t, "fnir": float(1 - (at_rank1 & (mate_score >= t)).mean()),
                     "measured_fpir": float((top_non >= t).mean())})
    return rows


def _calibrated_fnir(calibration: Calibration, gallery_size: int, at_rank1: np.ndarray, mate_score: np.ndarray,
                     top_non: np.ndarray) -> list[dict]:
    """FNIR and measured FPIR at the calibration's threshold for each FPIR target at this gallery size."""
    rows = []
    for fpir in IDENTIFICATION_FPIRS:
        try:
            t = calibration.threshold_for_fpir(fpir, gallery_size)
        except CalibrationError as err:
            rows.append({"fpir": fpir, "threshold": None, "note": str(err)})
            continue
        rows.append({"fpir": fpir, "threshold": t,
                     "measured_fpir": float((top_non >= t).mean()) if len(top_non) else None,
                     "fnir": float(1 - (at_rank1 & (mate_score >= t)).mean())})
    return rows


def by_group(emb: LabeledEmbeddings, threshold: float, *, max_pairs: int, seed: int) -> list[dict]:
    """FMR and FNMR within each group at one threshold (pairs with both photos in the group)."""
    ok = emb.ok
    rows = []
    for name in sorted({g for g in emb.groups[ok] if g is not None}):
        mask = ok & (emb.groups == name)
        vectors, ids = emb.embeddings[mask], emb.identities[mask]
        gen = genuine_scores(vectors, ids)
        imp, sampled = impostor_scores(vectors, ids, max_pairs=max_pairs, seed=seed)
        k = int((imp >= threshold).sum())
        rows.append({
            "group": name, "photos": int(mask.sum()), "identities": int(len(np.unique(ids))),
            "genuine_pairs": len(gen), "impostor_pairs": len(imp), "impostor_sampled": sampled,
            "fnmr": float((gen < threshold).mean()) if len(gen) else None,
            "fmr": float(k / len(imp)) if len(imp) else None,
            "impostors_above": k,
            "fmr_upper95": float(wilson_upper(k, len(imp))) if len(imp) else None,
        })
    return rows
