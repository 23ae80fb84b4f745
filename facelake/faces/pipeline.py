"""The one per-image face pipeline: image rows in, per-image outcomes out.

For every row (``image_id``, ``uri`` and whatever columns the caller carries) the pipeline
resolves the uri (relative to the manifest's folder, within the allowed roots), reads the bytes
through facelake.faces.reader's limits, hashes them (content sha256), decodes them safely
(facelake.faces.imaging), detects faces with the model's detector adapter, drops the faces below the
quality floor (with the reason), aligns the others to the model's template and embeds them,
``batch_size`` images per recognizer call. Each image ends in one ImageOutcome: its usable faces
(bbox, landmarks, score, crop, embedding), its dropped faces, or one error with the stage, type
and message the errors table records.

Everything model-specific comes from the ModelSpec through facelake.faces.models.FaceEngine (detector
adapter, template, preprocessing, embedding size). The embed job (both executors) and
``facelake evaluate`` use this pipeline; what they do with the outcomes (part files, the largest
or most central face) is theirs. Tested in tests/test_pipeline.py.

With ``threads`` > 1, reading, decoding, detection and alignment run on that many workers while
the calling thread runs the recognizer over the batch before; outcomes come back in input order.
The workers are threads (OpenCV and the file reads release the GIL; each thread has its own
detector) or, with ``processes``, processes of their own, each with its own detector: two
processes prepare 1.99x what one does, two threads 1.73x (bench/prepare.py), which matters where
a GPU recognizer waits on preparation.
"""

from __future__ import annotations

import collections
import itertools
import multiprocessing
from concurrent.futures import Executor, ProcessPoolExecutor, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Iterable, Iterator

import numpy as np

from facelake import storage
from facelake.faces import reader
from facelake.faces.models import FaceEngine, QualityFloor
from facelake.faces.imaging import DEFAULT_MAX_PIXELS, content_sha256, decode_bgr
from facelake.schema import (NO_FACE, NO_USABLE_FACE, STAGE_DECODE, STAGE_DETECT, STAGE_EMBED, STAGE_FETCH,
                             STAGE_QUALITY, STAGE_VALIDATE)

# Images per recognizer call (all their faces in one call, cut into runs of at most
# RECOGNIZER_FACES): enough faces per call to amortise it, few enough images that one slow
# object holds few others back. Embeddings do not depend on it (tests/test_pipeline.py).
DEFAULT_BATCH_SIZE = 16
RECOGNIZER_FACES = 64
# Batches prepared ahead of the recognizer when threads > 1: keeps both halves busy while
# holding at most this many batches of decoded images.
PREPARED_AHEAD = 2
MESSAGE_CHARS = 500   # error messages are cut to this length


@dataclass
class Face:
    """One usable face: where it is, and (after the recognizer) its embedding."""

    face_index: int                   # 0 = largest usable face of the image
    bbox: tuple[int, int, int, int]   # x, y, width, height in image pixels
    landmarks: np.ndarray             # (5, 2) float32
    score: float                      # detector score
    crop: np.ndarray | None = None    # aligned face, the recognizer's input_size, BGR uint8
    embedding: np.ndarray | None = None  # (dim,) float32, L2-normalised


@dataclass
class DroppedFace:
    """A detected face below the quality floor."""

    bbox: tuple[int, int, int, int]
    score: float
    reason: str


@dataclass
class ImageError:
    """Why an image has no faces: stage (schema.STAGE_*), error type and message."""

    stage: str
    error_type: str
    message: str


@dataclass
class ImageOutcome:
    """What became of one image row: faces (and dropped faces), or one error."""

    row: dict                                   # the input row as given (image_id, uri, carried columns)
    content_sha256: str | None = None           # of the bytes read (None when nothing was read)
    image_size: tuple[int, int] | None = None   # (height, width) once decoded
    faces: list[Face] = field(default_factory=list)
    dropped: list[DroppedFace] = field(default_factory=list)
    error: ImageError | None = None

    def fail(self, stage: str, error_type: str, message: str) -> "ImageOutcome":
        """Make this outcome an error: no faces, no dropped faces (as the errors table records it)."""
        self.error = ImageError(stage, error_type, message)
        self.faces, self.dropped = [], []
        return self


