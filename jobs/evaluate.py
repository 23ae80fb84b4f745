"""`facelake evaluate`: measured error rates of a model on a labeled manifest.

    facelake evaluate LABELED_MANIFEST --out REPORT_DIR [--model NAME] [--pairs PAIRS_FILE]
                      [--group-by COL] [--address ADDR]

Three steps, each callable from a notebook:

1. ``embed_labeled`` embeds one face of every labeled photo (the largest, face_index 0; or the
   most central, ``face="central"``, for centred data sets such as LFW) through the embed job
   (``facelake.jobs.embed.run_embed``, on Ray) or, with ``embedder="local"``, through the same
   face pipeline in this process (facelake.evaluation.embeddings). Photos that fail or hold no
   usable face are counted, by type.
2. ``facelake.evaluation.measure.evaluate_embeddings`` (numpy only) measures verification (all
   genuine pairs and every impostor pair, or a seeded sample of them when there are more than
   ``max_impostor_pairs``; or the pairs of an LFW-format pairs file with the 10-fold accuracy
   protocol), 1:N identification (seeded gallery / mated / non-mated split), a calibration table
   and, with a group column, FMR and FNMR per group at one threshold.
3. ``facelake.evaluation.report.write_report`` writes REPORT_DIR/report.md, metrics.json,
   calibration.json and PNG plots.

A comparison matches at threshold t when its similarity (cosine) is >= t. Tested in
tests/test_evaluate.py; the LFW run is bench/eval.py.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass
from typing import Literal

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import typer

from facelake import storage
from facelake.calibration import Calibration
from facelake.errors import ConfigError, ManifestError
from facelake.evaluation.embeddings import (FaceChoice, LabeledEmbeddings, embed_labeled_local, labeled_embeddings,
                                            labeled_rows, read_labeled_manifest)
from facelake.evaluation.measure import DEFAULT_GROUP_FMR, evaluate_embeddings
from facelake.evaluation.metrics import DEFAULT_MAX_IMPOSTOR_PAIRS, DEFAULT_SEED
from facelake.evaluation.protocols import DEFAULT_NON_MATED_FRACTION, read_pairs
from facelake.evaluation.report import write_report
from facelake.faces.reader import DEFAULT_MAX_BYTES, ReadLimits
from facelake.faces.registry import MODELS, get_model


@dataclass(frozen=True)
class EvaluateConfig:
    """Options of one evaluation; ``validate`` checks them before anything is read or embedded."""

    manifest: str
    out: str
    model: str | None = None
    pairs: str | None = None
    group_by: str | None = None
    address: str | None = None
    embedder: Literal["ray", "local"] = "ray"
    workers: int | None = None  # embed job actors (None: the embed job decides)
    # Which face stands for a photo: the largest (face_index 0), or the one nearest the image
    # centre, which is the labeled face of centred data sets like LFW (local embedder only: the
    # faces table does not record image sizes).
    face: FaceChoice = "largest"
    max_impostor_pairs: int = DEFAULT_MAX_IMPOSTOR_PAIRS
    non_mated_fraction: float = DEFAULT_NON_MATED_FRACTION
    group_fmr: float = DEFAULT_GROUP_FMR
    seed: int = DEFAULT_SEED
    dataset: str | None = None  # name recorded in the calibration; default: the manifest's file name
    plots: bool = True
    allowed_roots: tuple[str, ...] = ()  # photos are read only under these (facelake.faces.reader)
    max_bytes: int = DEFAULT_MAX_BYTES

    def validate(self) -> None:
        get_model(self.model)
        for uri in (self.manifest, self.out) + ((self.pairs,) if self.pairs else ()):
            storage.check_uri(uri)
        ReadLimits(self.allowed_roots, self.max_bytes).validate()
        if self.embedder not in ("ray", "local"):
            raise ConfigError(f"embedder must be 'ray' or 'local', not {self.embedder!r}")
        if self.max_impostor_pairs < 1:
            raise ConfigError("--max-impostor-pairs must be at least 1")
        if self.face not in ("largest", "central"):
            raise ConfigError(f"--face must be 'largest' or 'central', not {self.face!r}")
        if self.face == "central" and self.embedder != "local":
            raise ConfigError("--face central needs --embedder local (the embed job's faces table has no image "
                              "sizes to find the centre with)")
        if self.workers is not None and self.workers < 1:
            raise ConfigError("--workers must be at least 1")
        if not 0.0 < self.non_mated_fraction < 1.0:
            raise ConfigError("--non-mated-fraction must be between 0 and 1 (exclusive)")
        if not 0.0 < self.group_fmr < 1.0:
            raise ConfigError("--group-fmr must be between 0 and 1 (exclusive)")
        if self.pairs and not storage.exists(self.pairs):
            raise ConfigError(f"pairs file {storage.redact(self.pairs)} does not exist")


def embed_labeled(config: EvaluateConfig, table: pa.Table) -> LabeledEmbeddings:
    """Embed one face of every labeled row, through the embed job or the local face pipeline."""
    started = time.monotonic()
    if config.embedder == "ray":
        ids = [str(i) for i in labeled_rows(table)["image_id"].to_pylist()]
        vectors, errors = _embed_with_job(config, ids, get_model(config.model).dim)
    else:
        vectors, errors = embed_labeled_local(config.manifest, table, config.model, face=config.face,
                                              limits=ReadLimits(config.allowed_roots, config.max_bytes))
    return labeled_embeddings(table, vectors, errors, group_by=config.group_by,
                              embed_seconds=round(time.monotonic() - started, 3))


def _embed_with_job(config: EvaluateConfig, ids: list[str], dim: int) -> tuple[np.ndarray, dict[str, int]]:
    """Run the embed job into REPORT_DIR/embeddings (resumable) and pick face_index 0 per photo."""
    from facelake.jobs.embed import EmbedConfig, outputs, run_embed

    work = storage.join(config.out, "embeddings")
    run_embed(EmbedConfig(manifest=config.manifest, out=work, model=config.model, address=config.address,
                          workers=config.workers, progress=False, executor="ray", allowed_roots=config.allowed_roots,
                          max_bytes=config.max_bytes))
    layout = outputs(work)
    position = {image_id: i for i, image_id in enumerate(ids)}
    vectors = np.full((len(ids), dim), np.nan, np.float32)
    if storage.list_files(layout["faces"], ".parquet"):
        faces = storage.read_table(layout["faces"], columns=["image_id", "face_index", "embedding"])
        faces = faces.filter(pc.equal(faces["face_index"], 0))
        rows = [position.get(i) for i in faces["image_id"].to_pylist()]
        keep = np.array([r is not None for r in rows], bool)
        matrix = np.asarray(faces["embedding"].combine_chunks().flatten().to_numpy(zero_copy_only=False),
                            np.float32).reshape(-1, dim)
        vectors[np.array([r for r in rows if r is not None], np.int64)] = matrix[keep]
    errors: dict[str, int] = {}
    if storage.list_files(layout["errors"], ".parquet"):
        table = storage.read_table(layout["errors"], columns=["image_id", "error_type"])
        for image_id, kind in zip(table["image_id"].to_pylist(), table["error_type"].to_pylist()):
            if image_id in position:
                errors[kind] = errors.get(kind, 0) + 1
    missing = int(np.isnan(vectors).any(axis=1).sum()) - sum(errors.values())
    if missing > 0:
        errors["NotEmbedded"] = missing
    return vectors, errors


@dataclass
class EvaluateResult:
    """What ``evaluate`` returns: the metrics (score arrays under '_' keys), the calibration, the report's uris."""

    metrics: dict
    calibration: Calibration
    files: dict[str, str]


