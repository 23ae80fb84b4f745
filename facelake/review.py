"""Reading facelake's outputs in a notebook: roots, results, audit, errors, and faces people can see.

    paths = review.paths_from_env()                 # demo-out/{root,results,archive}, eval report
    root = review.Root(paths["root"])
    root.versions(); root.live_version(); root.audit()
    results = review.read_results(paths["results"], max_fmr=1e-4, exclude_self=True)
    review.render_review_grid(results, base_dir=paths["photos"])   # a matplotlib Figure

Tables come back as pandas DataFrames (pandas is in the ``notebooks`` and ``test`` extras);
``read_results`` keeps the search job's metadata (threshold, how it was chosen, mode, index
version) in ``DataFrame.attrs["search"]``. Photos are read through ``facelake.faces.reader`` (the one
door: allowed roots, regular files, size and time limits; local, file:// or s3://) and decoded by
``facelake.faces.imaging.decode_bgr``, so a bbox, which is in the pixels of the EXIF-upright image,
crops the same face the embed job saw. Manifest uris may be relative to the manifest's folder:
pass that folder as ``base_dir`` (``facelake.faces.reader.resolve`` makes them absolute).

The review grid is a candidate list for a person to check, never an identification: every
panel shows similarity, the estimated false-match rate (95% upper bound from the calibration)
and rank; candidates below the threshold get a grey frame and say so. Tested in
tests/test_review.py; the notebooks in notebooks/ (tests/test_notebooks.py) call only this module.
"""

from __future__ import annotations

import json
import os
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterable

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
from PIL import Image

import facelake
from facelake import samples, storage
from facelake.record import audit
from facelake.faces import reader
from facelake.errors import ConfigError
from facelake.faces.imaging import DEFAULT_MAX_PIXELS, decode_bgr
from facelake.faces.reader import ReadLimits
from facelake.schema import RESULT_METADATA_KEY
from facelake.storage import StorageOptions

if TYPE_CHECKING:  # pandas and matplotlib are optional extras, imported when used
    import pandas as pd
    from matplotlib.figure import Figure

REPO = Path(facelake.__file__).resolve().parents[1]
# Environment variables the notebooks read; defaults point at `facelake demo --out demo-out`.
DEMO_OUT_ENV = "FACELAKE_DEMO_OUT"
PATH_ENVS = {"root": "FACELAKE_ROOT", "results": "FACELAKE_RESULTS", "archive": "FACELAKE_ARCHIVE",
             "photos": "FACELAKE_PHOTOS", "report": "FACELAKE_EVAL_REPORT"}
DEFAULT_DEMO_OUT = REPO / "demo-out"
# The demo's manifest (facelake.samples.MANIFEST) holds uris relative to its own folder.
DEMO_PHOTOS = samples.FOLDER
SEARCH_METADATA_KEY = RESULT_METADATA_KEY   # the results' metadata, as facelake search writes it

# Crops: the face plus this share of its width/height on each side, so hair and jaw show.
DEFAULT_MARGIN = 0.2
# Decoded photos kept while rendering a grid (one photo often holds the probe and candidates).
_PHOTO_CACHE_SIZE = 16
# Longest side of a crop shown in a grid panel; larger crops are shrunk (4K photos stay light).
PANEL_PIXELS = 200
BELOW_COLOR = "#9e9e9e"
ABOVE_COLOR = "#1565c0"
PROBE_COLOR = "#000000"
CAPTION = ("Candidate list for human review, not an identification. Each candidate is ranked by similarity "
           "(cosine) to the probe face; est. FMR is the 95% upper bound on the false-match rate of one "
           "comparison at that similarity, from the calibration. A person must compare the faces.")


def _pandas():
    try:
        import pandas
    except ImportError as err:  # pragma: no cover - the extra is installed in tests
        raise ImportError("facelake.review returns pandas DataFrames: install the notebooks extra "
                          "(`pip install -e '.[notebooks]'`)") from err
    return pandas


