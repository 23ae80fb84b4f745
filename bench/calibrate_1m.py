"""Identify mode on a large gallery: refused on the shipped labeled-set calibration, served once
`facelake calibrate` measured FPIR on the live gallery, and its FPIR on held-out non-mated probes
within the certified bound.

    python bench/calibrate_1m.py                       # 1,000,000 gallery faces, IVF1024 in 2 shards
    python bench/calibrate_1m.py --gallery 200000 --nlist 256

Gallery: the bundled sample photos (embedded by the embed job) plus synthetic faces
(``index.synthetic.clustered``: groups -> persons -> photos) up to ``--gallery``. Non-mated probes:
``--probes`` synthetic faces of other persons (another seed) to calibrate and as many held out.
Real Ray (2 CPUs), real faiss; minutes on 2 cores at 1M. Prints JSON and a short table.
tests/test_calibrate_live_gallery.py runs the same steps (``build_gallery``, ``identify``) on the
smallest gallery the shipped calibration refuses.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from facelake import calibration, storage
from facelake.faces.registry import get_model, weights_fingerprint
from facelake.index import build, synthetic
from facelake.index.load import open_version
from facelake.jobs import search
from facelake.jobs.calibrate import CalibrateConfig, run_calibrate
from facelake.jobs.embed import EmbedConfig, outputs, run_embed

REPO = Path(__file__).resolve().parents[1]
SAMPLE_DIR = REPO / "samples" / "faces"
TARGET_FPIR = 1e-3
PROBE_SEED = 20261126   # non-mated probes: persons the gallery (seed 0) does not hold


def faces_table(xb: np.ndarray, prefix: str) -> pa.Table:
    """A faces table as `facelake embed` writes it (the columns search reads) for vectors xb."""
    spec = get_model()
    n, d = xb.shape
    return pa.table({
        "image_id": pa.array([f"{prefix}-{i:07d}" for i in range(n)]),
        "face_index": pa.array(np.zeros(n, np.int32)),
        "uri": pa.array([f"/photos/{prefix}-{i}.jpg" for i in range(n)]),
        "bbox": pa.array([[i % 50, 0, 32, 32] for i in range(n)], type=pa.list_(pa.int32(), 4)),
        "embedding": pa.FixedSizeListArray.from_arrays(pa.array(xb.ravel(), pa.float32()), d),
        "model": pa.array([spec.name] * n),
        "weights_sha256": pa.array([weights_fingerprint(spec)] * n),
    })


def sample_manifest() -> pa.Table:
    """Manifest of the labeled sample photos (samples/faces/identities_derived.csv)."""
    with open(SAMPLE_DIR / "identities_derived.csv") as handle:
        rows = sorted(csv.DictReader(handle), key=lambda row: row["image"])
    return pa.table({"image_id": [r["image"].rsplit(".", 1)[0] for r in rows],
                     "uri": [str(SAMPLE_DIR / r["image"]) for r in rows],
                     "identity": [r["identity_id"] for r in rows]})


def build_gallery(base: Path, *, gallery: int, nlist: int, shards: int = 2, probes: int = 3_000,
                  embedded: str | None = None) -> dict:
    """Embed the sample photos (or take ``embedded``, the out folder of an embed run of them), add
    synthetic faces up to ``gallery``, publish an index version under ``base``/root and write the
    probe tables: nonmated.parquet (calibration), heldout.parquet, mated.parquet (the real sample
    faces). Needs a connected Ray."""
    if embedded is None:
        embedded = str(base / "faces")
        storage.write_table(str(base / "manifest.parquet"), sample_manifest())
        run_embed(EmbedConfig(manifest=str(base / "manifest.parquet"), out=embedded, progress=False))
    real = storage.read_table(outputs(embedded)["faces"], columns=["image_id", "face_index", "uri", "bbox",
                                                                    "embedding", "model", "weights_sha256"])
    fake = faces_table(synthetic.clustered(gallery - real.num_rows, 128, seed=0), prefix="syn")
    faces = pa.concat_tables([real, fake.select(real.column_names).cast(real.schema)])
    del fake
    spec = get_model()
    build.build_version(faces, str(base / "root"), build.BuildOptions(
        model=spec.name, weights_sha256=weights_fingerprint(spec), nlist=nlist, shards=shards))
    vectors = synthetic.clustered(2 * probes, 128, seed=PROBE_SEED)
    storage.write_table(str(base / "nonmated.parquet"), faces_table(vectors[:probes], prefix="nm"))
    storage.write_table(str(base / "heldout.parquet"), faces_table(vectors[probes:], prefix="q"))
    storage.write_table(str(base / "mated.parquet"), real)
    return {"base": base, "root": str(base / "root"), "heldout": vectors[probes:], "probes": probes}


def identify(setup: dict, probes: str, out: str, **kwargs) -> search.SearchSummary:
    """`facelake search --mode identify` of ``setup``'s probe table ``probes`` into base/``out``."""
    return search.run_search(search.SearchConfig(
        probes=str(setup["base"] / probes), root=setup["root"], out=str(setup["base"] / out),
        purpose="bench: identify on a large gallery", mode="identify", **kwargs))


