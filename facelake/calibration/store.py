"""Where calibration files live and how they are found: ROOT/calibration/<version>--<job id>.json.

`facelake calibrate` writes one live-gallery calibration per job (never overwritten);
``find_gallery`` picks the one that serves an index version; ``load_any`` reads a file of either
kind. Tested in tests/test_calibration.py and tests/test_calibrate.py.
"""

from __future__ import annotations

import json

from facelake import storage
from facelake.calibration import formats
from facelake.calibration.gallery import GALLERY_MARGIN, GalleryCalibration
from facelake.calibration.shipped import Calibration
from facelake.calibration.stats import CalibrationError
from facelake.faces.registry import ModelSpec

GALLERY_DIR = "calibration"
GALLERY_SUFFIX = ".gallery-calibration.json"


def gallery_dir(root: str) -> str:
    """Where a root keeps its live-gallery calibrations (one file per `facelake calibrate` job)."""
    return storage.join(root, GALLERY_DIR)


def save_gallery(cal: GalleryCalibration, root: str, options=None) -> str:
    """Write a live-gallery calibration under ROOT/calibration/ (never overwritten); its URI."""
    uri = storage.join(gallery_dir(root), f"{cal.index_version}--{cal.job_id}{GALLERY_SUFFIX}")
    storage.write_bytes_new(uri, (json.dumps(cal.to_dict(), separators=(",", ":")) + "\n").encode(), options)
    cal.source = storage.redact(uri)
    return uri


def load_gallery(uri: str, options=None) -> GalleryCalibration:
    """One live-gallery calibration file."""
    return GalleryCalibration.from_dict(formats.read_json(uri, options), source=storage.redact(uri))


def load_any(path: str, options=None) -> Calibration | GalleryCalibration:
    """A calibration file of either kind (labeled-set ``Calibration`` or ``GalleryCalibration``)."""
    data = formats.read_json(path, options)
    if isinstance(data, dict) and data.get("kind") == formats.GALLERY_KIND:
        return GalleryCalibration.from_dict(data, source=storage.redact(str(path)))
    return Calibration.from_dict(data, source=storage.redact(str(path)))


def find_gallery(root: str, *, model: str | ModelSpec | None, index_version: str, gallery_size: int,
                 margin: float = GALLERY_MARGIN, options=None) -> GalleryCalibration | None:
    """The live-gallery calibration that serves an index version, or None.

    Preference: the newest one measured on this very version; else the newest one of the same
    model and weights whose gallery is within ``margin`` of ``gallery_size``. Unreadable files and
    files of other models are passed over (they never serve).
    """
    best: tuple[tuple, GalleryCalibration] | None = None
    for uri in storage.list_files(gallery_dir(root), GALLERY_SUFFIX, options):
        try:
            cal = load_gallery(uri, options)
            cal.check_applies(model=model, index_version=index_version, gallery_size=gallery_size, margin=margin)
        except CalibrationError:
            continue
        rank = (cal.index_version == index_version, cal.created, cal.job_id)
        if best is None or rank > best[0]:
            best = (rank, cal)
    return None if best is None else best[1]
