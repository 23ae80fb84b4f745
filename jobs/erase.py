"""`facelake erase`: remove photos' faces for good and publish an index version without them.

Audited first (facelake.record.audit.Job: a "started" record, then succeeded / failed / interrupted),
then under ROOT's lock, in this order (each step safe to crash after; rerunning the same erase,
or any later index / rebuild, completes it, because all of them purge every id of the erasure
list and refuse to publish a version holding one):

1. Count, per id, the faces and error rows the root holds of it (faces and errors of record,
   the live index version), in Ray tasks past jobs/work/counts.py DRIVER_ROWS rows (``_scan``: each
   task filters its parts or shards against the ids and returns only the matches; the driver
   never holds the archive's ids). Ids the root does not hold are not recorded and are reported as
   not found (exit 1 in the CLI). Ids already on the erasure list (an earlier or killed erase)
   report the counts recorded when they were listed.
2. Append the new ids with their counts, reason and user to the erasure list of record
   (facelake.record.erasures: append-only, hash-chained, anchored in the audit log). From here on no
   publisher embeds or indexes them again, even while a manifest or faces table lists them.
3. Remove staging runs (a killed rebuild's staged faces may include them).
4. Write a table version of record without any erased id (only the parts the scan found holding
   one are rewritten, each in a Ray task past DRIVER_ROWS rows of record (jobs/work/units.py); the
   others are kept from their footers).
5. Publish an index version without them: from the faces of record (rebuild's roots) or, on a
   root made by ``facelake embed`` + ``facelake index``, from the faces table the live version was
   built from (its manifest's ``source``), reusing the live trained quantizer. Shard files are
   never edited (GPU indexes cannot remove ids, and id tables would go stale).
6. Refuse to finish unless the live version holds none of the erased ids; delete every other
   version that holds one (so versions kept by --keep never do) and the part files that held them.
7. The end record: per id (as an HMAC under the root's audit key, never the id itself) how many
   faces and error rows were removed, the ids not found, reason, resulting version.

``--purge-results`` also removes the erased ids' rows from earlier search results named in the
audit log (search records carry their --out), and reports which result folders it changed.
Copies outside ROOT (the ``facelake embed --out`` folder, exports) are not reachable from here.
"""

from __future__ import annotations

import contextlib
import logging
from dataclasses import asdict, dataclass, field

import pyarrow as pa
import pyarrow.compute as pc
import typer

from facelake import faults, storage
from facelake.record import audit
from facelake.record import erasures as erasure_list
from facelake.record import tables as rootmod
from facelake.errors import ConfigError, FacelakeError
from facelake.record.lock import DEFAULT_TTL_S, RootLock
from facelake.faces.manifest import MAX_ID_CHARS, id_rule_violation
from facelake.faces.registry import get_model, weights_fingerprint
from facelake.storage import StorageOptions

log = logging.getLogger(__name__)

# Exit code of the CLI when some ids were not found (the others were erased).
EXIT_NOT_FOUND = 1


@dataclass(frozen=True)
class EraseConfig:
    root: str
    ids: tuple[str, ...]
    reason: str
    endpoint_url: str | None = None
    keep: int = 3
    lock_ttl_s: float = DEFAULT_TTL_S
    purge_results: bool = False
    # Rows (record plus live shards) at most this many are scanned for the ids in the driver, without
    # Ray; None: jobs/work/counts.py DRIVER_ROWS. Tests set 0 to force the task path.
    driver_rows: int | None = None

    def validate(self) -> None:
        storage.check_uri(self.root)
        if not self.ids:
            raise ConfigError("give the image ids to erase (IMAGE_ID ... or --ids-file FILE)")
        bad = id_rule_violation(list(self.ids))
        if bad is not None:
            raise ConfigError(f"id {bad[0] + 1} of those given: {bad[1]}; image ids have no control characters, "
                              f"no surrounding whitespace and at most {MAX_ID_CHARS} characters (the rule "
                              f"manifests are validated with), so no photo can carry it")
        if not self.reason or not self.reason.strip():
            raise ConfigError("--reason is required: say why these photos are erased (kept in the erasure list)")
        if self.keep < 1:
            raise ConfigError(f"--keep must be at least 1, got {self.keep}")


