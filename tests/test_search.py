"""facelake search and facelake audit on real Ray (2 CPUs), real faiss and the bundled photos.

References are exact (IndexFlatIP over the same vectors); a job is failed on purpose half-way
and must still leave its audit record.
"""

from __future__ import annotations

import json

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest

from facelake import calibration, faults, storage
from facelake.record import audit
from facelake.errors import ConfigError, IndexVersionError
from facelake.faces import manifest
from facelake.index import build, parts, synthetic
from facelake.jobs import search
from facelake.jobs.embed import EmbedConfig, outputs, run_embed
from facelake.schema import RESULT_COLUMNS
from tests.helpers import (MODEL, SAMPLE_DIR, WEIGHTS, exact, faceless_jpeg, faces_table, ranked_ids, results,
                           sample_manifest)


def config(probes, root, out, **kwargs) -> search.SearchConfig:
    kwargs.setdefault("purpose", "test: case 42")
    return search.SearchConfig(probes=str(probes), root=str(root), out=str(out), **kwargs)


def cli(*argv: str) -> int:
    """Run the facelake command line in this process; its exit code."""
    from facelake.jobs.cli import main

    try:
        main(list(argv))
    except SystemExit as done:
        return int(done.code or 0)
    return 0


@pytest.mark.parametrize("kwargs, fix", [
    ({"purpose": None}, "--purpose is required"),
    ({"purpose": "   "}, "--purpose is required"),
    ({"max_fpir": 1e-3, "threshold": 0.5}, "not both"),
    ({"top_k": 0}, "--top-k must be at least 1"),
    ({"max_fpir": 2.0}, "between 0 and 1"),
    ({"threshold": 1.5}, "within \\[-1, 1\\]"),
    ({"mode": "match"}, "--mode must be one of"),
    ({"model": "nope"}, "unknown model"),
])
def test_bad_options_refused_before_any_work(tmp_path, kwargs, fix):
    with pytest.raises(ConfigError, match=fix):
        search.run_search(config(tmp_path / "missing-probes", tmp_path / "root", tmp_path / "out", **kwargs))
    assert not (tmp_path / "root").exists() and not (tmp_path / "out").exists()  # nothing touched, no record


def test_cli_missing_purpose_exits_2(tmp_path, capsys):
    assert cli("search", str(tmp_path / "p.parquet"), "--root", str(tmp_path / "root"), "--out", str(tmp_path / "o")) == 2
    assert "--purpose is required" in capsys.readouterr().err
    assert not (tmp_path / "root").exists()


# ---------------------------------------------------------------- result rows and thresholds (no Ray)

def test_result_rows_keep_rank_order_and_give_a_face_without_candidates_one_null_row():
    from facelake.results import ResultSpec, result_table

    probes = faces_table(np.eye(3, 4, dtype=np.float32), "q", case=pa.array(["a", "b", "c"]))
    gallery = pa.table({"faiss_id": pa.array([7, 8], pa.int64()), "image_id": ["g-0", "g-1"],
                        "face_index": pa.array([0, 0], pa.int32()),
                        "bbox": pa.array([[0, 0, 1, 1]] * 2, pa.list_(pa.int32(), 4)), "camera": ["x", "y"]})
    D = np.array([[0.9, 0.4], [0.3, 0.2], [0.8, 0.7]], np.float32)
    I = np.array([[0, 1], [0, 1], [1, -1]])
    rows = pa.concat_tables([gallery.slice(i, 1) if i >= 0 else gallery.slice(0, 1) for i in I.reshape(-1)])
    spec = ResultSpec(job_id="job", index_version="v1", mode="identify", threshold=0.5,
                      probe_carried=("case",), metadata='{"job_id": "job"}')
    table, candidates, empty = result_table(spec, probes, D, I, rows, np.full(D.shape, np.nan))
    assert (candidates, empty) == (2, 1) and table.schema.names[:len(RESULT_COLUMNS)] == RESULT_COLUMNS.names
    got = table.select(["probe_image_id", "rank", "gallery_image_id", "probe_case", "gallery_camera"]).to_pylist()
    assert [tuple(r.values()) for r in got] == [("q-0000000", 1, "g-0", "a", "x"), ("q-0000001", None, None, "b", None),
                                                ("q-0000002", 1, "g-1", "c", "y")]
    assert table["est_false_match_rate"].null_count == 3
    assert json.loads(table.schema.metadata[search.METADATA_KEY]) == {"job_id": "job"}


