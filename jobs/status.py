"""`facelake status ROOT`: versions, live version, counts, lock, last jobs and last errors.

A malformed file (audit record, embed run summary, erasure list) is reported under "malformed"
and skipped; the rest is still shown. Counts come from metadata (the table version's recorded
counts, the index manifest's total), not from reading every image id: what metadata lacks (a
table version written before image counts were recorded, the images of a root made by `facelake
index`, errors by stage and type) is counted by jobs/work/counts.py, in Ray tasks past its
DRIVER_ROWS. Tested in tests/test_audit.py, tests/test_erase.py and tests/test_counts.py.
"""

from __future__ import annotations

import json

import pyarrow as pa
import pyarrow.compute as pc
import typer

from facelake import storage
from facelake.record import audit
from facelake.record import lock as lockmod
from facelake.record import erasures as erasure_list
from facelake.record import tables as rootmod
from facelake.errors import IndexVersionError
from facelake.jobs.options import EndpointUrl
from facelake.jobs.work import counts
from facelake.storage import StorageOptions

LAST = 5


def collect(root: str, options: StorageOptions | None = None) -> dict:
    """Everything `status` prints, as a dict (notebooks and tests use this)."""
    from facelake.index import layout

    storage.check_uri(root)
    table = rootmod.current(root, options)
    pointer = rootmod.read_pointer(root, options) or {}
    error_parts = [rootmod.uri(root, rootmod.ERRORS, p) for p in table.errors] if table else []
    problems: list[str] = []
    try:
        erased_count = len(pc.unique(erasure_list.erasures(root, options)["image_id"]))
    except erasure_list.ErasureListError as err:
        erased_count, problems = None, [f"erasure list: {err}"]
    versions = []
    for name in layout.list_versions(root, options):
        try:
            manifest = layout.read_manifest(root, name, options)
        except IndexVersionError as err:
            problems.append(f"index version {name}: {err}")
            continue
        versions.append({"version": name, "total": manifest.get("total"), "factory": manifest.get("factory"),
                         "shards": len(manifest.get("shards", [])), "created_at": manifest.get("created_at"),
                         "trained_from": manifest.get("trained_from")})
    runs = []
    for uri in storage.list_files(rootmod.uri(root, rootmod.RUNS), ".json", options)[-LAST:]:
        try:
            runs.append(json.loads(storage.read_bytes(uri, options)))
        except ValueError as err:
            problems.append(f"{storage.redact(uri)}: not JSON ({err})")
    read = audit.read_log(root, options)
    problems += [f"audit: {p}" for p in read.problems]
    records = audit.jobs(read.records)
    keep = ("job_id", "kind", "user", "claimed_user", "started_at", "recorded_at", "status", "outcome",
            "index_version", "resulting_version", "to_embed", "ids_count", "reason", "error")
    try:
        live = layout.current_version(root, options)
    except IndexVersionError as err:
        live, problems = None, problems + [f"index pointer: {err}"]
    return {
        "root": storage.redact(root),
        "live_version": live,
        "versions": versions,
        "table_version": table.name if table else None,
        "table_index_version": pointer.get("index_version"),
        "quantizer": pointer.get("quantizer"),
        "counts": {**(_record_counts(root, table, options) if table else _index_counts(root, live, options)),
                   "errors": table.error_rows if table else 0,
                   "erasures": erased_count},
        "lock": lockmod.read_lock(root, options),
        "staging_runs": rootmod.staging_runs(root, options),
        "last_embed_runs": runs,
        "last_jobs": [{k: r[k] for k in keep if k in r} for r in records[-LAST:]],
        "failed_jobs": [{k: r[k] for k in keep if k in r} for r in records
                        if r.get("status") in ("failed", "interrupted")][-LAST:],
        "problems": problems,
        "errors_by_type": counts.errors_by_type(error_parts, table.error_rows if table else 0, options),
        "last_errors": _last_errors(error_parts, options),
    }


def _last_errors(parts: list[str], options: StorageOptions | None) -> list[dict]:
    """The last LAST error rows of record, read from the last parts only."""
    tables: list[pa.Table] = []
    for part in reversed(parts):
        if sum(t.num_rows for t in tables) >= LAST:
            break
        tables.insert(0, storage.read_file(part, ["image_id", "stage", "error_type", "message"], options))
    if not tables:
        return []
    errors = pa.concat_tables(tables, promote_options="permissive")
    return errors.slice(max(0, errors.num_rows - LAST)).to_pylist()