@dataclass
class EraseSummary:
    job_id: str
    ids: int
    faces_removed: int = 0
    images_with_faces: int = 0
    errors_removed: int = 0
    index_version: str | None = None
    versions_removed: list[str] = field(default_factory=list)
    # per id: {"faces", "error_rows", "status": "erased" | "already erased" | "not found"}
    per_id: dict[str, dict] = field(default_factory=dict)
    not_found: list[str] = field(default_factory=list)
    purged_results: list[str] = field(default_factory=list)

    def to_dict(self) -> dict:
        return asdict(self)


def read_ids_file(path: str, options: StorageOptions | None = None) -> tuple[str, ...]:
    """One id per line (\\n or \\r\\n); blank lines and lines starting with # are skipped.

    Lines are taken as they are: one with surrounding spaces or control characters breaks the id
    rule and is refused with its line number, never trimmed into another id.
    """
    text = storage.read_bytes(path, options).decode()
    ids = []
    for number, line in enumerate(text.split("\n"), 1):
        line = line[:-1] if line.endswith("\r") else line
        if not line.strip() or line.startswith("#"):
            continue
        bad = id_rule_violation([line])
        if bad is not None:
            raise ConfigError(f"{storage.redact(path)} line {number}: {bad[1]}; write one image id per line, "
                              f"exactly as the manifest holds it")
        ids.append(line)
    return tuple(ids)


# Where an id can be held: a part of record ("faces" / "errors", part name) or a shard of the live
# index version (INDEX, shard number).
Place = tuple[str, str]
INDEX = "index"


def _sources(root: str, base, live: str | None, options: StorageOptions) -> tuple[list[Place], list, int]:
    """Every part of record and every live shard (as jobs/work/counts.py sources), and their rows (from
    the table version and the live manifest: no file is read)."""
    from facelake.index.load import open_version

    places: list[Place] = []
    sources: list = []
    rows = 0
    if base is not None:
        for kind in rootmod.KINDS:
            for name in base.parts(kind):
                places.append((kind, name))
                sources.append(("parquet", rootmod.uri(root, kind, name)))
        rows += base.face_rows + base.error_rows
    if live is not None:
        for shard in open_version(root, live, options=options).manifest["shards"]:
            places.append((INDEX, str(shard["shard"])))
            sources.append(("shard", (root, live, shard["shard"])))
            rows += int(shard.get("count", 0))
    return places, sources, rows


def _scan(root: str, base, live: str | None, ids: pa.Array, options: StorageOptions, *,
          driver_rows: int | None = None) -> dict[Place, dict[str, int]]:
    """{place: {id: rows}} for the ``ids`` each part of record and each live shard holds.

    The filtering runs where jobs/work/counts.py ``held`` puts it (Ray tasks past its DRIVER_ROWS rows):
    the driver receives only the matches, O(ids + parts), never the archive's ids.
    """
    from facelake.jobs.work import counts

    places, sources, rows = _sources(root, base, live, options)
    found = counts.held(sources, ids, rows, options, driver_rows=driver_rows)
    return {place: hit for place, hit in zip(places, found) if hit}


def _total(scan: dict[Place, dict[str, int]], kind: str, image_id: str) -> int:
    return sum(hit.get(image_id, 0) for (k, _), hit in scan.items() if k == kind)


def _holdings(ids: list[str], scan: dict[Place, dict[str, int]]) -> dict[str, tuple[int, int]]:
    """{id: (faces, error rows)} the root holds now (record and live index; the larger face count)."""
    return {i: (max(_total(scan, rootmod.FACES, i), _total(scan, INDEX, i)), _total(scan, rootmod.ERRORS, i))
            for i in ids}


