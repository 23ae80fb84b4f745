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

``GalleryCalibration`` (second half of this module) is the other kind: FPIR measured directly by
searching non-mated probes against one index version (`facelake calibrate`), with an exact
Clopper-Pearson bound, a generalised Pareto tail for labelled extrapolation, and the files of a
root (ROOT/calibration/). Pure numpy: no Ray, no deepface, no scipy. Tested in
tests/test_calibration.py.
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
from facelake.faces.registry import ModelSpec, get_model, weights_fingerprint

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


# ==================================================================================================
# Live-gallery calibration: FPIR measured by searching non-mated probes against the gallery itself
# ==================================================================================================
#
# The table above measures FMR per comparison on a labeled set and turns it into an FPIR at a
# gallery size through FPIR = 1 - (1 - FMR)**N; at archive sizes that needs an FMR far below what
# any labeled set certifies. ``GalleryCalibration`` measures FPIR directly, the way NIST FRTE 1:N
# does: ``facelake calibrate`` searches probes of people known not to be in the gallery (non-mated)
# against one index version and keeps, per search, the highest similarity of a candidate that is
# not the probe's identity. FPIR(t) is the share of searches whose highest non-mated score is
# >= t, bounded above by the exact one-sided 95% Clopper-Pearson bound (1 - 0.05**(1/n) at zero
# events: the rule of three, ~3/n). About 3,000 non-mated searches without a false candidate
# certify FPIR <= 1e-3 whatever the gallery size.
#
# Beyond the measured range (a target FPIR below ~3/n) ``tail`` fits a generalised Pareto
# distribution to the highest scores (peaks over threshold, the extreme-value method of
# ISO/IEC 5152) and ``extrapolated_threshold`` chooses a threshold from it with a bootstrap
# confidence interval. Only on request (--allow-extrapolation), and always labelled.
# The fit uses probability-weighted moments in numpy (Hosking & Wallis 1987), so scipy stays out
# of facelake's dependencies: PWM is closed-form, has no optimiser to fail, and is the estimator
# recommended for the small exceedance counts (50-500) a calibration has.

GALLERY_KIND = "facelake.gallery_calibration"
GALLERY_SCHEMA_VERSION = 1
# A gallery calibration serves index versions of the same model and weights whose gallery size is
# within this fraction of the calibrated size (a nightly rebuild adds far less); beyond it, run
# `facelake calibrate` again. Growth within the margin is accounted for: the target FPIR is
# tightened by the ratio of sizes (FPIR_cal = 1 - (1 - FPIR)**(N_cal / N)).
GALLERY_MARGIN = 0.10
# Peaks over threshold: the highest TAIL_FRACTION of the searches' scores, at least
# MIN_EXCEEDANCES of them (fewer and the fit is refused).
TAIL_FRACTION = 0.10
MIN_EXCEEDANCES = 50
BOOTSTRAP_SAMPLES = 400
EXTRAPOLATED = "extrapolated"
MEASURED = "measured"


def _betacf(a: np.ndarray, b: np.ndarray, x: np.ndarray, iterations: int = 400) -> np.ndarray:
    """Continued fraction of the regularized incomplete beta (modified Lentz), vectorised."""
    tiny = 1e-300
    qab, qap, qam = a + b, a + 1.0, a - 1.0
    c = np.ones_like(x)
    d = 1.0 - qab * x / qap
    d = 1.0 / np.where(np.abs(d) < tiny, tiny, d)
    h = d.copy()
    for m in range(1, iterations + 1):
        m2 = 2 * m
        for aa in (m * (b - m) * x / ((qam + m2) * (a + m2)), -(a + m) * (qab + m) * x / ((a + m2) * (qap + m2))):
            d = 1.0 + aa * d
            d = 1.0 / np.where(np.abs(d) < tiny, tiny, d)
            c = 1.0 + aa / c
            c = np.where(np.abs(c) < tiny, tiny, c)
            step = d * c
            h = h * step
        if np.all(np.abs(step - 1.0) < 1e-13):
            break
    return h


