"""`facelake embed`: manifest of archived images -> faces table (+ errors, + dropped faces).

Two executors run the same ChunkEmbedder on chunks of manifest rows (``chunk_images``):

- ray: Ray Data reads the manifest and streams chunks to a pool of actors, each holding one
  loaded model (GPU actors when the cluster has GPUs);
- local: this process reads the manifest in order and embeds chunk after chunk, with threads
  for reading, decoding, detection and alignment beside the recognizer; Ray is not imported.
  ``--executor auto`` (the default) takes it for manifests of at most LOCAL_MAX_ROWS rows when no
  cluster is named (choose_executor).

A ChunkEmbedder fetches the image bytes itself (fsspec: s3fs or local) and runs them through the
face pipeline (facelake.faces.pipeline: decode, detect, quality floor, align, embed ``batch_size``
images per model call), then writes the chunk's own Parquet part files, each atomically
(temporary name then rename; one PUT on S3):

    OUT/faces/part-<run>-<chunk>-<n>.parquet    one row per usable face
    OUT/errors/part-<run>-<chunk>-<n>.parquet   one row per image that failed or held no usable face
    OUT/dropped/part-<run>-<chunk>-<n>.parquet  faces below the quality floor, with the reason
    OUT/_runs/<run>.json                        the run's summary, written last by the driver
    OUT/_fingerprint.json                       what produces this folder (schema.OutputFingerprint)

OUT's fingerprint (model, detector, weights sha256, quality floor, read limits) is written before
the first part; a rerun with other such options is refused before any work, naming the fix (a new
--out, or --overwrite to delete OUT's tables first), so one folder never mixes faces of two setups.

The driver receives one row of counts per chunk, never face rows (with either executor). Every
manifest row ends in exactly one of faces or errors. An image's rows always land in one part file, so a run killed
at any point leaves whole images only and loses at most the chunk each actor was working on; a
rerun embeds only the manifest rows whose ids OUT does not hold yet (jobs/work/resume.py: an
anti-join in Ray tasks, no id gathered in the driver), so nothing is duplicated. ``<chunk>`` is
derived from the chunk's image ids, so a chunk that Ray retries after losing an actor rewrites
the same files rather than adding a second copy.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import sys
import time
import uuid
from collections import Counter
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Iterator, Literal

import pyarrow as pa
import pyarrow.compute as pc
import typer

from facelake import device, faults, progress, storage
from facelake.faces import manifest, reader
from facelake.errors import ConfigError
from facelake.faces.imaging import DEFAULT_MAX_PIXELS
from facelake.jobs.work import resume
from facelake.faces.pipeline import DEFAULT_BATCH_SIZE
from facelake.faces.registry import MODELS, ModelSpec, get_model, weights_fingerprint
from facelake.schema import (DROPPED_SCHEMA, EMBED_COUNTS_SCHEMA, ERRORS_SCHEMA, OutputFingerprint, faces_schema,
                             with_carried)

if TYPE_CHECKING:
    import ray

log = logging.getLogger(__name__)

# Images per model call: facelake.faces.pipeline.DEFAULT_BATCH_SIZE.
# Images per actor call, and so the most an actor holds unwritten: each call writes its own part
# files. bench/embed.py measured 15.5 images/s for two CPU actors on two cores, about 7.8 per
# actor, so 512 images is about a minute of one CPU actor's work (about 35 s for an actor that
# has a core to itself at ~15 images/s; seconds on a GPU): a killed job loses at most about a
# minute per actor, at any job size, while a part still holds hundreds of faces.
DEFAULT_CHUNK_IMAGES = 512
# Most faces in one part file (~70 MB of Parquet at 128-d with carried columns); a chunk's
# parts are cut at image boundaries when it holds more.
DEFAULT_SHARD_ROWS = 100_000

# CPU reservations. The pool size (one actor per CPU) bounds the model work; each actor
# reserves only half a CPU so that Ray Data's list and read tasks (1 CPU each) still get
# scheduled when the pool is full -- with whole-CPU actors a 2-CPU node waits forever.
ACTOR_CPUS = 0.5
READ_CPUS = 0.25

Executor = Literal["auto", "local", "ray"]
EXECUTORS = ("auto", "local", "ray")
# How photos are prepared for the recognizer: "threads", "processes", or "auto": processes where
# the recognizer runs on CUDA (preparation is then the bottleneck, and two processes prepare 1.99x
# what one does against 1.73x for two threads, bench/prepare.py), threads where the recognizer
# shares the CPUs with them.
Preparing = Literal["auto", "threads", "processes"]
PREPARING = ("auto", "threads", "processes")
# --executor auto runs a manifest of at most this many rows in this process, without Ray, when
# no cluster is named. A job that starts its own Ray pays ~13-17 s before its first result (Ray,
# the actor pool, each actor importing and loading the model) for no more CPUs on one machine,
# while the local executor pays only its imports and model loading (~1 s each, README). At the
# 40-140 photos/s two cores reach (float32 to int8 SFace, estimated from CPU time per photo),
# 5,000 photos are about 0.6-2 minutes of work, where Ray's start-up would still be 10-30% of
# the wall time; larger jobs go to Ray, whose actors are retried on failure and spread over a
# cluster's nodes (--executor local still runs any size in this process).
LOCAL_MAX_ROWS = 5_000

@dataclass(frozen=True)
class EmbedConfig:
    """Options of one embed run; ``validate`` checks them before storage or Ray is touched."""

    manifest: str
    out: str
    model: str | None = None
    detector: str | None = None
    address: str | None = None
    batch_size: int = DEFAULT_BATCH_SIZE
    min_face: int = 24
    min_score: float = 0.8
    max_pixels: int = DEFAULT_MAX_PIXELS
    endpoint_url: str | None = None
    weights_from: str | None = None
    allowed_roots: tuple[str, ...] = ()
    max_bytes: int = reader.DEFAULT_MAX_BYTES
    read_timeout_s: float = reader.DEFAULT_TIMEOUT_S
    shard_rows: int = DEFAULT_SHARD_ROWS
    chunk_images: int = DEFAULT_CHUNK_IMAGES
    workers: int | None = None
    progress: bool = True
    overwrite: bool = False   # delete OUT's tables first (when they were made with other options)
    # where the chunks run: "ray" (actors), "local" (this process, threads), "auto" (choose_executor)
    executor: Executor = "auto"
    prepare: Preparing = "auto"

    def validate(self) -> ModelSpec:
        if self.executor not in EXECUTORS:
            raise ConfigError(f"--executor must be one of {', '.join(EXECUTORS)}, not {self.executor!r}")
        if self.prepare not in PREPARING:
            raise ConfigError(f"--prepare must be one of {', '.join(PREPARING)}, not {self.prepare!r}")
        if self.executor == "local" and self.address is not None:
            raise ConfigError("--executor local runs in this process and joins no cluster: drop --address, "
                              "or use --executor ray (or auto)")
        spec = get_model(self.model)
        if self.detector and self.detector != spec.detector:
            raise ConfigError(f"model {spec.name} is registered with detector {spec.detector!r}, not "
                              f"{self.detector!r}; registered pairs: "
                              + ", ".join(f"{m.name} ({m.recognizer}+{m.detector})" for m in MODELS.values()))
        for name, uri in (("MANIFEST", self.manifest), ("--out", self.out)):
            storage.check_uri(uri)
        self.limits.validate()
        if self.batch_size < 1 or self.shard_rows < 1:
            raise ConfigError("--batch-size and --shard-rows must be at least 1")
        if self.chunk_images < 1:
            raise ConfigError("--chunk-images must be at least 1")
        if self.min_face < 1 or not 0.0 <= self.min_score <= 1.0:
            raise ConfigError("--min-face must be >= 1 px and --min-score within [0, 1]")
        if self.max_pixels < 1:
            raise ConfigError("--max-pixels must be positive")
        if self.workers is not None and self.workers < 1:
            raise ConfigError("--workers must be at least 1")
        return spec

    @property
    def limits(self) -> reader.ReadLimits:
        """What the workers may read (roots, bytes, time)."""
        return reader.ReadLimits(self.allowed_roots, self.max_bytes, self.read_timeout_s)

    def fingerprint(self) -> OutputFingerprint:
        """What this run's options make of an image (see schema.OutputFingerprint)."""
        spec = get_model(self.model)
        return OutputFingerprint(
            model=spec.name, detector=spec.detector, weights_sha256=weights_fingerprint(spec), dim=spec.dim,
            min_face=self.min_face, min_score=float(self.min_score), max_pixels=self.max_pixels,
            max_bytes=self.max_bytes, allowed_roots=tuple(sorted(reader.normal(r) for r in self.allowed_roots)))


