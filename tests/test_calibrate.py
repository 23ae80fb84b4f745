"""facelake calibrate on real Ray (2 CPUs), real faiss and the bundled photos; identify mode using it.

The non-mated scores are checked against an exact reference (cosine over all gallery faces, the
probe's own identity excluded); refusals (other version, other model, too few searches) must name
the fix. The 1M-face gallery is in tests/test_calibrate_1m.py.
"""

from __future__ import annotations

import json

import numpy as np
import pyarrow.parquet as pq
import pytest

from facelake import calibration, storage
from facelake.calibration.gallery import nonmated_max
from facelake.record import audit
from facelake.errors import ConfigError
from facelake.index import build, parts
from facelake.index.load import open_version
from facelake.jobs import search
from facelake.jobs.calibrate import CalibrateConfig, run_calibrate
from facelake.jobs.embed import EmbedConfig, outputs, run_embed
from tests.helpers import sample_manifest


def cli(*argv: str) -> int:
    from facelake.jobs.cli import main

    try:
        main(list(argv))
    except SystemExit as done:
        return int(done.code or 0)
    return 0


@pytest.fixture(scope="module")
def gallery(ray_local, provisioned_weights, tmp_path_factory):
    """The bundled sample embedded (identities carried) and indexed under one root."""
    base = tmp_path_factory.mktemp("calibrate")
    storage.write_table(str(base / "manifest.parquet"), sample_manifest())
    run_embed(EmbedConfig(manifest=str(base / "manifest.parquet"), out=str(base / "faces"), progress=False))
    faces_uri = outputs(str(base / "faces"))["faces"]
    faces = storage.read_table(faces_uri)
    build.build_version(faces_uri, str(base / "root"), build.BuildOptions(
        model=faces["model"][0].as_py(), weights_sha256=faces["weights_sha256"][0].as_py()))
    return {"base": base, "root": str(base / "root"), "faces_uri": faces_uri, "faces": faces}


def exact_nonmated_max(faces) -> np.ndarray:
    """Per face: the highest cosine to a gallery face of another (or unknown) identity."""
    xb = parts.embeddings(faces)
    ids = np.array(faces["identity"].to_pylist(), dtype=object)
    sims = xb @ xb.T
    same = (ids[:, None] == ids[None, :]) & np.array([[i is not None] for i in ids])
    return np.where(same, -np.inf, sims).max(axis=1)


def test_options_refused_before_any_work(tmp_path):
    with pytest.raises(ConfigError, match="--purpose is required"):
        run_calibrate(CalibrateConfig(probes=str(tmp_path / "p"), root=str(tmp_path / "root"), purpose=" "))
    with pytest.raises(ConfigError, match="--top-k must be at least 1"):
        run_calibrate(CalibrateConfig(probes=str(tmp_path / "p"), root=str(tmp_path / "root"), purpose="x", top_k=0))
    assert not (tmp_path / "root").exists()


def test_calibrate_excludes_same_identity_and_matches_exact_scores(gallery):
    handle = open_version(gallery["root"])
    summary = run_calibrate(CalibrateConfig(probes=gallery["faces_uri"], root=gallery["root"], top_k=64,
                                            nprobe=handle.nlist, min_searches=10,
                                            purpose="test: calibrate the sample gallery"))
    faces = gallery["faces"]
    assert summary.searches == faces.num_rows and summary.identity_column == "identity"
    assert summary.excluded_same_identity >= faces.num_rows   # at least every probe's own face
    cal = calibration.load_gallery(storage.join(gallery["root"], "calibration",
                                                f"{handle.version}--{summary.job_id}.gallery-calibration.json"))
    assert (cal.index_version, cal.gallery_size, cal.model) == (handle.version, handle.total, "sface-yunet")
    reference = np.sort(exact_nonmated_max(faces))[::-1]
    np.testing.assert_allclose(cal.scores, reference, atol=1e-4)
    assert cal.scores.max() < 0.99            # the probe itself (same identity) never counted
    [record] = [r for r in audit.list_records(gallery["root"], kind="calibrate") if r["job_id"] == summary.job_id]
    assert record["purpose"] == "test: calibrate the sample gallery" and record["status"] == "succeeded"
    assert record["index_version"] == handle.version and record["counts"]["searches"] == faces.num_rows
    assert record["calibration_file"].endswith(".gallery-calibration.json")


