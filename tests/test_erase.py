"""`facelake erase` on real photos, on roots made by embed + index and by rebuild, locally and on
loopback S3: gone from record, index and search results, never published again, resumable after
a kill, audited per id with keyed hashes; a deleted erasure list is refused, not obeyed."""

from __future__ import annotations

import hashlib
import json

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pytest
from typer.testing import CliRunner

from facelake import faults, storage
from facelake.record import audit
from facelake.record import erasures as erasure_list
from facelake.record import tables as rootmod
from facelake.errors import ConfigError, ManifestError
from facelake.index import layout
from facelake.index.build import BuildOptions, build_version
from facelake.index.load import load_ids, open_version
from facelake.index.searchers import search_version
from facelake.jobs import cli, search
from facelake.jobs.embed import EmbedConfig, outputs, run_embed
from facelake.index.erasure import check_publishable
from facelake.jobs.erase import EraseConfig, read_ids_file, run_erase
from facelake.jobs.rebuild import RebuildConfig, run_rebuild
from facelake.jobs.status import collect
from facelake.faces.manifest import validate
from tests.helpers import sample_manifest

NAMES = ["img1.jpg", "img2.jpg", "img4.jpg", "img3.jpg", "img6.jpg"]   # img1, img2, img4: one person
TARGET = "img1"


def _app():
    if not cli.app.registered_commands:
        cli._register_all()
    return cli.app


def invoke(*args: str):
    return CliRunner().invoke(_app(), list(args))


def live_ids(root: str) -> set[str]:
    return set(load_ids(open_version(root))["image_id"].to_pylist())


def all_version_ids(root: str) -> set[str]:
    return {i for v in layout.list_versions(root) for i in load_ids(open_version(root, v))["image_id"].to_pylist()}


class Crash(RuntimeError):
    pass


def crash(*_):
    raise Crash("killed on purpose (test)")


@pytest.fixture(scope="module")
def embedded(ray_local, provisioned_weights, tmp_path_factory) -> str:
    """The faces table `facelake embed` wrote for NAMES (the README's first step)."""
    base = tmp_path_factory.mktemp("embedded")
    storage.write_table(str(base / "m.parquet"), sample_manifest(NAMES))
    run_embed(EmbedConfig(manifest=str(base / "m.parquet"), out=str(base / "out"), progress=False, workers=1))
    return outputs(str(base / "out"))["faces"]


def _copy_faces(faces: str, target: str) -> str:
    for i, part in enumerate(storage.list_files(faces, ".parquet")):
        storage.write_bytes_atomic(f"{target}/part-{i}.parquet", storage.read_bytes(part))
    return target


