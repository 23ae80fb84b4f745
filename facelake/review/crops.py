"""Faces people can see: a photo read and decoded the way the embed job saw it, and the crop of a
face's bbox with a margin.

Photos are read through ``facelake.faces.reader`` (the one door: allowed roots, regular files,
size and time limits; local, file:// or s3://) and decoded by ``facelake.faces.imaging.decode_bgr``,
so a bbox, which is in the pixels of the EXIF-upright image, crops the same face the embed job
saw. Manifest uris may be relative to the manifest's folder: pass that folder as ``base_dir``.
Tested in tests/test_review.py.
"""

from __future__ import annotations

import os
from collections import OrderedDict
from typing import Iterable

import numpy as np
from PIL import Image

from facelake import samples, storage
from facelake.errors import ConfigError
from facelake.faces import reader
from facelake.faces.imaging import DEFAULT_MAX_PIXELS, decode_bgr
from facelake.faces.reader import ReadLimits
from facelake.storage import StorageOptions

# Crops: the face plus this share of its width/height on each side, so hair and jaw show.
DEFAULT_MARGIN = 0.2


def resolve_uri(uri: str, base_dir: str | None = None) -> str:
    """A photo's uri as stored in a manifest, made absolute against ``base_dir`` when relative."""
    storage.check_uri(uri)
    if base_dir is None and storage.scheme_of(uri) == "file" and not uri.startswith("file://") \
            and not os.path.isabs(uri):
        raise ConfigError(f"photo uri {uri!r} is relative to its manifest's folder: pass base_dir= that "
                          f"folder (for the demo: {samples.FOLDER})")
    return reader.resolve(uri, base_dir or "")


def load_photo(uri: str, base_dir: str | None = None, *, max_pixels: int = DEFAULT_MAX_PIXELS,
               options: StorageOptions | None = None, limits: ReadLimits | None = None) -> np.ndarray:
    """A photo as an upright RGB uint8 array (H, W, 3), read through facelake.faces.reader
    (regular files and objects only, at most ``limits.max_bytes``, under ``limits.allowed_roots``)."""
    full = resolve_uri(uri, base_dir)
    bgr = decode_bgr(reader.read(full, limits or ReadLimits(), options), max_pixels)
    return np.ascontiguousarray(bgr[:, :, ::-1])


def crop_box(bbox: Iterable[int], image_size: tuple[int, int],
             margin: float = DEFAULT_MARGIN) -> tuple[int, int, int, int]:
    """(left, top, right, bottom) of a bbox (x, y, w, h) grown by ``margin`` per side, inside the image."""
    x, y, w, h = (int(v) for v in bbox)
    if w <= 0 or h <= 0:
        raise ValueError(f"bbox {list(bbox)} has no area")
    if margin < 0:
        raise ConfigError(f"margin must be >= 0, got {margin}")
    width, height = image_size
    dx, dy = round(w * margin), round(h * margin)
    left, top = max(0, x - dx), max(0, y - dy)
    right, bottom = min(width, x + w + dx), min(height, y + h + dy)
    if right <= left or bottom <= top:
        raise ValueError(f"bbox {list(bbox)} lies outside the {width}x{height} photo")
    return left, top, right, bottom


def crop_face(uri: str, bbox: Iterable[int], margin: float = DEFAULT_MARGIN, base_dir: str | None = None, *,
              photo: np.ndarray | None = None, options: StorageOptions | None = None) -> Image.Image:
    """The face at ``bbox`` (x, y, w, h in the EXIF-upright photo) with a margin, as an RGB PIL image.

    ``uri`` is local, file:// or s3:// (relative uris resolve against ``base_dir``); ``photo``
    skips reading when the decoded RGB photo is already at hand.
    """
    rgb = load_photo(uri, base_dir, options=options) if photo is None else photo
    left, top, right, bottom = crop_box(bbox, (rgb.shape[1], rgb.shape[0]), margin)
    return Image.fromarray(rgb[top:bottom, left:right])


class PhotoCache:
    """The last ``size`` decoded photos, so faces of one photo are cropped from one read."""

    def __init__(self, base_dir: str | None, options: StorageOptions | None, size: int) -> None:
        self.base_dir, self.options, self.size = base_dir, options, size
        self.cache: OrderedDict[str, np.ndarray] = OrderedDict()

    def crop(self, uri: str, bbox, margin: float, longest_side: int) -> Image.Image:
        """The face's crop, shrunk to at most ``longest_side`` pixels."""
        if uri not in self.cache:
            self.cache[uri] = load_photo(uri, self.base_dir, options=self.options)
            if len(self.cache) > self.size:
                self.cache.popitem(last=False)
        face = crop_face(uri, bbox, margin, photo=self.cache[uri])
        face.thumbnail((longest_side, longest_side))
        return face
