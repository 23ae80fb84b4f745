"""Labeled photos and their embeddings: the labeled manifest, one face per photo, and local embedding.

A labeled manifest is a manifest with a string column ``identity`` (the person in each photo);
rows without one are skipped. ``embed_largest_faces_local`` runs the embed job's face pipeline
(facelake.faces.pipeline) in this process; the embed job on Ray is the command's
(facelake.jobs.evaluate). Tested in tests/test_evaluate.py.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from typing import Literal

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from facelake import storage
from facelake.errors import ManifestError
from facelake.faces import manifest
from facelake.faces.reader import ReadLimits

log = logging.getLogger(__name__)

IDENTITY = "identity"
# Which face stands for a photo: the largest (face_index 0), or the one nearest the image centre.
FaceChoice = Literal["largest", "central"]


@dataclass
class LabeledEmbeddings:
    """One row per labeled photo: its identity, optional group, and the chosen face's embedding."""

    image_ids: list[str]
    identities: np.ndarray            # object array of str
    embeddings: np.ndarray            # (n, d) float32; NaN rows for photos without a usable face
    groups: np.ndarray | None = None  # object array, or None
    errors: dict[str, int] = field(default_factory=dict)  # error_type -> photos
    unlabeled: int = 0                # manifest rows without an identity (skipped)
    embed_seconds: float = 0.0

    @property
    def ok(self) -> np.ndarray:
        return ~np.isnan(self.embeddings).any(axis=1)


def labeled_rows(table: pa.Table) -> pa.Table:
    """The rows of a manifest table whose identity is set and not empty."""
    identity = table[IDENTITY]
    return table.filter(pc.and_(pc.is_valid(identity), pc.not_equal(pc.cast(identity, pa.string()), "")))


def read_labeled_manifest(uri: str, group_by: str | None = None) -> pa.Table:
    """Read a manifest and check it has identity labels (and the group column, when asked)."""
    info = manifest.validate(uri)
    if IDENTITY not in info.schema.names:
        raise ManifestError(
            f"manifest {storage.redact(uri)} has no '{IDENTITY}' column, so there is nothing to measure "
            f"errors against: add a string column '{IDENTITY}' naming the person in each photo "
            f"(its columns are {info.schema.names})")
    if group_by and group_by not in info.schema.names:
        raise ManifestError(f"--group-by column {group_by!r} is not in manifest {storage.redact(uri)} "
                            f"(its columns are {info.schema.names})")
    table = storage.read_table(uri)
    if labeled_rows(table).num_rows == 0:
        raise ManifestError(f"manifest {storage.redact(uri)} has an '{IDENTITY}' column but no row has a value")
    return table


def labeled_embeddings(table: pa.Table, vectors: np.ndarray, errors: dict[str, int], *,
                       group_by: str | None = None, embed_seconds: float = 0.0) -> LabeledEmbeddings:
    """Bundle the embeddings of ``table``'s labeled rows (in their order) with identities and groups."""
    labeled = labeled_rows(table)
    groups = None
    if group_by:
        groups = np.array([None if g is None else str(g) for g in labeled[group_by].to_pylist()], object)
    return LabeledEmbeddings(
        image_ids=[str(i) for i in labeled["image_id"].to_pylist()],
        identities=np.array([str(x) for x in labeled[IDENTITY].to_pylist()], object),
        embeddings=vectors, groups=groups, errors=errors, unlabeled=table.num_rows - labeled.num_rows,
        embed_seconds=embed_seconds)


def embed_labeled_local(manifest_uri: str, table: pa.Table, model: str | None = None, *,
                        face: FaceChoice = "largest", limits: ReadLimits = ReadLimits()
                        ) -> tuple[np.ndarray, dict[str, int]]:
    """Embed one face of each labeled row of ``table`` in this process; relative uris resolve
    against the manifest's folder. Returns (embeddings with NaN rows for failures, error_type -> photos)."""
    uris = labeled_rows(table)["uri"].to_pylist()
    vectors, errors = embed_largest_faces_local(uris, model, face=face, limits=limits,
                                                base=manifest.base_dir(manifest_uri))
    counts: dict[str, int] = {}
    for err in errors:
        counts[err["error_type"]] = counts.get(err["error_type"], 0) + 1
    return vectors, counts


def embed_largest_faces_local(uris: list[str], model: str | None = None, *, threads: int | None = None,
                              batch_size: int | None = None, progress_every: int = 0,
                              face: FaceChoice = "largest", limits: ReadLimits = ReadLimits(),
                              base: str = "") -> tuple[np.ndarray, list[dict]]:
    """Embed one usable face of each image in this process (no Ray), through the embed job's face
    pipeline (facelake.faces.pipeline: same reads, detector, quality floor, alignment and recognizer):
    the largest (face_index 0), or with ``face="central"`` the one whose box centre is nearest
    the image centre (the labeled face of centred data sets such as LFW, where the largest face
    is sometimes a bystander's). ``threads`` (default: this process's CPUs) prepare images while
    the recognizer runs with as many; ``batch_size`` images go to each recognizer call.

    Returns (embeddings (n, d) float32 with NaN rows for failures, list of error dicts: row, uri,
    stage, error_type, message).
    """
    from facelake.faces.models import FaceEngine, default_threads
    from facelake.faces.pipeline import DEFAULT_BATCH_SIZE, FacePipeline

    threads = threads or default_threads()
    engine = FaceEngine(model, threads=1, recognizer_threads=threads)
    out = np.full((len(uris), engine.spec.dim), np.nan, np.float32)
    errors: list[dict] = []
    started = time.monotonic()
    rows = ({"image_id": str(row), "uri": uri} for row, uri in enumerate(uris))
    with FacePipeline(engine, limits=limits, base_dir=base, threads=threads,
                      batch_size=batch_size or DEFAULT_BATCH_SIZE) as pipeline:
        for row, outcome in enumerate(pipeline.run(rows)):
            if outcome.error is not None:  # recorded, never fatal
                errors.append({"row": row, "uri": uris[row], "stage": outcome.error.stage,
                               "error_type": outcome.error.error_type, "message": outcome.error.message})
            else:
                out[row] = chosen_face(outcome, face).embedding
            if progress_every and (row + 1) % progress_every == 0:
                log.warning("embedded %d/%d photos in %.0f s", row + 1, len(uris), time.monotonic() - started)
    return out, errors


def chosen_face(outcome, face: FaceChoice = "largest"):
    """The face that stands for a photo among the pipeline's usable faces (largest first): the
    largest, or the one whose box centre is nearest the image centre."""
    if face == "largest":
        return outcome.faces[0]
    cy, cx = outcome.image_size[0] / 2, outcome.image_size[1] / 2
    return min(outcome.faces,
               key=lambda d: (d.bbox[0] + d.bbox[2] / 2 - cx) ** 2 + (d.bbox[1] + d.bbox[3] / 2 - cy) ** 2)
