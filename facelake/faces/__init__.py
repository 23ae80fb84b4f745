"""The per-photo face pipeline: a manifest row in, its faces (or one error row) out.

- ``manifest``: manifest validation (streamed), fingerprint, the folder relative uris start from
  (tests/test_hardening_input.py, test_packaging.py).
- ``reader``: the one door every photo read goes through: allowed roots, regular files, size,
  time (tests/test_reader.py).
- ``imaging``: safe decoding: pixel limit, EXIF orientation, grey, alpha, 16-bit, frames
  (tests/test_imaging_formats.py).
- ``registry``: the supported (recognizer, detector) pairs and their weight files
  (tests/test_weights.py).
- ``weights``: offline provisioning of those weights, sha256-checked (tests/test_weights.py).
- ``onnx_rewrite``: shipped ONNX graphs rewritten into the form the runtimes load.
- ``models``: the model's parts: detector adapter, alignment, recognizer (tests/test_faces.py).
- ``inference``: recognizer runtimes, OpenVINO / onnxruntime / CUDA (tests/test_inference.py).
- ``pipeline``: the one per-image pipeline every job runs (tests/test_pipeline.py).
"""
