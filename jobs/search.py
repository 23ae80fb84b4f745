"""`facelake search`: bulk one-to-many search of probe photos against a root's live index, audited.

    facelake search PROBES --root ROOT --out RESULTS --purpose TEXT
                    [--mode investigate|identify] [--top-k K] [--max-fpir F | --threshold S]
                    [--nprobe N] [--address ADDR] [--endpoint-url URL]

1. PROBES is a manifest of images (image_id, uri, carried columns), embedded with the live index
   version's model by the embed job into RESULTS/probe_faces/, or a faces table `facelake embed`
   wrote (told apart by its ``embedding`` column); faces of another model are refused.
2. Probe faces are searched in batches: each shard is held once by a Ray actor
   (``index.search.start_searchers``) and per-shard top-k lists merge into a global top-k per
   probe face (``index.search.search_version``); ``executor="local"`` holds the shards in this
   process instead (notebooks, benchmarks). faiss ids map to gallery faces via ``load_ids``.
3. Modes. investigate (default): the top-K candidates of every probe face, each with its
   similarity and the estimated false-match rate at that similarity (``Calibration.fmr_at``, a 95%
   upper bound); nothing is called a match, but ``above_threshold`` still says where a candidate
   stands against the identify threshold. identify: only candidates at or above a threshold chosen
   for a false-positive identification rate (``--max-fpir``, default 1e-3) at the real gallery size
   (``Calibration.threshold_for_fpir``), or ``--threshold`` given explicitly. The threshold and how
   it was chosen go to the results' metadata, the summary and the audit record.

Outputs (every probe image ends in exactly one of results or errors):

    RESULTS/results/part-<job>-<n>.parquet  schema.RESULT_COLUMNS + probe_* / gallery_* carried
                                            columns. A probe face with no candidate (identify mode,
                                            nothing at or above the threshold) gets one row with
                                            rank and gallery columns null: searched, nothing found.
    RESULTS/errors/part-<job>-0.parquet     probe images with no usable face or that failed
    RESULTS/probe_faces/                    the embed job's output for a manifest of probes
    RESULTS/_search.json                    the summary, written last on success

Audit: every job whose options validate appends one record to ROOT/audit/ (``facelake.audit``),
written in a ``finally`` so a job that fails half-way is recorded with status "failed" and its
error. A search refused by option validation (no purpose, conflicting options) does no work and
writes no record. Tested in tests/test_search.py; benchmarked by bench/search.py.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import math
import time
from dataclasses import asdict, dataclass, field
from typing import Callable, Literal, Mapping

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import typer

from facelake import audit, calibration, progress, storage
from facelake.errors import ConfigError, FacelakeError, IndexVersionError
from facelake.reader import DEFAULT_MAX_BYTES
from facelake.registry import get_model, weights_fingerprint
from facelake.schema import ERRORS_SCHEMA, FACE_COLUMNS, RESULT_COLUMNS, carried_columns

log = logging.getLogger(__name__)

Mode = Literal["investigate", "identify"]
Executor = Literal["ray", "local"]
MODES = ("investigate", "identify")
EXECUTORS = ("ray", "local")

DEFAULT_TOP_K = 10
# The identification error rate thresholds are chosen for when none is given: one non-mated
# probe in a thousand returns a false candidate (the accountable systems' usual operating point).
DEFAULT_MAX_FPIR = 1e-3
# Probe faces per fan-out: large enough that faiss parallelises over queries and Ray's per-call
# overhead (~1 ms) is amortised, small enough that a batch's results (K rows each) stay small.
DEFAULT_BATCH_SIZE = 1024
# Results rows per Parquet part file.
DEFAULT_PART_ROWS = 500_000
METADATA_KEY = b"facelake.search"
HOOK_NAMES = ("after_batch",)
Hooks = Mapping[str, Callable[["SearchSummary"], None]]


@dataclass(frozen=True)
class SearchConfig:
    """Options of one search job; ``validate`` checks them before storage or Ray is touched."""

    probes: str
    root: str
    out: str
    purpose: str | None
    mode: Mode = "investigate"
    top_k: int = DEFAULT_TOP_K
    max_fpir: float | None = None      # None: DEFAULT_MAX_FPIR unless --threshold is given
    threshold: float | None = None     # explicit threshold; excludes max_fpir
    nprobe: int | None = None          # None: the version's default nprobe
    model: str | None = None           # None: the index's model; given: must equal it
    calibration: str | None = None     # None: the calibration shipped for the model
    address: str | None = None
    endpoint_url: str | None = None
    weights_from: str | None = None
    workers: int | None = None         # embed actors for a manifest of probes
    batch_size: int = DEFAULT_BATCH_SIZE
    executor: Executor = "ray"
    progress: bool = False
    allowed_roots: tuple[str, ...] = ()  # probe photos are read only under these (facelake.reader)
    max_bytes: int = DEFAULT_MAX_BYTES

    def validate(self) -> None:
        if self.purpose is None or not str(self.purpose).strip():
            raise ConfigError("--purpose is required: say why this search is run (a case or request "
                              "reference); it is written to the audit log. Nothing was searched")
        if self.mode not in MODES:
            raise ConfigError(f"--mode must be one of {', '.join(MODES)}, not {self.mode!r}")
        if self.executor not in EXECUTORS:
            raise ConfigError(f"executor must be one of {', '.join(EXECUTORS)}, not {self.executor!r}")
        if self.max_fpir is not None and self.threshold is not None:
            raise ConfigError("give --max-fpir or --threshold, not both: --max-fpir chooses the threshold "
                              "from the calibration, --threshold sets it directly")
        if self.max_fpir is not None and not 0.0 < self.max_fpir < 1.0:
            raise ConfigError(f"--max-fpir must be between 0 and 1 (exclusive), e.g. 1e-3; got {self.max_fpir}")
        if self.threshold is not None and not (math.isfinite(self.threshold) and -1.0 <= self.threshold <= 1.0):
            raise ConfigError(f"--threshold is a cosine similarity within [-1, 1]; got {self.threshold}")
        if self.top_k < 1:
            raise ConfigError(f"--top-k must be at least 1, got {self.top_k}")
        if self.nprobe is not None and self.nprobe < 1:
            raise ConfigError(f"--nprobe must be at least 1, got {self.nprobe}")
        if self.batch_size < 1:
            raise ConfigError(f"--batch-size must be at least 1, got {self.batch_size}")
        if self.workers is not None and self.workers < 1:
            raise ConfigError("--workers must be at least 1")
        if self.model is not None:
            get_model(self.model)
        for uri in (self.probes, self.root, self.out):
            storage.check_uri(uri)
        if _same_place(self.out, self.root):
            raise ConfigError("--out must not be the index root: give a folder of its own for the results")


@dataclass
class SearchSummary:
    """What a search did; also RESULTS/_search.json and (with purpose etc.) the audit record."""

    job_id: str
    mode: str
    index_version: str | None = None
    model: str | None = None
    gallery_size: int = 0
    threshold: float | None = None
    threshold_how: str = ""
    calibration: str | None = None
    probes_kind: str = ""              # "manifest" | "faces"
    probes_sha256: str | None = None
    probe_images: int = 0
    probe_faces: int = 0
    probe_errors: int = 0
    searched_faces: int = 0
    result_rows: int = 0               # candidate rows (rows with a gallery face)
    no_candidate_faces: int = 0        # probe faces with no candidate (identify mode)
    gallery_carried: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    embed_seconds: float = 0.0
    search_seconds: float = 0.0
    seconds: float = 0.0

    @property
    def queries_per_second(self) -> float:
        return self.searched_faces / self.search_seconds if self.search_seconds else 0.0

    def to_dict(self) -> dict:
        data = asdict(self)
        data["queries_per_second"] = round(self.queries_per_second, 1)
        return data


def outputs(out: str) -> dict[str, str]:
    """The layout of a search's RESULTS folder (one source of truth)."""
    return {"results": storage.join(out, "results"), "errors": storage.join(out, "errors"),
            "probe_faces": storage.join(out, "probe_faces"), "summary": storage.join(out, "_search.json")}


