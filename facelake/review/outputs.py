"""Where a notebook's inputs are, and reading a root (versions, audit), search results and an
evaluation report. Tables come back as pandas DataFrames (pandas is in the ``notebooks`` and
``test`` extras). Tested in tests/test_review.py and tests/test_notebooks.py.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterable

import numpy as np
import pyarrow.compute as pc
import pyarrow.dataset as ds

import facelake
from facelake import samples, storage
from facelake.calibration import Calibration
from facelake.errors import ConfigError
from facelake.index import layout
from facelake.record import audit
from facelake.schema import RESULT_METADATA_KEY
from facelake.storage import StorageOptions

if TYPE_CHECKING:  # pandas is an optional extra, imported when used
    import pandas as pd

REPO = Path(facelake.__file__).resolve().parents[1]
# Environment variables the notebooks read; defaults point at `facelake demo --out demo-out`.
DEMO_OUT_ENV = "FACELAKE_DEMO_OUT"
PATH_ENVS = {"root": "FACELAKE_ROOT", "results": "FACELAKE_RESULTS", "archive": "FACELAKE_ARCHIVE",
             "photos": "FACELAKE_PHOTOS", "report": "FACELAKE_EVAL_REPORT"}
DEFAULT_DEMO_OUT = REPO / "demo-out"
# The demo's manifest (facelake.samples.MANIFEST) holds uris relative to its own folder.
DEMO_PHOTOS = samples.FOLDER
SEARCH_METADATA_KEY = RESULT_METADATA_KEY   # the results' metadata, as facelake search writes it
REPORT_PLOTS = ("roc.png", "det.png", "scores.png")


def require_pandas():
    """The pandas module, or an error that says which extra to install."""
    try:
        import pandas
    except ImportError as err:  # pragma: no cover - the extra is installed in tests
        raise ImportError("facelake.review returns pandas DataFrames: install the notebooks extra "
                          "(`pip install -e '.[notebooks]'`)") from err
    return pandas


def parquet_files(uri: str, options: StorageOptions | None) -> list[str]:
    return storage.list_files(uri, ".parquet", options)


def paths_from_env(environ: dict[str, str] | None = None) -> dict[str, str]:
    """Where the notebooks read from: root, results, archive, photos (base of relative uris), report.

    Each comes from its own variable (FACELAKE_ROOT, FACELAKE_RESULTS, FACELAKE_ARCHIVE,
    FACELAKE_PHOTOS, FACELAKE_EVAL_REPORT) or else from FACELAKE_DEMO_OUT (default: the checkout's
    demo-out/): OUT/root, OUT/results, OUT/archive, OUT/eval; photos default to samples/, the
    folder of the demo's manifest.
    """
    env = os.environ if environ is None else environ
    out = env.get(DEMO_OUT_ENV) or str(DEFAULT_DEMO_OUT)
    defaults = {"root": storage.join(out, "root"), "results": storage.join(out, "results"),
                "archive": storage.join(out, "archive"), "photos": str(DEMO_PHOTOS),
                "report": storage.join(out, "eval")}
    paths = {name: env.get(var) or defaults[name] for name, var in PATH_ENVS.items()}
    for uri in paths.values():
        storage.check_uri(uri)
    return paths


# ------------------------------------------------------------------------------ root: versions, audit

@dataclass(frozen=True)
class Root:
    """A facelake root (ROOT/index/..., ROOT/audit/...), read-only."""

    uri: str
    options: StorageOptions | None = None

    def __post_init__(self) -> None:
        storage.check_uri(self.uri)

    def live_version(self) -> str | None:
        """The version ROOT/index/CURRENT names, or None when nothing was published."""
        return layout.current_version(self.uri, self.options)

    def manifest(self, version: str | None = None) -> dict:
        """The manifest.json of a version (the live one by default)."""
        version = version or self.live_version()
        if version is None:
            raise ConfigError(f"no index is published under {storage.redact(self.uri)}: build one with "
                              f"`facelake index FACES --root {storage.redact(self.uri)}`")
        return layout.read_manifest(self.uri, version, self.options)

    def versions(self) -> "pd.DataFrame":
        """One row per complete index version, oldest first: counts, sizes, parameters, live flag."""
        live = self.live_version()
        rows = []
        for version in layout.list_versions(self.uri, self.options):
            m = layout.read_manifest(self.uri, version, self.options)
            rows.append({
                "version": version, "live": version == live, "faces": int(m.get("total", 0)),
                "shards": len(m.get("shards", [])), "model": m.get("model"), "dim": m.get("dim"),
                "factory": m.get("factory"), "nlist": m.get("nlist"), "nprobe": m.get("nprobe"),
                "bytes": sum(int(f.get("bytes", 0)) for f in m.get("files", {}).values()),
                "created_at": m.get("created_at"), "source": m.get("source"),
            })
        columns = ["version", "live", "faces", "shards", "model", "dim", "factory", "nlist", "nprobe",
                   "bytes", "created_at", "source"]
        return require_pandas().DataFrame(rows, columns=columns)

    def audit_records(self, kind: str | None = None) -> list[dict[str, Any]]:
        """The audit records as stored (dicts), oldest first."""
        return audit.list_records(self.uri, kind, self.options)

    def audit(self, kind: str | None = None) -> "pd.DataFrame":
        """The audit log as a table, oldest first; nested fields flattened (counts.result_rows, ...)."""
        pd = require_pandas()
        records = self.audit_records(kind)
        if not records:
            return pd.DataFrame(columns=["job_id", "kind", "status", "user", "started_at", "purpose"])
        table = pd.json_normalize(records)
        first = [c for c in ("job_id", "kind", "status", "user", "host", "started_at", "ended_at", "purpose",
                             "mode", "index_version", "threshold") if c in table.columns]
        return table[first + [c for c in table.columns if c not in first]]


# ------------------------------------------------------------------------------ results

def search_metadata(results_dir: str, options: StorageOptions | None = None) -> dict:
    """The search job's metadata stored in its results files (threshold, mode, index version, ...)."""
    files = parquet_files(_results_folder(results_dir, options), options)
    if not files:
        return {}
    with storage.open_parquet(files[0], options) as parquet:
        meta = parquet.schema_arrow.metadata or {}
    return json.loads(meta[SEARCH_METADATA_KEY]) if SEARCH_METADATA_KEY in meta else {}


