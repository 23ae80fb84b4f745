"""`facelake index FACES --root ROOT`: build and publish an index version of a faces table.

A thin layer over ``facelake.index.build.build_version`` (issue 4). The model and weights
checksum come from the faces table itself (one model per table). It takes ROOT's lock, like
rebuild and erase, so it never races them.
"""

from __future__ import annotations

from typing import Annotated

import pyarrow as pa
import typer

from facelake import progress, storage
from facelake.record import audit
from facelake.errors import ConfigError
from facelake.jobs.options import EndpointUrl, RayAddress, Root
from facelake.record.lock import RootLock
from facelake.storage import StorageOptions


# What `index` shows while it works (build_version reports these stages through its hooks).
INDEX_STEPS = ("index: train and add shards", "index: write the version manifest", "index: publish")


def faces_table(uri: str, options: StorageOptions | None = None) -> str:
    """The faces table of an embed job's --out folder (OUT/faces), or ``uri`` itself."""
    inner = storage.join(uri, "faces")
    return inner if storage.list_files(inner, ".parquet", options) else uri


def _model_of(faces: str, options: StorageOptions) -> dict[str, str]:
    """model and weights_sha256 from the first rows of the faces table (the shard tasks check that
    every row has the same; nothing else of the table is read here)."""
    files = storage.list_files(faces, ".parquet", options)
    if not files:
        raise ConfigError(f"no faces table at {storage.redact(faces)}: pass the --out folder of `facelake embed` "
                          f"(or its faces/ folder)")
    try:
        batch = next(storage.iter_batches(files[0], columns=["model", "weights_sha256"], batch_size=1,
                                          options=options), None)
    except (pa.ArrowException, KeyError, ValueError) as err:
        raise ConfigError(f"{storage.redact(faces)} is not a faces table written by `facelake embed` "
                          f"({type(err).__name__}: {str(err)[:200]}); pass the embed job's --out folder "
                          "or its faces/ folder") from err
    if batch is None or not batch.num_rows or not all(batch.column(i)[0].as_py() for i in range(2)):
        raise ConfigError(f"{storage.redact(faces)} names no model: pass a faces table written by `facelake embed`")
    return {"model": batch.column(0)[0].as_py(), "weights_sha256": batch.column(1)[0].as_py()}


def run_index(faces: str, root: str, *, shards: int | None = None, shard_size: int | None = None,
              nlist: int | None = None, pq: int | None = None, nprobe: int | None = None, keep: int = 3,
              endpoint_url: str | None = None, address: str | None = None, show_progress: bool = False) -> dict:
    """Build and publish; returns the version's manifest. ``show_progress``: facelake.progress on stderr."""
    import ray

    from facelake.cluster import runtime
    from facelake.index.build import BuildOptions, build_version
    from facelake.index.erasure import check_publishable, drop_versions_holding, erased_ids_checked

    storage.check_uri(faces)
    storage.check_uri(root)
    if shards is not None and shard_size is not None:
        raise ConfigError("give --shards or --shard-size, not both")
    options = StorageOptions.from_env(endpoint_url)
    faces = faces_table(faces, options)
    found = _model_of(faces, options)
    with audit.Job(root, "index", options, details={"faces": storage.redact(faces), "model": found["model"]}) as job:
        with RootLock(root, job.job_id, options=options) as lock, \
                progress.tracker(len(INDEX_STEPS), INDEX_STEPS[0], show_progress, unit="steps") as bar:
            erased = erased_ids_checked(root, options)   # refuses a tampered erasure list

            def step() -> None:
                bar.advance(1)
                bar.describe(INDEX_STEPS[min(bar.done, len(INDEX_STEPS) - 1)])

            def before_pointer(version: str) -> None:
                step()
                lock.verify()
                check_publishable(root, version, erased, options)

            started = not ray.is_initialized()
            runtime.connect(address)
            try:
                manifest = build_version(faces, root, BuildOptions(
                    model=found["model"], weights_sha256=found["weights_sha256"], shards=shards,
                    shard_size=shard_size, nlist=nlist, pq=pq, nprobe=nprobe, keep=keep, storage=options,
                    erased_ids=erased, hooks={"before_manifest": lambda _version: step(),
                                              "before_pointer": before_pointer}))
                bar.advance(1)
            finally:
                runtime.shutdown_if_local(started and address is None)
            removed = drop_versions_holding(root, erased, manifest["version"], options)
            job.details.update({"index_version": manifest["version"], "total": manifest["total"],
                                "erased_left_out": manifest.get("erased_ids_count", 0),
                                "versions_removed": removed})
            return manifest


def register(app: typer.Typer) -> None:
    @app.command("index")
    def index_command(
        faces: Annotated[str, typer.Argument(metavar="FACES", help="the --out folder of `facelake embed` (or its faces/ table)")],
        root: Root,
        shards: int = typer.Option(None, "--shards", help="number of shards"),
        shard_size: int = typer.Option(None, "--shard-size", help="faces per shard (default 1,000,000)"),
        nlist: int = typer.Option(None, "--nlist", help="IVF lists (default ~4*sqrt(N), a power of two)"),
        pq: int = typer.Option(None, "--pq", help="PQ sub-quantizers (IVF-PQ); default IVF-Flat"),
        nprobe: int = typer.Option(None, "--nprobe", help="lists searched by default (recorded in the manifest)"),
        keep: int = typer.Option(3, "--keep", help="versions to keep (the live one always)"),
        endpoint_url: EndpointUrl = None,
        address: RayAddress = None,
    ) -> None:
        """Train an IVF index on FACES, add shards in parallel, publish a new version of ROOT."""
        m = run_index(faces, root, shards=shards, shard_size=shard_size, nlist=nlist, pq=pq, nprobe=nprobe,
                      keep=keep, endpoint_url=endpoint_url, address=address, show_progress=progress.enabled())
        typer.echo(f"published index version {m['version']}: {m['total']} faces, {m['factory']}, nlist {m['nlist']}, "
                   f"nprobe {m['nprobe']}, {len(m['shards'])} shard(s), "
                   f"{'GPU' if m['build']['gpu'] else 'CPU'} build in {m['build']['seconds']}s")
