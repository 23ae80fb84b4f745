"""facelake: distributed batch face search over large image archives.

Core modules shared by ``facelake.jobs``, ``facelake.index`` and ``facelake.cluster`` (they import
nothing above them; tests/test_layers.py checks it). Each job's options are a typed config in the
job's own module (``facelake.jobs.embed.EmbedConfig``, ...), validated before any work starts.

- ``storage``: local / file:// / s3:// paths through fsspec, atomic and write-if-absent writes,
  the one Parquet writer and readers, names, times and hashes of stored objects.
- ``schema``: the one definition of every table and record format (faces, errors, results, id
  tables, erasure list, embed fingerprints, index manifest keys, audit records).
- ``manifest``: manifest validation (streamed), fingerprint, the folder relative uris start from.
- ``reader``: the one door for photo reads (allowed roots, regular files, size, timeout).
- ``registry``: the supported (recognizer, detector) pairs and their weight files.
- ``weights``: offline provisioning of those weights into deepface's folder, sha256-checked.
- ``imaging``: safe image decoding (pixel limit, EXIF orientation, grey, alpha, 16-bit, frames).
- ``faces`` / ``inference``: detect, align and embed faces in batches; recognizer runtimes.
- ``calibration``: similarity -> measured false-match rate, and thresholds by target.
- ``audit``, ``lock``, ``root``: the audit log, the root lock, the tables of record.
- ``faults``: named fault points, no-ops unless a test arms them.
- ``review``: reading outputs in notebooks; face crops and the review grid.
"""

import os

# deepface switches to torch/tensorflow when either is importable; facelake runs on onnxruntime.
os.environ.setdefault("DEEPFACE_BACKEND_ENGINE", "onnx")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

__version__ = "0.1.0"
