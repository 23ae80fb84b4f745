"""Similarity -> measured false-match rate, and thresholds chosen by a target error rate.

A ``Calibration`` is built from the similarity scores of genuine pairs (two photos of one
person) and impostor pairs (two people) measured on a labeled data set, for one model and
detector. It is a table of thresholds; each row says how many impostor pairs scored at or above
it (a comparison *matches* at threshold ``t`` when ``similarity >= t``), the false-match rate per
comparison (FMR) that gives, a one-sided 95% upper confidence bound on it, and the genuine pairs
that fell below it (FNMR; TAR = 1 - FNMR).

Which number is reported: ``fmr_at`` and the threshold choosers use the **upper bound**, never
the point estimate, so that a score beyond the measured range (no impostor pair ever reached it)
reads as "below 3 in N" rather than 0, and a chosen threshold meets its target with 95%
confidence. The bound is Wilson's score interval, one-sided, except with zero impostor pairs
above a threshold, where it is the exact Clopper-Pearson bound 1 - 0.05**(1/N) (about 3/N, the
"rule of three"). The binomial model treats impostor pairs as independent; pairs that share
photos are not, so on a data set where each photo appears in many pairs the bound is optimistic
(by how much depends on the data set; say so where it matters).

Search calls ``fmr_at`` to annotate every candidate and ``threshold_for_fpir`` to choose an
identification threshold at the real gallery size: a non-mated probe searched against N faces
returns a false candidate with probability FPIR = 1 - (1 - FMR)**N, so the per-comparison FMR
allowed is 1 - (1 - FPIR)**(1/N) and the threshold rises as the gallery grows.

Saved as versioned JSON (calibration.formats), tied to the model, detector and weights that
produced the scores; ``load_default`` reads the calibration shipped in ``facelake/data``.
Tested in tests/test_calibration.py.
"""

from __future__ import annotations

import importlib.resources
import json
from dataclasses import dataclass, field
from datetime import datetime, timezone
from functools import cached_property
from pathlib import Path

import numpy as np

from facelake import storage
from facelake.calibration import formats
from facelake.calibration.stats import (CONFIDENCE, CalibrationError, fmr_for_fpir, largest_gallery, threshold_grid,
                                        wilson_upper)
from facelake.faces.registry import ModelSpec, get_model, weights_fingerprint

# Shipped calibrations: facelake/data/calibration-<model>-<dataset>.json
DEFAULT_DATASET = "lfw"