# ------------------------------------------------------------------------------ the job

def run_search(config: SearchConfig, *, hooks: Hooks | None = None) -> SearchSummary:
    """Search every probe face against ROOT's live index version; write RESULTS; audit the job.

    ``hooks`` maps "after_batch" to a callable given the summary so far (tests fail there on
    purpose). Raises FacelakeError subclasses for problems the user can fix.
    """
    config.validate()
    unknown = set(hooks or {}) - set(HOOK_NAMES)
    if unknown:
        raise ConfigError(f"unknown hook(s) {sorted(unknown)}; known: {HOOK_NAMES}")
    options = storage.StorageOptions.from_env(config.endpoint_url)
    summary = SearchSummary(job_id=audit.new_job_id("search"), mode=config.mode)
    started_at, started = _utc_now_ms(), time.monotonic()
    status, error = "failed", None
    try:
        _search(config, options, summary, hooks)
        status = "succeeded"
        return summary
    except BaseException as err:
        error = f"{type(err).__name__}: {storage.redact(str(err))}"[:2000]
        _remove_partial_results(config.out, summary.job_id, options)
        if _is_ray_actor_death(err):
            raise SearchInterrupted(
                f"a shard searcher died during search {summary.job_id} ({type(err).__name__}); no "
                f"results were kept: rerun the search with a new --out") from err
        raise
    finally:
        summary.seconds = round(time.monotonic() - started, 3)
        record = _audit_record(config, summary, started_at, status, error)
        audit.write_record(config.root, record, options)


