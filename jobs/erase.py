"""`facelake erase`: remove photos' faces for good and publish an index version without them.

Under ROOT's lock, in this order (each step safe to crash after; rerunning erase, or the next
rebuild, completes it because both purge every id of the erasure list from the record):

1. Append the ids, reason, user and time to the erasure list of record (ROOT/erasures/<job>.parquet).
   From here on rebuild never embeds them again, even while the manifest lists them.
2. Remove staging runs (a killed rebuild's staged faces may include them).
3. Write a table version of record without any erased id (parts holding one are rewritten).
4. Rebuild every shard from the faces of record, reusing the live trained quantizer (faiss GPU
   indexes cannot remove ids, and removing ids from CPU shards would leave id tables stale, so
   erasure never edits shard files), and publish it.
5. Refuse to finish unless the live version's id tables hold none of the erased ids; then delete
   every older index version that holds one (they stay openable by name otherwise) and the part
   files of record that held them.
6. Audit record kind "erase": how many ids, their sha256 (ids such as file names can name a
   person, so the audit log carries hashes; the erasure list keeps the ids because rebuild must
   match them), reason, user, time, resulting version.
"""

from __future__ import annotations

import hashlib
import logging
from dataclasses import asdict, dataclass, field

import pyarrow as pa
import pyarrow.compute as pc
import typer

from facelake import audit, root as rootmod, storage
from facelake.errors import ConfigError, FacelakeError
from facelake.lock import DEFAULT_TTL_S, RootLock
from facelake.registry import get_model, weights_fingerprint
from facelake.storage import StorageOptions

log = logging.getLogger(__name__)

HOOK_NAMES = ("before_table_pointer", "before_manifest", "before_pointer")


@dataclass(frozen=True)
class EraseConfig:
    root: str
    ids: tuple[str, ...]
    reason: str
    endpoint_url: str | None = None
    keep: int = 3
    lock_ttl_s: float = DEFAULT_TTL_S

    def validate(self) -> None:
        storage.check_uri(self.root)
        if not self.ids:
            raise ConfigError("give the image ids to erase (IMAGE_ID ... or --ids-file FILE)")
        if any(not i or i != i.strip() for i in self.ids):
            raise ConfigError("image ids must be non-empty and carry no surrounding spaces")
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

    def to_dict(self) -> dict:
        return asdict(self)


def id_hash(image_id: str) -> str:
    return hashlib.sha256(image_id.encode()).hexdigest()


def read_ids_file(path: str, options: StorageOptions | None = None) -> tuple[str, ...]:
    """One id per line; blank lines and lines starting with # are ignored."""
    text = storage.read_bytes(path, options).decode()
    return tuple(line.strip() for line in text.splitlines() if line.strip() and not line.lstrip().startswith("#"))


def _versions_holding(root: str, ids: pa.Array, live: str | None, options: StorageOptions) -> list[str]:
    """Index versions other than the live one whose id tables hold any of ``ids``, plus unfinished folders."""
    from facelake.index import layout
    from facelake.index.load import load_ids, open_version

    doomed = []
    complete = layout.list_versions(root, options)
    for version in complete:
        if version == live:
            continue
        try:
            held = load_ids(open_version(root, version, options=options))["image_id"]
        except FacelakeError:
            doomed.append(version)  # unreadable: cannot prove it is clean
            continue
        if pc.any(pc.is_in(held, value_set=ids)).as_py():
            doomed.append(version)
    doomed += [v for v in layout._children(root, options) if v not in complete and v != live]
    return doomed