def test_threshold_policy_without_calibration():
    from facelake.calibration.thresholds import ThresholdOptions, choose_threshold, false_match_rates

    assert choose_threshold(ThresholdOptions("identify", threshold=0.4), None, 10) == (0.4, "explicit --threshold")
    assert choose_threshold(ThresholdOptions("investigate"), None, 10) == (None, "none: no calibration for the model")
    assert np.isnan(false_match_rates(None, np.zeros((2, 3)))).all()


# ---------------------------------------------------------------- synthetic galleries

def test_sharded_search_equals_exact_and_unsharded(ray_local, tmp_path):
    """Merged top-k over 4 shards (Ray actors, nprobe = nlist) = one unsharded index = exact Flat."""
    xb = synthetic.clustered(6000, 128, seed=3)
    xq = synthetic.queries(xb, 200, seed=4)
    gallery = faces_table(xb, camera=pa.array([f"cam{i % 7}" for i in range(len(xb))]))
    storage.write_table(str(tmp_path / "gallery" / "part-0.parquet"), gallery)
    for name, shards in (("sharded", 4), ("single", 1)):
        build.build_version(str(tmp_path / "gallery"), str(tmp_path / name), build.BuildOptions(
            model=MODEL, weights_sha256=WEIGHTS, shards=shards, nlist=32))
    probes = tmp_path / "probes.parquet"
    storage.write_table(str(probes), faces_table(xq, "q", case=pa.array(["c1"] * len(xq))))

    s4 = search.run_search(config(probes, tmp_path / "sharded", tmp_path / "out4", nprobe=32, batch_size=64))
    s1 = search.run_search(config(probes, tmp_path / "single", tmp_path / "out1", nprobe=32, executor="local"))
    r4, r1 = results(tmp_path / "out4"), results(tmp_path / "out1")
    De, Ie = exact(xb, xq, 10)
    I4, I1 = ranked_ids(r4, 200, 10), ranked_ids(r1, 200, 10)
    np.testing.assert_array_equal(I4, Ie)
    np.testing.assert_array_equal(I1, Ie)
    sims = np.zeros((200, 10), np.float32)
    for row in r4.select(["probe_image_id", "rank", "similarity"]).to_pylist():
        sims[int(row["probe_image_id"].split("-")[1]), row["rank"] - 1] = row["similarity"]
    np.testing.assert_almost_equal(sims, De, decimal=4)

    assert s4.searched_faces == s1.searched_faces == 200 and s4.result_rows == 2000
    assert r4.schema.names[:len(RESULT_COLUMNS)] == RESULT_COLUMNS.names
    assert {"probe_uri", "probe_case", "gallery_uri", "gallery_camera"} <= set(r4.column_names)
    first = r4.slice(0, 1).to_pylist()[0]
    g = int(first["gallery_image_id"].split("-")[1])
    assert first["gallery_camera"] == f"cam{g % 7}" and first["probe_case"] == "c1"
    assert first["gallery_bbox"] == [g % 50, 0, 32, 32] and first["index_version"] == s4.index_version
    # investigate: estimated FMR from the shipped calibration, above_threshold at FPIR 1e-3
    cal = calibration.load_default(MODEL)
    expected_threshold = cal.threshold_for_fpir(1e-3, 6000)
    assert s4.threshold == pytest.approx(expected_threshold)
    np.testing.assert_allclose(r4["est_false_match_rate"].to_numpy(), cal.fmr_at(r4["similarity"].to_numpy()))
    assert r4["above_threshold"].to_pylist() == (r4["similarity"].to_numpy() >= expected_threshold).tolist()
    meta = json.loads(pq.read_schema(storage.list_files(str(tmp_path / "out4" / "results"))[0])
                      .metadata[search.METADATA_KEY])
    assert meta["threshold"] == pytest.approx(expected_threshold) and "threshold_for_fpir" in meta["threshold_how"]
    # a faces table of another model is refused, and so is a second search into the same --out
    with pytest.raises(IndexVersionError, match="embedded with model"):
        other = tmp_path / "other.parquet"
        storage.write_table(str(other), faces_table(xq, "q", ).set_column(5, "model", pa.array(["x"] * 200)))
        search.run_search(config(other, tmp_path / "single", tmp_path / "out-other"))
    with pytest.raises(ConfigError, match="own --out"):
        search.run_search(config(probes, tmp_path / "single", tmp_path / "out1"))
    records = audit.list_records(str(tmp_path / "single"), "search")
    assert [r["status"] for r in records] == ["succeeded", "failed", "failed"]


