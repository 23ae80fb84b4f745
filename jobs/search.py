"""`facelake search`: bulk one-to-many search of probe photos against a root's live index, audited.

    facelake search PROBES --root ROOT --out RESULTS --purpose TEXT
                    [--mode investigate|identify] [--top-k K] [--max-fpir F | --threshold S]
                    [--nprobe N] [--address ADDR] [--endpoint-url URL]

1. PROBES is a manifest of images (image_id, uri, carried columns), embedded with the live index
   version's model by the embed job into RESULTS/probe_faces/, or a faces table `facelake embed`
   wrote (told apart by its ``embedding`` column); faces of another model are refused
   (facelake.jobs.work.probes).
2. Probe faces stream as a Ray Dataset from their Parquet part files to a pool of search
   workers that fan each batch out to the shard actors (``index.searchers.start_searchers``: one per
   group of shards, at least one per node, spread over nodes with a memory request from the
   shards' size), merge their top-k lists with the winners' id-table rows into a global top-k,
   annotate false-match rates and write the batch's result part file themselves
   (facelake.jobs.work.search_batches; the rows are built by facelake.results). The driver sees
   per-batch counts only, so its memory grows with neither the gallery nor the probes.
   ``executor="local"`` runs the same worker code in this process (notebooks, benchmarks).
3. Modes (the threshold policy is facelake.calibration.thresholds). investigate (default): the top-K
   candidates of every probe face, each with its similarity and the estimated false-match rate at
   that similarity (``Calibration.fmr_at``, a 95% upper bound); nothing is called a match, but
   ``above_threshold`` still says where a candidate stands against the identify threshold.
   identify: only candidates at or above a threshold chosen for a false-positive identification
   rate (``--max-fpir``, default 1e-3) at the real gallery size (``Calibration.threshold_for_fpir``,
   or a live-gallery calibration of `facelake calibrate`), or ``--threshold`` given explicitly.
   The threshold and how it was chosen go to the results' metadata, the summary and the audit record.

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

import json
import math
import time
from dataclasses import asdict, dataclass, field
from typing import Literal

import typer

from facelake import faults, progress, storage
from facelake.errors import ConfigError, FacelakeError, IndexVersionError
from facelake.faces import manifest
from facelake.faces.reader import DEFAULT_MAX_BYTES
from facelake.faces.registry import get_model, weights_fingerprint
from facelake.jobs.embed import EmbedConfig, run_embed
from facelake.jobs.embed import outputs as embed_outputs
from facelake.jobs.work import probes as probe_intake
from facelake.jobs.work.search_batches import BatchSpec, local_batches, search_on_ray
from facelake.record import audit
from facelake.results import ResultSpec, result_metadata
from facelake.schema import ID_TABLE_SCHEMA, RESULT_METADATA_KEY
from facelake.calibration.thresholds import DEFAULT_MAX_FPIR, ThresholdOptions, choose_calibration, choose_threshold

Mode = Literal["investigate", "identify"]
Executor = Literal["ray", "local"]
MODES = ("investigate", "identify")
EXECUTORS = ("ray", "local")

DEFAULT_TOP_K = 10
# Probe faces per fan-out: large enough that faiss parallelises over queries and the per-batch
# cost of Ray Data, actor calls and a result file is amortised (4096 instead of 1024 cut the CPU
# per probe of the whole job by 12% at 1M faces), small enough that a batch's results (K rows
# each, rerank*K candidates while re-ranking) stay a few MB.
DEFAULT_BATCH_SIZE = 4096
# the key of the results' schema metadata (the JSON of schema.RESULT_METADATA_FIELDS)
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
    search_workers: int | None = None  # None: search_batches.SEARCH_WORKERS
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

    def threshold_options(self) -> ThresholdOptions:
        """The options that choose the calibration and the threshold (facelake.calibration.thresholds)."""
        return ThresholdOptions(mode=self.mode, threshold=self.threshold, max_fpir=self.max_fpir, nprobe=self.nprobe,
                                calibration_file=self.calibration, allow_extrapolation=self.allow_extrapolation)


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
    """Open the live version, choose the threshold, take in the probes, search them, write the summary."""
    layout = outputs(config.out)
    handle, nprobe = _open_index(config, layout, options, summary)
    policy = config.threshold_options()
    chosen = choose_calibration(policy, root=config.root, model=summary.model, index_version=handle.version,
                                gallery_size=handle.total, storage_options=options)
    summary.calibration = chosen.described
    if chosen.note:
        summary.notes.append(chosen.note)
    summary.threshold, summary.threshold_how = choose_threshold(policy, chosen.calibration, handle.total)
    summary.gallery_carried = [c for c in handle.manifest.get("columns", []) if c not in ID_TABLE_SCHEMA.names]

    import ray

    from facelake.cluster import runtime

    started_here = not ray.is_initialized()
    kind = probe_intake.probes_kind(config.probes, options)
    if config.executor == "ray" or kind == probe_intake.MANIFEST:
        runtime.connect(config.address)   # before the embed job, so that it leaves Ray running
    actors: list = []
    try:
        embed_started = time.monotonic()
        probes = _take_in_probes(config, options, handle, summary, kind)
        summary.embed_seconds = round(time.monotonic() - embed_started, 3)
        summary.probe_errors += probe_intake.copy_errors(probes.errors, layout["errors"], summary.job_id, options)
        if summary.probe_faces:
            result = ResultSpec(job_id=summary.job_id, index_version=handle.version, mode=config.mode,
                                threshold=summary.threshold, probe_carried=tuple(probes.carried),
                                metadata=result_metadata(summary))
            spec = BatchSpec(handle=handle, k=config.top_k, nprobe=nprobe, cal=chosen.calibration,
                             folder=layout["results"], options=options, result=result)
            if config.executor == "ray":
                counts = search_on_ray(probes, spec, actors, batch_size=config.batch_size,
                                       workers=config.search_workers, options=options)
            else:
                counts = local_batches(probes, spec, batch_size=config.batch_size, options=options)
            _tally(counts, config, summary)
        storage.write_bytes_atomic(layout["summary"], json.dumps(
            {**summary.to_dict(), "purpose": config.purpose}, indent=2, default=str).encode(), options)
    finally:
        for actor in actors:
            ray.kill(actor)
        runtime.shutdown_if_local(started_here and config.address is None)


def _open_index(config: SearchConfig, layout: dict[str, str], options: storage.StorageOptions,
                summary: SearchSummary) -> tuple[object, int]:
    """The live index version (facelake.index.load.VersionHandle), checked against the options,
    and the nprobe to search it with."""
    from facelake.index.load import open_version

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
    return handle, nprobe


def _take_in_probes(config: SearchConfig, options: storage.StorageOptions, handle, summary: SearchSummary,
                    kind: str) -> probe_intake.ProbeSource:
    """The probe faces (a faces table as it is, a manifest embedded first), counted into the summary."""
    summary.probes_kind = kind
    if kind == probe_intake.FACES:
        probes = probe_intake.faces_probes(config.probes, options, handle.model, handle.version)
    else:
        probes = _embed_probes(config, options, handle.model, summary)
    summary.probes_sha256, summary.probe_images, summary.probe_faces = probes.sha256, probes.images, probes.faces
    return probes


def _embed_probes(config: SearchConfig, options: storage.StorageOptions, model: str,
                  summary: SearchSummary) -> probe_intake.ProbeSource:
    """A manifest of probe photos embedded by the embed job into RESULTS/probe_faces/. The embed
    job is a command (facelake.jobs.embed), which jobs/work may not import: it runs from here,
    and jobs/work/probes claims its folder and reads back what it wrote."""
    info = manifest.validate(config.probes, options)
    # recorded before the embedding, so that the audit record names the probes should it fail
    summary.probes_sha256, summary.probe_images = info.fingerprint, info.rows
    work = outputs(config.out)["probe_faces"]
    probe_intake.claim_probe_folder(work, info.fingerprint, options)
    run_embed(EmbedConfig(manifest=config.probes, out=work, model=model, address=config.address,
                          endpoint_url=config.endpoint_url, weights_from=config.weights_from,
                          workers=config.workers, progress=False,
                          allowed_roots=config.allowed_roots, max_bytes=config.max_bytes))
    layout = embed_outputs(work)
    return probe_intake.embedded_probes(work, layout["faces"], layout["errors"], info, options)


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


# ------------------------------------------------------------------------------ CLI

def print_summary(summary: SearchSummary) -> None:
    """The summary of a search, as `facelake search` prints it."""
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
        purpose: str = typer.Option(..., "--purpose", help="why this search is run, a case or request reference (audited)"),
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