def _publish_from_source(root: str, live: str, erased: pa.Array, keep: int, lock: RootLock,
                         options: StorageOptions, driver_rows: int | None = None) -> str | None:
    """A root made by `facelake index`: rebuild the live version from its faces table minus ``erased``
    (the rows left are counted from the parts' footers less the erased ids' rows, found in tasks)."""
    from facelake.index import layout
    from facelake.index.build import BuildOptions, build_version
    from facelake.index.parts import list_parts
    from facelake.index.erasure import check_publishable
    from facelake.index.load import open_version
    from facelake.jobs.work import counts

    manifest = open_version(root, live, options=options).manifest
    source = manifest.get("source") or ""
    try:
        storage.check_uri(source)
        parts, _ = list_parts(source, options)
        rows = sum(p.rows for p in parts)
        found = counts.held([("parquet", p.uri) for p in parts], erased, rows, options, driver_rows=driver_rows)
    except (FacelakeError, FileNotFoundError, OSError) as err:
        raise FacelakeError(
            f"index version {live} holds erased faces and was built by `facelake index` from {source!r}, which "
            f"cannot be read now ({type(err).__name__}); the erasure list already names the ids: restore that "
            f"faces table and rerun `facelake erase`, or run `facelake index FACES --root ROOT` with the faces "
            f"table (it leaves erased ids out)") from err
    left = rows - sum(n for hit in found for n in hit.values())
    if left == 0:
        lock.verify()
        storage.remove(layout.index_root(root), recursive=True, options=options)
        return None

    def before_pointer(version: str) -> None:
        lock.verify()
        check_publishable(root, version, erased, options)

    built = build_version(source, root, BuildOptions(
        model=manifest["model"], weights_sha256=manifest["weights_sha256"], shards=min(left, len(manifest["shards"])),
        trained_from=live if left >= manifest["nlist"] else None, keep=keep, storage=options, erased_ids=erased,
        hooks={"before_pointer": before_pointer}))
    return built["version"]


def _report(summary: EraseSummary, ids: list[str], listed: pa.Table, holdings: dict[str, tuple[int, int]]) -> None:
    earlier = {r["image_id"]: r for r in listed.to_pylist()}
    for i in ids:
        if i in earlier:
            row = earlier[i]
            summary.per_id[i] = {"faces": row["faces"] or 0, "error_rows": row["error_rows"] or 0,
                                 "status": "already erased", "erased_at": row["erased_at"], "by_job": row["job_id"]}
        elif holdings[i] == (0, 0):
            summary.per_id[i] = {"faces": 0, "error_rows": 0, "status": "not found"}
            summary.not_found.append(i)
        else:
            summary.per_id[i] = {"faces": holdings[i][0], "error_rows": holdings[i][1], "status": "erased"}
    summary.faces_removed = sum(v["faces"] for v in summary.per_id.values())
    summary.errors_removed = sum(v["error_rows"] for v in summary.per_id.values())
    summary.images_with_faces = sum(1 for v in summary.per_id.values() if v["faces"])


def run_erase(config: EraseConfig) -> EraseSummary:
    """Erase photos (see the module docstring); returns what was removed, per id, and the new version.

    Ids the root does not hold are listed in ``summary.not_found`` (not an exception: the others
    were erased); the CLI exits 1 naming them.
    """
    config.validate()
    options = StorageOptions.from_env(config.endpoint_url)
    ids = sorted(set(config.ids))
    hmacs = dict(zip(ids, audit.id_hmac(config.root, ids, options)))
    with audit.Job(config.root, "erase", options, details={
            "reason": config.reason, "ids_count": len(ids), "ids_hmac": sorted(hmacs.values()),
            "purge_results": config.purge_results}) as job:
        summary = EraseSummary(job_id=job.job_id, ids=len(ids))
        try:
            _erase(config, ids, summary, options)
        finally:
            job.details.update({
                "resulting_version": summary.index_version, "faces_removed": summary.faces_removed,
                "images_with_faces": summary.images_with_faces, "errors_removed": summary.errors_removed,
                "versions_removed": summary.versions_removed, "not_found": len(summary.not_found),
                "per_id": [{"id_hmac": hmacs[i], **v} for i, v in sorted(summary.per_id.items())],
                "purged_results": summary.purged_results})
    return summary


def _erase(config: EraseConfig, ids: list[str], summary: EraseSummary,
           options: StorageOptions) -> None:
    from facelake.index import layout
    from facelake.index.erasure import erased_ids_checked

    with RootLock(config.root, summary.job_id, ttl_s=config.lock_ttl_s, options=options) as lock, \
            _ray_for(config, options):
        before = erased_ids_checked(config.root, options)                 # refuses a tampered list
        listed_before = erasure_list.erasures(config.root, options)
        base = rootmod.current(config.root, options)
        live = layout.current_version(config.root, options)
        mine = pa.array(ids, pa.string())
        listed = listed_before.filter(pc.is_in(listed_before["image_id"], value_set=mine))
        # one scan for this job's ids and every id listed before: the holdings to report, and the
        # parts and shards still holding an erased id (a killed erase's, or this one's once listed)
        wanted = pc.unique(pa.concat_arrays([mine, pa.array(before.to_pylist(), pa.string())]))
        scan = _scan(config.root, base, live, wanted, options, driver_rows=config.driver_rows)
        holdings = _holdings(ids, scan)
        _report(summary, ids, listed, holdings)
        new = {i: holdings[i] for i, v in summary.per_id.items() if v["status"] == "erased"}
        if new:
            erasure_list.append_erasure(config.root, new, reason=config.reason, job_id=summary.job_id, options=options)
        faults.point("erase.after_erasure_list", summary.job_id)
        _complete(config, summary, base, live, scan, set(wanted.to_pylist()), lock, options)
        if config.purge_results:
            summary.purged_results = purge_results(config.root, erasure_list.erased_ids(config.root, options), options)


