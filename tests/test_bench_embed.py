"""bench/embed.py: refuses to measure on a busy machine; medians, spread and speed-ups are right.

The refusal runs the real script (its threshold lowered below any load average); the summary
is checked on hand-made rounds whose medians are known.
"""

from __future__ import annotations

import importlib.util
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "bench" / "embed.py"


def _bench():
    spec = importlib.util.spec_from_file_location("bench_embed", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_refuses_to_measure_when_the_machine_is_busy(tmp_path):
    results = REPO / "bench" / "results" / "embed.json"
    before = results.read_bytes() if results.exists() else None
    done = subprocess.run([sys.executable, str(SCRIPT), "--source", "sample", "--photos", "4", "--max-load", "-1"],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 2
    assert "refusing to measure" in done.stderr and "--no-save" in done.stderr
    assert (results.read_bytes() if results.exists() else None) == before


def test_fewer_than_three_rounds_is_refused():
    done = subprocess.run([sys.executable, str(SCRIPT), "--rounds", "2", "--no-save"],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 2 and "at least 3" in done.stderr


def test_summary_reports_medians_spread_and_speedups():
    bench = _bench()

    def run(wall_ips, steady, **extra):
        return {"images": 100, "faces": 110, "errors": 1, "images_per_s_wall": wall_ips, "steady": steady,
                "seconds_wall": 100 / wall_ips, "first_result_s": 1.0, **extra}

    fl = dict(ray_start_s=4.0, workers=2, device="cpu", recognizer_runtime="openvino", executor="ray")
    runs = {"facelake": [run(30, 60, **fl), run(36, 66, **fl), run(33, 63, **fl)],
            "deepface": [run(10, 11), run(12, 12), run(11, 10.5)]}
    summary = bench.summarize(runs)
    assert summary["facelake"]["images_per_s_wall"] == {"median": 33, "min": 30, "max": 36}
    assert summary["deepface"]["images_per_s_steady"] == {"median": 11, "min": 10.5, "max": 12}
    assert summary["speedup_wall"] == {"median": 3.0, "min": 3.0, "max": 3.0}  # per round: 30/10, 36/12, 33/11
    assert summary["speedup_steady"]["median"] == 5.5
    assert summary["facelake"]["recognizer_runtime"] == "openvino" and summary["facelake"]["executor"] == "ray"


def test_alternated_rounds_run_end_to_end_without_saving():
    """The real harness on 6 sample photos: 3 A B rounds, each side in a fresh process, facelake as
    `facelake embed` runs it (auto: the local executor for 6 photos); --no-save writes nothing.
    Guards the harness against changes in the embed job."""
    import json

    results = REPO / "bench" / "results" / "embed.json"
    before = results.read_bytes() if results.exists() else None
    done = subprocess.run([sys.executable, str(SCRIPT), "--source", "sample", "--photos", "6", "--no-save"],
                          capture_output=True, text=True, timeout=1200)
    assert done.returncode == 0, done.stderr[-3000:]
    report = json.loads(done.stdout[:done.stdout.index("\n}\n") + 2])
    assert report["rounds"] == 3 and report["photos"] == 6
    assert [len(report["runs"][side]) for side in ("facelake", "deepface")] == [3, 3]
    ours = report["summary"]["facelake"]
    assert ours["images"] == 6 and ours["errors"] == 0 and ours["recognizer_runtime"] == "openvino"
    assert ours["images_per_s_wall"]["median"] > 0 and ours["executor"] == "local"
    assert "| facelake (local executor) |" in done.stdout
    assert report["summary"]["speedup_wall"]["median"] > 0
    assert (results.read_bytes() if results.exists() else None) == before
