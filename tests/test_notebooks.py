"""Every notebook in notebooks/ runs end to end in a real Jupyter kernel (nbclient + ipykernel, the
venv's python) against outputs made here: the demo flow (embed -> index -> search on the bundled
sample) and an evaluation report of the sample. A cell that raises fails the test. The review API
is also checked directly against the same real outputs."""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import nbformat
import numpy as np
import pytest
from nbclient import NotebookClient
from nbclient.exceptions import CellExecutionError

from facelake import review, storage

REPO = Path(__file__).resolve().parents[1]
NOTEBOOKS = REPO / "notebooks"
CELL_TIMEOUT = 180  # seconds per cell; the slowest (the review grid) takes a few on 2 cores

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def demo_out(tmp_path_factory, provisioned_weights):
    """`facelake demo` (embed -> index -> search) into a temp folder, and an evaluation report."""
    from facelake.jobs.demo import SAMPLE_MANIFEST, run_demo
    from facelake.jobs.evaluate import EvaluateConfig, evaluate

    out = str(tmp_path_factory.mktemp("demo") / "demo-out")
    made = run_demo(out)
    paths = review.paths_from_env({"FACELAKE_DEMO_OUT": out})
    assert made.get("results") == paths["results"], "facelake demo's search step (jobs/search.py) made no results"
    assert storage.list_files(storage.join(paths["results"], "results"), ".parquet")
    # The report embeds the same manifest with the same model into REPORT/embeddings; seeded with the
    # demo's embed output, the embed job's resume skips every photo (saves ~30 s on 2 cores).
    shutil.copytree(paths["archive"], storage.join(paths["report"], "embeddings"))
    report = evaluate(EvaluateConfig(manifest=str(SAMPLE_MANIFEST), out=paths["report"]))
    assert report.metrics["photos"]["embedded"] == 61  # every labeled sample photo
    return paths


def _run(name: str, env: dict[str, str], monkeypatch) -> nbformat.NotebookNode:
    for key, value in env.items():
        monkeypatch.setenv(key, value)  # the kernel inherits this process's environment
    nb = nbformat.read(NOTEBOOKS / name, as_version=4)
    client = NotebookClient(nb, kernel_name="python3", timeout=CELL_TIMEOUT,
                            resources={"metadata": {"path": str(NOTEBOOKS)}})
    client.execute()  # raises CellExecutionError on the first failing cell; shuts the kernel down
    return nb


def _outputs(nb, needle: str) -> list[dict]:
    """Outputs of the code cell whose source contains ``needle``."""
    cells = [c for c in nb.cells if c.cell_type == "code" and needle in c.source]
    assert len(cells) == 1, needle
    return cells[0].outputs


def _has(outputs, mime: str) -> bool:
    return any(mime in o.get("data", {}) for o in outputs)


def test_notebooks_are_committed_without_outputs():
    names = sorted(p.name for p in NOTEBOOKS.glob("*.ipynb"))
    assert {"review_search.ipynb", "archive_overview.ipynb", "evaluation_report.ipynb"} <= set(names)
    for name in names:
        nb = nbformat.read(NOTEBOOKS / name, as_version=4)
        nbformat.validate(nb)
        for cell in nb.cells:
            if cell.cell_type == "code":
                assert cell.outputs == [] and cell.execution_count is None, f"{name}: clear its outputs"
                assert len(cell.source.splitlines()) <= 8, f"{name}: keep cells short, call facelake.review"


def test_kernel_is_this_venv_python(tmp_path):
    """kernel_name="python3" is ipykernel's spec; jupyter_client runs it with this interpreter."""
    nb = nbformat.v4.new_notebook(cells=[nbformat.v4.new_code_cell("import sys; print(sys.executable)")])
    NotebookClient(nb, kernel_name="python3", timeout=60).execute()
    assert nb.cells[0].outputs[0]["text"].strip() == sys.executable


def test_failing_cell_fails_the_run(monkeypatch, tmp_path):
    """The notebooks' defaults point at a demo-out that is not there: the first read must fail."""
    with pytest.raises(CellExecutionError, match="FileNotFoundError"):
        _run("review_search.ipynb", {"FACELAKE_DEMO_OUT": str(tmp_path / "nothing")}, monkeypatch)