def _record_counts(root: str, table: rootmod.TableVersion, options: StorageOptions | None) -> dict:
    """Recorded with the table version; versions written before that are counted by tasks."""
    images = table.images
    if images is None:
        images = counts.distinct_images([("parquet", rootmod.uri(root, rootmod.FACES, p)) for p in table.faces],
                                        table.face_rows, options)
    return {"faces": table.face_rows, "images": images, "source": "record"}


def _index_counts(root: str, live: str | None, options: StorageOptions | None) -> dict:
    """A root made by `facelake index` has no table of record: the live version's manifest gives
    its faces; its images are counted over its id tables (jobs/work/counts.py)."""
    from facelake.index.load import open_version

    if live is None:
        return {"faces": 0, "images": 0, "source": "none"}
    handle = open_version(root, live, options=options)
    images = counts.distinct_images([("shard", (root, live, s)) for s in range(handle.shard_count)],
                                    handle.total, options)
    return {"faces": handle.total, "images": images, "source": "live index"}


def print_status(info: dict) -> None:
    echo = typer.echo
    echo(f"root {info['root']}")
    echo(f"live index version: {info['live_version'] or 'none'}"
         + ("" if info["live_version"] == info["table_index_version"] or not info["table_version"]
            else f" (the table of record was last indexed as {info['table_index_version']}: run rebuild)"))
    for v in info["versions"]:
        mark = "*" if v["version"] == info["live_version"] else " "
        echo(f"  {mark} {v['version']}  {v['total']} faces  {v['factory']}  {v['shards']} shard(s)  "
             f"created {v['created_at']}" + (f"  quantizer from {v['trained_from']}" if v["trained_from"] else ""))
    c = info["counts"]
    erasures = f"{c['erasures']} erased ids" if c["erasures"] is not None else "erasure list refused (see below)"
    if c.get("source") == "live index":
        echo(f"no table of record (made by `facelake index`); the live index holds {c['faces']} faces of "
             f"{c['images']} images, {erasures}")
    else:
        echo(f"record (table version {info['table_version'] or 'none'}): {c['faces']} faces of {c['images']} images, "
             f"{c['errors']} errors, {erasures}")
    if info["quantizer"]:
        q = info["quantizer"]
        echo(f"quantizer trained in {q.get('trained_in')} on {q.get('faces')} faces "
             f"(mean nearest-centroid similarity {q.get('mean_similarity', 0):.3f})")
    echo(f"lock: {lockmod.describe(info['lock']) if info['lock'] else 'free'}")
    if info["staging_runs"]:
        echo(f"staging: {', '.join(info['staging_runs'])} (a killed rebuild; the next rebuild resumes it)")
    echo("last jobs:")
    for job in info["last_jobs"] or [{}]:
        if job:
            echo(f"  {job.get('started_at') or job.get('recorded_at')}  {job['kind']:<14} {job['job_id']}  "
                 f"{job.get('user', '')}  {job.get('status', '')} "
                 f"{job.get('index_version') or job.get('resulting_version') or ''}"
                 + (f"  error: {job['error'][:120]}" if job.get("error") else ""))
        else:
            echo("  none")
    for run in info["last_embed_runs"]:
        echo(f"  embed run {run['run_id']}: {run['images']} images, {run['faces']} faces, {run['errors']} errors")
    if info["failed_jobs"]:
        echo("last failed jobs:")
        for job in info["failed_jobs"]:
            echo(f"  {job['job_id']}: {job.get('status')}: {(job.get('error') or '')[:200]}")
    echo("errors of record by stage/type: " + (", ".join(f"{k} {v}" for k, v in sorted(info["errors_by_type"].items()))
                                               or "none"))
    for row in info["last_errors"]:
        echo(f"  {row['image_id']}: {row['stage']}/{row['error_type']}: {(row['message'] or '')[:120]}")
    for problem in info["problems"]:
        echo(f"malformed (skipped): {problem}")


def register(app: typer.Typer) -> None:
    @app.command("status")
    def status_command(
        root: str = typer.Argument(..., metavar="ROOT", help="ROOT managed by rebuild/erase"),
        endpoint_url: EndpointUrl = None,
        as_json: bool = typer.Option(False, "--json", help="print JSON instead of text"),
    ) -> None:
        """Show versions, the live version, counts, the lock, last jobs and last errors of ROOT."""
        info = collect(root, StorageOptions.from_env(endpoint_url))
        if as_json:
            typer.echo(json.dumps(info, indent=2, default=str))
        else:
            print_status(info)