def test_erase_completes_on_an_embed_and_index_root_and_index_never_republishes(embedded, tmp_path):
    root = str(tmp_path / "root")
    assert invoke("index", embedded, "--root", root).exit_code == 0
    assert TARGET in live_ids(root)
    ids_file = tmp_path / "ids.txt"
    ids_file.write_text(f"# withdrawn\n{TARGET}\nmulti\nline\n")      # "multi\nline" is two ids: neither exists

    result = invoke("erase", "--root", root, "--ids-file", str(ids_file), "--reason", "subject request #42")
    # before: exit 2 "live index version ... still holds 1 erased image(s)" on every run, no audit record
    assert result.exit_code == 1, result.output
    assert f"{TARGET}: erased: 1 face(s)" in result.output and "not found" in result.output
    assert "line, multi" in result.output
    assert TARGET not in live_ids(root) and TARGET not in all_version_ids(root)
    assert erasure_list.erasures(root)["image_id"].to_pylist() == [TARGET]     # unknown ids are not recorded
    (record,) = audit.list_records(root, kind="erase")
    assert record["status"] == "succeeded" and record["resulting_version"] == layout.current_version(root)
    per_id = {r["status"]: r for r in record["per_id"]}
    assert per_id["erased"]["faces"] == 1 and record["not_found"] == 2
    assert TARGET not in json.dumps(record) and hashlib.sha256(TARGET.encode()).hexdigest() not in json.dumps(record)
    assert per_id["erased"]["id_hmac"] == audit.id_hmac(root, [TARGET])[0]

    # `facelake index` of the same faces table (it still holds the face) leaves it out
    before = erasure_list.erasures(root).num_rows
    again = invoke("index", embedded, "--root", root, "--keep", "5")
    assert again.exit_code == 0, again.output
    assert TARGET not in all_version_ids(root) and erasure_list.erasures(root).num_rows == before
    assert open_version(root).manifest["erased_ids_count"] == 1
    (index_record,) = [r for r in audit.list_records(root, kind="index") if r["index_version"] == layout.current_version(root)]
    assert index_record["status"] == "succeeded" and index_record["erased_left_out"] == 1

    # a publisher that forgets the erasure list is refused before CURRENT moves
    live = layout.current_version(root)
    erased = erasure_list.erased_ids(root)
    with pytest.raises(erasure_list.ErasureListError, match="refusing to publish index version"):
        build_version(embedded, root, BuildOptions(
            model=open_version(root).model, weights_sha256=open_version(root).manifest["weights_sha256"], keep=5,
            hooks={"before_pointer": lambda v: check_publishable(root, v, erased, None)}))
    assert layout.current_version(root) == live

    # the erasure list and the audit log both deleted: the live version's manifest still says
    # how many ids it left out, so the list is refused rather than obeyed
    storage.remove(f"{root}/erasures", recursive=True)
    storage.remove(f"{root}/audit", recursive=True)
    refused = invoke("index", embedded, "--root", root)
    assert isinstance(refused.exception, erasure_list.ErasureListError) and "leaving out 1" in str(refused.exception)
    assert TARGET not in all_version_ids(root)


def test_killed_erase_resumes_and_purges_search_results(embedded, tmp_path):
    root, out = str(tmp_path / "root"), str(tmp_path / "results")
    assert invoke("index", embedded, "--root", root).exit_code == 0
    search.run_search(search.SearchConfig(probes=embedded, root=root, out=out, purpose="case 9", executor="local"))
    assert TARGET in storage.read_table(search.outputs(out)["results"])["gallery_image_id"].to_pylist()

    with pytest.raises(Crash), faults.armed("erase.after_erasure_list", crash):
        run_erase(EraseConfig(root=root, ids=(TARGET,), reason="request 9"))
    assert TARGET in live_ids(root)                       # killed after listing, before publishing
    (killed,) = audit.list_records(root, kind="erase")
    assert killed["status"] == "failed" and "killed on purpose" in killed["error"]
    # any publisher completes it: index leaves the face out, and no version it keeps holds it
    assert invoke("index", embedded, "--root", root, "--keep", "5").exit_code == 0
    assert TARGET not in all_version_ids(root) and len(layout.list_versions(root)) == 1

    result = invoke("erase", "--root", root, TARGET, "--reason", "request 9", "--purge-results")
    assert result.exit_code == 0, result.output
    # before: the rerun audited "0 removed"; now it reports what the first run listed
    assert f"{TARGET}: already erased: 1 face(s)" in result.output and out in result.output
    assert TARGET not in live_ids(root) and TARGET not in all_version_ids(root)
    resumed = audit.list_records(root, kind="erase")[-1]
    assert resumed["status"] == "succeeded" and resumed["faces_removed"] == 1 and resumed["purged_results"] == [out]
    table = storage.read_table(search.outputs(out)["results"])
    assert TARGET not in table["gallery_image_id"].to_pylist() + table["probe_image_id"].to_pylist()
    assert table.num_rows > 0 and erasure_list.erasures(root)["image_id"].to_pylist() == [TARGET]