def run_erase(config: EraseConfig, hooks: dict | None = None) -> EraseSummary:
    """Erase photos (see the module docstring); returns what was removed and the new version."""
    from facelake.index import layout
    from facelake.index.load import load_ids, open_version
    from facelake.jobs.rebuild import publish_index

    config.validate()
    hooks = dict(hooks or {})
    unknown = set(hooks) - set(HOOK_NAMES)
    if unknown:
        raise ConfigError(f"unknown hook(s) {sorted(unknown)}; known: {HOOK_NAMES}")
    options = StorageOptions.from_env(config.endpoint_url)
    job_id = audit.new_job_id("erase")
    summary = EraseSummary(job_id=job_id, ids=len(set(config.ids)))
    started_at = audit.utc_now()
    with RootLock(config.root, job_id, ttl_s=config.lock_ttl_s, options=options) as lock:
        rootmod.append_erasure(config.root, sorted(set(config.ids)), reason=config.reason,
                               user=audit.who()["user"], job_id=job_id, options=options)
        for run in rootmod.staging_runs(config.root, options):
            rootmod.remove_staging(config.root, run, options)
        erased = rootmod.erased_ids(config.root, options)
        mine = pa.array(sorted(set(config.ids)), pa.string())
        base = rootmod.current(config.root, options)
        version = base
        if base is not None:
            record = rootmod.record_ids(config.root, base, options)
            hit = record.filter(pc.is_in(record["image_id"], value_set=erased))
            faces = rootmod.read_faces(config.root, ["image_id"], base, options)
            errors = rootmod.read_errors(config.root, ["image_id"], base, options)
            if faces is not None:
                in_faces = pc.is_in(faces["image_id"], value_set=mine)
                summary.faces_removed = int(pc.sum(in_faces).as_py() or 0)
                summary.images_with_faces = len(pc.unique(faces["image_id"].filter(in_faces)))
            if errors is not None:
                summary.errors_removed = int(pc.sum(pc.is_in(errors["image_id"], value_set=mine)).as_py() or 0)
            if hit.num_rows:
                def before_table_pointer(name: str) -> None:
                    if "before_table_pointer" in hooks:
                        hooks["before_table_pointer"](name)
                    lock.verify()
                version = rootmod.write_version(config.root, base, drop_ids=pc.unique(hit["image_id"]),
                                                add={}, model=base.model, job_id=job_id, options=options,
                                                hook=before_table_pointer)
        live = layout.current_version(config.root, options)
        pointer = rootmod.read_pointer(config.root, options) or {}
        if version is not None and (version is not base or pointer.get("index_version") != live or live is None):
            import ray

            from facelake.cluster import runtime
            started_ray = not ray.is_initialized()
            runtime.connect(None)
            try:
                spec = get_model(version.model)
                published = publish_index(config.root, rootmod.read_faces(config.root, version=version, options=options),
                                          model=spec.name, weights_sha256=weights_fingerprint(spec), keep=config.keep,
                                          full=False, lock=lock, options=options,
                                          hooks={k: v for k, v in hooks.items() if k != "before_table_pointer"})
            finally:
                runtime.shutdown_if_local(started_ray and not hooks)
            live = published["version"]
        summary.index_version = live
        if live is not None:
            held = load_ids(open_version(config.root, live, options=options))["image_id"]
            leaked = pc.unique(held.filter(pc.is_in(held, value_set=erased))).to_pylist()
            if leaked:
                raise FacelakeError(f"live index version {live} still holds {len(leaked)} erased image(s); "
                                    f"run `facelake erase` again (the erasure list already names them)")
        for doomed in _versions_holding(config.root, erased, live, options):
            storage.remove(layout.version_uri(config.root, doomed), recursive=True, options=options)
            summary.versions_removed.append(doomed)
        rootmod.collect_garbage(config.root, options)
        audit.write_record(config.root, {
            "job_id": job_id, "kind": "erase", "started_at": started_at, "erased_at": audit.utc_now(),
            "ids_count": summary.ids, "ids_sha256": sorted(id_hash(i) for i in set(config.ids)),
            "reason": config.reason, "resulting_version": live, "faces_removed": summary.faces_removed,
            "images_with_faces": summary.images_with_faces, "errors_removed": summary.errors_removed,
            "versions_removed": summary.versions_removed}, options)
    return summary


def register(app: typer.Typer) -> None:
    @app.command("erase")
    def erase_command(
        image_ids: list[str] = typer.Argument(None, metavar="[IMAGE_ID]...", help="image ids to erase"),
        root: str = typer.Option(..., "--root", help="ROOT holding the faces of record and the index versions"),
        ids_file: str = typer.Option(None, "--ids-file", help="file with one image id per line"),
        reason: str = typer.Option(..., "--reason", help="why (kept in the erasure list of record)"),
        endpoint_url: str = typer.Option(None, "--endpoint-url", help="S3-compatible endpoint (credentials come from the AWS chain)"),
        keep: int = typer.Option(3, "--keep", help="index versions to keep (older ones holding erased ids are removed)"),
    ) -> None:
        """Remove photos' faces from the record and publish an index version without them."""
        if bool(image_ids) == bool(ids_file):
            raise ConfigError("give either IMAGE_ID ... or --ids-file FILE (one of them)")
        options = StorageOptions.from_env(endpoint_url)
        ids = tuple(image_ids) if image_ids else read_ids_file(ids_file, options)
        summary = run_erase(EraseConfig(root=root, ids=ids, reason=reason, endpoint_url=endpoint_url, keep=keep))
        typer.echo(f"erased {summary.ids} image id(s): {summary.faces_removed} face(s) of "
                   f"{summary.images_with_faces} image(s) and {summary.errors_removed} error row(s) removed "
                   f"from the record; live index version {summary.index_version}; "
                   f"{len(summary.versions_removed)} older version(s) holding erased faces deleted")
