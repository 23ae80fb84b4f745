"""Face quality on the bundled real photos: same people score closer than different people.

Measured when written (sface-yunet, 61 labeled photos, 13 identities, largest face per photo):
every identity's mean same-identity similarity sits above the 99th percentile of
different-identity similarities, and the best single threshold verifies all 1,830 pairs
correctly (100%). deepface's own crop (DeepFace.represent) separates them clearly worse.
"""

from __future__ import annotations

import numpy as np
import pytest

from facelake.faces.imaging import decode_bgr
from tests.helpers import SAMPLE_DIR, sample_identities


def _pairs(vectors: np.ndarray, labels: np.ndarray):
    sims = vectors @ vectors.T
    iu = np.triu_indices(len(labels), 1)
    same = (labels[:, None] == labels[None, :])[iu]
    return sims, sims[iu], same


def _best_accuracy(scores: np.ndarray, same: np.ndarray) -> float:
    return max(((scores >= t) == same).mean() for t in np.unique(scores))


@pytest.fixture(scope="module")
def sample_embeddings(face_engine):
    ids = sample_identities()
    vectors, labels = [], []
    for name, identity in sorted(ids.items()):
        image = decode_bgr((SAMPLE_DIR / name).read_bytes())
        faces = face_engine.detect(image)
        assert faces, f"no face found in {name}"
        vectors.append(face_engine.embed([face_engine.align(image, faces[0].landmarks)])[0])
        labels.append(identity)
    return np.asarray(vectors), np.asarray(labels)


def test_same_identity_scores_above_impostors(sample_embeddings):
    vectors, labels = sample_embeddings
    assert np.allclose(np.linalg.norm(vectors, axis=1), 1.0, atol=1e-5)
    sims, scores, same = _pairs(vectors, labels)
    p99 = np.percentile(scores[~same], 99)
    above = 0
    for identity in np.unique(labels):
        mask = labels == identity
        block = sims[np.ix_(mask, mask)][np.triu_indices(mask.sum(), 1)]
        above += block.mean() > p99
    assert above >= 12, f"only {above}/13 identities above the impostor 99th percentile"
    assert scores[same].mean() - scores[~same].mean() > 0.4
    assert _best_accuracy(scores, same) >= 0.99


def test_template_alignment_beats_deepface_crop(sample_embeddings, provisioned_weights):
    """Aligning to SFace's template is what makes SFace accurate: compare with deepface's crop."""
    from deepface import DeepFace

    vectors, labels = sample_embeddings
    ids = sample_identities()
    plain = []
    for name in sorted(ids):
        result = DeepFace.represent(img_path=str(SAMPLE_DIR / name), model_name="SFace",
                                    detector_backend="yunet", enforce_detection=False)
        largest = max(result, key=lambda r: r["facial_area"]["w"] * r["facial_area"]["h"])
        vector = np.asarray(largest["embedding"], np.float32)
        plain.append(vector / np.linalg.norm(vector))
    _, ours, same = _pairs(vectors, labels)
    _, theirs, _ = _pairs(np.asarray(plain), labels)
    margin_ours = ours[same].mean() - ours[~same].mean()
    margin_theirs = theirs[same].mean() - theirs[~same].mean()
    assert margin_ours > margin_theirs
    assert _best_accuracy(ours, same) >= _best_accuracy(theirs, same)
