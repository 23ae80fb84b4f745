"""`facelake rebuild`: bring ROOT's tables of record and live index up to date with a manifest.

One run, audited (facelake.record.audit.Job) and under ROOT's lock (facelake.record.lock):

1. Plan (jobs/work/changes.py): compare the manifest with the images of record and the erasure
   list: new, changed, removed and erased photos, those touched but unchanged (only their stat is
   recorded anew) and those unreadable now (kept, "unverified"). Decided from the source stat,
   the photo's bytes hashed only where the stat cannot tell (``--verify-content``: always); in
   the driver up to changes.DRIVER_ROWS rows, else in Ray tasks. The --allow-root values are
   remembered in ROOT for later runs (jobs/work/photos.py). ``--full`` re-embeds everything and
   retrains.
2. Embed the new and changed photos with facelake embed's ``run_embed`` into
   ROOT/staging/<run>/. A killed run's staging is reused by the next run (run_embed skips the
   image ids already there), so nothing is embedded twice.
3. Write a new table version of record (facelake.record.tables) and point ROOT/TABLE at it: the parts
   holding a dropped id rewritten, the staged parts and re-stated rows recorded with their stat,
   each part by its own unit, in Ray tasks past changes.DRIVER_ROWS rows (jobs/work/units.py): no
   embedding of the change passes through this process.
4. Publish an index version of the faces of record (facelake.index.publish): the live version
   extended while its trained quantizer still fits the collection, else retrained and every
   shard built.

A crash before 3 leaves the previous table and version live; between 3 and 4 the table of
record is new and the old version live, and the next run publishes; a run that finds the table
unchanged and CURRENT naming its index does nothing and says so.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import time
from dataclasses import asdict, dataclass, field
from typing import Iterator

import pyarrow as pa
import pyarrow.compute as pc
import typer

from facelake import faults, storage
from facelake.errors import ConfigError
from facelake.faces import manifest, reader
from facelake.faces.registry import ModelSpec, get_model, weights_fingerprint
from facelake.index import layout
from facelake.jobs.embed import EmbedConfig, done_image_ids, run_embed
from facelake.jobs.work import changes, counts, photos, staging, units
from facelake.record import audit
from facelake.record import erasures as erasure_list
from facelake.record import tables as rootmod
from facelake.record.lock import DEFAULT_TTL_S, RootLock
from facelake.storage import StorageOptions

log = logging.getLogger(__name__)

DEFAULT_KEEP = 3


@dataclass(frozen=True)
class RebuildConfig:
    """Options of one rebuild; ``validate`` checks them before storage or Ray is touched."""

    manifest: str
    root: str
    address: str | None = None
    full: bool = False
    endpoint_url: str | None = None
    keep: int = DEFAULT_KEEP
    model: str | None = None
    batch_size: int = 16
    workers: int | None = None
    weights_from: str | None = None
    lock_ttl_s: float = DEFAULT_TTL_S
    progress: bool = True
    allowed_roots: tuple[str, ...] = ()  # empty: the roots ROOT remembers (ROOT/ALLOWED_ROOTS)
    max_bytes: int = reader.DEFAULT_MAX_BYTES
    verify_content: bool = False       # hash every photo of record (not only those the stat cannot clear)
    shard_size: int | None = None      # faces per index shard (default facelake.index.parts.DEFAULT_SHARD_SIZE)

    def validate(self) -> ModelSpec:
        """Check every option; returns the model's spec."""
        spec = get_model(self.model)
        storage.check_uri(self.manifest)
        storage.check_uri(self.root)
        reader.ReadLimits(self.allowed_roots, self.max_bytes).validate()
        if self.keep < 1:
            raise ConfigError(f"--keep must be at least 1 (the live version is always kept), got {self.keep}")
        if self.batch_size < 1 or (self.workers is not None and self.workers < 1):
            raise ConfigError("--batch-size and --workers must be at least 1")
        if self.lock_ttl_s <= 0:
            raise ConfigError("lock TTL must be positive")
        if self.shard_size is not None and self.shard_size < 1:
            raise ConfigError(f"--shard-size must be at least 1, got {self.shard_size}")
        return spec

    def change_config(self) -> changes.ChangeConfig:
        """What the change plan needs (``allowed_roots`` already the effective roots)."""
        return changes.ChangeConfig(manifest=self.manifest, root=self.root, allowed_roots=self.allowed_roots,
                                    max_bytes=self.max_bytes, full=self.full, verify_content=self.verify_content)