# ------------------------------------------------------------------------------ paths

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
        from facelake.index import layout

        return layout.current_version(self.uri, self.options)

    def manifest(self, version: str | None = None) -> dict:
        """The manifest.json of a version (the live one by default)."""
        from facelake.index import layout

        version = version or self.live_version()
        if version is None:
            raise ConfigError(f"no index is published under {storage.redact(self.uri)}: build one with "
                              f"`facelake index FACES --root {storage.redact(self.uri)}`")
        return layout.read_manifest(self.uri, version, self.options)

    def versions(self) -> "pd.DataFrame":
        """One row per complete index version, oldest first: counts, sizes, parameters, live flag."""
        from facelake.index import layout

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
        return _pandas().DataFrame(rows, columns=columns)

    def audit_records(self, kind: str | None = None) -> list[dict[str, Any]]:
        """The audit records as stored (dicts), oldest first."""
        return audit.list_records(self.uri, kind, self.options)

    def audit(self, kind: str | None = None) -> "pd.DataFrame":
        """The audit log as a table, oldest first; nested fields flattened (counts.result_rows, ...)."""
        pd = _pandas()
        records = self.audit_records(kind)
        if not records:
            return pd.DataFrame(columns=["job_id", "kind", "status", "user", "started_at", "purpose"])
        table = pd.json_normalize(records)
        first = [c for c in ("job_id", "kind", "status", "user", "host", "started_at", "ended_at", "purpose",
                             "mode", "index_version", "threshold") if c in table.columns]
        return table[first + [c for c in table.columns if c not in first]]


# ------------------------------------------------------------------------------ results

def _parquet_files(uri: str, options: StorageOptions | None) -> list[str]:
    return storage.list_files(uri, ".parquet", options)


def search_metadata(results_dir: str, options: StorageOptions | None = None) -> dict:
    """The search job's metadata stored in its results files (threshold, mode, index version, ...)."""
    files = _parquet_files(_results_folder(results_dir, options), options)
    if not files:
        return {}
    with storage.open_parquet(files[0], options) as parquet:
        meta = parquet.schema_arrow.metadata or {}
    return json.loads(meta[SEARCH_METADATA_KEY]) if SEARCH_METADATA_KEY in meta else {}


def _results_folder(uri: str, options: StorageOptions | None) -> str:
    """RESULTS/results when given the search's RESULTS folder; the folder itself otherwise."""
    inner = storage.join(uri, "results")
    return inner if _parquet_files(inner, options) else uri


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
    files = _parquet_files(folder, options)
    if not files:
        raise FileNotFoundError(f"no results at {storage.redact(results_dir)}: run `facelake search ... --out "
                                f"{storage.redact(results_dir)}` (or `facelake demo`) first")
    for name, value in (("min_similarity", min_similarity), ("max_fmr", max_fmr)):
        if value is not None and not np.isfinite(value):
            raise ConfigError(f"{name} must be a number, got {value!r}")
    if max_rank is not None and max_rank < 1:
        raise ConfigError(f"max_rank must be at least 1, got {max_rank}")
    import pyarrow.dataset as ds

    expr = None

    def both(e):
        return e if expr is None else expr & e

    if probe is not None:
        probes = [probe] if isinstance(probe, str) else list(probe)
        expr = both(ds.field("probe_image_id").isin(probes))
    if min_similarity is not None:
        expr = both(ds.field("similarity") >= float(min_similarity))
    if max_fmr is not None:
        expr = both(ds.field("est_false_match_rate") <= float(max_fmr))
    if above_threshold is not None:
        expr = both(ds.field("above_threshold") == bool(above_threshold))
    if max_rank is not None:
        expr = both(ds.field("rank") <= int(max_rank))
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


# ------------------------------------------------------------------------------ archive: faces, errors

def _table_or_empty(uri: str, schema: pa.Schema, options: StorageOptions | None,
                    columns: list[str] | None = None) -> pa.Table:
    if not _parquet_files(uri, options):
        empty = schema.empty_table()
        return empty.select(columns) if columns else empty
    return storage.read_table(uri, columns=columns, options=options)


def _of_record(folder: str, kind: str, columns: list[str] | None, options: StorageOptions | None
               ) -> tuple[bool, pa.Table | None]:
    """(True, table or None) when FOLDER is a ROOT of record (ROOT/TABLE), read through facelake.record.tables
    (never by listing ROOT/faces, which may hold orphaned parts); (False, None) otherwise."""
    from facelake.record import tables as record

    if record.read_pointer(folder, options) is None:
        return False, None
    return True, record.read_table(folder, kind, columns=columns, options=options)


