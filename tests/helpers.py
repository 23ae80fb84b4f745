"""Small builders shared by tests: manifests of the bundled sample and of bad inputs."""

from __future__ import annotations

import csv
import io
from pathlib import Path

import numpy as np
import pyarrow as pa
from PIL import Image

SAMPLE_DIR = Path(__file__).resolve().parents[1] / "samples" / "faces"
# Real labeled faces beside the project root (LFW, ORL, deepface_testset): ../shared/faces, README there
SHARED_FACES = Path(__file__).resolve().parents[2] / "shared" / "faces"


def sample_identities() -> dict[str, str]:
    """image file name -> identity, for the 61 labeled sample photos."""
    with open(SAMPLE_DIR / "identities_derived.csv") as handle:
        return {row["image"]: row["identity_id"] for row in csv.DictReader(handle)}


def sample_manifest(names: list[str] | None = None, base: str | None = None) -> pa.Table:
    """Manifest of sample photos with absolute uris (or under ``base``) and identities."""
    ids = sample_identities()
    names = names or sorted(ids)
    prefix = base or str(SAMPLE_DIR)
    return pa.table({
        "image_id": [n.rsplit(".", 1)[0] for n in names],
        "uri": [f"{prefix}/{n}" for n in names],
        "identity": [ids.get(n) for n in names],
    })


def faceless_jpeg() -> bytes:
    """A real photo region with no face: the top-left corner of a sample photo's background."""
    image = Image.open(SAMPLE_DIR / "img1.jpg").convert("RGB")
    corner = image.crop((0, 0, 300, 180))
    out = io.BytesIO()
    corner.save(out, format="JPEG")
    return out.getvalue()


def png_with_alpha(name: str = "img2.jpg") -> bytes:
    image = Image.open(SAMPLE_DIR / name).convert("RGBA")
    alpha = Image.new("L", image.size, 255)
    alpha.paste(0, (0, 0, image.size[0] // 8, image.size[1] // 8))  # a transparent corner
    image.putalpha(alpha)
    out = io.BytesIO()
    image.save(out, format="PNG")
    return out.getvalue()


def greyscale_jpeg(name: str = "img3.jpg") -> bytes:
    out = io.BytesIO()
    Image.open(SAMPLE_DIR / name).convert("L").save(out, format="JPEG")
    return out.getvalue()


def corrupt_jpeg(name: str = "img4.jpg") -> bytes:
    data = (SAMPLE_DIR / name).read_bytes()
    return data[:200] + bytes(np.random.RandomState(0).randint(0, 256, 300, dtype=np.uint8))


def fails_at_armed_fault(call, *, free_cpus: bool = True) -> None:
    """Run ``call``, which an armed worker fault (facelake.faults) must fail, and drop its error.

    Ray Data keeps a failed run's actors (and the CPUs they hold) while the error's traceback is
    alive; a test that goes on using the cluster must not keep it (pytest.raises would)."""
    import gc
    import sys
    import time

    from facelake import faults

    try:
        call()
    except Exception as err:   # Ray wraps the worker's FaultInjected in its own error types
        injected, message = faults.injected(err), f"{type(err).__name__}: {err}"[:1000]
    else:
        raise AssertionError("the armed fault did not fail the job")
    gc.collect()
    assert injected, message
    ray = sys.modules.get("ray")
    if free_cpus and ray is not None and ray.is_initialized():   # a failed run's actors must not starve the next job
        total, deadline = ray.cluster_resources().get("CPU", 0), time.monotonic() + 60
        while ray.available_resources().get("CPU", 0) < total and time.monotonic() < deadline:
            time.sleep(0.2)
        assert ray.available_resources().get("CPU", 0) == total, "a failed run's actors still hold CPUs"
