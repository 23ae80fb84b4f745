"""Publish an index version at O(change): keep the live version's shards whose faces did not change.

A version built by ``build_version`` records per shard its ``sources`` (the faces-table part
files, by name, and row ranges it was built from, with each range's first faiss id) and the
version's ``next_id`` (every faiss id of the version is below it). Parts of record are immutable
(facelake.record.tables: a part that loses rows is rewritten under a new name), so a shard whose parts are
all still in the table of record holds exactly the faces it would be built from again.
``update_version`` builds the next version from the live one:

1. keeps every such shard: its files are hard-linked (local root) or copied server-side (S3
   CopyObject) into the new version's folder under the shard's new number, with the checksums of
   the live manifest, so every version stays self-contained and --keep pruning or the erasure
   checks, which delete whole version folders, never delete a file another version still uses.
   Cost: local, one link per file and no bytes; S3, one CopyObject per file (no bytes through
   this process; storage is billed per kept version, as full rebuilds were).
2. rebuilds, from their surviving parts, the shards that held a part no longer in the table
   (photos removed, changed or erased), keeping those faces' faiss ids;
3. adds the faces of parts new to the table as delta shard(s), ids from ``next_id`` up, so ids
   stay unique within the version;
4. merges small shards tier by tier: MERGE_FACTOR shards of the same size tier (rows within a
   factor MERGE_FACTOR) below shard_size / MERGE_FACTOR become one, so nightly delta shards do not
   pile up: at most MERGE_FACTOR - 1 small shards per tier stay, and a face is rewritten about
   log_MERGE_FACTOR(shard_size / nightly delta) times in its life.

The trained quantizer, the parameters and nprobe (with the recall curve measured when it was
trained) are the live version's; the caller (facelake.index.publish.publish_index) decides when
drift or growth calls for a full rebuild. A live version this cannot extend (built before sources
were recorded, another model or weights, other id-table columns) raises NotIncremental and the
caller builds in full. Tested in tests/test_rebuild_incremental.py.
"""

from __future__ import annotations

import datetime as dt
import logging
import math
import time
from dataclasses import dataclass

import faiss
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import ray

import facelake
from facelake import storage
from facelake.errors import ConfigError
from facelake.index import layout
from facelake.index.build import NothingToIndex, publish_manifest
from facelake.index.load import VersionHandle, open_version, read_verified, shard_ids
from facelake.index.params import IndexParams
from facelake.index.parts import DEFAULT_SHARD_SIZE, Part, check_schema, list_parts, sources
from facelake.index.shards import gpu_available, run_shards, threads_per_task
from facelake.schema import id_table_schema, index_manifest
from facelake.storage import StorageOptions

log = logging.getLogger(__name__)

# Shards of one size tier merged into one (see the module docstring): 4 keeps the shard count low
# (searchers fan out to every shard) while each face is rewritten only a few times.
MERGE_FACTOR = 4


class NotIncremental(ConfigError):
    """The live version cannot be extended in place of a full build (the message says why)."""


@dataclass
class _Group:
    """One shard of the new version: its pieces (part name, start, stop, first faiss id)."""

    pieces: list[tuple[str, int, int, int]]
    rows: int
    reused: dict | None = None          # the live shard entry kept as it is (files linked)


def _split(pieces: list[tuple[str, int, int, int]], size: int) -> list[_Group]:
    """Pieces cut into groups of at most ``size`` rows (ids stay contiguous within a piece)."""
    groups, current, rows = [], [], 0
    for name, start, stop, first in pieces:
        while start < stop:
            take = min(stop - start, size - rows)
            current.append((name, start, start + take, first))
            rows += take
            start, first = start + take, first + take
            if rows == size:
                groups.append(_Group(current, rows))
                current, rows = [], 0
    if current:
        groups.append(_Group(current, rows))
    return groups


def plan_groups(live: dict, parts: list[Part], size: int, holds_erased=lambda entry: False) -> tuple[list[_Group], int]:
    """The new version's shards from the live manifest and the parts of record now; and next_id."""
    by_name = {p.name: p for p in parts}
    groups, covered = [], set()
    for entry in live["shards"]:
        kept = [s for s in entry["sources"] if s["part"] in by_name and by_name[s["part"]].rows == s["part_rows"]]
        covered.update(s["part"] for s in kept)
        pieces = [(s["part"], s["start"], s["stop"], s["first_id"]) for s in kept]
        if len(kept) == len(entry["sources"]) and not holds_erased(entry):
            groups.append(_Group(pieces, int(entry["count"]), reused=entry))
        elif pieces:
            groups.append(_Group(pieces, sum(stop - start for _, start, stop, _ in pieces)))
    next_id = int(live["next_id"])
    fresh = []
    for part in parts:
        if part.name not in covered and part.rows:
            fresh.append((part.name, 0, part.rows, next_id))
            next_id += part.rows
    groups += _split(fresh, size)
    return _merge_tiers(groups, size), next_id


