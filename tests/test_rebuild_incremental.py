"""`facelake rebuild` at O(change) (issue 13, item 5), on real sample photos, real Ray, faiss, moto S3.

Change detection from the source stat (size + mtime locally, size + ETag on S3) instead of reading
every photo; the index version extended from the live one (unchanged shards' files reused, only
shards holding removed / changed / erased faces rebuilt, new faces in delta shards), with search
results equal to a from-scratch build and to exact search.
"""

from __future__ import annotations

import os
import shutil

import faiss
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pytest

from facelake import faults

from facelake import storage
from facelake.record import erasures as erasure_list
from facelake.record import tables as rootmod
from facelake.index import layout
from facelake.index.build import BuildOptions, build_version
from facelake.index.load import load_ids, open_version
from facelake.index.searchers import search_version
from facelake.index.update import _Group, _merge_tiers, _split, plan_groups
from facelake.jobs.erase import EraseConfig, run_erase
from facelake.faces.registry import get_model, weights_fingerprint
from facelake.schema import SOURCE_STAT_SCHEMA
from tests.helpers import (ADDED, BASE, SAMPLE_DIR, Crash, assert_record_consistent, crash, put_photos, rebuild,
                           sample_manifest, write_manifest)


def ids_of(photos: list[str]) -> list[str]:
    return [n.split(".")[0] for n in photos]


def shard_files_by_sha(manifest: dict) -> dict[str, str]:
    """sha256 -> file name of every shard file of a version."""
    return {v["sha256"]: k for k, v in manifest["files"].items() if k.startswith("shard-")}


def topk(handle, xq: np.ndarray, k: int) -> list[list[tuple[str, int, float]]]:
    """Exhaustive (nprobe = nlist) top-k as (image_id, face_index, similarity to 4 decimals)."""
    D, I = search_version(handle, xq, k, nprobe=handle.nlist)
    table = load_ids(handle)
    rows = {f: (i, x) for f, i, x in zip(table["faiss_id"].to_pylist(), table["image_id"].to_pylist(),
                                          table["face_index"].to_pylist())}
    return [[(*rows[i], round(float(d), 4)) for d, i in zip(dr, ir) if i >= 0] for dr, ir in zip(D, I)]


def exact_topk(faces: pa.Table, xq: np.ndarray, k: int) -> list[list[tuple[str, int, float]]]:
    xb = np.array(faces["embedding"].to_pylist(), np.float32)
    faiss.normalize_L2(xb)
    flat = faiss.IndexFlatIP(xb.shape[1])
    flat.add(xb)
    D, I = flat.search(xq, k)
    ids, fis = faces["image_id"].to_pylist(), faces["face_index"].to_pylist()
    return [[(ids[i], fis[i], round(float(d), 4)) for d, i in zip(dr, ir)] for dr, ir in zip(D, I)]


def assert_same_search_as_from_scratch(root: str, scratch_root: str) -> None:
    """The live (extended) version answers as a version built from scratch over the faces of
    record, and both as exact search."""
    faces = rootmod.read_faces(root)
    xq = np.array(faces["embedding"].to_pylist(), np.float32)
    faiss.normalize_L2(xq)
    k = min(5, faces.num_rows)
    version = rootmod.current(root)
    spec = get_model()
    storage.remove(scratch_root, recursive=True)
    build_version([rootmod.uri(root, rootmod.FACES, p) for p in version.faces], scratch_root, BuildOptions(
        model=spec.name, weights_sha256=weights_fingerprint(spec), erased_ids=erasure_list.erased_ids(root)))
    live, scratch = topk(open_version(root), xq, k), topk(open_version(scratch_root), xq, k)
    exact = exact_topk(faces, xq, k)
    assert [set(r) for r in live] == [set(r) for r in scratch] == [set(r) for r in exact]


