"""What `erase` removes and where, found without reading the archive's ids into the driver:
jobs/erase.py's scan (jobs/work/counts.py ``held``, Ray tasks when forced with a zero threshold) and
index/erasure.py's ``shards_holding``, each against a brute-force scan of every file, on local
files and on the loopback S3 endpoint; then a whole erase planned in tasks."""

from __future__ import annotations

from collections import Counter

import pyarrow as pa
import pytest

from facelake import storage
from facelake.record import erasures as erasure_list
from facelake.record import tables as rootmod
from facelake.index import layout
from facelake.index.build import BuildOptions, build_version
from facelake.index.erasure import shards_holding
from facelake.index.load import load_ids, open_version, shard_ids
from facelake.jobs import erase
from facelake.faces.registry import get_model, weights_fingerprint
from tests.helpers import error_rows as _errors, faces_per_image as _faces

# a: 3 faces an image over parts of 100 rows, so a-000033 (rows 99-101) spans two parts;
# x-5 is only in the errors; "nope" is nowhere
IDS = ["a-000033", "a-000000", "a-000199", "x-5", "nope", "b-000003"]


def _root(base: str, monkeypatch) -> tuple[str, rootmod.TableVersion, str]:
    monkeypatch.setattr(rootmod, "PART_ROWS", 100)
    root = f"{base}/root"
    version = rootmod.write_version(root, None, drop_ids=pa.array([], pa.string()),
                                    add={rootmod.FACES: pa.concat_tables([_faces(600, 3, "a"), _faces(50, 5, "b")]),
                                         rootmod.ERRORS: _errors(40, "x")},
                                    model="sface-yunet", job_id="j1")
    spec = get_model()
    faces = [rootmod.uri(root, rootmod.FACES, p) for p in version.faces]
    built = build_version(faces, root, BuildOptions(
        model=spec.name, weights_sha256=weights_fingerprint(spec), shards=3))
    return root, version, built["version"]


def _brute(root: str, version: rootmod.TableVersion, live: str) -> dict:
    """{place: Counter of every id} from every file, read whole."""
    out = {}
    for kind in rootmod.KINDS:
        for name in version.parts(kind):
            out[(kind, name)] = Counter(storage.read_file(rootmod.uri(root, kind, name), ["image_id"])["image_id"]
                                        .to_pylist())
    handle = open_version(root, live)
    for shard in handle.manifest["shards"]:
        out[(erase.INDEX, str(shard["shard"]))] = Counter(shard_ids(handle, shard["shard"])["image_id"].to_pylist())
    return out


@pytest.mark.parametrize("where,driver_rows", [("local", None), ("local", 0), ("s3", 0)])
def test_scan_finds_exactly_what_a_brute_force_scan_finds(where, driver_rows, tmp_path, ray_local, monkeypatch,
                                                          request):
    base = str(tmp_path) if where == "local" else request.getfixturevalue("s3_bucket")
    options = storage.StorageOptions.from_env()
    root, version, live = _root(base, monkeypatch)
    assert len(version.faces) == 7 and len(version.errors) == 1
    brute = _brute(root, version, live)
    wanted = pa.array(IDS, pa.string())

    scan = erase._scan(root, version, live, wanted, options, driver_rows=driver_rows)
    expected = {place: {i: n[i] for i in IDS if n[i]} for place, n in brute.items()}
    assert scan == {place: hit for place, hit in expected.items() if hit}
    spanning = [place for place, hit in scan.items() if "a-000033" in hit and place[0] == rootmod.FACES]
    assert len(spanning) == 2                                        # one image over two parts
    holdings = erase._holdings(IDS, scan)
    assert holdings == {"a-000033": (3, 0), "a-000000": (3, 0), "a-000199": (3, 0), "x-5": (0, 1),
                        "nope": (0, 0), "b-000003": (5, 0)}
    assert holdings["a-000033"][0] == sum(n["a-000033"] for p, n in brute.items() if p[0] == rootmod.FACES)

    # the erasure checks: shards holding any id, in tasks (Ray is connected) and in the driver
    handle = open_version(root, live, options=options)
    truth = sorted(int(p[1]) for p, n in brute.items() if p[0] == erase.INDEX and any(n[i] for i in IDS))
    assert sorted(shards_holding(handle, wanted, driver_rows=driver_rows)) == truth and truth
    assert shards_holding(handle, pa.array(["nope", "x-5"], pa.string()), driver_rows=driver_rows) == []


