"""The `facelake` command as a user runs it: a subprocess, its output and its exit code."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pyarrow as pa

from facelake import storage
from facelake.index.synthetic import clustered
from facelake.registry import get_model, weights_fingerprint
from facelake.schema import faces_schema

COMMANDS = ("weights", "embed", "index", "search", "audit", "rebuild", "erase", "status",
            "evaluate", "submit", "jobs", "demo")


def facelake(*args: str, timeout: int = 300) -> subprocess.CompletedProcess:
    env = {**os.environ, "RAY_ADDRESS": ""}
    env.pop("RAY_ADDRESS")
    return subprocess.run([sys.executable, "-m", "facelake.jobs.cli", *args], capture_output=True,
                          text=True, timeout=timeout, env=env)


def synthetic_faces(n: int) -> pa.Table:
    spec = get_model()
    vectors = clustered(n, spec.dim, seed=3)
    schema = faces_schema(spec.dim)
    return pa.table({
        "image_id": [f"photo-{i:06d}" for i in range(n)],
        "face_index": pa.array(np.zeros(n, np.int32)),
        "uri": [f"s3://archive/photo-{i:06d}.jpg" for i in range(n)],
        "bbox": pa.array([[0, 0, 100, 100]] * n, schema.field("bbox").type),
        "landmarks": pa.array([[0.0] * 10] * n, schema.field("landmarks").type),
        "det_score": pa.array(np.full(n, 0.9, np.float32)),
        "embedding": pa.FixedSizeListArray.from_arrays(pa.array(vectors.reshape(-1)), spec.dim),
        "model": [spec.name] * n,
        "detector": [spec.detector] * n,
        "weights_sha256": [weights_fingerprint(spec)] * n,
        "content_sha256": ["0" * 64] * n,
    }, schema=schema)


def test_help_lists_every_command():
    result = facelake("--help")
    assert result.returncode == 0, result.stderr
    for command in COMMANDS:
        assert command in result.stdout, f"`facelake --help` does not list {command}"


def test_index_then_status_from_the_command_line(tmp_path):
    faces = tmp_path / "faces"
    storage.write_table(str(faces / "part-0.parquet"), synthetic_faces(3000))
    root = tmp_path / "root"
    built = facelake("index", str(faces), "--root", str(root), "--shards", "2")
    assert built.returncode == 0, built.stderr
    live = json.loads((root / "index" / "CURRENT").read_text())["version"]
    assert live in built.stdout
    manifest = json.loads((root / "index" / live / "manifest.json").read_text())
    assert manifest["total"] == 3000 and len(manifest["shards"]) == 2
    assert f"nlist {manifest['nlist']}" in built.stdout or str(manifest["nlist"]) in built.stdout

    status = facelake("status", str(root))
    assert status.returncode == 0, status.stderr
    assert live in status.stdout


def test_user_errors_exit_2_with_one_clear_line(tmp_path):
    both = facelake("index", str(tmp_path), "--root", str(tmp_path / "r"), "--shards", "2", "--shard-size", "5")
    assert both.returncode == 2 and "not both" in both.stderr
    missing = facelake("embed", str(tmp_path / "nothing.parquet"), "--out", str(tmp_path / "o"))
    assert missing.returncode == 2 and "no manifest" in missing.stderr
    assert "Traceback" not in missing.stderr
