"""Erasure as every publisher enforces it: the checked erasure list, the refusal to make a version
holding an erased id live, and removing other versions that hold one.

Publishers (``facelake index``, ``rebuild``, ``erase``; any future one) call, under ROOT's lock:
``erased_ids_checked`` before building (and pass the result to ``build_version(erased_ids=)``),
``check_publishable`` just before CURRENT is written (a ``before_pointer`` hook), and
``drop_versions_holding`` after publishing, so versions kept by --keep never hold an erased face.
The erasure list itself (chained, anchored) is ``facelake.record.erasures``. The id tables are matched
against the list shard by shard: in Ray tasks (SHARDS_PER_TASK shards each, returning only the
numbers of the shards holding an erased id) when Ray is connected (publishers connect it to build)
and the version holds more than DRIVER_ROWS faces, else in the driver, one shard in memory at a
time. Tested in tests/test_erase.py and tests/test_erase_holdings.py.
"""

from __future__ import annotations

import pyarrow as pa
import pyarrow.compute as pc

from facelake import storage
from facelake.record import erasures as erasure_list
from facelake.errors import FacelakeError
from facelake.index import layout
from facelake.index.load import open_version, shard_ids
from facelake.storage import StorageOptions

# Faces of a version at most this many are matched in the driver (as jobs/work/counts.py DRIVER_ROWS).
DRIVER_ROWS = 200_000
SHARDS_PER_TASK = 16
# A fraction of a CPU: the tasks run beside the job's actors on 1-2 CPU nodes.
TASK_CPUS = 0.25


def erased_ids_checked(root: str, options: StorageOptions | None) -> pa.Array:
    """The erasure list (chain and audit anchor checked), also checked against the live version:
    a list shorter than what the live version's manifest says it left out was truncated."""
    erased = erasure_list.erased_ids(root, options)
    live = layout.current_version(root, options)
    expected = open_version(root, live, options=options).manifest.get("erased_ids_count", 0) if live else 0
    if expected > len(erased):
        raise erasure_list.ErasureListError(
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
            for number in shards_holding(handle, erased):   # raises on the first
                erasure_list.refuse_erased(shard_ids(handle, number)["image_id"], erased, f"index version {version}")
        except erasure_list.ErasureListError:
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
            holds = bool(shards_holding(open_version(root, version, options=options), ids))
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


def shards_holding(handle, ids: pa.Array, *, driver_rows: int | None = None) -> list[int]:
    """The numbers of ``handle``'s shards whose id tables hold any of ``ids`` (see the module docstring)."""
    shards = handle.manifest["shards"]
    if not len(ids) or not shards:
        return []
    rows = sum(int(s.get("count", 0)) for s in shards)
    import ray

    numbers = [s["shard"] for s in shards]
    if rows <= (DRIVER_ROWS if driver_rows is None else driver_rows) or not ray.is_initialized():
        return _holding(handle, numbers, ids)
    task = ray.remote(num_cpus=TASK_CPUS)(_holding)
    wanted = ray.put(ids)
    return [n for found in ray.get([task.remote(handle, numbers[i:i + SHARDS_PER_TASK], wanted)
                                    for i in range(0, len(numbers), SHARDS_PER_TASK)]) for n in found]


def _holding(handle, numbers: list[int], ids: pa.Array) -> list[int]:
    return [n for n in numbers
            if pc.any(pc.is_in(shard_ids(handle, n)["image_id"], value_set=ids)).as_py()]
