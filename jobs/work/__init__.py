"""Distributed table work the commands share, run as Ray tasks so nothing that grows with the
archive passes through the driver.

- ``resume``: an embed run's todo manifest, the manifest less the ids already done
  (tests/test_resume.py).
- ``counts``: distinct images and errors held by part files or shards, erase's holdings
  (tests/test_counts.py, test_erase_holdings.py).
- ``photos``: the photos a manifest names as they are now: resolved uris, source stats, content
  hashes, the allowed roots ROOT remembers (tests/test_rebuild_plan.py, test_rebuild_roots.py).
- ``changes``: a rebuild's change plan, the manifest compared with the record, in the driver or
  in hash-partitioned tasks (tests/test_rebuild_plan.py, test_rebuild*.py).
- ``staging``: a rebuild's staging runs: reused by fingerprint, the staged stats, what the
  table version takes in from them (tests/test_rebuild.py, test_embed.py).
- ``units``: the map that runs a table version's units of work (tests/test_table_tasks.py).
- ``probes``: a search's probe intake: a faces table checked against the index's model, or what
  the embed job wrote for a manifest of probes (tests/test_search.py).
- ``search_batches``: a search's workers, batches of probe faces through the shard actors to
  result part files, on Ray Data or in this process (tests/test_search.py,
  test_hardening_faults.py).
"""
