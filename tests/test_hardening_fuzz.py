"""Fuzz (hypothesis): manifest validation over generated tables and the image decoder over random
and mutated real bytes. Only facelake's own errors may come out, and nothing hangs."""

from __future__ import annotations

import io
import tempfile
import time

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

from facelake.faces import manifest
from facelake.errors import ConfigError, ManifestError
from facelake.faces.imaging import DecodeError, decode_bgr
from tests.helpers import SAMPLE_DIR

FUZZ = settings(max_examples=120, deadline=None, derandomize=True,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])

# ---------------------------------------------------------------------- manifests

NAMES = ["image_id", "uri", "identity", "embedding", "stage", "model", "x", ""]
TYPES = {
    "string": (pa.string(), st.text(max_size=6)),
    "large_string": (pa.large_string(), st.text(max_size=6)),
    "int": (pa.int64(), st.integers(-3, 3)),
    "binary": (pa.binary(), st.binary(max_size=4)),
    "float": (pa.float64(), st.floats(allow_nan=True)),
    "bool": (pa.bool_(), st.booleans()),
    "null": (pa.null(), st.none()),
    "list": (pa.list_(pa.int32()), st.lists(st.integers(0, 5), max_size=2)),
}


@st.composite
def tables(draw) -> list[pa.Table]:
    """One to three Parquet files' tables: random columns, types, nulls and duplicates."""
    names = draw(st.sampled_from([[], ["image_id"], ["image_id", "uri"], ["uri", "image_id"]]))
    names = names + draw(st.lists(st.sampled_from(NAMES), max_size=3))
    rows = draw(st.integers(0, 6))
    out = []
    for _ in range(draw(st.integers(1, 3))):
        fields, arrays = [], []
        for name in names:
            arrow_type, values = TYPES[draw(st.sampled_from(sorted(TYPES)))]
            if name in ("image_id", "uri") and draw(st.booleans()):
                arrow_type, values = TYPES["string"]  # mostly-valid tables reach the later checks
            data = draw(st.lists(st.one_of(st.none(), values) if draw(st.booleans()) else values,
                                 min_size=rows, max_size=rows))
            fields.append(pa.field(name, arrow_type))
            arrays.append(pa.array(data, arrow_type))
        out.append(pa.Table.from_arrays(arrays, schema=pa.schema(fields)))
    return out


@FUZZ
@given(tables())
def test_manifest_validation_only_raises_its_own_errors(parts):
    with tempfile.TemporaryDirectory() as folder:
        for i, table in enumerate(parts):
            pq.write_table(table, f"{folder}/part-{i}.parquet")
        try:
            info = manifest.validate(folder)
        except (ManifestError, ConfigError):
            return
        assert info.rows > 0 and info.rows == sum(t.num_rows for t in parts)
        ids = [v for t in parts for v in t["image_id"].to_pylist()]
        assert len(set(ids)) == len(ids) and all(isinstance(v, str) and v for v in ids)
        assert all(isinstance(v, str) for t in parts for v in t["uri"].to_pylist())


@pytest.mark.parametrize("uri_type,values", [
    (pa.int64(), [1, 2]), (pa.binary(), [b"a.jpg", b"b.jpg"]), (pa.float64(), [1.0, 2.0]),
    (pa.list_(pa.string()), [["a"], ["b"]]),
])
def test_non_string_uri_is_a_manifest_error(tmp_path, uri_type, values):
    pq.write_table(pa.table({"image_id": ["a", "b"], "uri": pa.array(values, uri_type)}), tmp_path / "m.parquet")
    with pytest.raises(ManifestError, match="uri"):
        manifest.validate(str(tmp_path / "m.parquet"))


