"""Options several commands share, declared once: ``def cmd(root: Root, endpoint_url: EndpointUrl = None)``.

Each is a typer ``Annotated`` type carrying the option's name and help; the command gives the
default in its signature (none: the option is required). Cheap to import: `facelake --help`
and every command's help load it.
"""

from __future__ import annotations

from typing import Annotated, Optional

import typer

Root = Annotated[str, typer.Option("--root", help="ROOT: the table of record, its index versions and audit log")]
Purpose = Annotated[str, typer.Option("--purpose", help="why this job is run, a case or request reference (audited)")]
EndpointUrl = Annotated[Optional[str], typer.Option(
    "--endpoint-url", help="S3-compatible endpoint (credentials come from the AWS chain)")]
RayAddress = Annotated[Optional[str], typer.Option(
    "--address", help="Ray cluster to join (auto, ray://host:port); default: start a local Ray")]
WeightsFrom = Annotated[Optional[str], typer.Option(
    "--weights-from", help="folder or s3:// prefix holding the weight files")]
AllowRoot = Annotated[list[str], typer.Option(
    "--allow-root", help="only read photos under this root (repeatable)")]
MaxBytes = Annotated[int, typer.Option(
    "--max-bytes", help="refuse photos larger than this many bytes (from stat / HEAD, before reading)")]