def _betainc(a: np.ndarray, b: np.ndarray, x: np.ndarray) -> np.ndarray:
    """Regularized incomplete beta I_x(a, b) for a, b > 0 and x in [0, 1] (numpy only)."""
    a, b, x = np.broadcast_arrays(*(np.asarray(v, np.float64) for v in (a, b, x)))
    lgamma = np.vectorize(math.lgamma, otypes=[np.float64])
    xc = np.clip(x, 1e-300, 1 - 1e-16)
    front = np.exp(lgamma(a + b) - lgamma(a) - lgamma(b) + a * np.log(xc) + b * np.log1p(-xc))
    direct = x < (a + 1.0) / (a + b + 2.0)
    out = np.where(direct, front * _betacf(a, b, xc) / a, 1.0 - front * _betacf(b, a, 1.0 - xc) / b)
    return np.clip(np.where(x <= 0, 0.0, np.where(x >= 1, 1.0, out)), 0.0, 1.0)


def clopper_pearson_upper(k: np.ndarray | int, n: int, confidence: float = CONFIDENCE) -> np.ndarray:
    """Exact one-sided upper confidence bound on a binomial rate from k events in n trials.

    The p with P(X <= k | n, p) = 1 - confidence, found by bisection on the binomial CDF
    (P(X <= k) = I_{1-p}(n - k, k + 1)); 1 - (1 - confidence)**(1/n) at k = 0 (the rule of three),
    1 at k = n.
    """
    k = np.asarray(k, np.float64)
    if n <= 0:
        return np.ones_like(k)
    unique, inverse = np.unique(k, return_inverse=True)      # each distinct count once
    return _cp_upper(unique, n, confidence)[inverse].reshape(k.shape)


def _cp_upper(k: np.ndarray, n: int, confidence: float) -> np.ndarray:
    alpha = 1.0 - confidence
    out = np.where(k <= 0, -math.expm1(math.log(alpha) / n), 1.0)
    small = np.flatnonzero((k > 0) & (k < n) & (k <= _SMALL_K))
    large = np.flatnonzero((k > _SMALL_K) & (k < n))
    for i in small:                                  # the usual case: few false positives
        out[i] = _cp_upper_small(int(k[i]), n, alpha)
    if len(large):
        kl = k[large]
        lo, hi = kl / n, np.ones_like(kl)
        for _ in range(60):
            mid = (lo + hi) / 2
            too_low = _betainc(n - kl, kl + 1.0, 1.0 - mid) > alpha   # the CDF falls as p rises
            lo, hi = np.where(too_low, mid, lo), np.where(too_low, hi, mid)
        out[large] = hi
    return out


_SMALL_K = 5000   # up to this many events the binomial CDF is summed term by term


def _cp_upper_small(k: int, n: int, alpha: float) -> float:
    """Bisection on P(X <= k | n, p) = alpha with the CDF summed in log space."""
    i = np.arange(1, k + 1, dtype=np.float64)
    log_comb = np.concatenate([[0.0], np.cumsum(np.log((n - i + 1) / i))])   # log C(n, 0..k)
    j = np.arange(k + 1, dtype=np.float64)
    lo, hi = k / n, 1.0
    for _ in range(60):
        p = (lo + hi) / 2
        terms = log_comb + j * math.log(p) + (n - j) * math.log1p(-p)
        top = terms.max()
        cdf = math.exp(top) * float(np.exp(terms - top).sum())
        lo, hi = (p, hi) if cdf > alpha else (lo, p)
    return hi


def gpd_pwm(excess: np.ndarray) -> tuple[float, float]:
    """(shape xi, scale sigma) of a generalised Pareto fitted to exceedances over a threshold by
    probability-weighted moments (Hosking & Wallis 1987); survival (1 + xi*y/sigma)**(-1/xi)."""
    y = np.sort(np.asarray(excess, np.float64))
    n = len(y)
    if n < 2:
        raise CalibrationError("a tail fit needs at least 2 exceedances")
    a0 = y.mean()
    a1 = float(np.sum((n - np.arange(1, n + 1)) / (n - 1) * y) / n)
    denom = a0 - 2 * a1
    if denom <= 0:
        raise CalibrationError("the impostor tail is too heavy for a GPD fit by moments (shape >= 0.5)")
    k = a0 / denom - 2.0                  # Hosking's k = -xi
    return -k, 2.0 * a0 * a1 / denom


def gpd_survival(y: np.ndarray, xi: float | np.ndarray, sigma: float | np.ndarray) -> np.ndarray:
    """P(Y > y) of a GPD; 0 beyond the upper end point when xi < 0."""
    y = np.maximum(np.asarray(y, np.float64), 0.0)
    xi = np.asarray(xi, np.float64)
    sigma = np.asarray(sigma, np.float64)
    small = np.abs(xi) < 1e-9
    base = 1.0 + np.where(small, 1.0, xi) * y / sigma
    power = np.where(base > 0, np.maximum(base, 1e-300) ** (-1.0 / np.where(small, 1.0, xi)), 0.0)
    return np.where(small, np.exp(-y / sigma), power)