@dataclass
class RebuildSummary:
    """What a rebuild did: printed by the CLI, kept in its audit record."""

    job_id: str
    outcome: str = "running"           # published | nothing-changed | failed
    manifest_rows: int = 0
    new: int = 0
    changed: int = 0
    removed: int = 0
    erased_skipped: int = 0
    unverified: int = 0
    hashed: int = 0                    # photos whose bytes were read to decide (not every photo)
    restat: int = 0                    # same bytes, new stat: recorded, not re-embedded
    to_embed: int = 0
    embed: dict | None = None          # run_embed's summary when something was embedded
    faces: int = 0
    images: int = 0
    errors: int = 0
    table_version: str | None = None
    index_version: str | None = None
    previous_index_version: str | None = None
    retrained: bool = False
    retrain_reason: str | None = None
    incremental: dict | None = None    # shards kept / built when the live version was extended
    seconds: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        return asdict(self)


def run_rebuild(config: RebuildConfig) -> RebuildSummary:
    """Bring ROOT up to date with the manifest (see the module docstring); return what it did.

    Audited like every job (facelake.record.audit.Job): "started" before the lock is taken, then
    succeeded / failed / interrupted with the summary."""
    spec = config.validate()
    options = StorageOptions.from_env(config.endpoint_url)
    info = manifest.validate(config.manifest, options)
    job = audit.Job(config.root, "rebuild", options, details={
        "manifest": storage.redact(config.manifest), "manifest_fingerprint": info.fingerprint, "full": config.full,
        "verify_content": config.verify_content})
    with job:
        summary = RebuildSummary(job_id=job.job_id, manifest_rows=info.rows)
        try:
            return _rebuild(config, spec, info, summary, options)
        finally:
            job.details.update({k: v for k, v in summary.to_dict().items() if k != "job_id"})


def _rebuild(config: RebuildConfig, spec: ModelSpec, info: manifest.ManifestInfo, summary: RebuildSummary,
             options: StorageOptions) -> RebuildSummary:
    """The steps of the module docstring, under ROOT's lock, with Ray connected."""
    import ray

    from facelake.cluster import runtime

    clock = time.monotonic()
    started_ray = False
    with RootLock(config.root, summary.job_id, ttl_s=config.lock_ttl_s, options=options) as lock:
        try:
            faults.point("rebuild.locked", summary.job_id)
            config = dataclasses.replace(
                config, allowed_roots=photos.effective_roots(config.root, config.allowed_roots, options))
            rootmod.collect_garbage(config.root, options)
            base = _base(config, spec, options)
            erased = erasure_list.erased_ids(config.root, options)
            started_ray = not ray.is_initialized()
            runtime.connect(config.address)
            with _timed(summary, "plan"):
                the_plan = _plan(config, info, base, erased, options)
            _count(summary, the_plan)
            live = layout.current_version(config.root, options)
            summary.previous_index_version = live
            if _nothing_to_do(config, base, the_plan, live, options):
                return _nothing_changed(config, base, live, summary, options)
            version = base
            if len(the_plan.to_embed) or len(the_plan.drop):
                version = _record(config, spec, info, base, the_plan, summary, lock, options)
            _publish(config, spec, version, summary, lock, options)
            staging.remove_runs(config.root, options)
            rootmod.collect_garbage(config.root, options)
            summary.outcome = "published"
            return summary
        except BaseException:
            summary.outcome = "failed"
            raise
        finally:
            summary.seconds["total"] = round(time.monotonic() - clock, 3)
            runtime.shutdown_if_local(started_ray and config.address is None)