def test_changed_size_reembedded_unchanged_never_read(ray_local, provisioned_weights, tmp_path):
    photos, root = str(tmp_path / "photos"), str(tmp_path / "root")
    manifest_uri = str(tmp_path / "manifest.parquet")
    put_photos(photos, BASE + ADDED)
    write_manifest(manifest_uri, BASE + ADDED, photos)
    first = rebuild(manifest_uri, root)
    assert first.outcome == "published" and first.hashed == 0
    record = rootmod.read_faces(root)
    assert record["source_size"].null_count == 0 and record["source_mtime_ns"].null_count == 0
    assert record["source_etag"].null_count == record.num_rows    # local files: mtime, no ETag

    # img3: bytes made undecodable, same size and mtime restored: reading it would re-embed it
    # (as a decode error), so it staying in the record proves it was not read
    victim = f"{photos}/{BASE[1]}"
    before = os.stat(victim)
    with open(victim, "r+b") as handle:
        handle.write(b"\0" * 4096)
    os.utime(victim, ns=(before.st_atime_ns, before.st_mtime_ns))
    # ADDED[0] now holds another photo of another size
    shutil.copy(SAMPLE_DIR / "img4.jpg", f"{photos}/{ADDED[0]}")
    assert os.path.getsize(f"{photos}/{ADDED[0]}") != (SAMPLE_DIR / ADDED[0]).stat().st_size

    second = rebuild(manifest_uri, root)
    assert (second.new, second.changed, second.removed) == (0, 1, 0)
    assert second.hashed == 0 and second.embed["images"] == 1
    faces = assert_record_consistent(root)
    assert ids_of([BASE[1]])[0] in faces["image_id"].to_pylist()
    from facelake.faces.imaging import content_sha256
    changed = faces.filter(pc.equal(faces["image_id"], ids_of([ADDED[0]])[0]))
    assert set(changed["content_sha256"].to_pylist()) == {content_sha256((SAMPLE_DIR / "img4.jpg").read_bytes())}
    assert set(changed["source_size"].to_pylist()) == {os.path.getsize(f"{photos}/{ADDED[0]}")}

    # --verify-content reads every photo of record: now the rewritten img3 is found
    third = rebuild(manifest_uri, root, verify_content=True)
    assert third.hashed == len(BASE + ADDED) and third.changed == 1
    errors = rootmod.read_errors(root)
    assert ids_of([BASE[1]])[0] in errors["image_id"].to_pylist()


def test_touched_but_identical_is_not_reembedded(ray_local, provisioned_weights, tmp_path):
    photos, root = str(tmp_path / "photos"), str(tmp_path / "root")
    manifest_uri = str(tmp_path / "manifest.parquet")
    put_photos(photos, BASE)
    write_manifest(manifest_uri, BASE, photos)
    rebuild(manifest_uri, root)
    touched = f"{photos}/{BASE[0]}"
    stamp = os.stat(touched).st_mtime_ns + 5_000_000_000
    os.utime(touched, ns=(stamp, stamp))

    # the stat cannot clear it (same size, other mtime): its bytes alone are read, found equal
    plain = rebuild(manifest_uri, root)
    assert (plain.changed, plain.hashed, plain.restat) == (0, 1, 1) and plain.embed is None
    faces = rootmod.read_faces(root)
    row = faces.filter(pc.equal(faces["image_id"], ids_of(BASE)[0]))
    assert set(row["source_mtime_ns"].to_pylist()) == {stamp}    # the new stat is recorded
    assert rebuild(manifest_uri, root).outcome == "nothing-changed"

    os.utime(touched, ns=(stamp + 10**9, stamp + 10**9))
    verified = rebuild(manifest_uri, root, verify_content=True)
    assert (verified.changed, verified.hashed, verified.restat) == (0, len(BASE), 1) and verified.embed is None
    assert_record_consistent(root)


