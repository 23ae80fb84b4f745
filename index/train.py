"""Train a version's quantizer (IVF centroids and PQ codebooks) on a sample of the faces, in Ray tasks.

One sample task per part file draws that file's share of the sample (``sample_faces``); one
train task gathers the sample from the object store and trains (``train``: k-means on a GPU
when asked). The samples stay in the object store for the tuning probes
(``facelake.index.tune``). ``reuse_trained`` takes a published version's quantizer instead, and
``sampled_similarity`` measures how well a trained quantizer still fits the collection.
"""

from __future__ import annotations

import math
from typing import Sequence

import faiss
import numpy as np
import pyarrow as pa
import ray

from facelake.errors import ConfigError
from facelake.index import layout
from facelake.index.load import open_version, read_verified
from facelake.index.params import IndexParams
from facelake.index.parts import FacesInput, Part, embeddings, list_parts, parts_of_record, read_rows
from facelake.storage import StorageOptions

Sample = tuple[np.ndarray, np.ndarray]      # (normalised vectors, global row numbers)


def train(xb_sample: np.ndarray, params: IndexParams, use_gpu: bool = False) -> faiss.Index:
    """Train an empty IVF-Flat / IVF-PQ index (inner product) on L2-normalised float32 vectors.

    On a GPU only k-means runs there (faiss's bench_ivf pattern); the result is a CPU index.
    """
    xb_sample = _as_vectors(xb_sample, params.dim)
    index = faiss.index_factory(params.dim, params.factory, faiss.METRIC_INNER_PRODUCT)
    ivf = faiss.downcast_index(faiss.extract_index_ivf(index))
    if isinstance(ivf, faiss.IndexIVFPQ):  # polysemous codes are not searched; training them triples PQ time
        ivf.do_polysemous_training = False
    if use_gpu:
        faiss.extract_index_ivf(index).clustering_index = faiss.index_cpu_to_all_gpus(
            faiss.IndexFlatIP(params.dim))
    index.train(xb_sample)
    return index


def _as_vectors(x: np.ndarray, dim: int) -> np.ndarray:
    x = np.ascontiguousarray(x, dtype=np.float32)
    if x.ndim != 2 or x.shape[1] != dim:
        raise ConfigError(f"expected float32 vectors of shape (n, {dim}), got {x.shape}")
    return x


def sample_sizes(parts: list[Part], total: int) -> list[int]:
    """Rows drawn from each part so that the sample is ``total`` rows, proportional to size."""
    n = sum(p.rows for p in parts)
    return [min(p.rows, math.ceil(total * p.rows / n)) for p in parts]


@ray.remote
def _sample_task(part: Part, size: int, seed: int, options: StorageOptions | None) -> Sample:
    """``size`` random rows of one part: (normalised vectors, global row numbers)."""
    picks = np.sort(np.random.default_rng(seed).choice(part.rows, size, replace=False))
    table = read_rows(part, 0, part.rows, ["image_id", "embedding"], options).take(pa.array(picks))
    return embeddings(table), picks + part.first_row


def sample_faces(parts: list[Part], total: int, options: StorageOptions | None) -> list:
    """Object refs of a ``total``-row random sample of the faces, one ``Sample`` per part."""
    return [_sample_task.options(num_cpus=0.5).remote(p, size, i, options)
            for i, (p, size) in enumerate(zip(parts, sample_sizes(parts, total))) if size]


@ray.remote
def _train_task(params: IndexParams, use_gpu: bool, *samples: Sample) -> np.ndarray:
    xb = np.concatenate([s[0] for s in samples])
    return faiss.serialize_index(train(xb, params, use_gpu))


def train_on(samples: list, params: IndexParams, use_gpu: bool) -> np.ndarray:
    """The serialized trained index, trained in one Ray task (on a GPU when ``use_gpu``) on the
    samples of ``sample_faces``."""
    gpus = {"num_gpus": 1} if use_gpu else {}
    return ray.get(_train_task.options(**gpus).remote(params, use_gpu, *samples))


def reuse_trained(root: str, version: str, model: str, dim: int, nlist: int | None, pq_m: int | None,
                  options: StorageOptions | None) -> tuple[np.ndarray, dict]:
    """The serialized trained index of a published version, and its manifest; refused when
    ``nlist`` or ``pq_m`` asks for another quantizer."""
    handle = open_version(root, version, expect_model=model, expect_dim=dim, options=options)
    old = handle.manifest
    if (nlist and nlist != old["nlist"]) or (pq_m is not None and pq_m and pq_m != old["pq"]):
        raise ConfigError(f"--trained-from {version} has nlist {old['nlist']} and pq {old['pq']}: drop "
                          f"--nlist/--pq or build without --trained-from")
    return np.frombuffer(read_verified(handle, layout.TRAINED), np.uint8), old


@ray.remote
def _similarity_task(trained: np.ndarray, *samples: Sample) -> float:
    xb = np.concatenate([s[0] for s in samples])
    index = faiss.deserialize_index(trained)          # kept: the quantizer belongs to it
    quantizer = faiss.extract_index_ivf(index).quantizer
    D, _ = quantizer.search(np.ascontiguousarray(xb, np.float32), 1)
    return float(D.mean())


def sampled_similarity(faces: FacesInput, trained: bytes | np.ndarray, size: int,
                       options: StorageOptions | None = None, rows: Sequence[int] | None = None) -> float:
    """Mean inner product of ``size`` sampled faces to their nearest centroid of ``trained`` (how
    well a trained quantizer still fits the collection), computed in Ray tasks. ``rows``: each
    part's row count when ``faces`` is a list of parts whose counts are known (a table version's
    record), so no footer is read here."""
    if rows is not None and isinstance(faces, list) and len(rows) == len(faces):
        parts = parts_of_record(faces, list(rows))
    else:
        parts, _ = list_parts(faces, options)
    samples = sample_faces(parts, size, options)
    return ray.get(_similarity_task.remote(np.frombuffer(trained, np.uint8), *samples))
