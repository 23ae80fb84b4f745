"""The map that runs a table version's units of work (facelake.record.tables ``write_version``) as Ray tasks.

facelake.record.tables writes a version as units over one part each (rewrite a part of record without
dropped ids, record a staged part with its stats, compact small parts), which return only part
names, row counts and O(change) image ids. ``table_map`` chooses how they run: in Ray tasks when
Ray is connected and the job works on a root past ``driver_rows`` rows (jobs/work/counts.py
DRIVER_ROWS, the threshold of the other archive-scale steps), else in this process
(``rootmod.map_local``: a task's start costs more than such a write saves). Each argument that
is a pyarrow table or array (the dropped ids, the ids to record, the stats of record) goes to the
object store once, however many tasks read it. Tested in tests/test_table_tasks.py (the same
tables of record either way; a unit killed in a task leaves the old version live).
"""

from __future__ import annotations

import pyarrow as pa

from facelake.jobs.work import counts
from facelake.record import tables as rootmod

# CPUs per unit: it holds one part (up to PART_ROWS rows, embeddings included) in memory.
TASK_CPUS = 0.5


def ray_map(units: list[rootmod.Unit]) -> list[rootmod.Written]:
    """Run each unit as a Ray task; results in order. Waits for every task before raising the first
    error, so no unit of a failed write is still writing when the job ends."""
    import ray

    if not units:
        return []
    remotes: dict = {}
    shared: dict[int, object] = {}

    def arg(value):
        if isinstance(value, (pa.Table, pa.Array, pa.ChunkedArray)):
            if id(value) not in shared:
                shared[id(value)] = ray.put(value)
            return shared[id(value)]
        return value

    refs = []
    for fn, kwargs in units:
        if fn not in remotes:
            remotes[fn] = ray.remote(num_cpus=TASK_CPUS)(fn)
        refs.append(remotes[fn].remote(**{k: arg(v) for k, v in kwargs.items()}))
    ray.wait(refs, num_returns=len(refs))
    return ray.get(refs)


def table_map(rows: int, driver_rows: int | None = None) -> rootmod.MapFn:
    """``ray_map`` when Ray is connected and ``rows`` (the root's rows of record plus the manifest's,
    or the change's) exceed ``driver_rows`` (default jobs/work/counts.py DRIVER_ROWS), else in this process."""
    if rows <= (counts.DRIVER_ROWS if driver_rows is None else driver_rows):
        return rootmod.map_local
    import ray

    return ray_map if ray.is_initialized() else rootmod.map_local