@contextlib.contextmanager
def _ray_for(config: EraseConfig, options: StorageOptions):
    """Ray connected for the whole erase when the root is past the driver threshold (the scan, the
    erasure checks of index/erasure.py and the republish share it), else nothing is started."""
    from facelake.index import layout
    from facelake.jobs.work import counts

    rows = _sources(config.root, rootmod.current(config.root, options), layout.current_version(config.root, options),
                    options)[2]
    if rows <= (counts.DRIVER_ROWS if config.driver_rows is None else config.driver_rows):
        yield
        return
    import ray

    from facelake.cluster import runtime

    started_ray = not ray.is_initialized()
    runtime.connect(None)
    try:
        yield
    finally:
        runtime.shutdown_if_local(started_ray)


def _complete(config: EraseConfig, summary: EraseSummary, base, live: str | None,
              scan: dict[Place, dict[str, int]], scanned: set[str], lock: RootLock,
              options: StorageOptions) -> None:
    """Purge every erased id (not only this job's) from staging, record and index; see the module docstring.

    ``scan`` (``_scan`` over ``base`` and ``live`` for every id of the list) names the parts of record
    and live shards holding an erased id: only those parts are rewritten, no other part's ids are read."""
    from facelake.index import layout
    from facelake.index.erasure import check_publishable, erased_ids_checked, versions_holding
    from facelake.jobs.work import units as tasks

    erased = erased_ids_checked(config.root, options)
    erased_set = set(erased.to_pylist())
    if erased_set - scanned:   # never after a completed scan under the lock; kept exact regardless
        scan = _scan(config.root, base, live, erased, options, driver_rows=config.driver_rows)
    for run in rootmod.staging_runs(config.root, options):
        rootmod.remove_staging(config.root, run, options)
    version = base
    if base is not None:
        holding = {(k, p): set(hit) & erased_set for (k, p), hit in scan.items() if k in rootmod.KINDS}
        holding = {place: held for place, held in holding.items() if held}
        if holding:
            def before_table_pointer(name: str) -> None:
                faults.point("erase.before_table_pointer", name)
                lock.verify()
            drop = pa.array(sorted(set().union(*holding.values())), pa.string())
            # the holding parts are rewritten in Ray tasks when the root is past the driver threshold
            # (Ray is connected for the whole erase then: _ray_for), else here, one part at a time
            version = rootmod.write_version(config.root, base, drop_ids=drop,
                                            model=base.model, job_id=summary.job_id, options=options,
                                            hook=before_table_pointer, holding=set(holding),
                                            map_fn=tasks.table_map(base.face_rows + base.error_rows,
                                                                   config.driver_rows))
    live_holds = any(set(hit) & erased_set for (k, _), hit in scan.items() if k == INDEX)
    pointer = rootmod.read_pointer(config.root, options) or {}
    stale = version is not None and (version is not base or pointer.get("index_version") != live or live is None)
    if stale or live_holds:
        live, dropped = _republish(config, version, live, erased, lock, options)
        summary.versions_removed += dropped
    summary.index_version = live
    if live is not None:
        check_publishable(config.root, live, erased, options)
    for doomed in versions_holding(config.root, erased, live, options):
        storage.remove(layout.version_uri(config.root, doomed), recursive=True, options=options)
        summary.versions_removed.append(doomed)
    if base is not None:
        rootmod.collect_garbage(config.root, options)


def _republish(config: EraseConfig, version, live: str | None, erased: pa.Array,
               lock: RootLock, options: StorageOptions) -> tuple[str | None, list[str]]:
    """(the index version published without the erased ids, the other versions holding one that
    publishing removed)."""
    import ray

    from facelake.cluster import runtime
    from facelake.index.publish import publish_index

    started_ray = not ray.is_initialized()
    runtime.connect(None)
    try:
        if version is None:  # a root made by embed + index: no faces of record
            return _publish_from_source(config.root, live, erased, config.keep, lock, options, config.driver_rows), []
        spec = get_model(version.model)
        published = publish_index(config.root, version, model=spec.name, weights_sha256=weights_fingerprint(spec), keep=config.keep,
                                  full=False, lock=lock, options=options)
        return published["version"], published["dropped"]
    finally:
        runtime.shutdown_if_local(started_ray)


