"""`facelake search`: bulk one-to-many search of probe photos against a root's live index, audited.

    facelake search PROBES --root ROOT --out RESULTS --purpose TEXT
                    [--mode investigate|identify] [--top-k K] [--max-fpir F | --threshold S]
                    [--nprobe N] [--address ADDR] [--endpoint-url URL]

1. PROBES is a manifest of images (image_id, uri, carried columns), embedded with the live index
   version's model by the embed job into RESULTS/probe_faces/, or a faces table `facelake embed`
   wrote (told apart by its ``embedding`` column); faces of another model are refused.
2. Probe faces stream as a Ray Dataset from their Parquet part files to a pool of search
   workers (``BatchSearch``). Each batch fans out to the shard actors
   (``index.search.start_searchers``: one per group of shards, at least one per node, spread
   over nodes with a memory request from the shards' size), whose top-k lists come back with
   their winners' id-table rows and merge into
   a global top-k (``index.search.search_rows``); the worker annotates false-match rates and
   writes the batch's result part file itself. The driver sees per-batch counts only, so its
   memory grows with neither the gallery nor the probes. ``executor="local"`` runs the same
   worker code in this process (notebooks, benchmarks).
3. Modes. investigate (default): the top-K candidates of every probe face, each with its
   similarity and the estimated false-match rate at that similarity (``Calibration.fmr_at``, a 95%
   upper bound); nothing is called a match, but ``above_threshold`` still says where a candidate
   stands against the identify threshold. identify: only candidates at or above a threshold chosen
   for a false-positive identification rate (``--max-fpir``, default 1e-3) at the real gallery size
   (``Calibration.threshold_for_fpir``), or ``--threshold`` given explicitly. The threshold and how
   it was chosen go to the results' metadata, the summary and the audit record.

Outputs (every probe image ends in exactly one of results or errors):

    RESULTS/results/part-<job>-<worker>-<n>.parquet  one per batch: schema.RESULT_COLUMNS + probe_* / gallery_* carried
                                            columns. A probe face with no candidate (identify mode,
                                            nothing at or above the threshold) gets one row with
                                            rank and gallery columns null: searched, nothing found.
    RESULTS/errors/part-<job>-<n>.parquet   probe images with no usable face or that failed
    RESULTS/probe_faces/                    the embed job's output for a manifest of probes
                                            (with _probes.json: which manifest it embeds)
    RESULTS/_search.json                    the summary, written last on success

Audit: every job whose options validate runs inside ``audit.Job``: a "started" record is written
before any result (a job that cannot write it does nothing), then one end record: succeeded,
failed (with its error) or interrupted (SIGTERM/SIGINT). A search refused by option validation
(no purpose, conflicting options) does no work and writes no record. Tested in
tests/test_search.py and tests/test_audit.py; benchmarked by bench/scale.py.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import threading
import time
import uuid
from dataclasses import asdict, dataclass, field, replace
from typing import Literal

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import typer

from facelake import calibration, faults, progress, storage
from facelake.record import audit
from facelake.errors import ConfigError, FacelakeError, IndexVersionError
from facelake.faces.reader import DEFAULT_MAX_BYTES
from facelake.faces.registry import get_model, weights_fingerprint
from facelake.schema import (ERRORS_SCHEMA, FACE_COLUMNS, ID_TABLE_SCHEMA, RESULT_COLUMNS, RESULT_METADATA_FIELDS,
                             RESULT_METADATA_KEY, carried_columns)

log = logging.getLogger(__name__)

Mode = Literal["investigate", "identify"]
Executor = Literal["ray", "local"]
MODES = ("investigate", "identify")
EXECUTORS = ("ray", "local")

DEFAULT_TOP_K = 10
# The identification error rate thresholds are chosen for when none is given: one non-mated
# probe in a thousand returns a false candidate (the accountable systems' usual operating point).
DEFAULT_MAX_FPIR = 1e-3
# Probe faces per fan-out: large enough that faiss parallelises over queries and the per-batch
# cost of Ray Data, actor calls and a result file is amortised (4096 instead of 1024 cut the CPU
# per probe of the whole job by 12% at 1M faces), small enough that a batch's results (K rows
# each, rerank*K candidates while re-ranking) stay a few MB.
DEFAULT_BATCH_SIZE = 4096
# Search workers (Ray Data actors that fan batches out to the shard actors, merge, annotate and
# write): two keep the shard actors busy while one batch is merged and written.
SEARCH_WORKERS = 2
# CPU reservations: the shard actors do the heavy work; workers and the Parquet reads are light
# and must still get scheduled when the shard actors hold every CPU.
WORKER_CPUS = 0.25
READ_CPUS = 0.25
METADATA_KEY = RESULT_METADATA_KEY


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
    allow_extrapolation: bool = False  # identify mode: a fitted-tail threshold beyond the measured range
    address: str | None = None
    endpoint_url: str | None = None
    weights_from: str | None = None
    workers: int | None = None         # embed actors for a manifest of probes
    batch_size: int = DEFAULT_BATCH_SIZE
    executor: Executor = "ray"
    search_workers: int | None = None  # None: SEARCH_WORKERS
    progress: bool = False
    allowed_roots: tuple[str, ...] = ()  # probe photos are read only under these (facelake.faces.reader)
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
        if self.allow_extrapolation and (self.mode != "identify" or self.threshold is not None):
            raise ConfigError("--allow-extrapolation applies to --mode identify with --max-fpir (the threshold "
                              "chosen from a live-gallery calibration's fitted tail): drop it, or use identify mode "
                              "without --threshold")
        if self.top_k < 1:
            raise ConfigError(f"--top-k must be at least 1, got {self.top_k}")
        if self.nprobe is not None and self.nprobe < 1:
            raise ConfigError(f"--nprobe must be at least 1, got {self.nprobe}")
        if self.batch_size < 1:
            raise ConfigError(f"--batch-size must be at least 1, got {self.batch_size}")
        if self.workers is not None and self.workers < 1:
            raise ConfigError("--workers must be at least 1")
        if self.search_workers is not None and self.search_workers < 1:
            raise ConfigError("--search-workers must be at least 1")
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
    search_seconds: float = 0.0        # index loaded to last result written
    first_batch_seconds: float = 0.0   # of which until the first batch's results (start-up included)
    first_batch_faces: int = 0
    seconds: float = 0.0

    @property
    def queries_per_second(self) -> float:
        return self.searched_faces / self.search_seconds if self.search_seconds else 0.0

    @property
    def steady_queries_per_second(self) -> float:
        """Probe faces per second after the first batch (Ray Data and search workers started)."""
        rest = self.search_seconds - self.first_batch_seconds
        return (self.searched_faces - self.first_batch_faces) / rest if rest > 0 else 0.0

    def to_dict(self) -> dict:
        data = asdict(self)
        data["queries_per_second"] = round(self.queries_per_second, 1)
        data["steady_queries_per_second"] = round(self.steady_queries_per_second, 1)
        return data


def outputs(out: str) -> dict[str, str]:
    """The layout of a search's RESULTS folder (one source of truth)."""
    return {"results": storage.join(out, "results"), "errors": storage.join(out, "errors"),
            "probe_faces": storage.join(out, "probe_faces"), "summary": storage.join(out, "_search.json")}