@dataclass
class EmbedSummary:
    """What a run did; also written to OUT/_runs/<run_id>.json."""

    run_id: str
    model: str
    manifest_rows: int
    skipped_done: int = 0
    images: int = 0
    images_with_faces: int = 0
    faces: int = 0
    errors: int = 0
    errors_by_type: dict[str, int] = field(default_factory=dict)
    dropped_faces: int = 0
    parts: int = 0  # part files written (faces, errors and dropped together)
    seconds: float = 0.0
    workers: int = 0   # Ray actors, or the local executor's threads
    device: str = "cpu"
    executor: str = ""  # "ray" or "local": which one ran (empty when nothing was left to embed)

    @property
    def images_per_second(self) -> float:
        return self.images / self.seconds if self.seconds else 0.0

    def to_dict(self) -> dict:
        data = asdict(self)
        data["images_per_second"] = round(self.images_per_second, 3)
        return data


# ---------------------------------------------------------------------------- worker side

class ChunkEmbedder:
    """One loaded model; embeds a chunk of manifest rows per call through the face pipeline
    (facelake.faces.pipeline), writes the chunk's faces, errors and dropped part files itself and
    returns one row of counts. The Ray actor (EmbedWorker) and the local executor both call it."""

    def __init__(self, *, model: str, weights_from: str | None, min_face: int, min_score: float,
                 max_pixels: int, options: storage.StorageOptions, allowed_roots: tuple[str, ...],
                 base_dir: str, threads: int, carried: tuple[str, ...],
                 carried_schema: pa.Schema, out: str, run_id: str, batch_size: int, shard_rows: int,
                 weights_sha256: str, limits: reader.ReadLimits | None = None, prepare_threads: int = 1,
                 recognizer_threads: int | None = None, prepare: Preparing = "auto") -> None:
        # the model's libraries (OpenCV, the recognizer runtime) load where the model runs, not
        # in a driver that only plans and counts
        from facelake.faces.models import FaceEngine, QualityFloor
        from facelake.faces.pipeline import FacePipeline

        engine = FaceEngine(model, weights_from=weights_from, threads=threads, recognizer_threads=recognizer_threads)
        self.spec = engine.spec
        self.pipeline = FacePipeline(engine, floor=QualityFloor(min_face=min_face, min_score=min_score),
                                     limits=limits or reader.ReadLimits(allowed_roots), options=options,
                                     base_dir=base_dir, max_pixels=max_pixels, batch_size=batch_size,
                                     threads=prepare_threads,
                                     processes=prepare == "processes" or (prepare == "auto" and engine.runtime == "cuda"))
        self.options = options
        self.carried = carried
        self.layout, self.run_id = outputs(out), run_id
        self.tables = {"faces": with_carried(faces_schema(self.spec.dim), carried_schema),
                       "errors": with_carried(ERRORS_SCHEMA, carried_schema), "dropped": DROPPED_SCHEMA}
        self.shard_rows, self.weights_sha256 = shard_rows, weights_sha256

    def __call__(self, chunk: pa.Table) -> pa.Table:
        """Embed one chunk of manifest rows, write its part files, return one row of counts."""
        faults.point("embed.chunk")
        token = _chunk_token(chunk["image_id"])  # a retried chunk gets the same names
        outcomes = list(self.pipeline.run(chunk.to_pylist()))
        rows = self._rows(outcomes)
        written = 0
        # faces and errors first: an image is done once it is in either; dropped rows are a
        # diagnostic whose part goes last (a kill between the writes can lose, never duplicate, them)
        for name in ("faces", "errors", "dropped"):
            table = pa.Table.from_pylist(rows[name], schema=self.tables[name])
            for index, part in enumerate(_split_at_images(table, self.shard_rows)):
                uri = storage.join(self.layout[name], part_name(self.run_id, token, index))
                storage.write_table(uri, part, self.options)
                written += 1
        return pa.table({
            "images": [chunk.num_rows],
            "images_with_faces": [sum(1 for outcome in outcomes if outcome.faces)],
            "faces": [len(rows["faces"])], "errors": [len(rows["errors"])], "dropped": [len(rows["dropped"])],
            "error_types": [json.dumps(dict(Counter(row["error_type"] for row in rows["errors"])), sort_keys=True)],
            "parts": [written],
        }, schema=EMBED_COUNTS_SCHEMA)

    def _rows(self, outcomes: list) -> dict[str, list[dict]]:
        """The pipeline's outcomes as faces, errors and dropped rows, in image order."""
        stamp = {"model": self.spec.name, "detector": self.spec.detector, "weights_sha256": self.weights_sha256}
        rows: dict[str, list[dict]] = {"faces": [], "errors": [], "dropped": []}
        for outcome in outcomes:
            given = {name: outcome.row.get(name) for name in ("image_id", "uri", *self.carried)}
            if outcome.error is not None:
                rows["errors"].append({**given, "stage": outcome.error.stage, "error_type": outcome.error.error_type,
                                       "message": outcome.error.message,
                                       "content_sha256": outcome.content_sha256, **stamp})
                continue
            for face in outcome.faces:
                rows["faces"].append({**given, "face_index": face.face_index, "bbox": list(face.bbox),
                                      "landmarks": face.landmarks.reshape(-1).tolist(), "det_score": face.score,
                                      "embedding": face.embedding.tolist(),
                                      "content_sha256": outcome.content_sha256, **stamp})
            for drop in outcome.dropped:
                rows["dropped"].append({"image_id": given["image_id"], "bbox": list(drop.bbox),
                                        "det_score": drop.score, "reason": drop.reason, "model": self.spec.name})
        return rows