def test_if_stale_does_nothing_when_a_calibration_serves_the_version(gallery, capsys):
    code = cli("calibrate", gallery["faces_uri"], "--root", gallery["root"], "--purpose", "nightly", "--if-stale")
    assert code == 0 and "nothing to do" in capsys.readouterr().out
    last = audit.list_records(gallery["root"], kind="calibrate")[-1]
    assert last["status"] == "skipped" and "already serves" in last["skipped"]


def test_identify_mode_chooses_its_threshold_from_the_live_calibration(gallery, tmp_path):
    handle = open_version(gallery["root"])
    cal = calibration.find_gallery(gallery["root"], model=None, index_version=handle.version,
                                   gallery_size=handle.total)
    summary = search.run_search(search.SearchConfig(
        probes=gallery["faces_uri"], root=gallery["root"], out=str(tmp_path / "out"), purpose="test: identify",
        mode="identify", max_fpir=0.2, executor="local"))
    assert summary.threshold == pytest.approx(cal.threshold_for_fpir(0.2))
    assert summary.calibration.startswith("live gallery: index version " + handle.version)
    assert summary.threshold_how.startswith("measured: --max-fpir 0.2 on the live-gallery calibration")
    meta = json.loads(pq.read_schema(storage.list_files(search.outputs(str(tmp_path / "out"))["results"])[0])
                      .metadata[search.METADATA_KEY])
    assert meta["calibration"] == summary.calibration and meta["threshold"] == summary.threshold
    [record] = [r for r in audit.list_records(gallery["root"]) if r["job_id"] == summary.job_id]
    assert record["calibration"] == summary.calibration and record["threshold_how"] == summary.threshold_how

    # beyond what ~70 searches certify (~0.04): refused, naming the fixes; extrapolated only on request,
    # labelled; far beyond (1e-3, 70x) even the fitted tail refuses
    with pytest.raises(calibration.CalibrationError, match="--allow-extrapolation"):
        search.run_search(search.SearchConfig(
            probes=gallery["faces_uri"], root=gallery["root"], out=str(tmp_path / "out2"), purpose="test",
            mode="identify", max_fpir=0.02, executor="local"))
    with pytest.raises(calibration.CalibrationError, match="even the fitted impostor tail cannot"):
        search.run_search(search.SearchConfig(
            probes=gallery["faces_uri"], root=gallery["root"], out=str(tmp_path / "out4"), purpose="test",
            mode="identify", max_fpir=1e-3, allow_extrapolation=True, executor="local"))
    extra = search.run_search(search.SearchConfig(
        probes=gallery["faces_uri"], root=gallery["root"], out=str(tmp_path / "out3"), purpose="test: extrapolated",
        mode="identify", max_fpir=0.02, allow_extrapolation=True, executor="local"))
    assert extra.threshold > cal.scores.max() and extra.threshold_how.startswith("EXTRAPOLATED")
    assert "interval [" in extra.threshold_how
    [record] = [r for r in audit.list_records(gallery["root"]) if r["job_id"] == extra.job_id]
    assert record["threshold_how"].startswith("EXTRAPOLATED")
    with pytest.raises(ConfigError, match="--allow-extrapolation applies to --mode identify"):
        search.SearchConfig(probes="p", root="r", out="o", purpose="x", allow_extrapolation=True).validate()