@dataclass
class TailFit:
    """A GPD fitted to the scores above ``u`` and its bootstrap parameters (for the interval)."""

    u: float
    rate_u: float          # share of searches scoring above u
    xi: float
    sigma: float
    exceedances: int
    boot: np.ndarray       # (B, 3): rate_u, xi, sigma per bootstrap resample

    def fpir(self, t: np.ndarray | float) -> np.ndarray:
        """Point estimate of FPIR at thresholds t >= u."""
        return self.rate_u * gpd_survival(np.asarray(t, np.float64) - self.u, self.xi, self.sigma)

    def interval(self, t: np.ndarray | float, confidence: float = CONFIDENCE) -> tuple[np.ndarray, np.ndarray]:
        """Bootstrap interval of FPIR at t; each end at (1 - confidence), so the upper end is a
        one-sided ``confidence`` upper bound.

        The upper end refits with the shape clipped at xi >= 0 (a tail no lighter than exponential):
        with the shape free, the bound under-covered a normal parent 7 times in 20 (3,000 searches,
        target 30x below the measured range; tests/test_calibration.py), because a GPD fitted at a
        finite level reads a normal tail as bounded (xi < 0). Clipped, it covered every time, at the
        price of a higher threshold. The lower end uses the free shape.
        """
        t = np.atleast_1d(np.asarray(t, np.float64))
        b = self.boot
        free = b[:, :1] * gpd_survival(t[None, :] - self.u, b[:, 1:2], b[:, 2:3])
        clipped = b[:, :1] * gpd_survival(t[None, :] - self.u, np.maximum(b[:, 1:2], 0.0), b[:, 2:3])
        alpha = 1.0 - confidence
        return np.quantile(free, alpha, axis=0), np.quantile(clipped, 1.0 - alpha, axis=0)

    def to_dict(self) -> dict:
        return {"method": "generalised Pareto, peaks over threshold, probability-weighted moments; "
                          "bootstrap interval (upper end with shape clipped at xi >= 0)", "u": self.u, "rate_u": self.rate_u, "xi": self.xi,
                "sigma": self.sigma, "exceedances": self.exceedances, "bootstrap_samples": len(self.boot)}


def fit_tail(scores: np.ndarray, *, fraction: float = TAIL_FRACTION, min_exceedances: int = MIN_EXCEEDANCES,
             samples: int = BOOTSTRAP_SAMPLES, seed: int = 0) -> TailFit:
    """Fit the upper tail of per-search scores (peaks over threshold) with a bootstrap.

    The threshold u is the score below the top ``fraction`` of searches (at least
    ``min_exceedances`` of them); resamples refit with the same u.
    """
    s = np.sort(np.asarray(scores, np.float64))[::-1]
    n = len(s)
    m = max(min_exceedances, int(math.ceil(fraction * n)))
    if n <= m:
        raise CalibrationError(f"extrapolation needs more than {m} non-mated searches to fit a tail, got {n}: "
                               f"calibrate with more non-mated probes (a few thousand)")
    u = float(s[m])
    xi, sigma = gpd_pwm(s[:m] - u)
    rng = np.random.default_rng(seed)
    boot = []
    for _ in range(samples):
        r = rng.choice(s, n, replace=True)
        over = r[r > u] - u
        if len(over) < 2:
            continue
        try:
            bxi, bsigma = gpd_pwm(over)
        except CalibrationError:
            continue
        boot.append((len(over) / n, bxi, bsigma))
    return TailFit(u=u, rate_u=m / n, xi=float(xi), sigma=float(sigma), exceedances=m,
                   boot=np.asarray(boot, np.float64).reshape(-1, 3))