@contextlib.contextmanager
def _timed(summary: RebuildSummary, step: str) -> Iterator[None]:
    """Record the seconds ``step`` took in ``summary.seconds`` (when it succeeds)."""
    start = time.monotonic()
    yield
    summary.seconds[step] = round(time.monotonic() - start, 3)


def _base(config: RebuildConfig, spec: ModelSpec, options: StorageOptions) -> rootmod.TableVersion | None:
    """The live table version of ROOT, refused when it holds faces of another model."""
    base = rootmod.current(config.root, options)
    if base is not None and base.model not in (None, spec.name):
        raise ConfigError(f"{storage.redact(config.root)} holds faces of model {base.model!r}, not "
                          f"{spec.name!r}: use one root per model")
    return base


def _plan(config: RebuildConfig, info: manifest.ManifestInfo, base: rootmod.TableVersion | None,
          erased: pa.Array, options: StorageOptions) -> changes.Plan:
    """The change plan: made in the driver for small roots, else in Ray tasks (the driver gets the
    change only)."""
    if changes.in_driver(info, base):
        table, _ = photos.resolve_manifest(config.manifest, options, info)
        return changes.plan(config.change_config(), table, rootmod.record_ids(config.root, base, options), erased,
                            options)
    return changes.plan_in_tasks(config.change_config(), info, base, erased, options)


def _count(summary: RebuildSummary, the_plan: changes.Plan) -> None:
    for name in ("new", "changed", "removed", "erased_skipped", "unverified", "hashed"):
        setattr(summary, name, getattr(the_plan, name))
    summary.restat = len(the_plan.restat)
    summary.to_embed = len(the_plan.to_embed)
    if summary.unverified:
        log.warning("%d image(s) of record could not be read to check for changes; their faces are kept",
                    summary.unverified)


def _nothing_to_do(config: RebuildConfig, base: rootmod.TableVersion | None, the_plan: changes.Plan,
                   live: str | None, options: StorageOptions) -> bool:
    """Whether the table of record stays as it is and CURRENT already names its index."""
    if len(the_plan.to_embed) or len(the_plan.drop):
        return False
    if base is None:
        raise ConfigError("the manifest lists no image to embed (all erased?) and ROOT holds none")
    pointer = rootmod.read_pointer(config.root, options) or {}
    return bool(live) and pointer.get("index_version") == live and not config.full


def _nothing_changed(config: RebuildConfig, base: rootmod.TableVersion, live: str, summary: RebuildSummary,
                     options: StorageOptions) -> RebuildSummary:
    staging.remove_runs(config.root, options)
    summary.outcome = "nothing-changed"
    summary.index_version = live
    summary.table_version = base.name
    summary.faces, summary.errors = base.face_rows, base.error_rows
    summary.images = _images(config.root, base, options)
    return summary


def _record(config: RebuildConfig, spec: ModelSpec, info: manifest.ManifestInfo, base: rootmod.TableVersion | None,
            the_plan: changes.Plan, summary: RebuildSummary, lock: RootLock,
            options: StorageOptions) -> rootmod.TableVersion:
    """Steps 2 and 3: embed the plan's photos into staging, write the table version of record."""
    faces = errors = ()
    run = None
    if len(the_plan.to_embed):
        run = staging.reuse_run(config.root, options, spec.name, _embed_config(config, spec, "", "").fingerprint().digest)
        with _timed(summary, "embed"):
            summary.embed, faces, errors = _embed(config, spec, the_plan, run, options)
    faults.point("rebuild.after_embed", summary.job_id)
    lock.verify()
    with _timed(summary, "table"):
        version = _write_table(config.root, base, the_plan, run, faces, errors, info, summary.job_id, spec.name,
                               lock, options)
    if run is not None:
        staging.keep_summaries(config.root, run, options)
    return version


