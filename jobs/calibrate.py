"""`facelake calibrate`: FPIR measured on the live gallery by searching non-mated probes, audited.

    facelake calibrate --root ROOT NONMATED_MANIFEST --purpose TEXT [--identity-column COL]
                       [--top-k K] [--nprobe N] [--if-stale] [--work DIR] [--address ADDR]

NIST FRTE 1:N measures the false-positive identification rate (FPIR) directly: search probes of
people known not to be in the gallery (non-mated) against the operational gallery and count the
searches that return a candidate at or above each threshold. This job does that against ROOT's
live index version and writes a ``calibration.GalleryCalibration`` (FPIR vs threshold, counts, the
exact one-sided 95% Clopper-Pearson bound; tied to the model, weights fingerprint, index version
and gallery size) to ROOT/calibration/<version>--<job id>.gallery-calibration.json. Identify-mode
searches then choose their threshold from it (``facelake.calibration.thresholds.choose_calibration``).

1. NONMATED_MANIFEST is a manifest of images (embedded with the live version's model by
   ``run_embed`` into a work folder, ROOT/_calibrate/<manifest fingerprint>/ by default, so a rerun
   resumes) or a faces table `facelake embed` wrote (told apart by its ``embedding`` column).
2. Each probe face is one search of the top ``--top-k`` candidates over the shard actors
   (``index.searchers.start_searchers`` / ``search_version``), like `facelake search`. When probes
   and gallery both carry ``--identity-column`` (default ``identity``), candidates of the probe's
   own identity are skipped (they are mated, not false); a search whose whole top-k is its own
   identity keeps its k-th score, an upper bound on its highest non-mated score.
3. ``--if-stale`` does nothing (audited as "skipped") when a calibration already serves the live
   version: measured on it, or on one whose gallery is within ``calibration.GALLERY_MARGIN``. The
   nightly schedule runs it after every rebuild, so it recalibrates only when the gallery grew
   past the margin.

Audit: one record of kind "calibrate" in ROOT/audit/ with the purpose, also when the job fails.
Tested in tests/test_calibrate.py (sample photos, identity exclusion, refusals) and
tests/test_calibrate_1m.py (1M-face gallery, slow).
"""

from __future__ import annotations

import logging
import time
from dataclasses import asdict, dataclass, field

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import typer

from facelake import calibration, storage
from facelake.calibration.gallery import nonmated_max, same_identity
from facelake.record import audit
from facelake.errors import ConfigError, FacelakeError, IndexVersionError
from facelake.faces.registry import get_model, weights_fingerprint

log = logging.getLogger(__name__)

# Candidates looked at per search: enough that a few gallery faces of the probe's own identity
# (excluded) still leave non-mated candidates to score; a search whose whole top-k is mated keeps
# its k-th score (conservative).
DEFAULT_TOP_K = 20
DEFAULT_IDENTITY_COLUMN = "identity"
DEFAULT_BATCH_SIZE = 1024
# Below this many searches even zero false positives certify less than FPIR 1e-2; refuse.
MIN_SEARCHES = 300


@dataclass(frozen=True)
class CalibrateConfig:
    """Options of one calibrate job; ``validate`` checks them before storage or Ray is touched."""

    probes: str
    root: str
    purpose: str | None
    identity_column: str | None = None   # None: DEFAULT_IDENTITY_COLUMN where both sides carry it
    top_k: int = DEFAULT_TOP_K
    nprobe: int | None = None             # None: the version's default nprobe (what search uses)
    work: str | None = None               # None: ROOT/_calibrate/<manifest fingerprint>
    if_stale: bool = False
    min_searches: int = MIN_SEARCHES
    address: str | None = None
    endpoint_url: str | None = None
    weights_from: str | None = None
    workers: int | None = None
    batch_size: int = DEFAULT_BATCH_SIZE

    def validate(self) -> None:
        if self.purpose is None or not str(self.purpose).strip():
            raise ConfigError("--purpose is required: say why this calibration is run (e.g. 'nightly "
                              "recalibration after rebuild'); it is written to the audit log")
        if self.top_k < 1:
            raise ConfigError(f"--top-k must be at least 1, got {self.top_k}")
        if self.nprobe is not None and self.nprobe < 1:
            raise ConfigError(f"--nprobe must be at least 1, got {self.nprobe}")
        if self.batch_size < 1:
            raise ConfigError(f"--batch-size must be at least 1, got {self.batch_size}")
        if self.min_searches < 1:
            raise ConfigError("min_searches must be at least 1")
        if self.workers is not None and self.workers < 1:
            raise ConfigError("--workers must be at least 1")
        if self.identity_column is not None and not self.identity_column.strip():
            raise ConfigError("--identity-column must name a column (e.g. identity)")
        for uri in (self.probes, self.root) + ((self.work,) if self.work else ()):
            storage.check_uri(uri)


