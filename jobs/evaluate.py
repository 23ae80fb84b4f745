"""`facelake evaluate`: measured error rates of a model on a labeled manifest.

    facelake evaluate LABELED_MANIFEST --out REPORT_DIR [--model NAME] [--pairs PAIRS_FILE]
                      [--group-by COL] [--address ADDR]

Three steps, each callable from a notebook:

1. ``embed_labeled`` embeds the largest face of every labeled photo (face_index 0; or the most
   central face, ``face="central"``, for centred data sets such as LFW) through the
   embed job (``facelake.jobs.embed.run_embed``, on Ray) or, with ``embedder="local"``, through
   the same face pipeline (facelake.faces.pipeline) in this process. Photos that fail or hold no usable face are counted, by type.
2. ``evaluate_embeddings`` (numpy only) measures verification (all genuine pairs and every
   impostor pair, or a seeded sample of them when there are more than ``max_impostor_pairs``;
   or the pairs of an LFW-format pairs file with the 10-fold accuracy protocol), 1:N
   identification (seeded gallery / mated / non-mated split), a calibration table and, with a
   group column, FMR and FNMR per group at one threshold.
3. ``write_report`` writes REPORT_DIR/report.md, metrics.json, calibration.json and PNG plots.

A comparison matches at threshold t when its similarity (cosine) is >= t. Tested in
tests/test_evaluate.py; the LFW run is bench/eval.py.
"""

from __future__ import annotations

import json
import logging
import math
import os
import tempfile
import time
from dataclasses import dataclass, field
from typing import Literal

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import typer

from facelake import storage
from facelake.calibration import Calibration, CalibrationError, wilson_upper
from facelake.errors import ConfigError, ManifestError
from facelake.faces.registry import MODELS, get_model
from facelake.faces.reader import DEFAULT_MAX_BYTES, ReadLimits

log = logging.getLogger(__name__)

IDENTITY = "identity"
# Impostor pairs beyond this many are sampled (seeded) rather than all enumerated: 10M pairs
# certify FMR down to ~3e-7 and cost ~40 MB of float32 scores.
DEFAULT_MAX_IMPOSTOR_PAIRS = 10_000_000
VERIFICATION_FARS = (1e-1, 1e-2, 1e-3, 1e-4, 1e-5)
IDENTIFICATION_FPIRS = (1e-1, 1e-2, 1e-3)
RANKS = (1, 10)
# Per-comparison FMR at which group-by rates are compared (and calibration thresholds shown).
DEFAULT_GROUP_FMR = 1e-3
# Share of identities held out of the gallery to supply non-mated probes.
DEFAULT_NON_MATED_FRACTION = 0.3
DEFAULT_SEED = 0


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
    face: Literal["largest", "central"] = "largest"
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


@dataclass
class LabeledEmbeddings:
    """One row per labeled photo: its identity, optional group, and the largest face's embedding."""

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


# ------------------------------------------------------------------------------ step 1: embed

def read_labeled_manifest(uri: str, group_by: str | None = None) -> pa.Table:
    """Read a manifest and check it has identity labels (and the group column, when asked)."""
    from facelake.faces import manifest

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
    labeled = pc.and_(pc.is_valid(table[IDENTITY]), pc.not_equal(pc.cast(table[IDENTITY], pa.string()), ""))
    if pc.sum(labeled).as_py() in (None, 0):
        raise ManifestError(f"manifest {storage.redact(uri)} has an '{IDENTITY}' column but no row has a value")
    return table


