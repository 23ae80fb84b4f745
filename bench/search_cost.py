"""Where a probe's search time goes: CPU per probe of each stage of a sharded search, in one
process and one thread, with recall@10 against the exact top-10, per nprobe and per number of
candidates re-ranked, with the shards searched apart (one index each, as GPU searchers do) and
merged into the job's searchers (``index.search.MergedShards``: one index per searcher).

    python bench/search_cost.py --work bench/results/tmp/scale --faces 10000000 --probes 20000

Reads a version built by bench/scale.py (``--phase build``) and its cached probes and exact
top-10 (work/probes-N-Q.parquet, work/truth-N-Q.npy). Stages, as the search job runs them:
``assign`` (the shared coarse quantizer finds each probe's lists, once per batch), ``scan``
(each searcher's fast-scan PQ over those lists, ``candidates`` per searcher), ``rerank`` (exact
inner products of the candidates from the memory-mapped vectors, sort), ``merge_rows`` (merge
the shards' top-k and take the winners' id-table rows). The exact side is IndexFlatIP's CPU
per probe on the same machine, taken from bench/results/scale.json's latest run (2 threads:
CPU per probe = 2 / probes per second).

This is a cost model, not a speed result: one thread, no Ray, no result files. It answers
"what would a given nprobe or candidate count cost and give" without rebuilding. Records the
1-minute load average at start; above 0.5 the figures are printed and nothing is written.
Writes bench/results/search_cost.json and prints a table.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import faiss
import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from facelake import storage  # noqa: E402
from facelake.index import synthetic  # noqa: E402
from facelake.index.joining import merged_candidates  # noqa: E402
from facelake.index.load import open_version  # noqa: E402
from facelake.index.parts import embeddings  # noqa: E402
from facelake.index.search import (CoarseQuantizer, _search_preassigned, exact_scores,  # noqa: E402
                                   merge_candidates, rows_at)
from facelake.index.searchers import LocalShardSearcher  # noqa: E402

K = 10
BATCH = 1024


def stage_costs(searchers: list[LocalShardSearcher], coarse: CoarseQuantizer, xq: np.ndarray, nprobe: int,
                candidates: int) -> tuple[dict[str, float], np.ndarray]:
    """CPU microseconds per probe of each stage, and the top-10 ids found. ``searchers`` hold one
    shard each ("apart": ``candidates`` per shard) or several merged (``candidates`` per searcher)."""
    spent = dict.fromkeys(("assign", "scan", "rerank", "merge_rows"), 0.0)
    found = []
    for start in range(0, len(xq), BATCH):
        x = np.ascontiguousarray(xq[start:start + BATCH])
        t = time.process_time()
        lists = coarse.assign(x, nprobe)
        spent["assign"] += time.process_time() - t
        results = []
        for searcher in searchers:
            t = time.process_time()
            _, I0 = _search_preassigned(faiss.extract_index_ivf(searcher.index), x, candidates, lists)
            spent["scan"] += time.process_time() - t
            t = time.process_time()
            shards = searcher.merged.shards if searcher.merged else searcher.shards
            owner, row = (searcher.merged.locator.locate(I0) if searcher.merged
                          else (np.where(I0 >= 0, 0, -1), np.where(I0 >= 0, np.searchsorted(shards[0].faiss_ids, I0), -1)))
            scores = np.full(I0.shape, -np.inf, np.float32)
            for s in np.unique(owner[owner >= 0]):
                scores = np.maximum(scores, exact_scores(x, shards[s].vectors, np.where(owner == s, row, -1)))
            order = np.argsort(-scores, axis=1, kind="stable")[:, :K]
            D, I, owner, row = (np.take_along_axis(a, order, 1) for a in (scores, I0, owner, row))
            spent["rerank"] += time.process_time() - t
            t = time.process_time()
            results.append((D, I, rows_at(shards, owner.reshape(-1), row.reshape(-1))))
            spent["merge_rows"] += time.process_time() - t
        t = time.process_time()
        _, I, _ = merge_candidates(results, K)
        spent["merge_rows"] += time.process_time() - t
        found.append(I)
    return {name: round(seconds / len(xq) * 1e6, 1) for name, seconds in spent.items()}, np.concatenate(found)


def exact_cpu_us() -> float | None:
    """IndexFlatIP's CPU microseconds per probe at the largest size of the latest scale run."""
    path = REPO / "bench" / "results" / "scale.json"
    if not path.exists():
        return None
    size = json.loads(path.read_text())["sizes"][-1]
    threads = json.loads(path.read_text())["machine"]["cpus"]
    return round(threads / size["median_probes_per_s"]["exact"] * 1e6, 1)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--work", default=str(REPO / "bench" / "results" / "tmp" / "scale"))
    parser.add_argument("--faces", type=int, default=10_000_000)
    parser.add_argument("--probes", type=int, default=20_000, help="probe set of bench/scale.py to read")
    parser.add_argument("--use", type=int, default=4096, help="probes measured (the first ones)")
    parser.add_argument("--nprobe", type=int, nargs="+", default=[256, 384, 512])
    parser.add_argument("--candidates", type=int, nargs="+", default=[50, 100],
                        help="candidates each shard re-ranks when the shards are searched apart")
    parser.add_argument("--groups", type=int, nargs="*", default=[1, 2],
                        help="searcher counts the shards are joined into (the job's: one per node)")
    parser.add_argument("--out", default=str(REPO / "bench" / "results" / "search_cost.json"))
    args = parser.parse_args()
    load = os.getloadavg()[0]
    work = Path(args.work)
    handle = open_version(str(work / f"root-{args.faces}"))
    if not handle.rerank:
        sys.exit("the version is not compressed (no re-rank): nothing to take apart")
    faiss.omp_set_num_threads(1)
    shard_nos = list(range(handle.shard_count))
    layouts = {"apart": ([LocalShardSearcher(handle, s) for s in shard_nos], args.candidates)}
    for count in args.groups:
        groups = [list(map(int, g)) for g in np.array_split(shard_nos, min(count, len(shard_nos)))]
        wanted = merged_candidates(K, handle.rerank, max(map(len, groups)))
        layouts[f"joined into {len(groups)}"] = ([LocalShardSearcher(handle, g) for g in groups],
                                                 sorted({wanted // 3 * 2, wanted}))
    coarse = CoarseQuantizer(handle)
    probes = storage.read_table(str(work / f"probes-{args.faces}-{args.probes}.parquet"))
    xq = embeddings(probes.slice(0, args.use))
    truth = np.load(work / f"truth-{args.faces}-{args.probes}.npy")[:args.use]
    rows = []
    for layout, (searchers, candidate_counts) in layouts.items():
        stage_costs(searchers, coarse, xq[:BATCH], max(args.nprobe), max(candidate_counts))   # warm caches
        for nprobe in args.nprobe:
            for candidates in candidate_counts:
                costs, found = stage_costs(searchers, coarse, xq, nprobe, candidates)
                rows.append({"layout": layout, "nprobe": nprobe, "candidates_per_searcher": candidates,
                             "cpu_us_per_probe": costs, "total_us": round(sum(costs.values()), 1),
                             "recall_at_10": round(synthetic.recall_at_k(found, truth, K), 4)})
                print(json.dumps(rows[-1]), flush=True)
    exact = exact_cpu_us()
    report = {"faces": handle.total, "shards": handle.shard_count, "factory": handle.manifest["factory"],
              "tuned_nprobe": handle.nprobe, "rerank": handle.rerank, "probes": len(xq),
              "load_average_at_start": round(load, 2), "faiss": faiss.__version__,
              "exact_cpu_us_per_probe": exact, "rows": rows}
    print(f"\n{handle.total:,} faces, {handle.shard_count} shards, {handle.manifest['factory']}, one thread, "
          f"{len(xq)} probes; exact IndexFlatIP {exact} us CPU/probe")
    print("| shards searched | nprobe | candidates per searcher | assign | scan | rerank | merge+rows | total us "
          "| ceiling vs exact | recall@10 |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for row in rows:
        c = row["cpu_us_per_probe"]
        ceiling = f"{exact / row['total_us']:.1f}x" if exact else "-"
        print(f"| {row['layout']} | {row['nprobe']} | {row['candidates_per_searcher']} | {c['assign']} | {c['scan']} | {c['rerank']} "
              f"| {c['merge_rows']} | {row['total_us']} | {ceiling} | {row['recall_at_10']} |")
    if load > 0.5:
        print(f"load average at start was {load:.2f} > 0.5: not a result, {args.out} not written", file=sys.stderr)
        return
    Path(args.out).write_text(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
