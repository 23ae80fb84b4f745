"""facelake.calibration: FMR bounds, thresholds by target, the versioned file, the shipped LFW table."""

from __future__ import annotations

import json

import numpy as np
import pytest

from facelake.calibration import (SCHEMA_VERSION, Calibration, CalibrationError, fmr_for_fpir, load,
                                  load_default, shipped_path, wilson_upper)
from facelake.registry import get_model


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