@dataclass
class CalibrateSummary:
    """What a calibrate job did; also the core of its audit record."""

    job_id: str
    index_version: str | None = None
    model: str | None = None
    gallery_size: int = 0
    probes_kind: str = ""
    probes_sha256: str | None = None
    probe_images: int = 0
    probe_errors: int = 0
    searches: int = 0
    excluded_same_identity: int = 0
    saturated: int = 0
    identity_column: str | None = None
    calibration_file: str | None = None
    skipped: str | None = None            # --if-stale: why nothing was done
    certified: list = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    seconds: float = 0.0

    def to_dict(self) -> dict:
        return asdict(self)


# ------------------------------------------------------------------------------ the job

def run_calibrate(config: CalibrateConfig) -> CalibrateSummary:
    """Search non-mated probes against ROOT's live version; write its GalleryCalibration; audit."""
    config.validate()
    options = storage.StorageOptions.from_env(config.endpoint_url)
    summary = CalibrateSummary(job_id=audit.new_job_id("calibrate"))
    started = time.monotonic()
    # audited like every job on a root: "started" first, then one end record with the one status
    with audit.Job(config.root, "calibrate", options, job_id=summary.job_id,
                   details=_audit_record(config, summary)) as job:
        try:
            _calibrate(config, options, summary)
            if summary.skipped:
                job.end_status = "skipped"
            return summary
        finally:
            summary.seconds = round(time.monotonic() - started, 3)
            job.details.update(_audit_record(config, summary))


def _calibrate(config: CalibrateConfig, options, summary: CalibrateSummary) -> None:
    from facelake.index.load import open_version

    handle = open_version(config.root, options=options)
    spec = get_model(handle.model)
    if handle.manifest.get("weights_sha256") not in (None, weights_fingerprint(spec)):
        raise IndexVersionError(f"index version {handle.version} was built with other {spec.name} weights than "
                                f"this facelake's: re-embed and rebuild before calibrating")
    summary.index_version, summary.model, summary.gallery_size = handle.version, spec.name, handle.total
    nprobe = config.nprobe or handle.nprobe
    if nprobe > handle.nlist:
        raise ConfigError(f"--nprobe {nprobe} exceeds nlist {handle.nlist} of index version {handle.version}")
    if config.if_stale:
        current = calibration.find_gallery(config.root, model=spec, index_version=handle.version,
                                           gallery_size=handle.total, options=options)
        if current is not None:
            summary.skipped = f"calibration {current.source} already serves it ({current.describe()})"
            return

    import ray

    from facelake.cluster import runtime

    started_here = not ray.is_initialized()
    runtime.connect(config.address)
    try:
        faces = _probe_faces(config, options, spec.name, summary)
        gallery_ids = _gallery_identities(handle, config, faces, summary, options)
        scores = _search_scores(config, handle, nprobe, faces, gallery_ids, summary)
    finally:
        runtime.shutdown_if_local(started_here and config.address is None)
    cal = calibration.GalleryCalibration(
        model=spec.name, recognizer=spec.recognizer, detector=spec.detector, weights_sha256=weights_fingerprint(spec),
        index_version=handle.version, gallery_size=handle.total, nprobe=nprobe, top_k=config.top_k,
        scores=np.sort(scores)[::-1], identity_column=summary.identity_column,
        excluded_same_identity=summary.excluded_same_identity, saturated=summary.saturated,
        probes={"uri": storage.redact(config.probes), "kind": summary.probes_kind, "sha256": summary.probes_sha256,
                "images": summary.probe_images, "errors": summary.probe_errors},
        job_id=summary.job_id, notes=list(summary.notes))
    summary.calibration_file = storage.redact(calibration.save_gallery(cal, config.root, options))
    summary.certified = cal.table()