class SearchInterrupted(FacelakeError):
    """A search lost a shard actor part-way; nothing partial is left behind."""


def _is_ray_actor_death(err: BaseException) -> bool:
    import ray.exceptions

    return isinstance(err, ray.exceptions.RayActorError)


def _remove_partial_results(out: str, job_id: str, options: storage.StorageOptions) -> None:
    """A failed search leaves no result part files: readers never see a partial candidate list."""
    for uri in storage.list_files(outputs(out)["results"], ".parquet", options):
        if job_id in uri.rsplit("/", 1)[-1]:
            storage.remove(uri, options=options)


def _search(config: SearchConfig, options: storage.StorageOptions, summary: SearchSummary,
            hooks: Hooks | None) -> None:
    from facelake.index.load import load_ids, open_version

    layout = outputs(config.out)
    if storage.list_files(layout["results"], ".parquet", options):
        raise ConfigError(f"{storage.redact(layout['results'])} already holds results of another search: "
                          f"give each search its own --out")
    handle = open_version(config.root, expect_model=config.model, options=options)
    spec = get_model(handle.model)
    if handle.manifest.get("weights_sha256") not in (None, weights_fingerprint(spec)):
        raise IndexVersionError(
            f"index version {handle.version} was built from faces embedded with other weights of "
            f"{spec.name} ({handle.manifest['weights_sha256'][:12]}...) than this facelake's "
            f"({weights_fingerprint(spec)[:12]}...): probes would not be comparable; re-embed and rebuild")
    summary.index_version, summary.model, summary.gallery_size = handle.version, spec.name, handle.total
    nprobe = config.nprobe or handle.nprobe
    if nprobe > handle.nlist:
        raise ConfigError(f"--nprobe {nprobe} exceeds nlist {handle.nlist} of index version {handle.version}")
    cal = _calibration(config, spec.name, summary)
    summary.threshold, summary.threshold_how = _threshold(config, cal, handle.total)

    import ray

    from facelake.cluster import runtime

    started_here = not ray.is_initialized()
    if config.executor == "ray" or _probes_kind(config, options) == "manifest":
        runtime.connect(config.address)   # before the embed job, so that it leaves Ray running
    actors: list = []
    try:
        embed_started = time.monotonic()
        faces, errors, probe_carried = _probe_faces(config, options, handle.model, summary)
        summary.embed_seconds = round(time.monotonic() - embed_started, 3)
        gallery = _gallery_columns(handle, load_ids(handle), options, summary)
        _write_errors(errors, layout["errors"], summary, options)
        writer = _ResultWriter(layout["results"], summary, probe_carried, gallery, options)
        if faces.num_rows:
            searcher, actors = _searcher(handle, config.executor)
            _search_batches(config, faces, searcher, nprobe, cal, summary, writer, hooks)
        writer.close()
        storage.write_bytes_atomic(layout["summary"], json.dumps(
            {**summary.to_dict(), "purpose": config.purpose}, indent=2, default=str).encode(), options)
    finally:
        for actor in actors:
            ray.kill(actor)
        runtime.shutdown_if_local(started_here and config.address is None)


def _search_batches(config, faces, searcher, nprobe, cal, summary, writer, hooks) -> None:
    from facelake.index.build import embeddings

    started = time.monotonic()
    with progress.tracker(faces.num_rows, "search", config.progress, unit="probe faces") as bar:
        for start in range(0, faces.num_rows, config.batch_size):
            batch = faces.slice(start, config.batch_size)
            D, I = searcher(embeddings(batch), config.top_k, nprobe)
            writer.add(batch, D, I, _fmr(cal, D), summary.threshold, config.mode)
            summary.searched_faces += batch.num_rows
            summary.search_seconds = round(time.monotonic() - started, 3)
            bar.advance(batch.num_rows)
            if hooks and "after_batch" in hooks:
                writer.flush()
                hooks["after_batch"](summary)


# ------------------------------------------------------------------ threshold and calibration