def embed_labeled(config: EvaluateConfig, table: pa.Table) -> LabeledEmbeddings:
    """Embed the largest face of every labeled row, through the embed job or the local face pipeline."""
    spec = get_model(config.model)
    labeled_mask = pc.and_(pc.is_valid(table[IDENTITY]), pc.not_equal(pc.cast(table[IDENTITY], pa.string()), ""))
    labeled = table.filter(labeled_mask)
    ids = [str(i) for i in labeled["image_id"].to_pylist()]
    started = time.monotonic()
    if config.embedder == "ray":
        vectors, errors = _embed_with_job(config, ids, spec.dim)
    else:
        vectors, errors = _embed_local(config, labeled, spec.dim)
    groups = None
    if config.group_by:
        groups = np.array([None if g is None else str(g) for g in labeled[config.group_by].to_pylist()], object)
    return LabeledEmbeddings(
        image_ids=ids, identities=np.array([str(x) for x in labeled[IDENTITY].to_pylist()], object),
        embeddings=vectors, groups=groups, errors=errors, unlabeled=table.num_rows - labeled.num_rows,
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


def _embed_local(config: EvaluateConfig, labeled: pa.Table, dim: int) -> tuple[np.ndarray, dict[str, int]]:
    from facelake.faces.manifest import base_dir

    vectors, errors = embed_largest_faces_local(labeled["uri"].to_pylist(), config.model, face=config.face,
                                                limits=ReadLimits(config.allowed_roots, config.max_bytes),
                                                base=base_dir(config.manifest))
    counts: dict[str, int] = {}
    for err in errors:
        counts[err["error_type"]] = counts.get(err["error_type"], 0) + 1
    return vectors, counts


def embed_largest_faces_local(uris: list[str], model: str | None = None, *, threads: int | None = None,
                              batch_size: int | None = None, progress_every: int = 0,
                              face: Literal["largest", "central"] = "largest",
                              limits: ReadLimits = ReadLimits(), base: str = ""):
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


def chosen_face(outcome, face: Literal["largest", "central"] = "largest"):
    """The face that stands for a photo among the pipeline's usable faces (largest first): the
    largest, or the one whose box centre is nearest the image centre."""
    if face == "largest":
        return outcome.faces[0]
    cy, cx = outcome.image_size[0] / 2, outcome.image_size[1] / 2
    return min(outcome.faces, key=lambda d: (d.bbox[0] + d.bbox[2] / 2 - cx) ** 2 + (d.bbox[1] + d.bbox[3] / 2 - cy) ** 2)


# ------------------------------------------------------------------------- step 2: measure

def genuine_scores(embeddings: np.ndarray, identities: np.ndarray) -> np.ndarray:
    """Similarity of every pair of photos of the same identity (i < j)."""
    order = np.argsort(identities, kind="stable")
    ids_sorted = identities[order]
    starts = np.flatnonzero(np.r_[True, ids_sorted[1:] != ids_sorted[:-1]])
    ends = np.r_[starts[1:], len(ids_sorted)]
    out = []
    for a, b in zip(starts, ends):
        if b - a < 2:
            continue
        block = embeddings[order[a:b]]
        sims = block @ block.T
        out.append(sims[np.triu_indices(b - a, 1)])
    return np.concatenate(out).astype(np.float32) if out else np.zeros(0, np.float32)


def impostor_scores(embeddings: np.ndarray, identities: np.ndarray, *, max_pairs: int,
                    seed: int = DEFAULT_SEED, block: int = 2048) -> tuple[np.ndarray, bool]:
    """Similarity of impostor pairs: all of them when there are at most ``max_pairs``, else a
    seeded uniform sample (with replacement) of ``max_pairs``. Returns (scores, sampled)."""
    n = len(identities)
    _, codes, counts = np.unique(identities, return_inverse=True, return_counts=True)
    total = n * (n - 1) // 2 - int((counts * (counts - 1) // 2).sum())
    if total <= max_pairs:
        out = []
        for start in range(0, n, block):
            sims = embeddings[start:start + block] @ embeddings.T
            rows = np.arange(start, min(n, start + block))[:, None]
            mask = (np.arange(n)[None, :] > rows) & (codes[start:start + block, None] != codes[None, :])
            out.append(sims[mask])
        return (np.concatenate(out).astype(np.float32) if out else np.zeros(0, np.float32)), False
    rng = np.random.default_rng(seed)
    scores = []
    have = 0
    while have < max_pairs:
        want = int((max_pairs - have) * 1.2) + 1000
        i = rng.integers(0, n, want)
        j = rng.integers(0, n, want)
        keep = codes[i] != codes[j]
        i, j = i[keep][:max_pairs - have], j[keep][:max_pairs - have]
        for s in range(0, len(i), 1 << 20):
            scores.append(np.einsum("ij,ij->i", embeddings[i[s:s + (1 << 20)]], embeddings[j[s:s + (1 << 20)]]))
        have += len(i)
    return np.concatenate(scores).astype(np.float32), True


def roc(genuine: np.ndarray, impostor: np.ndarray, points: int = 2000) -> dict[str, np.ndarray]:
    """FMR, TAR and thresholds at up to ``points`` thresholds (all distinct tail scores kept)."""
    imp = np.sort(impostor)
    gen = np.sort(genuine)
    # thresholds: the impostor tail at every order statistic up to 1000, then quantiles
    tail = imp[::-1][:min(len(imp), 1000)]
    quant = np.quantile(np.r_[imp, gen], np.linspace(0, 1, points)) if len(gen) else np.quantile(imp, np.linspace(0, 1, points))
    thresholds = np.unique(np.r_[tail, quant, np.nextafter(imp[-1], np.inf)])
    fmr = (len(imp) - np.searchsorted(imp, thresholds, side="left")) / len(imp)
    fnmr = np.searchsorted(gen, thresholds, side="left") / max(1, len(gen))
    return {"threshold": thresholds, "fmr": fmr, "fnmr": fnmr, "tar": 1 - fnmr}


def tar_at_far(genuine: np.ndarray, impostor: np.ndarray, fars=VERIFICATION_FARS) -> list[dict]:
    """TAR at each FAR (empirical: the lowest threshold with measured FAR <= target), where the
    impostor pairs can show it (at least 1/FAR of them); otherwise 'insufficient impostors'."""
    imp_desc = np.sort(impostor)[::-1]
    gen = np.sort(genuine)
    out = []
    for far in fars:
        allowed = int(math.floor(far * len(imp_desc)))
        if allowed < 1:
            out.append({"far": far, "tar": None, "threshold": None, "n_impostor": len(imp_desc),
                        "note": f"insufficient impostors ({len(imp_desc):,} < {math.ceil(1 / far):,})"})
            continue
        # accept s >= t; with t just above the allowed-th highest impostor, at most `allowed` pass
        t = float(np.nextafter(imp_desc[allowed], np.inf)) if allowed < len(imp_desc) else float(imp_desc[-1])
        measured = float((len(imp_desc) - np.searchsorted(imp_desc[::-1], t, side="left")) / len(imp_desc))
        tar = 1.0 - np.searchsorted(gen, t, side="left") / max(1, len(gen))
        out.append({"far": far, "tar": float(tar), "threshold": t, "measured_far": measured,
                    "n_impostor": len(imp_desc), "n_genuine": len(gen)})
    return out


def _empirical_threshold(impostor: np.ndarray, far: float) -> float:
    """The lowest threshold at which at most floor(far * n) impostor pairs match."""
    desc = np.sort(impostor)[::-1]
    allowed = int(math.floor(far * len(desc)))
    return float(np.nextafter(desc[allowed], np.inf)) if allowed < len(desc) else float(desc[-1])


def read_pairs(uri: str) -> tuple[list[tuple[str, str, bool]], np.ndarray, int]:
    """Parse an LFW pairs.txt: header 'folds n', then n same and n different pairs per fold.

    Same: 'Name i j'; different: 'Name1 i Name2 j'. Returns ([(a, b, same)], fold per pair, folds)
    with photo keys 'Name_000i'.
    """
    lines = [ln.split() for ln in storage.read_bytes(uri).decode().splitlines() if ln.strip()]
    try:
        folds, per = int(lines[0][0]), int(lines[0][1])
        pairs = []
        for parts in lines[1:]:
            if len(parts) == 3:
                pairs.append((f"{parts[0]}_{int(parts[1]):04d}", f"{parts[0]}_{int(parts[2]):04d}", True))
            elif len(parts) == 4:
                pairs.append((f"{parts[0]}_{int(parts[1]):04d}", f"{parts[2]}_{int(parts[3]):04d}", False))
            else:
                raise ValueError(f"line {' '.join(parts)!r} has {len(parts)} fields, not 3 or 4")
    except (IndexError, ValueError) as err:
        raise ConfigError(f"{storage.redact(uri)} is not an LFW-format pairs file ({err}): expected a "
                          "'folds n' header, then 'Name i j' (same) and 'Name1 i Name2 j' (different) lines") from err
    if len(pairs) != folds * 2 * per:
        raise ConfigError(f"{storage.redact(uri)} declares {folds} folds x {2 * per} pairs but holds {len(pairs)}")
    return pairs, np.arange(len(pairs)) // (2 * per), folds


def _best_threshold(scores: np.ndarray, same: np.ndarray) -> float:
    """The threshold that maximises accuracy on these pairs (midpoint between adjacent scores)."""
    order = np.argsort(scores)
    s, y = scores[order], same[order]
    # accept s >= t. Placing t just below s[k]: accepted = k.., correct = (#diff below) + (#same from k)
    diff_below = np.r_[0, np.cumsum(~y)]
    same_from = np.r_[np.cumsum(y[::-1])[::-1], 0]
    k = int(np.argmax(diff_below + same_from))
    if k == 0:
        return float(s[0]) - 1e-6
    if k == len(s):
        return float(s[-1]) + 1e-6
    return float((s[k - 1] + s[k]) / 2)


def pairs_protocol(emb: LabeledEmbeddings, pairs: list[tuple[str, str, bool]], fold_of: np.ndarray,
                   folds: int, uris: dict[str, int]) -> dict:
    """k-fold verification accuracy on given pairs: threshold chosen on k-1 folds, tested on the
    held-out one. A pair with a failed photo counts as an error ('strict', the headline figure);
    'excluding_failed' drops such pairs instead."""
    same = np.array([p[2] for p in pairs], bool)
    idx_a = np.array([uris.get(p[0], -1) for p in pairs])
    idx_b = np.array([uris.get(p[1], -1) for p in pairs])
    unknown = int(((idx_a < 0) | (idx_b < 0)).sum())
    ok = emb.ok
    valid = (idx_a >= 0) & (idx_b >= 0)
    valid[valid] &= ok[idx_a[valid]] & ok[idx_b[valid]]
    scores = np.full(len(pairs), np.nan)
    scores[valid] = np.einsum("ij,ij->i", emb.embeddings[idx_a[valid]], emb.embeddings[idx_b[valid]])
    strict, excluding, thresholds = [], [], []
    for k in range(folds):
        train = (fold_of != k) & valid
        test = fold_of == k
        t = _best_threshold(scores[train], same[train])
        thresholds.append(t)
        correct = valid[test] & ((scores[test] >= t) == same[test])
        strict.append(float(correct.sum() / test.sum()))
        tv = test & valid
        excluding.append(float((((scores[tv] >= t) == same[tv]).sum()) / max(1, tv.sum())))
    gen, imp = scores[valid & same], scores[valid & ~same]
    return {
        "pairs": len(pairs), "folds": folds, "pairs_with_failed_photo": int((~valid).sum()),
        "pairs_with_unknown_photo": unknown,
        "accuracy": float(np.mean(strict)), "accuracy_std": float(np.std(strict)),
        "accuracy_excluding_failed": float(np.mean(excluding)),
        "fold_accuracy": strict, "fold_thresholds": thresholds,
        "failed_pair_rule": "a pair with a photo that failed (no usable face) counts as an error in 'accuracy'; "
                            "'accuracy_excluding_failed' leaves such pairs out",
        "tar_at_far": tar_at_far(gen, imp),
        "genuine_mean": float(gen.mean()) if len(gen) else None,
        "impostor_mean": float(imp.mean()) if len(imp) else None,
        "_genuine": gen, "_impostor": imp,
    }


def identification(emb: LabeledEmbeddings, *, non_mated_fraction: float, seed: int,
                   calibration: Calibration | None = None) -> dict:
    """1:N: one photo of each enrolled identity in the gallery, one other photo of it as a mated
    probe; every photo of the held-out identities is a non-mated probe.

    A mated search succeeds at rank R when the mate is among the R highest scores; FNIR at a
    threshold counts a mated search as missed unless its mate is at rank 1 with score >= threshold.
    FPIR is the share of non-mated searches whose top score is >= threshold.
    """
    ok = emb.ok
    ids = emb.identities[ok]
    vectors = emb.embeddings[ok]
    rng = np.random.default_rng(seed)
    names = np.unique(ids)
    rng.shuffle(names)
    multi = {n for n, c in zip(*np.unique(ids, return_counts=True)) if c >= 2}
    held = set(names[:max(1, int(round(len(names) * non_mated_fraction)))].tolist())
    if len(held) == len(names):
        return {"note": "too few identities for an identification split"}
    gallery, mated = [], []
    by_id: dict[str, list[int]] = {}
    for i, name in enumerate(ids):
        by_id.setdefault(name, []).append(i)
    for name in names:
        if name in held:
            continue
        photos = rng.permutation(by_id[name])
        gallery.append(photos[0])
        if name in multi:
            mated.append(photos[1])
    non_mated = [i for name in held for i in by_id[name]]
    g = vectors[gallery]
    gallery_ids = ids[gallery]
    result: dict = {"gallery_size": len(gallery), "mated_probes": len(mated), "non_mated_probes": len(non_mated),
                    "enrolled_identities": len(gallery), "held_out_identities": len(held), "seed": seed}
    if not mated:
        result["note"] = "no enrolled identity has a second photo to probe with"
        return result
    sims = vectors[mated] @ g.T
    mate_col = np.array([np.flatnonzero(gallery_ids == ids[p])[0] for p in mated])
    mate_score = sims[np.arange(len(mated)), mate_col]
    rank = 1 + (sims > mate_score[:, None]).sum(axis=1)
    for r in RANKS:
        result[f"rank{r}"] = float((rank <= r).mean())
        if r > len(gallery):
            result[f"rank{r}_note"] = f"gallery has only {len(gallery)} entries"
    top_non = (vectors[non_mated] @ g.T).max(axis=1) if non_mated else np.zeros(0)
    rows = []
    for fpir in IDENTIFICATION_FPIRS:
        allowed = int(math.floor(fpir * len(top_non)))
        if allowed < 1:
            rows.append({"fpir": fpir, "fnir": None,
                         "note": f"insufficient non-mated probes ({len(top_non)} < {math.ceil(1 / fpir)})"})
            continue
        desc = np.sort(top_non)[::-1]
        t = float(np.nextafter(desc[allowed], np.inf)) if allowed < len(desc) else float(desc[-1])
        hit = (rank == 1) & (mate_score >= t)
        rows.append({"fpir": fpir, "threshold": t, "fnir": float(1 - hit.mean()),
                     "measured_fpir": float((top_non >= t).mean())})
    result["fnir_at_fpir"] = rows
    if calibration is not None:
        predicted = []
        for fpir in IDENTIFICATION_FPIRS:
            try:
                t = calibration.threshold_for_fpir(fpir, len(gallery))
            except CalibrationError as err:
                predicted.append({"fpir": fpir, "threshold": None, "note": str(err)})
                continue
            hit = (rank == 1) & (mate_score >= t)
            predicted.append({"fpir": fpir, "threshold": t, "measured_fpir": float((top_non >= t).mean()) if len(top_non) else None,
                              "fnir": float(1 - hit.mean())})
        result["calibrated_thresholds"] = predicted
    result["_mate_score"], result["_top_non_mated"] = mate_score, top_non
    return result


def by_group(emb: LabeledEmbeddings, threshold: float, *, max_pairs: int, seed: int) -> list[dict]:
    """FMR and FNMR within each group at one threshold (pairs with both photos in the group)."""
    ok = emb.ok
    rows = []
    for name in sorted({g for g in emb.groups[ok] if g is not None}):
        mask = ok & (emb.groups == name)
        vectors, ids = emb.embeddings[mask], emb.identities[mask]
        gen = genuine_scores(vectors, ids)
        imp, sampled = impostor_scores(vectors, ids, max_pairs=max_pairs, seed=seed)
        k = int((imp >= threshold).sum())
        rows.append({
            "group": name, "photos": int(mask.sum()), "identities": int(len(np.unique(ids))),
            "genuine_pairs": len(gen), "impostor_pairs": len(imp), "impostor_sampled": sampled,
            "fnmr": float((gen < threshold).mean()) if len(gen) else None,
            "fmr": float(k / len(imp)) if len(imp) else None,
            "impostors_above": k,
            "fmr_upper95": float(wilson_upper(k, len(imp))) if len(imp) else None,
        })
    return rows


def evaluate_embeddings(emb: LabeledEmbeddings, *, model: str | None = None, dataset: str,
                        pairs: tuple[list, np.ndarray, int] | None = None, max_impostor_pairs: int =
                        DEFAULT_MAX_IMPOSTOR_PAIRS, non_mated_fraction: float = DEFAULT_NON_MATED_FRACTION,
                        group_fmr: float = DEFAULT_GROUP_FMR, seed: int = DEFAULT_SEED,
                        face: str = "largest") -> tuple[dict, Calibration]:
    """All metrics from labeled embeddings (numpy only). Returns (metrics, calibration).

    Keys starting with '_' hold score arrays for plots; ``write_report`` leaves them out of JSON.
    """
    spec = get_model(model)
    ok = emb.ok
    started = time.monotonic()
    vectors, ids = emb.embeddings[ok], emb.identities[ok]
    gen = genuine_scores(vectors, ids)
    imp, sampled = impostor_scores(vectors, ids, max_pairs=max_impostor_pairs, seed=seed)
    notes = (f"{len(gen):,} genuine pairs (all) and {len(imp):,} impostor pairs "
             f"({'seeded sample, seed %d' % seed if sampled else 'all'}) of the {face} face per photo")
    calibration = Calibration.from_scores(gen, imp, model=spec, dataset=dataset, notes=notes)
    metrics: dict = {
        "model": spec.name, "recognizer": spec.recognizer, "detector": spec.detector,
        "weights_sha256": calibration.weights_sha256, "dataset": dataset, "face": face,
        "photos": {"labeled": len(ids) + int((~ok).sum()), "embedded": int(ok.sum()), "failed": int((~ok).sum()),
                   "failed_by_type": emb.errors, "unlabeled_skipped": emb.unlabeled,
                   "identities": int(len(np.unique(ids)))},
        "embed_seconds": emb.embed_seconds,
        "verification": {
            "genuine_pairs": len(gen), "impostor_pairs": len(imp), "impostor_sampled": sampled, "seed": seed,
            "genuine_mean": float(gen.mean()) if len(gen) else None, "impostor_mean": float(imp.mean()),
            "tar_at_far": tar_at_far(gen, imp),
            "_genuine": gen, "_impostor": imp,
        },
        "calibration": {"rows": len(calibration.thresholds), "min_certified_fmr": calibration.min_certified_fmr,
                        "thresholds_by_fmr": calibration.table()},
    }
    if pairs is not None:
        position = {image_id: i for i, image_id in enumerate(emb.image_ids)}
        metrics["pairs_protocol"] = pairs_protocol(emb, pairs[0], pairs[1], pairs[2], position)
    metrics["identification"] = identification(emb, non_mated_fraction=non_mated_fraction, seed=seed,
                                               calibration=calibration)
    if emb.groups is not None:
        try:
            threshold = calibration.threshold_for_fmr(group_fmr)
            how = f"calibration threshold for FMR {group_fmr:g} (95% upper bound) over all pairs"
        except CalibrationError:
            # too few impostors to certify the target: the lowest threshold with measured FMR <= target
            threshold = float(_empirical_threshold(imp, group_fmr))
            how = (f"lowest threshold with measured FMR <= {group_fmr:g} over all pairs (the calibration "
                   f"cannot certify {group_fmr:g} on {len(imp):,} impostor pairs)")
        metrics["by_group"] = {"threshold": threshold, "threshold_rule": how,
                               "groups": by_group(emb, threshold, max_pairs=max_impostor_pairs, seed=seed)}
    metrics["measure_seconds"] = round(time.monotonic() - started, 3)
    return metrics, calibration


# -------------------------------------------------------------------------- step 3: report

def _plots(metrics: dict, out_dir: str) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ver = metrics["verification"]
    gen, imp = ver["_genuine"], ver["_impostor"]
    curve = roc(gen, imp) if len(gen) else None
    written = []
    if curve is not None:
        fig, ax = plt.subplots(figsize=(5, 4))
        shown = curve["fmr"] > 0  # below one impostor pair the data says nothing
        ax.semilogx(curve["fmr"][shown], curve["tar"][shown], label="all pairs")
        pp = metrics.get("pairs_protocol")
        if pp and len(pp["_genuine"]) and len(pp["_impostor"]):
            c2 = roc(pp["_genuine"], pp["_impostor"])
            ax.semilogx(c2["fmr"][c2["fmr"] > 0], c2["tar"][c2["fmr"] > 0], label="pairs file")
        ax.set_xlim(max(1e-7, 0.5 / len(imp)), 1)
        ax.set_xlabel("false accept rate (FMR)")
        ax.set_ylabel("true accept rate (TAR)")
        ax.set_title(f"ROC: {metrics['model']} on {metrics['dataset']}")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(loc="lower right")
        fig.tight_layout()
        fig.savefig(os.path.join(out_dir, "roc.png"), dpi=110)
        plt.close(fig)
        written.append("roc.png")
        fig, ax = plt.subplots(figsize=(5, 4))
        keep = (curve["fmr"] > 0) & (curve["fnmr"] > 0)
        ax.loglog(curve["fmr"][keep], curve["fnmr"][keep])
        ax.set_xlabel("false match rate (FMR)")
        ax.set_ylabel("false non-match rate (FNMR)")
        ax.set_title(f"DET: {metrics['model']} on {metrics['dataset']}")
        ax.grid(True, which="both", alpha=0.3)
        fig.tight_layout()
        fig.savefig(os.path.join(out_dir, "det.png"), dpi=110)
        plt.close(fig)
        written.append("det.png")
    fig, ax = plt.subplots(figsize=(5, 4))
    bins = np.linspace(-0.5, 1.0, 151)
    ax.hist(imp, bins=bins, density=True, alpha=0.6, label=f"impostor ({len(imp):,})")
    if len(gen):
        ax.hist(gen, bins=bins, density=True, alpha=0.6, label=f"genuine ({len(gen):,})")
    ax.set_yscale("log")
    ax.set_xlabel("similarity (cosine)")
    ax.set_ylabel("density")
    ax.legend()
    fig.tight_layout()
    fig.savefig(os.path.join(out_dir, "scores.png"), dpi=110)
    plt.close(fig)
    written.append("scores.png")
    return written


def _public(value):
    """Metrics without the score arrays (keys starting with '_'), JSON-safe."""
    if isinstance(value, dict):
        return {k: _public(v) for k, v in value.items() if not str(k).startswith("_")}
    if isinstance(value, (list, tuple)):
        return [_public(v) for v in value]
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def _fmt(x, pct: bool = True) -> str:
    if x is None:
        return "n/a"
    return f"{100 * x:.2f}%" if pct else f"{x:.4f}"


def report_markdown(metrics: dict, plots: list[str]) -> str:
    m = _public(metrics)
    photos, ver = m["photos"], m["verification"]
    lines = [f"# facelake evaluation: {m['model']} ({m['recognizer']} + {m['detector']}) on {m['dataset']}", "",
             f"Weights {m['weights_sha256'][:16]}... A comparison matches when cosine similarity >= threshold; "
             f"each photo is represented by its {m.get('face', 'largest')} face.", "",
             "## Photos", "",
             f"{photos['labeled']} labeled photos of {photos['identities']} identities; {photos['embedded']} embedded, "
             f"{photos['failed']} failed ({', '.join(f'{k}: {v}' for k, v in photos['failed_by_type'].items()) or 'none'}); "
             f"{photos['unlabeled_skipped']} unlabeled rows skipped. Embedding took {m['embed_seconds']:.0f} s, "
             f"measuring {m['measure_seconds']:.0f} s.", ""]
    if "pairs_protocol" in m:
        pp = m["pairs_protocol"]
        lines += ["## Pairs file, 10-fold protocol", "",
                  f"Accuracy **{_fmt(pp['accuracy'])}** ± {_fmt(pp['accuracy_std'])} over {pp['pairs']} pairs in "
                  f"{pp['folds']} folds (threshold chosen on the other folds). {pp['pairs_with_failed_photo']} pair(s) "
                  f"had a failed photo and count as errors; excluding them: {_fmt(pp['accuracy_excluding_failed'])}.", "",
                  "| FAR | TAR | threshold |", "|---|---|---|"]
        lines += [f"| {r['far']:g} | {_fmt(r['tar'])} | {_fmt(r.get('threshold'), False)} |" if r["tar"] is not None
                  else f"| {r['far']:g} | {r['note']} | |" for r in pp["tar_at_far"]]
        lines.append("")
    lines += ["## Verification over all pairs", "",
              f"{ver['genuine_pairs']:,} genuine pairs (mean similarity {_fmt(ver['genuine_mean'], False)}), "
              f"{ver['impostor_pairs']:,} impostor pairs ({'seeded sample' if ver['impostor_sampled'] else 'all'}; "
              f"mean {_fmt(ver['impostor_mean'], False)}).", "",
              "| FAR | TAR | threshold | impostor pairs |", "|---|---|---|---|"]
    lines += [f"| {r['far']:g} | {_fmt(r['tar'])} | {_fmt(r['threshold'], False)} | {r['n_impostor']:,} |"
              if r["tar"] is not None else f"| {r['far']:g} | {r['note']} | | {r['n_impostor']:,} |"
              for r in ver["tar_at_far"]]
    lines += ["", " ".join(f"![{p}]({p})" for p in plots), "",
              "## Calibration (calibration.json)", "",
              f"{m['calibration']['rows']} thresholds. FMR is the one-sided 95% upper bound; the smallest this "
              f"data can certify is {m['calibration']['min_certified_fmr']:.2g}.", "",
              "| target FMR | threshold | TAR there |", "|---|---|---|"]
    lines += [f"| {r['target_fmr']:g} | {_fmt(r['threshold'], False)} | {_fmt(r['tar'])} |" if r["threshold"] is not None
              else f"| {r['target_fmr']:g} | {r['note']} | |" for r in m["calibration"]["thresholds_by_fmr"]]
    idn = m["identification"]
    lines += ["", "## Identification (1:N)", ""]
    if "rank1" in idn:
        lines += [f"Gallery of {idn['gallery_size']} (one photo per enrolled identity), {idn['mated_probes']} mated "
                  f"and {idn['non_mated_probes']} non-mated probes (seed {idn['seed']}). Rank-1 "
                  f"**{_fmt(idn['rank1'])}**, rank-10 {_fmt(idn['rank10'])}.", "",
                  "| FPIR | FNIR | threshold | calibrated threshold (FPIR at this gallery) | its measured FPIR / FNIR |",
                  "|---|---|---|---|---|"]
        cal_rows = {r["fpir"]: r for r in idn.get("calibrated_thresholds", [])}
        for r in idn["fnir_at_fpir"]:
            c = cal_rows.get(r["fpir"], {})
            cal = (f"{_fmt(c['threshold'], False)} | {_fmt(c['measured_fpir'])} / {_fmt(c['fnir'])}"
                   if c.get("threshold") is not None else "not certifiable | ")
            lines.append(f"| {r['fpir']:g} | {_fmt(r['fnir'])} | {_fmt(r.get('threshold'), False)} | {cal} |"
                         if r["fnir"] is not None else f"| {r['fpir']:g} | {r['note']} | | {cal} |")
    else:
        lines.append(idn.get("note", "not measured"))
    if "by_group" in m:
        bg = m["by_group"]
        lines += ["", "## By group", "", f"At threshold {bg['threshold']:.4f} ({bg['threshold_rule']}); pairs within "
                  "each group.", "", "| group | photos | identities | FMR | FMR 95% upper | impostor pairs | FNMR | genuine pairs |",
                  "|---|---|---|---|---|---|---|---|"]
        lines += [f"| {g['group']} | {g['photos']} | {g['identities']} | {_fmt(g['fmr'])} | {_fmt(g['fmr_upper95'])} | "
                  f"{g['impostor_pairs']:,} | {_fmt(g['fnmr'])} | {g['genuine_pairs']:,} |" for g in bg["groups"]]
    return "\n".join(lines) + "\n"


def write_report(metrics: dict, calibration: Calibration, out: str, *, plots: bool = True) -> dict[str, str]:
    """Write report.md, metrics.json, calibration.json and the PNG plots under ``out``."""
    written: dict[str, str] = {}
    local = storage.scheme_of(out) == "file"
    with tempfile.TemporaryDirectory(prefix="facelake-eval-") as tmp:
        work = storage.filesystem(out)[1] if local else tmp
        os.makedirs(work, exist_ok=True)
        names = _plots(metrics, work) if plots else []
        if not local:
            for name in names:
                with open(os.path.join(tmp, name), "rb") as handle:
                    storage.write_bytes_atomic(storage.join(out, name), handle.read())
    for name in names:
        written[name] = storage.join(out, name)
    files = {"metrics.json": json.dumps(_public(metrics), indent=2).encode(),
             "calibration.json": (calibration.to_json() + "\n").encode(),
             "report.md": report_markdown(metrics, names).encode()}
    for name, data in files.items():
        storage.write_bytes_atomic(storage.join(out, name), data)
        written[name] = storage.join(out, name)
    return written


@dataclass
class EvaluateResult:
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
