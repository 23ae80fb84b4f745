"""Every metric of one evaluation from labeled embeddings (numpy only): verification over all
pairs, the pairs-file protocol, identification, the calibration and, with groups, rates per group.

Tested in tests/test_evaluate.py.
"""

from __future__ import annotations

import time

import numpy as np

from facelake.calibration import Calibration, CalibrationError
from facelake.evaluation.embeddings import FaceChoice, LabeledEmbeddings
from facelake.evaluation.metrics import (DEFAULT_MAX_IMPOSTOR_PAIRS, DEFAULT_SEED, empirical_threshold,
                                         genuine_scores, impostor_scores, tar_at_far)
from facelake.evaluation.protocols import (DEFAULT_NON_MATED_FRACTION, Pairs, by_group, identification,
                                           pairs_protocol)
from facelake.faces.registry import get_model

# Per-comparison FMR at which group-by rates are compared (and calibration thresholds shown).
DEFAULT_GROUP_FMR = 1e-3


def evaluate_embeddings(emb: LabeledEmbeddings, *, model: str | None = None, dataset: str,
                        pairs: tuple[Pairs, np.ndarray, int] | None = None,
                        max_impostor_pairs: int = DEFAULT_MAX_IMPOSTOR_PAIRS,
                        non_mated_fraction: float = DEFAULT_NON_MATED_FRACTION,
                        group_fmr: float = DEFAULT_GROUP_FMR, seed: int = DEFAULT_SEED,
                        face: FaceChoice = "largest") -> tuple[dict, Calibration]:
    """All metrics from labeled embeddings. ``pairs`` is what ``read_pairs`` returns. Returns
    (metrics, calibration); keys starting with '_' hold score arrays for plots, which
    ``facelake.evaluation.report`` leaves out of JSON.
    """
    spec = get_model(model)
    ok = emb.ok
    started = time.monotonic()
    vectors, ids = emb.embeddings[ok], emb.identities[ok]
    gen = genuine_scores(vectors, ids)
    imp, sampled = impostor_scores(vectors, ids, max_pairs=max_impostor_pairs, seed=seed)
    notes = (f"{len(gen):,} genuine pairs (all) and {len(imp):,} impostor pairs "
             f"({'seeded sample, seed %d' % seed if sampled else 'all'}) of the {face} face per photo")
    calibration = Calibration.from_scores(gen, imp, model=spec, dataset=dataset, notes=notes)
    metrics: dict = {
        "model": spec.name, "recognizer": spec.recognizer, "detector": spec.detector,
        "weights_sha256": calibration.weights_sha256, "dataset": dataset, "face": face,
        "photos": {"labeled": len(ids) + int((~ok).sum()), "embedded": int(ok.sum()), "failed": int((~ok).sum()),
                   "failed_by_type": emb.errors, "unlabeled_skipped": emb.unlabeled,
                   "identities": int(len(np.unique(ids)))},
        "embed_seconds": emb.embed_seconds,
        "verification": {
            "genuine_pairs": len(gen), "impostor_pairs": len(imp), "impostor_sampled": sampled, "seed": seed,
            "genuine_mean": float(gen.mean()) if len(gen) else None, "impostor_mean": float(imp.mean()),
            "tar_at_far": tar_at_far(gen, imp),
            "_genuine": gen, "_impostor": imp,
        },
        "calibration": {"rows": len(calibration.thresholds), "min_certified_fmr": calibration.min_certified_fmr,
                        "thresholds_by_fmr": calibration.table()},
    }
    if pairs is not None:
        position = {image_id: i for i, image_id in enumerate(emb.image_ids)}
        metrics["pairs_protocol"] = pairs_protocol(emb, pairs[0], pairs[1], pairs[2], position)
    metrics["identification"] = identification(emb, non_mated_fraction=non_mated_fraction, seed=seed,
                                               calibration=calibration)
    if emb.groups is not None:
        threshold, how = _group_threshold(calibration, imp, group_fmr)
        metrics["by_group"] = {"threshold": threshold, "threshold_rule": how,
                               "groups": by_group(emb, threshold, max_pairs=max_impostor_pairs, seed=seed)}
    metrics["measure_seconds"] = round(time.monotonic() - started, 3)
    return metrics, calibration


def _group_threshold(calibration: Calibration, impostor: np.ndarray, fmr: float) -> tuple[float, str]:
    """The threshold groups are compared at, and how it was chosen."""
    try:
        threshold = calibration.threshold_for_fmr(fmr)
        return threshold, f"calibration threshold for FMR {fmr:g} (95% upper bound) over all pairs"
    except CalibrationError:
        # too few impostors to certify the target: the lowest threshold with measured FMR <= target
        return (float(empirical_threshold(impostor, fmr)),
                f"lowest threshold with measured FMR <= {fmr:g} over all pairs (the calibration "
                f"cannot certify {fmr:g} on {len(impostor):,} impostor pairs)")