@dataclass
class Calibration:
    """Thresholds -> measured FMR (with a 95% upper bound) and FNMR for one model + detector."""

    model: str
    recognizer: str
    detector: str
    weights_sha256: str
    dataset: str
    n_genuine: int
    n_impostor: int
    thresholds: np.ndarray        # ascending float64
    impostor_above: np.ndarray    # impostor pairs with similarity >= threshold (int64)
    genuine_below: np.ndarray     # genuine pairs with similarity < threshold (int64)
    confidence: float = CONFIDENCE
    notes: str = ""
    created: str = field(default_factory=lambda: datetime.now(timezone.utc).isoformat(timespec="seconds"))
    summary: dict = field(default_factory=dict)

    @classmethod
    def from_scores(cls, genuine: np.ndarray, impostor: np.ndarray, *, model: str | ModelSpec | None = None,
                    dataset: str, notes: str = "", thresholds: np.ndarray | None = None) -> "Calibration":
        """Build from similarity arrays of genuine and impostor pairs (any length >= 1 impostor)."""
        spec = model if isinstance(model, ModelSpec) else get_model(model)
        genuine = np.asarray(genuine, np.float64).ravel()
        impostor = np.asarray(impostor, np.float64).ravel()
        if len(impostor) == 0:
            raise CalibrationError("a calibration needs impostor pairs (two different identities); got none: "
                                   "use a labeled manifest with at least two identities")
        if not (np.isfinite(genuine).all() and np.isfinite(impostor).all()):
            raise CalibrationError("similarity scores contain NaN or infinity: drop failed photos before calibrating")
        imp_sorted, gen_sorted = np.sort(impostor), np.sort(genuine)
        grid = (threshold_grid(gen_sorted, imp_sorted[::-1]) if thresholds is None
                else np.unique(np.asarray(thresholds, np.float64)))
        above = len(imp_sorted) - np.searchsorted(imp_sorted, grid, side="left")
        below = np.searchsorted(gen_sorted, grid, side="left")
        return cls(model=spec.name, recognizer=spec.recognizer, detector=spec.detector,
                   weights_sha256=weights_fingerprint(spec), dataset=dataset, n_genuine=len(genuine),
                   n_impostor=len(impostor), thresholds=grid, impostor_above=above.astype(np.int64),
                   genuine_below=below.astype(np.int64), notes=notes, summary=_summary(genuine, impostor))

    # ---- derived columns ------------------------------------------------------------------
    @property
    def fmr(self) -> np.ndarray:
        """Point estimate of FMR per row (impostor pairs at or above / all impostor pairs)."""
        return self.impostor_above / self.n_impostor

    @cached_property
    def fmr_upper(self) -> np.ndarray:
        """One-sided 95% upper bound on FMR per row; non-increasing in the threshold."""
        upper = wilson_upper(self.impostor_above, self.n_impostor, self.confidence)
        return np.minimum.accumulate(upper)  # guard monotonicity against rounding

    @property
    def fnmr(self) -> np.ndarray:
        return self.genuine_below / self.n_genuine if self.n_genuine else np.full(len(self.thresholds), np.nan)

    @property
    def tar(self) -> np.ndarray:
        return 1.0 - self.fnmr

    @property
    def min_certified_fmr(self) -> float:
        """The smallest FMR this calibration can certify (its bound with no impostor above)."""
        return float(wilson_upper(0, self.n_impostor, self.confidence))

    # ---- queries --------------------------------------------------------------------------
    def fmr_at(self, similarity):
        """Estimated false-match rate per comparison at a similarity (the 95% upper bound).

        Step function over the table: the bound at the highest threshold <= similarity, so it is
        monotone non-increasing and never below the measured rate. Above every impostor pair it is
        the bound with zero events (about 3 / n_impostor), never 0; below the table it is 1.
        Accepts a scalar (returns float) or an array (returns an array).
        """
        values = np.asarray(similarity, np.float64)
        idx = np.searchsorted(self.thresholds, values, side="right") - 1
        result = np.where(idx >= 0, self.fmr_upper[np.clip(idx, 0, None)], 1.0)
        result = np.where(np.isnan(values), np.nan, result)
        return float(result) if result.ndim == 0 else result

    def fnmr_at(self, threshold: float) -> float:
        """Measured false non-match rate at a threshold (genuine pairs below it / all genuine)."""
        if not self.n_genuine:
            return float("nan")
        idx = int(np.searchsorted(self.thresholds, threshold, side="left"))
        if idx >= len(self.thresholds):
            return 1.0
        # at a row: exact; between rows: the next row up counts at least as many (conservative)
        return float(self.genuine_below[idx] / self.n_genuine)

    def threshold_for_fmr(self, target_fmr: float) -> float:
        """The lowest threshold whose 95% upper FMR bound is <= target_fmr.

        Raises CalibrationError when the target is below what this calibration's impostor pairs
        can certify (its ``min_certified_fmr``).
        """
        if not 0.0 < target_fmr < 1.0:
            raise CalibrationError(f"target FMR must be between 0 and 1 (exclusive), got {target_fmr}")
        ok = np.flatnonzero(self.fmr_upper <= target_fmr)
        if len(ok) == 0:
            raise CalibrationError(
                f"target FMR {target_fmr:.3g} is below what this calibration can certify: its "
                f"{self.n_impostor:,} impostor pairs ({self.dataset}) bound FMR at {self.min_certified_fmr:.3g} "
                f"at best ({self.confidence:.0%} confidence). Choose a larger target (a larger FPIR or a "
                f"smaller gallery), pass an explicit threshold, or calibrate on more impostor pairs")
        return float(self.thresholds[ok[0]])

    def threshold_for_fpir(self, target_fpir: float, gallery_size: int) -> float:
        """Threshold for a false-positive identification rate over a gallery of ``gallery_size`` faces.

        Uses FMR = 1 - (1 - FPIR)**(1/N); the threshold is non-decreasing in N.
        """
        fmr = fmr_for_fpir(target_fpir, gallery_size)
        if fmr >= self.fmr_upper.min():
            return self.threshold_for_fmr(fmr)
        raise CalibrationError(
            f"FPIR {target_fpir:.3g} at a gallery of {int(gallery_size):,} faces needs a per-comparison FMR "
            f"of {fmr:.3g}, below the {self.min_certified_fmr:.3g} this calibration can certify "
            f"({self.n_impostor:,} impostor pairs, {self.dataset}); it supports galleries up to about "
            f"{largest_gallery(self.min_certified_fmr, target_fpir):,} faces at that FPIR. Raise --max-fpir, "
            f"pass --threshold, or calibrate on more impostor pairs")

    def check_model(self, model: str | ModelSpec | None = None) -> None:
        """Raise CalibrationError unless this calibration was measured with this model's weights."""
        spec = model if isinstance(model, ModelSpec) else get_model(model)
        want = (spec.name, spec.recognizer, spec.detector, weights_fingerprint(spec))
        have = (self.model, self.recognizer, self.detector, self.weights_sha256)
        if want != have:
            raise CalibrationError(
                f"calibration ({self.dataset}) was measured for model {self.model} ({self.recognizer} + "
                f"{self.detector}, weights {self.weights_sha256[:12]}...), not for {spec.name} ({spec.recognizer} + "
                f"{spec.detector}, weights {want[3][:12]}...): its error rates do not apply. Run "
                f"`facelake evaluate` with --model {spec.name} on a labeled manifest to calibrate it")

    def table(self, fmrs: tuple[float, ...] = (1e-1, 1e-2, 1e-3, 1e-4, 1e-5, 1e-6, 1e-7)) -> list[dict]:
        """Rows for a report: the threshold certified for each target FMR and the TAR there."""
        out = []
        for target in fmrs:
            try:
                t = self.threshold_for_fmr(target)
            except CalibrationError:
                out.append({"target_fmr": target, "threshold": None, "tar": None,
                            "note": f"insufficient impostors (best certified {self.min_certified_fmr:.2g})"})
                continue
            out.append({"target_fmr": target, "threshold": t, "fmr_upper95": self.fmr_at(t),
                        "tar": 1.0 - self.fnmr_at(t)})
        return out

    # ---- files (the format: calibration.formats) --------------------------------------------
    def to_dict(self) -> dict:
        return formats.calibration_to_dict(self)

    @classmethod
    def from_dict(cls, data: dict, *, source: str = "calibration") -> "Calibration":
        return cls(**formats.calibration_fields(data, source))

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=None, separators=(",", ":"))

    def save(self, path: str) -> None:
        """Write as JSON (local path or s3://), atomically."""
        storage.write_bytes_atomic(str(path), (self.to_json() + "\n").encode())

    @classmethod
    def load(cls, path: str) -> "Calibration":
        return cls.from_dict(formats.read_json(str(path)), source=storage.redact(str(path)))


