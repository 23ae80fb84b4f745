"""bench/eval_flip_variants: what each way of adding the mirror gains on LFW's 6,000 pairs.

    python bench/eval_flip_variants.py [--lfw DIR] [--out bench/results/eval-lfw-flip-variants.json]

Embeds the photos of pairs.txt once (the face nearest the centre, as bench/eval.py's headline),
with one detection per photo, and scores the 10-fold protocol (facelake.evaluation.protocols.pairs_protocol)
for embeddings built from the same detections:

    plain          the aligned face (sface-yunet)
    flip-crop      mean of the aligned face and its left-right mirror (sface-yunet-flip, registered)
    flip-realign   mean of the aligned face and the mirrored photo aligned anew on mirrored landmarks
                   (the template is not exactly symmetric: mirroring the crop shifts it by ~1 px)
    flip-crop-raw  like flip-crop, but the raw (unnormalised) outputs averaged

Exploration only: the registered variant is measured, and its calibration shipped, by
bench/eval.py --model sface-yunet-flip. Pure CPU; results do not depend on load.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import cv2
import numpy as np

REPO = Path(__file__).resolve().parents[1]
DEFAULT_LFW = REPO.parent / "shared" / "faces" / "lfw_deepfunneled"
# YuNet's landmarks: right eye, left eye, nose tip, right and left mouth corner; a mirror swaps sides.
MIRROR_ORDER = [1, 0, 2, 4, 3]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--lfw", type=Path, default=DEFAULT_LFW)
    parser.add_argument("--out", type=Path, default=REPO / "bench" / "results" / "eval-lfw-flip-variants.json")
    args = parser.parse_args()

    from facelake.faces.models import FaceEngine, QualityFloor, _l2, default_threads
    from facelake.faces.imaging import decode_bgr
    from facelake.evaluation.embeddings import LabeledEmbeddings
    from facelake.evaluation.protocols import pairs_protocol, read_pairs

    pairs, fold_of, folds = read_pairs(str(args.lfw / "pairs.txt"))
    keys = sorted({k for a, b, _ in pairs for k in (a, b)})
    engine = FaceEngine("sface-yunet", threads=default_threads())
    floor = QualityFloor()
    rows, crops, mirrored = [], [], []
    started = time.monotonic()
    for i, key in enumerate(keys):
        image = decode_bgr((args.lfw / "lfw-deepfunneled" / key.rsplit("_", 1)[0] / f"{key}.jpg").read_bytes())
        usable = [d for d in engine.detect(image) if floor.reason(d) is None]
        if not usable:
            continue
        cy, cx = image.shape[0] / 2, image.shape[1] / 2
        det = min(usable, key=lambda d: (d.bbox[0] + d.bbox[2] / 2 - cx) ** 2 + (d.bbox[1] + d.bbox[3] / 2 - cy) ** 2)
        marks = det.landmarks.copy()
        marks[:, 0] = image.shape[1] - 1 - marks[:, 0]
        rows.append(i)
        crops.append(engine.align(image, det.landmarks))
        mirrored.append(engine.align(cv2.flip(image, 1), marks[MIRROR_ORDER]))
        if (i + 1) % 1000 == 0:
            print(f"aligned {i + 1}/{len(keys)} photos in {time.monotonic() - started:.0f} s", file=sys.stderr)
    crops, mirrored = np.asarray(crops), np.asarray(mirrored)
    embedder = engine._embedder

    def raw(faces: np.ndarray) -> np.ndarray:
        blob = np.ascontiguousarray(faces[..., ::-1].transpose(0, 3, 1, 2), dtype=np.float32)
        return np.concatenate([embedder._recognizer.run(blob[j:j + 64]) for j in range(0, len(blob), 64)])

    plain_raw, crop_raw, realign_raw = raw(crops), raw(crops[:, :, ::-1]), raw(mirrored)
    plain, crop, realign = _l2(plain_raw), _l2(crop_raw), _l2(realign_raw)
    variants = {"plain": plain, "flip-crop": _l2(plain + crop), "flip-realign": _l2(plain + realign),
                "flip-crop-raw": _l2(plain_raw + crop_raw)}
    position = {k: j for j, k in enumerate(keys)}
    result = {"command": "python bench/eval_flip_variants.py " + " ".join(sys.argv[1:]), "photos": len(keys),
              "photos_without_usable_face": len(keys) - len(rows), "face": "central", "runtime": engine.runtime,
              "protocol": "LFW pairs.txt View 2, 10 folds, threshold chosen on the other 9 (facelake.evaluation.protocols.pairs_protocol)",
              "seconds": None, "variants": {}}
    for name, vectors in variants.items():
        full = np.full((len(keys), vectors.shape[1]), np.nan, np.float32)
        full[rows] = vectors
        emb = LabeledEmbeddings(image_ids=keys, identities=np.array([k.rsplit("_", 1)[0] for k in keys], object),
                                embeddings=full)
        p = pairs_protocol(emb, pairs, fold_of, folds, position)
        errors = int(round((1 - p["accuracy"]) * len(pairs)))
        result["variants"][name] = {"accuracy": p["accuracy"], "accuracy_std": p["accuracy_std"],
                                    "errors_of_6000": errors, "pairs_with_failed_photo": p["pairs_with_failed_photo"]}
        print(f"{name:14s} {100 * p['accuracy']:.2f}% +- {100 * p['accuracy_std']:.2f} ({errors} errors)", file=sys.stderr)
    result["seconds"] = round(time.monotonic() - started, 1)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