def _calibration(config: SearchConfig, model: str, summary: SearchSummary) -> calibration.Calibration | None:
    """The calibration for the index's model; in investigate mode a missing one only loses the
    estimated false-match rates (noted), in identify mode without --threshold it is an error."""
    try:
        cal = calibration.load(config.calibration, model)
    except calibration.CalibrationError as err:
        if config.mode == "identify" and config.threshold is None or config.calibration is not None:
            raise
        summary.notes.append(f"no calibration, est_false_match_rate left null: {err}")
        return None
    summary.calibration = (f"{cal.dataset} ({cal.n_impostor:,} impostor pairs, "
                           f"{config.calibration or 'shipped with facelake'})")
    return cal


def _threshold(config: SearchConfig, cal, gallery_size: int) -> tuple[float | None, str]:
    """(threshold, how it was chosen). In investigate mode an uncertifiable threshold is None."""
    if config.threshold is not None:
        return float(config.threshold), "explicit --threshold"
    fpir = config.max_fpir or DEFAULT_MAX_FPIR
    where = "--max-fpir" if config.max_fpir is not None else "default max FPIR"
    if cal is None:
        return None, "none: no calibration for the model"
    try:
        value = cal.threshold_for_fpir(fpir, gallery_size)
    except calibration.CalibrationError as err:
        if config.mode == "identify":
            raise
        return None, f"none: {err}"
    return value, (f"threshold_for_fpir({where} {fpir:g}, gallery of {gallery_size:,} faces) on the "
                   f"{cal.dataset} calibration (95% upper bound on FMR {calibration.fmr_for_fpir(fpir, gallery_size):.3g} "
                   f"per comparison)")


def _fmr(cal, D: np.ndarray) -> np.ndarray:
    if cal is None:
        return np.full(D.shape, np.nan)
    return np.asarray(cal.fmr_at(np.where(np.isfinite(D), D, np.nan)), np.float64)


# ------------------------------------------------------------------------------ probes

def _probe_faces(config: SearchConfig, options, model: str, summary: SearchSummary
                 ) -> tuple[pa.Table, pa.Table | None, list[str]]:
    """(probe faces sorted by image and face, errors or None, carried column names)."""
    if _probes_kind(config, options) == "faces":
        return _faces_probes(config, options, model, summary)
    return _manifest_probes(config, options, model, summary)


def _probes_kind(config: SearchConfig, options) -> str:
    """"faces" for a faces table (it has an ``embedding`` column), else "manifest"."""
    try:
        schema = _schema_of(config.probes, options)
    except FileNotFoundError as err:
        raise ConfigError(f"no probes at {storage.redact(config.probes)}: give a Parquet manifest of images "
                          f"(image_id, uri) or a faces table `facelake embed` wrote") from err
    return "faces" if "embedding" in schema.names else "manifest"


def _faces_probes(config, options, model, summary) -> tuple[pa.Table, None, list[str]]:
    faces = storage.read_table(config.probes, options=options)
    summary.probes_kind = "faces"
    missing = [c for c in ("image_id", "face_index", "bbox", "embedding", "model") if c not in faces.column_names]
    if missing:
        raise ConfigError(f"probe faces table {storage.redact(config.probes)} lacks column(s) {missing}: pass "
                          f"a manifest of images or the faces table `facelake embed` wrote")
    if not faces.num_rows:
        raise ConfigError(f"probe faces table {storage.redact(config.probes)} is empty: nothing to search")
    models = [m for m in pc.unique(faces["model"]).to_pylist()]
    if models != [model]:
        raise IndexVersionError(f"probe faces were embedded with model(s) {models} but index version "
                                f"{summary.index_version} holds {model!r} faces: pass the probe images' manifest "
                                f"instead (they are then embedded with {model!r}) or rebuild the index")
    if "weights_sha256" in faces.column_names:
        wanted = weights_fingerprint(get_model(model))
        other = [w for w in pc.unique(faces["weights_sha256"]).to_pylist() if w != wanted]
        if other:
            raise IndexVersionError(f"probe faces were embedded with other {model} weights ({other[0][:12]}...): "
                                    f"re-embed them or pass the probe images' manifest")
    if faces.schema.field("embedding").type != pa.list_(pa.float32(), get_model(model).dim):
        raise ConfigError(f"probe faces' embedding column is {faces.schema.field('embedding').type}, not "
                          f"{get_model(model).dim} float32 values of model {model}")
    faces = faces.sort_by([("image_id", "ascending"), ("face_index", "ascending")])
    summary.probes_sha256 = _faces_fingerprint(faces)
    summary.probe_images = len(pc.unique(faces["image_id"]))
    summary.probe_faces = faces.num_rows
    return faces, None, carried_columns(faces.schema)


