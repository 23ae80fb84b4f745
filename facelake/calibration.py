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

Saved as versioned JSON (``schema_version``), tied to the model, detector and weights that
produced the scores; ``load_default`` reads the calibration shipped in ``facelake/data``.
Pure numpy: no Ray, no deepface. Tested in tests/test_calibration.py.
"""

from __future__ import annotations

import importlib.resources
import json
import math
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path

import numpy as np

from facelake.errors import FacelakeError
from facelake.registry import ModelSpec, get_model, weights_fingerprint

SCHEMA_VERSION = 1
CONFIDENCE = 0.95
_Z_ONE_SIDED_95 = 1.6448536269514722  # standard normal quantile at 0.95 (scipy is not a dependency)
# Shipped calibrations: facelake/data/calibration-<model>-<dataset>.json
DEFAULT_DATASET = "lfw"
# The uniform part of the threshold grid; the tail is resolved by order statistics (see _grid).
GRID_STEP = 0.01
# Numbers of impostor pairs above a threshold that get their own row (1, 2, 3, 5, 7, 10, ...):
# the high-score tail, where FMR is small, is where thresholds are chosen.
_TAIL_MANTISSAS = (1, 1.5, 2, 3, 5, 7)


class CalibrationError(FacelakeError):
    """A calibration is missing, malformed, for another model, or cannot certify a target."""


def wilson_upper(k: np.ndarray | int, n: int) -> np.ndarray:
    """One-sided 95% upper bound on a binomial rate from k events in n trials.

    Wilson score bound for k > 0; the exact Clopper-Pearson bound 1 - 0.05**(1/n) for k = 0.
    """
    k = np.asarray(k, np.float64)
    if n <= 0:
        return np.ones_like(k)
    z2 = _Z_ONE_SIDED_95 ** 2
    p = k / n
    centre = p + z2 / (2 * n)
    spread = _Z_ONE_SIDED_95 * np.sqrt(np.maximum(p * (1 - p), 0.0) / n + z2 / (4 * n * n))
    upper = (centre + spread) / (1 + z2 / n)
    zero = -math.expm1(math.log(1 - CONFIDENCE) / n)  # 1 - 0.05**(1/n), precise for large n
    return np.clip(np.where(k == 0, zero, upper), 0.0, 1.0)


def fmr_for_fpir(target_fpir: float, gallery_size: int) -> float:
    """Per-comparison FMR that gives a false-positive identification rate over N gallery faces.

    FPIR = 1 - (1 - FMR)**N, so FMR = 1 - (1 - FPIR)**(1/N) (about FPIR / N when small).
    """
    if not 0.0 < target_fpir < 1.0:
        raise CalibrationError(f"target FPIR must be between 0 and 1 (exclusive), got {target_fpir}")
    if int(gallery_size) < 1:
        raise CalibrationError(f"gallery size must be at least 1, got {gallery_size}")
    return -math.expm1(math.log1p(-target_fpir) / int(gallery_size))


def _grid(genuine: np.ndarray, impostor_desc: np.ndarray) -> np.ndarray:
    """Thresholds: a uniform grid over the score range, impostor order statistics in the tail,
    genuine percentiles, and the first threshold above every impostor pair."""
    scores_min = min(float(genuine.min()) if len(genuine) else 1.0, float(impostor_desc[-1]))
    scores_max = max(float(genuine.max()) if len(genuine) else -1.0, float(impostor_desc[0]))
    low = math.floor(scores_min / GRID_STEP) * GRID_STEP
    high = math.ceil(scores_max / GRID_STEP) * GRID_STEP
    parts = [np.round(np.arange(low, high + GRID_STEP / 2, GRID_STEP), 6)]
    counts = sorted({int(m * 10 ** e) for e in range(0, 12) for m in _TAIL_MANTISSAS
                     if m * 10 ** e <= len(impostor_desc)})
    parts.append(impostor_desc[np.asarray(counts) - 1].astype(np.float64))  # k-th highest -> k at or above
    parts.append(np.array([np.nextafter(float(impostor_desc[0]), np.inf)]))  # zero impostors above
    if len(genuine):
        parts.append(np.percentile(genuine.astype(np.float64), np.arange(0, 101, 1)))
    return np.unique(np.concatenate(parts))


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

    # ---- building -------------------------------------------------------------------------
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
        imp_sorted = np.sort(impostor)
        gen_sorted = np.sort(genuine)
        grid = _grid(gen_sorted, imp_sorted[::-1]) if thresholds is None else np.unique(np.asarray(thresholds, np.float64))
        above = len(imp_sorted) - np.searchsorted(imp_sorted, grid, side="left")
        below = np.searchsorted(gen_sorted, grid, side="left")
        summary = {
            "genuine_mean": float(genuine.mean()) if len(genuine) else None,
            "genuine_std": float(genuine.std()) if len(genuine) else None,
            "impostor_mean": float(impostor.mean()),
            "impostor_std": float(impostor.std()),
            "impostor_max": float(imp_sorted[-1]),
            "genuine_min": float(gen_sorted[0]) if len(genuine) else None,
        }
        return cls(model=spec.name, recognizer=spec.recognizer, detector=spec.detector,
                   weights_sha256=weights_fingerprint(spec), dataset=dataset, n_genuine=len(genuine),
                   n_impostor=len(impostor), thresholds=grid, impostor_above=above.astype(np.int64),
                   genuine_below=below.astype(np.int64), notes=notes, summary=summary)

    # ---- derived columns ------------------------------------------------------------------
    @property
    def fmr(self) -> np.ndarray:
        """Point estimate of FMR per row (impostor pairs at or above / all impostor pairs)."""
        return self.impostor_above / self.n_impostor

    @property
    def fmr_upper(self) -> np.ndarray:
        """One-sided 95% upper bound on FMR per row; non-increasing in the threshold."""
        upper = wilson_upper(self.impostor_above, self.n_impostor)
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
        return float(wilson_upper(0, self.n_impostor))

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
        upper = self.fmr_upper
        result = np.where(idx >= 0, upper[np.clip(idx, 0, None)], 1.0)
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
        try:
            return self.threshold_for_fmr(fmr_for_fpir(target_fpir, gallery_size))
        except CalibrationError as err:
            if "below what this calibration can certify" not in str(err):
                raise
            largest = _largest_gallery(self.min_certified_fmr, target_fpir)
            raise CalibrationError(
                f"FPIR {target_fpir:.3g} at a gallery of {int(gallery_size):,} faces needs a per-comparison FMR "
                f"of {fmr_for_fpir(target_fpir, gallery_size):.3g}, below the {self.min_certified_fmr:.3g} this "
                f"calibration can certify ({self.n_impostor:,} impostor pairs, {self.dataset}); it supports "
                f"galleries up to about {largest:,} faces at that FPIR. Raise --max-fpir, pass --threshold, "
                f"or calibrate on more impostor pairs") from err

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

    # ---- files ----------------------------------------------------------------------------
    def to_dict(self) -> dict:
        fmr, upper, fnmr = self.fmr, self.fmr_upper, self.fnmr
        rows = [{"threshold": float(t), "impostor_above": int(k), "fmr": _num(f), "fmr_upper95": _num(u),
                 "genuine_below": int(g), "fnmr": _num(r)}
                for t, k, f, u, g, r in zip(self.thresholds, self.impostor_above, fmr, upper,
                                            self.genuine_below, fnmr)]
        return {
            "schema_version": SCHEMA_VERSION,
            "kind": "facelake.calibration",
            "model": self.model, "recognizer": self.recognizer, "detector": self.detector,
            "weights_sha256": self.weights_sha256, "dataset": self.dataset,
            "n_genuine": self.n_genuine, "n_impostor": self.n_impostor,
            "confidence": self.confidence,
            "match_rule": "similarity >= threshold (cosine of L2-normalised embeddings)",
            "bound": "one-sided Wilson score upper bound; exact Clopper-Pearson when no impostor is above",
            "created": self.created, "notes": self.notes, "summary": self.summary,
            "rows": rows,
        }

    @classmethod
    def from_dict(cls, data: dict, *, source: str = "calibration") -> "Calibration":
        version = data.get("schema_version")
        if data.get("kind") != "facelake.calibration" or version is None:
            raise CalibrationError(f"{source} is not a facelake calibration file (no kind/schema_version)")
        if version != SCHEMA_VERSION:
            raise CalibrationError(f"{source} has calibration schema_version {version}; this facelake reads "
                                   f"{SCHEMA_VERSION}: re-run `facelake evaluate` to rebuild it")
        try:
            rows = data["rows"]
            return cls(model=data["model"], recognizer=data["recognizer"], detector=data["detector"],
                       weights_sha256=data["weights_sha256"], dataset=data["dataset"],
                       n_genuine=int(data["n_genuine"]), n_impostor=int(data["n_impostor"]),
                       thresholds=np.array([r["threshold"] for r in rows], np.float64),
                       impostor_above=np.array([r["impostor_above"] for r in rows], np.int64),
                       genuine_below=np.array([r["genuine_below"] for r in rows], np.int64),
                       confidence=float(data.get("confidence", CONFIDENCE)), notes=data.get("notes", ""),
                       created=data.get("created", ""), summary=data.get("summary", {}))
        except (KeyError, TypeError, ValueError) as err:
            raise CalibrationError(f"{source} is malformed ({type(err).__name__}: {err}): rebuild it with "
                                   f"`facelake evaluate`") from err

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=None, separators=(",", ":"))

    def save(self, path: str) -> None:
        """Write as JSON (local path or s3://), atomically."""
        from facelake import storage

        storage.write_bytes_atomic(str(path), (self.to_json() + "\n").encode())

    @classmethod
    def load(cls, path: str) -> "Calibration":
        from facelake import storage

        try:
            data = json.loads(storage.read_bytes(str(path)))
        except FileNotFoundError as err:
            raise CalibrationError(f"calibration file {storage.redact(str(path))} does not exist") from err
        except json.JSONDecodeError as err:
            raise CalibrationError(f"{storage.redact(str(path))} is not valid JSON: {err}") from err
        return cls.from_dict(data, source=storage.redact(str(path)))

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


def _num(x: float):
    return None if x is None or not np.isfinite(x) else float(x)


def _largest_gallery(fmr: float, fpir: float) -> int:
    """Largest N with 1 - (1 - fmr)**N <= fpir."""
    return max(0, int(math.log1p(-fpir) / math.log1p(-fmr)))


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
