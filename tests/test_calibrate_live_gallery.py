"""Identify mode on the smallest gallery the shipped labeled-set calibration refuses at FPIR 1e-3:
refused, served once `facelake calibrate` measured FPIR on the live gallery, and its FPIR on
held-out non-mated probes stays within the certified bound.

The steps are bench/calibrate_1m.py's (``build_gallery``, ``identify``), which runs them on 1M faces:
the bundled sample photos (embedded by the embed job) plus synthetic clustered faces, 2 shards;
3,000 non-mated probes of other persons to calibrate and 3,000 held out. Real Ray, real faiss.
"""

from __future__ import annotations

import importlib.util
import math

import pyarrow.compute as pc
import pytest

from facelake import calibration, storage
from facelake.index.load import open_version
from facelake.index.searchers import search_version
from facelake.jobs import search
from facelake.jobs.calibrate import CalibrateConfig, run_calibrate
from tests.helpers import REPO

TARGET_FPIR = 1e-3
NLIST = 128


def _bench():
    spec = importlib.util.spec_from_file_location("bench_calibrate_1m", REPO / "bench" / "calibrate_1m.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


bench = _bench()


def smallest_refused_gallery(target_fpir: float) -> int:
    """The smallest gallery whose FPIR target needs a lower FMR than the shipped calibration certifies."""
    fmr = calibration.load_default().min_certified_fmr
    return int(math.log1p(-target_fpir) / math.log1p(-fmr)) + 1


GALLERY = smallest_refused_gallery(TARGET_FPIR) + 1_000   # a margin above the crossing


@pytest.fixture(scope="module")
def gallery(ray_local, sample_faces, tmp_path_factory):
    return bench.build_gallery(tmp_path_factory.mktemp("gallery"), gallery=GALLERY, nlist=NLIST, embedded=sample_faces)


def test_the_gallery_is_just_past_what_the_shipped_calibration_supports():
    shipped = calibration.load_default()
    assert calibration.fmr_for_fpir(TARGET_FPIR, GALLERY) < shipped.min_certified_fmr
    assert calibration.fmr_for_fpir(TARGET_FPIR, GALLERY - 1_001) >= shipped.min_certified_fmr


def test_identify_is_served_once_calibrated_and_holds_its_bound(gallery):
    base, root = gallery["base"], gallery["root"]
    handle = open_version(root)
    assert handle.total == GALLERY
    held_out = gallery["probes"]

    # before: the shipped LFW calibration cannot certify FPIR 1e-3 at this gallery, so identify refuses
    with pytest.raises(calibration.CalibrationError, match="supports galleries up to about"):
        bench.identify(gallery, "heldout.parquet", "out-before", max_fpir=TARGET_FPIR)

    summary = run_calibrate(CalibrateConfig(probes=str(base / "nonmated.parquet"), root=root, top_k=10,
                                            purpose="test: calibrate the live gallery"))
    assert summary.searches == held_out and summary.identity_column is None
    cal = calibration.find_gallery(root, model=None, index_version=handle.version, gallery_size=handle.total)
    assert cal is not None and cal.job_id == summary.job_id and cal.min_certified_fpir <= TARGET_FPIR

    # after: served, threshold from the live calibration, recorded
    served = bench.identify(gallery, "heldout.parquet", "out-heldout", max_fpir=TARGET_FPIR, top_k=10)
    threshold = served.threshold
    assert threshold == pytest.approx(cal.threshold_for_fpir(TARGET_FPIR))
    assert served.calibration.startswith(f"live gallery: index version {handle.version} ({GALLERY:,} faces)")
    bound = float(cal.fpir_upper(threshold))
    assert bound <= TARGET_FPIR

    # held-out non-mated probes: searches with any candidate are false positives
    results = storage.read_table(search.outputs(str(base / "out-heldout"))["results"])
    hits = results.filter(pc.is_valid(results["rank"]))
    false_positive = len(set(hits["probe_image_id"].to_pylist()))
    measured = false_positive / held_out
    assert measured <= bound

    # the same count from the searched scores; and a looser threshold would have shown it (the test can fail)
    D, _ = search_version(handle, gallery["heldout"], 1, handle.nprobe)
    held_max = D[:, 0]
    assert int((held_max >= threshold).sum()) == false_positive
    loose = cal.threshold_for_fpir(0.2)
    assert (held_max >= loose).mean() > TARGET_FPIR

    # mated probes (the real sample faces, also in the gallery) are found above the threshold
    mated = bench.identify(gallery, "mated.parquet", "out-mated", max_fpir=TARGET_FPIR, top_k=3)
    table = storage.read_table(search.outputs(str(base / "out-mated"))["results"])
    top = table.filter(pc.equal(table["rank"], 1))
    assert mated.threshold == threshold
    assert pc.all(pc.equal(top["probe_image_id"], top["gallery_image_id"])).as_py()
    assert top.num_rows == mated.searched_faces


def test_beyond_the_measured_range_only_with_allow_extrapolation(gallery):
    with pytest.raises(calibration.CalibrationError, match="--allow-extrapolation"):
        bench.identify(gallery, "heldout.parquet", "out-1e4", max_fpir=1e-4)
    extra = bench.identify(gallery, "heldout.parquet", "out-1e4-ext", max_fpir=1e-4, allow_extrapolation=True)
    cal = calibration.find_gallery(gallery["root"], model=None, index_version=open_version(gallery["root"]).version,
                                   gallery_size=GALLERY)
    assert extra.threshold_how.startswith("EXTRAPOLATED") and "interval [" in extra.threshold_how
    assert extra.threshold > cal.threshold_for_fpir(TARGET_FPIR)
    D, _ = search_version(open_version(gallery["root"]), gallery["heldout"], 1)
    assert int((D[:, 0] >= extra.threshold).sum()) == 0


def test_more_ivf_lists_than_calibrated_is_said(gallery):
    handle = open_version(gallery["root"])
    wider = bench.identify(gallery, "heldout.parquet", "out-nprobe", max_fpir=TARGET_FPIR, nprobe=2 * handle.nprobe)
    assert f"--nprobe {2 * handle.nprobe}, above the calibration's {handle.nprobe}" in wider.threshold_how