def test_root_without_stat_columns_is_hashed_once_then_recorded(ray_local, provisioned_weights, tmp_path):
    photos, root = str(tmp_path / "photos"), str(tmp_path / "root")
    manifest_uri = str(tmp_path / "manifest.parquet")
    put_photos(photos, BASE)
    write_manifest(manifest_uri, BASE, photos)
    rebuild(manifest_uri, root)
    # make the record look like one written before the stat columns existed
    base = rootmod.current(root)
    old = {kind: rootmod.read_table(root, kind) for kind in rootmod.KINDS}
    old = {k: (t.drop_columns(SOURCE_STAT_SCHEMA.names) if t is not None else None) for k, t in old.items()}
    everything = pa.concat_arrays([t["image_id"].combine_chunks() for t in old.values() if t is not None])
    rootmod.write_version(root, base, drop_ids=everything, add=old, model=base.model, job_id="old-root")
    assert "source_size" not in rootmod.read_faces(root).column_names

    migrated = rebuild(manifest_uri, root)
    assert (migrated.changed, migrated.hashed, migrated.restat) == (0, len(BASE), len(BASE))
    assert migrated.embed is None
    assert rootmod.read_faces(root)["source_size"].null_count == 0
    again = rebuild(manifest_uri, root)
    assert again.outcome == "nothing-changed" and again.hashed == 0


NIGHT1 = [f"img{i}.jpg" for i in range(1, 31)]
NIGHT2 = ["img31.jpg", "img32.jpg", "img33.jpg"]


@pytest.mark.parametrize("where", ["local", "s3"])
def test_publish_reuses_untouched_shards(where, ray_local, provisioned_weights, tmp_path, request):
    base = str(tmp_path) if where == "local" else request.getfixturevalue("s3_bucket")
    photos, root, manifest_uri = f"{base}/photos", f"{base}/root", f"{base}/manifest/m.parquet"
    scratch = str(tmp_path / "scratch")
    put_photos(photos, NIGHT1 + NIGHT2)
    write_manifest(manifest_uri, NIGHT1, photos)
    first = rebuild(manifest_uri, root)
    v1 = open_version(root).manifest
    assert first.incremental is None and len(v1["shards"]) == 1

    # night 2: new photos go to a delta shard; the first shard's files are reused as they were
    write_manifest(manifest_uri, NIGHT1 + NIGHT2, photos)
    added = rebuild(manifest_uri, root)
    assert added.hashed == 0 and added.embed["images"] == len(NIGHT2)
    assert not added.retrained, added.retrain_reason      # 30 -> 33 photos: within the growth bound
    v2 = open_version(root).manifest
    assert v2["incremental"]["reused_shards"] == [0] and len(v2["shards"]) == 2
    assert v2["shards"][0]["sources"] == v1["shards"][0]["sources"]
    for key in ("index_file", "ids_file"):
        assert v2["files"][v2["shards"][0][key]] == v1["files"][v1["shards"][0][key]]
    if where == "local":       # a hard link: the same file, no bytes copied
        same = os.stat(layout.file_uri(root, v2["version"], v2["shards"][0]["index_file"]))
        assert same.st_ino == os.stat(layout.file_uri(root, v1["version"], v1["shards"][0]["index_file"])).st_ino
    assert v2["next_id"] > v1["next_id"] and v2["trained_from"] == v1["version"]
    assert_record_consistent(root)
    assert_same_search_as_from_scratch(root, scratch)

    # night 3: a photo of the second night is removed: only the shard that held it is rebuilt
    write_manifest(manifest_uri, NIGHT1 + NIGHT2[1:], photos)
    removed = rebuild(manifest_uri, root)
    assert removed.removed == 1 and removed.hashed == 0 and not removed.retrained
    v3 = open_version(root).manifest
    assert v3["incremental"]["reused_shards"] == [0] and v3["incremental"]["built_shards"] == [1]
    kept = {v3["files"][v3["shards"][0][k]]["sha256"] for k in ("index_file", "ids_file")}
    assert kept == {v2["files"][v2["shards"][0][k]]["sha256"] for k in ("index_file", "ids_file")}
    assert v2["files"][v2["shards"][1]["index_file"]]["sha256"] not in shard_files_by_sha(v3)
    assert_record_consistent(root)
    assert_same_search_as_from_scratch(root, scratch)

    # an erasure of a first-night photo: only the first night's shard is rebuilt, the other kept
    erased = run_erase(EraseConfig(root=root, ids=(ids_of(NIGHT1)[0],), reason="test"))
    assert erased.index_version
    v4 = open_version(root).manifest
    assert v4["incremental"]["reused_shards"] == [1]
    reused = next(e for e in v4["shards"] if e.get("reused_from", {}).get("version") == v3["version"])
    assert v4["files"][reused["index_file"]] == v3["files"][v3["shards"][1]["index_file"]]
    assert ids_of(NIGHT1)[0] not in load_ids(open_version(root))["image_id"].to_pylist()
    assert_record_consistent(root)
    assert_same_search_as_from_scratch(root, scratch)
    # --keep: every kept version still opens and verifies (each is self-contained)
    for version in layout.list_versions(root):
        handle = open_version(root, version)
        assert load_ids(handle).num_rows == handle.total


