"""The root of record: what ``facelake rebuild`` and ``erase`` keep under ROOT, and who did what.

- ``tables``: table versions of faces and errors, the TABLE pointer, the erasure list, staging
  (tests/test_table_tasks.py, test_rebuild.py, test_erase.py).
- ``lock``: one writing job at a time per ROOT (tests/test_lock.py).
- ``audit``: the audit log, a keyed hash chain of typed records (tests/test_audit.py).
"""