# ------------------------------------------------------------------------------ probes

def _is_faces_table(uri: str, options) -> bool:
    files = storage.list_files(uri, ".parquet", options)
    if not files:
        raise ConfigError(f"no non-mated probes at {storage.redact(uri)}: give a Parquet manifest of images "
                          f"(image_id, uri) of people not in the gallery, or a faces table `facelake embed` wrote")
    with storage.open_parquet(files[0], options) as parquet:
        return "embedding" in parquet.schema_arrow.names


def _probe_faces(config: CalibrateConfig, options, model: str, summary: CalibrateSummary) -> pa.Table:
    """The probe faces (embedded with the version's model), sorted by image and face."""
    if _is_faces_table(config.probes, options):
        faces = storage.read_table(config.probes, options=options)
        summary.probes_kind = "faces"
        _check_faces(faces, model, config.probes)
        summary.probe_images = len(pc.unique(faces["image_id"]))
        summary.probes_sha256 = _faces_sha256(faces)
    else:
        faces = _embed_manifest(config, options, model, summary)
    return faces.sort_by([("image_id", "ascending"), ("face_index", "ascending")])


def _check_faces(faces: pa.Table, model: str, uri: str) -> None:
    missing = [c for c in ("image_id", "face_index", "embedding", "model") if c not in faces.column_names]
    if missing:
        raise ConfigError(f"probe faces table {storage.redact(uri)} lacks column(s) {missing}: pass a manifest "
                          f"of images or the faces table `facelake embed` wrote")
    models = pc.unique(faces["model"]).to_pylist()
    if models != [model]:
        raise IndexVersionError(f"probe faces were embedded with model(s) {models} but the live index holds "
                                f"{model!r} faces: pass the probe images' manifest instead")
    if "weights_sha256" in faces.column_names:
        other = [w for w in pc.unique(faces["weights_sha256"]).to_pylist() if w != weights_fingerprint(get_model(model))]
        if other:
            raise IndexVersionError(f"probe faces were embedded with other {model} weights ({str(other[0])[:12]}...): "
                                    f"re-embed them or pass the probe images' manifest")


def _faces_sha256(faces: pa.Table) -> str:
    import hashlib

    digest = hashlib.sha256()
    for batch in faces.select(["image_id", "face_index", "embedding"]).to_batches(65536):
        digest.update("\0".join(batch.column(0).to_pylist()).encode())
        digest.update(np.asarray(batch.column(2).flatten().to_numpy(zero_copy_only=False), np.float32).tobytes())
    return digest.hexdigest()


def _embed_manifest(config: CalibrateConfig, options, model: str, summary: CalibrateSummary) -> pa.Table:
    from facelake.faces import manifest
    from facelake.jobs.embed import EmbedConfig, run_embed
    from facelake.jobs.embed import outputs as embed_outputs

    info = manifest.validate(config.probes, options)
    summary.probes_kind, summary.probes_sha256, summary.probe_images = "manifest", info.fingerprint, info.rows
    work = config.work or storage.join(config.root, "_calibrate", info.fingerprint[:16])
    run_embed(EmbedConfig(manifest=config.probes, out=work, model=model, address=config.address,
                          endpoint_url=config.endpoint_url, weights_from=config.weights_from,
                          workers=config.workers, progress=False))
    layout = embed_outputs(work)
    wanted = pa.array(storage.read_table(config.probes, columns=["image_id"], options=options)["image_id"].to_pylist(),
                      pa.string())
    if storage.list_files(layout["errors"], ".parquet", options):
        errors = storage.read_table(layout["errors"], columns=["image_id"], options=options)
        summary.probe_errors = int(pc.sum(pc.is_in(errors["image_id"], value_set=wanted)).as_py() or 0)
    if not storage.list_files(layout["faces"], ".parquet", options):
        raise FacelakeError(f"no usable face in any of the {info.rows} non-mated probe image(s); see "
                            f"{storage.redact(layout['errors'])}")
    faces = storage.read_table(layout["faces"], options=options)
    return faces.filter(pc.is_in(faces["image_id"], value_set=wanted))


# ------------------------------------------------------------------------------ identities

