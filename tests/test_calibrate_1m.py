"""Identify mode at 1M gallery faces: refused on the shipped labeled-set calibration, served once
`facelake calibrate` measured FPIR on the live gallery, and its FPIR on held-out non-mated probes
stays within the certified bound.

Gallery: the bundled sample photos (embedded by the embed job) plus synthetic faces
(``index.synthetic.clustered``: groups -> persons -> photos) to 1,000,000, IVF1024 in 2 shards.
Non-mated probes: 6,000 synthetic faces of other persons (another seed), 3,000 to calibrate and
3,000 held out. Real Ray (2 CPUs), real faiss. Slow: minutes on 2 cores.
"""

from __future__ import annotations

import pyarrow as pa
import pyarrow.compute as pc
import pytest

from facelake import calibration, storage
from facelake.index import build, synthetic
from facelake.index.load import open_version
from facelake.index.searchers import search_version
from facelake.jobs import search
from facelake.jobs.calibrate import CalibrateConfig, run_calibrate
from facelake.jobs.embed import EmbedConfig, outputs, run_embed
from facelake.faces.registry import get_model, weights_fingerprint
from tests.helpers import sample_manifest
from tests.test_search import faces_table

GALLERY = 1_000_000
NLIST = 1024
CALIBRATION_PROBES = 3_000
HELD_OUT = 3_000
TARGET_FPIR = 1e-3

pytestmark = [pytest.mark.slow, pytest.mark.timeout(2400)]


@pytest.fixture(scope="module")
def ray_1m(provisioned_weights):
    """Local Ray with 2 CPUs and an object store that holds the 1M vectors passed to build tasks."""
    import os

    import ray

    if ray.is_initialized():
        ray.shutdown()
    ray.init(address="local", num_cpus=2, include_dashboard=False, object_store_memory=1_500 * 1024 * 1024,
             runtime_env={"env_vars": {"DEEPFACE_HOME": os.environ["DEEPFACE_HOME"]}})
    yield ray
    ray.shutdown()


@pytest.fixture(scope="module")
def root_1m(ray_1m, tmp_path_factory):
    base = tmp_path_factory.mktemp("gallery-1m")
    storage.write_table(str(base / "manifest.parquet"), sample_manifest())
    run_embed(EmbedConfig(manifest=str(base / "manifest.parquet"), out=str(base / "faces"), progress=False))
    real = storage.read_table(outputs(str(base / "faces"))["faces"], columns=["image_id", "face_index", "uri", "bbox",
                                                                               "embedding", "model", "weights_sha256"])
    fake = faces_table(synthetic.clustered(GALLERY - real.num_rows, 128, seed=0), prefix="syn")
    gallery = pa.concat_tables([real, fake.select(real.column_names).cast(real.schema)])
    del fake
    spec = get_model()
    build.build_version(gallery, str(base / "root"), build.BuildOptions(
        model=spec.name, weights_sha256=weights_fingerprint(spec), nlist=NLIST, shards=2))
    probes = synthetic.clustered(CALIBRATION_PROBES + HELD_OUT, 128, seed=20261126)   # other persons
    storage.write_table(str(base / "nonmated.parquet"), faces_table(probes[:CALIBRATION_PROBES], prefix="nm"))
    storage.write_table(str(base / "heldout.parquet"), faces_table(probes[CALIBRATION_PROBES:], prefix="q"))
    storage.write_table(str(base / "mated.parquet"), real)
    return {"base": base, "root": str(base / "root"), "heldout": probes[CALIBRATION_PROBES:]}


def identify(root_1m, probes: str, out: str, **kwargs) -> search.SearchSummary:
    return search.run_search(search.SearchConfig(
        probes=str(root_1m["base"] / probes), root=root_1m["root"], out=str(root_1m["base"] / out),
        purpose="test: identify at 1M", mode="identify", **kwargs))