# ------------------------------------------------------------------------------ the job

def run_search(config: SearchConfig) -> SearchSummary:
    """Search every probe face against ROOT's live index version; write RESULTS; audit the job.

    Fault point (facelake.faults): "search.after_batch", given the summary so far. Raises
    FacelakeError subclasses for problems the user can fix.
    """
    config.validate()
    options = storage.StorageOptions.from_env(config.endpoint_url)
    summary = SearchSummary(job_id=audit.new_job_id("search"), mode=config.mode)
    started = time.monotonic()
    # audit first: the "started" record is written before any result, or nothing runs
    with audit.Job(config.root, "search", options, job_id=summary.job_id,
                   details=_audit_record(config, summary)) as job:
        try:
            _search(config, options, summary)
            return summary
        except BaseException as err:
            _remove_partial_results(config.out, summary.job_id, options)
            if _is_ray_actor_death(err):
                raise SearchInterrupted(
                    f"a shard searcher died during search {summary.job_id} ({type(err).__name__}); no "
                    f"results were kept: rerun the search with a new --out") from err
            raise
        finally:
            summary.seconds = round(time.monotonic() - started, 3)
            job.details.update(_audit_record(config, summary))


class SearchInterrupted(FacelakeError):
    """A search lost a shard actor part-way; nothing partial is left behind."""


