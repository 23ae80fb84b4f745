"""facelake.review: face crops against manual PIL crops (local, s3://, EXIF-rotated), the review
grid's panels and below-threshold marks, and reading results with filters. The same API over the
demo's real outputs is exercised by tests/test_notebooks.py."""

from __future__ import annotations

import io
import json

import numpy as np
import pyarrow as pa
import pytest
from PIL import Image

from facelake import review, storage
from facelake.errors import ConfigError
from facelake.schema import RESULT_COLUMNS
from tests.helpers import SAMPLE_DIR

PHOTO = SAMPLE_DIR / "img1.jpg"          # 1000x1000-ish, no EXIF orientation
BBOX = (414, 201, 610, 819)              # the face the embed job finds in img1 (x, y, w, h)


def _manual(path, bbox, margin):
    image = Image.open(path).convert("RGB")
    x, y, w, h = bbox
    dx, dy = round(w * margin), round(h * margin)
    box = (max(0, x - dx), max(0, y - dy), min(image.width, x + w + dx), min(image.height, y + h + dy))
    return np.asarray(image.crop(box))


def test_sample_photo_has_no_exif_rotation():
    assert Image.open(PHOTO).getexif().get(0x0112, 1) == 1


@pytest.mark.parametrize("bbox,margin", [((100, 50, 200, 240), 0.2), ((100, 50, 200, 240), 0.0), (BBOX, 0.2),
                                         ((0, 0, 50, 60), 0.5)])  # the last one is clipped at the corner
def test_crop_face_is_the_manual_crop(bbox, margin):
    crop = review.crop_face(str(PHOTO), bbox, margin=margin)
    assert isinstance(crop, Image.Image) and crop.mode == "RGB"
    np.testing.assert_array_equal(np.asarray(crop), _manual(PHOTO, bbox, margin))


def test_crop_face_relative_uri_needs_base_dir():
    crop = review.crop_face("img1.jpg", BBOX, base_dir=str(SAMPLE_DIR))
    np.testing.assert_array_equal(np.asarray(crop), _manual(PHOTO, BBOX, 0.2))
    with pytest.raises(ConfigError, match="base_dir"):
        review.crop_face("img1.jpg", BBOX)
    with pytest.raises(ValueError, match="outside"):
        review.crop_face(str(PHOTO), (5000, 5000, 10, 10))


def test_crop_face_on_s3(s3_bucket):
    storage.write_bytes_atomic(f"{s3_bucket}/photos/img1.jpg", PHOTO.read_bytes())
    expected = _manual(PHOTO, BBOX, 0.2)
    np.testing.assert_array_equal(np.asarray(review.crop_face(f"{s3_bucket}/photos/img1.jpg", BBOX)), expected)
    relative = review.crop_face("img1.jpg", BBOX, base_dir=f"{s3_bucket}/photos")
    np.testing.assert_array_equal(np.asarray(relative), expected)
    with pytest.raises(FileNotFoundError):
        review.crop_face(f"{s3_bucket}/photos/missing.jpg", BBOX)


def test_exif_rotated_photo_crops_upright(tmp_path):
    """A camera that stored the pixels turned 90 degrees and says so in EXIF (orientation 6):
    the bbox is in upright pixels, so the crop matches the upright photo's crop."""
    upright = Image.open(PHOTO).convert("RGB")
    stored = upright.transpose(Image.Transpose.ROTATE_90)          # what the sensor wrote
    exif = Image.Exif()
    exif[0x0112] = 6                                                # display: rotate 90 degrees clockwise
    path = tmp_path / "rotated.jpg"
    stored.save(path, format="JPEG", quality=95, exif=exif.tobytes())
    assert Image.open(path).size == (upright.height, upright.width)

    bbox = (414, 201, 610, 819)                                     # taller than wide
    crop = np.asarray(review.crop_face(str(path), bbox, margin=0.1), np.float32)
    expected = _manual(PHOTO, bbox, 0.1).astype(np.float32)
    assert crop.shape == expected.shape
    assert np.abs(crop - expected).mean() < 6                       # JPEG re-encoding only
    raw = np.asarray(Image.open(path).convert("RGB"), np.float32)   # ignoring EXIF would crop this
    x, y, w, h = bbox
    wrong = raw[y - 82:y + h + 82, x - 61:x + w + 61]
    assert wrong.shape != expected.shape or np.abs(wrong - expected).mean() > 30


# ------------------------------------------------------------------------------ results and grid

def _results_table() -> pa.Table:
    """Three probe faces: img1 (its own face + 3 candidates, one below threshold), img2 (one
    candidate below threshold), img3 (identify mode, nothing at or above threshold: rank null)."""
    rows = [
        # probe, face, bbox, rank, gallery, gface, gbbox, sim, fmr, above
        ("img1", 0, BBOX, 1, "img1", 0, BBOX, 1.0, 3e-8, True),
        ("img1", 0, BBOX, 2, "img2", 0, (583, 172, 389, 524), 0.71, 5.5e-7, True),
        ("img1", 0, BBOX, 3, "img4", 0, (100, 100, 300, 400), 0.62, 1.1e-6, True),
        ("img1", 0, BBOX, 4, "img5", 0, (150, 120, 250, 330), 0.31, 6e-3, False),
        ("img2", 0, (583, 172, 389, 524), 1, "img6", 0, (192, 206, 386, 535), 0.29, 8e-3, False),
        ("img3", 0, (100, 100, 200, 200), None, None, None, None, None, None, None),
    ]
    cols = list(zip(*rows))
    table = pa.table({
        "job_id": ["search-test"] * len(rows),
        "probe_image_id": cols[0], "probe_face_index": cols[1], "probe_bbox": [list(b) for b in cols[2]],
        "rank": cols[3], "gallery_image_id": cols[4], "gallery_face_index": cols[5],
        "gallery_bbox": [list(b) if b else None for b in cols[6]], "similarity": cols[7],
        "est_false_match_rate": cols[8], "above_threshold": cols[9],
        "index_version": ["v1"] * len(rows),
    }).cast(RESULT_COLUMNS)
    table = table.append_column("probe_uri", pa.array([f"faces/{p}.jpg" for p in cols[0]]))
    table = table.append_column("gallery_uri", pa.array([f"faces/{g}.jpg" if g else None for g in cols[4]]))
    meta = {"job_id": "search-test", "mode": "investigate", "threshold": 0.487, "threshold_how": "test",
            "index_version": "v1"}
    return table.replace_schema_metadata({b"facelake.search": json.dumps(meta).encode()})


