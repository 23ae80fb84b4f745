"""`facelake audit ROOT`: list the audit records of a root (searches, erasures, rebuilds).

    facelake audit ROOT [--kind search] [--json] [--verify] [--endpoint-url URL]

A table, one row per job, oldest first: time, job id, kind, user (the OS user; a claimed
FACELAKE_USER is shown as "os-user (as claimed)"), purpose, mode, index version, counts, status
("started" alone means the job is running or was killed outright). ``--json`` prints the jobs'
latest records (one JSON list). A malformed file is reported on stderr and skipped (exit 1 at
the end). ``--verify`` checks the hash chain and names the first broken link (exit 1).
Reading never changes the log. Library: ``facelake.record.audit.read_log`` / ``verify``; ``rows(records)``
gives the table's rows. Tested in tests/test_audit.py and tests/test_search.py.
"""

from __future__ import annotations

import json

import typer

from facelake import storage
from facelake.jobs.options import EndpointUrl
from facelake.record import audit

COLUMNS = ("time", "job_id", "kind", "user", "purpose", "mode", "version", "counts", "status")
# Purpose is free text; the table shows its start (the full text is in --json).
PURPOSE_WIDTH = 40


def _counts(record: dict) -> str:
    counts = record.get("counts") or {}
    if not counts:
        return ""
    if "probe_images" in counts:
        return (f"{counts.get('probe_images', 0)} probes/{counts.get('probe_faces', 0)} faces/"
                f"{counts.get('result_rows', 0)} results/{counts.get('probe_errors', 0)} errors")
    return " ".join(f"{k}={v}" for k, v in sorted(counts.items()))


def _short(text: str, width: int) -> str:
    text = " ".join(str(text).split())
    return text if len(text) <= width else text[:width - 1] + "…"


def rows(records: list[dict]) -> list[dict[str, str]]:
    """One display row per record (strings), in the order given."""
    out = []
    for r in records:
        status = r.get("status") or ""
        if status == "failed" and r.get("error"):
            status = f"failed: {_short(r['error'], 60)}"
        out.append({
            "time": r.get("started_at") or r.get("recorded_at") or "",
            "job_id": r.get("job_id", ""),
            "kind": r.get("kind", ""),
            "user": r.get("user", "") + (f" (as {r['claimed_user']})" if r.get("claimed_user") else ""),
            "purpose": _short(r.get("purpose") or "", PURPOSE_WIDTH),
            "mode": r.get("mode") or "",
            "version": r.get("index_version") or "",
            "counts": _counts(r),
            "status": status,
        })
    return out


def format_table(table_rows: list[dict[str, str]]) -> str:
    widths = {c: max([len(c)] + [len(row[c]) for row in table_rows]) for c in COLUMNS}
    lines = ["  ".join(c.upper().ljust(widths[c]) for c in COLUMNS).rstrip()]
    for row in table_rows:
        lines.append("  ".join(row[c].ljust(widths[c]) for c in COLUMNS).rstrip())
    return "\n".join(lines)


def register(app: typer.Typer) -> None:
    @app.command("audit")
    def audit_command(
        root: str = typer.Argument(..., metavar="ROOT", help="root whose audit log (ROOT/audit/) is listed"),
        kind: str = typer.Option(None, "--kind", help="only records of this kind (search, erase, ...)"),
        as_json: bool = typer.Option(False, "--json", help="print the full records as one JSON list"),
        verify: bool = typer.Option(False, "--verify", help="check the hash chain; name the first broken link"),
        endpoint_url: EndpointUrl = None,
    ) -> None:
        """List the audit records of a root, oldest first (or --verify the chain)."""
        storage.check_uri(root)
        options = storage.StorageOptions.from_env(endpoint_url)
        if verify:
            count, broken = audit.verify(root, options)
            if broken:
                typer.secho(f"audit log of {storage.redact(root)} is broken after {count} good record(s): {broken}",
                            err=True, fg=typer.colors.RED)
                raise typer.Exit(1)
            typer.echo(f"audit log of {storage.redact(root)} verified: {count} record(s), hash chain intact")
            return
        read = audit.read_log(root, options)
        for problem in read.problems:
            typer.secho(f"skipped malformed audit file {problem}", err=True, fg=typer.colors.YELLOW)
        records = [r for r in audit.jobs(read.records) if kind is None or r["kind"] == kind]
        if as_json:
            typer.echo(json.dumps(records, indent=2, sort_keys=True, default=str))
        elif not records:
            typer.echo(f"no audit records under {storage.redact(audit.audit_dir(root))}")
        else:
            typer.echo(format_table(rows(records)))
        if read.problems:
            raise typer.Exit(1)
