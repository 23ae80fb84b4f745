"""facelake.faces.reader, the one door for photo reads: roots, file type, size and time before bytes.

Real files, FIFOs, devices, /proc, sparse files and a loopback S3 (moto server); each refusal must
come before any byte is read (a FIFO with no writer would hang a plain open forever).
"""

from __future__ import annotations

import os

import pytest

from facelake import storage
from facelake.faces import reader
from facelake.schema import STAGE_FETCH, STAGE_VALIDATE
from tests.helpers import SAMPLE_DIR

PHOTO = (SAMPLE_DIR / "img1.jpg").read_bytes()


def test_reads_a_photo_inside_its_root(tmp_path):
    (tmp_path / "a.jpg").write_bytes(PHOTO)
    limits = reader.ReadLimits(allowed_roots=(str(tmp_path),))
    assert reader.read(str(tmp_path / "a.jpg"), limits) == PHOTO
    assert reader.read("file://" + str(tmp_path / "a.jpg"), limits) == PHOTO


@pytest.mark.timeout(60)
def test_fifo_refused_without_hanging(tmp_path):
    fifo = tmp_path / "pipe.jpg"
    os.mkfifo(fifo)
    with pytest.raises(reader.NotARegularFile, match="FIFO") as caught:
        reader.read(str(fifo))
    assert caught.value.stage == STAGE_FETCH


@pytest.mark.parametrize("path", ["/dev/zero", "/dev/urandom"])
def test_devices_refused(path):
    with pytest.raises(reader.NotARegularFile, match="device"):
        reader.read(path)


def test_proc_files_refused():
    with pytest.raises(reader.NotARegularFile, match="pseudo-file"):
        reader.read("/proc/self/environ")


def test_folder_refused(tmp_path):
    with pytest.raises(reader.NotARegularFile, match="folder"):
        reader.read(str(tmp_path))


def test_sparse_file_refused_by_size_before_reading(tmp_path):
    sparse = tmp_path / "sparse.jpg"
    with open(sparse, "wb") as handle:
        handle.truncate(8 * 1024 ** 3)  # 8 GiB of holes: reading it would fill memory
    with pytest.raises(reader.TooManyBytes, match="--max-bytes"):
        reader.read(str(sparse))
    with pytest.raises(reader.TooManyBytes):
        reader.read(str(tmp_path / "sparse.jpg"), reader.ReadLimits(max_bytes=len(PHOTO)))


def test_max_bytes_is_inclusive(tmp_path):
    (tmp_path / "a.jpg").write_bytes(PHOTO)
    assert reader.read(str(tmp_path / "a.jpg"), reader.ReadLimits(max_bytes=len(PHOTO))) == PHOTO
    with pytest.raises(reader.TooManyBytes):
        reader.read(str(tmp_path / "a.jpg"), reader.ReadLimits(max_bytes=len(PHOTO) - 1))


def test_read_timeout(tmp_path):
    big = tmp_path / "big.tif"
    big.write_bytes(os.urandom(3 * reader.CHUNK_BYTES))
    with pytest.raises(reader.ReadTimeout, match="took over"):
        reader.read(str(big), reader.ReadLimits(timeout_s=1e-9))


def test_outside_roots_never_opened(tmp_path):
    root, outside = tmp_path / "root", tmp_path / "root-evil"
    root.mkdir()
    outside.mkdir()
    os.mkfifo(outside / "pipe.jpg")  # opening it would hang: proves the check comes first
    os.symlink(outside / "pipe.jpg", root / "link.jpg")
    limits = reader.ReadLimits(allowed_roots=(str(root),))
    for uri in (str(outside / "pipe.jpg"), str(root / "link.jpg"), str(root / ".." / "root-evil" / "pipe.jpg"),
                "/etc/passwd", "/proc/self/environ"):
        with pytest.raises(reader.OutsideRoots) as caught:
            reader.read(uri, limits)
        assert caught.value.stage == STAGE_VALIDATE


def test_resolve_relative_and_schemes(tmp_path):
    assert reader.resolve("a.jpg", str(tmp_path)) == str(tmp_path / "a.jpg")
    with pytest.raises(reader.OutsideRoots, match="--allow-root"):
        reader.resolve("../x.jpg", str(tmp_path), (str(tmp_path),))
    with pytest.raises(reader.UnsupportedUri, match="file:// or s3://"):
        reader.resolve("http://169.254.169.254/latest", str(tmp_path))


def test_s3_object_size_from_head(s3_bucket):
    uri = f"{s3_bucket}/photos/a.jpg"
    storage.write_bytes_atomic(uri, PHOTO)
    limits = reader.ReadLimits(allowed_roots=(f"{s3_bucket}/photos",))
    assert reader.read(uri, limits) == PHOTO
    with pytest.raises(reader.TooManyBytes, match=f"{len(PHOTO):,} bytes"):
        reader.read(uri, reader.ReadLimits(max_bytes=100))
    with pytest.raises(reader.NotARegularFile):
        reader.read(f"{s3_bucket}/photos", limits)
    with pytest.raises(reader.OutsideRoots):
        reader.read(f"{s3_bucket}/photos/../secret.jpg", limits)
    with pytest.raises(reader.OutsideRoots):
        reader.read(f"{s3_bucket}-other/photos/a.jpg", limits)
    with pytest.raises(FileNotFoundError):
        reader.read(f"{s3_bucket}/photos/missing.jpg", limits)