def _is_ray_actor_death(err: BaseException) -> bool:
    """True when ``err`` is a dead actor, also when Ray Data re-raises it from a search worker."""
    import ray.exceptions

    if isinstance(err, ray.exceptions.RayActorError):
        return True
    text = f"{type(err).__name__}: {err}"
    return any(marker in text for marker in ("RayActorError", "ActorDiedError", "ActorUnavailableError"))


def _remove_partial_results(out: str, job_id: str, options: storage.StorageOptions) -> None:
    """A failed search leaves no result part files: readers never see a partial candidate list."""
    for uri in storage.list_files(outputs(out)["results"], ".parquet", options):
        if job_id in uri.rsplit("/", 1)[-1]:
            storage.remove(uri, options=options)


def _search(config: SearchConfig, options: storage.StorageOptions, summary: SearchSummary) -> None:
    from facelake.index.load import open_version

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
    summary.gallery_carried = [c for c in handle.manifest.get("columns", []) if c not in ID_TABLE_SCHEMA.names]

    import ray

    from facelake.cluster import runtime

    started_here = not ray.is_initialized()
    kind = _probes_kind(config, options)
    if config.executor == "ray" or kind == "manifest":
        runtime.connect(config.address)   # before the embed job, so that it leaves Ray running
    actors: list = []
    try:
        embed_started = time.monotonic()
        probes = _probe_source(config, options, handle.model, summary, kind)
        summary.embed_seconds = round(time.monotonic() - embed_started, 3)
        _copy_errors(probes.errors, layout["errors"], summary, options)
        if summary.probe_faces:
            batch_spec = BatchSpec(handle=handle, k=config.top_k, nprobe=nprobe, cal=cal, threshold=summary.threshold,
                                   mode=config.mode, job_id=summary.job_id, folder=layout["results"], options=options,
                                   probe_carried=tuple(probes.carried), metadata=json.dumps(_metadata(summary)))
            if config.executor == "ray":
                from facelake.index.searchers import start_searchers

                # the dataset first: reading Parquet footers runs Ray tasks that want a whole CPU,
                # which the shard actors may hold once started
                dataset, names = _probe_dataset(config, probes, options)
                actors = start_searchers(handle)
                # Queued first on every shard actor, so no search runs on a shard before it is
                # answered; meanwhile Ray Data starts the search workers. The clock starts once
                # every shard is loaded (index loading, like Ray's start, is stated apart).
                loaded = [actor.ntotal.remote() for actor in actors]
                counts = StartedEarly(_ray_batches(config, dataset, names, batch_spec, actors))
                ray.get(loaded)
            else:
                counts = _local_batches(config, probes, batch_spec, options)
            _tally(counts, config, summary)
        storage.write_bytes_atomic(layout["summary"], json.dumps(
            {**summary.to_dict(), "purpose": config.purpose}, indent=2, default=str).encode(), options)
    finally:
        for actor in actors:
            ray.kill(actor)
        runtime.shutdown_if_local(started_here and config.address is None)


class StartedEarly:
    """Iterate ``rows`` until its first item in a thread from now on (a Ray Data pipeline then
    starts its workers while the caller waits for something else), then from the caller."""

    def __init__(self, rows) -> None:
        self._rows, self._first, self._error = iter(rows), [], None
        self._thread = threading.Thread(target=self._pull, name="facelake-search-start", daemon=True)
        self._thread.start()

    def _pull(self) -> None:
        try:
            self._first.append(next(self._rows))
        except StopIteration:
            pass
        except BaseException as err:   # raised again in the caller's thread
            self._error = err

    def __iter__(self):
        self._thread.join()
        if self._error is not None:
            raise self._error
        yield from self._first
        yield from self._rows


def _tally(counts, config: SearchConfig, summary: SearchSummary) -> None:
    """Add up the per-batch counts the search workers return (the driver sees nothing else)."""
    started = time.monotonic()
    with progress.tracker(summary.probe_faces, "search", config.progress, unit="probe faces") as bar:
        for row in counts:
            summary.searched_faces += row["faces"]
            summary.result_rows += row["rows"]
            summary.no_candidate_faces += row["no_candidate"]
            summary.search_seconds = round(time.monotonic() - started, 3)
            if not summary.first_batch_faces:
                summary.first_batch_seconds, summary.first_batch_faces = summary.search_seconds, row["faces"]
            bar.advance(row["faces"])
            faults.point("search.after_batch", summary)