def _faces_fingerprint(faces: pa.Table) -> str:
    """sha256 over (image_id, face_index, embedding bytes) in (image_id, face_index) order."""
    digest = hashlib.sha256()
    for batch in faces.select(["image_id", "face_index", "embedding"]).to_batches(65536):
        digest.update(b"".join(s.encode() + b"\0" for s in batch.column(0).to_pylist()))
        digest.update(np.asarray(batch.column(1).to_numpy(zero_copy_only=False), np.int32).tobytes())
        digest.update(np.asarray(batch.column(2).flatten().to_numpy(zero_copy_only=False), np.float32).tobytes())
    return digest.hexdigest()


def _manifest_probes(config, options, model, summary) -> tuple[pa.Table, pa.Table, list[str]]:
    from facelake import manifest
    from facelake.jobs.embed import EmbedConfig
    from facelake.jobs.embed import outputs as embed_outputs
    from facelake.jobs.embed import run_embed

    info = manifest.validate(config.probes, options)
    summary.probes_kind, summary.probes_sha256, summary.probe_images = "manifest", info.fingerprint, info.rows
    work = outputs(config.out)["probe_faces"]
    run_embed(EmbedConfig(manifest=config.probes, out=work, model=model, address=config.address,
                          endpoint_url=config.endpoint_url, weights_from=config.weights_from,
                          workers=config.workers, progress=config.progress,
                          allowed_roots=config.allowed_roots, max_bytes=config.max_bytes))
    layout = embed_outputs(work)
    wanted = storage.read_table(config.probes, columns=["image_id"], options=options)["image_id"]
    tables = {}
    for name in ("faces", "errors"):
        if storage.list_files(layout[name], ".parquet", options):
            table = storage.read_table(layout[name], options=options)
            tables[name] = table.filter(pc.is_in(table["image_id"], value_set=pa.array(wanted.to_pylist(), pa.string())))
    faces = tables.get("faces")
    if faces is None:
        from facelake.schema import faces_schema
        faces = faces_schema(get_model(model).dim).empty_table()
    faces = faces.sort_by([("image_id", "ascending"), ("face_index", "ascending")])
    errors = tables.get("errors")
    summary.probe_faces = faces.num_rows
    done = set(faces["image_id"].to_pylist()) | set(errors["image_id"].to_pylist() if errors is not None else [])
    if len(done) != info.rows:
        raise FacelakeError(f"the embed job left {info.rows - len(done)} probe image(s) in neither its faces nor "
                            f"its errors table under {storage.redact(work)}: rerun the search with a new --out")
    return faces, errors, list(info.carried)


def _write_errors(errors: pa.Table | None, folder: str, summary: SearchSummary, options) -> None:
    if errors is None or not errors.num_rows:
        return
    carried = [c for c in errors.column_names if c not in ERRORS_SCHEMA.names]
    table = errors.select(ERRORS_SCHEMA.names + carried).cast(
        pa.schema(list(ERRORS_SCHEMA) + [errors.schema.field(c) for c in carried]))
    table = table.add_column(0, "job_id", pa.array([summary.job_id] * table.num_rows, pa.string()))
    storage.write_table(storage.join(folder, f"part-{summary.job_id}-00000.parquet"), table, options)
    summary.probe_errors = table.num_rows


# ------------------------------------------------------------------------------ gallery

def _gallery_columns(handle, ids: pa.Table, options, summary: SearchSummary) -> pa.Table:
    """Gallery columns in faiss id order: image_id, face_index, bbox, then uri and carried columns
    from the faces table the version was built from (skipped, with a note, when unavailable)."""
    base = ids.select(["image_id", "face_index", "bbox"])
    source = handle.manifest.get("source")
    if not source or source.startswith("<") or "***" in source:
        summary.notes.append(f"gallery carried columns skipped: index version {handle.version} records no "
                             f"readable source faces table ({source!r})")
        return base
    try:
        schema = _schema_of(source, options)
        extra = [c for c in ["uri", *carried_columns(schema)] if c in schema.names]
        if not extra:
            return base
        table = storage.read_table(source, columns=["image_id", "face_index", *extra], options=options)
    except Exception as err:  # the index still answers; only the extra columns are lost
        summary.notes.append(f"gallery carried columns skipped: cannot read source faces table "
                             f"{storage.redact(source)}: {type(err).__name__}: {err}")
        return base
    table = table.cast(pa.schema([pa.field("image_id", pa.string()), pa.field("face_index", pa.int32())]
                                 + [table.schema.field(c) for c in extra]))
    keyed = ids.select(["faiss_id", "image_id", "face_index"])
    joined = keyed.join(table, keys=["image_id", "face_index"], join_type="left outer").sort_by("faiss_id")
    if joined.num_rows != ids.num_rows:
        summary.notes.append(f"gallery carried columns skipped: source faces table {storage.redact(source)} holds "
                             f"duplicate faces")
        return base
    summary.gallery_carried = extra
    return pa.table([*base.columns, *(joined[c] for c in extra)], names=[*base.column_names, *extra])


