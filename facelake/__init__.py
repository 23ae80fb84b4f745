"""facelake: distributed batch face search over large image archives.

Core modules shared by ``facelake.jobs``, ``facelake.index`` and ``facelake.cluster``:

- ``config``: typed options and defaults, validated before any work starts.
- ``storage``: local / file:// / s3:// paths through fsspec, atomic writes.
- ``schema``: the one definition of every table (manifest, faces, errors, results).
- ``registry``: the supported (recognizer, detector) pairs and their weight files.
- ``weights``: offline provisioning of those weights into deepface's folder, sha256-checked.
- ``imaging``: safe image decoding (pixel limit, EXIF orientation, grey, alpha).
- ``faces``: detect, align and embed faces in batches with deepface's models.
- ``calibration``: similarity -> measured false-match rate, and thresholds by target.
"""

import os

# deepface switches to torch/tensorflow when either is importable; facelake runs on onnxruntime.
os.environ.setdefault("DEEPFACE_BACKEND_ENGINE", "onnx")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

__version__ = "0.1.0"
