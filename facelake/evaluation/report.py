"""The evaluation report: REPORT_DIR/report.md, metrics.json, calibration.json and PNG plots
(ROC, DET, score distributions), from what ``facelake.evaluation.measure`` returns.

Tested in tests/test_evaluate.py; read back by facelake.review.read_report.
"""

from __future__ import annotations

import json
import math
import os
import tempfile

import numpy as np

from facelake import storage
from facelake.calibration import Calibration
from facelake.evaluation.metrics import roc

PLOT_DPI = 110
# Similarity bins of the score histogram (cosine, with room below 0).
SCORE_BINS = np.linspace(-0.5, 1.0, 151)


def write_report(metrics: dict, calibration: Calibration, out: str, *, plots: bool = True) -> dict[str, str]:
    """Write report.md, metrics.json, calibration.json and the PNG plots under ``out``; returns name -> uri."""
    written: dict[str, str] = {}
    local = storage.scheme_of(out) == "file"
    with tempfile.TemporaryDirectory(prefix="facelake-eval-") as tmp:
        work = storage.filesystem(out)[1] if local else tmp
        os.makedirs(work, exist_ok=True)
        names = write_plots(metrics, work) if plots else []
        if not local:
            for name in names:
                with open(os.path.join(tmp, name), "rb") as handle:
                    storage.write_bytes_atomic(storage.join(out, name), handle.read())
    for name in names:
        written[name] = storage.join(out, name)
    files = {"metrics.json": json.dumps(public_metrics(metrics), indent=2).encode(),
             "calibration.json": (calibration.to_json() + "\n").encode(),
             "report.md": report_markdown(metrics, names).encode()}
    for name, data in files.items():
        storage.write_bytes_atomic(storage.join(out, name), data)
        written[name] = storage.join(out, name)
    return written


def public_metrics(value):
    """Metrics without the score arrays (keys starting with '_'), JSON-safe."""
    if isinstance(value, dict):
        return {k: public_metrics(v) for k, v in value.items() if not str(k).startswith("_")}
    if isinstance(value, (list, tuple)):
        return [public_metrics(v) for v in value]
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


# ------------------------------------------------------------------------------ plots