class FacePipeline:
    """One loaded model and the rules for reading photos; turns image rows into outcomes."""

    def __init__(self, engine: FaceEngine, *, floor: QualityFloor = QualityFloor(),
                 limits: reader.ReadLimits = reader.ReadLimits(), options: storage.StorageOptions | None = None,
                 base_dir: str = "", max_pixels: int = DEFAULT_MAX_PIXELS, batch_size: int = DEFAULT_BATCH_SIZE,
                 threads: int = 1, processes: bool = False) -> None:
        """``engine`` holds the model (facelake.faces.models); ``limits`` the allowed roots, bytes and
        time per read; ``base_dir`` where relative uris start; ``threads`` how many workers read,
        decode, detect and align (1: all in the calling thread), threads or, with ``processes``,
        processes."""
        self.engine, self.floor, self.limits, self.options = engine, floor, limits, options
        self.base_dir, self.max_pixels = base_dir, max_pixels
        self.batch_size, self.threads, self.processes = max(1, batch_size), max(1, threads), processes
        self._pool: Executor | None = None  # made at first use, kept (each worker keeps its detector)

    # ------------------------------------------------------------------ one image, no recognizer
    def prepare(self, row: dict) -> ImageOutcome:
        """Resolve, read, hash, decode, detect, apply the floor and align one image row."""
        outcome = ImageOutcome(row)
        try:
            uri = reader.resolve(row["uri"], self.base_dir, self.limits.allowed_roots)
        except Exception as err:
            return _failed(outcome, STAGE_VALIDATE, err, str(err))
        try:
            data = reader.read(uri, self.limits, self.options)
        except reader.ReadRefused as err:
            return _failed(outcome, err.stage, err, str(err))
        except Exception as err:
            return _failed(outcome, STAGE_FETCH, err, f"cannot read {storage.redact(uri)}: {err}")
        outcome.content_sha256 = content_sha256(data)
        try:
            image = decode_bgr(data, self.max_pixels)
        except Exception as err:
            return _failed(outcome, STAGE_DECODE, err, str(err))
        outcome.image_size = (int(image.shape[0]), int(image.shape[1]))
        try:
            detections = self.engine.detect(image)
        except Exception as err:
            return _failed(outcome, STAGE_DETECT, err, str(err))
        if not detections:
            return outcome.fail(STAGE_DETECT, NO_FACE, "no face found in the image")
        kept = []
        for det in detections:
            reason = self.floor.reason(det)
            if reason:
                outcome.dropped.append(DroppedFace(det.bbox, det.score, reason))
            else:
                kept.append(det)
        if not kept:
            return outcome.fail(STAGE_QUALITY, NO_USABLE_FACE,
                                f"{len(detections)} face(s) found, none above the quality floor")
        for face_index, det in enumerate(kept):
            try:
                crop = self.engine.align(image, det.landmarks)
            except Exception as err:
                return _failed(outcome, STAGE_EMBED, err, str(err))
            outcome.faces.append(Face(face_index, det.bbox, det.landmarks, det.score, crop))
        return outcome

    # ------------------------------------------------------------------ the recognizer
    def embed(self, outcomes: list[ImageOutcome]) -> list[ImageOutcome]:
        """Embed every face of ``outcomes`` in one recognizer call (runs of RECOGNIZER_FACES).

        A recognizer failure loses no image: each image with faces becomes an embed error.
        """
        faces = [face for outcome in outcomes for face in outcome.faces]
        if not faces:
            return outcomes
        try:
            vectors = self.engine.embed([face.crop for face in faces], batch_size=RECOGNIZER_FACES)
        except Exception as err:
            message = str(err)[:MESSAGE_CHARS]
            for outcome in outcomes:
                if outcome.faces:
                    outcome.fail(STAGE_EMBED, type(err).__name__, message)
            return outcomes
        for face, vector in zip(faces, vectors):
            face.embedding = vector
        return outcomes

    # ------------------------------------------------------------------ rows in, outcomes out
    def run(self, rows: Iterable[dict]) -> Iterator[ImageOutcome]:
        """Outcomes of ``rows``, in order, ``batch_size`` images per recognizer call."""
        batches = _batched(iter(rows), self.batch_size)
        if self.threads == 1:
            for batch in batches:
                yield from self.embed([self.prepare(row) for row in batch])
            return
        prepare = _prepare_in_worker if self.processes else self.prepare
        ahead: collections.deque = collections.deque()
        try:
            for batch in batches:
                ahead.append([self._workers().submit(prepare, row) for row in batch])
                if len(ahead) > PREPARED_AHEAD:
                    yield from self.embed([f.result() for f in ahead.popleft()])
            while ahead:
                yield from self.embed([f.result() for f in ahead.popleft()])
        finally:
            for futures in ahead:  # stopped early: drop what was not started
                for future in futures:
                    future.cancel()

    def _workers(self) -> Executor:
        """The preparing workers, started at first use and kept."""
        if self._pool is None and self.processes:
            # spawned, not forked: the parent holds the recognizer runtime's threads
            settings = dict(model=self.engine.spec.name, weights_from=self.engine.weights_from, floor=self.floor,
                            limits=self.limits, options=self.options, base_dir=self.base_dir,
                            max_pixels=self.max_pixels)
            self._pool = ProcessPoolExecutor(self.threads, mp_context=multiprocessing.get_context("spawn"),
                                             initializer=_start_worker, initargs=(settings,))
        elif self._pool is None:
            self._pool = ThreadPoolExecutor(self.threads, thread_name_prefix="facelake-prepare")
        return self._pool

    def close(self) -> None:
        """Stop the preparing workers (after their current image)."""
        if self._pool is not None:
            self._pool.shutdown(wait=True, cancel_futures=True)
            self._pool = None

    def __enter__(self) -> "FacePipeline":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


_WORKER: FacePipeline | None = None   # a preparing process's own pipeline (no recognizer)


def _start_worker(settings: dict) -> None:
    global _WORKER
    engine = FaceEngine(settings.pop("model"), weights_from=settings.pop("weights_from"), threads=1,
                        recognizer=False)
    _WORKER = FacePipeline(engine, **settings)


def _prepare_in_worker(row: dict) -> ImageOutcome:
    return _WORKER.prepare(row)


def _failed(outcome: ImageOutcome, stage: str, err: Exception, message: str) -> ImageOutcome:
    return outcome.fail(stage, type(err).__name__, storage.redact(message)[:MESSAGE_CHARS])


def _batched(rows: Iterator[dict], size: int) -> Iterator[list[dict]]:
    while batch := list(itertools.islice(rows, size)):
        yield batch