def _schema_of(uri: str, options) -> pa.Schema:
    files = storage.list_files(uri, ".parquet", options)
    if not files:
        raise FileNotFoundError(f"no Parquet files at {storage.redact(uri)}")
    fs, path = storage.filesystem(files[0], options)
    with fs.open(path, "rb") as handle:
        return pq.read_schema(handle)


# ------------------------------------------------------------------------------ searching

def _searcher(handle, executor: Executor):
    """(search(xq, k, nprobe) -> (D, I), actors to stop afterwards)."""
    import ray

    from facelake.index import search

    if executor == "ray":
        actors = search.start_searchers(handle)
        ray.get([actor.ntotal.remote() for actor in actors])   # shards loaded before the clock starts
        return (lambda xq, k, nprobe: search.search_version(handle, xq, k, nprobe, actors)), actors
    shards = [search.LocalShardSearcher(handle, s) for s in range(handle.shard_count)]
    return (lambda xq, k, nprobe: search.merge_topk([s.search(xq, k, nprobe) for s in shards], k)), []


class _ResultWriter:
    """Turns (probe batch, D, I) into result rows and writes bounded part files."""

    def __init__(self, folder: str, summary: SearchSummary, probe_carried: list[str], gallery: pa.Table,
                 options, part_rows: int = DEFAULT_PART_ROWS) -> None:
        self.folder, self.summary, self.options, self.part_rows = folder, summary, options, part_rows
        self.probe_carried = [c for c in ["uri", *probe_carried] if c not in FACE_COLUMNS or c == "uri"]
        self.gallery = gallery
        self.gallery_extra = [c for c in gallery.column_names if c not in ("image_id", "face_index", "bbox")]
        self.pending: list[pa.Table] = []
        self.rows = 0
        self.parts = 0
        self.schema: pa.Schema | None = None

    def add(self, probes: pa.Table, D: np.ndarray, I: np.ndarray, fmr: np.ndarray,
            threshold: float | None, mode: str) -> None:
        n, k = I.shape
        keep = I >= 0
        if mode == "identify":
            keep &= D >= threshold
        empty = ~keep.any(axis=1)                  # probe faces with no candidate: one null row each
        rows_probe = np.concatenate([np.repeat(np.arange(n), keep.sum(axis=1)), np.flatnonzero(empty)])
        order = np.argsort(rows_probe, kind="stable")
        probe_rows = rows_probe[order]
        cand_mask = np.concatenate([np.ones(int(keep.sum()), bool), np.zeros(int(empty.sum()), bool)])[order]
        ranks_all = np.broadcast_to(np.arange(1, k + 1, dtype=np.int32), (n, k))
        flat = lambda a, fill: np.concatenate([a[keep], np.full(int(empty.sum()), fill, a.dtype)])[order]  # noqa: E731
        ids = flat(I, -1)
        sims = flat(D.astype(np.float32), np.nan)
        rates = flat(fmr.astype(np.float64), np.nan)
        ranks = flat(ranks_all, 0)
        # null take indices give null gallery columns on the no-candidate rows
        gallery = self.gallery.take(pa.array(ids, pa.int64(), mask=~cand_mask))
        probe = probes.take(pa.array(probe_rows, pa.int64()))
        above = None if threshold is None else pa.array(sims >= threshold, mask=~cand_mask)

        columns = {
            "job_id": pa.array([self.summary.job_id] * len(probe_rows), pa.string()),
            "probe_image_id": probe["image_id"],
            "probe_face_index": probe["face_index"],
            "probe_bbox": probe["bbox"],
            "rank": pa.array(ranks, pa.int32(), mask=~cand_mask),
            "gallery_image_id": gallery["image_id"],
            "gallery_face_index": gallery["face_index"],
            "gallery_bbox": gallery["bbox"],
            "similarity": pa.array(sims, pa.float32(), mask=~cand_mask),
            "est_false_match_rate": pa.array(rates, pa.float64(), mask=~cand_mask | np.isnan(rates)),
            "above_threshold": above if above is not None else pa.nulls(len(probe_rows), pa.bool_()),
            "index_version": pa.array([self.summary.index_version] * len(probe_rows), pa.string()),
        }
        fields = list(RESULT_COLUMNS)
        for name in self.probe_carried:
            if name in probe.column_names:
                columns[f"probe_{name}"] = probe[name]
                fields.append(pa.field(f"probe_{name}", probe.schema.field(name).type))
        for name in self.gallery_extra:
            columns[f"gallery_{name}"] = gallery[name]
            fields.append(pa.field(f"gallery_{name}", gallery.schema.field(name).type))
        if self.schema is None:
            self.schema = pa.schema(fields, metadata={METADATA_KEY: json.dumps(self._metadata()).encode()})
        table = pa.table(columns).cast(self.schema)
        self.summary.result_rows += int(cand_mask.sum())
        self.summary.no_candidate_faces += int(empty.sum())
        self.pending.append(table)
        self.rows += table.num_rows
        if self.rows >= self.part_rows:
            self.flush()

    def _metadata(self) -> dict:
        s = self.summary
        return {"job_id": s.job_id, "mode": s.mode, "index_version": s.index_version, "model": s.model,
                "gallery_size": s.gallery_size, "threshold": s.threshold, "threshold_how": s.threshold_how,
                "calibration": s.calibration}

    def flush(self) -> None:
        if not self.pending:
            return
        sink = io.BytesIO()
        pq.write_table(pa.concat_tables(self.pending), sink, compression="zstd")
        name = f"part-{self.summary.job_id}-{self.parts:05d}.parquet"
        storage.write_bytes_atomic(storage.join(self.folder, name), sink.getvalue(), self.options)
        self.parts += 1
        self.pending, self.rows = [], 0

    def close(self) -> None:
        self.flush()


