"""facelake's batch jobs: one module per command (its typed config, orchestration and CLI wiring).

- ``cli``: the `facelake` command; a registry of command names imports each command's module
  only when it runs or shows its help (tests/test_cli.py).
- ``options``: the options several commands share, declared once (tests/test_cli.py).
- ``embed``, ``index_cmd``, ``search``, ``calibrate``, ``rebuild``, ``erase``, ``status``,
  ``audit_cmd``, ``evaluate``, ``weights_cmd``, ``submit_cmd``, ``demo``: one command each
  (tests/test_embed*.py, test_index.py, test_search.py, test_calibrate.py, test_rebuild*.py,
  test_erase*.py, test_cli.py, test_audit.py, test_evaluate.py, test_weights.py, test_submit.py,
  test_packaging.py).
- ``work/``: the table work several commands share, run as Ray tasks.
"""