def test_identify_at_1m_is_served_once_calibrated_and_holds_its_bound(root_1m):
    base, root = root_1m["base"], root_1m["root"]
    handle = open_version(root)
    assert handle.total == GALLERY

    # before: the shipped LFW calibration cannot certify FPIR 1e-3 at 1M faces, so identify refuses
    with pytest.raises(calibration.CalibrationError, match="supports galleries up to about"):
        identify(root_1m, "heldout.parquet", "out-before", max_fpir=TARGET_FPIR)

    summary = run_calibrate(CalibrateConfig(probes=str(base / "nonmated.parquet"), root=root, top_k=10,
                                            purpose="test: calibrate the 1M gallery"))
    assert summary.searches == CALIBRATION_PROBES and summary.identity_column is None
    cal = calibration.find_gallery(root, model=None, index_version=handle.version, gallery_size=handle.total)
    assert cal is not None and cal.job_id == summary.job_id and cal.min_certified_fpir <= TARGET_FPIR

    # after: served, threshold from the live calibration, recorded
    served = identify(root_1m, "heldout.parquet", "out-heldout", max_fpir=TARGET_FPIR, top_k=10)
    threshold = served.threshold
    assert threshold == pytest.approx(cal.threshold_for_fpir(TARGET_FPIR))
    assert served.calibration.startswith(f"live gallery: index version {handle.version} (1,000,000 faces)")
    bound = float(cal.fpir_upper(threshold))
    assert bound <= TARGET_FPIR

    # held-out non-mated probes: searches with any candidate are false positives
    results = storage.read_table(search.outputs(str(base / "out-heldout"))["results"])
    hits = results.filter(pc.is_valid(results["rank"]))
    false_positive = len(set(hits["probe_image_id"].to_pylist()))
    measured = false_positive / HELD_OUT
    print(f"1M gallery: threshold {threshold:.4f}, certified FPIR <= {bound:.2e} from {cal.n_searches} searches; "
          f"held-out FPIR {false_positive}/{HELD_OUT} = {measured:.2e}")
    assert measured <= bound

    # the same count from the searched scores; and a looser threshold would have shown it (the test can fail)
    D, _ = search_version(handle, root_1m["heldout"], 1, handle.nprobe)
    held_max = D[:, 0]
    assert int((held_max >= threshold).sum()) == false_positive
    loose = cal.threshold_for_fpir(0.2)
    assert (held_max >= loose).mean() > TARGET_FPIR

    # mated probes (the real sample faces, also in the gallery) are found above the threshold
    mated = identify(root_1m, "mated.parquet", "out-mated", max_fpir=TARGET_FPIR, top_k=3)
    table = storage.read_table(search.outputs(str(base / "out-mated"))["results"])
    top = table.filter(pc.equal(table["rank"], 1))
    assert mated.threshold == threshold
    assert pc.all(pc.equal(top["probe_image_id"], top["gallery_image_id"])).as_py()
    assert top.num_rows == mated.searched_faces


def test_beyond_the_measured_range_only_with_allow_extrapolation(root_1m):
    with pytest.raises(calibration.CalibrationError, match="--allow-extrapolation"):
        identify(root_1m, "heldout.parquet", "out-1e4", max_fpir=1e-4)
    extra = identify(root_1m, "heldout.parquet", "out-1e4-ext", max_fpir=1e-4, allow_extrapolation=True)
    cal = calibration.find_gallery(root_1m["root"], model=None, index_version=open_version(root_1m["root"]).version,
                                   gallery_size=GALLERY)
    assert extra.threshold_how.startswith("EXTRAPOLATED") and "interval [" in extra.threshold_how
    assert extra.threshold > cal.threshold_for_fpir(TARGET_FPIR)
    D, _ = search_version(open_version(root_1m["root"]), root_1m["heldout"], 1)
    assert int((D[:, 0] >= extra.threshold).sum()) == 0


def test_more_ivf_lists_than_calibrated_is_said(root_1m):
    handle = open_version(root_1m["root"])
    wider = identify(root_1m, "heldout.parquet", "out-nprobe", max_fpir=TARGET_FPIR, nprobe=2 * handle.nprobe)
    assert f"--nprobe {2 * handle.nprobe}, above the calibration's {handle.nprobe}" in wider.threshold_how
