"""Figures for review: the grid of probe faces beside their candidates, and the calibration curve.

The review grid is a candidate list for a person to check, never an identification: every
panel shows similarity, the estimated false-match rate (95% upper bound from the calibration)
and rank; candidates below the threshold get a grey frame and say so. Tested in
tests/test_review.py and tests/test_notebooks.py.
"""

from __future__ import annotations

import json
import textwrap
from typing import TYPE_CHECKING

import numpy as np
import pyarrow as pa

from facelake.errors import ConfigError
from facelake.review.crops import DEFAULT_MARGIN, PhotoCache
from facelake.review.outputs import SEARCH_METADATA_KEY, require_pandas
from facelake.storage import StorageOptions

if TYPE_CHECKING:  # pandas and matplotlib are optional extras, imported when used
    import pandas as pd
    from matplotlib.figure import Figure

# Decoded photos kept while rendering a grid (one photo often holds the probe and candidates).
PHOTO_CACHE_SIZE = 16
# Longest side of a crop shown in a grid panel; larger crops are shrunk (4K photos stay light).
PANEL_PIXELS = 200
BELOW_COLOR = "#9e9e9e"
ABOVE_COLOR = "#1565c0"
PROBE_COLOR = "#000000"
CAPTION = ("Candidate list for human review, not an identification. Each candidate is ranked by similarity "
           "(cosine) to the probe face; est. FMR is the 95% upper bound on the false-match rate of one "
           "comparison at that similarity, from the calibration. A person must compare the faces.")
RESULT_COLUMNS_NEEDED = ("probe_image_id", "probe_face_index", "probe_bbox", "rank", "gallery_image_id",
                         "gallery_face_index", "gallery_bbox", "similarity")
BELOW = "candidate-below-threshold"


def render_review_grid(results, probe_faces=None, gallery_faces=None, *, base_dir: str | None = None,
                       max_probes: int = 6, max_candidates: int = 5, threshold: float | None = None,
                       margin: float = DEFAULT_MARGIN, title: str | None = None,
                       options: StorageOptions | None = None) -> "Figure":
    """Each probe face beside its candidates, as crops of the original photos.

    One row per probe face (the first ``max_probes``, in the order given), the probe first, then
    up to ``max_candidates`` candidates by rank, each captioned with rank, similarity and
    estimated false-match rate. Candidates below the threshold (``above_threshold`` false, or
    similarity < ``threshold`` when given) get a grey frame, a faded crop and "below threshold".
    Photo uris come from the results' probe_uri / gallery_uri columns, else from ``probe_faces`` /
    ``gallery_faces`` (tables with image_id[, face_index], uri); relative ones resolve against
    ``base_dir``. A photo that cannot be read shows the error in its panel. Every panel's axes
    carry a label: "probe", "candidate" or "candidate-below-threshold".
    """
    from matplotlib.figure import Figure

    frame, meta = _frame_and_metadata(results)
    explicit = threshold is not None
    if threshold is None and meta.get("threshold") is not None:
        threshold = float(meta["threshold"])
    groups = _probe_rows(frame, max_probes)
    columns = 1 + max(1, min(max_candidates, max(int(r["rank"].notna().sum()) for _, r in groups)))
    fig = Figure(figsize=(2.0 * columns, 2.45 * len(groups) + 1.3))
    grid = _Grid(fig, fig.add_gridspec(len(groups), columns, wspace=0.08, hspace=0.55),
                 PhotoCache(base_dir, options, PHOTO_CACHE_SIZE), margin,
                 {"probe": _uri_map(probe_faces), "gallery": _uri_map(gallery_faces)})
    for r, ((probe_id, probe_face), rows) in enumerate(groups):
        grid.row(r, probe_id, probe_face, rows, columns - 1, threshold, explicit)
    _caption(fig, frame, meta, threshold, title)
    return fig