def test_review_search_notebook(demo_out, monkeypatch):
    nb = _run("review_search.ipynb", {"FACELAKE_DEMO_OUT": str(Path(demo_out["root"]).parent)}, monkeypatch)
    grid = _outputs(nb, "render_review_grid")
    assert _has(grid, "image/png"), "the review grid must show faces"
    assert "search-" in _outputs(nb, 'results = review.read_results(paths["results"])')[0]["data"]["text/plain"]
    assert _has(_outputs(nb, "audit(kind="), "text/html")


def test_archive_overview_notebook(demo_out, monkeypatch):
    nb = _run("archive_overview.ipynb", {"FACELAKE_DEMO_OUT": str(Path(demo_out["root"]).parent)}, monkeypatch)
    versions = _outputs(nb, "root.versions()")
    assert any("live version:" in o.get("text", "") for o in versions)
    assert _has(_outputs(nb, "faces_per_photo"), "image/png")


def test_evaluation_report_notebook(demo_out, monkeypatch):
    nb = _run("evaluation_report.ipynb", {"FACELAKE_DEMO_OUT": "/nonexistent",
                                          "FACELAKE_EVAL_REPORT": demo_out["report"]}, monkeypatch)
    curves = _outputs(nb, 'report["plots"]')
    assert sum("image/png" in o.get("data", {}) for o in curves) == 3  # roc, det, scores
    assert _has(_outputs(nb, "plot_calibration"), "image/png")


# ------------------------------------------------------------------------------ the API on real outputs

def test_root_versions_and_audit(demo_out):
    root = review.Root(demo_out["root"])
    versions = root.versions()
    assert len(versions) == 1 and bool(versions["live"].iloc[0])
    assert versions["version"].iloc[0] == root.live_version()
    faces = review.read_faces(demo_out["archive"], columns=["image_id"])
    assert versions["faces"].iloc[0] == len(faces) and versions["bytes"].iloc[0] > 0
    searches = root.audit(kind="search")
    assert len(searches) >= 1 and set(searches["status"]) == {"succeeded"}


def test_faces_per_photo_and_errors(demo_out):
    per_photo = review.faces_per_photo(demo_out["archive"])
    runs = review.embed_runs(demo_out["archive"])
    assert per_photo["photos"].sum() == int(runs["images"].sum()) == 64  # every sample photo, once
    assert (per_photo["faces"] * per_photo["photos"]).sum() == int(runs["faces"].sum())
    errors = review.errors_by_reason(demo_out["archive"])
    assert errors["images"].sum() == int(runs["errors"].sum())
    assert list(errors.columns) == ["stage", "error_type", "images", "example"]


def test_real_results_crop_the_faces_the_index_holds(demo_out):
    """A candidate's crop is its gallery photo at the bbox the embed job recorded, EXIF-upright."""
    results = review.read_results(demo_out["results"], max_rank=3)
    assert results.attrs["search"]["index_version"] == review.Root(demo_out["root"]).live_version()
    row = results.iloc[0]
    faces = review.read_faces(demo_out["archive"], columns=["image_id", "face_index", "uri", "bbox"])
    face = faces[(faces.image_id == row.gallery_image_id) & (faces.face_index == row.gallery_face_index)].iloc[0]
    assert list(face.bbox) == list(row.gallery_bbox)
    crop = review.crop_face(face.uri, face.bbox, margin=0.0, base_dir=demo_out["photos"])
    x, y, w, h = (int(v) for v in face.bbox)
    assert crop.size[0] <= w and crop.size[1] <= h and np.asarray(crop).std() > 10
    fig = review.render_review_grid(results, base_dir=demo_out["photos"], max_probes=2, max_candidates=3)
    assert review.panel_labels(fig).count("probe") == 2
    assert all(len(ax.images) == 1 for ax in fig.axes), "every face of the grid is readable"
    assert json.loads(json.dumps(results.attrs["search"]))["job_id"].startswith("search-")