def test_erase_on_s3_embed_and_index_root_kill_and_resume(embedded, s3_bucket):
    faces = _copy_faces(embedded, f"{s3_bucket}/faces")
    root = f"{s3_bucket}/root"
    assert invoke("index", faces, "--root", root).exit_code == 0
    out = f"{s3_bucket}/results"
    search.run_search(search.SearchConfig(probes=faces, root=root, out=out, purpose="s3 case", executor="local"))
    with pytest.raises(Crash), faults.armed("index.before_pointer", crash):
        run_erase(EraseConfig(root=root, ids=(TARGET, "img3"), reason="s3 request"))
    assert TARGET in live_ids(root)
    summary = run_erase(EraseConfig(root=root, ids=(TARGET, "img3"), reason="s3 request", purge_results=True))
    assert {i: r["status"] for i, r in summary.per_id.items()} == {TARGET: "already erased", "img3": "already erased"}
    assert summary.faces_removed == 2 and not summary.not_found and summary.purged_results == [out]
    table = storage.read_table(search.outputs(out)["results"])
    assert not {TARGET, "img3"} & set(table["gallery_image_id"].to_pylist() + table["probe_image_id"].to_pylist())
    assert not {TARGET, "img3"} & all_version_ids(root)
    assert audit.verify(root)[1] is None
    # deleting the erasure list is detected, and no publisher obeys it
    for part in storage.list_files(f"{root}/erasures"):
        storage.remove(part)
    result = invoke("index", faces, "--root", root)
    assert isinstance(result.exception, erasure_list.ErasureListError) and "deleted" in str(result.exception)
    assert not {TARGET, "img3"} & all_version_ids(root)


@pytest.mark.parametrize("where", ["local", "s3"])
def test_erase_on_a_rebuild_root_stays_erased_and_a_deleted_list_is_refused(where, ray_local, provisioned_weights,
                                                                          tmp_path, monkeypatch, request):
    monkeypatch.setenv("FACELAKE_USER", "dpo-officer")
    root = str(tmp_path / "root") if where == "local" else f"{request.getfixturevalue('s3_bucket')}/root"
    manifest_uri = str(tmp_path / "m.parquet")
    storage.write_table(manifest_uri, sample_manifest(NAMES))
    config = RebuildConfig(manifest=manifest_uri, root=root, progress=False, workers=1, keep=5)
    first = run_rebuild(config)
    faces = rootmod.read_faces(root)
    probe = np.array(faces.filter(pc.equal(faces["image_id"], TARGET))["embedding"].to_pylist(), np.float32)

    def found(k=10):
        handle = open_version(root)
        _, I = search_version(handle, probe, k)
        table = load_ids(handle)     # faiss ids are not row numbers (gaps; versions extended by rebuild)
        ids = dict(zip(table["faiss_id"].to_pylist(), table["image_id"].to_pylist()))
        return [ids[i] for i in I.ravel() if i >= 0]

    assert TARGET in found()
    result = invoke("erase", "--root", root, TARGET, "--reason", "subject request #42")
    assert result.exit_code == 0, result.output
    live = layout.current_version(root)
    assert live != first.index_version and first.index_version not in layout.list_versions(root)
    # the version publishing replaced held the erased face: it is deleted, and counted
    assert "live index version " + live + "; 1 other version(s) holding erased faces deleted" in result.output
    assert TARGET not in rootmod.read_faces(root)["image_id"].to_pylist() and TARGET not in found()
    assert "img2" in found() or "img4" in found()         # the same person's other photos stay searchable
    erased = erasure_list.erasures(root).to_pylist()
    assert [(e["image_id"], e["reason"], e["claimed_user"], e["faces"]) for e in erased] == \
        [(TARGET, "subject request #42", "dpo-officer", 1)]
    (record,) = audit.list_records(root, kind="erase")
    assert record["user"] == audit.os_user() != "dpo-officer" and record["claimed_user"] == "dpo-officer"
    assert record["versions_removed"] == [first.index_version]
    assert not any(TARGET in p for p in storage.list_files(f"{root}/faces"))

    again = run_rebuild(config)                            # still in the manifest, never embedded again
    assert again.outcome == "nothing-changed" and again.erased_skipped == 1 and again.embed is None
    listing = invoke("audit", root, "--kind", "rebuild")
    assert listing.exit_code == 0 and listing.output.count("succeeded") == 2   # before: rebuilds showed blank
    info = collect(root)
    assert info["counts"]["erasures"] == 1 and info["live_version"] == live
    status = invoke("status", root)
    assert status.exit_code == 0 and live in status.output and "erase" in status.output

    # before: deleting ROOT/erasures made the next rebuild re-embed the erased photo
    for part in storage.list_files(f"{root}/erasures"):
        storage.remove(part)
    with pytest.raises(erasure_list.ErasureListError, match="deleted"):
        run_rebuild(config)
    assert TARGET not in found() and layout.current_version(root) == live
    assert audit.list_records(root, kind="rebuild")[-1]["status"] == "failed"
    status = invoke("status", root)
    assert status.exit_code == 0 and "erasure list" in status.output and live in status.output   # reported, goes on