def _frame_and_metadata(results) -> tuple["pd.DataFrame", dict]:
    """The results as a DataFrame and the search job's metadata, checked for the columns the grid needs."""
    frame = results.to_pandas() if isinstance(results, pa.Table) else results
    meta = dict(getattr(results, "attrs", {}).get("search", {})) if not isinstance(results, pa.Table) else {}
    if isinstance(results, pa.Table) and results.schema.metadata and SEARCH_METADATA_KEY in results.schema.metadata:
        meta = json.loads(results.schema.metadata[SEARCH_METADATA_KEY])
    missing = [c for c in RESULT_COLUMNS_NEEDED if c not in frame.columns]
    if missing:
        raise ConfigError(f"results lack column(s) {missing}: pass a table from review.read_results")
    return frame, meta


def _probe_rows(frame, max_probes: int) -> list:
    """((probe image id, face index), its rows by rank) for the first ``max_probes`` probe faces."""
    groups = []
    for key, rows in frame.groupby(["probe_image_id", "probe_face_index"], sort=False):
        groups.append((key, rows.sort_values("rank", na_position="last")))
        if len(groups) == max_probes:
            break
    if not groups:
        raise ConfigError("no results to show: loosen the filters given to read_results")
    return groups


class _Grid:
    """Draws the panels of one review grid."""

    def __init__(self, fig: "Figure", spec, photos: PhotoCache, margin: float,
                 uris: dict[str, dict]) -> None:
        self.fig, self.spec, self.photos, self.margin, self.uris = fig, spec, photos, margin, uris

    def row(self, r: int, probe_id, probe_face, rows, candidates_shown: int, threshold: float | None,
            explicit: bool) -> None:
        """The probe face, then its candidates by rank (or a note that it has none)."""
        first = rows.iloc[0].to_dict()
        self.panel(r, 0, self.uri_of(first, "probe"), first["probe_bbox"], "probe",
                   f"PROBE {probe_id}\nface {int(probe_face)}", PROBE_COLOR)
        candidates = rows[rows["rank"].notna()].head(candidates_shown)
        if candidates.empty:
            ax = self.fig.add_subplot(self.spec[r, 1:])
            ax.set_label("no-candidate")
            ax.axis("off")
            ax.text(0.02, 0.5, "no candidate at or above the threshold", fontsize=9, va="center")
        for c, row in enumerate(candidates.to_dict("records"), start=1):
            below = _below(row, threshold, explicit)
            text = (f"#{int(row['rank'])} {row['gallery_image_id']}\nsim {row['similarity']:.3f} · "
                    f"{_fmt_rate(row.get('est_false_match_rate'))}")
            if below:
                text += "\nbelow threshold"
            self.panel(r, c, self.uri_of(row, "gallery"), row["gallery_bbox"], BELOW if below else "candidate",
                       text, BELOW_COLOR if below else ABOVE_COLOR, faded=below)

    def uri_of(self, row: dict, side: str) -> str | None:
        """The photo of a probe or gallery face: the results' own uri column, else the faces table given."""
        uri = row.get(f"{side}_uri")
        if uri is not None and not (isinstance(uri, float) and np.isnan(uri)):
            return uri
        image_id, face = row[f"{side}_image_id"], row[f"{side}_face_index"]
        lookup = self.uris[side]
        return lookup.get((image_id, int(face))) or lookup.get((image_id, None))

    def panel(self, r: int, c: int, uri: str | None, bbox, label: str, text: str, color: str,
              faded: bool = False) -> None:
        """One face crop in a frame of ``color``, captioned; an unreadable photo shows its error instead."""
        ax = self.fig.add_subplot(self.spec[r, c])
        ax.set_label(label)
        ax.set_xticks([])
        ax.set_yticks([])
        try:
            if uri is None:
                raise FileNotFoundError("no uri for this face: pass probe_faces / gallery_faces")
            pixels = np.asarray(self.photos.crop(uri, bbox, self.margin, PANEL_PIXELS))
            if faded:
                pixels = (0.45 * pixels + 0.55 * 255).astype(np.uint8)
            ax.imshow(pixels)
        except Exception as err:  # show the problem where the face would be; the rest still renders
            ax.text(0.5, 0.5, f"photo not shown\n{type(err).__name__}", ha="center", va="center",
                    fontsize=7, color="#b71c1c", transform=ax.transAxes, wrap=True)
        for spine in ax.spines.values():
            spine.set_edgecolor(color)
            spine.set_linewidth(3 if label != BELOW else 2)
            spine.set_linestyle("-" if label != BELOW else "--")
        ax.set_title(text, fontsize=7.5, color="#000000" if not faded else "#616161")