def test_erase_planned_in_tasks_removes_exactly_the_ids(tmp_path, ray_local, monkeypatch):
    root, version, live = _root(str(tmp_path), monkeypatch)
    brute = _brute(root, version, live)
    summary = erase.run_erase(erase.EraseConfig(root=root, ids=tuple(IDS), reason="test", driver_rows=0))
    assert summary.not_found == ["nope"]
    for i in IDS[:4] + IDS[5:]:
        faces = sum(n[i] for p, n in brute.items() if p[0] == rootmod.FACES)
        errors = sum(n[i] for p, n in brute.items() if p[0] == rootmod.ERRORS)
        assert summary.per_id[i] == {"faces": faces, "error_rows": errors, "status": "erased"}
    erased = set(IDS) - {"nope"}
    record = rootmod.read_faces(root, ["image_id"])["image_id"].to_pylist()
    assert not erased & set(record) and len(record) == 650 - 3 * 3 - 5
    assert not erased & set(rootmod.read_errors(root, ["image_id"])["image_id"].to_pylist())
    now = layout.current_version(root)
    assert now == summary.index_version and now != live
    assert not erased & set(load_ids(open_version(root, now))["image_id"].to_pylist())
    assert all(not erased & set(load_ids(open_version(root, v))["image_id"].to_pylist())
               for v in layout.list_versions(root))
    # parts that held no erased id were kept, not rewritten
    untouched = {p for p, n in brute.items() if p[0] == rootmod.FACES and not erased & set(n)}
    assert untouched and untouched <= {(rootmod.FACES, p) for p in rootmod.current(root).faces}

    again = erase.run_erase(erase.EraseConfig(root=root, ids=("a-000033",), reason="again", driver_rows=0))
    assert again.per_id["a-000033"]["status"] == "already erased" and again.index_version == now


def test_erase_of_an_index_root_in_tasks_leaves_the_source_rows_less_the_erased(tmp_path, ray_local):
    """A root made by `facelake index` (no record): the live shards are scanned in tasks and the
    republish counts the rows left from the faces table's footers less the erased ids' rows."""
    faces = _faces(700, 2, "i")
    storage.write_table(str(tmp_path / "faces" / "part-0.parquet"), faces.slice(0, 333))   # i-000166 spans
    storage.write_table(str(tmp_path / "faces" / "part-1.parquet"), faces.slice(333))
    spec = get_model()
    root = str(tmp_path / "root")
    live = build_version(str(tmp_path / "faces"), root, BuildOptions(
        model=spec.name, weights_sha256=weights_fingerprint(spec), shards=3))["version"]
    summary = erase.run_erase(erase.EraseConfig(root=root, ids=("i-000166", "i-000001", "nope"), reason="test",
                                                driver_rows=0))
    assert summary.per_id["i-000166"] == {"faces": 2, "error_rows": 0, "status": "erased"}
    assert summary.per_id["i-000001"]["faces"] == 2 and summary.not_found == ["nope"]
    now = layout.current_version(root)
    assert now != live and open_version(root, now).manifest["shards"]
    held = load_ids(open_version(root, now))["image_id"].to_pylist()
    assert len(held) == 696 and not {"i-000166", "i-000001"} & set(held)
    assert layout.list_versions(root) == [now]


def test_erasure_checks_in_tasks_refuse_and_find_versions_holding(tmp_path, ray_local, monkeypatch):
    from facelake.index import erasure

    root, version, live = _root(str(tmp_path), monkeypatch)
    monkeypatch.setattr(erasure, "DRIVER_ROWS", 0)                 # every check in tasks
    clean = pa.array(["nope", "x-5"], pa.string())
    erasure.check_publishable(root, live, clean, None)             # holds neither: publishable
    assert erasure.versions_holding(root, clean, None, None) == []
    held = pa.array(["nope", "a-000033"], pa.string())
    assert erasure.versions_holding(root, held, None, None) == [live]
    with pytest.raises(erasure_list.ErasureListError, match="refusing to publish index version"):
        erasure.check_publishable(root, live, held, None)
    assert not storage.exists(layout.version_uri(root, live))      # the refused folder is gone