def test_plan_groups_and_tiered_merges():
    from facelake.index.parts import Part

    parts = [Part(uri=f"/r/faces/p{i}.parquet", rows=r, first_row=0) for i, r in enumerate([100, 50, 10])]
    live = {"next_id": 150, "shards": [
        {"shard": 0, "count": 100, "sources": [{"part": "p0.parquet", "part_rows": 100, "start": 0, "stop": 100, "first_id": 0}]},
        {"shard": 1, "count": 50, "sources": [{"part": "p1.parquet", "part_rows": 50, "start": 0, "stop": 50, "first_id": 100}]},
        {"shard": 2, "count": 7, "sources": [{"part": "gone.parquet", "part_rows": 7, "start": 0, "stop": 7, "first_id": 143}]},
    ]}
    groups, next_id = plan_groups(live, parts, size=1000)
    assert [g.reused["shard"] if g.reused else None for g in groups] == [0, 1, None] and next_id == 160
    assert groups[2].pieces == [("p2.parquet", 0, 10, 150)]     # new ids from next_id up; shard 2 vanished
    # MERGE_FACTOR small shards of one tier become one; sealed (large) shards are never merged
    small = [_Group([(f"n{i}", 0, 20, 1000 + 20 * i)], 20) for i in range(4)]
    merged = _merge_tiers([_Group([("big", 0, 900, 0)], 900), *small], size=1000)
    assert len(merged) == 2 and merged[0].rows == 900 and merged[1].rows == 80
    assert [p[3] for p in merged[1].pieces] == sorted(p[3] for p in merged[1].pieces)
    # a full shard size splits a piece, ids staying contiguous
    split = _split([("a", 0, 500, 7)], 300)
    assert [g.pieces for g in split] == [[("a", 0, 300, 7)], [("a", 300, 500, 307)]]


def test_source_stats_local_never_outside_roots(tmp_path):
    from facelake.faces import reader

    inside, outside = tmp_path / "in", tmp_path / "out"
    inside.mkdir()
    outside.mkdir()
    (inside / "a.jpg").write_bytes(b"photo")
    os.mkfifo(inside / "pipe.jpg")
    (outside / "b.jpg").write_bytes(b"secret")
    os.symlink(outside / "b.jpg", inside / "link.jpg")        # resolves outside the root
    limits = reader.ReadLimits((str(inside),))
    got = reader.source_stats([str(inside / "a.jpg"), str(inside / "pipe.jpg"), str(outside / "b.jpg"),
                               str(inside / "link.jpg"), str(inside / "missing.jpg"), "/proc/self/status"], limits)
    a = os.stat(inside / "a.jpg")
    assert got[0] == reader.SourceStat(size=5, mtime_ns=a.st_mtime_ns)
    assert got[1:] == [None] * 5


