"""Peak memory of validating and reading a huge manifest (streamed, memory bounded).

Generates a manifest of ``--rows`` rows (image_id, uri, one carried column) as Parquet files in a
temporary folder, then measures, each in a fresh process so that peaks do not mix:

- ``validate``: ``facelake.faces.manifest.validate`` (what every job runs on the driver first):
  peak RSS of the process, and the growth over the interpreter with facelake imported.
- ``ray_count``: Ray Data reading the manifest the way the embed job does (V1 reader, small
  blocks) and counting rows: the driver's peak RSS and the peak RSS summed over the driver and
  every Ray process it started (sampled every 0.1 s; shared object-store pages count in full).

Prints a table and JSON; writes bench/results/manifest_memory.json.

    python bench/manifest_memory.py                # 10 million rows (about 3 minutes, 2 cores)
    python bench/manifest_memory.py --rows 1000000 --skip-ray
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results" / "manifest_memory.json"
ROWS_PER_FILE = 2_500_000  # a nightly manifest split the way exports usually are
ROW_GROUP = 250_000


def generate(folder: str, rows: int) -> list[str]:
    """image_id img-00000001.., uri s3://archive/photos/<yyyy>/<n>.jpg, carried 'collection'."""
    import numpy as np
    import pyarrow as pa
    import pyarrow.compute as pc
    import pyarrow.parquet as pq

    files = []
    for start in range(0, rows, ROWS_PER_FILE):
        stop = min(rows, start + ROWS_PER_FILE)
        path = os.path.join(folder, f"part-{start // ROWS_PER_FILE:04d}.parquet")
        with pq.ParquetWriter(path, pa.schema([("image_id", pa.string()), ("uri", pa.string()),
                                                ("collection", pa.string())]), compression="zstd") as writer:
            for a in range(start, stop, ROW_GROUP):
                n = np.arange(a, min(stop, a + ROW_GROUP))
                digits = pc.utf8_lpad(pa.array(n).cast(pa.string()), 9, "0")
                year = pa.array(2000 + n % 25).cast(pa.string())
                writer.write_table(pa.table({
                    "image_id": pc.binary_join_element_wise("img", digits, "-"),
                    "uri": pc.binary_join_element_wise("s3://archive/photos", year, pc.binary_join_element_wise(digits, "jpg", "."), "/"),
                    "collection": pc.binary_join_element_wise("c", pa.array(n % 97).cast(pa.string()), "-"),
                }))
        files.append(path)
    return files


VALIDATE = """
import json, resource, sys, time
from facelake import manifest
base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
t = time.perf_counter()
info = manifest.validate(sys.argv[1])
print(json.dumps({"rows": info.rows, "seconds": round(time.perf_counter() - t, 2),
                  "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
                  "baseline_rss_mb": round(base / 1024, 1)}))
"""

RAY_COUNT = """
import json, os, resource, sys, threading, time
import psutil, ray
from facelake import manifest, storage
info = manifest.validate(sys.argv[1])
ray.init(address="local", num_cpus=2, include_dashboard=False, object_store_memory=512 << 20,
         log_to_driver=False)
me = psutil.Process()
peak = {"total": 0}
stop = threading.Event()
def sample():
    while not stop.is_set():
        total = 0
        for p in [me] + me.children(recursive=True):
            try:
                total += p.memory_info().rss
            except psutil.Error:
                pass
        peak["total"] = max(peak["total"], total)
        time.sleep(0.1)
threading.Thread(target=sample, daemon=True).start()
base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
ctx = ray.data.DataContext.get_current()
ctx.use_datasource_v2 = False
ctx.enable_progress_bars = False
fs, _ = storage.arrow_filesystem(info.files[0])
blocks = max(8, -(-info.rows // 1000)) if info.rows < 1_000_000 else info.rows // 1000
t = time.perf_counter()
n = ray.data.read_parquet(info.paths, filesystem=fs, num_cpus=0.25, override_num_blocks=blocks).count()
seconds = time.perf_counter() - t
stop.set()
print(json.dumps({"rows": n, "blocks": blocks, "seconds": round(seconds, 2),
                  "driver_peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
                  "driver_baseline_rss_mb": round(base / 1024, 1),
                  "all_ray_processes_peak_rss_mb": round(peak["total"] / 2**20, 1)}))
ray.shutdown()
"""


def measure(script: str, folder: str) -> dict:
    done = subprocess.run([sys.executable, "-c", script, folder], capture_output=True, text=True, timeout=1800)
    if done.returncode:
        raise RuntimeError(done.stderr[-3000:])
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, default=10_000_000)
    parser.add_argument("--skip-ray", action="store_true", help="measure validation only")
    parser.add_argument("--out", default=str(RESULTS))
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="facelake-manifest-bench-") as folder:
        t = time.perf_counter()
        files = generate(folder, args.rows)
        size = sum(os.path.getsize(f) for f in files)
        result = {"rows": args.rows, "files": len(files), "parquet_mb": round(size / 2**20, 1),
                  "generate_seconds": round(time.perf_counter() - t, 1),
                  "machine": {"cpus": os.cpu_count(), "python": platform.python_version(),
                              "platform": platform.platform()},
                  "validate": measure(VALIDATE, folder)}
        if not args.skip_ray:
            result["ray_count"] = measure(RAY_COUNT, folder)
    v = result["validate"]
    print(f"manifest: {args.rows:,} rows in {result['files']} Parquet file(s), {result['parquet_mb']} MB")
    print(f"{'step':<34}{'seconds':>9}{'peak RSS MB':>13}{'growth MB':>11}")
    print(f"{'manifest.validate':<34}{v['seconds']:>9}{v['peak_rss_mb']:>13}"
          f"{v['peak_rss_mb'] - v['baseline_rss_mb']:>11.1f}")
    if "ray_count" in result:
        r = result["ray_count"]
        print(f"{'Ray Data read_parquet.count driver':<34}{r['seconds']:>9}{r['driver_peak_rss_mb']:>13}"
              f"{r['driver_peak_rss_mb'] - r['driver_baseline_rss_mb']:>11.1f}")
        print(f"{'  + every Ray process (sum)':<34}{'':>9}{r['all_ray_processes_peak_rss_mb']:>13}{'':>11}")
    print(json.dumps(result, indent=2))
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