def read_faces(archive: str, columns: list[str] | None = None, options: StorageOptions | None = None,
               as_pandas: bool = True):
    """The faces of ARCHIVE: an embed job's --out (ARCHIVE/faces) or a ROOT of record (its live table)."""
    managed, table = _of_record(archive, "faces", columns, options)
    if not managed:
        folder = storage.join(archive, "faces")
        if _parquet_files(folder, options):
            table = storage.read_table(folder, columns=columns, options=options)
    if table is None:
        raise FileNotFoundError(f"no faces table at {storage.redact(archive)}: run `facelake embed MANIFEST "
                                f"--out {storage.redact(archive)}` (or `facelake rebuild`) first")
    return table.to_pandas() if as_pandas else table


def read_errors(folder: str, options: StorageOptions | None = None) -> "pd.DataFrame":
    """Images that failed: FOLDER/errors of an embed run (ARCHIVE), a search (RESULTS) or a ROOT of
    record; empty when there were none."""
    from facelake.schema import ERRORS_SCHEMA

    managed, table = _of_record(folder, "errors", None, options)
    if managed:
        return (table if table is not None else ERRORS_SCHEMA.empty_table()).to_pandas()
    return _table_or_empty(storage.join(folder, "errors"), ERRORS_SCHEMA, options).to_pandas()


def errors_by_reason(folder: str, options: StorageOptions | None = None) -> "pd.DataFrame":
    """Images that failed, counted by stage and error type (most frequent first), with one example."""
    pd = _pandas()
    errors = read_errors(folder, options)
    if errors.empty:
        return pd.DataFrame(columns=["stage", "error_type", "images", "example"])
    grouped = errors.groupby(["stage", "error_type"], dropna=False)
    table = grouped.agg(images=("image_id", "nunique"), example=("message", "first")).reset_index()
    return table.sort_values(["images", "stage", "error_type"], ascending=[False, True, True], ignore_index=True)


def dropped_by_reason(archive: str, options: StorageOptions | None = None) -> "pd.DataFrame":
    """Faces found but dropped below the quality floor, counted by reason."""
    pd = _pandas()
    folder = storage.join(archive, "dropped")
    if not _parquet_files(folder, options):
        return pd.DataFrame(columns=["reason", "faces", "images"])
    dropped = storage.read_table(folder, columns=["image_id", "reason"], options=options).to_pandas()
    table = dropped.groupby("reason").agg(faces=("image_id", "size"), images=("image_id", "nunique")).reset_index()
    return table.sort_values("faces", ascending=False, ignore_index=True)


def faces_per_photo(archive: str, options: StorageOptions | None = None) -> "pd.DataFrame":
    """How many photos hold 0, 1, 2, ... usable faces (0: photos in the errors table)."""
    pd = _pandas()
    try:
        faces = read_faces(archive, columns=["image_id"], options=options, as_pandas=False)
    except FileNotFoundError:
        faces = pa.table({"image_id": pa.array([], pa.string())})
    counts = faces.group_by("image_id").aggregate([("image_id", "count")])["image_id_count"].to_numpy()
    failed = read_errors(archive, options)["image_id"].nunique()
    values, photos = np.unique(np.asarray(counts, np.int64), return_counts=True)
    rows = ([{"faces": 0, "photos": int(failed)}] if failed else []) + \
        [{"faces": int(v), "photos": int(n)} for v, n in zip(values, photos)]
    return pd.DataFrame(rows, columns=["faces", "photos"])


def embed_runs(archive: str, options: StorageOptions | None = None) -> "pd.DataFrame":
    """The summaries of the embed runs that wrote ARCHIVE (ARCHIVE/_runs/*.json), oldest first."""
    pd = _pandas()
    records = [json.loads(storage.read_bytes(u, options))
               for u in storage.list_files(storage.join(archive, "_runs"), ".json", options)]
    return pd.json_normalize(records) if records else pd.DataFrame(columns=["run_id", "images", "faces", "errors"])


# ------------------------------------------------------------------------------ evaluation report