@pytest.fixture
def results_dir(tmp_path):
    storage.write_table(str(tmp_path / "results" / "part-search-test-00000.parquet"), _results_table())
    return str(tmp_path)


def test_read_results_filters(results_dir):
    everything = review.read_results(results_dir)
    assert len(everything) == 6 and everything.attrs["search"]["threshold"] == 0.487
    assert list(review.read_results(results_dir, probe="img2")["gallery_image_id"]) == ["img6"]
    assert set(review.read_results(results_dir, probe=["img1", "img3"])["probe_image_id"]) == {"img1", "img3"}
    assert list(review.read_results(results_dir, max_fmr=1e-6)["rank"]) == [1, 2]
    assert list(review.read_results(results_dir, min_similarity=0.6, exclude_self=True)["gallery_image_id"]) \
        == ["img2", "img4"]
    assert list(review.read_results(results_dir, above_threshold=False)["gallery_image_id"]) == ["img5", "img6"]
    assert list(review.read_results(results_dir, max_rank=1)["probe_image_id"]) == ["img1", "img2"]
    assert len(review.read_results(f"{results_dir}/results", exclude_self=True)) == 5  # the null row stays
    assert review.read_results(results_dir, as_pandas=False).num_rows == 6
    with pytest.raises(FileNotFoundError, match="facelake search"):
        review.read_results(f"{results_dir}/nothing")


def test_grid_panels_and_below_threshold_marks(results_dir):
    results = review.read_results(results_dir)
    fig = review.render_review_grid(results, base_dir=str(SAMPLE_DIR.parent), max_probes=3, max_candidates=5)
    labels = review.panel_labels(fig)
    # img1: probe + 4 candidates (1 below); img2: probe + 1 below; img3: probe + "no candidate"
    assert labels.count("probe") == 3
    assert labels.count("candidate") == 3
    assert labels.count("candidate-below-threshold") == 2
    assert labels.count("no-candidate") == 1
    below = [ax for ax in fig.axes if ax.get_label() == "candidate-below-threshold"]
    for ax in below:
        assert "below threshold" in ax.get_title()
        assert ax.spines["left"].get_edgecolor()[:3] == pytest.approx((0x9e / 255,) * 3)
        assert len(ax.images) == 1                                    # the face is shown, faded
    for ax in fig.axes:
        if ax.get_label() == "candidate":
            assert "below threshold" not in ax.get_title() and "sim " in ax.get_title()
            assert "est. FMR" in ax.get_title() and ax.get_title().startswith("#")
            assert len(ax.images) == 1
    texts = " ".join(t.get_text() for t in fig.texts)
    assert "not an identification" in texts and "0.487" in texts
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png")
    assert Image.open(buffer).size[0] > 500


def test_grid_limits_and_explicit_threshold(results_dir):
    results = review.read_results(results_dir, exclude_self=True)
    fig = review.render_review_grid(results, base_dir=str(SAMPLE_DIR.parent), max_probes=1, max_candidates=2,
                                    threshold=0.9)
    assert review.panel_labels(fig) == ["probe", "candidate-below-threshold", "candidate-below-threshold"]
    assert "0.900" in " ".join(t.get_text() for t in fig.texts)


def test_grid_shows_unreadable_photo_in_its_panel(results_dir):
    results = review.read_results(results_dir, probe="img2")
    fig = review.render_review_grid(results, base_dir=str(SAMPLE_DIR))   # wrong base: faces/faces/...
    assert review.panel_labels(fig) == ["probe", "candidate-below-threshold"]
    assert all("FileNotFoundError" in " ".join(t.get_text() for t in ax.texts) for ax in fig.axes)


def test_grid_takes_uris_from_a_faces_table(results_dir):
    results = review.read_results(results_dir, probe="img2").drop(columns=["probe_uri", "gallery_uri"])
    faces = pa.table({"image_id": ["img2", "img6"], "face_index": [0, 0],
                      "uri": [str(SAMPLE_DIR / "img2.jpg"), str(SAMPLE_DIR / "img6.jpg")]})
    fig = review.render_review_grid(results, probe_faces=faces, gallery_faces=faces)
    assert all(len(ax.images) == 1 for ax in fig.axes)
    with pytest.raises(ConfigError, match="read_results"):
        review.render_review_grid(results.drop(columns=["similarity"]))


def test_paths_from_env():
    paths = review.paths_from_env({"FACELAKE_DEMO_OUT": "/data/out", "FACELAKE_RESULTS": "s3://b/results"})
    assert paths["root"] == "/data/out/root" and paths["archive"] == "/data/out/archive"
    assert paths["results"] == "s3://b/results" and paths["report"] == "/data/out/eval"
    assert paths["photos"].endswith("samples")
    with pytest.raises(ConfigError, match="unsupported"):
        review.paths_from_env({"FACELAKE_ROOT": "ftp://x"})
