"""sface-yunet-flip: the default's weights with test-time flip, a model of its own.

Real faces (the bundled sample, a small LFW subset from /work/shared/faces), real SFace, a real
small Ray for the embed job. Checked: the flip embedding is the normalised mean of the face's and
its mirror's plain embeddings (computed here independently) and differs from the plain one; the
embed job writes it under its own model name; calibrations of one model are refused for the
other; `facelake evaluate` runs with it on LFW pairs.
"""

from __future__ import annotations

import os

import cv2
import numpy as np
import pyarrow as pa
import pytest

from facelake.faces import manifest as manifest_mod
from facelake import storage
from facelake.calibration import Calibration, CalibrationError, load_default
from facelake.faces.imaging import decode_bgr
from facelake.faces.registry import get_model, weights_fingerprint
from tests.helpers import SHARED_FACES
from tests.helpers import SAMPLE_DIR, sample_identities, sample_manifest

FLIP, PLAIN = "sface-yunet-flip", "sface-yunet"
LFW = SHARED_FACES / "lfw_deepfunneled"


@pytest.fixture(scope="module")
def flip_engine(provisioned_weights):
    from facelake.faces.models import FaceEngine

    return FaceEngine(FLIP)


@pytest.fixture(scope="module")
def aligned_sample(face_engine):
    """Largest face of every labeled sample photo, aligned (by the plain engine: same detector)."""
    faces, labels = [], []
    for name, identity in sorted(sample_identities().items()):
        image = decode_bgr((SAMPLE_DIR / name).read_bytes())
        found = face_engine.detect(image)
        assert found, f"no face found in {name}"
        faces.append(face_engine.align(image, found[0].landmarks))
        labels.append(identity)
    return np.asarray(faces), np.asarray(labels)


def test_registered_as_its_own_model_with_the_same_weights():
    plain, flip = get_model(PLAIN), get_model(FLIP)
    assert flip.flip and not plain.flip
    assert (flip.recognizer_calls_per_face, plain.recognizer_calls_per_face) == (2, 1)
    assert flip.weights == plain.weights and weights_fingerprint(flip) == weights_fingerprint(plain)
    assert (flip.detector, flip.dim, flip.input_size) == (plain.detector, plain.dim, plain.input_size)
    assert flip.name != plain.name


def test_flip_embedding_is_mean_of_face_and_mirror(face_engine, flip_engine, aligned_sample):
    faces, labels = aligned_sample
    plain = face_engine.embed(faces)
    mirror = face_engine.embed(np.asarray([cv2.flip(f, 1) for f in faces]))  # left-right
    expected = plain + mirror
    expected /= np.linalg.norm(expected, axis=1, keepdims=True)
    flip = flip_engine.embed(faces, batch_size=16)  # batches must not matter
    assert np.allclose(np.linalg.norm(flip, axis=1), 1.0, atol=1e-5)
    assert np.abs(flip - expected).max() < 1e-5
    # a different embedding, of the same face
    cos = (flip * plain).sum(axis=1)
    assert cos.max() < 0.999 and cos.min() > 0.95, (cos.min(), cos.max())
    # and still separating the sample's people (as tests/test_faces.py asks of the plain model)
    sims = flip @ flip.T
    iu = np.triu_indices(len(labels), 1)
    same = (labels[:, None] == labels[None, :])[iu]
    scores = sims[iu]
    assert max(((scores >= t) == same).mean() for t in np.unique(scores)) >= 0.99
    assert scores[same].mean() - scores[~same].mean() > 0.4


def test_calibrations_refused_across_plain_and_flip():
    shipped_flip, shipped_plain = load_default(FLIP), load_default(PLAIN)
    assert (shipped_flip.model, shipped_plain.model) == (FLIP, PLAIN)
    assert shipped_flip.weights_sha256 == shipped_plain.weights_sha256  # same files: the name tells them apart
    with pytest.raises(CalibrationError, match=f"--model {PLAIN}"):
        shipped_flip.check_model(PLAIN)
    with pytest.raises(CalibrationError, match=f"--model {FLIP}"):
        shipped_plain.check_model(FLIP)
    # a calibration file written for one and read back for the other
    rng = np.random.default_rng(0)
    made = Calibration.from_scores(rng.normal(0.7, 0.1, 200), rng.normal(0.1, 0.1, 2000), model=FLIP, dataset="t")
    again = Calibration.from_dict(made.to_dict())
    again.check_model(FLIP)
    with pytest.raises(CalibrationError):
        again.check_model(PLAIN)


