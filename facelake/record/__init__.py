"""The root of record: what ``facelake rebuild`` and ``erase`` keep under ROOT, and who did what.

- ``tables``: table versions of faces and errors, the TABLE pointer, staging runs
  (tests/test_table_tasks.py, test_rebuild.py, test_counts.py).
- ``erasures``: the erasure list, append-only and hash-chained, anchored in the audit log
  (tests/test_erase.py, test_erase_holdings.py).
- ``lock``: one writing job at a time per ROOT (tests/test_lock.py).
- ``audit``: the audit log, a keyed hash chain of typed records (tests/test_audit.py).
"""
