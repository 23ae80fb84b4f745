"""`facelake erase` on real photos: gone from record and search, never embedded again, audited."""

from __future__ import annotations

import hashlib

import numpy as np
import pyarrow.compute as pc
from typer.testing import CliRunner

from facelake import audit, root as rootmod, storage
from facelake.index import layout
from facelake.index.load import load_ids, open_version
from facelake.index.search import search_version
from facelake.jobs import cli
from facelake.jobs.rebuild import RebuildConfig, run_rebuild
from facelake.jobs.status import collect
from tests.helpers import sample_manifest

NAMES = ["img1.jpg", "img2.jpg", "img4.jpg", "img3.jpg", "img6.jpg"]   # img1, img2, img4: one person


def _app():
    if not cli.app.registered_commands:
        cli._register_all()
    return cli.app


def test_erase_removes_from_record_and_search_and_stays_erased(ray_local, provisioned_weights, tmp_path, monkeypatch):
    monkeypatch.setenv("FACELAKE_USER", "dpo-officer")
    root, manifest_uri = str(tmp_path / "root"), str(tmp_path / "m.parquet")
    storage.write_table(manifest_uri, sample_manifest(NAMES))
    config = RebuildConfig(manifest=manifest_uri, root=root, progress=False, workers=1, keep=5)
    first = run_rebuild(config)
    faces = rootmod.read_faces(root)
    target = "img1"
    probe = np.array(faces.filter(pc.equal(faces["image_id"], target))["embedding"].to_pylist(), np.float32)

    def found(k=10):
        handle = open_version(root)
        _, I = search_version(handle, probe, k)
        ids = load_ids(handle)["image_id"].to_pylist()
        return [ids[i] for i in I.ravel() if i >= 0]

    assert target in found()
    old_version = first.index_version

    (tmp_path / "ids.txt").write_text(f"# withdrawn\n{target}\n\n")
    result = CliRunner().invoke(_app(), ["erase", "--root", root, "--ids-file", str(tmp_path / "ids.txt"),
                                         "--reason", "subject request #42"])
    assert result.exit_code == 0, result.output
    assert "erased 1 image id(s)" in result.output

    live = layout.current_version(root)
    assert live != old_version
    assert target not in rootmod.read_faces(root)["image_id"].to_pylist()
    hits = found()
    assert target not in hits and len(hits) == min(10, open_version(root).total)
    assert "img2" in hits or "img4" in hits          # the same person's other photos stay searchable
    assert old_version not in layout.list_versions(root), "an older version still holds the erased face"
    erased = rootmod.erasures(root).to_pylist()
    assert [(e["image_id"], e["reason"], e["user"]) for e in erased] == [(target, "subject request #42", "dpo-officer")]
    (record,) = audit.list_records(root, kind="erase")
    assert record["ids_count"] == 1 and record["resulting_version"] == live and record["user"] == "dpo-officer"
    assert record["ids_sha256"] == [hashlib.sha256(target.encode()).hexdigest()]
    assert target not in str(record)                  # the audit log carries hashes, not ids
    assert not any(target in p for p in storage.list_files(f"{root}/faces"))

    # still in the manifest, never embedded again
    again = run_rebuild(config)
    assert again.outcome == "nothing-changed" and again.erased_skipped == 1 and again.embed is None
    assert target not in found()

    info = collect(root)
    assert info["counts"]["erasures"] == 1 and info["live_version"] == live
    assert info["counts"]["faces"] == rootmod.read_faces(root).num_rows
    status = CliRunner().invoke(_app(), ["status", root])
    assert status.exit_code == 0 and live in status.output and "erase" in status.output


def test_erase_refuses_bad_options(tmp_path):
    runner = CliRunner()
    both = runner.invoke(_app(), ["erase", "a", "--root", str(tmp_path), "--ids-file", "x", "--reason", "r"])
    assert both.exit_code != 0
    from facelake.errors import ConfigError
    from facelake.jobs.erase import EraseConfig
    import pytest
    with pytest.raises(ConfigError, match="--reason"):
        EraseConfig(root=str(tmp_path), ids=("a",), reason=" ").validate()
    with pytest.raises(ConfigError, match="image ids"):
        EraseConfig(root=str(tmp_path), ids=(), reason="r").validate()
