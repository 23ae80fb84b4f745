"""Live-gallery calibration: FPIR measured by searching non-mated probes against the gallery itself.

The shipped table (calibration.shipped) measures FMR per comparison on a labeled set and turns it
into an FPIR at a gallery size through FPIR = 1 - (1 - FMR)**N; at archive sizes that needs an FMR
far below what any labeled set certifies. ``GalleryCalibration`` measures FPIR directly, the way
NIST FRTE 1:N does: `facelake calibrate` searches probes of people known not to be in the gallery
(non-mated) against one index version and keeps, per search, the highest similarity of a
candidate that is not the probe's identity (``nonmated_max``). FPIR(t) is the share of searches
whose highest non-mated score is >= t, bounded above by the exact one-sided 95% Clopper-Pearson
bound (1 - 0.05**(1/n) at zero events: the rule of three, ~3/n). About 3,000 non-mated searches
without a false candidate certify FPIR <= 1e-3 whatever the gallery size.

Beyond the measured range (a target FPIR below ~3/n) ``tail`` fits a generalised Pareto
distribution to the highest scores (peaks over threshold, the extreme-value method of ISO/IEC
5152; calibration.stats) and ``extrapolated_threshold`` chooses a threshold from it with a
bootstrap confidence interval. Only on request (--allow-extrapolation), and always labelled.
Saved under ROOT/calibration/ (calibration.store). Tested in tests/test_calibration.py and
tests/test_calibrate.py.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime, timezone

import numpy as np

from facelake.calibration import formats
from facelake.calibration.stats import (CONFIDENCE, CalibrationError, TailFit, clopper_pearson_upper, fit_tail,
                                        fpir_at_calibrated_size, most_events_within, searches_needed,
                                        threshold_grid)
from facelake.faces.registry import ModelSpec, get_model, weights_fingerprint

# A gallery calibration serves index versions of the same model and weights whose gallery size is
# within this fraction of the calibrated size (a nightly rebuild adds far less); beyond it, run
# `facelake calibrate` again. Growth within the margin is accounted for: the target FPIR is
# tightened by the ratio of sizes (FPIR_cal = 1 - (1 - FPIR)**(N_cal / N)).
GALLERY_MARGIN = 0.10
EXTRAPOLATED = "extrapolated"


def within_margin(calibrated_size: int, gallery_size: int, margin: float = GALLERY_MARGIN) -> bool:
    """Whether a gallery of ``gallery_size`` faces is within ``margin`` of the calibrated size."""
    return abs(gallery_size - calibrated_size) <= margin * calibrated_size


@dataclass
class GalleryCalibration:
    """FPIR vs threshold measured on one index version by non-mated searches (``facelake calibrate``)."""

    model: str
    recognizer: str
    detector: str
    weights_sha256: str
    index_version: str
    gallery_size: int
    nprobe: int
    top_k: int
    scores: np.ndarray               # highest non-mated similarity per search, descending
    identity_column: str | None = None
    excluded_same_identity: int = 0  # candidates skipped because they were the probe's identity
    saturated: int = 0               # searches whose top_k were all the probe's identity (score = k-th)
    probes: dict = field(default_factory=dict)
    job_id: str = ""
    confidence: float = CONFIDENCE
    notes: list = field(default_factory=list)
    created: str = field(default_factory=lambda: datetime.now(timezone.utc).isoformat(timespec="seconds"))
    source: str = ""                 # where it was read from (not saved)
    _tail: TailFit | None = field(default=None, repr=False)

    # ---- the table --------------------------------------------------------------------------
    @property
    def n_searches(self) -> int:
        return len(self.scores)

    @property
    def thresholds(self) -> np.ndarray:
        """Every measured score and the first value above them all, ascending: the exact points
        where the count of false-positive searches changes."""
        finite = self.scores[np.isfinite(self.scores)]
        if not len(finite):
            return np.array([-1.0])
        return np.unique(np.append(finite, np.nextafter(finite.max(), np.inf)))

    def false_positives(self, t: np.ndarray | float) -> np.ndarray:
        """Searches with a non-mated candidate at or above t."""
        asc = np.sort(self.scores)
        return len(asc) - np.searchsorted(asc, np.asarray(t, np.float64), side="left")

    def fpir(self, t: np.ndarray | float) -> np.ndarray:
        return self.false_positives(t) / max(1, self.n_searches)

    def fpir_upper(self, t: np.ndarray | float) -> np.ndarray:
        """One-sided 95% Clopper-Pearson upper bound on FPIR at t (non-increasing in t)."""
        return clopper_pearson_upper(self.false_positives(t), self.n_searches, self.confidence)

    @property
    def min_certified_fpir(self) -> float:
        return float(clopper_pearson_upper(0, self.n_searches, self.confidence))

    def fmr_at(self, similarity):
        """Per-comparison false-match rate at a similarity implied by the measured FPIR bound:
        1 - (1 - FPIR_upper)**(1/N) over this gallery's N faces (independent comparisons assumed).
        Accepts a scalar or an array, like ``Calibration.fmr_at``; NaN stays NaN."""
        values = np.asarray(similarity, np.float64)
        upper = np.minimum(self.fpir_upper(np.nan_to_num(values, nan=1.0)), 1.0 - 1e-16)
        result = -np.expm1(np.log1p(-upper) / max(1, self.gallery_size))
        result = np.where(np.isnan(values), np.nan, result)
        return float(result) if result.ndim == 0 else result

    def rows(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """A readable table for the file: thresholds (the grid of the shipped tables), false-positive
        searches at or above each, and their upper FPIR bounds."""
        finite = self.scores[np.isfinite(self.scores)]
        grid = threshold_grid(np.array([]), finite) if len(finite) else np.array([-1.0])
        counts = self.false_positives(grid)
        return grid, counts, clopper_pearson_upper(counts, self.n_searches, self.confidence)

    # ---- choosing thresholds ----------------------------------------------------------------
    def threshold_for_fpir(self, target_fpir: float, gallery_size: int | None = None) -> float:
        """The lowest measured threshold whose 95% upper FPIR bound is <= the target (tightened for
        a gallery larger than the calibrated one). Raises CalibrationError beyond the measured range."""
        if not 0.0 < target_fpir < 1.0:
            raise CalibrationError(f"target FPIR must be between 0 and 1 (exclusive), got {target_fpir}")
        want = fpir_at_calibrated_size(target_fpir, gallery_size or self.gallery_size, self.gallery_size)
        k = most_events_within(want, self.n_searches, self.confidence)
        if k < 0:
            raise CalibrationError(
                f"FPIR {target_fpir:.3g} is below what the live-gallery calibration of index version "
                f"{self.index_version} can certify: its {self.n_searches:,} non-mated searches bound FPIR at "
                f"{self.min_certified_fpir:.3g} at best ({self.confidence:.0%} confidence; about "
                f"{searches_needed(want, self.confidence):,} searches would certify it). Raise --max-fpir, run "
                f"`facelake calibrate` with more non-mated probes, or pass --allow-extrapolation to use the "
                f"fitted tail")
        grid = self.thresholds                      # count(t) <= k exactly when t > the (k+1)-th highest score
        if k >= self.n_searches:
            return float(grid[0])
        return float(grid[np.searchsorted(grid, self.scores[k], side="right")])

    def tail(self) -> TailFit:
        if self._tail is None:
            self._tail = fit_tail(self.scores[np.isfinite(self.scores)])
        return self._tail

    def extrapolated_threshold(self, target_fpir: float, gallery_size: int | None = None) -> dict:
        """A threshold beyond the measured range from the fitted tail: the lowest t whose bootstrap
        upper FPIR bound is <= the target. Returns the threshold, FPIR point estimate, interval and fit,
        labelled "extrapolated"."""
        want = fpir_at_calibrated_size(target_fpir, gallery_size or self.gallery_size, self.gallery_size)
        tail = self.tail()
        top = float(np.nanmax(self.scores))
        grid = np.round(np.arange(tail.u, 1.0 + 1e-4, 1e-4), 4)
        low, high = tail.interval(grid, self.confidence)
        ok = np.flatnonzero((high <= want) & (grid > top))
        if len(ok) == 0:
            raise CalibrationError(
                f"even the fitted impostor tail cannot bound FPIR at {target_fpir:.3g} below similarity 1.0 "
                f"for index version {self.index_version}: raise --max-fpir or calibrate with more probes")
        i = int(ok[0])
        return {"label": EXTRAPOLATED, "threshold": float(grid[i]), "target_fpir": target_fpir,
                "target_fpir_at_calibrated_size": want, "fpir_estimate": float(tail.fpir(grid[i])),
                "fpir_interval": [float(low[i]), float(high[i])], "interval_confidence": self.confidence,
                "measured_up_to": top, "tail": tail.to_dict()}

    # ---- which versions it serves ------------------------------------------------------------
    def check_applies(self, *, model: str | ModelSpec | None, index_version: str, gallery_size: int,
                      margin: float = GALLERY_MARGIN) -> None:
        """Raise CalibrationError unless this calibration was measured with this model's weights on
        this index version, or on one whose gallery is within ``margin`` of ``gallery_size``."""
        spec = model if isinstance(model, ModelSpec) else get_model(model)
        want = (spec.name, spec.recognizer, spec.detector, weights_fingerprint(spec))
        have = (self.model, self.recognizer, self.detector, self.weights_sha256)
        if want != have:
            raise CalibrationError(
                f"live-gallery calibration {self.source or self.job_id} was measured for model {self.model} "
                f"(weights {self.weights_sha256[:12]}...), not for {spec.name} (weights {want[3][:12]}...): its "
                f"false-positive rates do not apply. Run `facelake calibrate --root ROOT NONMATED_MANIFEST` "
                f"for the live index")
        if index_version == self.index_version:
            return
        if not within_margin(self.gallery_size, gallery_size, margin):
            raise CalibrationError(
                f"live-gallery calibration {self.source or self.job_id} was measured on index version "
                f"{self.index_version} ({self.gallery_size:,} faces), not on {index_version} ({gallery_size:,} "
                f"faces): the galleries differ by more than {margin:.0%}. Run `facelake calibrate --root ROOT "
                f"NONMATED_MANIFEST` for the live version")

    def describe(self) -> str:
        return (f"live gallery: index version {self.index_version} ({self.gallery_size:,} faces), "
                f"{self.n_searches:,} non-mated searches, job {self.job_id}")

    def table(self, fpirs: tuple[float, ...] = (1e-1, 1e-2, 1e-3, 1e-4)) -> list[dict]:
        """Rows for a report: the threshold certified for each target FPIR (None if not certifiable)."""
        out = []
        for target in fpirs:
            try:
                t = self.threshold_for_fpir(target)
                out.append({"target_fpir": target, "threshold": t, "fpir": float(self.fpir(t)),
                            "fpir_upper95": float(self.fpir_upper(t))})
            except CalibrationError:
                out.append({"target_fpir": target, "threshold": None,
                            "note": f"needs more searches (best certified {self.min_certified_fpir:.2g})"})
        return out

    # ---- files (the format: calibration.formats; where they live: calibration.store) ---------
    def to_dict(self) -> dict:
        return formats.gallery_to_dict(self, GALLERY_MARGIN)

    @classmethod
    def from_dict(cls, data: dict, *, source: str = "gallery calibration") -> "GalleryCalibration":
        return cls(**formats.gallery_fields(data, source))


# ---- per-search scores from search results ----------------------------------------------------

def same_identity(I: np.ndarray, gallery_ids: np.ndarray, probe_ids: np.ndarray) -> np.ndarray:
    """(n, k) True where the candidate (faiss ids I) is the probe's own identity; a null identity
    never matches. ``gallery_ids`` is indexed by faiss id."""
    cand = gallery_ids[np.clip(I, 0, None)]
    same = (cand == probe_ids[:, None]) & (I >= 0)
    return same & np.array([[p is not None] for p in probe_ids])


def nonmated_max(D: np.ndarray, I: np.ndarray, same: np.ndarray | None) -> tuple[np.ndarray, int, int]:
    """Per search (row of similarities D, faiss ids I, best first): the highest score of a non-mated
    candidate; -1 when the search found nothing; the k-th score when every candidate was mated (an
    upper bound on the non-mated maximum). Also the candidates excluded as mated and the count of
    such saturated searches."""
    valid = I >= 0
    nonmated = valid if same is None else valid & ~same
    excluded = 0 if same is None else int((valid & same).sum())
    first = np.argmax(nonmated, axis=1)
    scores = np.where(nonmated.any(axis=1), D[np.arange(len(D)), first], -1.0)
    saturated = valid.all(axis=1) & ~nonmated.any(axis=1)
    return np.where(saturated, D[:, -1], scores).astype(np.float64), excluded, int(saturated.sum())
