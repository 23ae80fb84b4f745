"""facelake.calibration: FMR bounds, thresholds by target, the versioned file, the shipped LFW tables
(each reproduced from its counts), the live-gallery calibration and its extrapolated tail."""

from __future__ import annotations

import importlib.resources
import json
import math

import numpy as np
import pytest

from facelake.calibration import (SCHEMA_VERSION, Calibration, CalibrationError, fmr_for_fpir, load,
                                  load_default, shipped_path, wilson_upper)
from facelake.calibration.formats import calibration_fields
from facelake.faces.registry import get_model


@pytest.fixture(scope="module")
def synthetic() -> Calibration:
    rng = np.random.default_rng(7)
    genuine = rng.normal(0.6, 0.12, 5_000)
    impostor = rng.normal(0.05, 0.1, 400_000)
    return Calibration.from_scores(genuine, impostor, dataset="synthetic")


def test_wilson_bound_rule_of_three_and_above_point():
    n = 1_000_000
    assert wilson_upper(0, n) == pytest.approx(3.0 / n, rel=0.01)  # exact: 1 - 0.05**(1/n)
    k = np.array([1, 10, 100, 10_000])
    assert (wilson_upper(k, n) > k / n).all()
    assert (np.diff(wilson_upper(np.arange(50), n)) > 0).all()


def test_counts_match_the_scores(synthetic):
    rng = np.random.default_rng(7)
    genuine = rng.normal(0.6, 0.12, 5_000)
    impostor = rng.normal(0.05, 0.1, 400_000)
    for i in range(0, len(synthetic.thresholds), 37):
        t = synthetic.thresholds[i]
        assert synthetic.impostor_above[i] == int((impostor >= t).sum())
        assert synthetic.genuine_below[i] == int((genuine < t).sum())


def test_fmr_at_is_monotone_and_never_zero(synthetic):
    scores = np.linspace(-1.5, 1.5, 3001)
    fmr = synthetic.fmr_at(scores)
    assert (np.diff(fmr) <= 0).all()
    assert fmr[0] == 1.0
    assert fmr[-1] == pytest.approx(synthetic.min_certified_fmr) and fmr[-1] > 0
    assert synthetic.fmr_at(0.99) == synthetic.min_certified_fmr  # beyond every impostor: the bound
    # the bound is never below the measured rate at that score
    rng = np.random.default_rng(7)
    rng.normal(0.6, 0.12, 5_000)
    impostor = rng.normal(0.05, 0.1, 400_000)
    for s in (0.0, 0.2, 0.3, 0.4):
        assert synthetic.fmr_at(s) >= (impostor >= s).mean()
    assert isinstance(synthetic.fmr_at(0.3), float)


def test_threshold_for_fmr_meets_target_and_rises_as_target_falls(synthetic):
    previous = -np.inf
    for target in (1e-1, 1e-2, 1e-3, 1e-4, 1e-5):
        t = synthetic.threshold_for_fmr(target)
        assert synthetic.fmr_at(t) <= target
        assert t >= previous
        previous = t
    with pytest.raises(CalibrationError, match="below what this calibration can certify"):
        synthetic.threshold_for_fmr(1e-7)


def test_threshold_tightens_as_gallery_grows(synthetic):
    assert fmr_for_fpir(1e-3, 1) == pytest.approx(1e-3)
    assert fmr_for_fpir(1e-2, 1000) == pytest.approx(1e-2 / 1000, rel=0.01)
    thresholds = [synthetic.threshold_for_fpir(1e-1, n) for n in (1, 10, 100, 1000, 10_000)]
    assert thresholds == sorted(thresholds) and thresholds[-1] > thresholds[0]
    with pytest.raises(CalibrationError, match="galleries up to about"):
        synthetic.threshold_for_fpir(1e-3, 10_000_000)
    with pytest.raises(CalibrationError):
        synthetic.threshold_for_fpir(1.5, 10)


def test_round_trip(tmp_path, synthetic):
    path = tmp_path / "cal.json"
    synthetic.save(str(path))
    data = json.loads(path.read_text())
    assert data["schema_version"] == SCHEMA_VERSION and data["model"] == "sface-yunet"
    assert data["detector"] == "yunet" and data["n_impostor"] == 400_000
    again = Calibration.load(str(path))
    np.testing.assert_array_equal(again.thresholds, synthetic.thresholds)
    np.testing.assert_array_equal(again.impostor_above, synthetic.impostor_above)
    np.testing.assert_array_equal(again.genuine_below, synthetic.genuine_below)
    scores = np.linspace(-1, 1, 501)
    np.testing.assert_array_equal(again.fmr_at(scores), synthetic.fmr_at(scores))
    assert again.threshold_for_fpir(1e-2, 100) == synthetic.threshold_for_fpir(1e-2, 100)
    assert load(str(path)).n_genuine == 5_000