# ------------------------------------------------------------------------------ search results

def purge_results(root: str, erased: pa.Array, options: StorageOptions) -> list[str]:
    """Remove rows naming an erased id from the results of every search the audit log records.

    Each search record names its --out; result and error part files there that hold an erased
    id (as gallery or probe image) are rewritten without those rows. Returns the --out folders
    changed. Folders that are gone or unreadable are skipped with a warning.
    """
    from facelake.jobs.search import outputs

    changed = []
    outs = sorted({r.get("out") for r in audit.list_records(root, "search", options) if r.get("out")})
    for out in outs:
        touched = False
        try:
            for folder, columns in ((outputs(out)["results"], ("gallery_image_id", "probe_image_id")),
                                    (outputs(out)["errors"], ("image_id",))):
                for part in storage.list_files(folder, ".parquet", options):
                    touched |= _purge_part(part, columns, erased, options)
        except (OSError, FacelakeError) as err:
            log.warning("could not purge search results at %s: %s", storage.redact(out), err)
            continue
        if touched:
            changed.append(out)
    return changed


def _purge_part(part: str, columns: tuple[str, ...], erased: pa.Array, options: StorageOptions) -> bool:
    table = storage.read_table(part, options=options)
    keep = None
    for column in columns:
        if column in table.column_names:
            hit = pc.fill_null(pc.is_in(table[column].cast(pa.string()), value_set=erased), False)
            keep = pc.invert(hit) if keep is None else pc.and_(keep, pc.invert(hit))
    if keep is None or pc.all(keep).as_py():
        return False
    storage.write_table(part, table.filter(keep), options)   # schema metadata (threshold...) kept
    return True


def register(app: typer.Typer) -> None:
    @app.command("erase")
    def erase_command(
        image_ids: list[str] = typer.Argument(None, metavar="[IMAGE_ID]...", help="image ids to erase"),
        root: str = typer.Option(..., "--root", help="ROOT holding the faces of record and the index versions"),
        ids_file: str = typer.Option(None, "--ids-file", help="file with one image id per line"),
        reason: str = typer.Option(..., "--reason", help="why (kept in the erasure list of record)"),
        endpoint_url: str = typer.Option(None, "--endpoint-url", help="S3-compatible endpoint (credentials come from the AWS chain)"),
        keep: int = typer.Option(3, "--keep", help="index versions to keep (older ones holding erased ids are removed)"),
        purge_results: bool = typer.Option(False, "--purge-results",
                                           help="also remove the erased ids from earlier search results named in the audit log"),
    ) -> None:
        """Remove photos' faces from the record and publish an index version without them."""
        if bool(image_ids) == bool(ids_file):
            raise ConfigError("give either IMAGE_ID ... or --ids-file FILE (one of them)")
        options = StorageOptions.from_env(endpoint_url)
        ids = tuple(image_ids) if image_ids else read_ids_file(ids_file, options)
        summary = run_erase(EraseConfig(root=root, ids=ids, reason=reason, endpoint_url=endpoint_url, keep=keep,
                                        purge_results=purge_results))
        for image_id, row in sorted(summary.per_id.items()):
            typer.echo(f"  {image_id}: {row['status']}: {row['faces']} face(s), {row['error_rows']} error row(s)")
        typer.echo(f"erased {summary.ids - len(summary.not_found)} of {summary.ids} image id(s): "
                   f"{summary.faces_removed} face(s) of {summary.images_with_faces} image(s) and "
                   f"{summary.errors_removed} error row(s) removed from the record; live index version "
                   f"{summary.index_version}; {len(summary.versions_removed)} other version(s) holding erased faces deleted")
        if purge_results:
            typer.echo("search results purged: " + (", ".join(storage.redact(o) for o in summary.purged_results)
                                                    or "none held an erased id"))
        if summary.not_found:
            typer.secho(f"not found in {storage.redact(root)} (nothing recorded for them; check the ids against the "
                        f"manifest's image_id): {', '.join(summary.not_found)}", err=True, fg=typer.colors.RED)
            raise typer.Exit(EXIT_NOT_FOUND)