def fpir_at_calibrated_size(target_fpir: float, gallery_size: int, calibrated_size: int) -> float:
    """The FPIR to certify on the calibrated gallery so that ``target_fpir`` holds at ``gallery_size``.

    A larger gallery gives a non-mated search more chances: FPIR_cal = 1 - (1 - FPIR)**(N_cal/N).
    A smaller one is not given credit (the target is kept).
    """
    if gallery_size <= calibrated_size:
        return target_fpir
    return -math.expm1(math.log1p(-target_fpir) * calibrated_size / gallery_size)


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
        upper = np.minimum(clopper_pearson_upper(self.false_positives(np.nan_to_num(values, nan=1.0)),
                                                 self.n_searches, self.confidence), 1.0 - 1e-16)
        result = -np.expm1(np.log1p(-upper) / max(1, self.gallery_size))
        result = np.where(np.isnan(values), np.nan, result)
        return float(result) if result.ndim == 0 else result

    # ---- choosing thresholds ----------------------------------------------------------------
    def threshold_for_fpir(self, target_fpir: float, gallery_size: int | None = None) -> float:
        """The lowest measured threshold whose 95% upper FPIR bound is <= the target (tightened for
        a gallery larger than the calibrated one). Raises CalibrationError beyond the measured range."""
        if not 0.0 < target_fpir < 1.0:
            raise CalibrationError(f"target FPIR must be between 0 and 1 (exclusive), got {target_fpir}")
        want = fpir_at_calibrated_size(target_fpir, gallery_size or self.gallery_size, self.gallery_size)
        k = self._most_false_positives(want)
        if k < 0:
            raise CalibrationError(
                f"FPIR {target_fpir:.3g} is below what the live-gallery calibration of index version "
                f"{self.index_version} can certify: its {self.n_searches:,} non-mated searches bound FPIR at "
                f"{self.min_certified_fpir:.3g} at best ({self.confidence:.0%} confidence; about "
                f"{_searches_needed(want):,} searches would certify it). Raise --max-fpir, run `facelake "
                f"calibrate` with more non-mated probes, or pass --allow-extrapolation to use the fitted tail")
        grid = self.thresholds                      # count(t) <= k exactly when t > the (k+1)-th highest score
        if k >= self.n_searches:
            return float(grid[0])
        return float(grid[np.searchsorted(grid, self.scores[k], side="right")])

    def _most_false_positives(self, fpir: float) -> int:
        """The largest count k of false-positive searches whose upper bound is <= fpir (-1 if none);
        a bisection, as the bound rises with k."""
        n = self.n_searches
        if float(clopper_pearson_upper(0, n, self.confidence)) > fpir:
            return -1
        lo, hi = 0, n                                # bound(lo) <= fpir; find the last such k
        while lo < hi:
            mid = (lo + hi + 1) // 2
            if float(clopper_pearson_upper(mid, n, self.confidence)) <= fpir:
                lo = mid
            else:
                hi = mid - 1
        return lo

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

    # ---- files ------------------------------------------------------------------------------
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

    def to_dict(self) -> dict:
        finite = self.scores[np.isfinite(self.scores)]
        grid = _grid(np.array([]), finite) if len(finite) else np.array([-1.0])
        k = self.false_positives(grid)
        upper = clopper_pearson_upper(k, self.n_searches, self.confidence)
        rows = [{"threshold": float(t), "false_positive_searches": int(c), "fpir": c / max(1, self.n_searches),
                 "fpir_upper95": float(u)} for t, c, u in zip(grid, k, upper)]
        return {
            "schema_version": GALLERY_SCHEMA_VERSION, "kind": GALLERY_KIND,
            "model": self.model, "recognizer": self.recognizer, "detector": self.detector,
            "weights_sha256": self.weights_sha256, "index_version": self.index_version,
            "gallery_size": self.gallery_size, "nprobe": self.nprobe, "top_k": self.top_k,
            "identity_column": self.identity_column, "excluded_same_identity": self.excluded_same_identity,
            "saturated": self.saturated, "n_searches": self.n_searches, "probes": self.probes,
            "job_id": self.job_id, "confidence": self.confidence, "created": self.created, "notes": self.notes,
            "match_rule": "a search is a false positive at t when a non-mated candidate has similarity >= t",
            "bound": "one-sided exact Clopper-Pearson upper bound (rule of three at zero)",
            "gallery_margin": GALLERY_MARGIN,
            "rows": rows,
            "scores": [float(s) for s in self.scores],
        }

    @classmethod
    def from_dict(cls, data: dict, *, source: str = "gallery calibration") -> "GalleryCalibration":
        if data.get("kind") != GALLERY_KIND:
            raise CalibrationError(f"{source} is not a live-gallery calibration (kind {data.get('kind')!r}): "
                                   f"`facelake calibrate` writes them under ROOT/calibration/")
        if data.get("schema_version") != GALLERY_SCHEMA_VERSION:
            raise CalibrationError(f"{source} has schema_version {data.get('schema_version')}; this facelake "
                                   f"reads {GALLERY_SCHEMA_VERSION}: re-run `facelake calibrate`")
        try:
            return cls(model=data["model"], recognizer=data["recognizer"], detector=data["detector"],
                       weights_sha256=data["weights_sha256"], index_version=data["index_version"],
                       gallery_size=int(data["gallery_size"]), nprobe=int(data["nprobe"]), top_k=int(data["top_k"]),
                       scores=np.sort(np.asarray(data["scores"], np.float64))[::-1],
                       identity_column=data.get("identity_column"),
                       excluded_same_identity=int(data.get("excluded_same_identity", 0)),
                       saturated=int(data.get("saturated", 0)), probes=data.get("probes", {}),
                       job_id=data.get("job_id", ""), confidence=float(data.get("confidence", CONFIDENCE)),
                       notes=list(data.get("notes", [])), created=data.get("created", ""), source=source)
        except (KeyError, TypeError, ValueError) as err:
            raise CalibrationError(f"{source} is malformed ({type(err).__name__}: {err}): re-run "
                                   f"`facelake calibrate`") from err