def test_embed_job_writes_flip_faces_under_their_own_model(tmp_path, flip_engine, ray_local):
    from facelake.jobs.embed import EmbedConfig, run_embed
    from facelake.errors import ConfigError

    names = ["img1.jpg", "img2.jpg", "img3.jpg", "img5.jpg"]
    uri = str(tmp_path / "manifest.parquet")
    manifest_mod.write(sample_manifest(names), uri)
    out = str(tmp_path / "out")
    summary = run_embed(EmbedConfig(manifest=uri, out=out, model=FLIP, workers=1, progress=False))
    assert summary.model == FLIP
    faces = storage.read_table(os.path.join(out, "faces"))
    assert set(faces["model"].to_pylist()) == {FLIP}
    first = {r["image_id"]: np.asarray(r["embedding"], np.float32)
             for r in faces.to_pylist() if r["face_index"] == 0}
    assert len(first) == len(names)
    for name in names:
        image = decode_bgr((SAMPLE_DIR / name).read_bytes())
        det = flip_engine.detect(image)[0]
        local = flip_engine.embed([flip_engine.align(image, det.landmarks)])[0]
        assert float(local @ first[name.rsplit(".", 1)[0]]) > 0.9999
    # plain faces never join flip faces in one table
    with pytest.raises(ConfigError, match=FLIP):
        run_embed(EmbedConfig(manifest=uri, out=out, model=PLAIN, workers=1, progress=False))


def _lfw_subset(folder, folds=2, per=10) -> tuple[str, str]:
    """A manifest of the photos in the first ``per`` same and different pairs of the first ``folds``
    folds of LFW's pairs.txt, and a pairs file of those pairs (LFW format)."""
    assert (LFW / "pairs.txt").exists(), (f"LFW is read from {LFW} (pairs.txt and lfw-deepfunneled/): put the "
                                          f"deep-funneled LFW there")
    lines = (LFW / "pairs.txt").read_text().split("\n")
    full_per = int(lines[0].split()[1])
    kept, photos = [f"{folds}\t{per}"], {}
    for k in range(folds):
        block = lines[1 + 2 * full_per * k: 1 + 2 * full_per * (k + 1)]
        for line in block[:per] + block[full_per:full_per + per]:
            kept.append(line)
            parts = line.split()
            people = [(parts[0], parts[1]), (parts[0], parts[2])] if len(parts) == 3 else [(parts[0], parts[1]),
                                                                                           (parts[2], parts[3])]
            for name, i in people:
                key = f"{name}_{int(i):04d}"
                photos[key] = (str(LFW / "lfw-deepfunneled" / name / f"{key}.jpg"), name)
    pairs = os.path.join(folder, "pairs.txt")
    with open(pairs, "w") as handle:
        handle.write("\n".join(kept) + "\n")
    keys = sorted(photos)
    uri = os.path.join(folder, "lfw-subset.parquet")
    manifest_mod.write(pa.table({"image_id": keys, "uri": [photos[k][0] for k in keys],
                                 "identity": [photos[k][1] for k in keys]}), uri)
    return uri, pairs


def test_evaluate_runs_with_flip_on_an_lfw_subset(tmp_path, provisioned_weights):
    from facelake.jobs.evaluate import EvaluateConfig, evaluate

    uri, pairs = _lfw_subset(str(tmp_path))
    out = str(tmp_path / "report")
    result = evaluate(EvaluateConfig(manifest=uri, out=out, model=FLIP, pairs=pairs, embedder="local",
                                     face="central"))
    assert result.metrics["model"] == FLIP
    protocol = result.metrics["pairs_protocol"]
    assert protocol["folds"] == 2 and protocol["pairs"] == 40
    assert protocol["accuracy"] >= 0.9, protocol
    written = Calibration.load(os.path.join(out, "calibration.json"))
    assert written.model == FLIP
    written.check_model(FLIP)
    with pytest.raises(CalibrationError):
        written.check_model(PLAIN)