def _gallery_identities(handle, config: CalibrateConfig, faces: pa.Table, summary: CalibrateSummary,
                        options) -> np.ndarray | None:
    """The identity of every gallery face, indexed by faiss id (None when exclusion is impossible)."""
    from facelake.index.load import load_ids

    column = config.identity_column or DEFAULT_IDENTITY_COLUMN
    if column not in faces.column_names:
        if config.identity_column:
            raise ConfigError(f"the non-mated probes carry no column {column!r}: name the probes' identity column "
                              f"with --identity-column, or leave it out if the probes are known absent from the gallery")
        summary.notes.append(f"probes carry no {column!r} column: no gallery face is excluded (every candidate "
                             f"counts as non-mated, the conservative reading)")
        return None
    ids = load_ids(handle).sort_by("faiss_id")
    if column in ids.column_names:
        values = ids[column]
    else:
        values = _identities_from_source(handle, ids, column, options)
    if values is None:
        summary.notes.append(f"the gallery (index version {handle.version}) carries no {column!r} column: no "
                             f"gallery face is excluded, so a probe whose person IS in the gallery counts as a "
                             f"false positive (conservative); make sure the probes are non-mated")
        return None
    summary.identity_column = column
    # indexed by faiss id, not by row: ids have gaps (erased faces; versions extended by rebuild keep
    # the ids of unchanged shards and number new faces after the highest)
    faiss_ids = ids["faiss_id"].to_numpy()
    by_id = np.full(int(faiss_ids.max()) + 1 if len(faiss_ids) else 0, None, dtype=object)
    by_id[faiss_ids] = np.asarray(pc.cast(values, pa.string()).to_pylist(), dtype=object)
    return by_id


def _identities_from_source(handle, ids: pa.Table, column: str, options) -> pa.ChunkedArray | None:
    """The column from the faces table the version was built from, joined to faiss id order."""
    source = handle.manifest.get("source")
    if not source or source.startswith("<") or "***" in source:
        return None
    try:
        table = storage.read_table(source, columns=["image_id", "face_index", column], options=options)
    except Exception:       # no such column, or the source is gone: no exclusion (noted by the caller)
        return None
    table = table.select(["image_id", "face_index", column]).cast(pa.schema(
        [pa.field("image_id", pa.string()), pa.field("face_index", pa.int32()), pa.field(column, pa.string())]))
    joined = ids.select(["faiss_id", "image_id", "face_index"]).join(
        table, keys=["image_id", "face_index"], join_type="left outer").sort_by("faiss_id")
    return joined[column] if joined.num_rows == ids.num_rows else None


# ------------------------------------------------------------------------------ searching

def _search_scores(config: CalibrateConfig, handle, nprobe: int, faces: pa.Table, gallery_ids: np.ndarray | None,
                   summary: CalibrateSummary) -> np.ndarray:
    """Highest non-mated similarity of every probe face's search."""
    import ray

    from facelake.index import searchers
    from facelake.index.parts import embeddings

    if faces.num_rows < config.min_searches:
        raise ConfigError(
            f"{faces.num_rows} non-mated probe face(s) are too few to calibrate: {config.min_searches} is the least "
            f"(3,000 without a false candidate certify FPIR 1e-3); add photos of people not in the gallery")
    probe_ids = (np.asarray(pc.cast(faces[summary.identity_column], pa.string()).to_pylist(), dtype=object)
                 if gallery_ids is not None else None)
    k = min(config.top_k, handle.total)
    actors = searchers.start_searchers(handle)
    try:
        out = []
        for start in range(0, faces.num_rows, config.batch_size):
            batch = faces.slice(start, config.batch_size)
            D, I = searchers.search_version(handle, embeddings(batch), k, nprobe, actors)
            same = None if probe_ids is None else same_identity(I, gallery_ids, probe_ids[start:start + len(I)])
            scores, excluded, saturated = nonmated_max(D, I, same)
            summary.excluded_same_identity += excluded
            summary.saturated += saturated
            out.append(scores)
    finally:
        for actor in actors:
            ray.kill(actor)
    summary.searches = faces.num_rows
    return np.concatenate(out)


# ------------------------------------------------------------------------------ audit and CLI

