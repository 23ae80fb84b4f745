"""A search's workers: batches of probe faces -> shard fan-out -> result part files, counts back.

Probe faces stream as a Ray Dataset from their Parquet part files to a pool of
search workers (``BatchSearch``, Ray Data actors; ``search_on_ray``). Each batch fans out to the
shard actors (facelake.index.search), whose top-k lists come back with their winners' id-table
rows and merge into a global top-k; the worker annotates false-match rates, writes the batch's
result part file itself (facelake.results) and returns only counts, so the driver's memory grows
with neither the gallery nor the probes. ``local_batches`` runs the same worker code in this
process, one bounded batch at a time. Tested in tests/test_search.py and
tests/test_hardening_faults.py.
"""

from __future__ import annotations

import threading
import uuid
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, replace

import pyarrow as pa

from facelake import storage
from facelake.jobs.work.probes import ProbeSource, parquet_schema
from facelake.results import ResultSpec, probe_columns, result_table
from facelake.calibration.thresholds import false_match_rates

# Search workers (Ray Data actors that fan batches out to the shard actors, merge, annotate and
# write): two keep the shard actors busy while one batch is merged and written.
SEARCH_WORKERS = 2
# CPU reservations: the shard actors do the heavy work; workers and the Parquet reads are light
# and must still get scheduled when the shard actors hold every CPU.
WORKER_CPUS = 0.25
READ_CPUS = 0.25


@dataclass(frozen=True)
class BatchSpec:
    """Everything a search worker needs to turn a batch of probe faces into a result part file."""

    handle: object                    # facelake.index.load.VersionHandle
    k: int
    nprobe: int
    cal: object                       # calibration.Calibration | GalleryCalibration | None
    folder: str                       # where the result part files go
    options: storage.StorageOptions
    result: ResultSpec


class BatchSearch:
    """A search worker: a batch of probe faces -> shard fan-out -> merged top-k with the winners'
    gallery rows -> false-match rates -> one result part file. Returns only counts."""

    def __init__(self, spec: BatchSpec, actors: list | None = None) -> None:
        from facelake.index.search import CoarseQuantizer
        from facelake.index.searchers import LocalShardSearcher

        self.spec, self.actors = spec, actors
        every_shard = list(range(spec.handle.shard_count))
        self.searchers = None if actors else [LocalShardSearcher(spec.handle, every_shard)]
        # with several shards, each probe's lists are found once here rather than once per shard
        self.coarse = CoarseQuantizer(spec.handle) if spec.handle.shard_count > 1 else None
        self.token, self.parts = uuid.uuid4().hex[:8], 0

    def __call__(self, batch: pa.Table) -> pa.Table:
        from facelake.index.parts import embeddings
        from facelake.index.searchers import search_rows

        spec = self.spec
        D, I, rows = search_rows(spec.handle, embeddings(batch), spec.k, spec.nprobe, actors=self.actors,
                                 searchers=self.searchers, coarse=self.coarse)
        table, candidates, empty = result_table(spec.result, batch, D, I, rows, false_match_rates(spec.cal, D))
        name = f"part-{spec.result.job_id}-{self.token}-{self.parts:05d}.parquet"
        storage.write_table(storage.join(spec.folder, name), table, spec.options)
        self.parts += 1
        return pa.table({"faces": [batch.num_rows], "rows": [candidates], "no_candidate": [empty]})


def _probe_dataset(probes: ProbeSource, options: storage.StorageOptions | None):
    """The probe faces as a Ray Dataset (read lazily, in tasks of READ_CPUS), and its columns."""
    import ray

    context = ray.data.DataContext.get_current()
    context.enable_progress_bars = False     # facelake.progress counts probe faces instead
    context.use_datasource_v2 = False        # see jobs/embed.py: the V1 reader honours num_cpus
    names = set(parquet_schema(probes.files[0], options).names)
    columns = [c for c in probe_columns(probes.carried) if c in names]
    arrow_fs, _ = storage.arrow_filesystem(probes.files[0], options)
    paths = [storage.filesystem(f, options)[1] for f in probes.files]
    return ray.data.read_parquet(paths, filesystem=arrow_fs, columns=columns, num_cpus=READ_CPUS), names


def _ray_batches(dataset, names: set[str], spec: BatchSpec, actors: list, *, batch_size: int,
                 workers: int) -> Iterator[dict]:
    """Probe faces stream through a pool of search workers; yields their per-batch counts."""
    import ray

    carried = tuple(c for c in spec.result.probe_carried if c in names)
    dataset = dataset.map_batches(
        BatchSearch, batch_size=batch_size, batch_format="pyarrow", num_cpus=WORKER_CPUS,
        compute=ray.data.ActorPoolStrategy(size=workers),
        fn_constructor_kwargs={"spec": replace(spec, result=replace(spec.result, probe_carried=carried)),
                               "actors": actors})
    for block in dataset.iter_batches(batch_size=None, batch_format="pyarrow"):
        yield from block.to_pylist()


def search_on_ray(probes: ProbeSource, spec: BatchSpec, actors: list, *, batch_size: int,
                  workers: int | None = None, options: storage.StorageOptions | None) -> Iterable[dict]:
    """Start the shard actors (appended to ``actors``: the caller kills them) and ``workers``
    search workers (None: SEARCH_WORKERS); the per-batch counts, iterable once every shard is loaded."""
    import ray

    from facelake.index.searchers import start_searchers

    # the dataset first: reading Parquet footers runs Ray tasks that want a whole CPU, which the
    # shard actors may hold once started
    dataset, names = _probe_dataset(probes, options)
    actors.extend(start_searchers(spec.handle))
    # Queued first on every shard actor, so no search runs on a shard before it is answered;
    # meanwhile Ray Data starts the search workers. The caller's clock starts once every shard
    # is loaded (index loading, like Ray's start, is stated apart).
    loaded = [actor.ntotal.remote() for actor in actors]
    counts = _StartedEarly(_ray_batches(dataset, names, spec, actors, batch_size=batch_size,
                                        workers=workers or SEARCH_WORKERS))
    ray.get(loaded)
    return counts


def local_batches(probes: ProbeSource, spec: BatchSpec, *, batch_size: int,
                  options: storage.StorageOptions | None) -> Iterator[dict]:
    """The same search workers' code in this process, one bounded batch at a time."""
    searcher = BatchSearch(spec)
    for uri in probes.files:
        names = set(parquet_schema(uri, options).names)
        columns = [c for c in probe_columns(probes.carried) if c in names]
        for batch in storage.iter_batches(uri, columns=columns, batch_size=batch_size, options=options):
            yield searcher(pa.Table.from_batches([batch])).to_pylist()[0]


class _StartedEarly:
    """Iterate ``rows`` until its first item in a thread from now on (a Ray Data pipeline then
    starts its workers while the caller waits for something else), then from the caller."""

    def __init__(self, rows: Iterable) -> None:
        self._rows, self._first, self._error = iter(rows), [], None
        self._thread = threading.Thread(target=self._pull, name="facelake-search-start", daemon=True)
        self._thread.start()

    def _pull(self) -> None:
        try:
            self._first.append(next(self._rows))
        except StopIteration:
            pass
        except BaseException as err:   # raised again in the caller's thread
            self._error = err

    def __iter__(self):
        self._thread.join()
        if self._error is not None:
            raise self._error
        yield from self._first
        yield from self._rows
