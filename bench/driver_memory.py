"""The driver's peak memory for the steps that could hold something per image.

Synthetic Parquet only (no photos: these steps read ids, uris and stats, never pixels), at two
sizes, each step in a fresh process so that peaks do not mix. Per step, the driver's peak RSS
during the step (this process alone, sampled every 20 ms; Ray's processes are others) and its
growth over the same process just before the step (facelake imported, Ray started, the manifest
validated, streamed: every job's first step):

- ``resume``: embed resume planning, a manifest of N rows and an OUT holding 80% of them
  (faces and errors parts): ``jobs/resume.left_to_embed`` (hash-partitioned anti-join in Ray
  tasks) against ``jobs/embed.done_image_ids`` (what the driver gathered before).
- ``status``: `facelake status` of a root whose table of record holds N faces of N/2 images:
  ``collect`` on a recorded table version, on a version written before image counts were
  recorded (counted by jobs/work/counts.py tasks), against reading every image id (before).
- ``rebuild``: rebuild's change detection (the manifest carries size and mtime, so no photo is
  statted; the record holds two faces per photo; nothing changed, so all of it is compared):
  ``jobs/work/changes.plan_in_tasks`` (hash-partitioned tasks) against the driver's plan
  (``resolve_manifest`` + ``record_ids`` + ``plan``: what every rebuild ran before, and still
  runs below rebuild_plan.DRIVER_ROWS).
- ``erase``: finding what erasing 10 ids (9 held, one not) removes and where, in the root of
  record above: jobs/erase.py ``_scan`` (each task filters its parts against the 10 ids and
  returns only the matches) against what erase did before (every image id of the faces and
  errors of record, ``is_in`` + ``group_by``, and ``record_ids`` to find the parts to rewrite).
- ``table_write``: the table version that erase and rebuild then write, in that root: the parts
  holding the 10 ids (found by ``_scan``) rewritten without them, and 3 of them added back from
  their parts of record with a new stat (as a rebuild re-states a touched photo), by units in Ray
  tasks (jobs/work/units.py ``ray_map``) against the same units in the driver (``table_write_before``:
  rootmod.map_local, what runs below 200,000 rows). Stopped just before ROOT/TABLE moves, so the
  root stays as generated.

    python bench/driver_memory.py                       # 1M and 5M rows; writes bench/results/driver_memory.json
    python bench/driver_memory.py --sizes 200000 --no-save
    python bench/driver_memory.py --cases erase erase_before   # replaces those rows in the JSON
    python bench/driver_memory.py --sizes 200000 --cases table_write table_write_before --no-save
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

RESULTS = Path(__file__).resolve().parent / "results" / "driver_memory.json"
PART_ROWS = 100_000
MODEL = "sface-yunet"
# The erase cases' ids: 9 spread over the record (faces of each in one part), one not held.
ERASE_IDS = [f"img-{i:010d}" for i in (0, 1, 99_999, 100_000, 250_000, 499_999, 500_000, 750_001, 999_999)] + ["nope"]


def _ids(a: int, b: int, prefix: str = "img"):
    import numpy as np
    import pyarrow as pa
    import pyarrow.compute as pc

    digits = pc.utf8_lpad(pa.array(np.arange(a, b)).cast(pa.string()), 10, "0")
    return pc.binary_join_element_wise(prefix, digits, "-")


def generate(folder: str, n: int) -> None:
    """manifest/ (N rows: id, uri, carried, size, mtime), out/ (80% done), root/ (table of record)."""
    import numpy as np
    import pyarrow as pa
    import pyarrow.compute as pc

    from facelake import storage
    from facelake.record import tables as rootmod

    def write(path: str, table: pa.Table) -> None:
        storage.write_table(os.path.join(folder, path), table)

    faces_parts, rows_held = [], 0
    for k, a in enumerate(range(0, n, PART_ROWS)):
        b = min(n, a + PART_ROWS)
        ids = _ids(a, b)
        uris = pc.binary_join_element_wise("/archive/photos", pc.binary_join_element_wise(ids, "jpg", "."), "/")
        size = pa.array(np.arange(a, b) % 50_000 + 10_000, pa.int64())
        mtime = pa.array(np.full(b - a, 1_700_000_000 * 10**9, np.int64))
        write(f"manifest/m-{k:04d}.parquet", pa.table({"image_id": ids, "uri": uris,
                                                       "collection": pa.array(np.arange(a, b) % 97).cast(pa.string()),
                                                       "size": size, "mtime": mtime}))
        done = int((b - a) * 0.8)
        half = done // 2
        write(f"out/faces/part-{k:04d}.parquet", pa.table({"image_id": ids.slice(0, half),
                                                          "model": [MODEL] * half}))
        write(f"out/errors/part-{k:04d}.parquet", pa.table({"image_id": ids.slice(half, done - half),
                                                           "model": [MODEL] * (done - half)}))
        # record: two faces per image, the stat of now (nothing changed: the whole comparison runs)
        rec = pc.take(ids, pa.array(np.repeat(np.arange(b - a), 2)))
        m = len(rec)
        write(f"root/faces/part-{k:04d}.parquet", pa.table({
            "image_id": rec, "face_index": pa.array(np.tile([0, 1], b - a), pa.int32()),
            "uri": pc.take(uris, pa.array(np.repeat(np.arange(b - a), 2))),
            "content_sha256": pa.array(["0" * 64] * m), "source_size": pc.take(size, pa.array(np.repeat(np.arange(b - a), 2))),
            "source_mtime_ns": pa.array(np.full(m, 1_700_000_000 * 10**9, np.int64)),
            "source_etag": pa.nulls(m, pa.string())}))
        faces_parts.append(f"part-{k:04d}.parquet")
        rows_held += m
    write("root/errors/part-0.parquet", pa.table({"image_id": ["bad"], "uri": ["/x.jpg"], "stage": ["decode"],
                                                  "error_type": ["Corrupt"], "message": ["m"],
                                                  "content_sha256": pa.nulls(1, pa.string())}))
    for name, images in (("recorded", n), ("legacy", None)):
        version = rootmod.TableVersion(name=name, faces=tuple(faces_parts), errors=("part-0.parquet",),
                                       face_rows=rows_held, error_rows=1, model=MODEL, created_at="2026-11-26",
                                       images=images)
        data = version.to_dict()
        if images is None:
            del data["images"]
        storage.write_bytes_atomic(os.path.join(folder, name, "tables", f"{name}.json"), json.dumps(data).encode())
        os.makedirs(os.path.join(folder, name), exist_ok=True)
        for kind in ("faces", "errors"):
            if not os.path.exists(os.path.join(folder, name, kind)):
                os.symlink(os.path.join(folder, "root", kind), os.path.join(folder, name, kind))
        rootmod.write_pointer(os.path.join(folder, name), {"table_version": name, "index_version": None})


def _rss() -> int:
    import psutil

    return psutil.Process().memory_info().rss


class StepPeak:
    """Peak RSS of this process alone (not Ray's processes) during a step, sampled every 20 ms."""

    def __enter__(self) -> "StepPeak":
        import threading

        self.before = self.peak = _rss()
        self._stop = threading.Event()

        def run() -> None:
            while not self._stop.is_set():
                self.peak = max(self.peak, _rss())
                time.sleep(0.02)
        self._thread = threading.Thread(target=run, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, _rss())


def measure(case: str, folder: str) -> dict:
    """One step in this (fresh) process: its result and the driver's memory."""
    import ray

    from facelake import storage
    from facelake.faces import manifest
    from facelake.cluster import runtime

    runtime.connect(None)
    ray.get(ray.remote(num_cpus=0.25)(lambda: 1).remote())   # a worker is up before the baseline
    import pyarrow as pa
    import pyarrow.compute as pc

    from facelake.record import erasures as erasure_list
    from facelake.record import tables as rootmod
    from facelake.jobs.work import changes, photos, resume
    from facelake.jobs.embed import done_image_ids
    from facelake.jobs.status import collect
    from facelake.faces.registry import get_model

    m = os.path.join(folder, "manifest")
    info = manifest.validate(m)     # every job's first step (streamed), not measured here
    started = time.monotonic()
    step = StepPeak().__enter__()
    if case == "resume":
        todo = resume.left_to_embed(info, os.path.join(folder, "out"), MODEL, "bench")
        out = {"left": todo.rows, "done": todo.done}
    elif case == "resume_before":
        out = {"done_ids": len(done_image_ids(os.path.join(folder, "out"), get_model(MODEL)))}
    elif case in ("status", "status_legacy"):
        counts = collect(os.path.join(folder, "recorded" if case == "status" else "legacy"))["counts"]
        out = {"images": counts["images"], "faces": counts["faces"]}
    elif case == "status_before":
        faces = rootmod.read_faces(os.path.join(folder, "recorded"), ["image_id"])
        out = {"images": len(pc.unique(faces["image_id"])), "faces": faces.num_rows}
    elif case == "rebuild_plan":
        from facelake.jobs.work import changes as rebuild_plan

        root = os.path.join(folder, "recorded")
        plan = rebuild_plan.plan_in_tasks(rebuild_plan.ChangeConfig(manifest=m, root=root), info, rootmod.current(root),
                                          erasure_list.erased_ids(root), storage.StorageOptions())
        out = {"new": plan.new, "changed": plan.changed, "removed": plan.removed}
    elif case == "rebuild_plan_before":
        root = os.path.join(folder, "recorded")
        table, _ = photos.resolve_manifest(m, storage.StorageOptions())
        record = rootmod.record_ids(root, rootmod.current(root))
        plan = changes.plan(changes.ChangeConfig(manifest=m, root=root), table, record,
                            erasure_list.erased_ids(root), storage.StorageOptions())
        out = {"new": plan.new, "changed": plan.changed, "removed": plan.removed}
    elif case == "erase":
        from facelake.jobs import erase

        root = os.path.join(folder, "recorded")
        scan = erase._scan(root, rootmod.current(root), None, pa.array(ERASE_IDS), storage.StorageOptions())
        held = erase._holdings(ERASE_IDS, scan)
        out = {"found": sum(1 for v in held.values() if v != (0, 0)), "faces": sum(v[0] for v in held.values()),
               "holding_parts": len(scan)}
    elif case == "erase_before":
        root = os.path.join(folder, "recorded")
        base, wanted = rootmod.current(root), pa.array(ERASE_IDS)

        def count(table):
            hit = table.filter(pc.is_in(table["image_id"], value_set=wanted))
            return {r["image_id"]: r["image_id_count"]
                    for r in hit.group_by("image_id").aggregate([("image_id", "count")]).to_pylist()}
        faces = count(rootmod.read_faces(root, ["image_id"], base))
        errors = count(rootmod.read_errors(root, ["image_id"], base))
        record = rootmod.record_ids(root, base)
        hit = record.filter(pc.is_in(record["image_id"], value_set=wanted))
        out = {"found": len(set(faces) | set(errors)), "faces": sum(faces.values()),
               "holding_parts": len(set(hit["part"].to_pylist()))}
    elif case in ("table_write", "table_write_before"):
        out = _table_write(os.path.join(folder, "recorded"), case == "table_write")
    step.__exit__()
    out.update(seconds=round(time.monotonic() - started, 1), driver_peak_mib=round(step.peak / 2**20),
               driver_growth_mib=round((step.peak - step.before) / 2**20), baseline_mib=round(step.before / 2**20))
    return out


CASES = ("resume", "resume_before", "status", "status_legacy", "status_before", "rebuild_plan", "rebuild_plan_before",
         "erase", "erase_before", "table_write", "table_write_before")


class _Unpublished(Exception):
    """Raised just before ROOT/TABLE would move: the bench root stays as generated."""


def _table_write(root: str, in_tasks: bool) -> dict:
    """The parts holding ERASE_IDS rewritten without them, 3 of them added back with a new stat."""
    import pyarrow as pa

    from facelake import storage
    from facelake.record import tables as rootmod
    from facelake.jobs import erase
    from facelake.jobs.work import units as tasks

    base = rootmod.current(root)
    scan = erase._scan(root, base, None, pa.array(ERASE_IDS), storage.StorageOptions())
    holding = {place for place, hit in scan.items() if hit}
    back = pa.array(ERASE_IDS[:3], pa.string())
    stats = pa.table({"image_id": back, "source_size": pa.array([1, 2, 3], pa.int64()),
                      "source_mtime_ns": pa.array([1, 2, 3], pa.int64()), "source_etag": pa.nulls(3, pa.string())})
    again = [rootmod.uri(root, kind, part) for kind, part in sorted(holding) if kind == rootmod.FACES]
    written = {}

    def stop(name: str) -> None:
        written["version"] = rootmod.read_version(root, name)
        raise _Unpublished(name)
    try:
        rootmod.write_version(root, base, drop_ids=pa.array(ERASE_IDS, pa.string()), holding=holding,
                              sources=[rootmod.Added(rootmod.FACES, tuple(again), back)], stats=stats,
                              model=base.model, job_id="bench", hook=stop,
                              map_fn=tasks.ray_map if in_tasks else rootmod.map_local)
    except _Unpublished:
        pass
    version = written["version"]
    return {"holding_parts": len(holding), "faces": version.face_rows, "images": version.images}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", type=int, nargs="+", default=[1_000_000, 5_000_000])
    parser.add_argument("--cases", nargs="+", default=list(CASES), choices=CASES)
    parser.add_argument("--no-save", action="store_true")
    parser.add_argument("--case", help=argparse.SUPPRESS)
    parser.add_argument("--data", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.case:
        print(json.dumps(measure(args.case, args.data)))
        return
    results = []
    for n in args.sizes:
        with tempfile.TemporaryDirectory(prefix="facelake-drvmem-") as folder:
            t = time.monotonic()
            generate(folder, n)
            print(f"{n:,} rows generated in {time.monotonic() - t:.0f}s", flush=True)
            for case in args.cases:
                done = subprocess.run([sys.executable, __file__, "--case", case, "--data", folder],
                                      capture_output=True, text=True)
                if done.returncode != 0:
                    print(done.stderr[-3000:], file=sys.stderr)
                    raise SystemExit(f"{case} at {n} rows failed")
                row = {"rows": n, "case": case, **json.loads(done.stdout.strip().splitlines()[-1])}
                results.append(row)
                print(json.dumps(row), flush=True)
    print(f"\n{'case':<20}" + "".join(f"{f'{n:,} rows: peak / growth MiB':>35}" for n in args.sizes))
    for case in args.cases:
        cells = [r for r in results if r["case"] == case]
        print(f"{case:<20}" + "".join(f"{r['driver_peak_mib']:>24} / {r['driver_growth_mib']:<8}" for r in cells))
    if not args.no_save:   # rows of the cases run now replace theirs; the others' rows are kept
        RESULTS.parent.mkdir(exist_ok=True)
        measured = {(r["rows"], r["case"]) for r in results}
        kept = json.loads(RESULTS.read_text())["results"] if RESULTS.exists() else []
        kept = [r for r in kept if (r["rows"], r["case"]) not in measured]
        RESULTS.write_text(json.dumps({"machine": platform.node(), "cpus": os.cpu_count(),
                                       "load_1min": os.getloadavg()[0], "date": time.strftime("%Y-%m-%d"),
                                       "results": kept + results}, indent=2) + "\n")
        print(f"wrote {RESULTS}")


if __name__ == "__main__":
    main()
