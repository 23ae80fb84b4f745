"""bench/gpu_faiss: faiss on the GPU the way facelake uses it (training, adding, IVF-Flat search), vs CPU.

    python bench/gpu_faiss.py [--json PATH] [--cpu-only] [--cpu-threads T] [--cpu-niter I]
                              [--train-faces N] [--fine-nlist L] [--search-faces M]
                              [--probes P] [--rounds R]

Runs on a machine with a GPU build of faiss. facelake's ``gpu`` extra names faiss-gpu-cu12, whose
newest wheel (1.14.1.post1) holds GPU code for sm_70 and sm_80 only (no PTX): on Hopper (sm_90)
its first kernel fails with "no kernel image is available"; the H100 run used faiss-gpu 1.15.1
(PyPI, facebookresearch: sm_70 to sm_90). See README, "faiss on the GPU". It needs only numpy,
faiss and this repository's ``index`` package (``index.synthetic``, ``index.params``, which need
only ``facelake.errors``); ``index.build`` is not imported (it imports Ray), its GPU paths are
reproduced here with the same faiss calls:

- training (``index.build.train(use_gpu=True)``): ``index_factory(dim, params.factory, IP)``,
  polysemous training off for PQ, and the IVF's ``clustering_index`` set to
  ``index_cpu_to_all_gpus(IndexFlatIP(dim))``, so only k-means runs on the GPU;
- adding (``index.build`` shard task, IVF-Flat only): ``index_cpu_to_gpu(StandardGpuResources(),
  0, trained)``, ``add_with_ids``, ``index_gpu_to_cpu``;
- searching (``index.search.ShardSearcher(use_gpu=True)``, uncompressed shards only: faiss GPU
  has no fast-scan PQ): ``index_cpu_to_gpu`` of the shard, ``nprobe`` set on the clone,
  ``search(xq, k)``.

Data: ``index.synthetic.clustered`` (seed 0) and ``index.synthetic.queries`` (seed 1);
parameters: ``index.params.choose_params``. The training sample of an N-face collection is the
first ``train_size`` rows of ``clustered(N, 128)``, made without the other rows
(``clustered_head``, checked equal to the generator's own rows at a small size): its rows are
independent draws, so the head is a uniform sample, as facelake's random sample is.

Measured (each printed as one JSON line; all together written to --json after each section):

1. coarse k-means as facelake's N-face build trains it (default N = 10M: IVF16384, train_size
   1,048,576): IVF<nlist>,Flat trained with the GPU clustering index (faiss's default 10
   iterations), the same with --cpu-niter iterations on the GPU and on the CPU (T threads),
   then facelake's whole ``train()`` of the real factory (IVF-PQ fast-scan: k-means on the GPU,
   residual assignment and PQ on the CPU) on the GPU; one run each;
2. a ``choose_params(M, 128, pq=0)`` IVF-Flat index of M faces (default 1M): trained and added on
   the GPU (one run each; CPU add for reference), then P probes in batches of 4,096: GPU IVF at
   nprobe 32 and 64, exact GPU ``IndexFlatIP``, CPU IVF at nprobe 32 and 64 (T OpenMP threads, one
   call per batch), R rounds alternated in that order, medians; recall@10 against the exact GPU
   results;
3. the finer quantizer: ``choose_params(N, 128, nlist=--fine-nlist)`` (65,536 lists: 4,194,304
   training points) on the GPU only, one run.

``--cpu-only`` skips every GPU step (to test the script on a machine without a GPU).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import numpy as np

from machine_info import cpu_name, gpu_info  # bench/ is on sys.path: these run as scripts

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import faiss  # noqa: E402

from index import synthetic  # noqa: E402
from index.params import choose_params  # noqa: E402

DIM = 128
K = 10
BATCH = 4096
NPROBES = (32, 64)

RESULT: dict = {}


def emit(section: str, record: dict, json_path: Path | None) -> None:
    record = {"section": section, "loadavg": list(os.getloadavg()), **record}
    RESULT.setdefault("sections", []).append(record)
    print(json.dumps(record), flush=True)
    if json_path:
        json_path.write_text(json.dumps(RESULT, indent=2) + "\n")


def clustered_head(n: int, dim: int, m: int, *, seed: int = 0) -> np.ndarray:
    """The first ``m`` rows of ``synthetic.clustered(n, dim, seed=seed)``, without the rest
    (same random stream, same steps; the generator fills rows in blocks of 2**16)."""
    rng = np.random.default_rng(seed)
    unit = synthetic._unit
    groups = unit(rng.standard_normal((max(1, n // synthetic.PER_GROUP), dim), dtype=np.float32))
    persons = max(1, n // synthetic.PER_PERSON)
    centres = groups[rng.integers(0, len(groups), persons)]
    centres = unit(centres + rng.standard_normal(centres.shape, dtype=np.float32)
                   * (synthetic.GROUP_SPREAD / np.sqrt(dim)))
    out = np.empty((m, dim), np.float32)
    step = 1 << 16
    for start in range(0, min(n, m), step):
        stop = min(n, start + step)
        block = centres[rng.integers(0, persons, stop - start)]
        block = block + rng.standard_normal(block.shape, dtype=np.float32) * (synthetic.PHOTO_SPREAD / np.sqrt(dim))
        take = min(stop, m) - start
        out[start:start + take] = unit(block)[:take]
    return out


def trained_index(factory: str, sample: np.ndarray, *, gpu: bool,
                  niter: int | None = None) -> tuple[faiss.Index, float]:
    """``index.build.train`` (same faiss calls); ``niter`` overrides faiss's k-means iterations."""
    index = faiss.index_factory(DIM, factory, faiss.METRIC_INNER_PRODUCT)
    ivf = faiss.downcast_index(faiss.extract_index_ivf(index))
    if isinstance(ivf, faiss.IndexIVFPQ):
        ivf.do_polysemous_training = False
    if niter is not None:
        faiss.extract_index_ivf(index).cp.niter = niter
    if gpu:
        faiss.extract_index_ivf(index).clustering_index = faiss.index_cpu_to_all_gpus(faiss.IndexFlatIP(DIM))
    start = time.perf_counter()
    index.train(sample)
    return index, time.perf_counter() - start