class EmbedWorker(ChunkEmbedder):
    """The Ray Data actor: a ChunkEmbedder under a name of its own in Ray's actor listings."""


def part_name(run_id: str, token: str, index: int) -> str:
    """File name of one part: the run, the chunk it came from, its place in that chunk."""
    return f"part-{run_id}-{token}-{index:03d}.parquet"


def _chunk_token(image_ids: pa.ChunkedArray) -> str:
    """A name for a chunk of manifest rows, from its image ids (unique in a manifest).

    Derived from the input, not from the actor, so that a chunk Ray retries after losing its
    actor (or node) rewrites the same part files instead of adding a second copy of its faces.
    """
    digest = hashlib.sha256()
    for image_id in image_ids.to_pylist():
        digest.update(image_id.encode() + b"\0")
    return digest.hexdigest()[:20]


def _split_at_images(table: pa.Table, max_rows: int) -> list[pa.Table]:
    """Split rows into parts of at most ``max_rows`` without splitting an image's rows (which are
    contiguous); an image with more rows than that gets a part of its own. No rows: no parts."""
    if table.num_rows <= max_rows:
        return [table] if table.num_rows else []
    ids = table["image_id"].to_pylist()
    ends = [i for i in range(1, len(ids)) if ids[i] != ids[i - 1]] + [len(ids)]  # where each image ends
    parts, start = [], 0
    for end, next_end in zip(ends, ends[1:] + [None]):
        if next_end is None or next_end - start > max_rows:  # the next image would not fit: cut here
            parts.append(table.slice(start, end - start))
            start = end
    return parts


