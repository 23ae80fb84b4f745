"""`facelake rebuild`: bring ROOT's tables of record and live index up to date with a manifest.

One run, under ROOT's lock (facelake.lock):

1. Plan. Compare the manifest with the images of record (faces and errors) and the erasure
   list: ids not in record are new; ids in record whose (resolved) uri changed, or whose bytes
   now hash (sha256) to something else than the content_sha256 of record, are changed; ids of
   record not in the manifest are removed; erased ids are never embedded again and are purged
   from record if still there. Change detection reads the bytes of every image already in
   record once per run, in Ray tasks that only hash (no decoding); images of record that
   cannot be read now keep their record (a transient read error must not drop faces) and are
   counted as "unverified". An error of record without a hash (fetch failed) is retried when
   the image becomes readable. `--full` re-embeds everything and retrains.
2. Embed the new and changed photos with facelake embed's ``run_embed`` into
   ROOT/staging/<run>/. A killed run's staging is reused by the next run (run_embed skips the
   image ids already there), so nothing is embedded twice.
3. Write a new table version of record (facelake.root) and point ROOT/TABLE at it.
4. Publish an index version with ``build_version`` from the faces of record, reusing the live
   version's trained quantizer (``trained_from``) while it fits: the collection is within
   [1/2, 2] x the size it was trained on, and the mean similarity of a sample of faces to their
   nearest centroid has not dropped by more than 10% from its value at training time.
   Otherwise (or with --full) it retrains. ROOT/TABLE records the index version built from
   the table version just before CURRENT is written.

A crash before 3 leaves the previous table and version live; between 3 and 4 the table of
record is new and the old version live, and the next run publishes; a run that finds the table
unchanged and CURRENT naming its index does nothing and says so.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import time
from dataclasses import asdict, dataclass, field

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import typer

from facelake import audit, faults, manifest, reader, root as rootmod, storage
from facelake.errors import ConfigError
from facelake.lock import DEFAULT_TTL_S, RootLock
from facelake.registry import get_model, weights_fingerprint
from facelake.storage import StorageOptions

log = logging.getLogger(__name__)

# Retrain bounds (see the module docstring).
RETRAIN_GROWTH = 2.0
RETRAIN_DRIFT = 0.10
DRIFT_SAMPLE = 20_000
# Images per hashing task: enough to amortise a task, few enough to spread over a cluster.
HASH_CHUNK = 256
HASH_CPUS = 0.25
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

    def validate(self):
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
        return spec


@dataclass
class RebuildSummary:
    job_id: str
    outcome: str = "running"           # published | nothing-changed | failed
    manifest_rows: int = 0
    new: int = 0
    changed: int = 0
    removed: int = 0
    erased_skipped: int = 0
    unverified: int = 0
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
    seconds: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        return asdict(self)


# ---------------------------------------------------------------------------- planning

@dataclass
class Plan:
    manifest: pa.Table                 # the manifest, uris resolved
    to_embed: pa.Array                 # image ids to embed (new + changed)
    drop: pa.Array                     # image ids to remove from record (removed + changed + erased)
    new: int = 0
    changed: int = 0
    removed: int = 0
    erased_skipped: int = 0
    unverified: int = 0


def _resolve_manifest(uri: str, options: StorageOptions) -> tuple[pa.Table, manifest.ManifestInfo]:
    info = manifest.validate(uri, options)
    table = storage.read_table(uri, options=options)
    base = manifest.base_dir(uri, options)
    resolved = []
    for value in table["uri"].to_pylist():
        try:
            resolved.append(reader.resolve(value, base))
        except reader.ReadRefused:
            resolved.append(value)  # the embed job records it as a validate error
    table = table.set_column(table.schema.get_field_index("uri"), "uri", pa.array(resolved, pa.string()))
    table = table.set_column(table.schema.get_field_index("image_id"), "image_id",
                             table["image_id"].cast(pa.string()))
    return table, info


def _hash_chunk(uris: list[str], options: StorageOptions,
                limits: reader.ReadLimits = reader.ReadLimits()) -> list[str | None]:
    from facelake.imaging import content_sha256

    out = []
    for value in uris:
        try:
            out.append(content_sha256(reader.read(value, limits, options)))
        except Exception:  # unreadable or refused now: the caller keeps the record as it is
            out.append(None)
    return out


def hash_images(uris: list[str], options: StorageOptions,
                limits: reader.ReadLimits = reader.ReadLimits()) -> list[str | None]:
    """sha256 of each image's bytes (None when unreadable or refused), in parallel Ray tasks.

    Every read goes through facelake.reader: nothing outside ``limits.allowed_roots``, no FIFO
    or device, nothing over ``limits.max_bytes`` is read or hashed.
    """
    import ray

    if not uris:
        return []
    task = ray.remote(num_cpus=HASH_CPUS)(_hash_chunk)
    refs = [task.remote(uris[i:i + HASH_CHUNK], options, limits) for i in range(0, len(uris), HASH_CHUNK)]
    return [h for chunk in ray.get(refs) for h in chunk]


ALLOWED_ROOTS_FILE = "ALLOWED_ROOTS"


def remembered_roots(root: str, options: StorageOptions) -> tuple[str, ...]:
    """The --allow-root values ROOT remembers from the rebuild that last gave them (() if none)."""
    try:
        data = json.loads(storage.read_bytes(storage.join(root, ALLOWED_ROOTS_FILE), options))
    except FileNotFoundError:
        return ()
    return tuple(data.get("allowed_roots", ()))


def effective_roots(config: RebuildConfig, options: StorageOptions) -> tuple[str, ...]:
    """--allow-root when given (and remembered in ROOT for later runs), else what ROOT remembers."""
    if not config.allowed_roots:
        return remembered_roots(config.root, options)
    if remembered_roots(config.root, options) != config.allowed_roots:
        storage.write_bytes_atomic(storage.join(config.root, ALLOWED_ROOTS_FILE),
                                   json.dumps({"allowed_roots": list(config.allowed_roots)}).encode(), options)
    return config.allowed_roots


def plan(config: RebuildConfig, table: pa.Table, record: pa.Table, erased: pa.Array,
         options: StorageOptions) -> Plan:
    """What to embed and what to drop (see the module docstring)."""
    ids = table["image_id"]
    is_erased = pc.is_in(ids, value_set=erased)
    wanted = table.filter(pc.invert(is_erased))
    per_image = record.group_by(["image_id"], use_threads=False).aggregate(
        [("content_sha256", "first"), ("uri", "first")])
    rec_ids = per_image["image_id"]
    gone = pc.invert(pc.is_in(rec_ids, value_set=ids))
    gone = pc.or_(gone, pc.is_in(rec_ids, value_set=erased))
    removed = rec_ids.filter(gone)
    result = Plan(manifest=table, to_embed=pa.array([], pa.string()), drop=removed.combine_chunks()
                  if isinstance(removed, pa.ChunkedArray) else removed,
                  removed=len(removed), erased_skipped=int(pc.sum(is_erased).as_py() or 0))
    if config.full:
        result.to_embed = wanted["image_id"].combine_chunks()
        result.drop = rec_ids.combine_chunks() if isinstance(rec_ids, pa.ChunkedArray) else rec_ids
        result.changed = int(pc.sum(pc.is_in(result.to_embed, value_set=rec_ids)).as_py() or 0)
        result.new = len(result.to_embed) - result.changed
        return result
    known = pc.is_in(wanted["image_id"], value_set=rec_ids)
    new_ids = wanted["image_id"].filter(pc.invert(known))
    existing = wanted.filter(known).select(["image_id", "uri"]).join(
        per_image.rename_columns(["image_id", "rec_sha", "rec_uri"]), "image_id")
    uri_changed = pc.fill_null(pc.not_equal(existing["uri"], existing["rec_uri"]), True)
    changed = existing["image_id"].filter(uri_changed).to_pylist()
    same_uri = existing.filter(pc.invert(uri_changed))
    if config.allowed_roots:
        # outside the roots now: never read; re-embedding records it as a validate error
        inside = pa.array([reader.within(u, config.allowed_roots) for u in same_uri["uri"].to_pylist()], pa.bool_())
        changed += same_uri["image_id"].filter(pc.invert(inside)).to_pylist()
        same_uri = same_uri.filter(inside)
    limits = reader.ReadLimits(config.allowed_roots, config.max_bytes)
    hashes = hash_images(same_uri["uri"].to_pylist(), options, limits)
    for image_id, now, before in zip(same_uri["image_id"].to_pylist(), hashes, same_uri["rec_sha"].to_pylist()):
        if now is None:
            if before is not None:
                result.unverified += 1
        elif now != before:
            changed.append(image_id)
    changed_arr = pa.array(changed, pa.string())
    result.new, result.changed = len(new_ids), len(changed)
    result.to_embed = pa.concat_arrays([new_ids.combine_chunks().cast(pa.string())
                                        if isinstance(new_ids, pa.ChunkedArray) else new_ids.cast(pa.string()),
                                        changed_arr])
    result.drop = pa.concat_arrays([result.drop.cast(pa.string()), changed_arr])
    return result


# ---------------------------------------------------------------------------- retraining

def mean_nearest_similarity(trained_bytes: np.ndarray | bytes, xb: np.ndarray) -> float:
    """Mean inner product of (normalised) vectors to their nearest IVF centroid."""
    import faiss

    index = faiss.deserialize_index(np.frombuffer(trained_bytes, np.uint8))
    quantizer = faiss.extract_index_ivf(index).quantizer
    if len(xb) > DRIFT_SAMPLE:
        xb = xb[np.sort(np.random.default_rng(0).choice(len(xb), DRIFT_SAMPLE, replace=False))]
    D, _ = quantizer.search(np.ascontiguousarray(xb, np.float32), 1)
    return float(D.mean())


def retrain_reason(n: int, quantizer: dict | None, live_manifest: dict | None, model: str,
                   similarity: float | None, full: bool) -> str | None:
    """Why the quantizer must be retrained, or None to reuse it (the bound of the module docstring)."""
    if full:
        return "--full"
    if live_manifest is None or quantizer is None:
        return "no reusable trained index"
    if live_manifest.get("model") != model:
        return f"live index holds model {live_manifest.get('model')}"
    trained_n = quantizer.get("faces") or 0
    if n > RETRAIN_GROWTH * trained_n or n * RETRAIN_GROWTH < trained_n:
        return f"collection is {n} faces, trained on {trained_n} (bound: x{RETRAIN_GROWTH:g} either way)"
    if n < int(live_manifest["nlist"]):
        return f"fewer faces ({n}) than lists ({live_manifest['nlist']})"
    base = quantizer.get("mean_similarity")
    if similarity is not None and base is not None and similarity < base * (1 - RETRAIN_DRIFT):
        return (f"mean similarity to nearest centroid fell from {base:.3f} to {similarity:.3f} "
                f"(bound: {RETRAIN_DRIFT:.0%})")
    return None


def publish_index(root: str, version: rootmod.TableVersion | None, *, model: str, weights_sha256: str, keep: int,
                  full: bool, lock: RootLock, options: StorageOptions) -> dict:
    """Publish an index version of the faces of record of table ``version``; returns what it did.

    The shard tasks read the table's part files themselves (no face passes through this
    process); erased ids are left out. Records the version in ROOT/TABLE just before CURRENT is
    written. With no faces left, the index is withdrawn (ROOT/index removed) since an empty IVF
    index cannot be built.
    """
    from facelake.index import layout
    from facelake.index.build import DEFAULT_SHARD_SIZE, NothingToIndex, build_version, sampled_similarity
    from facelake.index.erasure import check_publishable, drop_versions_holding, erased_ids_checked
    from facelake.index.load import open_version, read_verified

    pointer = rootmod.read_pointer(root, options) or {}
    erased = erased_ids_checked(root, options)   # refuses a tampered erasure list
    parts = [rootmod.uri(root, rootmod.FACES, p) for p in version.faces] if version is not None else []
    n = version.face_rows if version is not None else 0     # before erasure: at most this many

    def withdraw() -> dict:
        lock.verify()
        storage.remove(layout.index_root(root), recursive=True, options=options)
        rootmod.write_pointer(root, {**pointer, "index_version": None, "quantizer": None}, options)
        return {"version": None, "retrained": False, "reason": "no faces of record: index withdrawn"}

    if not parts or n == 0:
        return withdraw()
    live = layout.current_version(root, options)
    live_manifest = open_version(root, live, options=options).manifest if live else None
    quantizer = pointer.get("quantizer")
    similarity = None
    if not full and live_manifest is not None and quantizer and live_manifest.get("model") == model:
        similarity = sampled_similarity(parts, read_verified(open_version(root, live, options=options),
                                                             layout.TRAINED), DRIFT_SAMPLE, options)
    reason = retrain_reason(n, quantizer, live_manifest, model, similarity, full)
    old_shards = len(live_manifest["shards"]) if live_manifest else 1
    shards = min(n, max(old_shards, math.ceil(n / DEFAULT_SHARD_SIZE)))
    pq_m = live_manifest.get("pq") if live_manifest else None
    if pq_m is not None and n < 256:
        pq_m = None

    def before_pointer(version_name: str) -> None:
        lock.verify()
        check_publishable(root, version_name, erased, options)
        q = quantizer
        if reason is not None:
            trained = read_verified(open_version(root, version_name, options=options), layout.TRAINED)
            q = {"trained_in": version_name, "faces": n,
                 "mean_similarity": sampled_similarity(parts, trained, DRIFT_SAMPLE, options)}
        rootmod.write_pointer(root, {**(rootmod.read_pointer(root, options) or {}), "index_version": version_name,
                                     "quantizer": q}, options)

    try:
        built = build_version(parts, root, model=model, weights_sha256=weights_sha256, shards=shards,
                              pq=pq_m if reason is not None else None, keep=keep,
                              trained_from=None if reason is not None else live, options=options,
                              hooks={"before_pointer": before_pointer},
                              erased_ids=erased, source=f"faces of record, table version {version.name}")
    except NothingToIndex:
        return withdraw()
    drop_versions_holding(root, erased, built["version"], options)
    return {"version": built["version"], "retrained": reason is not None, "reason": reason,
            "factory": built["factory"], "nlist": built["nlist"], "nprobe": built["nprobe"],
            "shards": len(built["shards"]), "total": built["total"], "previous": live}


# ---------------------------------------------------------------------------- the job

def _staging_run(root: str, options: StorageOptions, model: str, fingerprint: str) -> str:
    """Reuse the newest staging run made with this embed fingerprint (a killed rebuild's work, same
    model, weights, quality floor and read limits: facelake.schema.OutputFingerprint); drop others."""
    runs = rootmod.staging_runs(root, options)
    chosen = None
    for run in reversed(runs):
        try:
            meta = json.loads(storage.read_bytes(rootmod.uri(root, rootmod.STAGING, run, "staging.json"), options))
        except (FileNotFoundError, ValueError):
            meta = {}
        if chosen is None and meta.get("fingerprint") == fingerprint:
            chosen = run
        elif run != chosen:
            rootmod.remove_staging(root, run, options)
    if chosen is None:
        chosen = rootmod.new_name()
        storage.write_bytes_atomic(rootmod.uri(root, rootmod.STAGING, chosen, "staging.json"),
                                   json.dumps({"model": model, "fingerprint": fingerprint,
                                               "created_at": rootmod.utc_now()}).encode(), options)
    return chosen


def _staged(out: str, kind: str, ids: pa.Array, options: StorageOptions) -> pa.Table | None:
    folder = storage.join(out, kind)
    if not storage.list_files(folder, ".parquet", options):
        return None
    tables = []
    for file_uri in storage.list_files(folder, ".parquet", options):
        tables.append(storage.read_file(file_uri, options=options))
    table = pa.concat_tables(tables, promote_options="permissive")
    return table.filter(pc.is_in(table["image_id"], value_set=ids))


def _embed(config: RebuildConfig, spec, the_plan: Plan, run: str,
           options: StorageOptions) -> tuple[dict | None, pa.Table | None, pa.Table | None]:
    from facelake.jobs.embed import run_embed

    from facelake.jobs.embed import done_image_ids

    out = rootmod.uri(config.root, rootmod.STAGING, run)
    staged = done_image_ids(out, spec, options)
    if not pc.any(pc.invert(pc.is_in(the_plan.to_embed, value_set=staged))).as_py():
        # a killed run already staged every photo: no embed job (and no model load) at all
        return None, _staged(out, "faces", the_plan.to_embed, options), _staged(out, "errors", the_plan.to_embed, options)
    sub = the_plan.manifest.filter(pc.is_in(the_plan.manifest["image_id"], value_set=the_plan.to_embed))
    sub_uri = storage.join(out, "manifest", "to-embed.parquet")
    manifest.write(sub, sub_uri, options)
    summary = run_embed(_embed_config(config, spec, sub_uri, out))
    faces = _staged(out, "faces", the_plan.to_embed, options)
    errors = _staged(out, "errors", the_plan.to_embed, options)
    return summary.to_dict(), faces, errors


def _embed_config(config: RebuildConfig, spec, manifest_uri: str, out: str):
    """The embed job a rebuild runs into its staging folder (its fingerprint keys the staging run)."""
    from facelake.jobs.embed import EmbedConfig

    return EmbedConfig(manifest=manifest_uri, out=out, model=spec.name, address=config.address,
                       batch_size=config.batch_size, endpoint_url=config.endpoint_url,
                       weights_from=config.weights_from, workers=config.workers,
                       allowed_roots=config.allowed_roots, max_bytes=config.max_bytes, progress=config.progress)


def _keep_runs(root: str, run: str, options: StorageOptions) -> None:
    """Copy the staging run's embed summaries to ROOT/_runs (staging is removed afterwards)."""
    for file_uri in storage.list_files(rootmod.uri(root, rootmod.STAGING, run, "_runs"), ".json", options):
        name = file_uri.rstrip("/").rsplit("/", 1)[-1]
        storage.write_bytes_atomic(rootmod.uri(root, rootmod.RUNS, name), storage.read_bytes(file_uri, options), options)


