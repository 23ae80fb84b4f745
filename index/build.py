"""Build an index version: train on a sample, add shards in parallel Ray tasks, tune, publish atomically.

No vector passes through the driver. It reads only the Parquet footers of the faces table's
part files (``facelake.index.parts``) and hands each task a list of (file, row range) pieces:

1. sample tasks (one per part file) draw that file's share of the training sample, and one
   train task trains the IVF quantizer (and PQ codebooks) into ``trained.faiss``
   (``facelake.index.train``);
2. shard tasks read their own rows, add them to a clone of the trained index and write the
   shard's files (``facelake.index.shards``);
3. one task per written shard measures recall@10 of the tuning probes at each nprobe, and the
   smallest nprobe reaching the target is recorded (``facelake.index.tune``);
4. the manifest is written and CURRENT moved to it (``publish_manifest``, which
   ``facelake.index.update`` shares).

The manifest names each shard's ``sources`` (part file, row range, first faiss id) and the
version's ``next_id``, so ``facelake.index.update`` can extend the version later, keeping the
shards whose parts did not change (their ids stay; new faces are numbered from ``next_id``).
"""

from __future__ import annotations

import datetime as dt
import logging
import time
from dataclasses import dataclass
from typing import Callable, Mapping

import faiss
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import ray

import facelake
from facelake import device, faults, storage
from facelake.errors import ConfigError
from facelake.index import layout
from facelake.index.load import VersionHandle
from facelake.index.params import TARGET_RECALL, TUNING_QUERIES, IndexParams, choose_params
from facelake.index.parts import FacesInput, Part, Piece, check_schema, list_parts, pieces, shard_bounds, sources
from facelake.index.shards import gpu_available, run_shards, threads_per_task
from facelake.index.train import reuse_trained, sample_faces, train_on
from facelake.index.tune import tune, tuning_queries
from facelake.schema import id_table_schema, index_manifest
from facelake.storage import StorageOptions

log = logging.getLogger(__name__)

Hooks = Mapping[str, Callable[[str], None]]
HOOK_NAMES = ("before_manifest", "before_pointer")
DEFAULT_KEEP = 3


class NothingToIndex(ConfigError):
    """Every face is erased (or the faces table is empty): there is nothing to publish."""


@dataclass(frozen=True)
class BuildOptions:
    """How ``build_version`` builds a version; ``validate`` checks it before storage or Ray is
    touched. None means "decide for me" (from the collection size, ``facelake.index.params``)."""

    model: str                               # the embedding model's name: checked at load time
    weights_sha256: str                      # its weights' fingerprint: checked at load time
    shards: int | None = None                # shard count (or shard_size, not both)
    shard_size: int | None = None            # faces per shard (default parts.DEFAULT_SHARD_SIZE)
    nlist: int | None = None                 # IVF lists
    pq: int | None = None                    # PQ sub-quantizers; 0: IVF-Flat
    nprobe: int | None = None                # lists a search visits; None: tuned to target_recall
    rerank: int | None = None                # PQ candidates re-ranked exactly per wanted result
    keep: int = DEFAULT_KEEP                 # versions kept after publishing (the live one always)
    trained_from: str | None = None          # a published version whose trained quantizer is reused
    use_gpu: bool | None = None              # None: a GPU when faiss and the Ray cluster have one
    erased_ids: pa.Array | None = None       # image ids left out of every shard
    target_recall: float = TARGET_RECALL     # recall@10 the tuned nprobe reaches on the tuning probes
    source: str | None = None                # what the manifest names as its source (default: from faces)
    storage: StorageOptions | None = None    # default StorageOptions.from_env()
    hooks: Hooks | None = None               # "before_manifest" / "before_pointer" -> callable(version)

    def validate(self) -> None:
        """Raise ConfigError naming the fix for any option (or pair of options) out of range."""
        if not self.model or not self.weights_sha256:
            raise ConfigError("model and weights_sha256 are required: they are checked at load time")
        if self.keep < 1:
            raise ConfigError(f"--keep must be at least 1 (the live version is always kept), got {self.keep}")
        unknown = set(self.hooks or {}) - set(HOOK_NAMES)
        if unknown:
            raise ConfigError(f"unknown hook(s) {sorted(unknown)}; known: {HOOK_NAMES}")
        if not 0.0 < self.target_recall <= 1.0:
            raise ConfigError(f"target recall must be within (0, 1], got {self.target_recall}")
        if self.shards is not None and self.shard_size is not None:
            raise ConfigError("give --shards or --shard-size, not both")
        if self.use_gpu and not device.faiss_gpu():
            raise ConfigError("use_gpu=True but this faiss has no GPU support: install faiss-gpu "
                              "(make install-gpu) or leave use_gpu unset")


