"""facelake: distributed batch face search over large image archives.

Data flows one way: manifest -> faces table -> index version -> results. This package is the
core every layer above it uses (``facelake.index``, then ``facelake.cluster``, then
``facelake.jobs``); it imports nothing above it (tests/test_layers.py checks every import).

- ``faces/``: the per-photo face pipeline: manifests, the one photo reader, decoding, models,
  weights, runtimes.
- ``record/``: the root of record: table versions, erasure list, lock, audit log.
- ``evaluation/``: measured error rates on labeled photos: verification, pairs-file protocol,
  identification, per-group rates, the report (tests/test_evaluate.py).
- ``calibration/``: similarity -> measured false-match rate, thresholds by target, a search's
  threshold policy (tests/test_calibration.py).
- ``results``: a search's result rows built from one batch of search hits (tests/test_search.py).
- ``review/``: reading outputs in notebooks, face crops and review grids; it sits above
  ``facelake.index`` (tests/test_review.py).
- ``storage``: local / file:// / s3:// paths through fsspec, atomic writes, the Parquet writer
  (tests/test_hardening_secrets.py, test_embed_parts.py).
- ``schema``: the one definition of every table and record format.
- ``errors``, ``faults``, ``progress``, ``device``: user-facing errors, named fault points for
  tests, the progress line and the quiet-by-default policy for Ray's and OpenCV's logs, the
  GPU/CPU policy.
"""

import os

# deepface switches to torch/tensorflow when either is importable; facelake runs on onnxruntime.
os.environ.setdefault("DEEPFACE_BACKEND_ENGINE", "onnx")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

__version__ = "0.1.0"
