"""`facelake demo`: the whole flow on the bundled sample, with a local Ray and local storage.

manifest (``facelake.samples.MANIFEST``: samples/ in a checkout, installed with the package) ->
faces table -> index version -> search results table.
"""

from __future__ import annotations

import shutil
import time
from pathlib import Path

import pyarrow as pa
import typer

from facelake import progress, storage
from facelake.errors import ConfigError
from facelake.faces.manifest import base_dir
from facelake.faces.reader import resolve
from facelake.jobs import search
from facelake.samples import MANIFEST as SAMPLE_MANIFEST

DEMO_STEPS = ("demo: embed the sample photos", "demo: build the index", "demo: search sample probes")
DEMO_PROBES = 5   # one photo each of the first identities of the sample


def _step(text: str) -> None:
    typer.secho(f"\n== {text}", bold=True)


def run_demo(out: str, manifest_uri: str | None = None, fresh: bool = True) -> dict:
    """Run embed -> index -> search on the sample; return paths and counts of what was made."""
    import ray

    from facelake.cluster import runtime
    from facelake.index.build import BuildOptions, build_version
    from facelake.jobs.embed import EmbedConfig, outputs, print_summary, run_embed

    manifest_uri = manifest_uri or str(SAMPLE_MANIFEST)
    if not storage.exists(manifest_uri):
        raise ConfigError(f"sample manifest {manifest_uri} not found: reinstall facelake (the sample ships "
                          f"inside it, as facelake.samples) or pass --manifest")
    if fresh and storage.scheme_of(out) == "file" and Path(out).exists():
        shutil.rmtree(out)
    archive, root, results = (storage.join(out, p) for p in ("archive", "root", "results"))
    started = time.monotonic()
    resources = runtime.connect(None)
    typer.echo(f"local Ray: {resources.cpus:g} CPU, {resources.gpus:g} GPU, {resources.nodes} node(s)")
    try:
        with progress.tracker(len(DEMO_STEPS), DEMO_STEPS[0], unit="steps") as bar:
            _step(f"embed {manifest_uri} -> {archive}")
            summary = run_embed(EmbedConfig(manifest=manifest_uri, out=archive, progress=False))
            print_summary(summary)
            bar.advance(1)
            bar.describe(DEMO_STEPS[1])
            _step(f"index {archive}/faces -> {root}")
            faces_uri = outputs(archive)["faces"]
            from facelake.faces.registry import get_model, weights_fingerprint

            spec = get_model(summary.model)
            manifest = build_version(faces_uri, root,
                                     BuildOptions(model=spec.name, weights_sha256=weights_fingerprint(spec)))
            typer.echo(f"published index version {manifest['version']}: {manifest['total']} faces in "
                       f"{len(manifest['shards'])} shard(s), {manifest['factory']}, nprobe {manifest['nprobe']}")
            report = {"archive": archive, "root": root, "faces": summary.faces, "version": manifest["version"]}
            bar.advance(1)
            bar.describe(DEMO_STEPS[2])
            report.update(demo_search(manifest_uri, root, results))
            bar.advance(1)
    finally:
        ray.shutdown()
    typer.secho(f"\ndemo finished in {time.monotonic() - started:.0f}s; outputs under {out}", fg=typer.colors.GREEN)
    return report


def demo_search(manifest_uri: str, root: str, out: str, *, top_k: int = 3) -> dict:
    """The demo's last step: one photo per identity of the sample searched against the sample
    index; prints the top candidates per probe and returns what was made."""
    table = storage.read_table(manifest_uri)
    base = base_dir(manifest_uri)
    picks: dict[str, dict] = {}
    for row in sorted(table.to_pylist(), key=lambda r: r["image_id"]):
        identity = row.get("identity")
        if identity and identity not in picks and len(picks) < DEMO_PROBES:
            picks[identity] = {**row, "uri": resolve(row["uri"], base)}
    probes_uri = storage.join(out, "probes", "manifest.parquet")
    storage.write_table(probes_uri, pa.Table.from_pylist(list(picks.values()), schema=table.schema))
    summary = search.run_search(search.SearchConfig(
        probes=probes_uri, root=root, out=out, top_k=top_k,
        purpose="facelake demo: sample probes against the sample index"))
    search.print_summary(summary)
    rows = storage.read_table(search.outputs(out)["results"]).sort_by(
        [("probe_image_id", "ascending"), ("probe_face_index", "ascending"), ("rank", "ascending")]).to_pylist()
    for row in rows:
        if row["rank"] is None:
            continue
        same = " (the probe photo itself)" if row["gallery_image_id"] == row["probe_image_id"] else ""
        typer.echo(f"  probe {row['probe_image_id']} [{row.get('probe_identity')}] #{row['rank']}: "
                   f"{row['gallery_image_id']} [{row.get('gallery_identity')}] similarity {row['similarity']:.3f}, "
                   f"est. FMR {row['est_false_match_rate']:.2g}{same}")
    return {"results": out, "search_job": summary.job_id, "result_rows": summary.result_rows}


def register(app: typer.Typer) -> None:
    @app.command("demo")
    def demo_command(
        out: str = typer.Option("demo-out", help="folder for the demo's archive, root and results"),
        manifest: str = typer.Option(None, help="manifest to use instead of the bundled sample"),
    ) -> None:
        """Run embed -> index -> search on the bundled sample photos (local Ray, local folder)."""
        run_demo(out, manifest)