def build_version(faces: FacesInput, root: str, options: BuildOptions) -> dict:
    """Build, publish and return the manifest of a new index version under ROOT/index/.

    ``faces`` is the URI of the Parquet dataset ``facelake embed`` wrote, a list of its part
    URIs (a root's faces of record), or an in-memory table (tests, notebooks). Needs a connected
    Ray (``ray.init`` or ``facelake.cluster.runtime.connect``). Versions beyond ``options.keep``
    are pruned afterwards.
    """
    options.validate()
    storage.check_uri(root)
    if isinstance(faces, str):
        storage.check_uri(faces)
    if not ray.is_initialized():
        raise ConfigError("build_version needs a running Ray: call facelake.cluster.runtime.connect() "
                          "(or ray.init()) first")
    store = options.storage or StorageOptions.from_env()
    started = time.perf_counter()
    parts, schema = list_parts(faces, store)
    dim = check_schema(schema)
    n = sum(p.rows for p in parts)
    params, trained = _params(options, root, dim, n, store)
    use_gpu = _use_gpu(options.use_gpu)
    bounds = shard_bounds(n, options.shards, options.shard_size)
    version = layout.new_version_name(root, store)
    log.info("index %s: %d faces in %d part(s), dim %d, %s, train on %d, %d shard(s), %s", version, n,
             len(parts), dim, params.factory, params.train_size, len(bounds), "GPU" if use_gpu else "CPU")

    samples = sample_faces(parts, max(params.train_size, TUNING_QUERIES), store)
    train_started = time.perf_counter()
    if trained is None:
        trained = train_on(samples, params, use_gpu)
    train_seconds = round(time.perf_counter() - train_started, 3)
    trained_bytes = trained.tobytes()
    storage.write_bytes_atomic(layout.file_uri(root, version, layout.TRAINED), trained_bytes, store)
    files = {layout.TRAINED: {"sha256": layout.sha256(trained_bytes), "bytes": len(trained_bytes)}}
    tuning = tuning_queries(samples)

    id_schema = id_table_schema(schema)
    erased_list = _erased_list(options.erased_ids)
    groups = [pieces(parts, start, stop) for start, stop in bounds]
    results = run_shards(groups, range(len(groups)), parts, root, version, ray.put(trained),
                         ray.put(erased_list) if len(erased_list) else None, tuning,
                         id_schema=id_schema, model=options.model, weights_sha256=options.weights_sha256,
                         params=params, use_gpu=use_gpu, threads=threads_per_task(len(bounds)), options=store)
    for result in results:
        files.update(result["files"])
    if sum(r["count"] for r in results) == 0:
        raise NothingToIndex("no faces left to index: every face is erased or the faces table is empty")

    manifest = _manifest(options, faces, version, parts, params, dim, id_schema, bounds, groups, results,
                         files, erased_list)
    manifest["build"] = {"gpu": bool(use_gpu), "train_seconds": train_seconds}
    manifest.update(tune(VersionHandle(root, version, manifest, store), tuning, results, options.nprobe,
                         options.target_recall))
    manifest["build"]["seconds"] = round(time.perf_counter() - started, 3)
    return publish_manifest(root, version, index_manifest(manifest), keep=options.keep, hooks=options.hooks,
                            options=store)


def _params(options: BuildOptions, root: str, dim: int, n: int,
            store: StorageOptions) -> tuple[IndexParams, np.ndarray | None]:
    """The version's index parameters, and the serialized trained index when ``trained_from``
    gives one to reuse (its nlist, PQ and re-ranking are then the version's)."""
    nlist, pq, rerank = options.nlist, options.pq, options.rerank
    if not options.trained_from:
        return choose_params(n, dim, nlist=nlist, pq=pq, nprobe=options.nprobe, rerank=rerank), None
    trained, old = reuse_trained(root, options.trained_from, options.model, dim, nlist, pq, store)
    params = choose_params(n, dim, nlist=old["nlist"], pq=old["pq"] or 0, nprobe=options.nprobe,
                           rerank=old.get("rerank", 0))
    if old.get("factory") != params.factory:
        raise ConfigError(f"--trained-from {options.trained_from} holds a {old.get('factory')} quantizer, this "
                          f"facelake builds {params.factory}: build without --trained-from (`facelake rebuild "
                          f"--full` retrains)")
    return params, trained