def _results_folder(uri: str, options: StorageOptions | None) -> str:
    """RESULTS/results when given the search's RESULTS folder; the folder itself otherwise."""
    inner = storage.join(uri, "results")
    return inner if parquet_files(inner, options) else uri


def read_results(results_dir: str, *, probe: str | Iterable[str] | None = None,
                 min_similarity: float | None = None, max_fmr: float | None = None,
                 above_threshold: bool | None = None, max_rank: int | None = None,
                 exclude_self: bool = False, columns: list[str] | None = None,
                 as_pandas: bool = True, options: StorageOptions | None = None):
    """Read a search's results (RESULTS or RESULTS/results), filtered while reading.

    probe: one probe image id or several; min_similarity / max_fmr: keep candidates with
    similarity >= / estimated false-match rate <= the value; above_threshold: True keeps only
    candidates at or above the job's threshold, False only those below; max_rank: top ranks only;
    exclude_self: drop a candidate that is the probe face itself (probes taken from the gallery).
    Filters on candidates drop probe faces' "no candidate" rows (rank null). Returns a DataFrame
    sorted by probe and rank, with the job's metadata in ``.attrs["search"]`` (or a pyarrow Table
    with ``as_pandas=False``).
    """
    folder = _results_folder(results_dir, options)
    files = parquet_files(folder, options)
    if not files:
        raise FileNotFoundError(f"no results at {storage.redact(results_dir)}: run `facelake search ... --out "
                                f"{storage.redact(results_dir)}` (or `facelake demo`) first")
    expr = _results_filter(probe, min_similarity, max_fmr, above_threshold, max_rank)
    fs, _ = storage.arrow_filesystem(folder, options)
    dataset = ds.dataset([storage.filesystem(f, options)[1] for f in files], filesystem=fs, format="parquet")
    table = dataset.to_table(filter=expr)
    if exclude_self and table.num_rows:
        same = pc.and_(pc.equal(table["probe_image_id"], table["gallery_image_id"]),
                       pc.equal(table["probe_face_index"], table["gallery_face_index"]))
        table = table.filter(pc.invert(pc.fill_null(same, False)))
    table = table.sort_by([("probe_image_id", "ascending"), ("probe_face_index", "ascending"),
                           ("rank", "ascending")])
    if columns is not None:
        table = table.select(columns)
    meta = search_metadata(folder, options)
    if not as_pandas:
        return table.replace_schema_metadata({SEARCH_METADATA_KEY: json.dumps(meta).encode()})
    frame = table.to_pandas()
    frame.attrs["search"] = meta
    return frame


def _results_filter(probe: str | Iterable[str] | None, min_similarity: float | None, max_fmr: float | None,
                    above_threshold: bool | None, max_rank: int | None) -> ds.Expression | None:
    """The dataset filter of ``read_results``' options (None: every row), checked first."""
    for name, value in (("min_similarity", min_similarity), ("max_fmr", max_fmr)):
        if value is not None and not np.isfinite(value):
            raise ConfigError(f"{name} must be a number, got {value!r}")
    if max_rank is not None and max_rank < 1:
        raise ConfigError(f"max_rank must be at least 1, got {max_rank}")
    terms = []
    if probe is not None:
        terms.append(ds.field("probe_image_id").isin([probe] if isinstance(probe, str) else list(probe)))
    if min_similarity is not None:
        terms.append(ds.field("similarity") >= float(min_similarity))
    if max_fmr is not None:
        terms.append(ds.field("est_false_match_rate") <= float(max_fmr))
    if above_threshold is not None:
        terms.append(ds.field("above_threshold") == bool(above_threshold))
    if max_rank is not None:
        terms.append(ds.field("rank") <= int(max_rank))
    expr = None
    for term in terms:
        expr = term if expr is None else expr & term
    return expr


# ------------------------------------------------------------------------------ evaluation report

def read_report(report_dir: str, options: StorageOptions | None = None) -> dict[str, Any]:
    """An evaluation report folder (`facelake evaluate --out`): metrics, calibration, markdown, plot paths."""
    metrics_uri = storage.join(report_dir, "metrics.json")
    if not storage.exists(metrics_uri, options):
        raise FileNotFoundError(f"no evaluation report at {storage.redact(report_dir)}: run `facelake evaluate "
                                f"samples/manifest.parquet --out {storage.redact(report_dir)}` first")
    cal_uri = storage.join(report_dir, "calibration.json")
    calibration = (Calibration.from_dict(json.loads(storage.read_bytes(cal_uri, options)), source=cal_uri)
                   if storage.exists(cal_uri, options) else None)
    plots = {name: storage.join(report_dir, name) for name in REPORT_PLOTS
             if storage.exists(storage.join(report_dir, name), options)}
    return {"metrics": json.loads(storage.read_bytes(metrics_uri, options)), "calibration": calibration,
            "markdown": storage.read_bytes(storage.join(report_dir, "report.md"), options).decode(),
            "plots": plots}
