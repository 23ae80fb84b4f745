"""Image formats beyond 8-bit single pictures: 16-bit and float scaled (not clipped), multi-frame
files read frame by frame up to a limit (and refused where one picture is expected), formats that
need a plugin named with it. Real sample photos, real Pillow encoders, the real detector."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from facelake.faces.imaging import (DEFAULT_MAX_FRAMES, DecodeError, ImageTooLarge, MultiFrame, UnsupportedFormat,
                              decode_bgr, decode_frames)
from tests.helpers import SAMPLE_DIR, encode, grey, png16


def test_16bit_grey_png_is_scaled_not_clipped():
    bgr = decode_bgr(png16())
    assert bgr.dtype == np.uint8 and bgr.shape[2] == 3
    assert np.abs(bgr[:, :, 0].astype(int) - grey().astype(int)).max() <= 1
    assert (bgr == 255).mean() < 0.2, "clipped to white"


def test_float_tiff_is_scaled(tmp_path):
    data = encode(Image.fromarray(grey().astype(np.float32) / 255.0), "TIFF")
    bgr = decode_bgr(data)
    assert np.abs(bgr[:, :, 1].astype(int) - grey().astype(int)).max() <= 1


def test_16bit_grey_photo_still_has_its_face(face_engine):
    assert face_engine.detect(decode_bgr(png16()))


def frames_of(names: list[str], size=(200, 240)) -> list[Image.Image]:
    return [Image.open(SAMPLE_DIR / n).convert("RGB").resize(size) for n in names]


@pytest.mark.parametrize("fmt", ["GIF", "WEBP", "TIFF", "PNG"])
def test_multi_frame_read_frame_by_frame_and_refused_as_one_picture(fmt):
    frames = frames_of(["img1.jpg", "img2.jpg", "img3.jpg"])
    kwargs = {"lossless": True} if fmt == "WEBP" else {}
    data = encode(frames[0], fmt, save_all=True, append_images=frames[1:], duration=100, **kwargs)
    with pytest.raises(MultiFrame, match="3 frames"):
        decode_bgr(data)
    decoded = decode_frames(data)
    assert [n for n, _ in decoded] == [0, 1, 2]
    for (_, bgr), source in zip(decoded, frames):
        error = np.abs(bgr[:, :, ::-1].astype(int) - np.asarray(source).astype(int)).mean()
        assert error < (12 if fmt == "GIF" else 1), (fmt, error)  # GIF: 256-colour palette


def test_frame_limit_and_pixel_budget_across_frames():
    frames = frames_of(["img1.jpg"] * 3, size=(60, 60))
    many = encode(frames[0], "TIFF", save_all=True, append_images=frames * 7)
    with pytest.raises(MultiFrame, match=f"over the limit of {DEFAULT_MAX_FRAMES}"):
        decode_frames(many)
    assert len(decode_frames(many, max_frames=22)) == 22
    with pytest.raises(ImageTooLarge, match="22 frames"):
        decode_frames(many, max_pixels=60 * 60 * 21, max_frames=100)


def test_jpeg_with_a_preview_frame_is_one_picture():
    """MPO (phone photos with a preview or depth frame) is still read as its first picture."""
    first, second = frames_of(["img1.jpg", "img2.jpg"])
    data = encode(first, "MPO", save_all=True, append_images=[second])
    assert decode_bgr(data).shape == (240, 200, 3)
    assert len(decode_frames(data)) == 1


@pytest.mark.parametrize("head, name, package", [
    (b"\x00\x00\x00\x18ftypheic\x00\x00\x00\x00mif1heic", "HEIC", "pillow-heif"),
    (b"\x00\x00\x00\x18ftypmif1\x00\x00\x00\x00mif1heic", "HEIC", "pillow-heif"),
    (b"\x00\x00\x00\x0cJXL \x0d\x0a\x87\x0a", "JPEG XL", "pillow-jxl-plugin"),
])
def test_formats_needing_a_plugin_name_it(head, name, package):
    with pytest.raises(UnsupportedFormat) as caught:
        decode_bgr(head + b"\x00" * 200)
    assert name in str(caught.value) and package in str(caught.value)
    assert isinstance(caught.value, DecodeError)


def test_unknown_bytes_stay_a_plain_decode_error():
    with pytest.raises(DecodeError, match="cannot decode image") as caught:
        decode_bgr(b"\x00\x01garbage" * 10)
    assert not isinstance(caught.value, UnsupportedFormat)