def _audit_record(config: CalibrateConfig, summary: CalibrateSummary) -> dict:
    """The audit record's details (facelake.record.audit.Job adds job id, status, who and when): why,
    against which version, with what probes and outcome. No secrets."""
    return {
        "purpose": (config.purpose or "").strip(),
        "index_version": summary.index_version, "model": summary.model, "gallery_size": summary.gallery_size,
        "calibration_file": summary.calibration_file, "skipped": summary.skipped,
        "parameters": {"top_k": config.top_k, "nprobe": config.nprobe, "identity_column": config.identity_column,
                       "if_stale": config.if_stale, "margin": calibration.GALLERY_MARGIN},
        "probes": {"uri": storage.redact(config.probes), "kind": summary.probes_kind, "sha256": summary.probes_sha256},
        "counts": {"images": summary.probe_images, "images_without_face": summary.probe_errors,
                   "searches": summary.searches, "excluded_same_identity": summary.excluded_same_identity,
                   "saturated": summary.saturated},
        "certified": summary.certified, "notes": summary.notes, "seconds": summary.seconds,
    }


def print_summary(summary: CalibrateSummary) -> None:
    if summary.skipped:
        typer.echo(f"calibrate {summary.job_id}: nothing to do for index version {summary.index_version}: "
                   f"{summary.skipped}")
        return
    typer.echo(f"calibrate {summary.job_id} on index version {summary.index_version} ({summary.gallery_size:,} "
               f"faces, {summary.model}): {summary.searches:,} non-mated searches, {summary.probe_errors} probe "
               f"image(s) without a usable face, {summary.excluded_same_identity} same-identity candidate(s) "
               f"excluded; wrote {summary.calibration_file}")
    for row in summary.certified:
        if row.get("threshold") is None:
            typer.echo(f"  FPIR {row['target_fpir']:g}: not certified ({row['note']})")
        else:
            typer.echo(f"  FPIR {row['target_fpir']:g}: threshold {row['threshold']:.4f} (measured "
                       f"{row['fpir']:.2g}, 95% upper bound {row['fpir_upper95']:.2g})")
    for note in summary.notes:
        typer.echo(f"  note: {note}")


def register(app: typer.Typer) -> None:
    @app.command("calibrate")
    def calibrate_command(
        probes: str = typer.Argument(..., metavar="NONMATED_MANIFEST", help="manifest (image_id, uri) or faces table of people NOT in the gallery"),
        root: str = typer.Option(..., "--root", help="root holding the live index version; the calibration is written under ROOT/calibration/"),
        purpose: str = typer.Option(..., "--purpose", help="why this calibration is run (audited)"),
        identity_column: str = typer.Option(None, "--identity-column", help=f"column naming the person on both probes and gallery (default {DEFAULT_IDENTITY_COLUMN!r} where both carry it); same-identity candidates are excluded"),
        top_k: int = typer.Option(DEFAULT_TOP_K, "--top-k", help="candidates looked at per search"),
        nprobe: int = typer.Option(None, "--nprobe", help="IVF lists scanned per shard (default: the version's, as search uses)"),
        if_stale: bool = typer.Option(False, "--if-stale", help="do nothing when a calibration already serves the live version (within the gallery size margin)"),
        work: str = typer.Option(None, "--work", help="folder for the probes' embeddings (default ROOT/_calibrate/<manifest fingerprint>)"),
        address: str = typer.Option(None, "--address", help="Ray cluster to join (auto, ray://host:port); default: a local Ray"),
        endpoint_url: str = typer.Option(None, "--endpoint-url", help="S3-compatible endpoint (credentials come from the AWS chain)"),
        weights_from: str = typer.Option(None, "--weights-from", help="folder or s3:// prefix with the weight files"),
        workers: int = typer.Option(None, "--workers", help="embed actors for a manifest of probes"),
    ) -> None:
        """Measure FPIR vs threshold on the live gallery with non-mated probes; identify mode then uses it."""
        summary = run_calibrate(CalibrateConfig(
            probes=probes, root=root, purpose=purpose, identity_column=identity_column, top_k=top_k, nprobe=nprobe,
            if_stale=if_stale, work=work, address=address, endpoint_url=endpoint_url,
            weights_from=weights_from, workers=workers))
        print_summary(summary)