def _summary(genuine: np.ndarray, impostor: np.ndarray) -> dict:
    """Means, spreads and extremes of the scores, for the file's header."""
    return {
        "genuine_mean": float(genuine.mean()) if len(genuine) else None,
        "genuine_std": float(genuine.std()) if len(genuine) else None,
        "impostor_mean": float(impostor.mean()),
        "impostor_std": float(impostor.std()),
        "impostor_max": float(impostor.max()),
        "genuine_min": float(genuine.min()) if len(genuine) else None,
    }


def shipped_path(model_name: str | None = None, dataset: str = DEFAULT_DATASET):
    """The packaged calibration file for a model (an importlib.resources Traversable)."""
    spec = get_model(model_name)
    return importlib.resources.files("facelake").joinpath("data", f"calibration-{spec.name}-{dataset}.json")


def load_default(model_name: str | None = None) -> Calibration:
    """The calibration shipped with facelake for a model, checked against the model's weights."""
    spec = get_model(model_name)
    resource = shipped_path(spec.name)
    if not resource.is_file():
        raise CalibrationError(
            f"facelake ships no calibration for model {spec.name} (looked for {resource.name} in facelake/data): "
            f"run `facelake evaluate --model {spec.name}` on a labeled manifest and use its calibration.json")
    calibration = Calibration.from_dict(json.loads(resource.read_text()), source=f"facelake/data/{resource.name}")
    calibration.check_model(spec)
    return calibration


def load(path: str | Path | None = None, model_name: str | None = None) -> Calibration:
    """A calibration from a file if given, else the shipped one; either way checked against the model."""
    if path is None:
        return load_default(model_name)
    calibration = Calibration.load(str(path))
    calibration.check_model(model_name)
    return calibration
