"""facelake evaluate on the bundled sample photos: real detection and embedding through the embed
job on a small real Ray, metrics that hang together, the report files, and refusals."""

from __future__ import annotations

import csv
import itertools
import json
import os
import random

import pyarrow as pa
import pytest

from facelake.faces import manifest as manifest_mod
from facelake.calibration import Calibration
from facelake.errors import ManifestError
from facelake.evaluation.embeddings import read_labeled_manifest
from facelake.evaluation.measure import evaluate_embeddings
from facelake.evaluation.protocols import read_pairs
from facelake.jobs.evaluate import EvaluateConfig, evaluate

IMAGE_SIZES = (8, 8, 7, 6, 5, 5, 5, 4, 4, 3, 2, 2, 2)  # photos per identity (samples/faces README)


def _labeled_manifest(sample_dir, folder) -> tuple[str, list[tuple[str, str]]]:
    """Sample photos with identities; image_id = '<identity>_<k>' so an LFW-style pairs file fits."""
    rows = list(csv.DictReader(open(sample_dir / "identities_derived.csv")))
    counter: dict[str, int] = {}
    ids, uris, identities, groups = [], [], [], []
    for row in rows:
        ident = row["identity_id"]
        counter[ident] = counter.get(ident, 0) + 1
        ids.append(f"{ident}_{counter[ident]:04d}")
        uris.append(str(sample_dir / row["image"]))
        identities.append(ident)
        groups.append("even" if int(ident[2:]) % 2 == 0 else "odd")
    uri = os.path.join(folder, "labeled.parquet")
    manifest_mod.write(pa.table({"image_id": ids, "uri": uris, "identity": identities, "cohort": groups}), uri)
    return uri, list(zip(ids, identities))


def _pairs_file(photos, path, folds=5, per=4, seed=3) -> str:
    rng = random.Random(seed)
    same = [(a, b) for (a, ia), (b, ib) in itertools.combinations(photos, 2) if ia == ib]
    diff = [(a, b) for (a, ia), (b, ib) in itertools.combinations(photos, 2) if ia != ib]
    same, diff = rng.sample(same, folds * per), rng.sample(diff, folds * per)
    lines = [f"{folds}\t{per}"]
    for k in range(folds):
        for a, b in same[k * per:(k + 1) * per]:
            name, i = a.rsplit("_", 1)
            lines.append(f"{name}\t{int(i)}\t{int(b.rsplit('_', 1)[1])}")
        for a, b in diff[k * per:(k + 1) * per]:
            (n1, i1), (n2, i2) = a.rsplit("_", 1), b.rsplit("_", 1)
            lines.append(f"{n1}\t{int(i1)}\t{n2}\t{int(i2)}")
    path.write_text("\n".join(lines) + "\n")
    return str(path)


@pytest.fixture(scope="module")
def sample_run(tmp_path_factory, provisioned_weights, ray_local):
    from tests.helpers import SAMPLE_DIR

    folder = tmp_path_factory.mktemp("evaluate")
    uri, photos = _labeled_manifest(SAMPLE_DIR, str(folder))
    pairs = _pairs_file(photos, folder / "pairs.txt")
    out = str(folder / "report")
    # workers=1: on a 2-CPU Ray the read tasks need a CPU the model actors leave free
    result = evaluate(EvaluateConfig(manifest=uri, out=out, pairs=pairs, group_by="cohort", workers=1))
    return result, out, uri, photos


def test_report_files_written(sample_run):
    result, out, _, _ = sample_run
    for name in ("report.md", "metrics.json", "calibration.json", "roc.png", "det.png", "scores.png"):
        assert os.path.getsize(os.path.join(out, name)) > 100, name
    metrics = json.load(open(os.path.join(out, "metrics.json")))
    assert metrics["photos"] == {"labeled": 61, "embedded": 61, "failed": 0, "failed_by_type": {},
                                 "unlabeled_skipped": 0, "identities": 13}
    report = open(os.path.join(out, "report.md")).read()
    assert "![roc.png](roc.png)" in report and "## By group" in report and "Pairs file" in report
    cal = Calibration.load(os.path.join(out, "calibration.json"))
    cal.check_model()
    assert cal.n_genuine == 140 and cal.n_impostor == 1690