def within_margin(calibrated_size: int, gallery_size: int, margin: float = GALLERY_MARGIN) -> bool:
    """Whether a gallery of ``gallery_size`` faces is within ``margin`` of the calibrated size."""
    return abs(gallery_size - calibrated_size) <= margin * calibrated_size


def _searches_needed(fpir: float, confidence: float = CONFIDENCE) -> int:
    """Non-mated searches that certify ``fpir`` with no false positive (about 3 / fpir)."""
    return int(math.ceil(math.log(1 - confidence) / math.log1p(-fpir)))


def _read_json(uri: str, options=None) -> dict:
    """A calibration file's JSON, with errors that name the file (redacted)."""
    from facelake import storage

    try:
        return json.loads(storage.read_bytes(str(uri), options))
    except FileNotFoundError as err:
        raise CalibrationError(f"calibration file {storage.redact(str(uri))} does not exist") from err
    except json.JSONDecodeError as err:
        raise CalibrationError(f"{storage.redact(str(uri))} is not valid JSON: {err}") from err


def load_any(path: str, options=None) -> "Calibration | GalleryCalibration":
    """A calibration file of either kind (labeled-set ``Calibration`` or ``GalleryCalibration``)."""
    from facelake import storage

    data = _read_json(path, options)
    if isinstance(data, dict) and data.get("kind") == GALLERY_KIND:
        return GalleryCalibration.from_dict(data, source=storage.redact(str(path)))
    return Calibration.from_dict(data, source=storage.redact(str(path)))


# ---- live-gallery calibrations of a root: ROOT/calibration/<index version>--<job id>.json ----------

GALLERY_DIR = "calibration"
GALLERY_SUFFIX = ".gallery-calibration.json"


def gallery_dir(root: str) -> str:
    """Where a root keeps its live-gallery calibrations (one file per `facelake calibrate` job)."""
    from facelake import storage

    return storage.join(root, GALLERY_DIR)


def save_gallery(cal: GalleryCalibration, root: str, options=None) -> str:
    """Write a live-gallery calibration under ROOT/calibration/ (never overwritten); its URI."""
    from facelake import storage

    uri = storage.join(gallery_dir(root), f"{cal.index_version}--{cal.job_id}{GALLERY_SUFFIX}")
    storage.write_bytes_new(uri, (json.dumps(cal.to_dict(), separators=(",", ":")) + "\n").encode(), options)
    cal.source = storage.redact(uri)
    return uri


def load_gallery(uri: str, options=None) -> GalleryCalibration:
    """One live-gallery calibration file."""
    from facelake import storage

    return GalleryCalibration.from_dict(_read_json(uri, options), source=storage.redact(uri))


def find_gallery(root: str, *, model: str | ModelSpec | None, index_version: str, gallery_size: int,
                 margin: float = GALLERY_MARGIN, options=None) -> GalleryCalibration | None:
    """The live-gallery calibration that serves an index version, or None.

    Preference: the newest one measured on this very version; else the newest one of the same
    model and weights whose gallery is within ``margin`` of ``gallery_size``. Unreadable files and
    files of other models are passed over (they never serve).
    """
    from facelake import storage

    best: tuple[tuple, GalleryCalibration] | None = None
    for uri in storage.list_files(gallery_dir(root), GALLERY_SUFFIX, options):
        try:
            cal = load_gallery(uri, options)
            cal.check_applies(model=model, index_version=index_version, gallery_size=gallery_size, margin=margin)
        except CalibrationError:
            continue
        rank = (cal.index_version == index_version, cal.created, cal.job_id)
        if best is None or rank > best[0]:
            best = (rank, cal)
    return None if best is None else best[1]
