"""facelake.index: parameters, build/publish/load/search on real faiss, small real Ray, loopback S3.

References are exact: IndexFlatIP over the same vectors (ids exactly, distances to 4 decimals,
as faiss's tests/test_contrib.py compares), and builds crash on purpose before the pointer.
"""

from __future__ import annotations

import json
import os

import faiss
import numpy as np
import pyarrow as pa
import pytest

from facelake import storage
from facelake.errors import ConfigError, IndexVersionError
from facelake.index import build, joining, layout, load, params, search, searchers, synthetic, train, tune
from facelake.index.build import BuildOptions

MODEL = "sface-yunet"
WEIGHTS = "0" * 64


def faces_table(xb: np.ndarray, **extra) -> pa.Table:
    n, d = xb.shape
    columns = {
        "image_id": pa.array([f"img-{i:07d}" for i in range(n)]),
        "face_index": pa.array(np.arange(n, dtype=np.int32) % 3),
        "bbox": pa.array([[i % 50, 0, 32, 32] for i in range(n)], type=pa.list_(pa.int32(), 4)),
        "embedding": pa.FixedSizeListArray.from_arrays(pa.array(xb.ravel()), d),
    }
    columns.update(extra)
    return pa.table(columns)


def exact(xb: np.ndarray, xq: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    flat = faiss.IndexFlatIP(xb.shape[1])
    flat.add(xb)
    return flat.search(xq, k)


def make(root, xb, **kwargs) -> dict:
    return build.build_version(faces_table(xb), str(root), BuildOptions(model=MODEL, weights_sha256=WEIGHTS, **kwargs))


# ---------------------------------------------------------------- parameters (no Ray)

def test_default_params_follow_collection_size():
    tiny = params.choose_params(61, 128)
    assert (tiny.nlist, tiny.nprobe, tiny.train_size, tiny.factory) == (1, 1, 61, "IVF1,Flat")
    mid = params.choose_params(100_000, 128)
    assert (mid.nlist, mid.nprobe) == (1024, 16)
    big = params.choose_params(1_000_000, 512, pq=64)
    assert (big.nlist, big.nprobe, big.factory) == (4096, 64, "IVF4096,PQ64x4fs")
    assert params.choose_params(10**10, 128).nlist == params.MAX_NLIST
    for n in (1, 38, 39, 1000, 77_777):
        p = params.choose_params(n, 64)
        assert p.nlist & (p.nlist - 1) == 0 and n >= p.nlist * min(n // p.nlist, 39)


@pytest.mark.parametrize("kwargs, fix", [
    ({"pq": 12}, "must be even and divide the embedding dimension 128"),
    ({"nlist": 500}, "out of range for 100 faces"),
    ({"pq": 16}, "omit --pq"),
    ({"nprobe": 9}, "within 1..nlist"),
])
def test_bad_params_name_the_fix(kwargs, fix):
    with pytest.raises(ConfigError, match=fix):
        params.choose_params(100, 128, **({"nlist": 4} if "nprobe" in kwargs else {}), **kwargs)


def test_merge_topk_pads_missing_results():
    d1, i1 = np.array([[0.9, 0.5]], np.float32), np.array([[7, 3]])
    d2, i2 = np.array([[0.7, -3.4e38]], np.float32), np.array([[11, -1]])
    D, I = search.merge_topk([(d1, i1), (d2, i2)], 4)
    assert I.tolist() == [[7, 11, 3, -1]]
    np.testing.assert_allclose(D[0, :3], [0.9, 0.7, 0.5])


# ---------------------------------------------------------------- build, publish, load, search

def test_recall_at_10_with_default_params_on_100k(ray_local, tmp_path):
    xb = synthetic.clustered(100_000, 128)
    xq = synthetic.queries(xb, 500)
    manifest = make(tmp_path, xb, shards=2)
    assert (manifest["nlist"], manifest["total"]) == (1024, 100_000)
    handle = load.open_version(str(tmp_path), expect_model=MODEL, expect_dim=128)
    _, found = searchers.search_version(handle, xq, 10)
    _, truth = exact(xb, xq, 10)
    assert synthetic.recall_at_k(found, truth) >= 0.98


def test_merged_shards_equal_exact_and_unsharded(ray_local, tmp_path):
    xb = synthetic.clustered(6000, 64, seed=3)
    xq = synthetic.queries(xb, 200, seed=4)
    sharded = make(tmp_path / "a", xb, shards=4, nlist=32)
    make(tmp_path / "b", xb, shards=1, nlist=32)
    assert [s["count"] for s in sharded["shards"]] == [1500] * 4
    h4, h1 = load.open_version(str(tmp_path / "a")), load.open_version(str(tmp_path / "b"))
    actors = searchers.start_searchers(h4)
    D4, I4 = searchers.search_version(h4, xq, 10, nprobe=32, actors=actors)
    D1, I1 = searchers.search_version(h1, xq, 10, nprobe=32)
    De, Ie = exact(xb, xq, 10)   # faiss ids follow (image_id, face_index) order = row order here
    np.testing.assert_array_equal(I4, I1)
    np.testing.assert_array_equal(I4, Ie)
    np.testing.assert_almost_equal(D4, D1, decimal=4)
    np.testing.assert_almost_equal(D4, De, decimal=4)
    ids = load.load_ids(h4)
    assert ids.column("faiss_id").to_pylist() == list(range(6000))
    assert ids.column("image_id")[int(I4[0, 0])].as_py() == f"img-{I4[0, 0]:07d}"
    # a batch cut into one piece per call a searcher runs at once: the same rows in probe order
    assert actors.calls >= 2
    for calls in (1, 3, 7):
        cut = searchers.Searchers(list(actors), calls)
        Dc, Ic, rows = searchers.search_rows(h4, xq, 10, nprobe=32, actors=cut)
        np.testing.assert_array_equal(Ic, Ie)
        np.testing.assert_almost_equal(Dc, De, decimal=4)
        assert rows["faiss_id"].to_pylist() == Ic.reshape(-1).tolist()
        np.testing.assert_array_equal(searchers.search_version(h4, xq, 10, nprobe=32, actors=cut)[1], Ie)


def test_crash_before_pointer_leaves_old_version_live(ray_local, tmp_path):
    xb = synthetic.clustered(3000, 32, seed=5)
    first = make(tmp_path, xb, shards=2)

    def crash(version):
        raise KeyboardInterrupt(f"killed before publishing {version}")

    with pytest.raises(KeyboardInterrupt):
        make(tmp_path, synthetic.clustered(3000, 32, seed=6), shards=2, hooks={"before_pointer": crash})
    assert layout.current_version(str(tmp_path)) == first["version"]
    handle = load.open_version(str(tmp_path))
    D, I = searchers.search_version(handle, xb[:5], 1)
    assert I[:, 0].tolist() == [0, 1, 2, 3, 4]
    with pytest.raises(KeyboardInterrupt):
        make(tmp_path, xb, hooks={"before_manifest": crash})
    assert layout.current_version(str(tmp_path)) == first["version"]


def test_corrupted_or_missing_shard_is_refused(ray_local, tmp_path):
    xb = synthetic.clustered(2000, 32, seed=7)
    make(tmp_path, xb, shards=2)
    handle = load.open_version(str(tmp_path))
    path = tmp_path / "index" / handle.version / "shard-00001.faiss"
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x01
    path.write_bytes(bytes(data))
    load.load_shard(handle, 0)
    with pytest.raises(IndexVersionError, match="shard-00001.faiss is corrupt.*rebuild"):
        load.load_shard(handle, 1)
    with pytest.raises(IndexVersionError, match="corrupt"):
        searchers.search_version(handle, xb[:2], 5)
    os.remove(tmp_path / "index" / handle.version / "shard-00000.ids.arrow")
    with pytest.raises(IndexVersionError, match="missing"):
        load.load_shard(handle, 0)
    manifest = tmp_path / "index" / handle.version / "manifest.json"
    manifest.write_text(manifest.read_text().replace('"total": 2000', '"total": 1999'))
    with pytest.raises(IndexVersionError, match="changed after publishing"):
        load.open_version(str(tmp_path))


def test_other_model_dimension_or_version_refused(ray_local, tmp_path):
    with pytest.raises(IndexVersionError, match="no index is published"):
        load.open_version(str(tmp_path))
    make(tmp_path, synthetic.clustered(500, 32))
    with pytest.raises(IndexVersionError, match="built with model 'sface-yunet'.*probes use 'arcface'"):
        load.open_version(str(tmp_path), expect_model="arcface")
    with pytest.raises(IndexVersionError, match="32-d.*probes are 128-d"):
        load.open_version(str(tmp_path), expect_dim=128)
    with pytest.raises(IndexVersionError, match="no manifest"):
        load.open_version(str(tmp_path), "20200101T000000.000Z-abcdef")
    mixed = faces_table(synthetic.clustered(10, 32), model=pa.array(["other"] * 10))
    with pytest.raises(ConfigError, match="one model at a time"):
        build.build_version(mixed, str(tmp_path), BuildOptions(model=MODEL, weights_sha256=WEIGHTS))


def test_prune_keeps_last_k_and_the_live_one(ray_local, tmp_path):
    xb = synthetic.clustered(300, 16)
    names = [make(tmp_path, xb, keep=10)["version"] for _ in range(4)]
    assert layout.list_versions(str(tmp_path)) == sorted(names) == names
    crashed_old = tmp_path / "index" / "20000101T000000.000Z-000000"
    crashed_new = tmp_path / "index" / "29990101T000000.000Z-000000"
    crashed_old.mkdir()
    crashed_new.mkdir()
    manifest_sha = layout.sha256((tmp_path / "index" / names[1] / "manifest.json").read_bytes())
    layout.publish(str(tmp_path), names[1], manifest_sha)       # roll back to an older version
    removed = layout.prune(str(tmp_path), keep=2)
    assert removed == sorted([crashed_old.name, names[0]])
    assert layout.list_versions(str(tmp_path)) == names[1:]
    assert crashed_new.exists()                                # maybe a build in progress
    layout.prune(str(tmp_path), keep=1)
    assert layout.list_versions(str(tmp_path)) == [names[1], names[3]]
    load.open_version(str(tmp_path))
    with pytest.raises(ConfigError, match="at least 1"):
        layout.prune(str(tmp_path), keep=0)


def test_rebuild_reuses_the_trained_quantizer(ray_local, tmp_path):
    xb = synthetic.clustered(4000, 32, seed=9)
    first = make(tmp_path, xb)
    second = make(tmp_path, xb[:3000], trained_from=first["version"])
    assert second["trained_from"] == first["version"] and second["nlist"] == first["nlist"]
    assert second["files"]["trained.faiss"]["sha256"] == first["files"]["trained.faiss"]["sha256"]
    with pytest.raises(ConfigError, match="drop --nlist/--pq"):
        make(tmp_path, xb, trained_from=first["version"], nlist=8)


def test_tiny_collection_gets_tiny_params_and_still_works(ray_local, tmp_path):
    xb = synthetic.clustered(61, 128, seed=11)       # the size of the sample's faces
    manifest = make(tmp_path, xb)
    assert (manifest["nlist"], manifest["nprobe"], len(manifest["shards"])) == (1, 1, 1)
    handle = load.open_version(str(tmp_path))
    D, I = searchers.search_version(handle, xb, 3)
    assert I[:, 0].tolist() == list(range(61))
    np.testing.assert_allclose(D[:, 0], 1.0, atol=1e-5)


def test_s3_round_trip(ray_local, s3_bucket):
    xb = synthetic.clustered(3000, 64, seed=12)
    xq = synthetic.queries(xb, 50)
    faces_uri = f"{s3_bucket}/faces/part-0.parquet"
    storage.write_table(faces_uri, faces_table(xb))
    root = f"{s3_bucket}/lake"
    manifest = build.build_version(f"{s3_bucket}/faces", root,
                                   BuildOptions(model=MODEL, weights_sha256=WEIGHTS, shards=2))
    assert manifest["source"] == f"{s3_bucket}/faces"
    pointer = json.loads(storage.read_bytes(f"{root}/index/CURRENT"))
    assert pointer["version"] == manifest["version"] == layout.list_versions(root)[-1]
    handle = load.open_version(root, expect_model=MODEL, expect_dim=64)
    D, I = searchers.search_version(handle, xq, 10, nprobe=handle.nlist)
    De, Ie = exact(xb, xq, 10)
    np.testing.assert_array_equal(I, Ie)
    np.testing.assert_almost_equal(D, De, decimal=4)


# ---------------------------------------------------------------- archive scale (issue 13)

def _write_parts(folder, xb, parts: int) -> list[str]:
    """The faces table as several Parquet part files, with a uri and a carried column."""
    n = len(xb)
    table = faces_table(xb, uri=pa.array([f"s3://photos/{i}.jpg" for i in range(n)]),
                        camera=pa.array([f"cam-{i % 7}" for i in range(n)]),
                        model=pa.array([MODEL] * n), weights_sha256=pa.array([WEIGHTS] * n))
    edges = np.linspace(0, n, parts + 1).astype(int)
    uris = []
    for number, (a, b) in enumerate(zip(edges[:-1], edges[1:])):
        uri = str(folder / "faces" / f"part-{number:05d}.parquet")
        storage.write_table(uri, table.slice(a, b - a))
        uris.append(uri)
    return uris


def test_shards_read_part_files_and_carry_result_columns(ray_local, tmp_path):
    """Shard tasks read their own row ranges across part files; the id tables carry every column
    a result row needs, and erased images are left out of every shard."""
    xb = synthetic.clustered(5000, 32, seed=21)
    _write_parts(tmp_path, xb, parts=3)
    erased = pa.array(["img-0000007", "img-0004999"])
    manifest = build.build_version(str(tmp_path / "faces"), str(tmp_path / "root"), BuildOptions(
        model=MODEL, weights_sha256=WEIGHTS, shards=4, erased_ids=erased))
    assert manifest["total"] == 4998 and manifest["erased_faces"] == 2
    assert manifest["erased_ids_sha256"] and manifest["source"] == str(tmp_path / "faces")
    handle = load.open_version(str(tmp_path / "root"))
    ids = load.load_ids(handle)
    assert {"uri", "camera", "faiss_id", "image_id", "bbox"} <= set(ids.column_names)
    assert "embedding" not in ids.column_names and "model" not in ids.column_names
    assert ids.num_rows == 4998 and not set(erased.to_pylist()) & set(ids["image_id"].to_pylist())
    row = ids.filter(pa.compute.equal(ids["faiss_id"], 1234)).to_pylist()[0]
    assert (row["image_id"], row["uri"], row["camera"]) == ("img-0001234", "s3://photos/1234.jpg", "cam-2")
    D, I, rows = searchers.search_rows(handle, xb[[1234, 7]], 3, nprobe=handle.nlist)
    assert I[0, 0] == 1234 and rows["uri"][0].as_py() == "s3://photos/1234.jpg"
    assert I[1, 0] != 7, "an erased face was found"


def test_nprobe_is_tuned_from_measured_recall(ray_local, tmp_path):
    xb = synthetic.clustered(20_000, 64, seed=22)
    manifest = make(tmp_path, xb, shards=2)
    curve = {int(k): v for k, v in manifest["tuning"]["recall_at_10"].items()}
    assert manifest["tuning"]["queries"] == 1000 and set(curve) == set(params.nprobe_ladder(manifest["nlist"]))
    chosen = manifest["nprobe"]
    assert curve[chosen] >= params.TARGET_RECALL
    assert all(v < params.TARGET_RECALL for p, v in curve.items() if p < chosen)
    xq = synthetic.queries(xb, 300, seed=23)
    _, found = searchers.search_version(load.open_version(str(tmp_path)), xq, 10)
    assert synthetic.recall_at_k(found, exact(xb, xq, 10)[1]) >= 0.98


def test_choose_nprobe_stops_where_compressed_recall_levels_off():
    reaching = {1: 0.7, 2: 0.9, 4: 0.991, 8: 0.995}
    assert tune.choose_nprobe(reaching, 4096, 0.99) == 4
    levelling = {8: 0.9611, 16: 0.9875, 32: 0.9888, 64: 0.9879, 512: 0.9846}    # measured: PQ32, 60k faces
    assert tune.choose_nprobe(levelling, 1024, 0.99) == 16
    assert tune.choose_nprobe({1: 0.5, 2: 0.6}, 2, 0.99) == 2


def test_compressed_shards_rerank_to_exact_quality(ray_local, tmp_path):
    """IVF-PQ codes in RAM, full vectors memory-mapped for re-ranking: recall@10 >= 0.98, with
    the resident bytes per face far below IVF-Flat's."""
    xb = synthetic.clustered(60_000, 128, seed=24)
    manifest = make(tmp_path, xb, shards=2, pq=32)
    assert manifest["factory"].endswith("PQ32x4fs") and manifest["rerank"] == params.RERANK_FACTOR
    handle = load.open_version(str(tmp_path))
    shard = load.open_shard(handle, 0)
    assert isinstance(shard.vectors, np.memmap)
    per_face = sum(s["resident_bytes"] for s in manifest["shards"]) / manifest["total"]
    assert per_face <= 100, per_face
    xq = synthetic.queries(xb, 300, seed=25)
    _, found = searchers.search_version(handle, xq, 10)
    assert synthetic.recall_at_k(found, exact(xb, xq, 10)[1]) >= 0.98
    no_rerank = make(tmp_path / "b", xb, pq=32, rerank=0, nprobe=manifest["nprobe"])
    _, rough = searchers.search_version(load.open_version(str(tmp_path / "b")), xq, 10)
    assert no_rerank["rerank"] == 0
    assert synthetic.recall_at_k(rough, exact(xb, xq, 10)[1]) < synthetic.recall_at_k(found, exact(xb, xq, 10)[1])


@pytest.mark.parametrize("pq", [0, 16])
def test_lists_found_once_per_batch_give_the_same_results(ray_local, tmp_path, pq):
    """Shards share the trained quantizer: assigning each probe's lists once (CoarseQuantizer)
    and searching every shard over them returns exactly what each shard's own search returns."""
    xb = synthetic.clustered(12_000, 32, seed=31)
    make(tmp_path, xb, shards=3, nlist=64, pq=pq)
    handle = load.open_version(str(tmp_path))
    each = [searchers.LocalShardSearcher(handle, s) for s in range(handle.shard_count)]
    xq = synthetic.queries(xb, 200, seed=32)
    for nprobe in (1, 4, 64):
        D0, I0, rows0 = searchers.search_rows(handle, xq, 10, nprobe, searchers=each)
        D1, I1, rows1 = searchers.search_rows(handle, xq, 10, nprobe, searchers=each,
                                              coarse=search.CoarseQuantizer(handle))
        assert np.array_equal(I0, I1) and np.allclose(D0, D1) and rows0.equals(rows1)
    assert synthetic.recall_at_k(I1, exact(xb, xq, 10)[1]) > 0.99      # nprobe 64 of 64: exact lists


def _by_score(D: np.ndarray, I: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Each row ordered by (similarity desc, id asc): equal similarities may come in any order."""
    order = np.lexsort((I, -D), axis=1)
    return np.take_along_axis(D, order, 1), np.take_along_axis(I, order, 1)


@pytest.mark.parametrize("pq", [0, 16])
def test_one_searcher_holding_every_shard_merges_them_into_one_index(ray_local, tmp_path, pq):
    """A searcher holding several shards joins their lists into one index (MergedShards). IVF-Flat:
    the same candidates and similarities as one searcher per shard merged by the caller (ties in
    any order). IVF-PQ: the joined index scores exactly what each shard scores (same codebooks),
    the re-ranked similarities are the exact ones, and recall stays with the shards searched
    apart. Either way each row taken is the winner's own id-table row."""
    xb = synthetic.clustered(9_000, 32, seed=41)
    make(tmp_path, xb, shards=3, nlist=32, pq=pq)
    handle = load.open_version(str(tmp_path))
    apart = [searchers.LocalShardSearcher(handle, s) for s in range(handle.shard_count)]
    together = [searchers.LocalShardSearcher(handle, [0, 1, 2], threads=2)]
    assert together[0].merged is not None and together[0].ntotal() == 9_000
    assert all(shard.index is None for shard in together[0].shards)          # codes moved, not copied
    xq = synthetic.queries(xb, 150, seed=42)
    coarse = search.CoarseQuantizer(handle)
    lists = coarse.assign(xq, 8)
    if pq:                                     # the PQ scan itself: joined == apart, merged by score
        scans = [search.search_shard(s.index, xq, 50, 8, lists) for s in apart]
        D0, I0 = _by_score(*search.merge_topk(scans, 50))
        D1, I1 = _by_score(*search.search_shard(together[0].index, xq, 50, 8, lists))
        above_cut = D0 > D0[:, -1:]                     # equal scores at the cut may go either way
        assert np.allclose(D0, D1) and np.array_equal(np.where(above_cut, I0, -1), np.where(above_cut, I1, -1))
        assert above_cut.mean() > 0.5
    truth = exact(xb, xq, 10)[1]
    for k, nprobe in ((10, 4), (10, 32), (3_100, 32)):          # k beyond one shard's size pads
        D0, I0, rows0 = searchers.search_rows(handle, xq, k, nprobe, searchers=apart, coarse=coarse)
        D1, I1, rows1 = searchers.search_rows(handle, xq, k, nprobe, searchers=together, coarse=coarse)
        found = I1 >= 0
        assert rows1["faiss_id"].to_pylist() == [i if i >= 0 else None for i in I1.reshape(-1)]
        assert np.allclose(D1[found], np.einsum("qd,qkd->qk", xq, xb[np.where(found, I1, 0)])[found], atol=1e-5)
        if not pq:
            assert all(map(np.array_equal, _by_score(D0, I0), _by_score(D1, I1)))
        elif k == 10:
            assert synthetic.recall_at_k(I1, truth) >= synthetic.recall_at_k(I0, truth) - 0.01
        if k > 3_000:
            assert (I1[:, 3_000:] >= 0).all() == (I0[:, 3_000:] >= 0).all()
    assert synthetic.recall_at_k(I1[:, :10], truth) >= (0.99 if not pq else 0.9)


def test_joined_fast_scan_lists_keep_every_code_past_1024_entries(ray_local, tmp_path):
    """One list per shard holding exactly 1,024 codes, joined three times over: faiss's own
    merge_from overflows there (BlockInvertedLists::add_entries); join_lists must give the codes
    each shard scores, so the joined scan equals the shards' scans merged."""
    xb = synthetic.clustered(3 * 1024, 32, seed=61)
    make(tmp_path, xb, shard_size=1024, nlist=1, pq=16)
    handle = load.open_version(str(tmp_path))
    assert [entry["count"] for entry in handle.manifest["shards"]] == [1024] * 3
    apart = [searchers.LocalShardSearcher(handle, s) for s in range(3)]
    together = searchers.LocalShardSearcher(handle, [0, 1, 2])
    assert together.merged is not None and together.ntotal() == 3 * 1024
    xq = synthetic.queries(xb, 100, seed=62)
    D0, I0 = _by_score(*search.merge_topk([search.search_shard(s.index, xq, 3 * 1024, 1) for s in apart], 3 * 1024))
    D1, I1 = _by_score(*search.search_shard(together.index, xq, 3 * 1024, 1))
    assert np.allclose(D0, D1) and np.array_equal(I0, I1)          # every code, every score


def test_shards_of_another_training_are_not_merged(ray_local, tmp_path):
    """Lists can be joined only over the same quantizer and codebooks: shards of two versions
    trained apart stay separate (and search exactly as they would alone)."""
    xb = synthetic.clustered(6_000, 32, seed=51)
    make(tmp_path / "a", xb[:3_000], nlist=16, pq=16)
    make(tmp_path / "b", xb[3_000:], nlist=16, pq=16)
    shards = [load.open_shard(load.open_version(str(tmp_path / name)), 0) for name in ("a", "b")]
    assert not joining.MergedShards.possible(shards)
    assert joining.MergedShards.possible([shards[0], load.open_shard(load.open_version(str(tmp_path / "a")), 0)])


def test_id_locator_finds_shard_and_row():
    """Disjoint id ranges (a build) and interleaved ones (after rebuilds) find the same shard and
    row; -1 and ids no shard holds give -1."""
    columns = [np.array([0, 3, 7]), np.array([], np.int64), np.array([10, 11, 20])]
    interleaved = [np.array([0, 11, 20]), np.array([3, 7]), np.array([10, 12])]
    for ids in (columns, interleaved):
        locator = search.IdLocator(ids)
        every = np.concatenate(ids)
        owner, row = locator.locate(np.concatenate([every, [-1, 5, 99]]).reshape(1, -1))
        assert [ids[o][r] for o, r in zip(owner[0, :len(every)], row[0, :len(every)])] == every.tolist()
        assert owner[0, len(every):].tolist() == [-1, -1, -1] and row[0, len(every):].tolist() == [-1, -1, -1]
    assert search.IdLocator([np.array([], np.int64)]).locate(np.array([1, -1]))[0].tolist() == [-1, -1]


def test_searcher_groups_fit_the_smallest_node_and_use_every_node(ray_local, tmp_path):
    xb = synthetic.clustered(8_000, 32, seed=43)
    make(tmp_path, xb, shards=4, nlist=16)
    handle = load.open_version(str(tmp_path))
    one = searchers.shard_memory(handle, 0)
    big = {"CPU": 1, "memory": 100 * one}
    assert searchers.searcher_groups(handle, [big]) == [[0, 1, 2, 3]]              # one CPU: one searcher
    assert searchers.searcher_groups(handle, [big, big]) == [[0, 1], [2, 3]]       # one per node
    assert searchers.searcher_groups(handle, [{"CPU": 2, "memory": 100 * one}]) == [[0, 1, 2, 3]]
    assert searchers.searcher_groups(handle, [big] * 9) == [[0], [1], [2], [3]]    # never more than shards
    tight = {"CPU": 1, "memory": searchers.group_memory(handle, [0, 1])}
    assert searchers.searcher_groups(handle, [tight]) == [[0, 1], [2, 3]]          # split to fit a node
    too_small = {"CPU": 1, "memory": one - 1}
    assert searchers.searcher_groups(handle, [too_small]) == [[0], [1], [2], [3]]  # Ray then refuses, not swaps


def test_drift_sample_takes_recorded_part_rows_without_footers(ray_local, tmp_path, monkeypatch):
    """The nightly drift check samples the faces of record; given the table version's recorded
    row counts it reads no footer, and measures exactly what it measures from the footers."""
    xb = synthetic.clustered(3_000, 32, seed=71)
    uris = []
    for i, (a, b) in enumerate(((0, 1_000), (1_000, 1_700), (1_700, 3_000))):
        uris.append(str(tmp_path / f"part-{i}.parquet"))
        storage.write_table(uris[-1], faces_table(xb[a:b]))
    trained = faiss.serialize_index(train.train(xb, params.choose_params(3_000, 32, nlist=16)))
    from_footers = train.sampled_similarity(uris, trained, 500)

    def no_footers(*_a, **_k):
        raise AssertionError("a footer was read")

    monkeypatch.setattr(train, "list_parts", no_footers)
    assert train.sampled_similarity(uris, trained, 500, rows=[1_000, 700, 1_300]) == from_footers
    assert 0.5 < from_footers <= 1.0