def test_source_stats_s3_list_and_head_agree(s3_bucket):
    from facelake.faces import reader

    many = [f"{s3_bucket}/photos/big/p{i:03d}.jpg" for i in range(reader.LIST_FROM + 2)]    # listed
    few = [f"{s3_bucket}/photos/small/q{i}.jpg" for i in range(3)]                         # HEADed
    for i, uri in enumerate(many + few):
        storage.write_bytes_atomic(uri, b"x" * (i + 1))
    elsewhere = f"{s3_bucket}/private/secret.jpg"
    storage.write_bytes_atomic(elsewhere, b"secret")
    limits = reader.ReadLimits((f"{s3_bucket}/photos",))
    got = reader.source_stats(many + few + [elsewhere, f"{s3_bucket}/photos/big/none.jpg"], limits)
    fs, _ = storage.filesystem(s3_bucket)
    for i, uri in enumerate(many + few):
        head = fs.info(uri[len("s3://"):])
        assert got[i] == reader.SourceStat(size=i + 1, etag=head["ETag"].strip('"')), uri
    assert got[-2:] == [None, None]


def test_killed_incremental_rebuild_resumes_without_duplicates(ray_local, provisioned_weights, tmp_path):
    photos, root, manifest_uri = str(tmp_path / "photos"), str(tmp_path / "root"), str(tmp_path / "m.parquet")
    put_photos(photos, NIGHT1 + NIGHT2)
    write_manifest(manifest_uri, NIGHT1, photos)
    v1 = rebuild(manifest_uri, root).index_version
    write_manifest(manifest_uri, NIGHT1 + NIGHT2, photos)
    for stage in ("embed.counts", "rebuild.after_embed", "rebuild.before_table_pointer", "index.before_manifest",
                  "index.before_pointer"):
        with faults.armed(stage, crash), pytest.raises(Crash):
            rebuild(manifest_uri, root)
        assert layout.current_version(root) == v1
    done = rebuild(manifest_uri, root)
    assert done.outcome == "published" and not done.retrained and done.incremental["reused_shards"] == [0]
    faces = assert_record_consistent(root)          # no face twice in the record, no faiss id twice
    assert set(faces["image_id"].to_pylist()) == set(ids_of(NIGHT1 + NIGHT2))
    assert rebuild(manifest_uri, root).outcome == "nothing-changed"


def test_within_each_agrees_with_within(tmp_path):
    from facelake.faces import reader

    (tmp_path / "in" / "sub").mkdir(parents=True)
    (tmp_path / "out").mkdir()
    (tmp_path / "in" / "sub" / "a.jpg").write_bytes(b"a")
    (tmp_path / "out" / "b.jpg").write_bytes(b"b")
    os.symlink(tmp_path / "out" / "b.jpg", tmp_path / "in" / "link.jpg")
    os.symlink(tmp_path / "out", tmp_path / "in" / "dirlink")
    uris = [str(tmp_path / "in" / "sub" / "a.jpg"), str(tmp_path / "in" / "link.jpg"),
            str(tmp_path / "in" / "dirlink" / "b.jpg"), str(tmp_path / "in" / "sub" / ".." / "sub" / "a.jpg"),
            str(tmp_path / "in" / "missing.jpg"), f"file://{tmp_path}/in/sub/a.jpg",
            str(tmp_path / "in" / "dirlink" / ".." / "in" / "sub" / "a.jpg"),     # .. after a symlinked folder
            str(tmp_path / "in" / "dirlink" / ".." / "out" / "b.jpg")]
    roots = (str(tmp_path / "in"),)
    assert reader.within_each(uris, roots) == [reader.within(u, roots) for u in uris] \
        == [True, False, False, True, True, True, True, False]


def _synthetic_part(uri: str, xb: np.ndarray, prefix: str) -> None:
    n, dim = xb.shape
    storage.write_table(uri, pa.table({
        "image_id": [f"{prefix}{i:05d}" for i in range(n)], "face_index": np.zeros(n, np.int32),
        "uri": [f"/archive/{prefix}{i}.jpg" for i in range(n)], "bbox": [[0, 0, 10, 10]] * n,
        "embedding": pa.FixedSizeListArray.from_arrays(pa.array(xb.reshape(-1), pa.float32()), dim),
        "model": ["m"] * n, "weights_sha256": ["w"] * n}))