# ------------------------------------------------------------------ threshold and calibration

def _calibration(config: SearchConfig, model: str, summary: SearchSummary):
    """The calibration for the index's model. Identify mode prefers the live-gallery calibration
    (`facelake calibrate`) serving this index version; a --calibration file of that kind must serve
    it or is refused. Otherwise the labeled-set one: in investigate mode a missing one only loses the
    estimated false-match rates (noted), in identify mode without --threshold it is an error."""
    if config.mode == "identify":
        live = _gallery_calibration(config, model, summary)
        if live is not None:
            summary.calibration = f"{live.describe()} ({live.source})"
            return live
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


def _gallery_calibration(config: SearchConfig, model: str, summary: SearchSummary):
    """The live-gallery calibration that serves the searched version, or None (then as before)."""
    where = dict(model=model, index_version=summary.index_version, gallery_size=summary.gallery_size)
    if config.calibration is not None:
        cal = calibration.load_any(config.calibration)
        if not isinstance(cal, calibration.GalleryCalibration):
            return None
        cal.check_applies(**where)
        return cal
    options = storage.StorageOptions.from_env(config.endpoint_url)
    return calibration.find_gallery(config.root, **where, options=options)


def _threshold(config: SearchConfig, cal, gallery_size: int) -> tuple[float | None, str]:
    """(threshold, how it was chosen). In investigate mode an uncertifiable threshold is None."""
    if config.threshold is not None:
        return float(config.threshold), "explicit --threshold"
    fpir = config.max_fpir or DEFAULT_MAX_FPIR
    where = "--max-fpir" if config.max_fpir is not None else "default max FPIR"
    if cal is None:
        return None, "none: no calibration for the model"
    if isinstance(cal, calibration.GalleryCalibration):
        return _live_threshold(config, cal, fpir, where, gallery_size)
    try:
        value = cal.threshold_for_fpir(fpir, gallery_size)
    except calibration.CalibrationError as err:
        if config.mode == "identify":
            raise
        return None, f"none: {err}"
    return value, (f"threshold_for_fpir({where} {fpir:g}, gallery of {gallery_size:,} faces) on the "
                   f"{cal.dataset} calibration (95% upper bound on FMR {calibration.fmr_for_fpir(fpir, gallery_size):.3g} "
                   f"per comparison)")


def _live_threshold(config: SearchConfig, cal, fpir: float, where: str, gallery_size: int) -> tuple[float, str]:
    """The threshold from a live-gallery calibration: measured when it certifies the target, else
    (only with --allow-extrapolation) from its fitted tail, labelled "extrapolated"."""
    grown = (f"; gallery grew from {cal.gallery_size:,} to {gallery_size:,} faces, target tightened to FPIR "
             f"{calibration.fpir_at_calibrated_size(fpir, gallery_size, cal.gallery_size):.3g} on the calibrated gallery"
             if gallery_size > cal.gallery_size else "")
    if config.nprobe and config.nprobe > cal.nprobe:
        grown += (f"; searched with --nprobe {config.nprobe}, above the calibration's {cal.nprobe}: more IVF lists "
                  f"can surface false candidates the calibration did not see")
    try:
        value = cal.threshold_for_fpir(fpir, gallery_size)
        return value, (f"measured: {where} {fpir:g} on the live-gallery calibration of index version "
                       f"{cal.index_version} ({cal.n_searches:,} non-mated searches; 95% Clopper-Pearson upper "
                       f"bound on FPIR {float(cal.fpir_upper(value)):.3g} at this threshold){grown}")
    except calibration.CalibrationError:
        if not config.allow_extrapolation:
            raise
    ext = cal.extrapolated_threshold(fpir, gallery_size)
    low, high = ext["fpir_interval"]
    return ext["threshold"], (f"EXTRAPOLATED (--allow-extrapolation): {where} {fpir:g} is beyond the "
                              f"{cal.n_searches:,} non-mated searches of the live-gallery calibration of index "
                              f"version {cal.index_version}; threshold from a generalised Pareto tail fitted above "
                              f"{ext['tail']['u']:.4f}: FPIR estimate {ext['fpir_estimate']:.3g}, "
                              f"{cal.confidence:.0%} interval [{low:.3g}, {high:.3g}]{grown}")


