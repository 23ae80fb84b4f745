"""Erasure as every publisher enforces it: the checked erasure list, the refusal to make a version
holding an erased id live, and removing other versions that hold one.

Publishers (``facelake index``, ``rebuild``, ``erase``; any future one) call, under ROOT's lock:
``erased_ids_checked`` before building (and pass the result to ``build_version(erased_ids=)``),
``check_publishable`` just before CURRENT is written (a ``before_pointer`` hook), and
``drop_versions_holding`` after publishing, so versions kept by --keep never hold an erased face.
The erasure list itself (chained, anchored) is ``facelake.root``'s. Tested in tests/test_erase.py.
"""

from __future__ import annotations

import pyarrow as pa
import pyarrow.compute as pc

from facelake import root as rootmod, storage
from facelake.errors import FacelakeError
from facelake.index import layout
from facelake.index.load import open_version, shard_ids
from facelake.storage import StorageOptions


def erased_ids_checked(root: str, options: StorageOptions | None) -> pa.Array:
    """The erasure list (chain and audit anchor checked), also checked against the live version:
    a list shorter than what the live version's manifest says it left out was truncated."""
    erased = rootmod.erased_ids(root, options)
    live = layout.current_version(root, options)
    expected = open_version(root, live, options=options).manifest.get("erased_ids_count", 0) if live else 0
    if expected > len(erased):
        raise rootmod.ErasureListError(
            f"the live index version {live} was built leaving out {expected} erased id(s), but the erasure list "
            f"names {len(erased)}: entries were deleted; restore ROOT/erasures from a backup; nothing is "
            f"published until then")
    return erased


def check_publishable(root: str, version: str, erased: pa.Array, options: StorageOptions | None) -> None:
    """Refuse (ErasureListError) to make ``version`` live if its id tables hold an erased id; the
    refused version's folder is removed, so no version on disk holds it either."""
    if len(erased):
        try:
            handle = open_version(root, version, options=options)
            for shard in handle.manifest["shards"]:
                rootmod.refuse_erased(_shard_ids(handle, shard), erased, f"index version {version}")
        except rootmod.ErasureListError:
            storage.remove(layout.version_uri(root, version), recursive=True, options=options)
            raise


def versions_holding(root: str, ids: pa.Array, live: str | None, options: StorageOptions) -> list[str]:
    """Index versions other than the live one whose id tables hold any of ``ids``, plus unfinished folders."""
    doomed = []
    complete = layout.list_versions(root, options)
    for version in complete:
        if version == live:
            continue
        try:
            handle = open_version(root, version, options=options)
            holds = any(pc.any(pc.is_in(_shard_ids(handle, shard), value_set=ids)).as_py()
                        for shard in handle.manifest["shards"])
        except FacelakeError:
            doomed.append(version)  # unreadable: cannot prove it is clean
            continue
        if holds:
            doomed.append(version)
    doomed += [v for v in layout._children(root, options) if v not in complete and v != live]
    return doomed


def drop_versions_holding(root: str, erased: pa.Array, live: str | None, options: StorageOptions | None) -> list[str]:
    """Remove complete versions other than ``live`` that hold an erased id (publishers call it after
    publishing, so versions kept by --keep never hold one, even after a killed erase)."""
    if not len(erased):
        return []
    complete = set(layout.list_versions(root, options))
    doomed = [v for v in versions_holding(root, erased, live, options) if v in complete]
    for version in doomed:
        storage.remove(layout.version_uri(root, version), recursive=True, options=options)
    return doomed


def _shard_ids(handle, shard: dict) -> pa.ChunkedArray:
    """One shard's image ids (memory-mapped id table: one shard's ids in memory at a time)."""
    return shard_ids(handle, shard["shard"])["image_id"]
