"""Safe image decoding: pixel limit before decoding, EXIF orientation, grey, alpha, WebP.

Pillow reads only the header on open, so a decompression bomb (a few KB that claims
30000x30000 pixels) is refused before any pixel is decoded.
"""

from __future__ import annotations

import hashlib
import io
import warnings

import numpy as np
from PIL import Image, ImageOps

# 50 Mpx covers 8K photos and large scans; bombs claim far more. Config can change it.
DEFAULT_MAX_PIXELS = 50_000_000
# Photo formats only: Pillow's other openers (EPS runs Ghostscript, PSD, FITS, ...) are attack
# surface an archive of photos does not need. Formats are recognised by content, not by name.
PHOTO_FORMATS = ("JPEG", "PNG", "WEBP", "GIF", "BMP", "TIFF", "AVIF")


class DecodeError(ValueError):
    """The bytes are not an image facelake can decode (empty, truncated, not an image)."""


class ImageTooLarge(DecodeError):
    """The image claims more pixels than the configured limit (possible decompression bomb)."""


def content_sha256(data: bytes) -> str:
    """Content hash of an image's bytes (the resume and change-detection key)."""
    return hashlib.sha256(data).hexdigest()


def decode_bgr(data: bytes, max_pixels: int = DEFAULT_MAX_PIXELS) -> np.ndarray:
    """Decode image bytes to an upright uint8 BGR array (H, W, 3)."""
    if not data:
        raise DecodeError("empty object (0 bytes)")
    try:
        with warnings.catch_warnings():
            # max_pixels below replaces Pillow's warning level (~89 Mpx), so that a --max-pixels
            # above it works; Pillow's hard ceiling (2x that) still raises DecompressionBombError.
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            image = Image.open(io.BytesIO(data), formats=PHOTO_FORMATS)
            width, height = image.size
            if width <= 0 or height <= 0:
                raise DecodeError(f"image has no pixels ({width}x{height})")
            if width * height > max_pixels:
                raise ImageTooLarge(
                    f"image claims {width}x{height} = {width * height:,} pixels, over the limit of "
                    f"{max_pixels:,} (raise --max-pixels if such photos are expected)")
            image.load()
    except DecodeError:
        raise
    except Image.DecompressionBombError as err:
        raise ImageTooLarge(f"refused as a possible decompression bomb: {err}") from err
    except Exception as err:  # Pillow raises many types for bad bytes; the row records which
        raise DecodeError(f"cannot decode image: {type(err).__name__}: {err}") from err
    try:
        image = ImageOps.exif_transpose(image)
    except Exception:  # absurd EXIF: keep the stored orientation rather than lose the photo
        pass
    if image.mode in ("RGBA", "LA", "PA") or (image.mode == "P" and "transparency" in image.info):
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        image = Image.alpha_composite(background, rgba)
    rgb = np.asarray(image.convert("RGB"))
    return np.ascontiguousarray(rgb[:, :, ::-1])