def _fmr(cal, D: np.ndarray) -> np.ndarray:
    if cal is None:
        return np.full(D.shape, np.nan)
    return np.asarray(cal.fmr_at(np.where(np.isfinite(D), D, np.nan)), np.float64)


# ------------------------------------------------------------------------------ probes

@dataclass(frozen=True)
class ProbeSource:
    """Where the probe faces are: part files of a faces table, the errors of their embedding, and
    the carried column names. Nothing here grows with the number of probes."""

    files: list[str]
    errors: list[str]
    carried: list[str]


def _probe_source(config: SearchConfig, options, model: str, summary: SearchSummary, kind: str) -> ProbeSource:
    if kind == "faces":
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


def _faces_probes(config, options, model, summary) -> ProbeSource:
    """A faces table of probes, checked file by file (one file in memory at a time)."""
    files = storage.list_files(config.probes, ".parquet", options)
    schema = _schema_of(config.probes, options)
    summary.probes_kind = "faces"
    missing = [c for c in ("image_id", "face_index", "bbox", "embedding", "model") if c not in schema.names]
    if missing:
        raise ConfigError(f"probe faces table {storage.redact(config.probes)} lacks column(s) {missing}: pass "
                          f"a manifest of images or the faces table `facelake embed` wrote")
    if schema.field("embedding").type != pa.list_(pa.float32(), get_model(model).dim):
        raise ConfigError(f"probe faces' embedding column is {schema.field('embedding').type}, not "
                          f"{get_model(model).dim} float32 values of model {model}")
    wanted = weights_fingerprint(get_model(model))
    digest = hashlib.sha256()
    for uri in files:
        digest.update(_file_sha256(uri, options).encode())
        table = _read_file(uri, [c for c in ("image_id", "model", "weights_sha256") if c in schema.names], options)
        models = pc.unique(table["model"]).to_pylist()
        if models and models != [model]:
            raise IndexVersionError(f"probe faces were embedded with model(s) {models} but index version "
                                    f"{summary.index_version} holds {model!r} faces: pass the probe images' manifest "
                                    f"instead (they are then embedded with {model!r}) or rebuild the index")
        if "weights_sha256" in table.column_names:
            other = [w for w in pc.unique(table["weights_sha256"]).to_pylist() if w != wanted]
            if other:
                raise IndexVersionError(f"probe faces were embedded with other {model} weights ({other[0][:12]}...): "
                                        f"re-embed them or pass the probe images' manifest")
        summary.probe_faces += table.num_rows
        summary.probe_images += pc.count_distinct(table["image_id"]).as_py()
    if not summary.probe_faces:
        raise ConfigError(f"probe faces table {storage.redact(config.probes)} is empty: nothing to search")
    summary.probes_sha256 = digest.hexdigest()
    return ProbeSource(files=files, errors=[], carried=carried_columns(schema))


def _file_sha256(uri: str, options) -> str:
    fs, path = storage.filesystem(uri, options)
    digest = hashlib.sha256()
    with fs.open(path, "rb") as handle:
        while chunk := handle.read(8 << 20):
            digest.update(chunk)
    return digest.hexdigest()


def _read_file(uri: str, columns: list[str] | None, options) -> pa.Table:
    return storage.read_file(uri, columns, options)