def test_recall_at_10_default_nprobe_on_100k(ray_local, tmp_path):
    xb = synthetic.clustered(100_000, 128)
    xq = synthetic.queries(xb, 500)
    manifest = build.build_version(faces_table(xb), str(tmp_path / "root"), build.BuildOptions(
        model=MODEL, weights_sha256=WEIGHTS, shards=2))
    storage.write_table(str(tmp_path / "probes.parquet"), faces_table(xq, "q"))
    summary = search.run_search(config(tmp_path / "probes.parquet", tmp_path / "root", tmp_path / "out"))
    found = ranked_ids(results(tmp_path / "out"), 500, 10)
    _, truth = exact(xb, xq, 10)
    recall = synthetic.recall_at_k(found, truth)
    assert recall >= 0.98, recall
    assert summary.searched_faces == 500 and manifest["nprobe"] == int(manifest["nprobe"])
    # the id tables carry the faces table's own columns: results need no source table
    assert summary.gallery_carried == ["uri"] and not summary.notes


def test_audit_record_written_when_the_job_fails_half_way(ray_local, tmp_path, capsys):
    xb = synthetic.clustered(2000, 128, seed=7)
    build.build_version(faces_table(xb), str(tmp_path / "root"), build.BuildOptions(
        model=MODEL, weights_sha256=WEIGHTS, shards=2))
    storage.write_table(str(tmp_path / "probes.parquet"), faces_table(synthetic.queries(xb, 300), "q"))

    def crash(summary):
        raise RuntimeError("worker lost after the first batch")

    with pytest.raises(RuntimeError, match="worker lost"), faults.armed("search.after_batch", crash):
        search.run_search(config(tmp_path / "probes.parquet", tmp_path / "root", tmp_path / "out",
                                 purpose="case 7: half-way failure", batch_size=100))
    [record] = audit.list_records(str(tmp_path / "root"))
    assert record["status"] == "failed" and "worker lost" in record["error"]
    assert record["purpose"] == "case 7: half-way failure" and record["kind"] == "search"
    assert record["counts"]["searched_faces"] == 100 and record["counts"]["result_rows"] == 1000
    assert record["probes"]["kind"] == "faces" and len(record["probes"]["sha256"]) == 64
    assert record["started_at"] <= record["ended_at"] and record["user"] and record["host"]
    assert record["index_version"] and record["parameters"]["top_k"] == 10

    assert cli("audit", str(tmp_path / "root")) == 0
    listing = capsys.readouterr().out
    assert record["job_id"] in listing and "case 7: half-way failure" in listing and "failed" in listing
    assert cli("audit", str(tmp_path / "root"), "--json") == 0
    assert json.loads(capsys.readouterr().out)[0]["job_id"] == record["job_id"]


# ---------------------------------------------------------------- the bundled photos, end to end

@pytest.fixture(scope="module")
def sample_root(ray_local, provisioned_weights, tmp_path_factory):
    """The bundled sample embedded by the embed job and indexed under one root."""
    base = tmp_path_factory.mktemp("sample")
    manifest = base / "manifest.parquet"
    storage.write_table(str(manifest), sample_manifest())
    run_embed(EmbedConfig(manifest=str(manifest), out=str(base / "faces"), progress=False))
    faces_uri = outputs(str(base / "faces"))["faces"]
    faces = storage.read_table(faces_uri, columns=["model", "weights_sha256"])
    build.build_version(faces_uri, str(base / "root"), build.BuildOptions(
        model=faces["model"][0].as_py(), weights_sha256=faces["weights_sha256"][0].as_py()))
    return base


def test_sample_identities_found_at_rank_1(sample_root):
    """Every labeled photo searched against all photos (itself excluded): rank-1 identity hits.

    Measured: 61 of 61 labeled photos (every identity has another photo) hit at rank 1 (1.00),
    sface-yunet; median top non-self similarity printed with -s.
    """
    base = sample_root
    faces_uri = outputs(str(base / "faces"))["faces"]
    summary = search.run_search(config(faces_uri, base / "root", base / "out-rank1", top_k=5, executor="local"))
    table = results(base / "out-rank1").to_pylist()
    identity_count = pc.value_counts(pa.array([i for i in sample_manifest()["identity"].to_pylist() if i]))
    with_mate = {v["values"] for v in identity_count.to_pylist() if v["counts"] > 1}
    best: dict[str, tuple[float, str | None]] = {}
    for row in table:
        if row["gallery_image_id"] == row["probe_image_id"] or row["probe_identity"] not in with_mate:
            continue
        image = row["probe_image_id"]
        if image not in best or row["similarity"] > best[image][0]:
            best[image] = (row["similarity"], row["gallery_identity"])
    probes = {row["probe_image_id"]: row["probe_identity"] for row in table if row["probe_identity"] in with_mate}
    hits = sum(best.get(image, (0, None))[1] == identity for image, identity in probes.items())
    rate = hits / len(probes)
    print(f"rank-1 identity hit rate: {hits}/{len(probes)} = {rate:.3f}; median top similarity "
          f"{np.median([b[0] for b in best.values()]):.3f}")
    assert len(probes) >= 50 and rate >= 0.9
    assert summary.gallery_carried and "identity" in summary.gallery_carried