# ------------------------------------------------------------------------------ audit

def _audit_record(config: SearchConfig, summary: SearchSummary, started_at: str, status: str,
                  error: str | None) -> dict:
    """The audit record of one job: what was searched, why, how, with what outcome. No secrets:
    URIs are redacted and no address, endpoint or credential is recorded."""
    return {
        "job_id": summary.job_id,
        "kind": "search",
        "purpose": config.purpose.strip(),
        "mode": config.mode,
        "threshold": summary.threshold,
        "threshold_how": summary.threshold_how,
        "calibration": summary.calibration,
        "index_version": summary.index_version,
        "model": summary.model,
        "gallery_size": summary.gallery_size,
        "parameters": {"top_k": config.top_k, "nprobe": config.nprobe, "max_fpir": config.max_fpir,
                       "threshold": config.threshold, "batch_size": config.batch_size,
                       "executor": config.executor, "calibration_file": config.calibration and
                       storage.redact(config.calibration)},
        "probes": {"uri": storage.redact(config.probes), "kind": summary.probes_kind,
                   "sha256": summary.probes_sha256},
        "out": storage.redact(config.out),
        "counts": {"probe_images": summary.probe_images, "probe_faces": summary.probe_faces,
                   "probe_errors": summary.probe_errors, "searched_faces": summary.searched_faces,
                   "result_rows": summary.result_rows, "no_candidate_faces": summary.no_candidate_faces},
        "notes": summary.notes,
        "started_at": started_at,
        "ended_at": _utc_now_ms(),
        "seconds": summary.seconds,
        "status": status,
        "error": error,
    }


def _utc_now_ms() -> str:
    """UTC time to the millisecond, so that records of jobs started in one second sort in order."""
    now = time.time()
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(now)) + f".{int(now * 1000) % 1000:03d}Z"


def _same_place(a: str, b: str) -> bool:
    strip = lambda u: (u[len("file://"):] if u.startswith("file://") else u).rstrip("/")  # noqa: E731
    return strip(a) == strip(b)


# ------------------------------------------------------------------------------ demo

DEMO_PROBES = 5   # one photo each of the first identities of the sample