def _manifest_probes(config, options, model, summary) -> ProbeSource:
    """Probe photos embedded by the embed job (its workers write RESULTS/probe_faces/)."""
    from facelake.faces import manifest
    from facelake.jobs.embed import EmbedConfig
    from facelake.jobs.embed import outputs as embed_outputs
    from facelake.jobs.embed import run_embed

    info = manifest.validate(config.probes, options)
    summary.probes_kind, summary.probes_sha256, summary.probe_images = "manifest", info.fingerprint, info.rows
    work = outputs(config.out)["probe_faces"]
    _claim_probe_folder(work, info.fingerprint, options)
    run_embed(EmbedConfig(manifest=config.probes, out=work, model=model, address=config.address,
                          endpoint_url=config.endpoint_url, weights_from=config.weights_from,
                          workers=config.workers, progress=False,
                          allowed_roots=config.allowed_roots, max_bytes=config.max_bytes))
    layout = embed_outputs(work)
    files = storage.list_files(layout["faces"], ".parquet", options)
    errors = storage.list_files(layout["errors"], ".parquet", options)
    images_with_faces = 0
    for uri in files:   # an image's faces are in one part: distinct counts add up
        table = _read_file(uri, ["image_id"], options)
        summary.probe_faces += table.num_rows
        images_with_faces += pc.count_distinct(table["image_id"]).as_py()
    error_rows = sum(_rows_of(uri, options) for uri in errors)
    if images_with_faces + error_rows != info.rows:
        raise FacelakeError(f"the embed job left {info.rows - images_with_faces - error_rows} probe image(s) in "
                            f"neither its faces nor its errors table under {storage.redact(work)}: rerun the "
                            f"search with a new --out")
    return ProbeSource(files=files, errors=errors, carried=list(info.carried))


def _claim_probe_folder(work: str, fingerprint: str, options) -> None:
    """RESULTS/probe_faces/ holds the embedding of one probe manifest only: a rerun into the same
    --out resumes it; another manifest is refused rather than mixed in."""
    marker = storage.join(work, "_probes.json")
    try:
        claimed = json.loads(storage.read_bytes(marker, options)).get("sha256")
    except FileNotFoundError:
        storage.write_bytes_atomic(marker, json.dumps({"sha256": fingerprint}).encode(), options)
        return
    if claimed != fingerprint:
        raise ConfigError(f"{storage.redact(work)} holds the embedded faces of another probe manifest: give this "
                          f"search a new --out")


def _rows_of(uri: str, options) -> int:
    with storage.open_parquet(uri, options) as parquet:
        return parquet.metadata.num_rows


def _copy_errors(files: list[str], folder: str, summary: SearchSummary, options) -> None:
    """Probe images without a usable face, stamped with the job id, one part file at a time."""
    for number, uri in enumerate(files):
        errors = _read_file(uri, None, options)
        if not errors.num_rows:
            continue
        carried = [c for c in errors.column_names if c not in ERRORS_SCHEMA.names]
        table = errors.select(ERRORS_SCHEMA.names + carried).cast(
            pa.schema(list(ERRORS_SCHEMA) + [errors.schema.field(c) for c in carried]))
        table = table.add_column(0, "job_id", pa.array([summary.job_id] * table.num_rows, pa.string()))
        storage.write_table(storage.join(folder, f"part-{summary.job_id}-{number:05d}.parquet"), table, options)
        summary.probe_errors += table.num_rows


def _schema_of(uri: str, options) -> pa.Schema:
    files = storage.list_files(uri, ".parquet", options)
    if not files:
        raise FileNotFoundError(f"no Parquet files at {storage.redact(uri)}")
    with storage.open_parquet(files[0], options) as parquet:
        return parquet.schema_arrow


# ------------------------------------------------------------------------------ searching

@dataclass(frozen=True)
class BatchSpec:
    """Everything a search worker needs to turn a batch of probe faces into a result part file."""

    handle: object                    # facelake.index.load.VersionHandle
    k: int
    nprobe: int
    cal: object                       # calibration.Calibration | None
    threshold: float | None
    mode: str
    job_id: str
    folder: str
    options: storage.StorageOptions
    probe_carried: tuple[str, ...]
    metadata: str                     # JSON stored in every result file's schema metadata