def test_identify_mode_on_a_manifest_of_probe_photos(sample_root, tmp_path):
    """Probe photos (one with no face, one missing) embedded with the index's model, identify mode."""
    base = sample_root
    (tmp_path / "noface.jpg").write_bytes(faceless_jpeg())
    probes = pa.table({
        "image_id": ["p-img1", "p-img2", "p-couple", "p-noface", "p-missing"],
        "uri": [str(SAMPLE_DIR / "img1.jpg"), str(SAMPLE_DIR / "img2.jpg"), str(SAMPLE_DIR / "couple.jpg"),
                str(tmp_path / "noface.jpg"), str(tmp_path / "not-there.jpg")],
        "case_ref": ["A", "A", "B", "C", "C"],
    })
    storage.write_table(str(tmp_path / "probes.parquet"), probes)
    summary = search.run_search(config(tmp_path / "probes.parquet", base / "root", tmp_path / "out",
                                       mode="identify", top_k=10, purpose="case 9: identify"))
    cal = calibration.load_default(MODEL)
    expected = cal.threshold_for_fpir(1e-3, summary.gallery_size)
    assert summary.threshold == pytest.approx(expected)
    table = results(tmp_path / "out")
    errors = storage.read_table(search.outputs(str(tmp_path / "out"))["errors"])
    candidates = table.filter(pc.is_valid(table["rank"]))
    assert len(candidates) and pc.all(pc.greater_equal(candidates["similarity"], expected)).as_py()
    assert set(candidates["above_threshold"].to_pylist()) == {True}
    # img1 and img2 show one person (id00): each finds the other and itself, nothing below threshold
    top = {r["probe_image_id"]: r["gallery_image_id"] for r in candidates.to_pylist() if r["rank"] == 1}
    assert top["p-img1"] == "img1" and top["p-img2"] == "img2"
    # every probe image ends in exactly one table; carried columns on both sides
    in_results, in_errors = set(table["probe_image_id"].to_pylist()), set(errors["image_id"].to_pylist())
    assert in_results == {"p-img1", "p-img2", "p-couple"} and in_errors == {"p-noface", "p-missing"}
    assert errors.num_rows == 2 and set(errors["job_id"].to_pylist()) == {summary.job_id}
    assert set(table["probe_case_ref"].to_pylist()) == {"A", "B"} and "gallery_identity" in table.column_names
    assert summary.probe_images == 5 and summary.probe_errors == 2 and summary.probes_kind == "manifest"
    [record] = [r for r in audit.list_records(str(base / "root")) if r["job_id"] == summary.job_id]
    assert record["status"] == "succeeded" and record["mode"] == "identify"
    assert record["threshold"] == pytest.approx(expected) and "threshold_for_fpir" in record["threshold_how"]
    assert record["probes"]["sha256"] == manifest.validate(str(tmp_path / "probes.parquet")).fingerprint
    # an explicit threshold is taken and recorded as such; faces without a candidate get a null row
    probe_faces = storage.read_table(outputs(search.outputs(str(tmp_path / "out"))["probe_faces"])["faces"])
    xq = parts.embeddings(probe_faces) + np.random.default_rng(0).normal(0, 0.03, (probe_faces.num_rows, 128))
    xq = (xq / np.linalg.norm(xq, axis=1, keepdims=True)).astype(np.float32)   # new photos, cosine ~0.95
    moved = probe_faces.set_column(probe_faces.schema.get_field_index("embedding"), "embedding",
                                   pa.FixedSizeListArray.from_arrays(pa.array(xq.ravel()), 128))
    storage.write_table(str(tmp_path / "moved.parquet"), moved)
    explicit = search.run_search(config(tmp_path / "moved.parquet", base / "root", tmp_path / "out2",
                                        mode="identify", threshold=0.99))
    t2 = results(tmp_path / "out2")
    assert explicit.threshold == 0.99 and explicit.threshold_how == "explicit --threshold"
    assert explicit.result_rows == 0 and t2.num_rows == explicit.no_candidate_faces == moved.num_rows
    assert t2["rank"].null_count == t2.num_rows and t2["gallery_image_id"].null_count == t2.num_rows