def test_verification_numbers_hang_together(sample_run):
    m = sample_run[0].metrics
    ver = m["verification"]
    # all genuine pairs of 13 identities and every impostor pair of 61 photos
    assert ver["genuine_pairs"] == sum(n * (n - 1) // 2 for n in IMAGE_SIZES) == 140
    assert ver["impostor_pairs"] == 61 * 60 // 2 - 140 and not ver["impostor_sampled"]
    assert ver["genuine_mean"] > ver["impostor_mean"] + 0.3
    rows = ver["tar_at_far"]
    supported = [r for r in rows if r["tar"] is not None]
    assert [r["far"] for r in supported] == [1e-1, 1e-2, 1e-3]          # 1,690 impostors
    assert all("insufficient impostors" in r["note"] for r in rows if r["tar"] is None)
    tars = [r["tar"] for r in supported]
    assert tars == sorted(tars, reverse=True)                               # TAR falls as FAR falls
    thresholds = [r["threshold"] for r in supported]
    assert thresholds == sorted(thresholds)
    assert supported[0]["tar"] >= 0.95


def test_pairs_protocol(sample_run):
    pp = sample_run[0].metrics["pairs_protocol"]
    assert pp["pairs"] == 40 and pp["folds"] == 5 and pp["pairs_with_failed_photo"] == 0
    assert pp["accuracy"] >= 0.9 and len(pp["fold_accuracy"]) == 5


def test_identification_and_gallery_thresholds(sample_run):
    result = sample_run[0]
    idn = result.metrics["identification"]
    assert idn["gallery_size"] + idn["held_out_identities"] == 13
    assert idn["rank1"] >= 0.75 and idn["rank10"] >= idn["rank1"]
    cal = result.calibration
    thresholds = [cal.threshold_for_fpir(0.5, n) for n in (1, 2, 5, 20)]
    assert thresholds == sorted(thresholds) and thresholds[-1] > thresholds[0]  # tighter for larger galleries


def test_group_rates_side_by_side(sample_run):
    bg = sample_run[0].metrics["by_group"]
    groups = {g["group"]: g for g in bg["groups"]}
    assert set(groups) == {"even", "odd"}
    assert sum(g["identities"] for g in groups.values()) == 13
    for g in groups.values():
        assert 0.0 <= g["fmr"] <= g["fmr_upper95"] <= 1 and 0.0 <= g["fnmr"] <= 1
    report = open(os.path.join(sample_run[1], "report.md")).read()
    assert "| even |" in report and "| odd |" in report


def test_local_embedder_matches_the_embed_job(sample_run, tmp_path):
    result, _, uri, _ = sample_run
    from facelake.jobs.evaluate import embed_labeled

    config = EvaluateConfig(manifest=uri, out=str(tmp_path), embedder="local")
    local = embed_labeled(config, read_labeled_manifest(uri))
    metrics, _ = evaluate_embeddings(local, dataset="sample")
    assert metrics["verification"]["genuine_pairs"] == 140
    assert metrics["verification"]["genuine_mean"] == pytest.approx(
        result.metrics["verification"]["genuine_mean"], abs=1e-4)


def test_manifest_without_identity_refused(tmp_path, sample_dir):
    uri = str(tmp_path / "unlabeled.parquet")
    manifest_mod.write(pa.table({"image_id": ["a"], "uri": [str(sample_dir / "img1.jpg")]}), uri)
    with pytest.raises(ManifestError, match="no 'identity' column"):
        evaluate(EvaluateConfig(manifest=uri, out=str(tmp_path / "r")))
    from facelake.jobs.cli import main

    with pytest.raises(SystemExit) as exit_info:
        main(["evaluate", uri, "--out", str(tmp_path / "r2")])
    assert exit_info.value.code == 2
    assert not (tmp_path / "r").exists() and not (tmp_path / "r2").exists()


def test_group_column_and_pairs_file_checked_first(tmp_path, sample_dir):
    uri, _ = _labeled_manifest(sample_dir, str(tmp_path))
    with pytest.raises(ManifestError, match="--group-by column 'age'"):
        evaluate(EvaluateConfig(manifest=uri, out=str(tmp_path / "r"), group_by="age"))
    bad = tmp_path / "pairs.txt"
    bad.write_text("2\t1\nA\t1\t2\n")
    from facelake.errors import ConfigError

    with pytest.raises(ConfigError, match="declares 2 folds"):
        read_pairs(str(bad))
    assert not (tmp_path / "r").exists()