def read_report(report_dir: str, options: StorageOptions | None = None) -> dict[str, Any]:
    """An evaluation report folder (`facelake evaluate --out`): metrics, calibration, markdown, plot paths."""
    from facelake.calibration import Calibration

    metrics_uri = storage.join(report_dir, "metrics.json")
    if not storage.exists(metrics_uri, options):
        raise FileNotFoundError(f"no evaluation report at {storage.redact(report_dir)}: run `facelake evaluate "
                                f"samples/manifest.parquet --out {storage.redact(report_dir)}` first")
    cal_uri = storage.join(report_dir, "calibration.json")
    calibration = (Calibration.from_dict(json.loads(storage.read_bytes(cal_uri, options)), source=cal_uri)
                   if storage.exists(cal_uri, options) else None)
    plots = {name: storage.join(report_dir, name) for name in ("roc.png", "det.png", "scores.png")
             if storage.exists(storage.join(report_dir, name), options)}
    return {"metrics": json.loads(storage.read_bytes(metrics_uri, options)), "calibration": calibration,
            "markdown": storage.read_bytes(storage.join(report_dir, "report.md"), options).decode(),
            "plots": plots}


def plot_calibration(calibration, *, threshold: float | None = None) -> "Figure":
    """FMR (measured and 95% upper bound) and FNMR against the similarity threshold."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=(6, 4))
    ax = fig.add_subplot()
    t = calibration.thresholds
    shown = calibration.fmr > 0
    ax.semilogy(t[shown], calibration.fmr[shown], label="FMR (measured)")
    ax.semilogy(t, calibration.fmr_upper, "--", label="FMR (95% upper bound)")
    if calibration.n_genuine:
        fnmr = calibration.fnmr
        ax.semilogy(t[fnmr > 0], fnmr[fnmr > 0], label="FNMR")
    if threshold is not None:
        ax.axvline(threshold, color="k", lw=0.8, ls=":", label=f"threshold {threshold:.3f}")
    ax.set_xlabel("similarity threshold (cosine)")
    ax.set_ylabel("rate")
    ax.set_title(f"calibration: {calibration.model} on {calibration.dataset} "
                 f"({calibration.n_impostor:,} impostor pairs)", fontsize=9)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    return fig


# ------------------------------------------------------------------------------ faces people can see

def resolve_uri(uri: str, base_dir: str | None = None) -> str:
    """A photo's uri as stored in a manifest, made absolute against ``base_dir`` when relative."""
    storage.check_uri(uri)
    if base_dir is None and storage.scheme_of(uri) == "file" and not uri.startswith("file://") \
            and not os.path.isabs(uri):
        raise ConfigError(f"photo uri {uri!r} is relative to its manifest's folder: pass base_dir= that "
                          f"folder (for the demo: {DEMO_PHOTOS})")
    return reader.resolve(uri, base_dir or "")


def load_photo(uri: str, base_dir: str | None = None, *, max_pixels: int = DEFAULT_MAX_PIXELS,
               options: StorageOptions | None = None, limits: ReadLimits | None = None) -> np.ndarray:
    """A photo as an upright RGB uint8 array (H, W, 3), read through facelake.faces.reader
    (regular files and objects only, at most ``limits.max_bytes``, under ``limits.allowed_roots``)."""
    full = resolve_uri(uri, base_dir)
    bgr = decode_bgr(reader.read(full, limits or ReadLimits(), options), max_pixels)
    return np.ascontiguousarray(bgr[:, :, ::-1])


def crop_box(bbox: Iterable[int], image_size: tuple[int, int], margin: float = DEFAULT_MARGIN) -> tuple[int, int, int, int]:
    """(left, top, right, bottom) of a bbox (x, y, w, h) grown by ``margin`` per side, inside the image."""
    x, y, w, h = (int(v) for v in bbox)
    if w <= 0 or h <= 0:
        raise ValueError(f"bbox {list(bbox)} has no area")
    if margin < 0:
        raise ConfigError(f"margin must be >= 0, got {margin}")
    width, height = image_size
    dx, dy = round(w * margin), round(h * margin)
    left, top = max(0, x - dx), max(0, y - dy)
    right, bottom = min(width, x + w + dx), min(height, y + h + dy)
    if right <= left or bottom <= top:
        raise ValueError(f"bbox {list(bbox)} lies outside the {width}x{height} photo")
    return left, top, right, bottom


def crop_face(uri: str, bbox: Iterable[int], margin: float = DEFAULT_MARGIN, base_dir: str | None = None, *,
              photo: np.ndarray | None = None, options: StorageOptions | None = None) -> Image.Image:
    """The face at ``bbox`` (x, y, w, h in the EXIF-upright photo) with a margin, as an RGB PIL image.

    ``uri`` is local, file:// or s3:// (relative uris resolve against ``base_dir``); ``photo``
    skips reading when the decoded RGB photo is already at hand.
    """
    rgb = load_photo(uri, base_dir, options=options) if photo is None else photo
    left, top, right, bottom = crop_box(bbox, (rgb.shape[1], rgb.shape[0]), margin)
    return Image.fromarray(rgb[top:bottom, left:right])