# ---------------------------------------------------------------------------- driver side

def outputs(out: str) -> dict[str, str]:
    """The output layout of an embed run under OUT (one source of truth)."""
    layout = {name: storage.join(out, name) for name in ("faces", "errors", "dropped", "_runs")}
    layout["fingerprint"] = storage.join(out, "_fingerprint.json")
    return layout


def claim_output(out: str, fingerprint: OutputFingerprint, options: storage.StorageOptions | None = None,
                 *, overwrite: bool = False) -> None:
    """Make sure OUT holds only what ``fingerprint`` produces: write it into a new OUT, accept an
    equal one, refuse anything else (before any work) naming the fix. ``overwrite`` deletes OUT's
    tables, summaries and fingerprint first."""
    layout = outputs(out)
    tables = ("faces", "errors", "dropped", "_runs")
    if overwrite:
        for name in tables:
            storage.remove(layout[name], recursive=True, options=options)
        storage.remove(layout["fingerprint"], options=options)
    fix = (f"write this run to a new --out, or pass --overwrite to delete the faces, errors and dropped "
           f"tables under {storage.redact(out)} first")
    if not storage.exists(layout["fingerprint"], options):
        if any(storage.list_files(layout[name], ".parquet", options) for name in tables[:3]):
            raise ConfigError(f"{storage.redact(out)} holds embed output without a fingerprint (written before "
                              f"facelake recorded the options that made it), so a rerun could mix two setups: {fix}")
        try:
            storage.write_bytes_new(layout["fingerprint"], fingerprint.to_json(), options)
            return
        except FileExistsError:   # another run claimed it first: compare with what it wrote
            pass
    try:
        held = OutputFingerprint.from_json(storage.read_bytes(layout["fingerprint"], options))
    except ValueError as err:
        raise ConfigError(f"{storage.redact(layout['fingerprint'])} is not a readable fingerprint ({err}): {fix}") from err
    different = held.differences(fingerprint)
    if different:
        raise ConfigError(f"{storage.redact(out)} holds faces made with other options ("
                          + "; ".join(f"{d} (OUT vs this run)" for d in different) + f"); rerunning would mix them: {fix}")