def _merge_tiers(groups: list[_Group], size: int) -> list[_Group]:
    sealed = max(1, size // MERGE_FACTOR)

    def tier(rows: int) -> int:
        return int(math.log(max(rows, 1), MERGE_FACTOR))

    while True:
        tiers: dict[int, list[int]] = {}
        for i, g in enumerate(groups):
            if g.rows < sealed:
                tiers.setdefault(tier(g.rows), []).append(i)
        full = sorted(t for t, members in tiers.items() if len(members) >= MERGE_FACTOR)
        if not full:
            return groups
        merged = set(tiers[full[0]])
        pieces = sorted((p for i in merged for p in groups[i].pieces), key=lambda p: p[3])
        groups = [g for i, g in enumerate(groups) if i not in merged] + _split(pieces, size)


def update_version(faces: list[str], root: str, *, live: str, model: str, weights_sha256: str, keep: int = 3,
                   shard_size: int | None = None, erased_ids: pa.Array | None = None, source: str | None = None,
                   options: StorageOptions | None = None, hooks=None) -> dict:
    """Publish the next version of ``live`` for the faces table whose part files are ``faces``
    (see the module docstring); return its manifest. Needs a connected Ray."""
    if not ray.is_initialized():
        raise ConfigError("update_version needs a running Ray: call facelake.cluster.runtime.connect() first")
    options = options or StorageOptions.from_env()
    started = time.perf_counter()
    handle = _extendable(root, live, model, weights_sha256, options)
    old = handle.manifest
    parts, schema = list_parts(faces, options)
    dim = check_schema(schema)
    id_schema = id_table_schema(schema)
    if dim != int(old["dim"]) or id_schema.names != old["columns"]:
        raise NotIncremental(f"the faces' id-table columns or dimension differ from live version {live}'s")
    erased_list = pa.array([], pa.string()) if erased_ids is None else pc.unique(pa.array(erased_ids).cast(pa.string()))
    erased_sha = layout.sha256("\0".join(sorted(erased_list.to_pylist())).encode())

    def holds_erased(entry: dict) -> bool:
        # only when the erasure list grew since the live version was built: one shard's ids at a time
        if not len(erased_list) or erased_sha == old.get("erased_ids_sha256"):
            return False
        ids = shard_ids(handle, entry["shard"])["image_id"]
        return bool(pc.any(pc.is_in(ids, value_set=erased_list)).as_py())

    groups, next_id = plan_groups(old, parts, shard_size or DEFAULT_SHARD_SIZE, holds_erased)
    if not groups:
        raise NothingToIndex("no faces left to index: every face is erased or the faces table is empty")
    version = layout.new_version_name(root, options)
    storage.link_or_copy(handle.uri(layout.TRAINED), layout.file_uri(root, version, layout.TRAINED), options)
    files = {layout.TRAINED: old["files"][layout.TRAINED]}
    entries: list[dict | None] = [None] * len(groups)
    for number, group in enumerate(groups):
        if group.reused is not None:
            entries[number] = _keep_shard(handle, group.reused, number, root, version, files, options)
    build_numbers = [number for number, group in enumerate(groups) if group.reused is None]
    use_gpu = gpu_available()
    if build_numbers:
        job = _Rebuild(parts=parts, root=root, version=version, id_schema=id_schema, model=model,
                       weights_sha256=weights_sha256, use_gpu=use_gpu, options=options)
        built = _build_shards(handle, [groups[n] for n in build_numbers], build_numbers, erased_list, job)
        for number, (entry, shard_files) in zip(build_numbers, built):
            entries[number] = entry
            files.update(shard_files)
    if sum(e["count"] for e in entries) == 0:
        raise NothingToIndex("no faces left to index: every face is erased or the faces table is empty")
    built_faces = sum(groups[n].rows for n in build_numbers)
    manifest = index_manifest({
        **{k: v for k, v in old.items() if k not in ("incremental", "build", "format")},
        **_changed_fields(old, live, version, entries, next_id, files, erased_list, erased_sha),
        "source": source or f"<{len(parts)} part file(s)>",
        "incremental": {"from": live, "reused_shards": [e["reused_from"]["shard"] for e in entries if "reused_from" in e],
                        "built_shards": build_numbers, "built_faces": built_faces},
        "build": {"gpu": bool(use_gpu), "train_seconds": 0.0, "seconds": round(time.perf_counter() - started, 3)},
    })
    log.info("index %s from %s: %d shard(s) kept, %d built (%d faces)", version, live,
             len(entries) - len(build_numbers), len(build_numbers), built_faces)
    return publish_manifest(root, version, manifest, keep=keep, hooks=hooks, options=options)


def _changed_fields(old: dict, live: str, version: str, entries: list[dict], next_id: int, files: dict,
                    erased_list: pa.Array, erased_sha: str) -> dict:
    """The manifest fields of the new version that differ from the live one's."""
    return {
        "version": version,
        "nprobe_how": f"carried from {live} (same trained quantizer): {old.get('nprobe_how', '')}".rstrip(": "),
        "shards": entries,
        "next_id": next_id,
        "total": sum(e["count"] for e in entries),
        "erased_faces": sum(e.get("erased", 0) for e in entries),
        "files": files,
        "created_at": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "facelake_version": facelake.__version__,
        "faiss_version": faiss.__version__,
        "trained_from": live,
        "erased_ids_count": len(erased_list),
        "erased_ids_sha256": erased_sha,
    }


def _extendable(root: str, live: str, model: str, weights_sha256: str, options: StorageOptions) -> VersionHandle:
    """The live version, when this module can extend it; NotIncremental (saying why) otherwise."""
    handle = open_version(root, live, expect_model=model, options=options)
    old = handle.manifest
    if old.get("weights_sha256") != weights_sha256:
        raise NotIncremental(f"live version {live} holds other weights")
    if "next_id" not in old or any("sources" not in s for s in old["shards"]):
        raise NotIncremental(f"live version {live} was built before shards recorded their sources")
    return handle


def _keep_shard(handle: VersionHandle, entry: dict, number: int, root: str, version: str, files: dict,
                options: StorageOptions) -> dict:
    """Link (or copy server-side) a live shard's files into ``version`` as shard ``number``; add
    their checksums to ``files``; return its new manifest entry."""
    new_names = layout.shard_files(number)
    keys = ["index_file", "ids_file"] + (["vectors_file"] if "vectors_file" in entry else [])
    renamed = {}
    for key, new_name in zip(keys, new_names):
        storage.link_or_copy(handle.uri(entry[key]), layout.file_uri(root, version, new_name), options)
        files[new_name] = handle.manifest["files"][entry[key]]
        renamed[key] = new_name
    return {**entry, **renamed, "shard": number, "reused_from": {"version": handle.version, "shard": entry["shard"]}}


@dataclass(frozen=True)
class _Rebuild:
    """Where and how the shards an update builds are written."""

    parts: list[Part]
    root: str
    version: str
    id_schema: pa.Schema
    model: str
    weights_sha256: str
    use_gpu: bool
    options: StorageOptions


def _build_shards(handle: VersionHandle, groups: list[_Group], numbers: list[int], erased_list: pa.Array,
                  job: _Rebuild) -> list[tuple[dict, dict]]:
    """Build ``groups`` as shards ``numbers`` on the live version's trained index (Ray tasks);
    return each one's manifest entry and files."""
    old = handle.manifest
    params = IndexParams(dim=int(old["dim"]), nlist=int(old["nlist"]), pq_m=old["pq"], nprobe=int(old["nprobe"]),
                         train_size=int(old.get("train_size") or 0), rerank=int(old.get("rerank") or 0))
    trained_ref = ray.put(np.frombuffer(read_verified(handle, layout.TRAINED), np.uint8))
    erased = ray.put(erased_list) if len(erased_list) else None
    by_name = {p.name: i for i, p in enumerate(job.parts)}
    groups_as_pieces = [sorted(((by_name[n], a, b, f) for n, a, b, f in g.pieces), key=lambda p: p[3])
                        for g in groups]
    results = run_shards(groups_as_pieces, numbers, job.parts, job.root, job.version, trained_ref, erased, None,
                         id_schema=job.id_schema, model=job.model, weights_sha256=job.weights_sha256, params=params,
                         use_gpu=job.use_gpu, threads=threads_per_task(len(groups)), options=job.options)
    built = []
    for number, group_pieces, result in zip(numbers, groups_as_pieces, results):
        names = layout.shard_files(number)
        entry = {"shard": number, "first_id": min(p[3] for p in group_pieces), "count": result["count"],
                 "erased": result["erased"], "resident_bytes": result["resident_bytes"],
                 "index_file": names[0], "ids_file": names[1], **({"vectors_file": names[2]} if params.rerank else {}),
                 "sources": sources(job.parts, group_pieces)}
        built.append((entry, result["files"]))
    return built