def test_compressed_version_extended_equals_build_on_same_quantizer(ray_local, tmp_path):
    """IVF-PQ shards with their full-vector files: the kept shard's three files are reused, a part
    replaced and a part added are built, and every search answers exactly as a build of the same
    faces over the same trained quantizer (PQ codes and re-rank included), and near exact search."""
    from facelake.index.synthetic import clustered
    from facelake.index.update import update_version

    root = str(tmp_path / "root")
    # shards of 1500: v1 [a], [b]; b then loses its last 100 faces (rewritten under a new name: b2)
    # and c is new, so the extended version is [a] (kept), [b2 + c...], [...c], as a full build cuts it
    xb = clustered(4500, 128, seed=3)
    a, b, b2, c = (str(tmp_path / "faces" / f"part-{x}.parquet") for x in "a b b2 c".split())
    _synthetic_part(a, xb[:1500], "a")
    _synthetic_part(b, xb[1500:3000], "b")
    v1 = build_version([a, b], root, BuildOptions(
        model="m", weights_sha256="w", shard_size=1500, nlist=16, pq=32, keep=10))
    assert v1["pq"] and v1["rerank"] and all("vectors_file" in s for s in v1["shards"])
    _synthetic_part(b2, xb[1500:2900], "b")
    _synthetic_part(c, xb[2900:4500], "c")
    v2 = update_version([a, b2, c], root, live=v1["version"], model="m", weights_sha256="w", keep=10,
                        shard_size=1500)
    assert v2["incremental"]["reused_shards"] == [0] and v2["factory"] == v1["factory"]
    assert [s["count"] for s in v2["shards"]] == [1500, 1500, 1500]
    for key in ("index_file", "ids_file", "vectors_file"):
        assert v2["files"][v2["shards"][0][key]] == v1["files"][v1["shards"][0][key]]
    ids = load_ids(open_version(root, v2["version"]))["faiss_id"].to_pylist()
    assert len(ids) == len(set(ids))
    same_q = build_version([a, b2, c], root, BuildOptions(
        model="m", weights_sha256="w", shard_size=1500, trained_from=v2["version"], keep=10))
    xq = np.ascontiguousarray(xb[::37])
    extended, rebuilt = topk(open_version(root, v2["version"]), xq, 10), topk(open_version(root, same_q["version"]), xq, 10)
    assert extended == rebuilt
    kept = xb
    names = [f"a{i:05d}" for i in range(1500)] + [f"b{i:05d}" for i in range(1400)] + [f"c{i:05d}" for i in range(1600)]
    exact = exact_topk(pa.table({"image_id": names, "face_index": np.zeros(len(names), np.int32),
                                 "embedding": kept.tolist()}), xq, 10)
    hits = sum(len({r[0] for r in e} & {r[0] for r in x}) for e, x in zip(extended, exact))
    assert hits / (10 * len(xq)) >= 0.95


def test_manifest_own_size_and_mtime_are_used(ray_local, provisioned_weights, tmp_path):
    photos, root, manifest_uri = str(tmp_path / "photos"), str(tmp_path / "root"), str(tmp_path / "m.parquet")
    put_photos(photos, BASE)
    def manifest_with(sizes: list[int]) -> None:
        m = sample_manifest(BASE, base=photos)
        m = m.append_column("size", pa.array(sizes, pa.int64()))
        m = m.append_column("mtime", pa.array([os.stat(f"{photos}/{n}").st_mtime_ns for n in BASE], pa.int64()))
        storage.write_table(manifest_uri, m)

    real = [os.path.getsize(f"{photos}/{n}") for n in BASE]
    manifest_with(real)
    rebuild(manifest_uri, root)
    faces = rootmod.read_faces(root)
    assert sorted(set(faces["source_size"].to_pylist())) == sorted(set(real))
    assert rebuild(manifest_uri, root).outcome == "nothing-changed"
    # the manifest says the first photo has another size now: believed, re-embedded, nothing read to decide
    manifest_with([real[0] + 1, real[1]])
    changed = rebuild(manifest_uri, root)
    assert (changed.changed, changed.hashed, changed.embed["images"]) == (1, 0, 1)
    assert_record_consistent(root)