class _Photos:
    """A small cache of decoded photos while one grid is drawn."""

    def __init__(self, base_dir: str | None, options: StorageOptions | None) -> None:
        self.base_dir, self.options = base_dir, options
        self.cache: OrderedDict[str, np.ndarray] = OrderedDict()

    def crop(self, uri: str, bbox, margin: float) -> Image.Image:
        if uri not in self.cache:
            self.cache[uri] = load_photo(uri, self.base_dir, options=self.options)
            if len(self.cache) > _PHOTO_CACHE_SIZE:
                self.cache.popitem(last=False)
        face = crop_face(uri, bbox, margin, photo=self.cache[uri])
        face.thumbnail((PANEL_PIXELS, PANEL_PIXELS))
        return face


def _uri_map(table) -> dict[tuple[str, int | None], str]:
    """(image_id, face_index) and (image_id, None) -> uri, from a faces or manifest table."""
    if table is None:
        return {}
    frame = table.to_pandas() if isinstance(table, pa.Table) else table
    mapping: dict = {}
    for row in frame.itertuples(index=False):
        image_id, uri = getattr(row, "image_id"), getattr(row, "uri")
        mapping.setdefault((image_id, None), uri)
        if hasattr(row, "face_index"):
            mapping[(image_id, int(getattr(row, "face_index")))] = uri
    return mapping


def _fmt_rate(rate) -> str:
    if rate is None or not np.isfinite(rate):
        return "est. FMR n/a"
    return f"est. FMR \u2264 {rate:.1e}"


