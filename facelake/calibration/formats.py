"""The JSON files of both calibration kinds: versioned, checked on reading, errors naming the fix.

``calibration_to_dict`` / ``calibration_fields`` write and read the labeled-set ``Calibration``
(`facelake evaluate`, the files shipped in facelake/data); ``gallery_to_dict`` / ``gallery_fields``
the live-gallery ``GalleryCalibration`` (`facelake calibrate`). The readers return the keyword
arguments of the class, so this module needs neither class. Tested in tests/test_calibration.py.
"""

from __future__ import annotations

import json

import numpy as np

from facelake import storage
from facelake.calibration.stats import CONFIDENCE, CalibrationError

SCHEMA_VERSION = 1
KIND = "facelake.calibration"
GALLERY_KIND = "facelake.gallery_calibration"
GALLERY_SCHEMA_VERSION = 1


def read_json(uri: str, options=None) -> dict:
    """A calibration file's JSON, with errors that name the file (redacted)."""
    try:
        return json.loads(storage.read_bytes(str(uri), options))
    except FileNotFoundError as err:
        raise CalibrationError(f"calibration file {storage.redact(str(uri))} does not exist") from err
    except json.JSONDecodeError as err:
        raise CalibrationError(f"{storage.redact(str(uri))} is not valid JSON: {err}") from err


def _num(x: float):
    return None if x is None or not np.isfinite(x) else float(x)


def calibration_to_dict(cal) -> dict:
    """A ``Calibration`` as its file: header, counts and one row per threshold."""
    rows = [{"threshold": float(t), "impostor_above": int(k), "fmr": _num(f), "fmr_upper95": _num(u),
             "genuine_below": int(g), "fnmr": _num(r)}
            for t, k, f, u, g, r in zip(cal.thresholds, cal.impostor_above, cal.fmr, cal.fmr_upper,
                                        cal.genuine_below, cal.fnmr)]
    return {
        "schema_version": SCHEMA_VERSION, "kind": KIND,
        "model": cal.model, "recognizer": cal.recognizer, "detector": cal.detector,
        "weights_sha256": cal.weights_sha256, "dataset": cal.dataset,
        "n_genuine": cal.n_genuine, "n_impostor": cal.n_impostor, "confidence": cal.confidence,
        "match_rule": "similarity >= threshold (cosine of L2-normalised embeddings)",
        "bound": "one-sided Wilson score upper bound; exact Clopper-Pearson when no impostor is above",
        "created": cal.created, "notes": cal.notes, "summary": cal.summary,
        "rows": rows,
    }


def calibration_fields(data: dict, source: str) -> dict:
    """The ``Calibration`` keyword arguments of a file's JSON; CalibrationError if it is not one."""
    version = data.get("schema_version")
    if data.get("kind") != KIND or version is None:
        raise CalibrationError(f"{source} is not a facelake calibration file (no kind/schema_version)")
    if version != SCHEMA_VERSION:
        raise CalibrationError(f"{source} has calibration schema_version {version}; this facelake reads "
                               f"{SCHEMA_VERSION}: re-run `facelake evaluate` to rebuild it")
    try:
        rows = data["rows"]
        return dict(model=data["model"], recognizer=data["recognizer"], detector=data["detector"],
                    weights_sha256=data["weights_sha256"], dataset=data["dataset"],
                    n_genuine=int(data["n_genuine"]), n_impostor=int(data["n_impostor"]),
                    thresholds=np.array([r["threshold"] for r in rows], np.float64),
                    impostor_above=np.array([r["impostor_above"] for r in rows], np.int64),
                    genuine_below=np.array([r["genuine_below"] for r in rows], np.int64),
                    confidence=float(data.get("confidence", CONFIDENCE)), notes=data.get("notes", ""),
                    created=data.get("created", ""), summary=data.get("summary", {}))
    except (KeyError, TypeError, ValueError) as err:
        raise CalibrationError(f"{source} is malformed ({type(err).__name__}: {err}): rebuild it with "
                               f"`facelake evaluate`") from err


def gallery_to_dict(cal, margin: float) -> dict:
    """A ``GalleryCalibration`` as its file: header, every search's score, and a readable table."""
    grid, counts, upper = cal.rows()
    rows = [{"threshold": float(t), "false_positive_searches": int(c), "fpir": c / max(1, cal.n_searches),
             "fpir_upper95": float(u)} for t, c, u in zip(grid, counts, upper)]
    return {
        "schema_version": GALLERY_SCHEMA_VERSION, "kind": GALLERY_KIND,
        "model": cal.model, "recognizer": cal.recognizer, "detector": cal.detector,
        "weights_sha256": cal.weights_sha256, "index_version": cal.index_version,
        "gallery_size": cal.gallery_size, "nprobe": cal.nprobe, "top_k": cal.top_k,
        "identity_column": cal.identity_column, "excluded_same_identity": cal.excluded_same_identity,
        "saturated": cal.saturated, "n_searches": cal.n_searches, "probes": cal.probes,
        "job_id": cal.job_id, "confidence": cal.confidence, "created": cal.created, "notes": cal.notes,
        "match_rule": "a search is a false positive at t when a non-mated candidate has similarity >= t",
        "bound": "one-sided exact Clopper-Pearson upper bound (rule of three at zero)",
        "gallery_margin": margin,
        "rows": rows,
        "scores": [float(s) for s in cal.scores],
    }


def gallery_fields(data: dict, source: str) -> dict:
    """The ``GalleryCalibration`` keyword arguments of a file's JSON; CalibrationError if it is not one."""
    if data.get("kind") != GALLERY_KIND:
        raise CalibrationError(f"{source} is not a live-gallery calibration (kind {data.get('kind')!r}): "
                               f"`facelake calibrate` writes them under ROOT/calibration/")
    if data.get("schema_version") != GALLERY_SCHEMA_VERSION:
        raise CalibrationError(f"{source} has schema_version {data.get('schema_version')}; this facelake "
                               f"reads {GALLERY_SCHEMA_VERSION}: re-run `facelake calibrate`")
    try:
        return dict(model=data["model"], recognizer=data["recognizer"], detector=data["detector"],
                    weights_sha256=data["weights_sha256"], index_version=data["index_version"],
                    gallery_size=int(data["gallery_size"]), nprobe=int(data["nprobe"]), top_k=int(data["top_k"]),
                    scores=np.sort(np.asarray(data["scores"], np.float64))[::-1],
                    identity_column=data.get("identity_column"),
                    excluded_same_identity=int(data.get("excluded_same_identity", 0)),
                    saturated=int(data.get("saturated", 0)), probes=data.get("probes", {}),
                    job_id=data.get("job_id", ""), confidence=float(data.get("confidence", CONFIDENCE)),
                    notes=list(data.get("notes", [])), created=data.get("created", ""), source=source)
    except (KeyError, TypeError, ValueError) as err:
        raise CalibrationError(f"{source} is malformed ({type(err).__name__}: {err}): re-run "
                               f"`facelake calibrate`") from err
