"""Measured error rates of a face model on labeled photos (the core of `facelake evaluate`).

- ``embeddings``: the labeled manifest (an ``identity`` column), ``LabeledEmbeddings``, one face
  per photo embedded in this process through the face pipeline.
- ``metrics``: genuine and impostor scores, ROC, TAR at FAR, empirical thresholds.
- ``protocols``: the LFW-format pairs file and its k-fold accuracy, 1:N identification on a
  seeded gallery split, error rates per group.
- ``measure``: ``evaluate_embeddings``, every metric and the calibration of one evaluation.
- ``report``: report.md, metrics.json, calibration.json and the ROC / DET / score plots.

Everything but the local embedding is numpy on embeddings already made; the command
(facelake.jobs.evaluate) adds the embed job on Ray. Tested in tests/test_evaluate.py (and, with
the flip model, tests/test_model_flip.py); the LFW run is bench/eval.py.
"""
