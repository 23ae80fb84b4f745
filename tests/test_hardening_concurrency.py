"""Concurrency: searches running while new index versions publish (and old ones are pruned) each
see exactly one consistent version: never a mix of two versions' data, never a checksum or
missing-file error on a version that CURRENT named."""

from __future__ import annotations

import threading

import numpy as np
import pyarrow as pa

from facelake.index import build, synthetic
from facelake.index.load import load_ids, open_version
from facelake.index.searchers import search_version
from tests.helpers import MODEL, WEIGHTS

VERSIONS = 6
N, DIM, K = 3000, 32, 5


def faces_of_version(number: int) -> pa.Table:
    """A gallery whose every image id names the version it belongs to (v3-0000017)."""
    xb = synthetic.clustered(N, DIM, seed=100 + number)
    return pa.table({
        "image_id": pa.array([f"v{number}-{i:07d}" for i in range(N)]),
        "face_index": pa.array(np.zeros(N, np.int32)),
        "bbox": pa.array([[number, 0, 8, 8]] * N, type=pa.list_(pa.int32(), 4)),
        "embedding": pa.FixedSizeListArray.from_arrays(pa.array(xb.ravel(), pa.float32()), DIM),
        "model": pa.array([MODEL] * N), "weights_sha256": pa.array([WEIGHTS] * N),
    })


def test_searches_during_publishes_see_one_version_each(ray_local, tmp_path):
    root = str(tmp_path / "root")
    build.build_version(faces_of_version(0), root, build.BuildOptions(
        model=MODEL, weights_sha256=WEIGHTS, shards=2, nlist=16, keep=2))
    number_of: dict[str, int] = {open_version(root).version: 0}
    xq = synthetic.queries(synthetic.clustered(N, DIM, seed=100), 64, seed=7)
    stop = threading.Event()
    seen: list[tuple[str, set[str], int]] = []
    failures: list[BaseException] = []

    def publisher():
        try:
            for number in range(1, VERSIONS):
                manifest = build.build_version(faces_of_version(number), root, build.BuildOptions(
                    model=MODEL, weights_sha256=WEIGHTS, shards=2, nlist=16, keep=2))
                number_of[manifest["version"]] = number
        except BaseException as err:  # noqa: BLE001 - reported below
            failures.append(err)
        finally:
            stop.set()

    def reader():
        while not stop.is_set():
            try:
                handle = open_version(root)                       # the live version, checked
                D, I = search_version(handle, xq, K)              # every shard of that version
                ids = load_ids(handle)
                found = ids.take(pa.array(I[I >= 0].ravel()))
                prefixes = {image_id.split("-")[0] for image_id in found["image_id"].to_pylist()}
                bboxes = {b[0] for b in found["bbox"].to_pylist()}
                seen.append((handle.version, prefixes, len(bboxes)))
            except BaseException as err:  # noqa: BLE001 - reported below
                failures.append(err)
                return

    threads = [threading.Thread(target=publisher)] + [threading.Thread(target=reader) for _ in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=600)
    assert not any(t.is_alive() for t in threads), "a thread hung"
    assert not failures, f"{len(failures)} failure(s), first: {failures[0]!r}"
    versions_read = {version for version, _, _ in seen}
    assert len(seen) > 20 and len(versions_read) >= 3, (len(seen), versions_read)
    for version, prefixes, bbox_kinds in seen:
        assert prefixes == {f"v{number_of[version]}"}, f"version {version} answered with {prefixes}"
        assert bbox_kinds == 1
    # keep=2: only the two newest versions remain, the live one among them
    from facelake.index import layout
    assert layout.list_versions(root)[-1] == layout.current_version(root)
    assert len(layout.list_versions(root)) == 2