def test_one_id_rule_for_manifests_and_erase(tmp_path):
    for bad, why in (("trailing ", "whitespace"), ("multi\nline", "control character"), ("x" * 1025, "longer")):
        storage.write_table(str(tmp_path / "m.parquet"), pa.table({"image_id": ["ok", bad], "uri": ["a.jpg", "b.jpg"]}))
        with pytest.raises(ManifestError, match=f"row 1: .*{why}"):
            validate(str(tmp_path / "m.parquet"))
        with pytest.raises(ConfigError, match=why):
            EraseConfig(root=str(tmp_path), ids=(bad,), reason="r").validate()
    (tmp_path / "ids.txt").write_text("good\ntrailing \n")
    with pytest.raises(ConfigError, match="line 2: .*whitespace"):
        read_ids_file(str(tmp_path / "ids.txt"))
    (tmp_path / "ids.txt").write_text("# a comment\r\ngood\r\n\r\n")
    assert read_ids_file(str(tmp_path / "ids.txt")) == ("good",)
    with pytest.raises(ConfigError, match="--reason"):
        EraseConfig(root=str(tmp_path), ids=("a",), reason=" ").validate()
    with pytest.raises(ConfigError, match="image ids"):
        EraseConfig(root=str(tmp_path), ids=(), reason="r").validate()
    assert invoke("erase", "a", "--root", str(tmp_path), "--ids-file", "x", "--reason", "r").exit_code != 0


@pytest.mark.parametrize("where", ["local", "s3"])
def test_erasure_list_is_chained_and_anchored(where, tmp_path, request):
    import io

    import pyarrow.parquet as pq

    root = str(tmp_path / "root") if where == "local" else f"{request.getfixturevalue('s3_bucket')}/root"
    erasure_list.append_erasure(root, {"a": (1, 0)}, reason="r", job_id="erase-1")
    erasure_list.append_erasure(root, {"b": (2, 1)}, reason="r", job_id="erase-2")
    assert sorted(erasure_list.erased_ids(root).to_pylist()) == ["a", "b"]
    # a Parquet file dropped beside the chain is no entry of it: refused, not obeyed or ignored
    storage.write_table(f"{root}/erasures/erase-old.parquet", pa.table({"image_id": ["old"]}))
    with pytest.raises(erasure_list.ErasureListError, match="is not part of the erasure list"):
        erasure_list.erased_ids(root)
    storage.remove(f"{root}/erasures/erase-old.parquet")

    def rewrite(seq: int, image_id: str) -> None:
        target = f"{root}/erasures/{seq:010d}.parquet"
        table = pq.read_table(io.BytesIO(storage.read_bytes(target)))
        table = table.set_column(0, "image_id", pa.array([image_id])).replace_schema_metadata(table.schema.metadata)
        sink = io.BytesIO()
        pq.write_table(table, sink)
        storage.write_bytes_atomic(target, sink.getvalue())

    original = storage.read_bytes(f"{root}/erasures/{1:010d}.parquet")
    rewrite(1, "someone-else")                       # an altered entry breaks the link to the next one
    with pytest.raises(erasure_list.ErasureListError, match="entry 2 does not follow entry 1"):
        erasure_list.erased_ids(root)
    storage.write_bytes_atomic(f"{root}/erasures/{1:010d}.parquet", original)
    rewrite(2, "someone-else")                       # the newest entry is checked against the audit anchor
    with pytest.raises(erasure_list.ErasureListError, match="differs from what the audit log recorded"):
        erasure_list.erased_ids(root)
    storage.remove(f"{root}/erasures/{2:010d}.parquet")
    with pytest.raises(erasure_list.ErasureListError, match="records 2 erasure list entries .* holds 1"):
        erasure_list.erased_ids(root)