def evaluate(config: EvaluateConfig) -> EvaluateResult:
    """Embed a labeled manifest, measure, and write the report (what `facelake evaluate` runs)."""
    config.validate()
    table = read_labeled_manifest(config.manifest, config.group_by)
    pairs = read_pairs(config.pairs) if config.pairs else None
    emb = embed_labeled(config, table)
    if emb.ok.sum() < 2:
        raise ManifestError(f"only {int(emb.ok.sum())} photo(s) of {len(emb.image_ids)} yielded a usable face "
                            f"({emb.errors}); evaluation needs at least two")
    dataset = config.dataset or os.path.basename(config.manifest.rstrip("/")).rsplit(".", 1)[0]
    metrics, calibration = evaluate_embeddings(
        emb, model=config.model, dataset=dataset, pairs=pairs, max_impostor_pairs=config.max_impostor_pairs,
        non_mated_fraction=config.non_mated_fraction, group_fmr=config.group_fmr, seed=config.seed,
        face=config.face)
    files = write_report(metrics, calibration, config.out, plots=config.plots)
    return EvaluateResult(metrics=metrics, calibration=calibration, files=files)


def register(app: typer.Typer) -> None:
    @app.command("evaluate")
    def evaluate_command(
        manifest_uri: str = typer.Argument(..., metavar="LABELED_MANIFEST",
                                           help="Parquet manifest with an 'identity' column"),
        out: str = typer.Option(..., "--out", help="report folder: report.md, metrics.json, calibration.json, PNGs"),
        model: str = typer.Option(None, help=f"registered model ({', '.join(MODELS)})"),
        pairs: str = typer.Option(None, "--pairs", help="LFW-format pairs file (10 folds) for the k-fold protocol"),
        group_by: str = typer.Option(None, "--group-by", help="manifest column: FMR and FNMR per group"),
        address: str = typer.Option(None, help="Ray cluster to join; default: start a local Ray"),
        embedder: str = typer.Option("ray", help="'ray' (the embed job) or 'local' (one process)"),
        face: str = typer.Option("largest", help="face per photo: 'largest', or 'central' (LFW-style centred "
                                                 "data sets; needs --embedder local)"),
        max_impostor_pairs: int = typer.Option(DEFAULT_MAX_IMPOSTOR_PAIRS, help="sample impostor pairs beyond this many"),
        seed: int = typer.Option(DEFAULT_SEED, help="seed for impostor sampling and the gallery split"),
        workers: int = typer.Option(None, help="embed job model actors (default: the embed job decides)"),
        allow_root: list[str] = typer.Option([], "--allow-root", help="only read photos under this root (repeatable)"),
        max_bytes: int = typer.Option(DEFAULT_MAX_BYTES, "--max-bytes", help="refuse photos larger than this many bytes (before reading)"),
    ) -> None:
        """Measure verification, identification and calibration on a labeled manifest."""
        result = evaluate(EvaluateConfig(manifest=manifest_uri, out=out, model=model, pairs=pairs,
                                         group_by=group_by, address=address, embedder=embedder, face=face,
                                         max_impostor_pairs=max_impostor_pairs, seed=seed, workers=workers,
                                         allowed_roots=tuple(allow_root), max_bytes=max_bytes))
        m = result.metrics
        typer.echo(f"{m['photos']['embedded']}/{m['photos']['labeled']} photos embedded; "
                   f"{m['verification']['genuine_pairs']:,} genuine / {m['verification']['impostor_pairs']:,} impostor pairs")
        if "pairs_protocol" in m:
            typer.echo(f"pairs-file accuracy (10-fold): {100 * m['pairs_protocol']['accuracy']:.2f}%")
        for row in m["verification"]["tar_at_far"]:
            typer.echo(f"TAR@FAR={row['far']:g}: " + (f"{100 * row['tar']:.2f}%" if row["tar"] is not None else row["note"]))
        typer.echo(f"report: {result.files['report.md']}")