class BatchSearch:
    """A search worker: a batch of probe faces -> shard fan-out -> merged top-k with the winners'
    gallery rows -> false-match rates -> one result part file. Returns only counts."""

    def __init__(self, spec: BatchSpec, actors: list | None = None) -> None:
        from facelake.index.search import CoarseQuantizer
        from facelake.index.searchers import LocalShardSearcher

        self.spec, self.actors = spec, actors
        every_shard = list(range(spec.handle.shard_count))
        self.searchers = None if actors else [LocalShardSearcher(spec.handle, every_shard)]
        # with several shards, each probe's lists are found once here rather than once per shard
        self.coarse = CoarseQuantizer(spec.handle) if spec.handle.shard_count > 1 else None
        self.token, self.parts = uuid.uuid4().hex[:8], 0

    def __call__(self, batch: pa.Table) -> pa.Table:
        from facelake.index.parts import embeddings
        from facelake.index.searchers import search_rows

        spec = self.spec
        D, I, rows = search_rows(spec.handle, embeddings(batch), spec.k, spec.nprobe, actors=self.actors,
                                 searchers=self.searchers, coarse=self.coarse)
        table, candidates, empty = result_table(spec, batch, D, I, rows, _fmr(spec.cal, D))
        name = f"part-{spec.job_id}-{self.token}-{self.parts:05d}.parquet"
        storage.write_table(storage.join(spec.folder, name), table, spec.options)
        self.parts += 1
        return pa.table({"faces": [batch.num_rows], "rows": [candidates], "no_candidate": [empty]})


def _probe_columns(probes: ProbeSource) -> list[str]:
    return ["image_id", "face_index", "bbox", "embedding"] + [c for c in _probe_carried(probes.carried)]


def _probe_carried(carried) -> list[str]:
    return [c for c in ["uri", *carried] if c not in FACE_COLUMNS or c == "uri"]


def _probe_dataset(config: SearchConfig, probes: ProbeSource, options):
    """The probe faces as a Ray Dataset (read lazily, in tasks of READ_CPUS), and its columns."""
    import ray

    context = ray.data.DataContext.get_current()
    context.enable_progress_bars = False     # facelake.progress counts probe faces instead
    context.use_datasource_v2 = False        # see jobs/embed.py: the V1 reader honours num_cpus
    names = set(_schema_of(probes.files[0], options).names)
    columns = [c for c in _probe_columns(probes) if c in names]
    arrow_fs, _ = storage.arrow_filesystem(probes.files[0], options)
    paths = [storage.filesystem(f, options)[1] for f in probes.files]
    return ray.data.read_parquet(paths, filesystem=arrow_fs, columns=columns, num_cpus=READ_CPUS), names


def _ray_batches(config: SearchConfig, dataset, names: set[str], spec: BatchSpec, actors: list):
    """Probe faces stream through a pool of search workers; yields their per-batch counts."""
    import ray

    workers = config.search_workers or SEARCH_WORKERS
    dataset = dataset.map_batches(
        BatchSearch, batch_size=config.batch_size, batch_format="pyarrow", num_cpus=WORKER_CPUS,
        compute=ray.data.ActorPoolStrategy(size=workers),
        fn_constructor_kwargs={"spec": replace(spec, probe_carried=tuple(c for c in spec.probe_carried
                                                                         if c in names)),
                               "actors": actors})
    for block in dataset.iter_batches(batch_size=None, batch_format="pyarrow"):
        yield from block.to_pylist()


def _local_batches(config: SearchConfig, probes: ProbeSource, spec: BatchSpec, options):
    """The same search workers' code in this process, one bounded batch at a time."""
    searcher = BatchSearch(spec)
    for uri in probes.files:
        names = set(_schema_of(uri, options).names)
        columns = [c for c in _probe_columns(probes) if c in names]
        for batch in storage.iter_batches(uri, columns=columns, batch_size=config.batch_size, options=options):
            yield searcher(pa.Table.from_batches([batch])).to_pylist()[0]


