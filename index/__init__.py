"""FAISS: training, sharding, publishing versions, loading, searching, merging (no imports of facelake.jobs).

- ``params``: IndexParams and ``choose_params`` (nlist / nprobe / PQ from the collection size,
  validated; the measured recall behind the defaults). Tested in tests/test_index.py.
- ``layout``: the one definition of ROOT/index/<version>/ and the CURRENT pointer; version
  names, listing, publishing, pruning. Tested by the crash and prune tests.
- ``build``: ``train`` and ``build_version``: faces table -> trained quantizer -> shards added
  in parallel Ray tasks (GPU when present) -> manifest -> CURRENT. Tested end to end, on S3 too.
- ``update``: ``update_version``: the next version from the live one at O(change): shards whose
  part files of record are unchanged are kept (hard links / S3 server-side copies), shards that
  held removed or erased faces are rebuilt, new faces go to delta shards, small shards merge by
  tiers. Tested in tests/test_rebuild_incremental.py.
- ``load``: ``open_version`` / ``load_shard`` / ``load_ids``, every byte checked against the
  manifest's sha256 before parsing; other model or dimension refused.
- ``search``: ``search_shard``, ``merge_topk`` (faiss ResultHeap), the ``ShardSearcher`` Ray
  actor and ``search_version``. Tested against exact IndexFlatIP results.
- ``erasure``: what every publisher does about the erasure list: the checked list, the refusal to
  publish a version holding an erased id, removing other versions that hold one. Tested in
  tests/test_erase.py.
- ``publish``: ``publish_index``: the index version of a table version of record (after rebuild
  or erase), the live version extended while its trained quantizer fits, else retrained. Tested
  in tests/test_rebuild*.py and tests/test_erase.py.
- ``synthetic``: clustered unit vectors for tests and bench/index.py.
"""