def test_wrong_version_model_or_file_refused(tmp_path, synthetic):
    data = synthetic.to_dict()
    path = tmp_path / "v99.json"
    path.write_text(json.dumps({**data, "schema_version": 99}))
    with pytest.raises(CalibrationError, match="schema_version 99"):
        Calibration.load(str(path))
    path.write_text(json.dumps({**data, "weights_sha256": "0" * 64}))
    with pytest.raises(CalibrationError, match="its error rates do not apply"):
        load(str(path))
    path.write_text("{not json")
    with pytest.raises(CalibrationError, match="not valid JSON"):
        Calibration.load(str(path))
    with pytest.raises(CalibrationError, match="does not exist"):
        Calibration.load(str(tmp_path / "missing.json"))
    with pytest.raises(CalibrationError, match="impostor"):
        Calibration.from_scores([0.5], [], dataset="x")


def test_shipped_lfw_calibration():
    resource = shipped_path()
    assert resource.is_file(), "facelake/data/calibration-sface-yunet-lfw.json is missing: run bench/eval.py"
    assert len(resource.read_bytes()) < 200_000
    cal = load_default()
    cal.check_model(get_model())
    assert cal.dataset == "lfw" and cal.n_genuine > 200_000 and cal.n_impostor > 1_000_000
    fmr = cal.fmr_at(np.linspace(-0.2, 1.0, 121))
    assert (np.diff(fmr) <= 0).all() and fmr[-1] > 0
    assert fmr[0] > 0.5 > cal.fmr_at(0.3) > cal.fmr_at(0.5)
    low, high = cal.threshold_for_fpir(1e-2, 1_000), cal.threshold_for_fpir(1e-2, 100_000)
    assert low < high
    assert cal.summary["genuine_mean"] > cal.summary["impostor_mean"]


SHIPPED = sorted((p for p in importlib.resources.files("facelake").joinpath("data").iterdir()
                  if p.name.startswith("calibration-") and p.name.endswith(".json")), key=lambda p: p.name)


@pytest.mark.parametrize("resource", SHIPPED, ids=lambda p: p.name)
def test_shipped_file_reproduces_its_bounds_and_thresholds(resource):
    """Every shipped table's stored bounds (written with the file) come back from its counts, and
    each target's threshold is the one the stored bounds choose."""
    data = json.loads(resource.read_text())
    cal = Calibration(**calibration_fields(data, resource.name))
    stored = np.array([row["fmr_upper95"] for row in data["rows"]], np.float64)
    np.testing.assert_allclose(cal.fmr_upper, stored, rtol=1e-9, atol=0)
    thresholds = np.array([row["threshold"] for row in data["rows"]], np.float64)
    for target in (1e-2, 1e-3, 1e-4, 1e-5, 1e-6, 1e-7):
        assert cal.threshold_for_fmr(target) == thresholds[np.flatnonzero(stored <= target)[0]], target
    for fpir, size in ((1e-2, 1_000), (1e-2, 100_000), (1e-1, 1_000_000)):
        want = thresholds[np.flatnonzero(stored <= fmr_for_fpir(fpir, size))[0]]
        assert cal.threshold_for_fpir(fpir, size) == want


# ---- live-gallery calibrations (facelake calibrate) ---------------------------------------------

from facelake.calibration import (GalleryCalibration, clopper_pearson_upper, find_gallery,  # noqa: E402
                                  fit_tail, fpir_at_calibrated_size, gpd_pwm, load_any, save_gallery)
from facelake.faces.registry import weights_fingerprint  # noqa: E402


def gallery_cal(scores, *, version="v1", size=1_000_000, model=None) -> GalleryCalibration:
    spec = get_model(model)
    return GalleryCalibration(model=spec.name, recognizer=spec.recognizer, detector=spec.detector,
                              weights_sha256=weights_fingerprint(spec), index_version=version, gallery_size=size,
                              nprobe=16, top_k=10, scores=np.sort(np.asarray(scores, np.float64))[::-1],
                              job_id=f"calibrate-{version}")


def test_clopper_pearson_matches_published_values():
    # exact one-sided 95% upper bounds, n = 3000 (tables: 2.996/n, 4.744/n, 7.754/n, 16.962/n)
    got = clopper_pearson_upper(np.array([0, 1, 3, 10]), 3000)
    assert got == pytest.approx(np.array([2.9957, 4.7439, 7.7537, 16.9622]) / 3000, rel=2e-3)
    assert clopper_pearson_upper(0, 3000) == pytest.approx(1 - 0.05 ** (1 / 3000))
    assert clopper_pearson_upper(3000, 3000) == 1.0
    # a bound of k events covers the truth: P(X <= k | p = bound) = 5% by construction
    k, n = 7, 500
    p = float(clopper_pearson_upper(k, n))
    cdf = sum(math.comb(n, i) * p ** i * (1 - p) ** (n - i) for i in range(k + 1))
    assert cdf == pytest.approx(0.05, abs=1e-6)