def measure(setup: dict, target_fpir: float = TARGET_FPIR) -> dict:
    """Refused before calibrating, calibrated, served: the threshold, its bound and held-out FPIR."""
    report: dict = {"gallery": open_version(setup["root"]).total, "target_fpir": target_fpir}
    try:
        identify(setup, "heldout.parquet", "out-before", max_fpir=target_fpir)
        report["refused_before"] = None
    except calibration.CalibrationError as err:
        report["refused_before"] = str(err)
    started = time.perf_counter()
    summary = run_calibrate(CalibrateConfig(probes=str(setup["base"] / "nonmated.parquet"), root=setup["root"],
                                            top_k=10, purpose="bench: calibrate a large gallery"))
    report["calibrate_s"] = round(time.perf_counter() - started, 1)
    handle = open_version(setup["root"])
    cal = calibration.find_gallery(setup["root"], model=None, index_version=handle.version, gallery_size=handle.total)
    started = time.perf_counter()
    served = identify(setup, "heldout.parquet", "out-heldout", max_fpir=target_fpir, top_k=10)
    report["identify_s"] = round(time.perf_counter() - started, 1)
    results = storage.read_table(search.outputs(str(setup["base"] / "out-heldout"))["results"])
    false_positive = len(set(results.filter(pc.is_valid(results["rank"]))["probe_image_id"].to_pylist()))
    report.update(calibration_searches=summary.searches, threshold=served.threshold,
                  certified_fpir=float(cal.fpir_upper(served.threshold)),
                  heldout_false_positives=false_positive, heldout_probes=setup["probes"],
                  heldout_fpir=false_positive / setup["probes"])
    return report


def table(report: dict) -> str:
    rows = [("gallery faces", f"{report['gallery']:,}"), ("build (embed + index)", f"{report['build_s']} s"),
            ("shipped calibration", "refused" if report["refused_before"] else "served"),
            ("calibrate", f"{report['calibrate_s']} s ({report['calibration_searches']:,} searches)"),
            ("threshold", f"{report['threshold']:.4f}"),
            ("certified FPIR (95% upper)", f"{report['certified_fpir']:.2e}"),
            ("held-out FPIR", f"{report['heldout_false_positives']}/{report['heldout_probes']} = "
                              f"{report['heldout_fpir']:.2e}"),
            ("identify held-out", f"{report['identify_s']} s")]
    width = max(len(name) for name, _ in rows)
    return "\n".join(f"{name:<{width}}  {value}" for name, value in rows)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--gallery", type=int, default=1_000_000, help="gallery faces (sample photos + synthetic)")
    parser.add_argument("--nlist", type=int, default=1024, help="IVF lists")
    parser.add_argument("--shards", type=int, default=2)
    parser.add_argument("--probes", type=int, default=3_000, help="non-mated probes to calibrate (as many held out)")
    parser.add_argument("--workdir", default=None, help="where the gallery goes (default: a temporary folder)")
    args = parser.parse_args()
    os.environ.setdefault("DEEPFACE_HOME", str(REPO / ".deepface-home"))
    os.environ.setdefault("DEEPFACE_BACKEND_ENGINE", "onnx")
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    import ray

    from facelake.faces.weights import provision

    provision(get_model())
    ray.init(address="local", num_cpus=2, include_dashboard=False, object_store_memory=1_500 * 1024 * 1024,
             runtime_env={"env_vars": {"DEEPFACE_HOME": os.environ["DEEPFACE_HOME"]}})
    base = Path(args.workdir or tempfile.mkdtemp(prefix="facelake-bench-calibrate-"))
    base.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    setup = build_gallery(base, gallery=args.gallery, nlist=args.nlist, shards=args.shards, probes=args.probes)
    build_s = round(time.perf_counter() - started, 1)
    report = {"build_s": build_s, **measure(setup)}
    ray.shutdown()
    print(json.dumps(report, indent=2))
    print(table(report))
    return 0 if report["heldout_fpir"] <= report["certified_fpir"] else 1


if __name__ == "__main__":
    sys.exit(main())
