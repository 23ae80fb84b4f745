"""facelake installed from a wheel, not from the checkout: `facelake demo` finds its sample.

A wheel is built from the working tree (pip wheel --no-deps), unpacked into a temporary folder
(what pip would put in site-packages) and imported from there in a fresh interpreter, ahead of
the checkout; the demo's sample locator must point inside the unpacked package and every photo
its manifest names must be there.
"""

from __future__ import annotations

import json
import subprocess
import sys
import zipfile
from pathlib import Path


REPO = Path(__file__).resolve().parents[1]

CHECK = r"""
import json, sys
import pyarrow.parquet as pq
import facelake
from facelake.jobs.demo import SAMPLE_MANIFEST
from facelake.faces.manifest import base_dir, validate
from facelake.faces.reader import resolve

info = validate(str(SAMPLE_MANIFEST))
base = base_dir(str(SAMPLE_MANIFEST))
uris = [resolve(u, base) for u in pq.read_table(str(SAMPLE_MANIFEST), columns=["uri"])["uri"].to_pylist()]
missing = [u for u in uris if not __import__("os").path.isfile(u)]
print(json.dumps({"facelake": facelake.__file__, "manifest": str(SAMPLE_MANIFEST), "rows": info.rows,
                  "missing": missing}))
"""


def test_demo_sample_is_found_in_a_wheel_install(tmp_path):
    built = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--quiet", "-w", str(tmp_path), str(REPO)],
                           capture_output=True, text=True, timeout=300)
    assert built.returncode == 0, built.stderr[-3000:]
    (wheel,) = tmp_path.glob("facelake-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    assert "facelake/samples/manifest.parquet" in names and "facelake/samples/README.md" in names
    assert sum(n.startswith("facelake/samples/faces/") for n in names) >= 64

    site = tmp_path / "site"
    zipfile.ZipFile(wheel).extractall(site)
    # the unpacked wheel first on the path, run from elsewhere: the checkout's folders are not seen
    env = {"PYTHONPATH": str(site), "PATH": "/usr/bin:/bin", "DEEPFACE_BACKEND_ENGINE": "onnx"}
    ran = subprocess.run([sys.executable, "-c", CHECK], cwd=tmp_path, env=env, capture_output=True, text=True,
                         timeout=120)
    assert ran.returncode == 0, ran.stderr[-3000:]
    found = json.loads(ran.stdout.strip().splitlines()[-1])
    assert found["facelake"].startswith(str(site)), found          # imported from the wheel, not the checkout
    assert found["manifest"].startswith(str(site)) and found["rows"] >= 64 and not found["missing"], found