def render_review_grid(results, probe_faces=None, gallery_faces=None, *, base_dir: str | None = None,
                       max_probes: int = 6, max_candidates: int = 5, threshold: float | None = None,
                       margin: float = DEFAULT_MARGIN, title: str | None = None,
                       options: StorageOptions | None = None) -> "Figure":
    """Each probe face beside its candidates, as crops of the original photos.

    One row per probe face (the first ``max_probes``, in the order given), the probe first, then
    up to ``max_candidates`` candidates by rank, each captioned with rank, similarity and
    estimated false-match rate. Candidates below the threshold (``above_threshold`` false, or
    similarity < ``threshold`` when given) get a grey frame, a faded crop and "below threshold".
    Photo uris come from the results' probe_uri / gallery_uri columns, else from ``probe_faces`` /
    ``gallery_faces`` (tables with image_id[, face_index], uri); relative ones resolve against
    ``base_dir``. A photo that cannot be read shows the error in its panel. Every panel's axes
    carry a label: "probe", "candidate" or "candidate-below-threshold".
    """
    from matplotlib.figure import Figure

    frame = results.to_pandas() if isinstance(results, pa.Table) else results
    meta = dict(getattr(results, "attrs", {}).get("search", {})) if not isinstance(results, pa.Table) else {}
    if isinstance(results, pa.Table) and results.schema.metadata and SEARCH_METADATA_KEY in results.schema.metadata:
        meta = json.loads(results.schema.metadata[SEARCH_METADATA_KEY])
    missing = [c for c in ("probe_image_id", "probe_face_index", "probe_bbox", "rank", "gallery_image_id",
                           "gallery_face_index", "gallery_bbox", "similarity") if c not in frame.columns]
    if missing:
        raise ConfigError(f"results lack column(s) {missing}: pass a table from review.read_results")
    explicit = threshold is not None
    if threshold is None and meta.get("threshold") is not None:
        threshold = float(meta["threshold"])
    probe_uris, gallery_uris = _uri_map(probe_faces), _uri_map(gallery_faces)
    photos = _Photos(base_dir, options)

    groups = []
    for key, rows in frame.groupby(["probe_image_id", "probe_face_index"], sort=False):
        groups.append((key, rows.sort_values("rank", na_position="last")))
        if len(groups) == max_probes:
            break
    if not groups:
        raise ConfigError("no results to show: loosen the filters given to read_results")
    columns = 1 + max(1, min(max_candidates, max(int(r["rank"].notna().sum()) for _, r in groups)))
    fig = Figure(figsize=(2.0 * columns, 2.45 * len(groups) + 1.3))
    grid = fig.add_gridspec(len(groups), columns, wspace=0.08, hspace=0.55)

    def uri_of(row, side: str, lookup: dict) -> str | None:
        uri = row.get(f"{side}_uri")
        if uri is not None and not (isinstance(uri, float) and np.isnan(uri)):
            return uri
        image_id, face = row[f"{side}_image_id"], row[f"{side}_face_index"]
        return lookup.get((image_id, int(face))) or lookup.get((image_id, None))

    def panel(r: int, c: int, uri, bbox, label: str, text: str, color: str, faded: bool = False) -> None:
        ax = fig.add_subplot(grid[r, c])
        ax.set_label(label)
        ax.set_xticks([])
        ax.set_yticks([])
        try:
            if uri is None:
                raise FileNotFoundError("no uri for this face: pass probe_faces / gallery_faces")
            face = photos.crop(uri, bbox, margin)
            pixels = np.asarray(face)
            if faded:
                pixels = (0.45 * pixels + 0.55 * 255).astype(np.uint8)
            ax.imshow(pixels)
        except Exception as err:  # show the problem where the face would be; the rest still renders
            ax.text(0.5, 0.5, f"photo not shown\n{type(err).__name__}", ha="center", va="center",
                    fontsize=7, color="#b71c1c", transform=ax.transAxes, wrap=True)
        for spine in ax.spines.values():
            spine.set_edgecolor(color)
            spine.set_linewidth(3 if label != "candidate-below-threshold" else 2)
            spine.set_linestyle("-" if label != "candidate-below-threshold" else "--")
        ax.set_title(text, fontsize=7.5, color="#000000" if not faded else "#616161")

    for r, ((probe_id, probe_face), rows) in enumerate(groups):
        first = rows.iloc[0].to_dict()
        panel(r, 0, uri_of(first, "probe", probe_uris), first["probe_bbox"], "probe",
              f"PROBE {probe_id}\nface {int(probe_face)}", PROBE_COLOR)
        candidates = rows[rows["rank"].notna()].head(columns - 1)
        if candidates.empty:
            ax = fig.add_subplot(grid[r, 1:])
            ax.set_label("no-candidate")
            ax.axis("off")
            ax.text(0.02, 0.5, "no candidate at or above the threshold", fontsize=9, va="center")
        for c, row in enumerate(candidates.to_dict("records"), start=1):
            below = _below(row, threshold, explicit)
            text = (f"#{int(row['rank'])} {row['gallery_image_id']}\nsim {row['similarity']:.3f} · "
                    f"{_fmt_rate(row.get('est_false_match_rate'))}")
            if below:
                text += "\nbelow threshold"
            panel(r, c, uri_of(row, "gallery", gallery_uris), row["gallery_bbox"],
                  "candidate-below-threshold" if below else "candidate", text,
                  BELOW_COLOR if below else ABOVE_COLOR, faded=below)

    how = meta.get("threshold_how")
    thr = (f"threshold {threshold:.3f}" + (f" ({how})" if how else "")) if threshold is not None \
        else "no threshold: candidates are not marked"
    version = meta.get("index_version") or (frame["index_version"].iloc[0] if "index_version" in frame else None)
    fig.suptitle(title or f"Search {meta.get('job_id', '')} on index version {version}".strip(), fontsize=10,
                 y=1 - 0.15 / fig.get_figheight(), va="top")
    fig.text(0.01, 0.005, _wrap(f"{CAPTION} Blue frame: at or above the {thr}; grey dashed frame, faded: below "
                                f"threshold.", 180), fontsize=7, va="bottom", ha="left")
    fig.subplots_adjust(left=0.01, right=0.99, top=1 - 0.85 / fig.get_figheight(),
                        bottom=0.75 / fig.get_figheight())
    return fig


def _below(row: dict, threshold: float | None, explicit: bool) -> bool:
    """Is a candidate below the threshold? An explicit threshold wins over the job's column."""
    above = row.get("above_threshold")
    if explicit or above is None or _pandas().isna(above):
        return threshold is not None and bool(row["similarity"] < threshold)
    return not bool(above)


def _wrap(text: str, width: int) -> str:
    import textwrap

    return "\n".join(textwrap.wrap(text, width))


def panel_labels(fig: "Figure") -> list[str]:
    """The labels of a review grid's panels, in drawing order ("probe", "candidate", ...)."""
    return [ax.get_label() for ax in fig.axes]
