"""A search's threshold policy: which calibration serves it, which threshold it applies, and the
estimated false-match rate of each candidate.

Identify mode prefers the live-gallery calibration (`facelake calibrate`) that serves the searched
index version, and takes the threshold it measured for the target FPIR (or, only when asked, one
from its fitted tail, labelled extrapolated). Otherwise the labeled-set calibration (given, or
shipped for the model) chooses the threshold for the target FPIR at the real gallery size. In
investigate mode a missing calibration only loses the estimated rates. Tested in
tests/test_search.py and tests/test_calibrate.py.
"""

from __future__ import annotations

from dataclasses import dataclass
import numpy as np

from facelake import calibration, storage

# The identification error rate thresholds are chosen for when none is given: one non-mated
# probe in a thousand returns a false candidate (the accountable systems' usual operating point).
DEFAULT_MAX_FPIR = 1e-3

AnyCalibration = calibration.Calibration | calibration.GalleryCalibration


@dataclass(frozen=True)
class ThresholdOptions:
    """The search options that choose the calibration and the threshold (checked by the search's config)."""

    mode: str                          # "investigate" | "identify"
    threshold: float | None = None     # explicit threshold; excludes max_fpir
    max_fpir: float | None = None      # None: DEFAULT_MAX_FPIR unless a threshold is given
    nprobe: int | None = None          # the --nprobe asked for (None: the version's)
    calibration_file: str | None = None
    allow_extrapolation: bool = False


@dataclass(frozen=True)
class ChosenCalibration:
    """The calibration a search uses (None: none available), how to name it, and why there is none."""

    calibration: AnyCalibration | None
    described: str | None = None
    note: str | None = None


def choose_calibration(options: ThresholdOptions, *, root: str, model: str, index_version: str,
                       gallery_size: int, storage_options: storage.StorageOptions | None = None) -> ChosenCalibration:
    """The calibration for the index's model. Identify mode prefers the live-gallery calibration
    serving this index version; a calibration file of that kind must serve it or is refused.
    Otherwise the labeled-set one: in investigate mode a missing one only loses the estimated
    false-match rates (noted), in identify mode without an explicit threshold it is an error."""
    if options.mode == "identify":
        live = _gallery_calibration(options, root, model=model, index_version=index_version,
                                    gallery_size=gallery_size, storage_options=storage_options)
        if live is not None:
            return ChosenCalibration(live, f"{live.describe()} ({live.source})")
    try:
        cal = calibration.load(options.calibration_file, model)
    except calibration.CalibrationError as err:
        if options.mode == "identify" and options.threshold is None or options.calibration_file is not None:
            raise
        return ChosenCalibration(None, note=f"no calibration, est_false_match_rate left null: {err}")
    return ChosenCalibration(cal, f"{cal.dataset} ({cal.n_impostor:,} impostor pairs, "
                                  f"{options.calibration_file or 'shipped with facelake'})")


def _gallery_calibration(options: ThresholdOptions, root: str, *, model: str, index_version: str, gallery_size: int,
                         storage_options: storage.StorageOptions | None) -> calibration.GalleryCalibration | None:
    """The live-gallery calibration that serves the searched version, or None."""
    where = dict(model=model, index_version=index_version, gallery_size=gallery_size)
    if options.calibration_file is not None:
        cal = calibration.load_any(options.calibration_file)
        if not isinstance(cal, calibration.GalleryCalibration):
            return None
        cal.check_applies(**where)
        return cal
    return calibration.find_gallery(root, **where, options=storage_options)


def choose_threshold(options: ThresholdOptions, cal: AnyCalibration | None, gallery_size: int) -> tuple[float | None, str]:
    """(threshold, how it was chosen). In investigate mode an uncertifiable threshold is None."""
    if options.threshold is not None:
        return float(options.threshold), "explicit --threshold"
    fpir = options.max_fpir or DEFAULT_MAX_FPIR
    where = "--max-fpir" if options.max_fpir is not None else "default max FPIR"
    if cal is None:
        return None, "none: no calibration for the model"
    if isinstance(cal, calibration.GalleryCalibration):
        return _live_threshold(options, cal, fpir, where, gallery_size)
    try:
        value = cal.threshold_for_fpir(fpir, gallery_size)
    except calibration.CalibrationError as err:
        if options.mode == "identify":
            raise
        return None, f"none: {err}"
    return value, (f"threshold_for_fpir({where} {fpir:g}, gallery of {gallery_size:,} faces) on the "
                   f"{cal.dataset} calibration (95% upper bound on FMR {calibration.fmr_for_fpir(fpir, gallery_size):.3g} "
                   f"per comparison)")


def _live_threshold(options: ThresholdOptions, cal: calibration.GalleryCalibration, fpir: float, where: str,
                    gallery_size: int) -> tuple[float, str]:
    """The threshold from a live-gallery calibration: measured when it certifies the target, else
    (only with allow_extrapolation) from its fitted tail, labelled "extrapolated"."""
    grown = (f"; gallery grew from {cal.gallery_size:,} to {gallery_size:,} faces, target tightened to FPIR "
             f"{calibration.fpir_at_calibrated_size(fpir, gallery_size, cal.gallery_size):.3g} on the calibrated gallery"
             if gallery_size > cal.gallery_size else "")
    if options.nprobe and options.nprobe > cal.nprobe:
        grown += (f"; searched with --nprobe {options.nprobe}, above the calibration's {cal.nprobe}: more IVF lists "
                  f"can surface false candidates the calibration did not see")
    try:
        value = cal.threshold_for_fpir(fpir, gallery_size)
        return value, (f"measured: {where} {fpir:g} on the live-gallery calibration of index version "
                       f"{cal.index_version} ({cal.n_searches:,} non-mated searches; 95% Clopper-Pearson upper "
                       f"bound on FPIR {float(cal.fpir_upper(value)):.3g} at this threshold){grown}")
    except calibration.CalibrationError:
        if not options.allow_extrapolation:
            raise
    ext = cal.extrapolated_threshold(fpir, gallery_size)
    low, high = ext["fpir_interval"]
    return ext["threshold"], (f"EXTRAPOLATED (--allow-extrapolation): {where} {fpir:g} is beyond the "
                              f"{cal.n_searches:,} non-mated searches of the live-gallery calibration of index "
                              f"version {cal.index_version}; threshold from a generalised Pareto tail fitted above "
                              f"{ext['tail']['u']:.4f}: FPIR estimate {ext['fpir_estimate']:.3g}, "
                              f"{cal.confidence:.0%} interval [{low:.3g}, {high:.3g}]{grown}")


def false_match_rates(cal: AnyCalibration | None, D: np.ndarray) -> np.ndarray:
    """The estimated false-match rate at each similarity of ``D`` (NaN without a calibration or a candidate)."""
    if cal is None:
        return np.full(D.shape, np.nan)
    return np.asarray(cal.fmr_at(np.where(np.isfinite(D), D, np.nan)), np.float64)
