"""FAISS: training, sharding, publishing versions, loading, searching, merging (no imports of facelake.jobs).

Building a version, by stage:

- ``parts``: the faces table as a build reads it: part files and their row counts (footers
  only), the schema check, reading a piece's rows, shard bounds, pieces and the manifest's
  ``sources``. Tested in tests/test_index.py and tests/test_rebuild_incremental.py.
- ``train``: ``train`` (IVF / IVF-PQ, k-means on a GPU when asked), the sample and train Ray
  tasks, ``reuse_trained`` and ``sampled_similarity`` (the quantizer's fit, for drift).
  Tested in tests/test_index.py.
- ``shards``: ``run_shards``: one Ray task per shard reads its pieces, adds them to a clone of
  the trained index and writes the shard's files. Tested in tests/test_index.py (end to end).
- ``tune``: nprobe from measured recall@10 on new-photo stand-ins (``tuning_probes``,
  ``recall_curve``, ``choose_nprobe``). Tested in tests/test_index.py.
- ``build``: ``BuildOptions`` and ``build_version``: the stages above in order -> manifest ->
  CURRENT (``publish_manifest``, shared with ``update``). Tested end to end in
  tests/test_index.py, on S3 too, and by the crash and prune tests there.
- ``update``: ``update_version``: the next version from the live one at O(change): shards whose
  part files of record are unchanged are kept (hard links / S3 server-side copies), shards that
  held removed or erased faces are rebuilt, new faces go to delta shards, small shards merge by
  tiers. Tested in tests/test_rebuild_incremental.py.

Versions on storage:

- ``params``: IndexParams and ``choose_params`` (nlist / nprobe / PQ from the collection size,
  validated; the measured recall behind the defaults). Tested in tests/test_index.py.
- ``layout``: the one definition of ROOT/index/<version>/ and the CURRENT pointer; version
  names, listing, publishing, pruning. Tested by the crash and prune tests of tests/test_index.py.
- ``load``: ``open_version`` / ``open_shard`` / ``load_ids``, every byte checked against the
  manifest's sha256 before parsing; other model or dimension refused. Tested in tests/test_index.py.
- ``erasure``: what every publisher does about the erasure list: the checked list, the refusal to
  publish a version holding an erased id, removing other versions that hold one. Tested in
  tests/test_erase.py and tests/test_erase_holdings.py.

- ``publish``: ``publish_index``: the index version of a table version of record (after rebuild
  or erase), the live version extended while its trained quantizer fits, else retrained. Tested
  in tests/test_rebuild*.py and tests/test_erase.py.

Searching:

- ``search``: primitives, no Ray: ``search_shard``, ``search_reranked``, ``exact_scores``,
  ``merge_topk`` (faiss ResultHeap), ``merge_candidates``, ``merge_rows``, ``CoarseQuantizer``,
  ``IdLocator``. Tested in tests/test_index.py against exact IndexFlatIP results.
- ``joining``: ``join_lists`` and ``MergedShards``: several shards of a version searched as one
  index. Tested in tests/test_index.py.
- ``searchers``: ``LocalShardSearcher`` / the ``ShardSearcher`` Ray actor, ``searcher_groups``
  and memory requests, ``start_searchers``, ``search_version`` and ``search_rows`` (fan-out and
  merge). Tested in tests/test_index.py, tests/test_search.py and, over three nodes,
  tests/test_scale_cluster.py.
- ``synthetic``: clustered unit vectors for tests and bench/index.py.
"""
