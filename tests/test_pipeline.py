"""The one per-image face pipeline (facelake/faces/pipeline.py), on the bundled photos.

- its embeddings are bit-identical to the model's parts composed one face at a time (detect,
  floor, align, embed a single face): neither batching nor its preparing threads change a bit
  (the shipped calibrations depend on that);
- each image ends in one outcome: faces, dropped faces with the reason, or one error with the
  stage, type and message the errors table records;
- everything model-specific comes from the ModelSpec: an unknown detector or preprocessing is an
  error naming the registered adapters.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

from facelake.errors import ConfigError
from facelake.faces.models import FaceEngine, QualityFloor
from facelake.faces.imaging import decode_bgr
from facelake.faces.pipeline import FacePipeline
from facelake.faces.registry import get_model
from facelake.schema import NO_FACE, STAGE_DECODE, STAGE_DETECT, STAGE_FETCH, STAGE_VALIDATE
from tests.helpers import SAMPLE_DIR, faceless_jpeg

PHOTOS = sorted(SAMPLE_DIR.glob("img*.jpg"))[:24] + [SAMPLE_DIR / "couple.jpg"]


def _one_face_at_a_time(engine: FaceEngine, path) -> list[tuple[tuple, np.ndarray]]:
    """The reference: the parts composed by hand, one recognizer call per face."""
    image = decode_bgr(path.read_bytes())
    floor = QualityFloor()
    return [(det.bbox, engine.embed([engine.align(image, det.landmarks)], batch_size=1)[0])
            for det in engine.detect(image) if floor.reason(det) is None]


@pytest.mark.parametrize("threads, processes", [(1, False), (2, False), (2, True)])
def test_embeddings_are_bit_identical_to_one_face_at_a_time(face_engine, threads, processes):
    rows = [{"image_id": p.stem, "uri": str(p)} for p in PHOTOS]
    with FacePipeline(face_engine, threads=threads, batch_size=4, processes=processes) as pipeline:
        outcomes = list(pipeline.run(rows))
    assert [o.row["image_id"] for o in outcomes] == [p.stem for p in PHOTOS]  # input order
    faces = 0
    for outcome, path in zip(outcomes, PHOTOS):
        expected = _one_face_at_a_time(face_engine, path)
        assert outcome.error is None and len(outcome.faces) == len(expected)
        for face_index, (face, (bbox, vector)) in enumerate(zip(outcome.faces, expected)):
            assert face.face_index == face_index and face.bbox == bbox
            assert face.embedding.dtype == np.float32 and np.array_equal(face.embedding, vector)
            faces += 1
        assert outcome.content_sha256 and outcome.image_size == decode_bgr(path.read_bytes()).shape[:2]
    assert faces > len(PHOTOS)  # the couple: two faces in one image


def test_each_image_ends_in_faces_dropped_or_one_error(face_engine, tmp_path):
    faceless = tmp_path / "faceless.jpg"
    faceless.write_bytes(faceless_jpeg())
    (tmp_path / "notes.jpg").write_text("not a photo")
    rows = [{"image_id": "couple", "uri": "couple.jpg", "extra": 7},
            {"image_id": "gone", "uri": str(tmp_path / "gone.jpg")},
            {"image_id": "faceless", "uri": str(faceless)},
            {"image_id": "notes", "uri": str(tmp_path / "notes.jpg")},
            {"image_id": "outside", "uri": "/etc/hostname"}]
    from facelake.faces.reader import ReadLimits

    limits = ReadLimits(allowed_roots=(str(SAMPLE_DIR), str(tmp_path)))
    # the couple's faces are 620 and 577 px wide: a 600 px floor drops the second one only
    strict = FacePipeline(face_engine, floor=QualityFloor(min_face=600), limits=limits, base_dir=str(SAMPLE_DIR))
    couple, gone, faceless_, notes, outside = strict.run(rows)
    assert couple.row["extra"] == 7 and couple.error is None
    assert [d.reason for d in couple.dropped] == ["face 577x797 px is smaller than --min-face 600"]
    assert len(couple.faces) == 1 and couple.faces[0].embedding.shape == (128,)
    # no face above the floor: one quality error, and its dropped faces go with it (as the job records it)
    (none,) = FacePipeline(face_engine, floor=QualityFloor(min_face=700), base_dir=str(SAMPLE_DIR)).run(rows[:1])
    assert (none.error.stage, none.error.error_type) == ("quality", "NoUsableFace") and not none.dropped
    assert (gone.error.stage, gone.error.error_type) == (STAGE_FETCH, "FileNotFoundError")
    assert gone.error.message.startswith("cannot read ") and gone.content_sha256 is None
    assert (faceless_.error.stage, faceless_.error.error_type) == (STAGE_DETECT, NO_FACE)
    assert faceless_.content_sha256 and not faceless_.faces
    assert notes.error.stage == STAGE_DECODE and notes.content_sha256
    assert outside.error.stage == STAGE_VALIDATE and outside.content_sha256 is None


def test_a_recognizer_failure_turns_each_image_with_faces_into_one_embed_error(face_engine):
    class Broken:
        spec = face_engine.spec
        detect, align = face_engine.detect, face_engine.align

        def embed(self, crops, batch_size):
            raise RuntimeError("recognizer down")

    rows = [{"image_id": p.stem, "uri": str(p)} for p in PHOTOS[:3]]
    outcomes = list(FacePipeline(Broken()).run(rows))
    assert all(o.error is not None and (o.error.stage, o.error.error_type, o.error.message)
               == ("embed", "RuntimeError", "recognizer down") and not o.faces and o.content_sha256 for o in outcomes)


def test_the_model_spec_names_its_adapters(provisioned_weights):
    spec = get_model()
    with pytest.raises(ConfigError, match="detector 'scrfd'.*yunet"):
        FaceEngine(dataclasses.replace(spec, detector="scrfd"), recognizer=False)
    with pytest.raises(ConfigError, match="preprocessing 'bgr-hwc'.*rgb-chw-0-255"):
        FaceEngine(dataclasses.replace(spec, preprocess="bgr-hwc"))
    # alignment comes from the spec: another template moves the crop
    engine = FaceEngine(recognizer=False, threads=1)
    shifted = FaceEngine(dataclasses.replace(spec, template=tuple((x + 4, y) for x, y in spec.template)),
                         recognizer=False, threads=1)
    image = decode_bgr(PHOTOS[0].read_bytes())
    landmarks = engine.detect(image)[0].landmarks
    assert not np.array_equal(engine.align(image, landmarks), shifted.align(image, landmarks))