def _caption(fig: "Figure", frame, meta: dict, threshold: float | None, title: str | None) -> None:
    """The title (search job and index version), the caption under the grid, and the margins."""
    how = meta.get("threshold_how")
    thr = (f"threshold {threshold:.3f}" + (f" ({how})" if how else "")) if threshold is not None \
        else "no threshold: candidates are not marked"
    version = meta.get("index_version") or (frame["index_version"].iloc[0] if "index_version" in frame else None)
    fig.suptitle(title or f"Search {meta.get('job_id', '')} on index version {version}".strip(), fontsize=10,
                 y=1 - 0.15 / fig.get_figheight(), va="top")
    fig.text(0.01, 0.005, "\n".join(textwrap.wrap(f"{CAPTION} Blue frame: at or above the {thr}; grey dashed "
                                                  f"frame, faded: below threshold.", 180)),
             fontsize=7, va="bottom", ha="left")
    fig.subplots_adjust(left=0.01, right=0.99, top=1 - 0.85 / fig.get_figheight(),
                        bottom=0.75 / fig.get_figheight())


def _uri_map(table) -> dict[tuple[str, int | None], str]:
    """(image_id, face_index) and (image_id, None) -> uri, from a faces or manifest table."""
    if table is None:
        return {}
    frame = table.to_pandas() if isinstance(table, pa.Table) else table
    mapping: dict = {}
    for row in frame.itertuples(index=False):
        image_id, uri = getattr(row, "image_id"), getattr(row, "uri")
        mapping.setdefault((image_id, None), uri)
        if hasattr(row, "face_index"):
            mapping[(image_id, int(getattr(row, "face_index")))] = uri
    return mapping


def _fmt_rate(rate) -> str:
    if rate is None or not np.isfinite(rate):
        return "est. FMR n/a"
    return f"est. FMR \u2264 {rate:.1e}"


def _below(row: dict, threshold: float | None, explicit: bool) -> bool:
    """Is a candidate below the threshold? An explicit threshold wins over the job's column."""
    above = row.get("above_threshold")
    if explicit or above is None or require_pandas().isna(above):
        return threshold is not None and bool(row["similarity"] < threshold)
    return not bool(above)


def panel_labels(fig: "Figure") -> list[str]:
    """The labels of a review grid's panels, in drawing order ("probe", "candidate", ...)."""
    return [ax.get_label() for ax in fig.axes]


def plot_calibration(calibration, *, threshold: float | None = None) -> "Figure":
    """FMR (measured and 95% upper bound) and FNMR against the similarity threshold."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=(6, 4))
    ax = fig.add_subplot()
    t = calibration.thresholds
    shown = calibration.fmr > 0
    ax.semilogy(t[shown], calibration.fmr[shown], label="FMR (measured)")
    ax.semilogy(t, calibration.fmr_upper, "--", label="FMR (95% upper bound)")
    if calibration.n_genuine:
        fnmr = calibration.fnmr
        ax.semilogy(t[fnmr > 0], fnmr[fnmr > 0], label="FNMR")
    if threshold is not None:
        ax.axvline(threshold, color="k", lw=0.8, ls=":", label=f"threshold {threshold:.3f}")
    ax.set_xlabel("similarity threshold (cosine)")
    ax.set_ylabel("rate")
    ax.set_title(f"calibration: {calibration.model} on {calibration.dataset} "
                 f"({calibration.n_impostor:,} impostor pairs)", fontsize=9)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    return fig