def _use_gpu(asked: bool | None) -> bool:
    """``asked``, or whether a GPU is there when not asked; refused when the cluster has none."""
    use_gpu = gpu_available() if asked is None else asked
    if use_gpu and ray.cluster_resources().get("GPU", 0) < 1:
        raise ConfigError("use_gpu=True but the Ray cluster has no GPU: leave use_gpu unset")
    return use_gpu


def _erased_list(erased_ids: pa.Array | None) -> pa.Array:
    """The distinct erased image ids, as strings."""
    if erased_ids is None:
        return pa.array([], pa.string())
    return pc.unique(pa.array(erased_ids).cast(pa.string()))


def _manifest(options: BuildOptions, faces: FacesInput, version: str, parts: list[Part], params: IndexParams,
              dim: int, id_schema: pa.Schema, bounds: list[tuple[int, int]], groups: list[list[Piece]],
              results: list[dict], files: dict, erased_list: pa.Array) -> dict:
    """The manifest of a written version (before tuning adds nprobe and the build its timings)."""
    return {
        "version": version,
        "model": options.model,
        "weights_sha256": options.weights_sha256,
        "dim": dim,
        "metric": params.metric,
        "factory": params.factory,
        "nlist": params.nlist,
        "pq": params.pq_m,
        "rerank": params.rerank,
        "nprobe": options.nprobe or params.nprobe,
        "train_size": params.train_size,
        "columns": id_schema.names,
        "shards": [_shard_entry(i, start, parts, group, result, params.rerank)
                   for i, ((start, _), group, result) in enumerate(zip(bounds, groups, results))],
        "next_id": sum(p.rows for p in parts),          # faiss ids of this version are below it
        "total": sum(r["count"] for r in results),
        "erased_faces": sum(r["erased"] for r in results),
        "files": files,
        "source": options.source or _source(faces, parts),
        "created_at": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "facelake_version": facelake.__version__,
        "faiss_version": faiss.__version__,
        "trained_from": options.trained_from,
        "erased_ids_count": len(erased_list),       # distinct ids of the erasure list left out
        "erased_ids_sha256": layout.sha256("\0".join(sorted(erased_list.to_pylist())).encode()),
    }


def _shard_entry(shard_no: int, first_id: int, parts: list[Part], group: list[Piece], result: dict,
                 rerank: int) -> dict:
    """One shard's manifest entry, from its pieces and its shard task's result."""
    names = layout.shard_files(shard_no)
    return {"shard": shard_no, "first_id": first_id,
            "count": result["count"], "erased": result["erased"], "resident_bytes": result["resident_bytes"],
            "index_file": names[0], "ids_file": names[1], **({"vectors_file": names[2]} if rerank else {}),
            "sources": sources(parts, group)}


def _source(faces: FacesInput, parts: list[Part]) -> str:
    if isinstance(faces, str):
        return storage.redact(faces)
    return f"<{len(parts)} part file(s)>" if isinstance(faces, list) else "<in-memory table>"


def publish_manifest(root: str, version: str, manifest: dict, *, keep: int, hooks: Hooks | None,
                     options: StorageOptions | None) -> dict:
    """Write a version's manifest, then move CURRENT to it (the one publish step of every
    builder: hooks and fault points before each), and prune to ``keep`` versions."""
    _run_hook(hooks, "before_manifest", version)
    manifest_sha = layout.write_manifest(root, version, manifest, options)
    _run_hook(hooks, "before_pointer", version)
    layout.publish(root, version, manifest_sha, options)
    layout.prune(root, keep, options)
    return manifest


def _run_hook(hooks: Hooks | None, name: str, version: str) -> None:
    faults.point(f"index.{name}", version)
    if hooks and name in hooks:
        hooks[name](version)
