"""`facelake submit` and `facelake jobs`: run facelake commands as Ray jobs on a cluster, and follow them.

Thin layer over facelake.cluster.submit. Exit codes follow the job's outcome so schedulers can
react: 0 succeeded, 1 failed, 3 stopped, 4 not finished yet (`jobs status`), 2 a user error.
"""

from __future__ import annotations

import sys
import time
from typing import Annotated, Optional

import typer


def _jobsubmit():
    """facelake.cluster.submit, imported when a submit or jobs command runs: it imports Ray, which
    every other command (a local `facelake embed` above all) starts faster without."""
    from facelake.cluster import submit

    return submit

ADDRESS_ENV = "RAY_API_SERVER_ADDRESS"  # the variable `ray job` itself reads
JobServer = Annotated[Optional[str], typer.Option(
    "--address", envvar=ADDRESS_ENV, help="the cluster's job server (Ray dashboard), e.g. http://HEAD:8265")]
JobId = Annotated[str, typer.Argument(help="the submission id `submit` printed")]


def register(app: typer.Typer) -> None:
    @app.command("submit", context_settings={"allow_interspersed_args": False})
    def submit_command(
        command: list[str] = typer.Argument(..., metavar="COMMAND...",
                                            help="the facelake command to run on the cluster, after --"),
        address: JobServer = None,
        wait: bool = typer.Option(False, "--wait", help="follow the job's logs to its end; exit with its outcome"),
        pip: list[str] = typer.Option(None, "--pip", help="install this requirement into the job's runtime "
                                      "environment (e.g. facelake==0.1.0, with the gpu extra on GPU nodes) instead of using the "
                                      "facelake installed on the cluster; repeatable"),
        num_gpus: float = typer.Option(None, "--entrypoint-gpus", help="GPUs reserved for the job's driver "
                                       "(default none: the driver only orchestrates; tasks ask for their own)"),
    ) -> None:
        """Run `facelake COMMAND ...` as a Ray job on the cluster; print its id (and follow it with --wait).

        Storage credentials are never sent: the cluster's nodes use their own credential chain.
        """
        job_id = _jobsubmit().submit(address, command, pip=pip or None, entrypoint_num_gpus=num_gpus)
        if not wait:
            typer.echo(job_id)
            typer.echo(f"follow it with: facelake jobs logs --follow {job_id} --address ...", err=True)
            return
        typer.echo(f"submitted {job_id}", err=True)
        final = _jobsubmit().follow(address, job_id)
        typer.echo(f"job {job_id} {final}", err=True)
        if final == "FAILED":
            hint = _jobsubmit().failure_hint(_jobsubmit().status(address, job_id).message)
            if hint:
                typer.secho(f"error: {hint}", fg=typer.colors.RED, err=True)
        raise typer.Exit(_jobsubmit().exit_code(final))

    jobs_app = typer.Typer(no_args_is_help=True, help="List, inspect, follow and stop facelake's Ray jobs.")
    app.add_typer(jobs_app, name="jobs")

    @jobs_app.command("list")
    def list_command(address: JobServer = None) -> None:
        """facelake's jobs on the cluster, oldest first: id, status, start, duration, user, command."""
        rows = _jobsubmit().list_jobs(address)
        header = ("JOB ID", "STATUS", "START (UTC)", "DURATION", "USER", "COMMAND")
        table = [header] + [(r.job_id, r.status, r.start.strftime("%Y-%m-%d %H:%M:%S") if r.start else "-",
                             _jobsubmit().format_duration(r.duration_s), r.user, r.entrypoint) for r in rows]
        widths = [max(len(row[i]) for row in table) for i in range(len(header) - 1)]
        for row in table:
            typer.echo("  ".join(cell.ljust(w) for cell, w in zip(row, widths)) + "  " + row[-1])

    @jobs_app.command("status")
    def status_command(
        job_id: JobId,
        address: JobServer = None,
    ) -> None:
        """One job's status; exit code 0 succeeded, 1 failed, 3 stopped, 4 still pending or running."""
        row = _jobsubmit().status(address, job_id)
        typer.echo(f"{row.job_id}  {row.status}  {_jobsubmit().format_duration(row.duration_s)}  {row.entrypoint}")
        if row.message:
            typer.echo(row.message)
        raise typer.Exit(_jobsubmit().exit_code(row.status))

    @jobs_app.command("logs")
    def logs_command(
        job_id: JobId,
        address: JobServer = None,
        follow: bool = typer.Option(False, "--follow", "-f", help="keep streaming until the job ends; exit with its outcome"),
    ) -> None:
        """Print a job's logs (so far, or to its end with --follow)."""
        if follow:
            raise typer.Exit(_jobsubmit().exit_code(_jobsubmit().follow(address, job_id)))
        sys.stdout.write(_jobsubmit().logs(address, job_id))
        sys.stdout.flush()

    @jobs_app.command("stop")
    def stop_command(
        job_id: JobId,
        address: JobServer = None,
    ) -> None:
        """Stop a job and wait until it has ended; exit 0 once stopped (or its outcome if it had already ended)."""
        final = _jobsubmit().stop(address, job_id)
        typer.echo(f"{job_id} {final}")
        raise typer.Exit(EXIT_STOP_OK if final == "STOPPED" else _jobsubmit().exit_code(final))

    @app.command("sleep", hidden=True)
    def sleep_command(seconds: float = typer.Argument(..., help="how long to sleep")) -> None:
        """Debug: print a line, sleep, print a line (tests use it as a long job to stop)."""
        typer.echo(f"sleeping {seconds:g}s")
        sys.stdout.flush()
        time.sleep(seconds)
        typer.echo("slept")


# `jobs stop` succeeded in what it was asked: the job is stopped.
EXIT_STOP_OK = 0