def result_table(spec: BatchSpec, probes: pa.Table, D: np.ndarray, I: np.ndarray, gallery_rows: pa.Table,
                 fmr: np.ndarray) -> tuple[pa.Table, int, int]:
    """Result rows of one batch (schema.RESULT_COLUMNS + probe_* + gallery_*), the number of
    candidate rows and of probe faces with no candidate (one row each, rank and gallery null)."""
    n, k = I.shape
    keep = I >= 0
    if spec.mode == "identify":
        keep &= D >= spec.threshold
    empty = ~keep.any(axis=1)
    positions = np.concatenate([np.flatnonzero(keep.reshape(-1)), np.full(int(empty.sum()), -1)])
    owners = np.concatenate([np.flatnonzero(keep.reshape(-1)) // k, np.flatnonzero(empty)])
    order = np.argsort(owners, kind="stable")
    positions, owners = positions[order], owners[order]
    none = positions < 0
    at = np.where(none, 0, positions)
    sims = D.reshape(-1)[at].astype(np.float32)
    rates = np.asarray(fmr, np.float64).reshape(-1)[at]
    gallery = gallery_rows.take(pa.array(at, pa.int64(), mask=none))
    probe = probes.take(pa.array(owners, pa.int64()))
    above = (pa.nulls(len(owners), pa.bool_()) if spec.threshold is None
             else pa.array(sims >= spec.threshold, mask=none))
    columns = {
        "job_id": pa.array([spec.job_id] * len(owners), pa.string()),
        "probe_image_id": probe["image_id"],
        "probe_face_index": probe["face_index"],
        "probe_bbox": probe["bbox"],
        "rank": pa.array((at % k + 1).astype(np.int32), pa.int32(), mask=none),
        "gallery_image_id": gallery["image_id"],
        "gallery_face_index": gallery["face_index"],
        "gallery_bbox": gallery["bbox"],
        "similarity": pa.array(sims, pa.float32(), mask=none),
        "est_false_match_rate": pa.array(rates, pa.float64(), mask=none | np.isnan(rates)),
        "above_threshold": above,
        "index_version": pa.array([spec.handle.version] * len(owners), pa.string()),
    }
    fields = list(RESULT_COLUMNS)
    for name in _probe_carried(spec.probe_carried):
        if name in probe.column_names:
            columns[f"probe_{name}"] = probe[name]
            fields.append(pa.field(f"probe_{name}", probe.schema.field(name).type))
    for name in gallery.column_names:
        if name not in ID_TABLE_SCHEMA.names:
            columns[f"gallery_{name}"] = gallery[name]
            fields.append(pa.field(f"gallery_{name}", gallery.schema.field(name).type))
    schema = pa.schema(fields, metadata={METADATA_KEY: spec.metadata.encode()})
    return pa.table(columns).cast(schema), int((~none).sum()), int(empty.sum())


def _metadata(summary: SearchSummary) -> dict:
    return {name: getattr(summary, name) for name in RESULT_METADATA_FIELDS}



# ------------------------------------------------------------------------------ audit

def _audit_record(config: SearchConfig, summary: SearchSummary) -> dict:
    """The details of a search's audit records (facelake.record.audit.Job adds job id, status, who and
    when): what was searched, why, how, into which --out. No secrets: URIs are redacted and no
    address, endpoint or credential is recorded."""
    return {
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
        "seconds": summary.seconds,
    }


def _same_place(a: str, b: str) -> bool:
    strip = lambda u: (u[len("file://"):] if u.startswith("file://") else u).rstrip("/")  # noqa: E731
    return strip(a) == strip(b)


# ------------------------------------------------------------------------------ demo

DEMO_PROBES = 5   # one photo each of the first identities of the sample


def demo_search(manifest_uri: str, root: str, out: str, *, top_k: int = 3) -> dict:
    """`facelake demo`'s last step: one photo per identity of the sample searched against the
    sample index; prints the top candidates per probe and returns what was made."""
    from facelake.faces.manifest import base_dir
    from facelake.faces.reader import resolve

    table = storage.read_table(manifest_uri)
    base = base_dir(manifest_uri)
    picks: dict[str, dict] = {}
    for row in sorted(table.to_pylist(), key=lambda r: r["image_id"]):
        identity = row.get("identity")
        if identity and identity not in picks and len(picks) < DEMO_PROBES:
            picks[identity] = {**row, "uri": resolve(row["uri"], base)}
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
        calibration_file: str = typer.Option(None, "--calibration", help="calibration.json from `facelake evaluate` or `facelake calibrate` (default: the live gallery's, else shipped)"),
        allow_extrapolation: bool = typer.Option(False, "--allow-extrapolation", help="identify mode: beyond the live-gallery calibration's measured range, choose the threshold from its fitted tail (labelled extrapolated)"),
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
            threshold=threshold, nprobe=nprobe, model=model, calibration=calibration_file,
            allow_extrapolation=allow_extrapolation, address=address,
            endpoint_url=endpoint_url, weights_from=weights_from, workers=workers, batch_size=batch_size,
            allowed_roots=tuple(allow_root), max_bytes=max_bytes, progress=progress.enabled()))
        print_summary(summary)