def test_duplicates_found_across_files_and_clashing_hashes_checked_exactly(tmp_path, monkeypatch):
    ids = [f"img-{i:06d}" for i in range(200_000)]
    pq.write_table(pa.table({"image_id": ids[:150_000], "uri": ids[:150_000]}), tmp_path / "a.parquet")
    pq.write_table(pa.table({"image_id": ids[150_000:] + ["img-000007"], "uri": ids[150_000:] + ["x"]}),
                   tmp_path / "b.parquet")
    with pytest.raises(ManifestError, match="unique.*img-000007"):
        manifest.validate(str(tmp_path))
    (tmp_path / "b.parquet").unlink()
    assert manifest.validate(str(tmp_path)).rows == 150_000
    # every id hashing alike must not be mistaken for duplicates: the second pass is exact
    monkeypatch.setattr(manifest, "hash", lambda value: 7, raising=False)
    pq.write_table(pa.table({"image_id": ids[:1000], "uri": ids[:1000]}), tmp_path / "a.parquet")
    assert manifest.validate(str(tmp_path)).rows == 1000
    pq.write_table(pa.table({"image_id": ids[:1000] + ["img-000999"], "uri": ids[:1000] + ["y"]}),
                   tmp_path / "a.parquet")
    with pytest.raises(ManifestError, match="1 duplicated"):
        manifest.validate(str(tmp_path))


def test_fingerprint_is_sha256_of_ids_then_uris(tmp_path):
    import hashlib
    pq.write_table(pa.table({"image_id": ["a", "b"], "uri": ["u1", "u2"]}), tmp_path / "m.parquet")
    assert manifest.validate(str(tmp_path)).fingerprint == hashlib.sha256(b"a\0b\0u1\0u2\0").hexdigest()


def test_not_parquet_is_a_manifest_error(tmp_path):
    (tmp_path / "m.parquet").write_bytes(b"PAR1 not really")
    with pytest.raises(ManifestError):
        manifest.validate(str(tmp_path / "m.parquet"))


# ---------------------------------------------------------------------- the decoder

def _seeds() -> list[bytes]:
    """Small real images in every photo format the decoder opens."""
    base = Image.open(SAMPLE_DIR / "img1.jpg").convert("RGB").resize((48, 64))
    seeds = []
    for fmt, mode in (("JPEG", "RGB"), ("PNG", "RGBA"), ("PNG", "P"), ("GIF", "P"), ("WEBP", "RGB"),
                      ("TIFF", "RGB"), ("BMP", "RGB"), ("JPEG", "L")):
        out = io.BytesIO()
        base.convert(mode).save(out, format=fmt)
        seeds.append(out.getvalue())
    return seeds


SEEDS = _seeds()


def _decode_only_decode_errors(data: bytes) -> None:
    started = time.perf_counter()
    try:
        image = decode_bgr(data, max_pixels=4_000_000)
    except DecodeError:
        pass
    else:
        assert image.ndim == 3 and image.shape[2] == 3 and image.dtype.name == "uint8"
    assert time.perf_counter() - started < 5.0, "decoding one small object took over 5 s"


@FUZZ
@given(st.binary(max_size=2048))
def test_decoder_on_random_bytes(data):
    _decode_only_decode_errors(data)


@st.composite
def mutated(draw) -> bytes:
    data = bytearray(draw(st.sampled_from(SEEDS)))
    for _ in range(draw(st.integers(1, 8))):
        op = draw(st.sampled_from(["flip", "set", "cut", "insert", "header"]))
        at = draw(st.integers(0, max(0, len(data) - 1)))
        if op == "flip" and data:
            data[at] ^= 1 << draw(st.integers(0, 7))
        elif op == "set" and data:
            data[at] = draw(st.integers(0, 255))
        elif op == "cut":
            data = data[:at]
        elif op == "insert":
            data[at:at] = draw(st.binary(min_size=1, max_size=64))
        elif op == "header" and len(data) > 32:  # header fields: sizes, counts, offsets
            spot = draw(st.integers(0, min(len(data), 400) - 4))
            data[spot:spot + 4] = draw(st.sampled_from([b"\xff\xff\xff\xff", b"\x00\x00\x00\x00",
                                                        b"\x7f\xff\xff\xff", b"\x00\x01\x00\x00"]))
    return bytes(data)


@FUZZ
@given(mutated())
def test_decoder_on_mutated_real_images(data):
    _decode_only_decode_errors(data)