def test_gpd_fit_by_moments_recovers_the_tail():
    rng = np.random.default_rng(3)
    xi, sigma = -0.2, 0.05
    y = sigma / xi * ((1 - rng.random(200_000)) ** (-xi) - 1)
    got_xi, got_sigma = gpd_pwm(y)
    assert got_xi == pytest.approx(xi, abs=0.01) and got_sigma == pytest.approx(sigma, rel=0.02)


def test_tail_interval_covers_the_true_rate_beyond_the_measured_range():
    rng = np.random.default_rng(5)
    scores = rng.normal(0.30, 0.05, 3000)       # per-search maxima; true FPIR(t) = normal survival
    tail = fit_tail(scores)
    for t in (0.45, 0.48):                      # beyond the measured range (max ~0.48)
        truth = 0.5 * math.erfc((t - 0.30) / 0.05 / math.sqrt(2))
        low, high = tail.interval(t)
        assert low[0] <= truth <= high[0], (t, low, truth, high)


def test_extrapolated_threshold_meets_its_target_on_every_seed():
    """The property that matters: the true FPIR at the chosen threshold is within the target, for a
    normal parent (the hard case for a GPD: a free-shape bound failed 7 seeds of 20)."""
    for seed in range(10):
        cal = gallery_cal(np.random.default_rng(seed).normal(0.30, 0.05, 3000))
        t = cal.extrapolated_threshold(1e-4)["threshold"]
        assert 0.5 * math.erfc((t - 0.30) / 0.05 / math.sqrt(2)) <= 1e-4, seed


def test_live_threshold_certifies_the_target_and_refuses_beyond_its_range():
    rng = np.random.default_rng(1)
    cal = gallery_cal(rng.normal(0.3, 0.05, 3000))
    t = cal.threshold_for_fpir(1e-2)
    below = cal.scores[cal.scores < t].max()        # the next measured point down
    assert float(cal.fpir_upper(t)) <= 1e-2 < float(cal.fpir_upper(below))
    t3 = cal.threshold_for_fpir(1e-3)               # rule of three: above every measured score
    assert t3 > cal.scores.max() and float(cal.fpir_upper(t3)) <= 1e-3
    with pytest.raises(CalibrationError, match="--allow-extrapolation"):
        cal.threshold_for_fpir(1e-4)
    ext = cal.extrapolated_threshold(1e-4)
    assert ext["label"] == "extrapolated" and ext["threshold"] > t3
    assert ext["fpir_interval"][1] <= 1e-4 and ext["fpir_interval"][0] <= ext["fpir_estimate"]


def test_larger_gallery_tightens_the_target():
    assert fpir_at_calibrated_size(1e-3, 1_050_000, 1_000_000) == pytest.approx(1e-3 / 1.05, rel=1e-3)
    assert fpir_at_calibrated_size(1e-3, 900_000, 1_000_000) == 1e-3
    rng = np.random.default_rng(2)
    cal = gallery_cal(rng.normal(0.3, 0.05, 20_000))
    assert cal.threshold_for_fpir(1e-2, 1_080_000) >= cal.threshold_for_fpir(1e-2)


def test_other_model_or_version_refused_clearly_and_round_trip(tmp_path):
    rng = np.random.default_rng(4)
    cal = gallery_cal(rng.normal(0.3, 0.05, 500), version="v1", size=1_000_000)
    cal.check_applies(model=None, index_version="v1", gallery_size=1_000_000)
    cal.check_applies(model=None, index_version="v2", gallery_size=1_090_000)       # within the 10% margin
    with pytest.raises(CalibrationError, match="measured on index version v1.*differ by more than 10%.*facelake calibrate"):
        cal.check_applies(model=None, index_version="v3", gallery_size=1_200_000)
    other = GalleryCalibration(**{**cal.__dict__, "weights_sha256": "0" * 64, "job_id": "calibrate-x", "_tail": None})
    with pytest.raises(CalibrationError, match="not for sface-yunet.*do not apply"):
        other.check_applies(model=None, index_version="v1", gallery_size=1_000_000)
    root = str(tmp_path / "root")
    uri = save_gallery(cal, root)
    again = load_any(uri)
    assert isinstance(again, GalleryCalibration) and again.n_searches == 500
    assert again.threshold_for_fpir(0.05) == cal.threshold_for_fpir(0.05)
    save_gallery(other, root)
    found = find_gallery(root, model=None, index_version="v2", gallery_size=1_050_000)
    assert found is not None and found.job_id == cal.job_id
    assert find_gallery(root, model=None, index_version="v3", gallery_size=2_000_000) is None
