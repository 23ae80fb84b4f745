"""Hostile input: decompression bombs, non-images, truncated files, absurd EXIF, empty and tiny
images, other formats' openers, and manifest uris escaping the allowed roots.

The decoder is tested directly (fast, exact error types, time and memory bounds) and through a
real embed run over an archive folder holding all of them, confined with allowed roots: every
row ends in exactly one of faces/errors with the stage and type the user can act on.
"""

from __future__ import annotations

import io
import json
import os
import struct
import subprocess
import sys
import textwrap
import time
import zlib

import pyarrow as pa
import pytest
from PIL import Image

from facelake import storage
from facelake.faces.imaging import DecodeError, ImageTooLarge, decode_bgr
from facelake.jobs.embed import EmbedConfig, outputs, run_embed
from facelake.schema import NO_FACE
from tests.helpers import SAMPLE_DIR, png16


# ------------------------------------------------------------------------- hostile bytes

def _chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)


def png_claiming(width: int, height: int, rows: int = 64) -> bytes:
    """A valid-looking 1-bit greyscale PNG whose header claims width x height pixels, holding only
    ``rows`` rows of zeros: a few KB that would decode into gigabytes (a decompression bomb)."""
    header = struct.pack(">IIBBBBB", width, height, 1, 0, 0, 0, 0)
    row = b"\0" * (1 + (width + 7) // 8)
    body = zlib.compress(row * min(rows, max(height, 1)), 9)
    return b"\x89PNG\r\n\x1a\n" + _chunk(b"IHDR", header) + _chunk(b"IDAT", body) + _chunk(b"IEND", b"")


def png_full_bomb(width: int, height: int) -> bytes:
    """A complete 1-bit PNG of width x height zeros (deflate keeps it ~1/1000 of the raw size)."""
    header = struct.pack(">IIBBBBB", width, height, 1, 0, 0, 0, 0)
    row = b"\0" * (1 + (width + 7) // 8)
    comp = zlib.compressobj(9)
    body = b"".join(comp.compress(row) for _ in range(height)) + comp.flush()
    return b"\x89PNG\r\n\x1a\n" + _chunk(b"IHDR", header) + _chunk(b"IDAT", body) + _chunk(b"IEND", b"")


def jpeg_with_exif(name: str = "img1.jpg", orientation: int = 9999) -> bytes:
    """A sample photo re-saved with an out-of-range EXIF orientation."""
    image = Image.open(SAMPLE_DIR / name).convert("RGB")
    exif = Image.Exif()
    exif[0x0112] = orientation
    out = io.BytesIO()
    image.save(out, format="JPEG", exif=exif.tobytes())
    return out.getvalue()


def jpeg_with_absurd_ifd(name: str = "img1.jpg") -> bytes:
    """A sample photo whose EXIF block claims 65535 entries and a tag with 2**31 values."""
    image = Image.open(SAMPLE_DIR / name).convert("RGB")
    out = io.BytesIO()
    image.save(out, format="JPEG")
    jpeg = out.getvalue()
    # TIFF header (little endian), IFD at offset 8 claiming 65535 entries; the first entry is
    # Orientation (SHORT) with count 2**31 pointing far outside the block.
    tiff = b"II*\x00" + struct.pack("<I", 8) + struct.pack("<H", 0xFFFF)
    tiff += struct.pack("<HHII", 0x0112, 3, 2**31, 0x7FFFFFF0)
    tiff += struct.pack("<HHII", 0x8769, 4, 1, 0xFFFFFF00)  # ExifIFD pointer out of range
    tiff += b"\0" * 64
    app1 = b"Exif\x00\x00" + tiff
    segment = b"\xff\xe1" + struct.pack(">H", len(app1) + 2) + app1
    return jpeg[:2] + segment + jpeg[2:]


def png_of(width: int, height: int) -> bytes:
    out = io.BytesIO()
    Image.new("RGB", (width, height), (128, 128, 128)).save(out, format="PNG")
    return out.getvalue()


def truncated(name: str = "img2.jpg", keep: float = 0.5) -> bytes:
    data = (SAMPLE_DIR / name).read_bytes()
    return data[: int(len(data) * keep)]


def eps_file() -> bytes:
    """A minimal EPS: Pillow opens it with its EPS plugin, which runs Ghostscript to decode."""
    return (b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 10 10\n%%EndComments\n"
            b"newpath 0 0 moveto 10 10 lineto stroke\nshowpage\n%%EOF\n")


# ------------------------------------------------------------------------- the decoder

def test_bomb_of_a_few_kb_refused_before_decoding_fast_and_small():
    """30000x30000 claimed by ~300 bytes: refused by the pixel limit in a fresh process whose peak
    memory stays far below the 900 MB (1 byte/px) a decode would need."""
    bomb = png_claiming(30000, 30000)
    assert len(bomb) < 4096
    script = textwrap.dedent("""
        import json, resource, sys, time
        from facelake.faces.imaging import decode_bgr, ImageTooLarge
        data = sys.stdin.buffer.read()
        before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        started = time.perf_counter()
        try:
            decode_bgr(data)
            outcome = "decoded"
        except ImageTooLarge as err:
            outcome = "ImageTooLarge: " + str(err)
        print(json.dumps({"outcome": outcome, "seconds": time.perf_counter() - started,
                          "grew_kb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before}))
    """)
    done = subprocess.run([sys.executable, "-c", script], input=bomb, capture_output=True, timeout=60, check=True)
    result = json.loads(done.stdout.decode().strip().splitlines()[-1])
    assert result["outcome"].startswith("ImageTooLarge"), result
    assert result["seconds"] < 0.5, result
    assert result["grew_kb"] < 50_000, result  # < 50 MB growth; a decode needs 900 MB+


@pytest.mark.parametrize("width,height,max_pixels", [
    (30000, 30000, None),          # beyond Pillow's own hard ceiling
    (10000, 10000, None),          # between Pillow's warning level and its ceiling
    (8000, 8000, None),            # under Pillow's levels, over facelake's 50 Mpx default
    (2000, 2000, 1_000_000),       # a configured lower limit
])
def test_pixel_limit_names_image_too_large(width, height, max_pixels):
    kwargs = {"max_pixels": max_pixels} if max_pixels else {}
    started = time.perf_counter()
    with pytest.raises(ImageTooLarge, match="pixels"):
        decode_bgr(png_full_bomb(width, height) if width <= 2000 else png_claiming(width, height), **kwargs)
    assert time.perf_counter() - started < 0.5


def test_max_pixels_above_pillows_warning_level_is_honoured(monkeypatch):
    """--max-pixels is the limit: a photo under it decodes even when Pillow would warn about its size
    (Pillow's warning level is lowered here so the test stays small)."""
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 100_000)
    assert decode_bgr(png_of(400, 400), max_pixels=1_000_000).shape == (400, 400, 3)
    with pytest.raises(ImageTooLarge):
        decode_bgr(png_of(400, 400), max_pixels=100_000)


@pytest.mark.parametrize("name,data", [
    ("empty", b""),
    ("text", b"root:x:0:0:root:/root:/bin/bash\n"),
    ("png_signature_only", b"\x89PNG\r\n\x1a\n"),
    ("jpeg_soi_only", b"\xff\xd8\xff"),
    ("html", b"<html><body>403 Forbidden</body></html>"),
    ("truncated_jpeg", truncated("img2.jpg", 0.5)),
    ("truncated_header", truncated("img2.jpg", 0.001)),
    ("zero_width_png", png_claiming(0, 10)),
    ("zero_height_png", png_claiming(10, 0)),
    ("eps", eps_file()),
])
def test_not_an_image_is_a_decode_error(name, data):
    with pytest.raises(DecodeError):
        decode_bgr(data)


def test_other_formats_openers_never_run(tmp_path, monkeypatch):
    """An EPS object must not reach Ghostscript: a fake `gs` first on PATH records any call."""
    marker = tmp_path / "gs-was-called"
    fake = tmp_path / "bin"
    fake.mkdir()
    for name in ("gs", "gswin32c", "gswin64c"):
        (fake / name).write_text(f"#!/bin/sh\ntouch {marker}\nexit 1\n")
        (fake / name).chmod(0o755)
    monkeypatch.setenv("PATH", f"{fake}{os.pathsep}{os.environ['PATH']}")
    with pytest.raises(DecodeError):
        decode_bgr(eps_file())
    assert not marker.exists(), "decoding an archive object ran Ghostscript"


def test_absurd_exif_keeps_the_photo():
    for data in (jpeg_with_exif(orientation=9999), jpeg_with_exif(orientation=0), jpeg_with_absurd_ifd()):
        started = time.perf_counter()
        image = decode_bgr(data)
        assert image.shape == (1868, 1382, 3) or image.shape[2] == 3
        assert time.perf_counter() - started < 2.0


def test_tiny_images_decode():
    assert decode_bgr(png_of(1, 1)).shape == (1, 1, 3)
    assert decode_bgr(png_of(1, 3000)).shape == (3000, 1, 3)


def animated_gif() -> bytes:
    frames = [Image.open(SAMPLE_DIR / n).convert("RGB") for n in ("img1.jpg", "img2.jpg")]
    out = io.BytesIO()
    frames[0].save(out, format="GIF", save_all=True, append_images=frames[1:], duration=100)
    return out.getvalue()


# ------------------------------------------------------------------------- the embed job

def test_hostile_archive_confined_to_allowed_root(tmp_path, ray_local, provisioned_weights):
    """Every hostile object and every escaping uri ends as one clear error row; good photos embed."""
    archive = tmp_path / "archive"
    photos = archive / "photos"
    photos.mkdir(parents=True)
    outside = tmp_path / "secret"
    outside.mkdir()
    (outside / "face.jpg").write_bytes((SAMPLE_DIR / "img3.jpg").read_bytes())
    os.symlink(outside / "face.jpg", photos / "link.jpg")  # inside by name, outside in fact
    objects = {
        "good1": ("img1.jpg", (SAMPLE_DIR / "img1.jpg").read_bytes()),
        "good2": ("img2.jpg", (SAMPLE_DIR / "img2.jpg").read_bytes()),
        "exif9999": ("exif.jpg", jpeg_with_exif("img5.jpg", 9999)),
        "huge_ifd": ("ifd.jpg", jpeg_with_absurd_ifd("img6.jpg")),
        "bomb": ("bomb.png", png_claiming(30000, 30000)),
        "bomb_64mpx": ("bomb2.png", png_claiming(8000, 8000)),
        "text": ("notes.jpg", b"this is not an image\n" * 10),
        "truncated": ("cut.jpg", truncated("img7.jpg", 0.3)),
        "empty": ("empty.jpg", b""),
        "zero_px": ("zero.png", png_claiming(0, 0)),
        "one_px": ("one.png", png_of(1, 1)),
        "eps": ("drawing.eps", eps_file()),
        "grey16": ("grey16.png", png16("img8.jpg")),
        "animated": ("anim.gif", animated_gif()),
        "heic": ("photo.heic", b"\x00\x00\x00\x18ftypheic\x00\x00\x00\x00mif1heic" + b"\x00" * 256),
    }
    for name, data in objects.values():
        (photos / name).write_bytes(data)
    rows = [(image_id, f"photos/{name}") for image_id, (name, _) in objects.items()]
    # inside the root but not photos: a FIFO (a plain open would hang forever) and a sparse 8 GiB file
    os.mkfifo(photos / "pipe.jpg")
    with open(photos / "sparse.jpg", "wb") as handle:
        handle.truncate(8 * 1024 ** 3)
    not_read = {"fifo": ("photos/pipe.jpg", "NotARegularFile"), "sparse": ("photos/sparse.jpg", "TooManyBytes")}
    rows += [(image_id, uri) for image_id, (uri, _) in not_read.items()]
    escaping = {
        "traversal": "photos/../../secret/face.jpg",
        "traversal_etc": "../../../../../../etc/passwd",
        "absolute_outside": str(outside / "face.jpg"),
        "file_scheme": "file:///etc/passwd",
        "file_host": "file://localhost/etc/passwd",
        "http": "http://169.254.169.254/latest/meta-data/iam/",
        "https": "https://example.invalid/a.jpg",
        "ftp": "ftp://example.invalid/a.jpg",
        "s3_other_bucket": "s3://someone-elses-bucket/a.jpg",
        "symlink_out": "photos/link.jpg",
        "prefix_sibling": str(tmp_path / "archive-evil" / "x.jpg"),
    }
    rows += list(escaping.items())
    manifest = pa.table({"image_id": [r[0] for r in rows], "uri": [r[1] for r in rows],
                         "note": [f"row {i}" for i in range(len(rows))]})
    storage.write_table(str(archive / "manifest.parquet"), manifest)
    out = str(tmp_path / "out")

    summary = run_embed(EmbedConfig(manifest=str(archive / "manifest.parquet"), out=out, batch_size=4,
                                    allowed_roots=(str(archive),), progress=False))

    layout = outputs(out)
    faces = storage.read_table(layout["faces"])
    errors = {r["image_id"]: r for r in storage.read_table(layout["errors"]).to_pylist()}
    face_ids = set(faces["image_id"].to_pylist())
    assert face_ids | set(errors) == set(manifest["image_id"].to_pylist()), "a row was lost"
    assert not face_ids & set(errors), "a row is in both tables"
    assert face_ids == {"good1", "good2", "exif9999", "huge_ifd", "grey16"}
    for image_id in escaping:
        assert errors[image_id]["stage"] == "validate", errors[image_id]
        assert errors[image_id]["error_type"] in ("OutsideRoots", "UnsupportedUri"), errors[image_id]
    for image_id in ("bomb", "bomb_64mpx"):
        assert (errors[image_id]["stage"], errors[image_id]["error_type"]) == ("decode", "ImageTooLarge")
    for image_id in ("text", "truncated", "empty", "zero_px", "eps"):
        assert (errors[image_id]["stage"], errors[image_id]["error_type"]) == ("decode", "DecodeError"), errors[image_id]
    assert errors["one_px"]["error_type"] == NO_FACE
    assert (errors["animated"]["stage"], errors["animated"]["error_type"]) == ("decode", "MultiFrame")
    assert "2 frames" in errors["animated"]["message"]
    assert (errors["heic"]["stage"], errors["heic"]["error_type"]) == ("decode", "UnsupportedFormat")
    assert "pillow-heif" in errors["heic"]["message"]
    for image_id, (_, error_type) in not_read.items():
        assert (errors[image_id]["stage"], errors[image_id]["error_type"]) == ("fetch", error_type), errors[image_id]
        assert errors[image_id]["content_sha256"] is None
    assert errors["file_scheme"]["note"] == f"row {[r[0] for r in rows].index('file_scheme')}"
    # nothing outside the root was read: no content hash on any refused row
    assert all(errors[i]["content_sha256"] is None for i in escaping)
    assert summary.images == len(rows)