def write_plots(metrics: dict, out_dir: str) -> list[str]:
    """roc.png and det.png (when there are genuine pairs) and scores.png in the local ``out_dir``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ver = metrics["verification"]
    gen, imp = ver["_genuine"], ver["_impostor"]
    title = f"{metrics['model']} on {metrics['dataset']}"
    figures = []
    if len(gen):
        curve = roc(gen, imp)
        figures += [("roc.png", _roc_figure(plt, curve, len(imp), metrics.get("pairs_protocol"), title)),
                    ("det.png", _det_figure(plt, curve, title))]
    figures.append(("scores.png", _scores_figure(plt, gen, imp)))
    for name, fig in figures:
        fig.tight_layout()
        fig.savefig(os.path.join(out_dir, name), dpi=PLOT_DPI)
        plt.close(fig)
    return [name for name, _ in figures]


def _roc_figure(plt, curve: dict, impostors: int, pairs_protocol: dict | None, title: str):
    fig, ax = plt.subplots(figsize=(5, 4))
    shown = curve["fmr"] > 0  # below one impostor pair the data says nothing
    ax.semilogx(curve["fmr"][shown], curve["tar"][shown], label="all pairs")
    if pairs_protocol and len(pairs_protocol["_genuine"]) and len(pairs_protocol["_impostor"]):
        c2 = roc(pairs_protocol["_genuine"], pairs_protocol["_impostor"])
        ax.semilogx(c2["fmr"][c2["fmr"] > 0], c2["tar"][c2["fmr"] > 0], label="pairs file")
    ax.set_xlim(max(1e-7, 0.5 / impostors), 1)
    ax.set_xlabel("false accept rate (FMR)")
    ax.set_ylabel("true accept rate (TAR)")
    ax.set_title(f"ROC: {title}")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(loc="lower right")
    return fig


def _det_figure(plt, curve: dict, title: str):
    fig, ax = plt.subplots(figsize=(5, 4))
    keep = (curve["fmr"] > 0) & (curve["fnmr"] > 0)
    ax.loglog(curve["fmr"][keep], curve["fnmr"][keep])
    ax.set_xlabel("false match rate (FMR)")
    ax.set_ylabel("false non-match rate (FNMR)")
    ax.set_title(f"DET: {title}")
    ax.grid(True, which="both", alpha=0.3)
    return fig


def _scores_figure(plt, gen: np.ndarray, imp: np.ndarray):
    fig, ax = plt.subplots(figsize=(5, 4))
    ax.hist(imp, bins=SCORE_BINS, density=True, alpha=0.6, label=f"impostor ({len(imp):,})")
    if len(gen):
        ax.hist(gen, bins=SCORE_BINS, density=True, alpha=0.6, label=f"genuine ({len(gen):,})")
    ax.set_yscale("log")
    ax.set_xlabel("similarity (cosine)")
    ax.set_ylabel("density")
    ax.legend()
    return fig


# ------------------------------------------------------------------------------ report.md

def _fmt(x, pct: bool = True) -> str:
    if x is None:
        return "n/a"
    return f"{100 * x:.2f}%" if pct else f"{x:.4f}"


def report_markdown(metrics: dict, plots: list[str]) -> str:
    """report.md: photos, the pairs-file protocol, verification, calibration, identification, groups."""
    m = public_metrics(metrics)
    lines = _photos_section(m)
    if "pairs_protocol" in m:
        lines += _pairs_section(m["pairs_protocol"])
    lines += _verification_section(m["verification"], plots) + _calibration_section(m["calibration"])
    lines += _identification_section(m["identification"])
    if "by_group" in m:
        lines += _group_section(m["by_group"])
    return "\n".join(lines) + "\n"


def _photos_section(m: dict) -> list[str]:
    photos = m["photos"]
    failed_by_type = ", ".join(f"{k}: {v}" for k, v in photos["failed_by_type"].items()) or "none"
    return [f"# facelake evaluation: {m['model']} ({m['recognizer']} + {m['detector']}) on {m['dataset']}", "",
            f"Weights {m['weights_sha256'][:16]}... A comparison matches when cosine similarity >= threshold; "
            f"each photo is represented by its {m.get('face', 'largest')} face.", "",
            "## Photos", "",
            f"{photos['labeled']} labeled photos of {photos['identities']} identities; {photos['embedded']} embedded, "
            f"{photos['failed']} failed ({failed_by_type}); "
            f"{photos['unlabeled_skipped']} unlabeled rows skipped. Embedding took {m['embed_seconds']:.0f} s, "
            f"measuring {m['measure_seconds']:.0f} s.", ""]


def _pairs_section(pp: dict) -> list[str]:
    lines = ["## Pairs file, 10-fold protocol", "",
             f"Accuracy **{_fmt(pp['accuracy'])}** ± {_fmt(pp['accuracy_std'])} over {pp['pairs']} pairs in "
             f"{pp['folds']} folds (threshold chosen on the other folds). {pp['pairs_with_failed_photo']} pair(s) "
             f"had a failed photo and count as errors; excluding them: {_fmt(pp['accuracy_excluding_failed'])}.", "",
             "| FAR | TAR | threshold |", "|---|---|---|"]
    lines += [f"| {r['far']:g} | {_fmt(r['tar'])} | {_fmt(r.get('threshold'), False)} |" if r["tar"] is not None
              else f"| {r['far']:g} | {r['note']} | |" for r in pp["tar_at_far"]]
    return lines + [""]


def _verification_section(ver: dict, plots: list[str]) -> list[str]:
    lines = ["## Verification over all pairs", "",
             f"{ver['genuine_pairs']:,} genuine pairs (mean similarity {_fmt(ver['genuine_mean'], False)}), "
             f"{ver['impostor_pairs']:,} impostor pairs ({'seeded sample' if ver['impostor_sampled'] else 'all'}; "
             f"mean {_fmt(ver['impostor_mean'], False)}).", "",
             "| FAR | TAR | threshold | impostor pairs |", "|---|---|---|---|"]
    lines += [f"| {r['far']:g} | {_fmt(r['tar'])} | {_fmt(r['threshold'], False)} | {r['n_impostor']:,} |"
              if r["tar"] is not None else f"| {r['far']:g} | {r['note']} | | {r['n_impostor']:,} |"
              for r in ver["tar_at_far"]]
    return lines + ["", " ".join(f"![{p}]({p})" for p in plots), ""]


def _calibration_section(cal: dict) -> list[str]:
    lines = ["## Calibration (calibration.json)", "",
             f"{cal['rows']} thresholds. FMR is the one-sided 95% upper bound; the smallest this "
             f"data can certify is {cal['min_certified_fmr']:.2g}.", "",
             "| target FMR | threshold | TAR there |", "|---|---|---|"]
    return lines + [f"| {r['target_fmr']:g} | {_fmt(r['threshold'], False)} | {_fmt(r['tar'])} |"
                    if r["threshold"] is not None else f"| {r['target_fmr']:g} | {r['note']} | |"
                    for r in cal["thresholds_by_fmr"]]


def _identification_section(idn: dict) -> list[str]:
    lines = ["", "## Identification (1:N)", ""]
    if "rank1" not in idn:
        return lines + [idn.get("note", "not measured")]
    lines += [f"Gallery of {idn['gallery_size']} (one photo per enrolled identity), {idn['mated_probes']} mated "
              f"and {idn['non_mated_probes']} non-mated probes (seed {idn['seed']}). Rank-1 "
              f"**{_fmt(idn['rank1'])}**, rank-10 {_fmt(idn['rank10'])}.", "",
              "| FPIR | FNIR | threshold | calibrated threshold (FPIR at this gallery) | its measured FPIR / FNIR |",
              "|---|---|---|---|---|"]
    cal_rows = {r["fpir"]: r for r in idn.get("calibrated_thresholds", [])}
    for r in idn["fnir_at_fpir"]:
        c = cal_rows.get(r["fpir"], {})
        cal = (f"{_fmt(c['threshold'], False)} | {_fmt(c['measured_fpir'])} / {_fmt(c['fnir'])}"
               if c.get("threshold") is not None else "not certifiable | ")
        lines.append(f"| {r['fpir']:g} | {_fmt(r['fnir'])} | {_fmt(r.get('threshold'), False)} | {cal} |"
                     if r["fnir"] is not None else f"| {r['fpir']:g} | {r['note']} | | {cal} |")
    return lines


def _group_section(bg: dict) -> list[str]:
    lines = ["", "## By group", "",
             f"At threshold {bg['threshold']:.4f} ({bg['threshold_rule']}); pairs within each group.", "",
             "| group | photos | identities | FMR | FMR 95% upper | impostor pairs | FNMR | genuine pairs |",
             "|---|---|---|---|---|---|---|---|"]
    return lines + [f"| {g['group']} | {g['photos']} | {g['identities']} | {_fmt(g['fmr'])} | "
                    f"{_fmt(g['fmr_upper95'])} | {g['impostor_pairs']:,} | {_fmt(g['fnmr'])} | "
                    f"{g['genuine_pairs']:,} |" for g in bg["groups"]]