def done_image_ids(out: str, spec: ModelSpec, options: storage.StorageOptions | None = None) -> pa.Array:
    """Image ids OUT already holds (faces or errors) for this model; other models are refused."""
    layout = outputs(out)
    ids: list[pa.ChunkedArray] = []
    for table_name in ("faces", "errors"):
        if not storage.list_files(layout[table_name], ".parquet", options):
            continue
        table = storage.read_table(layout[table_name], columns=["image_id", "model"], options=options)
        models = set(pc.unique(table["model"]).to_pylist())
        if models - {spec.name}:
            raise ConfigError(f"{storage.redact(out)} already holds {table_name} made with model(s) "
                              f"{sorted(models - {spec.name})}; write each model to its own --out")
        ids.append(table["image_id"])
    if not ids:
        return pa.array([], pa.string())
    return pc.unique(pa.chunked_array([c for chunked in ids for c in chunked.chunks], pa.string()))


@dataclass
class EmbedPlan:
    """One planned run: the Dataset the driver iterates (None when nothing is left to embed)."""

    dataset: "ray.data.Dataset | None"
    summary: EmbedSummary


@dataclass
class _Start:
    """What both executors start from: options checked, OUT claimed, what is left to embed known."""

    spec: ModelSpec
    options: storage.StorageOptions
    info: manifest.ManifestInfo
    todo: resume.Todo
    summary: EmbedSummary

    @property
    def nothing_left(self) -> bool:
        return not self.todo.rows

    @property
    def files(self) -> tuple[str, ...]:
        """The manifest files to read: the todo manifest on a rerun, else the manifest."""
        return tuple(self.todo.files or self.info.files)


def _start(config: EmbedConfig) -> _Start:
    """Validate, read the manifest's footer, claim OUT and find what is left to embed."""
    spec = config.validate()
    options = storage.StorageOptions.from_env(config.endpoint_url)
    info = manifest.validate(config.manifest, options)
    claim_output(config.out, config.fingerprint(), options, overwrite=config.overwrite)
    run_id = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime()) + "-" + uuid.uuid4().hex[:6]
    # resume, the one place both executors learn it: the rows not yet in OUT, found in the driver
    # for small manifests and by tasks for large ones (jobs/work/resume.py); the manifest on a first run
    todo = resume.left_to_embed(info, config.out, spec.name, run_id, options, address=config.address)
    summary = EmbedSummary(run_id=run_id, model=spec.name, manifest_rows=info.rows, skipped_done=todo.done)
    return _Start(spec, options, info, todo, summary)


def choose_executor(config: EmbedConfig, rows: int) -> str:
    """The executor that runs: ``config.executor``, or for "auto" local when no cluster is named
    (no --address, no RAY_ADDRESS as inside a Ray job, no Ray already running in this process)
    and the manifest has at most LOCAL_MAX_ROWS rows; else ray."""
    if config.executor != "auto":
        return config.executor
    ray = sys.modules.get("ray")
    on_cluster = (config.address is not None or bool(os.environ.get("RAY_ADDRESS"))
                  or (ray is not None and ray.is_initialized()))
    return "local" if not on_cluster and rows <= LOCAL_MAX_ROWS else "ray"


