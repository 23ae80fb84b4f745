"""Safe image decoding: pixel limit before decoding, EXIF orientation, grey, alpha, WebP.

Pillow reads only the header on open, so a decompression bomb (a few KB that claims
30000x30000 pixels) is refused before any pixel is decoded. 16-bit and floating-point images
are scaled to 8 bits (never clipped to white); multi-frame files (animated GIF/WebP/PNG,
multi-page TIFF) are read frame by frame with ``decode_frames`` up to a frame limit, and refused
by ``decode_bgr``, which returns one picture; formats Pillow cannot open here (HEIC, JPEG XL)
are named in the error with the package that opens them.
"""

from __future__ import annotations

import io
import warnings

import numpy as np
from PIL import Image, ImageOps

from facelake import storage

# 50 Mpx covers 8K photos and large scans; bombs claim far more. Config can change it.
DEFAULT_MAX_PIXELS = 50_000_000
# Photo formats only: Pillow's other openers (EPS runs Ghostscript, PSD, FITS, ...) are attack
# surface an archive of photos does not need. Formats are recognised by content, not by name.
PHOTO_FORMATS = ("JPEG", "PNG", "WEBP", "GIF", "BMP", "TIFF", "AVIF")


class DecodeError(ValueError):
    """The bytes are not an image facelake can decode (empty, truncated, not an image)."""


class ImageTooLarge(DecodeError):
    """The image claims more pixels than the configured limit (possible decompression bomb)."""


class MultiFrame(DecodeError):
    """The file holds several frames (animation, multi-page TIFF) where one picture was expected."""


class UnsupportedFormat(DecodeError):
    """A known image format that needs a package facelake does not install (named in the message)."""


# Frames read from one multi-frame file at most; their pixels count together against max_pixels.
DEFAULT_MAX_FRAMES = 16
# Files whose extra frames are not pictures of their own: MPO is a JPEG with a preview or depth map.
SINGLE_PICTURE_FORMATS = ("JPEG", "MPO")
# Formats recognised by their first bytes that Pillow cannot open without a plugin package.
_PLUGIN_FORMATS = (
    # (test on the first 32 bytes, format name, package that opens it)
    (lambda head: head[4:8] == b"ftyp" and head[8:12] in (b"heic", b"heix", b"hevc", b"hevx", b"heim", b"heis",
                                                          b"mif1", b"msf1"), "HEIC/HEIF", "pillow-heif"),
    (lambda head: head[:2] == b"\xff\x0a" or head[4:8] == b"JXL ", "JPEG XL", "pillow-jxl-plugin"),
    (lambda head: head[4:8] == b"ftyp" and head[8:12] in (b"avif", b"avis"), "AVIF", "pillow-avif-plugin"),
)


def content_sha256(data: bytes) -> str:
    """Content hash of an image's bytes (the resume and change-detection key)."""
    return storage.sha256(data)


def _unsupported(data: bytes, err: Exception) -> DecodeError:
    """A DecodeError naming the format and the package that would open it, when the bytes say which."""
    head = data[:32]
    for test, name, package in _PLUGIN_FORMATS:
        if test(head):
            return UnsupportedFormat(f"{name} image: this installation cannot open it; install `{package}` "
                                     "on every node (pip install " + package + "), or convert the photo to JPEG")
    return DecodeError(f"cannot decode image: {type(err).__name__}: {err}")


def _open(data: bytes, max_pixels: int) -> Image.Image:
    """Open (header only) and check the pixel limit before any pixel is decoded."""
    if not data:
        raise DecodeError("empty object (0 bytes)")
    try:
        with warnings.catch_warnings():
            # max_pixels below replaces Pillow's warning level (~89 Mpx), so that a --max-pixels
            # above it works; Pillow's hard ceiling (2x that) still raises DecompressionBombError.
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            image = Image.open(io.BytesIO(data), formats=PHOTO_FORMATS)
    except Image.DecompressionBombError as err:
        raise ImageTooLarge(f"refused as a possible decompression bomb: {err}") from err
    except Exception as err:  # Pillow raises many types for bad bytes; the row records which
        raise _unsupported(data, err) from err
    width, height = image.size
    if width <= 0 or height <= 0:
        raise DecodeError(f"image has no pixels ({width}x{height})")
    if width * height > max_pixels:
        raise ImageTooLarge(
            f"image claims {width}x{height} = {width * height:,} pixels, over the limit of "
            f"{max_pixels:,} (raise --max-pixels if such photos are expected)")
    return image


