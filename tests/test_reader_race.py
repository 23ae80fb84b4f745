"""The photo door cannot be raced: what is checked is what was opened.

A folder inside the allowed root is swapped, thousands of times a second, between a real folder
and a symlink to a folder outside the root while photos are read through it. Whatever the timing,
no read may return the outside file's bytes. S3 keys with '.' or '..' segments are refused before
anything is read (the store reads such keys literally; the root check would see another key).
"""

from __future__ import annotations

import os
import threading
import time

import pytest

from facelake.faces import reader

READS = 3000


def _flip(link: str, targets: tuple[str, str], stop: threading.Event) -> None:
    """Swap ``link`` between two symlink targets atomically (rename over it) until ``stop``."""
    spare = link + ".next"
    i = 0
    while not stop.is_set():
        i += 1
        try:
            os.symlink(targets[i % 2], spare)
            os.replace(spare, link)
        except FileExistsError:
            os.unlink(spare)


def test_a_folder_swapped_for_an_outside_symlink_is_never_read(tmp_path):
    root, outside = tmp_path / "root", tmp_path / "outside"
    (root / "inner").mkdir(parents=True)
    outside.mkdir()
    (root / "inner" / "photo.jpg").write_bytes(b"inside")
    (outside / "photo.jpg").write_bytes(b"SECRET")
    link = str(root / "door")
    os.symlink(str(root / "inner"), link)
    limits = reader.ReadLimits(allowed_roots=(str(root),))
    stop = threading.Event()
    flipper = threading.Thread(target=_flip, args=(link, (str(root / "inner"), str(outside)), stop))
    flipper.start()
    got: dict[bytes | str, int] = {}
    try:
        deadline = time.monotonic() + 60
        for _ in range(READS):
            try:
                data = reader.read(reader.resolve(link + "/photo.jpg", "", limits.allowed_roots), limits)
                got[data] = got.get(data, 0) + 1
            except reader.OutsideRoots:
                got["refused"] = got.get("refused", 0) + 1
            except FileNotFoundError:
                got["missing"] = got.get("missing", 0) + 1  # the link was between its two names
            if time.monotonic() > deadline:
                break
    finally:
        stop.set()
        flipper.join()
    assert b"SECRET" not in got, f"read outside the root: {got}"
    assert got.get(b"inside", 0) > 0 and got.get("refused", 0) > 0, f"the race was not exercised: {got}"


@pytest.mark.parametrize("uri", ["s3://bucket/photos/../secret/a.jpg", "s3://bucket/photos/./a.jpg",
                                 "s3://bucket/photos/x/../../b.jpg", "s3://bucket/.."])
def test_s3_keys_with_dot_segments_are_refused(uri):
    with pytest.raises(reader.UnsupportedUri, match="segment"):
        reader.resolve(uri, "", ("s3://bucket/photos",))
    with pytest.raises(reader.UnsupportedUri, match="segment"):
        reader.read(uri, reader.ReadLimits())