def _worker_options(config: EmbedConfig, start: _Start) -> dict:
    """The ChunkEmbedder's options, the same for both executors."""
    return dict(
        model=start.spec.name, weights_from=config.weights_from, min_face=config.min_face,
        min_score=config.min_score, max_pixels=config.max_pixels, options=start.options,
        allowed_roots=config.allowed_roots, base_dir=manifest.base_dir(config.manifest, start.options),
        carried=start.info.carried, carried_schema=pa.schema([start.info.schema.field(c) for c in start.info.carried]),
        out=config.out, run_id=start.summary.run_id, batch_size=config.batch_size, shard_rows=config.shard_rows,
        weights_sha256=weights_fingerprint(start.spec), limits=config.limits, prepare=config.prepare)


def embed_dataset(config: EmbedConfig) -> EmbedPlan:
    """Validate and plan one run on Ray: the Dataset the driver iterates and the run's summary.

    Executing the Dataset embeds the manifest's images not yet in OUT: each actor call takes a
    chunk of at most ``chunk_images`` rows, writes that chunk's faces, errors and dropped part
    files itself and yields one row of counts (EMBED_COUNTS_SCHEMA), so nothing that grows with the
    faces reaches the driver. The Dataset is None when OUT already holds every image: then no
    Ray is started and no model loaded.
    """
    start = _start(config)
    if start.nothing_left:
        return EmbedPlan(None, start.summary)  # every image is already in OUT: start no Ray, load no model
    return EmbedPlan(_ray_dataset(config, start), start.summary)


def _ray_dataset(config: EmbedConfig, start: _Start) -> "ray.data.Dataset":
    """The Ray executor: Ray Data reads the manifest and streams chunks to a pool of EmbedWorker actors."""
    import ray  # deferred: the local executor runs without Ray

    from facelake.cluster import runtime  # imports Ray

    summary, todo, files = start.summary, start.todo, start.files
    resources = runtime.connect(config.address)
    use_gpu = device.embed_on_gpu(resources.gpus)
    workers = config.workers or (int(resources.gpus) if use_gpu else max(1, int(resources.cpus)))
    summary.workers, summary.device, summary.executor = workers, "gpu" if use_gpu else "cpu", "ray"
    context = ray.data.DataContext.get_current()
    context.enable_progress_bars = False    # facelake.progress counts images, faces and errors instead
    # Ray Data's V2 file reader lists files in a task that asks for a whole CPU and cannot be
    # told otherwise (nor can a repartition); on 1-CPU nodes already holding a model actor it
    # never starts. The V1 reader honours num_cpus=READ_CPUS and splits files into blocks.
    context.use_datasource_v2 = False
    arrow_fs, _ = storage.arrow_filesystem(files[0], start.options)
    # A small job is cut into smaller chunks so that every actor gets some (about 4 each).
    chunk = min(config.chunk_images, max(1, math.ceil(todo.rows / (workers * 4))))
    # Manifest reads are light; they must still get scheduled when the model actors hold
    # most CPUs, hence the fraction. Blocks are kept small (about one actor call each, at
    # most ~1000 rows) so that every actor gets work even from a single manifest file.
    blocks = min(math.ceil(todo.rows / chunk), max(workers * 4, math.ceil(todo.rows / 1000)))
    dataset = ray.data.read_parquet([storage.filesystem(f, start.options)[1] for f in files], filesystem=arrow_fs,
                                    num_cpus=READ_CPUS,
                                    override_num_blocks=blocks)
    return dataset.map_batches(
        EmbedWorker, batch_size=chunk, batch_format="pyarrow",
        compute=ray.data.ActorPoolStrategy(size=workers), num_gpus=1 if use_gpu else 0,
        num_cpus=0 if use_gpu else ACTOR_CPUS,
        fn_constructor_kwargs=dict(_worker_options(config, start), threads=1,
                                   prepare_threads=prepare_threads(resources.cpus, workers, use_gpu)))