def frame_count(image: Image.Image) -> int:
    """Frames that are pictures of their own (1 for JPEG/MPO, whose extra frames are previews)."""
    if image.format in SINGLE_PICTURE_FORMATS:
        return 1
    return max(1, int(getattr(image, "n_frames", 1) or 1))


def decode_bgr(data: bytes, max_pixels: int = DEFAULT_MAX_PIXELS) -> np.ndarray:
    """Decode image bytes to an upright uint8 BGR array (H, W, 3).

    A multi-frame file is refused with MultiFrame (use ``decode_frames`` to read its frames).
    """
    image = _open(data, max_pixels)
    frames = _safe(lambda: frame_count(image))
    if frames > 1:
        raise MultiFrame(f"{image.format} file holds {frames} frames; facelake reads one picture per manifest row "
                         "here: split the frames into files (one row each), or embed it frame by frame")
    return _load_frame(image, 0)


def decode_frames(data: bytes, max_pixels: int = DEFAULT_MAX_PIXELS,
                  max_frames: int = DEFAULT_MAX_FRAMES) -> list[tuple[int, np.ndarray]]:
    """Every frame of a file as (frame number, upright uint8 BGR array); a single picture gives [(0, array)].

    More than ``max_frames`` frames, or frames whose pixels together exceed ``max_pixels``, are
    refused before decoding (an animation of 10,000 frames is a bomb too).
    """
    image = _open(data, max_pixels)
    frames = _safe(lambda: frame_count(image))
    if frames > max_frames:
        raise MultiFrame(f"{image.format} file holds {frames} frames, over the limit of {max_frames} "
                         "(split it into files, or raise the frame limit)")
    width, height = image.size
    if frames * width * height > max_pixels:
        raise ImageTooLarge(f"{frames} frames of {width}x{height} = {frames * width * height:,} pixels, over the "
                            f"limit of {max_pixels:,} (raise --max-pixels if such files are expected)")
    return [(number, _load_frame(image, number)) for number in range(frames)]


def _safe(step):
    try:
        return step()
    except DecodeError:
        raise
    except Exception as err:
        raise DecodeError(f"cannot decode image: {type(err).__name__}: {err}") from err


def _load_frame(image: Image.Image, number: int) -> np.ndarray:
    def load() -> Image.Image:
        if number:
            image.seek(number)
        image.load()
        return image

    frame = _safe(load)
    if frame.size[0] * frame.size[1] <= 0:
        raise DecodeError(f"frame {number} has no pixels")
    try:
        frame = ImageOps.exif_transpose(frame)
    except Exception:  # absurd EXIF: keep the stored orientation rather than lose the photo
        pass
    return _safe(lambda: _to_bgr(frame))


def _to_bgr(image: Image.Image) -> np.ndarray:
    """uint8 BGR from any Pillow mode: alpha on white, 16-bit and float scaled (not clipped)."""
    if image.mode in ("I;16", "I;16L", "I;16B", "I;16N", "I", "F"):
        grey = _scale_to_8bit(np.asarray(image), image.mode)
        return np.ascontiguousarray(np.repeat(grey[:, :, None], 3, axis=2))
    if image.mode in ("RGBA", "LA", "PA") or (image.mode == "P" and "transparency" in image.info):
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        image = Image.alpha_composite(background, rgba)
    rgb = np.asarray(image.convert("RGB"))
    return np.ascontiguousarray(rgb[:, :, ::-1])


def _scale_to_8bit(values: np.ndarray, mode: str) -> np.ndarray:
    """16-bit integers by 255/65535; 32-bit integers and floats by their range (floats in [0, 1] by 255)."""
    values = values.astype(np.float64)
    finite = values[np.isfinite(values)]
    if mode.startswith("I;16"):
        scaled = values * (255.0 / 65535.0)
    elif mode == "F" and finite.size and finite.min() >= 0.0 and finite.max() <= 1.0:
        scaled = values * 255.0
    elif mode == "I" and finite.size and finite.min() >= 0 and finite.max() <= 65535:
        scaled = values * (255.0 / 65535.0)  # Pillow opens some 16-bit files as 32-bit "I"
    else:
        low, high = (float(finite.min()), float(finite.max())) if finite.size else (0.0, 1.0)
        scaled = (values - low) * (255.0 / (high - low)) if high > low else np.zeros_like(values)
    return np.clip(np.nan_to_num(np.rint(scaled), nan=0.0), 0, 255).astype(np.uint8)