def train_section(args: argparse.Namespace) -> None:
    params = choose_params(args.train_faces, DIM)
    flat = f"IVF{params.nlist},Flat"
    start = time.perf_counter()
    sample = clustered_head(args.train_faces, DIM, params.train_size)
    gen_s = time.perf_counter() - start
    default_niter = faiss.extract_index_ivf(faiss.index_factory(DIM, flat, faiss.METRIC_INNER_PRODUCT)).cp.niter
    base = {"faces": args.train_faces, "factory": params.factory, "nlist": params.nlist,
            "train_points": params.train_size, "data_s": round(gen_s, 2)}
    if not args.cpu_only:
        _, s = trained_index(flat, sample, gpu=True)
        emit("kmeans_gpu", {**base, "index": flat, "niter": default_niter, "seconds": round(s, 3),
                            "s_per_iter": round(s / default_niter, 4)}, args.json)
        _, s = trained_index(flat, sample, gpu=True, niter=args.cpu_niter)
        gpu_part = s
        emit("kmeans_gpu", {**base, "index": flat, "niter": args.cpu_niter, "seconds": round(s, 3),
                            "s_per_iter": round(s / args.cpu_niter, 4)}, args.json)
    _, s = trained_index(flat, sample, gpu=False, niter=args.cpu_niter)
    record = {**base, "index": flat, "niter": args.cpu_niter, "threads": args.cpu_threads, "seconds": round(s, 3),
              "s_per_iter": round(s / args.cpu_niter, 4),
              "full_niter_estimate_s": round(s * default_niter / args.cpu_niter, 1)}
    if not args.cpu_only:
        record["cpu_over_gpu_same_niter"] = round(s / gpu_part, 2)
    emit("kmeans_cpu", record, args.json)
    if not args.cpu_only:
        _, s = trained_index(params.factory, sample, gpu=True)
        emit("train_gpu_facelake", {**base, "index": params.factory, "niter": default_niter,
                                    "seconds": round(s, 3)}, args.json)


