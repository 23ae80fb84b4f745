"""Reading facelake's outputs in a notebook: roots, results, audit, errors, and faces people can see.

    paths = review.paths_from_env()                 # demo-out/{root,results,archive}, eval report
    root = review.Root(paths["root"])
    root.versions(); root.live_version(); root.audit()
    results = review.read_results(paths["results"], max_fmr=1e-4, exclude_self=True)
    review.render_review_grid(results, base_dir=paths["photos"])   # a matplotlib Figure

- ``outputs``: where the notebooks' inputs are (``paths_from_env``), a root's versions and audit
  (``Root``), search results filtered while reading (``read_results``, the job's metadata in
  ``DataFrame.attrs["search"]``), an evaluation report (``read_report``).
- ``archive``: an embed run's archive or a ROOT of record: faces, errors counted by reason,
  dropped faces, faces per photo, the runs that wrote it.
- ``crops``: photos read and decoded the way the embed job saw them, face crops with a margin.
- ``grid``: the review grid (a candidate list for a person to check, never an identification)
  and the calibration plot.

Tables come back as pandas DataFrames (the ``notebooks`` and ``test`` extras). The package sits
above ``facelake.index``. Tested in tests/test_review.py and, over the demo's real outputs,
tests/test_notebooks.py; the notebooks in notebooks/ call only the names below.
"""

from facelake.review.archive import (dropped_by_reason, embed_runs, errors_by_reason, faces_per_photo,
                                     read_errors, read_faces)
from facelake.review.crops import DEFAULT_MARGIN, crop_box, crop_face, load_photo, resolve_uri
from facelake.review.grid import panel_labels, plot_calibration, render_review_grid
from facelake.review.outputs import Root, paths_from_env, read_report, read_results, search_metadata

__all__ = ["DEFAULT_MARGIN", "Root", "crop_box", "crop_face", "dropped_by_reason", "embed_runs",
           "errors_by_reason", "faces_per_photo", "load_photo", "panel_labels", "paths_from_env",
           "plot_calibration", "read_errors", "read_faces", "read_report", "read_results", "render_review_grid",
           "resolve_uri", "search_metadata"]