def _publish(config: RebuildConfig, spec: ModelSpec, version: rootmod.TableVersion, summary: RebuildSummary,
             lock: RootLock, options: StorageOptions) -> None:
    """Step 4: publish the index version of ``version`` (facelake.index.publish)."""
    from facelake.index.publish import publish_index   # faiss and ray

    with _timed(summary, "index"):
        published = publish_index(config.root, version, model=spec.name, weights_sha256=weights_fingerprint(spec),
                                  keep=config.keep, full=config.full, lock=lock, options=options,
                                  shard_size=config.shard_size)
    summary.index_version = published["version"]
    summary.retrained, summary.retrain_reason = published["retrained"], published["reason"]
    summary.incremental = published.get("incremental")
    summary.table_version = version.name
    summary.faces, summary.errors = version.face_rows, version.error_rows
    summary.images = _images(config.root, version, options)


# ---------------------------------------------------------------------------- embedding and the table of record

def _embed(config: RebuildConfig, spec: ModelSpec, the_plan: changes.Plan, run: str,
           options: StorageOptions) -> tuple[dict | None, tuple[str, ...], tuple[str, ...]]:
    """Embed the plan's photos into the staging run (those not staged yet); returns run_embed's
    summary (None when everything was staged already) and the staged faces and errors part files."""
    out = rootmod.uri(config.root, rootmod.STAGING, run)
    staged = done_image_ids(out, spec, options)
    if not pc.any(pc.invert(pc.is_in(the_plan.to_embed, value_set=staged))).as_py():
        # a killed run already staged every photo: no embed job (and no model load) at all
        return None, staging.staged_parts(out, "faces", options), staging.staged_parts(out, "errors", options)
    staging.stage_stats(out, the_plan.stats, the_plan.to_embed, options)
    sub = the_plan.manifest.filter(pc.is_in(the_plan.manifest["image_id"], value_set=the_plan.to_embed))
    sub_uri = storage.join(out, "manifest", "to-embed.parquet")
    manifest.write(sub, sub_uri, options)
    summary = run_embed(_embed_config(config, spec, sub_uri, out))
    return summary.to_dict(), staging.staged_parts(out, "faces", options), staging.staged_parts(out, "errors", options)


def _embed_config(config: RebuildConfig, spec: ModelSpec, manifest_uri: str, out: str) -> EmbedConfig:
    """The embed job a rebuild runs into its staging folder (its fingerprint keys the staging run)."""
    return EmbedConfig(manifest=manifest_uri, out=out, model=spec.name, address=config.address,
                       batch_size=config.batch_size, endpoint_url=config.endpoint_url,
                       weights_from=config.weights_from, workers=config.workers,
                       allowed_roots=config.allowed_roots, max_bytes=config.max_bytes, progress=config.progress)


def _write_table(root: str, base: rootmod.TableVersion | None, the_plan: changes.Plan, run: str | None,
                 faces: tuple[str, ...], errors: tuple[str, ...], info: manifest.ManifestInfo, job_id: str,
                 model: str, lock: RootLock, options: StorageOptions) -> rootmod.TableVersion:
    """The new table version: the plan's drops, the staged faces and errors of its embedded ids and
    its re-stated rows, all with the stat of record. Parts are read and written by Ray tasks past
    changes.DRIVER_ROWS rows (jobs/work/units.py): this process ships the change's ids and stats
    (no embedding) and gets part names and counts back."""
    stats = staging.stats_of_record(root, run, the_plan.stats, options)
    stats = stats.filter(pc.is_in(stats["image_id"], value_set=pa.concat_arrays(
        [the_plan.to_embed.cast(pa.string()), the_plan.restat.cast(pa.string())])))
    rows = info.rows + ((base.face_rows + base.error_rows) if base is not None else 0)
    return rootmod.write_version(
        root, base, drop_ids=the_plan.drop, sources=staging.added(root, the_plan, faces, errors), stats=stats,
        holding=the_plan.drop_parts, model=model, job_id=job_id, options=options,
        hook=lambda name: _before_table_pointer(lock, name),
        map_fn=units.table_map(rows, changes.DRIVER_ROWS))


def _before_table_pointer(lock: RootLock, name: str) -> None:
    faults.point("rebuild.before_table_pointer", name)
    lock.verify()


