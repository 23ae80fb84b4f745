"""What feeds the recognizer: how many workers prepare photos for each model actor (the recognizer
on a GPU outruns one CPU's preparation by far, bench/prepare.py, so GPU actors share their node's
CPUs out), and preparing processes change no embedding."""

import pyarrow.parquet as pq
import pytest

from facelake import storage
from facelake.errors import ConfigError
from facelake.jobs.embed import EmbedConfig, prepare_threads, run_embed
from tests.helpers import sample_manifest


def test_cpu_actors_prepare_on_their_own_cpu():
    assert prepare_threads(cpus=16, workers=16, use_gpu=False) == 1


def test_gpu_actors_share_the_nodes_cpus():
    assert prepare_threads(cpus=16, workers=1, use_gpu=True) == 16
    assert prepare_threads(cpus=16, workers=4, use_gpu=True) == 4
    assert prepare_threads(cpus=2, workers=4, use_gpu=True) == 1


def test_prepare_is_validated_first():
    with pytest.raises(ConfigError, match="--prepare must be one of"):
        EmbedConfig(manifest="m.parquet", out="o", prepare="fibers").validate()


def test_photos_prepared_in_processes_embed_exactly_as_in_threads(tmp_path):
    """The local executor with preparing processes writes the same faces as with threads."""
    manifest = tmp_path / "manifest.parquet"
    storage.write_table(str(manifest), sample_manifest(["img1.jpg", "couple.jpg", "img3.jpg", "img6.jpg"]))
    tables = {}
    for prepare in ("threads", "processes"):
        out = tmp_path / prepare
        summary = run_embed(EmbedConfig(manifest=str(manifest), out=str(out), executor="local", workers=2,
                                        prepare=prepare, progress=False))
        assert summary.executor == "local" and summary.errors == 0
        tables[prepare] = pq.read_table(out / "faces").sort_by([("image_id", "ascending"),
                                                                ("face_index", "ascending")])
    threads, processes = tables["threads"], tables["processes"]
    assert threads.num_rows == processes.num_rows >= 5       # the couple holds two faces
    assert threads["embedding"].to_pylist() == processes["embedding"].to_pylist()
    assert threads["bbox"].to_pylist() == processes["bbox"].to_pylist()