def demo_search(manifest_uri: str, root: str, out: str, *, top_k: int = 3) -> dict:
    """`facelake demo`'s last step: one photo per identity of the sample searched against the
    sample index; prints the top candidates per probe and returns what was made."""
    from facelake.jobs.embed import manifest_dir, resolve_uri

    table = storage.read_table(manifest_uri)
    base = manifest_dir(manifest_uri)
    picks: dict[str, dict] = {}
    for row in sorted(table.to_pylist(), key=lambda r: r["image_id"]):
        identity = row.get("identity")
        if identity and identity not in picks and len(picks) < DEMO_PROBES:
            picks[identity] = {**row, "uri": resolve_uri(row["uri"], base, ())}
    probes_uri = storage.join(out, "probes", "manifest.parquet")
    storage.write_table(probes_uri, pa.Table.from_pylist(list(picks.values()), schema=table.schema))
    summary = run_search(SearchConfig(probes=probes_uri, root=root, out=out, top_k=top_k,
                                      purpose="facelake demo: sample probes against the sample index"))
    print_summary(summary)
    rows = storage.read_table(outputs(out)["results"]).sort_by(
        [("probe_image_id", "ascending"), ("probe_face_index", "ascending"), ("rank", "ascending")]).to_pylist()
    for row in rows:
        if row["rank"] is None:
            continue
        same = " (the probe photo itself)" if row["gallery_image_id"] == row["probe_image_id"] else ""
        typer.echo(f"  probe {row['probe_image_id']} [{row.get('probe_identity')}] #{row['rank']}: "
                   f"{row['gallery_image_id']} [{row.get('gallery_identity')}] similarity {row['similarity']:.3f}, "
                   f"est. FMR {row['est_false_match_rate']:.2g}{same}")
    return {"results": out, "search_job": summary.job_id, "result_rows": summary.result_rows}


# ------------------------------------------------------------------------------ CLI

def print_summary(summary: SearchSummary) -> None:
    typer.echo(f"search {summary.job_id} ({summary.mode}) on index version {summary.index_version} "
               f"({summary.gallery_size:,} faces, {summary.model}): {summary.probe_images} probe image(s), "
               f"{summary.probe_faces} face(s), {summary.probe_errors} without a usable face; "
               f"{summary.result_rows} candidate row(s), {summary.no_candidate_faces} face(s) without a candidate; "
               f"{summary.queries_per_second:.0f} probe faces/s")
    threshold = "none" if summary.threshold is None else f"{summary.threshold:.4f}"
    typer.echo(f"  threshold {threshold}: {summary.threshold_how}")
    for note in summary.notes:
        typer.echo(f"  note: {note}")


def register(app: typer.Typer) -> None:
    @app.command("search")
    def search_command(
        probes: str = typer.Argument(..., metavar="PROBES", help="manifest of probe images (image_id, uri) or a faces table"),
        root: str = typer.Option(..., "--root", help="root holding the live index version and the audit log"),
        out: str = typer.Option(..., "--out", help="results folder: results/, errors/, probe_faces/"),
        purpose: str = typer.Option(None, "--purpose", help="REQUIRED: why this search is run, a case or request reference (audited)"),
        mode: str = typer.Option("investigate", "--mode", help="investigate (top-K for review) or identify (above threshold)"),
        top_k: int = typer.Option(DEFAULT_TOP_K, "--top-k", help="candidates per probe face"),
        max_fpir: float = typer.Option(None, "--max-fpir", help=f"false-positive identification rate the threshold is chosen for (default {DEFAULT_MAX_FPIR:g})"),
        threshold: float = typer.Option(None, "--threshold", help="explicit similarity threshold (instead of --max-fpir)"),
        nprobe: int = typer.Option(None, "--nprobe", help="IVF lists scanned per shard (default: the version's)"),
        model: str = typer.Option(None, "--model", help="model the probes must be embedded with (default: the index's)"),
        calibration_file: str = typer.Option(None, "--calibration", help="calibration.json from `facelake evaluate` (default: shipped)"),
        address: str = typer.Option(None, "--address", help="Ray cluster to join (auto, ray://host:port); default: a local Ray"),
        endpoint_url: str = typer.Option(None, "--endpoint-url", help="S3-compatible endpoint (credentials come from the AWS chain)"),
        weights_from: str = typer.Option(None, "--weights-from", help="folder or s3:// prefix with the weight files"),
        workers: int = typer.Option(None, "--workers", help="embed actors for a manifest of probes"),
        batch_size: int = typer.Option(DEFAULT_BATCH_SIZE, "--batch-size", help="probe faces per fan-out"),
        allow_root: list[str] = typer.Option([], "--allow-root", help="only read probe photos under this root (repeatable)"),
        max_bytes: int = typer.Option(DEFAULT_MAX_BYTES, "--max-bytes", help="refuse probe photos larger than this many bytes (before reading)"),
    ) -> None:
        """Search probe photos against a root's live index; write reviewable results; audit the job."""
        summary = run_search(SearchConfig(
            probes=probes, root=root, out=out, purpose=purpose, mode=mode, top_k=top_k, max_fpir=max_fpir,
            threshold=threshold, nprobe=nprobe, model=model, calibration=calibration_file, address=address,
            endpoint_url=endpoint_url, weights_from=weights_from, workers=workers, batch_size=batch_size,
            allowed_roots=tuple(allow_root), max_bytes=max_bytes, progress=progress.enabled()))
        print_summary(summary)