def _images(root: str, version: rootmod.TableVersion, options: StorageOptions) -> int:
    """Recorded with the version (facelake.record.tables); counted by tasks for versions written before."""
    if version.images is not None:
        return version.images
    return counts.distinct_images([("parquet", rootmod.uri(root, rootmod.FACES, p)) for p in version.faces],
                                  version.face_rows, options)


def print_summary(summary: RebuildSummary) -> None:
    """What the rebuild did, for the terminal."""
    if summary.outcome == "nothing-changed":
        typer.echo(f"nothing changed: {summary.manifest_rows} manifest row(s) match the record "
                   f"({summary.erased_skipped} erased, {summary.unverified} unverified); no embedding, "
                   f"no new version; live version {summary.index_version}")
        return
    typer.echo(f"plan: {summary.new} new, {summary.changed} changed, {summary.removed} removed, "
               f"{summary.erased_skipped} erased (never embedded), {summary.unverified} unverified; "
               f"{summary.hashed} photo(s) read to decide, {summary.restat} touched but unchanged")
    if summary.embed:
        e = summary.embed
        typer.echo(f"embedded {e['images']} image(s): {e['faces']} face(s), {e['errors']} error(s) "
                   f"({e['skipped_done']} already staged by an earlier run)")
    else:
        typer.echo("embedded nothing")
    typer.echo(f"record: {summary.faces} face(s) of {summary.images} image(s), {summary.errors} error(s); "
               f"table version {summary.table_version}")
    typer.echo(f"published index version {summary.index_version} (was {summary.previous_index_version}); "
               + (f"retrained: {summary.retrain_reason}" if summary.retrained else "reused the trained quantizer"))
    if summary.incremental:
        inc = summary.incremental
        typer.echo(f"index shards: {len(inc['reused_shards'])} kept as they were, {len(inc['built_shards'])} built "
                   f"({inc['built_faces']} face(s))")
    typer.echo("seconds: " + ", ".join(f"{k} {v}" for k, v in summary.seconds.items()))


def register(app: typer.Typer) -> None:
    @app.command("rebuild")
    def rebuild_command(
        manifest_uri: str = typer.Argument(..., metavar="MANIFEST", help="Parquet manifest (file or folder): local, file:// or s3://"),
        root: str = typer.Option(..., "--root", help="ROOT holding the faces of record and the index versions"),
        address: str = typer.Option(None, help="Ray cluster to join (auto, ray://host:port); default: start a local Ray"),
        full: bool = typer.Option(False, "--full", help="re-embed every photo and retrain the quantizer"),
        endpoint_url: str = typer.Option(None, "--endpoint-url", help="S3-compatible endpoint (credentials come from the AWS chain)"),
        keep: int = typer.Option(DEFAULT_KEEP, "--keep", help="index versions to keep (the live one always)"),
        weights_from: str = typer.Option(None, "--weights-from", help="folder or s3:// prefix with the weight files"),
        allow_root: list[str] = typer.Option([], "--allow-root", help="only read photos under this root (repeatable; ROOT remembers them for later rebuilds)"),
        max_bytes: int = typer.Option(reader.DEFAULT_MAX_BYTES, "--max-bytes", help="refuse photos larger than this many bytes (from stat / HEAD, before reading)"),
        verify_content: bool = typer.Option(False, "--verify-content", help="read and hash every photo of record (default: only those whose size/mtime/ETag cannot clear them)"),
        shard_size: int = typer.Option(None, "--shard-size", help="faces per index shard (default 1,000,000)"),
    ) -> None:
        """Embed new and changed photos, drop removed ones, publish a new index version."""
        summary = run_rebuild(RebuildConfig(manifest=manifest_uri, root=root, address=address, full=full,
                                            endpoint_url=endpoint_url, keep=keep, weights_from=weights_from,
                                            allowed_roots=tuple(allow_root), max_bytes=max_bytes,
                                            verify_content=verify_content, shard_size=shard_size))
        print_summary(summary)
