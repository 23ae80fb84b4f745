"""`facelake rebuild` reads photos only through facelake.faces.reader: under the allowed roots, which
ROOT remembers, and never hashes a file outside them (real Ray, real model, real photos)."""

from __future__ import annotations

import os

import pyarrow as pa
import pytest

from facelake import storage
from facelake.faces import reader
from facelake.record import tables as rootmod
from facelake.jobs.work.photos import ALLOWED_ROOTS_FILE, hash_chunk, remembered_roots
from tests.helpers import put_photos, rebuild, write_manifest


def test_hash_chunk_never_reads_outside_roots(tmp_path):
    inside, outside = tmp_path / "in", tmp_path / "out"
    inside.mkdir()
    outside.mkdir()
    (inside / "a.jpg").write_bytes(b"photo")
    os.mkfifo(outside / "pipe.jpg")     # reading it would hang the task
    (outside / "b.jpg").write_bytes(b"secret")
    limits = reader.ReadLimits((str(inside),))
    hashes = hash_chunk([str(inside / "a.jpg"), str(outside / "pipe.jpg"), str(outside / "b.jpg"), "/etc/passwd"],
                        None, limits)
    assert hashes[0] is not None and hashes[1:] == [None, None, None]


@pytest.mark.timeout(900)
def test_rebuild_remembers_roots_and_refuses_outside(ray_local, provisioned_weights, tmp_path):
    photos, elsewhere, root = str(tmp_path / "photos"), str(tmp_path / "elsewhere"), str(tmp_path / "root")
    manifest_uri = str(tmp_path / "manifest.parquet")
    put_photos(photos, ["img1.jpg"])
    put_photos(elsewhere, ["img3.jpg"])
    write_manifest(manifest_uri, ["img1.jpg"], photos)
    write_manifest(str(tmp_path / "other.parquet"), ["img3.jpg"], elsewhere)
    both = pa.concat_tables([storage.read_table(manifest_uri), storage.read_table(str(tmp_path / "other.parquet"))])

    # before any root was given, img3 (outside photos/) is part of the record
    storage.write_table(manifest_uri, both)
    first = rebuild(manifest_uri, root)
    assert first.outcome == "published" and first.new == 2
    assert remembered_roots(root, None) == ()

    # --allow-root photos/: img3 is outside now; it is not hashed but re-recorded as a validate error
    second = rebuild(manifest_uri, root, allowed_roots=(photos,))
    assert second.changed == 1 and second.outcome == "published"
    assert remembered_roots(root, None) == (photos,)
    assert storage.exists(storage.join(root, ALLOWED_ROOTS_FILE))
    errors = {r["image_id"]: r for r in rootmod.read_errors(root).to_pylist()}
    assert errors["img3"]["stage"] == "validate" and errors["img3"]["error_type"] == "OutsideRoots"
    assert errors["img3"]["content_sha256"] is None
    assert "img3" not in rootmod.read_faces(root)["image_id"].to_pylist()

    # no --allow-root: the remembered root still holds; a new photo outside it is refused, unread
    put_photos(elsewhere, ["img5.jpg"])
    extra = pa.concat_tables([both, pa.table({"image_id": ["img5"], "uri": [f"{elsewhere}/img5.jpg"],
                                              **{c: both[c][:1] for c in both.column_names
                                                 if c not in ("image_id", "uri")}})])
    storage.write_table(manifest_uri, extra)
    third = rebuild(manifest_uri, root)
    assert third.new == 1
    errors = {r["image_id"]: r for r in rootmod.read_errors(root).to_pylist()}
    assert errors["img5"]["stage"] == "validate" and errors["img5"]["content_sha256"] is None
    assert set(rootmod.read_faces(root)["image_id"].to_pylist()) == {"img1"}