def run_rebuild(config: RebuildConfig) -> RebuildSummary:
    """Bring ROOT up to date with the manifest (see the module docstring); return what it did.

    Audited like every job (facelake.audit.Job): "started" before the lock is taken, then
    succeeded / failed / interrupted with the summary."""
    spec = config.validate()
    options = StorageOptions.from_env(config.endpoint_url)
    table, info = _resolve_manifest(config.manifest, options)
    job = audit.Job(config.root, "rebuild", options, details={
        "manifest": storage.redact(config.manifest), "manifest_fingerprint": info.fingerprint, "full": config.full})
    with job:
        summary = RebuildSummary(job_id=job.job_id, manifest_rows=info.rows)
        try:
            return _rebuild(config, spec, table, summary, options)
        finally:
            job.details.update({k: v for k, v in summary.to_dict().items() if k != "job_id"})


def _rebuild(config: RebuildConfig, spec, table: pa.Table, summary: RebuildSummary,
             options: StorageOptions) -> RebuildSummary:
    import ray

    from facelake.cluster import runtime
    from facelake.index import layout

    job_id = summary.job_id
    clock = time.monotonic()
    started_ray = False
    with RootLock(config.root, job_id, ttl_s=config.lock_ttl_s, options=options) as lock:
        try:
            faults.point("rebuild.locked", job_id)
            config = dataclasses.replace(config, allowed_roots=effective_roots(config, options))
            rootmod.collect_garbage(config.root, options)
            base = rootmod.current(config.root, options)
            if base is not None and base.model not in (None, spec.name):
                raise ConfigError(f"{storage.redact(config.root)} holds faces of model {base.model!r}, not "
                                  f"{spec.name!r}: use one root per model")
            record = rootmod.record_ids(config.root, base, options)
            erased = rootmod.erased_ids(config.root, options)
            started_ray = not ray.is_initialized()
            runtime.connect(config.address)
            t = time.monotonic()
            the_plan = plan(config, table, record, erased, options)
            summary.seconds["plan"] = round(time.monotonic() - t, 3)
            for name in ("new", "changed", "removed", "erased_skipped", "unverified"):
                setattr(summary, name, getattr(the_plan, name))
            summary.to_embed = len(the_plan.to_embed)
            if summary.unverified:
                log.warning("%d image(s) of record could not be read to check for changes; their faces are kept",
                            summary.unverified)
            pointer = rootmod.read_pointer(config.root, options) or {}
            live = layout.current_version(config.root, options)
            summary.previous_index_version = live
            table_changes = len(the_plan.to_embed) + len(the_plan.drop)
            if not table_changes and base is None:
                raise ConfigError("the manifest lists no image to embed (all erased?) and ROOT holds none")
            if not table_changes and live and pointer.get("index_version") == live and not config.full:
                for run in rootmod.staging_runs(config.root, options):
                    rootmod.remove_staging(config.root, run, options)
                summary.outcome = "nothing-changed"
                summary.index_version = live
                summary.table_version = base.name
                summary.faces, summary.errors = base.face_rows, base.error_rows
                summary.images = _images(config.root, base, options)
                return summary
            version = base
            if table_changes:
                faces = errors = None
                run = None
                if len(the_plan.to_embed):
                    run = _staging_run(config.root, options, spec.name,
                                       _embed_config(config, spec, "", "").fingerprint().digest)
                    t = time.monotonic()
                    summary.embed, faces, errors = _embed(config, spec, the_plan, run, options)
                    summary.seconds["embed"] = round(time.monotonic() - t, 3)
                faults.point("rebuild.after_embed", job_id)
                lock.verify()
                t = time.monotonic()
                version = rootmod.write_version(
                    config.root, base, drop_ids=the_plan.drop, add={rootmod.FACES: faces, rootmod.ERRORS: errors},
                    model=spec.name, job_id=job_id, options=options,
                    hook=lambda name: _before_table_pointer(lock, name))
                summary.seconds["table"] = round(time.monotonic() - t, 3)
                if run is not None:
                    _keep_runs(config.root, run, options)
            t = time.monotonic()
            published = publish_index(config.root, version, model=spec.name,
                                      weights_sha256=weights_fingerprint(spec), keep=config.keep,
                                      full=config.full, lock=lock, options=options)
            summary.seconds["index"] = round(time.monotonic() - t, 3)
            summary.index_version = published["version"]
            summary.retrained, summary.retrain_reason = published["retrained"], published["reason"]
            summary.table_version = version.name
            summary.faces, summary.errors = version.face_rows, version.error_rows
            summary.images = _images(config.root, version, options)
            for run in rootmod.staging_runs(config.root, options):
                rootmod.remove_staging(config.root, run, options)
            rootmod.collect_garbage(config.root, options)
            summary.outcome = "published"
            return summary
        except BaseException:
            summary.outcome = "failed"
            raise
        finally:
            summary.seconds["total"] = round(time.monotonic() - clock, 3)
            runtime.shutdown_if_local(started_ray and config.address is None)


def _before_table_pointer(lock: RootLock, name: str) -> None:
    faults.point("rebuild.before_table_pointer", name)
    lock.verify()


def _images(root: str, version, options: StorageOptions) -> int:
    faces = rootmod.read_faces(root, ["image_id"], version, options)
    return 0 if faces is None else len(pc.unique(faces["image_id"]))


def print_summary(summary: RebuildSummary) -> None:
    if summary.outcome == "nothing-changed":
        typer.echo(f"nothing changed: {summary.manifest_rows} manifest row(s) match the record "
                   f"({summary.erased_skipped} erased, {summary.unverified} unverified); no embedding, "
                   f"no new version; live version {summary.index_version}")
        return
    typer.echo(f"plan: {summary.new} new, {summary.changed} changed, {summary.removed} removed, "
               f"{summary.erased_skipped} erased (never embedded), {summary.unverified} unverified")
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
    ) -> None:
        """Embed new and changed photos, drop removed ones, publish a new index version."""
        summary = run_rebuild(RebuildConfig(manifest=manifest_uri, root=root, address=address, full=full,
                                            endpoint_url=endpoint_url, keep=keep, weights_from=weights_from,
                                            allowed_roots=tuple(allow_root), max_bytes=max_bytes))
        print_summary(summary)