def test_calibration_of_another_version_or_model_is_refused(gallery, tmp_path):
    root = gallery["root"]
    old = open_version(root)
    [path] = storage.list_files(calibration.gallery_dir(root), calibration.GALLERY_SUFFIX)
    # another model's weights: refused clearly when named, never picked up by itself
    data = json.loads(storage.read_bytes(path))
    data["weights_sha256"] = "0" * 64
    (tmp_path / "other-model.json").write_text(json.dumps(data))
    with pytest.raises(calibration.CalibrationError, match="not for sface-yunet.*do not apply"):
        search.run_search(search.SearchConfig(
            probes=gallery["faces_uri"], root=root, out=str(tmp_path / "o1"), purpose="t", mode="identify",
            max_fpir=0.2, calibration=str(tmp_path / "other-model.json"), executor="local"))
    # a new version half the size: the old calibration does not serve it
    half = gallery["faces"].slice(0, gallery["faces"].num_rows // 2)
    build.build_version(half, root, build.BuildOptions(model=old.model, weights_sha256=old.manifest["weights_sha256"]))
    new = open_version(root)
    assert calibration.find_gallery(root, model=None, index_version=new.version, gallery_size=new.total) is None
    with pytest.raises(calibration.CalibrationError, match=f"measured on index version {old.version}.*facelake calibrate"):
        search.run_search(search.SearchConfig(
            probes=gallery["faces_uri"], root=root, out=str(tmp_path / "o2"), purpose="t", mode="identify",
            max_fpir=0.2, calibration=path, executor="local"))
    # without one, identify mode behaves as before: the shipped labeled-set calibration
    today = search.run_search(search.SearchConfig(
        probes=gallery["faces_uri"], root=root, out=str(tmp_path / "o3"), purpose="t", mode="identify",
        executor="local"))
    assert today.calibration.startswith("lfw") and "threshold_for_fpir" in today.threshold_how


def test_saturated_and_empty_searches_are_scored_conservatively():
    D = np.array([[0.9, 0.8, 0.7], [0.95, 0.6, 0.5], [0.4, -np.inf, -np.inf]], np.float32)
    I = np.array([[1, 2, 3], [4, 5, 6], [7, -1, -1]])
    same = np.array([[True, True, True], [True, False, False], [True, False, False]])
    scores, excluded, saturated = nonmated_max(D, I, same)
    # all mated: the k-th score bounds the non-mated maximum; mated first: the next one; none left: -1
    np.testing.assert_allclose(scores, [0.7, 0.6, -1.0], atol=1e-6)
    assert saturated == 1 and excluded == 5


def test_calibrate_a_manifest_of_photos_for_a_new_version(gallery, capsys):
    """The probes embedded by the embed job into the work folder; the gallery's id tables carry
    the faces table's identity column, so same-identity candidates are excluded."""
    root = gallery["root"]
    new = open_version(root)                       # the half-size version of the previous test
    names = sorted(n for n in __import__("tests.helpers").helpers.sample_identities())[:12]
    storage.write_table(str(gallery["base"] / "probes.parquet"), sample_manifest(names))
    code = cli("calibrate", str(gallery["base"] / "probes.parquet"), "--root", root, "--purpose", "t: manifest",
               "--top-k", "5")
    assert code == 2 and "too few to calibrate" in capsys.readouterr().err    # refused, naming the fix
    summary = run_calibrate(CalibrateConfig(probes=str(gallery["base"] / "probes.parquet"), root=root,
                                            purpose="t: manifest", top_k=5, min_searches=5))
    assert summary.probes_kind == "manifest" and summary.probe_images == 12 and summary.searches >= 12
    assert summary.index_version == new.version and summary.identity_column == "identity"
    assert not any("carries no 'identity' column" in note for note in summary.notes)
    work = storage.list_files(storage.join(root, "_calibrate"), ".parquet")
    assert work and all("/faces/" in w or "/errors/" in w or "/dropped/" in w for w in work)
    cal = calibration.find_gallery(root, model=None, index_version=new.version, gallery_size=new.total)
    assert cal.job_id == summary.job_id and cal.probes["kind"] == "manifest"