def fine_section(args: argparse.Namespace) -> None:
    params = choose_params(args.train_faces, DIM, nlist=args.fine_nlist, pq=0)
    start = time.perf_counter()
    sample = clustered_head(args.train_faces, DIM, params.train_size)
    gen_s = time.perf_counter() - start
    flat = f"IVF{params.nlist},Flat"
    _, s = trained_index(flat, sample, gpu=not args.cpu_only)
    emit("kmeans_fine_gpu" if not args.cpu_only else "kmeans_fine_cpu",
         {"faces": args.train_faces, "index": flat, "nlist": params.nlist, "train_points": params.train_size,
          "data_s": round(gen_s, 2), "niter": 10, "seconds": round(s, 3)}, args.json)


def _timed_search(search, xq: np.ndarray) -> tuple[float, np.ndarray]:
    labels = []
    start = time.perf_counter()
    for lo in range(0, len(xq), BATCH):
        labels.append(search(xq[lo:lo + BATCH]))
    return time.perf_counter() - start, np.concatenate(labels)


def search_section(args: argparse.Namespace) -> None:
    params = choose_params(args.search_faces, DIM, pq=0)
    start = time.perf_counter()
    xb = synthetic.clustered(args.search_faces, DIM, seed=0)
    xq = synthetic.queries(xb, args.probes, seed=1)
    gen_s = time.perf_counter() - start
    ids = np.arange(len(xb), dtype=np.int64)
    rng = np.random.default_rng(0)
    sample = xb[np.sort(rng.choice(len(xb), params.train_size, replace=False))]
    base = {"faces": args.search_faces, "factory": params.factory, "nlist": params.nlist,
            "train_points": params.train_size, "data_s": round(gen_s, 2)}
    trained, train_s = trained_index(params.factory, sample, gpu=not args.cpu_only)
    record = {**base, "train_s": round(train_s, 3), "train_on": "cpu" if args.cpu_only else "gpu"}

    cpu_index = faiss.clone_index(trained)
    start = time.perf_counter()
    cpu_index.add_with_ids(xb, ids)
    record["add_cpu_s"] = round(time.perf_counter() - start, 3)
    variants = {}
    for nprobe in NPROBES:
        sp = faiss.SearchParametersIVF(nprobe=nprobe)
        variants[f"cpu_ivf{nprobe}"] = (lambda q, sp=sp: cpu_index.search(q, K, params=sp)[1])
    if not args.cpu_only:
        resources = faiss.StandardGpuResources()
        start = time.perf_counter()
        gpu = faiss.index_cpu_to_gpu(resources, 0, trained)
        gpu.add_with_ids(xb, ids)
        built = faiss.index_gpu_to_cpu(gpu)
        record["add_gpu_s"] = round(time.perf_counter() - start, 3)
        del gpu
        start = time.perf_counter()
        shard = faiss.index_cpu_to_gpu(resources, 0, built)        # as ShardSearcher(use_gpu=True)
        record["to_gpu_s"] = round(time.perf_counter() - start, 3)
        flat = faiss.index_cpu_to_gpu(resources, 0, faiss.IndexFlatIP(DIM))
        flat.add(xb)

        def gpu_ivf(q, nprobe):
            shard.nprobe = min(nprobe, shard.nlist)                 # as index.search._search_index
            return shard.search(q, K)[1]
        variants = {**{f"gpu_ivf{p}": (lambda q, p=p: gpu_ivf(q, p)) for p in NPROBES},
                    "gpu_exact": lambda q: flat.search(q, K)[1], **variants}
        truth_name = "gpu_exact"
    else:
        exact = faiss.IndexFlatIP(DIM)
        exact.add(xb)
        variants["cpu_exact"] = lambda q: exact.search(q, K)[1]
        truth_name = "cpu_exact"
    emit("ivf_build", record, args.json)

    for search in variants.values():                              # warm-up: one batch each
        search(xq[:BATCH])
    seconds: dict[str, list[float]] = {name: [] for name in variants}
    labels: dict[str, np.ndarray] = {}
    for _ in range(args.rounds):
        for name, search in variants.items():                     # A B A B: every variant per round
            s, found = _timed_search(search, xq)
            seconds[name].append(s)
            labels.setdefault(name, found)
    truth = labels[truth_name]
    out = {}
    for name, times in seconds.items():
        median = statistics.median(times)
        out[name] = {"probes_per_s": round(args.probes / median),
                     "range": [round(args.probes / max(times)), round(args.probes / min(times))],
                     "ms_per_batch": round(1000 * median * BATCH / args.probes, 3),
                     "recall_at_10": round(synthetic.recall_at_k(labels[name], truth, K), 4)}
    for nprobe in NPROBES:
        if f"gpu_ivf{nprobe}" in out:
            out[f"gpu_ivf{nprobe}"]["over_gpu_exact"] = round(
                out[f"gpu_ivf{nprobe}"]["probes_per_s"] / out["gpu_exact"]["probes_per_s"], 2)
            out[f"gpu_ivf{nprobe}"]["over_cpu_ivf"] = round(
                out[f"gpu_ivf{nprobe}"]["probes_per_s"] / out[f"cpu_ivf{nprobe}"]["probes_per_s"], 2)
    emit("search", {**base, "probes": args.probes, "batch": BATCH, "k": K, "rounds": args.rounds,
                    "cpu_threads": args.cpu_threads, "truth": truth_name, "variants": out}, args.json)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--json", type=Path)
    parser.add_argument("--cpu-only", action="store_true", help="skip the GPU side (no GPU here)")
    parser.add_argument("--cpu-threads", type=int, default=os.cpu_count())
    parser.add_argument("--cpu-niter", type=int, default=5, help="k-means iterations timed on the CPU")
    parser.add_argument("--train-faces", type=int, default=10_000_000)
    parser.add_argument("--fine-nlist", type=int, default=65536)
    parser.add_argument("--search-faces", type=int, default=1_000_000)
    parser.add_argument("--probes", type=int, default=32768)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--skip", nargs="*", default=[], choices=["train", "search", "fine"])
    args = parser.parse_args()

    faiss.omp_set_num_threads(args.cpu_threads)
    gpus = 0 if args.cpu_only else faiss.get_num_gpus()
    RESULT.update({
        "what": "faiss GPU paths of facelake (index.build.train use_gpu, GPU add, GPU IVF-Flat shard search) vs CPU",
        "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "faiss": faiss.__version__, "faiss_gpus": gpus, "gpu": {} if args.cpu_only else gpu_info(),
        "cpu": {"name": cpu_name(), "cores": os.cpu_count(), "threads": args.cpu_threads},
        "numpy": np.__version__, "python": platform.python_version(), "args": {
            k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
        "loadavg_start": list(os.getloadavg()),
    })
    print(json.dumps({k: RESULT[k] for k in ("faiss", "faiss_gpus", "gpu", "cpu", "loadavg_start")}), flush=True)
    if not args.cpu_only and gpus < 1:
        sys.exit("faiss sees no GPU (faiss.get_num_gpus() == 0): wrong faiss build, or CUDA 12 runtime/cuBLAS "
                 "not on LD_LIBRARY_PATH; nothing measured")
    n_check, m_check = 150_000, 70_000                        # the head equals the generator's rows
    if not np.array_equal(clustered_head(n_check, DIM, m_check), synthetic.clustered(n_check, DIM)[:m_check]):
        sys.exit("clustered_head differs from index.synthetic.clustered: fix it before measuring")
    if "train" not in args.skip:
        train_section(args)
    if "search" not in args.skip:
        search_section(args)
    if "fine" not in args.skip:
        fine_section(args)
    RESULT["loadavg_end"] = list(os.getloadavg())
    if args.json:
        args.json.write_text(json.dumps(RESULT, indent=2) + "\n")


if __name__ == "__main__":
    main()
