"""bench/eval: the LFW protocol for a registered model (the default unless --model), and plain deepface beside it.

    python bench/eval.py [--model M] [--lfw DIR] [--cache DIR] [--embedder local|ray] [--deepface-folds N]

Results of the model sface-yunet go to bench/results/eval-lfw*.json; those of any other model
carry its name (eval-lfw-sface-yunet-flip.json, ...).

1. Builds a Parquet manifest of LFW (image_id = file stem, uri, identity) in a temp folder.
2. Embeds every photo with facelake (5-point alignment, batched SFace), cached under --cache by
   model weights so reruns only measure (LFW data is never committed). Each photo is represented
   by its most central face (--face central, the default: LFW labels the centred face, and the
   largest face is a bystander's in ~0.5% of photos) or by its largest (--face largest, the rule
   `facelake evaluate` applies by default; results go to eval-lfw-largest.*).
3. Measures with facelake.evaluation: 10-fold accuracy on pairs.txt, TAR at FAR over the
   pairs file and over all LFW pairs (every genuine and every impostor pair), identification,
   and the calibration, which it writes to facelake/data/calibration-<model>-lfw.json.
4. Plain deepface on the same pairs: DeepFace.represent(model_name="SFace",
   detector_backend="yunet") one photo at a time, on the first --deepface-folds folds (the
   k-fold protocol over those folds), and facelake on the same folds for a like-for-like figure.

Prints JSON and a short table; saves bench/results/eval-lfw.json and the report under
bench/results/eval-lfw/ (eval-lfw-largest.* with --face largest).

5. With --frte: FNIR at FPIR 1e-3 against the gallery size, the way NIST FRTE 1:N plots it
   (``frte_curve``), on the same cached embeddings, instead of steps 3-4. Gallery: one photo of
   each LFW identity with two or more photos (1,680), then synthetic distractors up to each size
   in --gallery-sizes (default 1k, 10k, 100k, 1M): unit vectors drawn from a Gaussian with the
   mean and covariance of the real LFW embeddings (``--distractors gaussian``; ``clustered`` uses
   index.synthetic). Mated searches: every other photo of an enrolled identity; non-mated searches:
   the photos of the 4,069 identities with one photo (never enrolled). Exact search (IndexFlatIP).
   The threshold at each size is the one at which at most FPIR 1e-3 of the non-mated searches
   return any candidate; FNIR is the share of mated searches whose mate is missing from the top
   --rank candidates or below that threshold (also at rank 1), at FPIR 1e-3 and 1e-2; the highest
   non-mated searches at the largest size are listed (they set the threshold: on LFW, the same person
   under two names and twins). Saves bench/results/eval-lfw[-MODEL]-frte.json and .png. Synthetic
   distractors are not faces: real distractors of the same number are likely harder, so read FNIR
   at the large sizes as a lower bound.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pyarrow as pa

REPO = Path(__file__).resolve().parents[1]
DEFAULT_LFW = REPO.parent / "shared" / "faces" / "lfw_deepfunneled"
# All LFW pairs: ~242k genuine, ~87.5M impostor; every impostor pair is used (no sampling).
ALL_PAIRS = 100_000_000
# Result files of the first registered model keep their historical names (eval-lfw.json, ...);
# other models' carry the model name (eval-lfw-sface-yunet-flip.json, ...).
UNSUFFIXED_MODEL = "sface-yunet"


def result_name(model: str, face: str = "central", suffix: str = "") -> str:
    """bench/results file stem for a model, face rule and optional suffix (e.g. "frte")."""
    parts = ["eval-lfw"] + ([] if model == UNSUFFIXED_MODEL else [model]) + ([] if face == "central" else [face])
    return "-".join(parts + ([suffix] if suffix else []))


def lfw_manifest(lfw: Path, folder: str) -> str:
    from facelake.faces import manifest

    paths = sorted((lfw / "lfw-deepfunneled").glob("*/*.jpg"))
    if not paths:
        sys.exit(f"no LFW photos under {lfw / 'lfw-deepfunneled'}")
    table = pa.table({"image_id": [p.stem for p in paths], "uri": [str(p) for p in paths],
                      "identity": [p.parent.name for p in paths]})
    uri = os.path.join(folder, "lfw-manifest.parquet")
    manifest.write(table, uri)
    return uri


def embed_cached(manifest_uri: str, cache: Path, embedder: str, model: str | None, work: str, face: str):
    """LabeledEmbeddings for the LFW manifest, from the cache when it matches the weights."""
    from facelake import storage
    from facelake.evaluation.embeddings import LabeledEmbeddings, embed_largest_faces_local
    from facelake.jobs.evaluate import EvaluateConfig, embed_labeled
    from facelake.faces.registry import get_model, weights_fingerprint

    spec = get_model(model)
    suffix = "" if face == "largest" else f"-{face}"  # (cache names only)
    path = cache / f"lfw-{spec.name}-{weights_fingerprint(spec)[:12]}{suffix}.npz"
    table = storage.read_table(manifest_uri)
    ids = table["image_id"].to_pylist()
    if path.exists():
        data = np.load(path, allow_pickle=False)
        if list(data["image_id"]) == ids:
            errors = json.loads(str(data["errors"]))
            counts = errors if isinstance(errors, dict) else {}
            if isinstance(errors, list):
                for err in errors:
                    counts[err["error_type"]] = counts.get(err["error_type"], 0) + 1
            print(f"embeddings from cache {path}", file=sys.stderr)
            return LabeledEmbeddings(image_ids=ids, identities=np.array(table["identity"].to_pylist(), object),
                                     embeddings=data["embedding"], errors=counts,
                                     embed_seconds=float(data["seconds"])), True
    if face == "largest":
        emb = embed_labeled(EvaluateConfig(manifest=manifest_uri, out=work, model=model, embedder=embedder), table)
    else:  # only the local embedder can pick a face by position (the faces table has no image size)
        started = time.monotonic()
        vectors, errors = embed_largest_faces_local(table["uri"].to_pylist(), model, face=face, progress_every=1000)
        counts: dict[str, int] = {}
        for err in errors:
            counts[err["error_type"]] = counts.get(err["error_type"], 0) + 1
        emb = LabeledEmbeddings(image_ids=ids, identities=np.array(table["identity"].to_pylist(), object),
                                embeddings=vectors, errors=counts, embed_seconds=round(time.monotonic() - started, 1))
    cache.mkdir(parents=True, exist_ok=True)
    np.savez(path, image_id=np.array(ids), embedding=emb.embeddings, errors=json.dumps(emb.errors),
             seconds=emb.embed_seconds)
    return emb, False


# --------------------------------------------------------------------------- FRTE-style FNIR @ FPIR

FRTE_SIZES = (1_000, 10_000, 100_000, 1_000_000)
FRTE_FPIR = 1e-3
# Also reported: with ~4,000 non-mated searches FPIR 1e-3 allows 4 false alarms, so its threshold is
# set by LFW's few near-duplicate identities (one person under two spellings, twins); 1e-2 is steadier.
FRTE_EXTRA_FPIRS = (1e-2,)
FRTE_TOP_NONMATED = 12  # highest non-mated searches listed at the largest size (what sets the threshold)
FRTE_RANK = 50      # candidates returned per search (FRTE reports FNIR at rank "any" within its list)


def frte_split(emb) -> dict[str, np.ndarray]:
    """Indexes into emb rows: one enrolled photo per identity with >= 2 usable photos, the other
    photos of those identities (mated probes), and the photos of single-photo identities (non-mated)."""
    ok = np.flatnonzero(emb.ok)
    ids = emb.identities[ok]
    order = np.argsort(ids, kind="stable")
    ok, ids = ok[order], ids[order]
    first = np.r_[True, ids[1:] != ids[:-1]]
    counts = np.diff(np.r_[np.flatnonzero(first), len(ids)])
    per_row = np.repeat(counts, counts)
    return {"enrolled": ok[first & (per_row >= 2)], "mated": ok[~first & (per_row >= 2)],
            "nonmated": ok[per_row == 1]}


def distractors(real: np.ndarray, n: int, kind: str, seed: int = 0) -> np.ndarray:
    """``n`` synthetic unit vectors: from a Gaussian fitted to the real embeddings, or clustered."""
    if n <= 0:
        return np.zeros((0, real.shape[1]), np.float32)
    if kind == "clustered":
        from facelake.index.synthetic import clustered

        return clustered(n, real.shape[1], seed=seed)
    rng = np.random.default_rng(seed)
    mean, cov = real.mean(axis=0), np.cov(real, rowvar=False)
    x = rng.multivariate_normal(mean, cov, size=n, method="cholesky").astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def frte_curve(emb, sizes=FRTE_SIZES, *, fpir: float = FRTE_FPIR, rank: int = FRTE_RANK,
               kind: str = "gaussian", seed: int = 1729, extra_fpirs=FRTE_EXTRA_FPIRS) -> list[dict]:
    """FNIR at the threshold giving ``fpir`` on non-mated searches, per gallery size (exact search)."""
    import faiss

    split = frte_split(emb)
    x = emb.embeddings.astype(np.float32)
    enrolled_ids = emb.identities[split["enrolled"]]
    mate_of = {identity: i for i, identity in enumerate(enrolled_ids)}
    extra = distractors(x[split["enrolled"]], max(sizes) - len(split["enrolled"]), kind, seed)
    nonmated = x[split["nonmated"]]
    rows = []
    for n in sizes:
        n_enrolled = min(n, len(split["enrolled"]))
        gallery = np.concatenate([x[split["enrolled"][:n_enrolled]], extra[:n - n_enrolled]])
        mated_rows = [i for i in split["mated"] if mate_of[emb.identities[i]] < n_enrolled]
        mates = np.array([mate_of[emb.identities[i]] for i in mated_rows])
        index = faiss.IndexFlatIP(gallery.shape[1])
        index.add(gallery)
        k = min(rank, n)
        Dm, Im = index.search(x[mated_rows], k)
        Dn, In = index.search(nonmated, 1)
        top = np.sort(Dn[:, 0])[::-1]
        hit = Im == mates[:, None]
        mate_score = np.where(hit.any(axis=1), Dm[np.arange(len(Dm)), hit.argmax(axis=1)], -np.inf)

        def at(target: float) -> dict:
            allowed = int(np.floor(target * len(top)))           # non-mated searches allowed a candidate
            threshold = float(np.nextafter(top[allowed], np.inf)) if allowed < len(top) else float(top[-1])
            at_rank1 = hit[:, 0] & (Dm[:, 0] >= threshold)
            return {"fpir_target": target, "threshold": threshold, "fpir_measured": float((top >= threshold).mean()),
                    "fnir": float((mate_score < threshold).mean()), "fnir_rank1": float(1 - at_rank1.mean())}

        rows.append({
            "gallery_size": n, "enrolled_identities": n_enrolled, "distractors": n - n_enrolled,
            "mated_searches": len(mated_rows), "nonmated_searches": len(top), **at(fpir),
            "fnir_no_threshold_rank1": float(1 - hit[:, 0].mean()),
            "at_other_fpir": [at(f) for f in extra_fpirs],
        })
        if n == max(sizes):  # which non-mated searches set the threshold: probe -> candidate, score
            order = np.argsort(-Dn[:, 0])[:FRTE_TOP_NONMATED]
            rows[-1]["top_nonmated"] = [
                {"probe": emb.image_ids[split["nonmated"][j]], "score": round(float(Dn[j, 0]), 4),
                 "candidate": (emb.image_ids[split["enrolled"][In[j, 0]]] if In[j, 0] < n_enrolled
                               else f"synthetic distractor {In[j, 0] - n_enrolled}")} for j in order]
        print(f"N={n:>9,}: threshold {rows[-1]['threshold']:.4f}, FPIR {rows[-1]['fpir_measured']:.2e}, "
              f"FNIR {rows[-1]['fnir']:.4f} (rank 1: {rows[-1]['fnir_rank1']:.4f})", file=sys.stderr)
    return rows


def plot_frte(rows: list[dict], path: Path, label: str) -> None:
    """FNIR at FPIR against gallery size, log x (FRTE's 'FNIR vs N' plot)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    sizes = [r["gallery_size"] for r in rows]
    ax.plot(sizes, [r["fnir"] for r in rows], "o-", label=f"{label}, rank <= {FRTE_RANK}")
    ax.plot(sizes, [r["fnir_rank1"] for r in rows], "s--", label=f"{label}, rank 1")
    for k, other in enumerate(rows[0].get("at_other_fpir", [])):
        ax.plot(sizes, [r["at_other_fpir"][k]["fnir"] for r in rows], "^:",
                label=f"{label}, rank <= {FRTE_RANK}, FPIR {other['fpir_target']:g}")
    ax.set_xscale("log")
    ax.set_xlabel("gallery size N (LFW enrolled + synthetic distractors)")
    ax.set_ylabel("FNIR")
    ax.set_title(f"FNIR at FPIR {rows[0]['fpir_target']:g} (and others) vs gallery size")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def run_frte(args, emb, spec) -> None:
    started = time.monotonic()
    rows = frte_curve(emb, tuple(args.gallery_sizes), kind=args.distractors)
    result = {"model": spec.name, "face": args.face, "protocol": "FNIR at FPIR 1e-3 vs gallery size (NIST FRTE 1:N "
              "style); LFW enrolled identities + synthetic distractors; exact search", "distractors": args.distractors,
              "rank": FRTE_RANK, "command": "python bench/eval.py " + " ".join(sys.argv[1:]),
              "photos": len(emb.image_ids), "photos_without_usable_face": int((~emb.ok).sum()),
              "seconds": round(time.monotonic() - started, 1), "rows": rows}
    args.results.mkdir(parents=True, exist_ok=True)
    name = result_name(spec.name, args.face, "frte")
    (args.results / f"{name}.json").write_text(json.dumps(result, indent=2) + "\n")
    try:
        plot_frte(rows, args.results / f"{name}.png", spec.name)
    except ImportError:
        print("matplotlib missing: no plot (pip install facelake[eval])", file=sys.stderr)
    print(json.dumps(result, indent=2))
    print(f"\n{'N':>10s}{'FPIR target':>12s}{'threshold':>11s}{'FPIR':>10s}{'FNIR':>9s}{'FNIR r1':>9s}{'mated':>8s}"
          f"{'non-mated':>11s}")
    for r in rows:
        for a in [r] + r["at_other_fpir"]:
            print(f"{r['gallery_size']:>10,}{a['fpir_target']:>12g}{a['threshold']:>11.4f}{a['fpir_measured']:>10.1e}"
                  f"{a['fnir']:>9.4f}{a['fnir_rank1']:>9.4f}{r['mated_searches']:>8,}{r['nonmated_searches']:>11,}")


def deepface_pairs(lfw: Path, pairs, fold_of, folds: int) -> dict:
    """Plain deepface (SFace + YuNet, DeepFace.represent one photo at a time) on the first folds."""
    from deepface import DeepFace
    from deepface.modules import verification

    from facelake.evaluation.metrics import tar_at_far
    from facelake.evaluation.protocols import best_threshold

    keep = np.flatnonzero(fold_of < folds)
    photos = sorted({p for i in keep for p in pairs[i][:2]})
    vectors: dict[str, np.ndarray | None] = {}
    failed = 0
    started = time.monotonic()
    for key in photos:
        name = key.rsplit("_", 1)[0]
        path = lfw / "lfw-deepfunneled" / name / f"{key}.jpg"
        try:
            # enforce_detection=False: a photo where YuNet finds no face is embedded whole, as
            # deepface users typically run LFW; with True such pairs would be errors.
            rep = DeepFace.represent(img_path=str(path), model_name="SFace", detector_backend="yunet",
                                     enforce_detection=False)
            vectors[key] = np.asarray(rep[0]["embedding"], np.float64)
        except Exception:  # noqa: BLE001 - counted
            vectors[key] = None
            failed += 1
    seconds = time.monotonic() - started
    scores, same, fold = [], [], []
    for i in keep:
        a, b, s = pairs[i]
        va, vb = vectors[a], vectors[b]
        if va is None or vb is None:
            scores.append(np.nan)
        else:
            scores.append(float(va @ vb / (np.linalg.norm(va) * np.linalg.norm(vb))))
        same.append(s)
        fold.append(fold_of[i])
    scores, same, fold = np.array(scores), np.array(same), np.array(fold)
    valid = ~np.isnan(scores)
    accs = []
    for k in range(folds):
        train, test = (fold != k) & valid, fold == k
        t = best_threshold(scores[train], same[train])
        accs.append(float((valid[test] & ((scores[test] >= t) == same[test])).sum() / test.sum()))
    default_sim = 1.0 - verification.find_threshold("SFace", "cosine")
    imp = scores[valid & ~same]
    gen = scores[valid & same]
    return {
        "folds": folds, "pairs": int(len(keep)), "photos": len(photos), "failed_photos": failed,
        "seconds": round(seconds, 1), "photos_per_second": round(len(photos) / seconds, 2),
        "accuracy": float(np.mean(accs)), "fold_accuracy": accs,
        "protocol": f"{folds}-fold: threshold chosen on the other {folds - 1} fold(s) of these {folds}",
        "tar_at_far": tar_at_far(gen, imp, (1e-2, 1e-3)),
        "default_threshold_similarity": default_sim,
        "default_threshold_fmr": float((imp >= default_sim).mean()),
        "default_threshold_tar": float((gen >= default_sim).mean()),
        "_scores": scores, "_same": same, "_fold": fold,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--lfw", type=Path, default=DEFAULT_LFW)
    parser.add_argument("--cache", type=Path, default=Path(tempfile.gettempdir()) / "facelake-eval-cache")
    parser.add_argument("--embedder", choices=("local", "ray"), default="local")
    parser.add_argument("--model", default=None)
    parser.add_argument("--face", choices=("largest", "central"), default="central",
                        help="which face stands for a photo: the largest (evaluate's rule) or the most central "
                             "(LFW's labeled face; local embedder only)")
    parser.add_argument("--deepface-folds", type=int, default=2, help="folds of pairs.txt for plain deepface (0: skip)")
    parser.add_argument("--max-impostor-pairs", type=int, default=ALL_PAIRS)
    parser.add_argument("--results", type=Path, default=REPO / "bench" / "results")
    parser.add_argument("--no-ship", action="store_true", help="do not write facelake/data/calibration-*.json")
    parser.add_argument("--frte", action="store_true", help="only FNIR at FPIR 1e-3 vs gallery size (FRTE 1:N style)")
    parser.add_argument("--gallery-sizes", type=lambda v: [int(x) for x in v.split(",")], default=list(FRTE_SIZES),
                        help="with --frte: comma-separated gallery sizes")
    parser.add_argument("--distractors", choices=("gaussian", "clustered"), default="gaussian",
                        help="with --frte: synthetic distractors fitted to LFW's embeddings, or index.synthetic's")
    args = parser.parse_args()

    from facelake.evaluation.measure import evaluate_embeddings
    from facelake.evaluation.metrics import tar_at_far
    from facelake.evaluation.protocols import best_threshold, read_pairs
    from facelake.evaluation.report import public_metrics, write_report
    from facelake.faces.registry import get_model

    spec = get_model(args.model)
    started = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="facelake-bench-eval-") as tmp:
        manifest_uri = lfw_manifest(args.lfw, tmp)
        emb, cached = embed_cached(manifest_uri, args.cache, args.embedder, args.model, os.path.join(tmp, "out"),
                                   args.face)
    if args.frte:
        run_frte(args, emb, spec)
        return
    pairs = read_pairs(str(args.lfw / "pairs.txt"))
    measure_start = time.monotonic()
    metrics, calibration = evaluate_embeddings(emb, model=spec.name, dataset="lfw", pairs=pairs,
                                               max_impostor_pairs=args.max_impostor_pairs, face=args.face)
    measure_seconds = time.monotonic() - measure_start
    calibration.notes += ("; LFW deep-funneled, 13,233 photos. Pairs share photos (each photo is in thousands of "
                          "impostor pairs), so the binomial bound is optimistic; LFW also holds a few mislabeled "
                          "photos, which inflate the impostor tail (conservative)")
    name = result_name(spec.name, args.face)
    report_dir = args.results / name
    write_report(metrics, calibration, str(report_dir))
    shipped = REPO / "facelake" / "data" / f"calibration-{spec.name}-lfw.json"
    if not args.no_ship:
        calibration.save(str(shipped))

    result = {
        "model": spec.name, "dataset": "lfw (deep-funneled, pairs.txt View 2)", "face": args.face,
        "facelake": {
            "accuracy_10fold": metrics["pairs_protocol"]["accuracy"],
            "accuracy_10fold_std": metrics["pairs_protocol"]["accuracy_std"],
            "accuracy_10fold_excluding_failed": metrics["pairs_protocol"]["accuracy_excluding_failed"],
            "pairs_with_failed_photo": metrics["pairs_protocol"]["pairs_with_failed_photo"],
            "tar_at_far_pairs_file": metrics["pairs_protocol"]["tar_at_far"],
            "tar_at_far_all_pairs": metrics["verification"]["tar_at_far"],
            "genuine_pairs": metrics["verification"]["genuine_pairs"],
            "impostor_pairs": metrics["verification"]["impostor_pairs"],
            "photos": metrics["photos"], "identification": metrics["identification"],
            "embed_seconds": emb.embed_seconds, "embeddings_cached": cached,
            "photos_per_second": round(len(emb.image_ids) / emb.embed_seconds, 2) if emb.embed_seconds else None,
            "measure_seconds": round(measure_seconds, 1),
        },
        "calibration": {"path": str(shipped.relative_to(REPO)), "rows": len(calibration.thresholds),
                        "bytes": shipped.stat().st_size if shipped.exists() else None,
                        "min_certified_fmr": calibration.min_certified_fmr,
                        "thresholds_by_fmr": calibration.table()},
        "deepface_published_lfw": spec.deepface_published_lfw,
    }
    if args.deepface_folds:
        df = deepface_pairs(args.lfw, pairs[0], pairs[1], args.deepface_folds)
        # facelake on exactly the same folds, same protocol
        keep = pairs[1] < args.deepface_folds
        position = {image_id: i for i, image_id in enumerate(emb.image_ids)}
        ia = np.array([position[p[0]] for p in pairs[0]])[keep]
        ib = np.array([position[p[1]] for p in pairs[0]])[keep]
        same = np.array([p[2] for p in pairs[0]])[keep]
        fold = pairs[1][keep]
        ok = emb.ok[ia] & emb.ok[ib]
        s = np.full(len(ia), np.nan)
        s[ok] = np.einsum("ij,ij->i", emb.embeddings[ia[ok]], emb.embeddings[ib[ok]])
        accs = []
        for k in range(args.deepface_folds):
            train, test = (fold != k) & ok, fold == k
            t = best_threshold(s[train], same[train])
            accs.append(float((ok[test] & ((s[test] >= t) == same[test])).sum() / test.sum()))
        result["deepface_plain"] = public_metrics(df)
        result["facelake_same_folds"] = {"folds": args.deepface_folds, "accuracy": float(np.mean(accs)),
                                         "tar_at_far": tar_at_far(s[ok & same], s[ok & ~same], (1e-2, 1e-3)),
                                         "default_threshold_fmr_note": "n/a (facelake chooses thresholds from the calibration)"}
        del pp
    result["seconds_total"] = round(time.monotonic() - started, 1)
    args.results.mkdir(parents=True, exist_ok=True)
    (args.results / f"{name}.json").write_text(json.dumps(public_metrics(result), indent=2) + "\n")
    print(json.dumps(public_metrics(result), indent=2))

    f = result["facelake"]
    tar_all = {r["far"]: r["tar"] for r in f["tar_at_far_all_pairs"]}
    tar_pf = {r["far"]: r["tar"] for r in f["tar_at_far_pairs_file"]}
    print(f"\n{'':34s}{'accuracy':>10s}{'TAR@1e-3 pairs':>16s}{'TAR@1e-3 all':>14s}{'photos/s':>10s}")
    print(f"{'facelake ' + spec.name + ' (10 folds)':34s}{100 * f['accuracy_10fold']:9.2f}%"
          f"{100 * (tar_pf.get(1e-3) or float('nan')):15.2f}%{100 * (tar_all.get(1e-3) or float('nan')):13.2f}%"
          f"{f['photos_per_second'] or float('nan'):10.1f}")
    if "deepface_plain" in result:
        df, fs = result["deepface_plain"], result["facelake_same_folds"]
        tar_df = {r["far"]: r["tar"] for r in df["tar_at_far"]}
        tar_fs = {r["far"]: r["tar"] for r in fs["tar_at_far"]}
        print(f"{'facelake (first %d folds)' % df['folds']:34s}{100 * fs['accuracy']:9.2f}%"
              f"{100 * (tar_fs.get(1e-3) or float('nan')):15.2f}%{'':>14s}")
        print(f"{'plain deepface (first %d folds)' % df['folds']:34s}{100 * df['accuracy']:9.2f}%"
              f"{100 * (tar_df.get(1e-3) or float('nan')):15.2f}%{'':>14s}{df['photos_per_second']:10.1f}")
        print(f"plain deepface's default SFace threshold (similarity {df['default_threshold_similarity']:.3f}) accepts "
              f"{100 * df['default_threshold_fmr']:.2f}% of impostor pairs")
    print(f"deepface's published LFW accuracy for SFace: {100 * spec.deepface_published_lfw:.1f}%")
    print(f"time: embed {f['embed_seconds']:.0f} s ({'cached' if f['embeddings_cached'] else 'measured now'}), "
          f"measure {f['measure_seconds']:.0f} s, total {result['seconds_total']:.0f} s")


if __name__ == "__main__":
    main()
