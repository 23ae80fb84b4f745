"""Publish an index version of the faces of record of a table version (facelake.record.tables),
after `facelake rebuild` or `erase` wrote one; callers hold ROOT's lock.

The live version's trained quantizer is reused while it fits: the collection is within
[1/RETRAIN_GROWTH, RETRAIN_GROWTH] x the size it was trained on, and the mean similarity of a
sample of faces to their nearest centroid has not dropped by more than RETRAIN_DRIFT from its
value at training time (``retrain_reason``). Then the live version is extended
(facelake.index.update): shards whose part files of record are all still in the table are kept
(files hard-linked or copied server-side), shards that held removed, changed or erased faces are
rebuilt, new faces go to delta shards, small shards merge tier by tier. Otherwise (or with
``full``, or a live version built before shards recorded their sources) it retrains and builds
every shard (facelake.index.build ``build_version``). ROOT/TABLE records the index version
built from the table version just before CURRENT is written. Erased ids are left out, and other
versions holding one are removed after publishing (facelake.index.erasure).

Tested in tests/test_rebuild.py, tests/test_rebuild_incremental.py and tests/test_erase.py.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from typing import Callable

import pyarrow as pa

from facelake import storage
from facelake.index import layout
from facelake.index.build import BuildOptions, NothingToIndex, build_version
from facelake.index.erasure import check_publishable, drop_versions_holding, erased_ids_checked
from facelake.index.load import open_version, read_verified
from facelake.index.parts import DEFAULT_SHARD_SIZE
from facelake.index.train import sampled_similarity
from facelake.index.update import NotIncremental, update_version
from facelake.record import tables as rootmod
from facelake.record.lock import RootLock
from facelake.storage import StorageOptions

log = logging.getLogger(__name__)

# Retrain bounds (see the module docstring).
RETRAIN_GROWTH = 2.0
RETRAIN_DRIFT = 0.10
DRIFT_SAMPLE = 20_000


def retrain_reason(n: int, quantizer: dict | None, live_manifest: dict | None, model: str,
                   similarity: float | None, full: bool) -> str | None:
    """Why the quantizer must be retrained, or None to reuse it (the bound of the module docstring)."""
    if full:
        return "--full"
    if live_manifest is None or quantizer is None:
        return "no reusable trained index"
    if live_manifest.get("model") != model:
        return f"live index holds model {live_manifest.get('model')}"
    trained_n = quantizer.get("faces") or 0
    if n > RETRAIN_GROWTH * trained_n or n * RETRAIN_GROWTH < trained_n:
        return f"collection is {n} faces, trained on {trained_n} (bound: x{RETRAIN_GROWTH:g} either way)"
    if n < int(live_manifest["nlist"]):
        return f"fewer faces ({n}) than lists ({live_manifest['nlist']})"
    base = quantizer.get("mean_similarity")
    if similarity is not None and base is not None and similarity < base * (1 - RETRAIN_DRIFT):
        return (f"mean similarity to nearest centroid fell from {base:.3f} to {similarity:.3f} "
                f"(bound: {RETRAIN_DRIFT:.0%})")
    return None


@dataclass(frozen=True)
class _Faces:
    """The faces of record an index version is published from, and what publishing them needs."""

    root: str
    parts: list[str]                   # part files of record (uris)
    rows: tuple[int, ...] | None       # rows of each part as recorded (no footer read), if recorded
    count: int                         # faces before erasure: at most this many are indexed
    erased: pa.Array
    lock: RootLock
    options: StorageOptions | None


def publish_index(root: str, version: rootmod.TableVersion | None, *, model: str, weights_sha256: str, keep: int,
                  full: bool, lock: RootLock, options: StorageOptions, shard_size: int | None = None) -> dict:
    """Publish an index version of the faces of record of table ``version``; returns what it did:
    version, retrained, reason, the build's figures, incremental (shards kept / built when the live
    version was extended) and dropped (other versions removed for holding an erased id).

    The shard tasks read the table's part files themselves (no face passes through this process).
    With no faces left, the index is withdrawn (ROOT/index removed) since an empty IVF index
    cannot be built.
    """
    pointer = rootmod.read_pointer(root, options) or {}
    erased = erased_ids_checked(root, options)   # refuses a tampered erasure list
    if version is None:
        faces = _Faces(root, [], None, 0, erased, lock, options)
    else:
        faces = _Faces(root, [rootmod.uri(root, rootmod.FACES, p) for p in version.faces], version.face_part_rows,
                       version.face_rows, erased, lock, options)
    if not faces.parts or faces.count == 0:
        return _withdraw(faces, pointer)
    live = layout.current_version(root, options)
    live_manifest = open_version(root, live, options=options).manifest if live else None
    quantizer = pointer.get("quantizer")
    similarity = None
    if not full and live_manifest is not None and quantizer and live_manifest.get("model") == model:
        trained = read_verified(open_version(root, live, options=options), layout.TRAINED)
        similarity = sampled_similarity(faces.parts, trained, DRIFT_SAMPLE, options, faces.rows)
    reason = retrain_reason(faces.count, quantizer, live_manifest, model, similarity, full)
    common = {"model": model, "weights_sha256": weights_sha256, "keep": keep, "erased_ids": faces.erased,
              "source": f"faces of record, table version {version.name}", "options": options,
              "hooks": {"before_pointer": _before_pointer(faces, quantizer, reason)}}
    try:
        built = _extended(faces, live, shard_size, common) if reason is None else None
        incremental = built["incremental"] if built is not None else None
        if built is None:
            built = _built(faces, live, live_manifest, reason, shard_size, common)
    except NothingToIndex:
        return _withdraw(faces, pointer)
    dropped = drop_versions_holding(root, faces.erased, built["version"], options)
    return {"version": built["version"], "retrained": reason is not None, "reason": reason,
            "factory": built["factory"], "nlist": built["nlist"], "nprobe": built["nprobe"],
            "shards": len(built["shards"]), "total": built["total"], "previous": live, "incremental": incremental,
            "dropped": dropped}


def _withdraw(faces: _Faces, pointer: dict) -> dict:
    faces.lock.verify()
    storage.remove(layout.index_root(faces.root), recursive=True, options=faces.options)
    rootmod.write_pointer(faces.root, {**pointer, "index_version": None, "quantizer": None}, faces.options)
    return {"version": None, "retrained": False, "reason": "no faces of record: index withdrawn", "dropped": []}


def _before_pointer(faces: _Faces, quantizer: dict | None, reason: str | None) -> Callable[[str], None]:
    """The hook run just before CURRENT names the new version: the lock still held, no erased id in
    the version, and ROOT/TABLE records it (with its quantizer's figures when retrained)."""
    def before_pointer(version_name: str) -> None:
        faces.lock.verify()
        check_publishable(faces.root, version_name, faces.erased, faces.options)
        q = quantizer
        if reason is not None:
            trained = read_verified(open_version(faces.root, version_name, options=faces.options), layout.TRAINED)
            q = {"trained_in": version_name, "faces": faces.count,
                 "mean_similarity": sampled_similarity(faces.parts, trained, DRIFT_SAMPLE, faces.options, faces.rows)}
        rootmod.write_pointer(faces.root, {**(rootmod.read_pointer(faces.root, faces.options) or {}),
                                           "index_version": version_name, "quantizer": q}, faces.options)

    return before_pointer


def _extended(faces: _Faces, live: str | None, shard_size: int | None, common: dict) -> dict | None:
    """The live version extended (facelake.index.update), or None when it cannot be."""
    try:
        return update_version(faces.parts, faces.root, live=live, shard_size=shard_size, **common)
    except NotIncremental as why:
        log.info("building every shard: %s", why)
        return None


def _built(faces: _Faces, live: str | None, live_manifest: dict | None, reason: str | None,
           shard_size: int | None, common: dict) -> dict:
    """Every shard built: trained anew when ``reason`` says so, else on the live quantizer."""
    n = faces.count
    shards = min(n, math.ceil(n / (shard_size or DEFAULT_SHARD_SIZE)))
    pq_m = live_manifest.get("pq") if live_manifest else None
    if pq_m is not None and n < 256:
        pq_m = None
    settings = {("storage" if name == "options" else name): value for name, value in common.items()}
    return build_version(faces.parts, faces.root, BuildOptions(
        shards=shards, pq=pq_m if reason is not None else None,
        trained_from=None if reason is not None else live, **settings))