def prepare_threads(cpus: float, workers: int, use_gpu: bool) -> int:
    """Preparing threads per model actor: a CPU actor prepares on its own CPU; a GPU actor's
    recognizer outruns one CPU by far (bench/prepare.py), so the node's CPUs are shared out
    among its GPU actors."""
    return max(1, int(cpus // max(1, workers))) if use_gpu else 1


def _local_counts(config: EmbedConfig, start: _Start) -> Iterator[pa.Table]:
    """The local executor: the same ChunkEmbedder in this process, chunks of ``chunk_images``
    manifest rows in manifest order, one row of counts per chunk (no Ray imported).

    Both cores work: ``workers`` threads (default: this process's CPUs) read, decode, detect and
    align (each with its own detector, OpenCV at one thread each) while the recognizer runs
    with as many threads on the batch before.
    """
    from facelake.faces.models import default_threads  # loads OpenCV: only when embedding here

    threads = config.workers or default_threads()
    worker = ChunkEmbedder(**_worker_options(config, start), threads=1, prepare_threads=threads,
                           recognizer_threads=threads)
    start.summary.workers, start.summary.executor = threads, "local"
    start.summary.device = "gpu" if worker.pipeline.engine.runtime == "cuda" else "cpu"
    columns = ["image_id", "uri", *start.info.carried]
    schema = pa.schema([start.info.schema.field(c) for c in columns])
    held: list[pa.Table] = []
    rows = 0
    with worker.pipeline:
        for uri in start.files:
            for batch in storage.iter_batches(uri, columns=columns, batch_size=config.chunk_images,
                                              options=start.options):
                held.append(pa.Table.from_batches([batch]).select(columns).cast(schema))
                rows += batch.num_rows
                while rows >= config.chunk_images:
                    table = pa.concat_tables(held)
                    yield worker(table.slice(0, config.chunk_images))
                    rest = table.slice(config.chunk_images)
                    held, rows = [rest], rest.num_rows
        if rows:
            yield worker(pa.concat_tables(held))


def run_embed(config: EmbedConfig) -> EmbedSummary:
    """Embed every image of a manifest not yet in OUT; return the run's summary.

    The executor (``config.executor``, see choose_executor) is Ray (actors, on a cluster or a
    local Ray started for the job) or local (this process, no Ray): both run the same
    ChunkEmbedder on chunks of the manifest and write the same tables.

    Fault points (facelake.faults): "embed.chunk" before each chunk (in the actors, or in this
    process), "embed.counts" in the driver each time counts arrive (the parts they count are
    already written).
    """
    start = _start(config)
    summary = start.summary
    if start.nothing_left:
        return summary  # every image is already in OUT: start no Ray, load no model
    executor = choose_executor(config, start.todo.rows)
    started_here = False
    if executor == "local":
        batches = _local_counts(config, start)
    else:
        import ray  # deferred: the local executor runs without Ray

        started_here = not ray.is_initialized()
        batches = iter(_ray_dataset(config, start).iter_batches(batch_size=None, batch_format="pyarrow"))
    started = time.monotonic()
    show = config.progress and progress.enabled()
    try:
        with progress.tracker(summary.manifest_rows - summary.skipped_done, "embed", show) as bar:
            for counts in batches:
                before = (summary.images, summary.faces, summary.errors)
                add_counts(summary, counts)  # the one place where the workers' counts arrive
                bar.advance(images=summary.images - before[0], faces=summary.faces - before[1],
                            errors=summary.errors - before[2])
                faults.point("embed.counts", summary)
    finally:
        batches.close()  # on a failure, stop the actors now: no part lands after run_embed has returned
    summary.seconds = round(time.monotonic() - started, 3)
    storage.write_bytes_atomic(storage.join(outputs(config.out)["_runs"], f"{summary.run_id}.json"),
                               json.dumps(summary.to_dict(), indent=2).encode(), start.options)
    resume.remove_scratch(config.out, summary.run_id, start.options)
    if started_here and config.address is None:
        from facelake.cluster import runtime

        runtime.shutdown_if_local(True)
    return summary


def add_counts(summary: EmbedSummary, counts: pa.Table) -> None:
    """Add rows of EMBED_COUNTS_SCHEMA (what actor calls return) to a run's summary."""
    def total(column: str) -> int:
        return pc.sum(counts[column]).as_py() or 0

    summary.images += total("images")
    summary.images_with_faces += total("images_with_faces")
    summary.faces += total("faces")
    summary.errors += total("errors")
    summary.dropped_faces += total("dropped")
    summary.parts += total("parts")
    for text in counts["error_types"].to_pylist():
        for error_type, rows in json.loads(text).items():
            summary.errors_by_type[error_type] = summary.errors_by_type.get(error_type, 0) + rows




def print_summary(summary: EmbedSummary) -> None:
    """A short human summary of a run."""
    typer.echo(f"embedded {summary.images} image(s) in {summary.seconds:.1f}s "
               f"({summary.images_per_second:.2f} images/s, {summary.executor} executor, "
               f"{summary.workers} {summary.device} worker(s)); "
               f"{summary.faces} face(s), {summary.errors} error(s), {summary.dropped_faces} face(s) below "
               f"the quality floor; {summary.skipped_done} already done and skipped")
    for error_type, count in sorted(summary.errors_by_type.items()):
        typer.echo(f"  errors {error_type}: {count}")


def register(app: typer.Typer) -> None:
    @app.command("embed")
    def embed_command(
        manifest_uri: str = typer.Argument(..., metavar="MANIFEST", help="Parquet manifest (file or folder): local, file:// or s3://"),
        out: str = typer.Option(..., "--out", help="output folder/prefix for faces, errors and dropped tables"),
        model: str = typer.Option(None, help=f"registered model ({', '.join(MODELS)})"),
        detector: str = typer.Option(None, help="detector; must match the model's registered pair"),
        address: str = typer.Option(None, help="Ray cluster to join (auto, ray://host:port); default: start a local Ray"),
        batch_size: int = typer.Option(DEFAULT_BATCH_SIZE, help="images per model call"),
        min_face: int = typer.Option(24, help="smallest face side kept, pixels"),
        min_score: float = typer.Option(0.8, help="lowest detector score kept"),
        max_pixels: int = typer.Option(DEFAULT_MAX_PIXELS, help="refuse images with more pixels (decompression bombs)"),
        endpoint_url: str = typer.Option(None, "--endpoint-url", help="S3-compatible endpoint (credentials come from the AWS chain)"),
        weights_from: str = typer.Option(None, "--weights-from", help="folder or s3:// prefix with the weight files"),
        allow_root: list[str] = typer.Option([], "--allow-root", help="only read images under this root (repeatable)"),
        max_bytes: int = typer.Option(reader.DEFAULT_MAX_BYTES, "--max-bytes", help="refuse photos larger than this many bytes (from stat / HEAD, before reading)"),
        shard_rows: int = typer.Option(DEFAULT_SHARD_ROWS, help="faces per output Parquet file"),
        chunk_images: int = typer.Option(DEFAULT_CHUNK_IMAGES, help="images per actor call; each call writes its own part files"),
        workers: int = typer.Option(None, help="model actors, or the local executor's threads (default: one per CPU, or per GPU)"),
        executor: str = typer.Option("auto", "--executor", help=f"ray (actors), local (this process, no Ray) or auto: local "
                                     f"without --address for at most {LOCAL_MAX_ROWS} manifest rows, else ray"),
        overwrite: bool = typer.Option(False, "--overwrite", help="delete OUT's faces, errors and dropped tables first "
                                       "(needed when they were made with other options)"),
        prepare: str = typer.Option("auto", "--prepare", help="prepare photos on threads or processes; auto: processes "
                                    "where the recognizer runs on a GPU, else threads"),
    ) -> None:
        """Detect and embed every face of a manifest's images into a faces table."""
        summary = run_embed(EmbedConfig(
            manifest=manifest_uri, out=out, model=model, detector=detector, address=address,
            batch_size=batch_size, min_face=min_face, min_score=min_score, max_pixels=max_pixels,
            endpoint_url=endpoint_url, weights_from=weights_from, allowed_roots=tuple(allow_root),
            max_bytes=max_bytes, shard_rows=shard_rows, chunk_images=chunk_images, workers=workers,
            overwrite=overwrite, executor=executor, prepare=prepare))
        print_summary(summary)
