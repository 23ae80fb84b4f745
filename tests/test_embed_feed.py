"""How many threads prepare photos for each model actor: the recognizer on a GPU outruns one CPU's
preparation by far (bench/prepare.py), so GPU actors share their node's CPUs out."""

from facelake.jobs.embed import prepare_threads


def test_cpu_actors_prepare_on_their_own_cpu():
    assert prepare_threads(cpus=16, workers=16, use_gpu=False) == 1


def test_gpu_actors_share_the_nodes_cpus():
    assert prepare_threads(cpus=16, workers=1, use_gpu=True) == 16
    assert prepare_threads(cpus=16, workers=4, use_gpu=True) == 4
    assert prepare_threads(cpus=2, workers=4, use_gpu=True) == 1
