"""Rebuild samples/manifest.parquet from samples/faces/ and its identities_derived.csv.

uri values are relative to the manifest's folder (facelake resolves them against it), so the
bundled sample works from any clone. Run: python samples/make_manifest.py
"""

import csv
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

HERE = Path(__file__).resolve().parent


def build() -> pa.Table:
    identity = {row["image"]: row["identity_id"] for row in csv.DictReader(open(HERE / "faces" / "identities_derived.csv"))}
    photos = sorted(p.name for p in (HERE / "faces").iterdir() if p.suffix == ".jpg")
    return pa.table({
        "image_id": [p.rsplit(".", 1)[0] for p in photos],
        "uri": [f"faces/{p}" for p in photos],
        "identity": [identity.get(p) for p in photos],
        "source": ["deepface tests/unit/dataset"] * len(photos),
    })


if __name__ == "__main__":
    table = build()
    pq.write_table(table, HERE / "manifest.parquet")
    print(f"wrote {table.num_rows} rows to {HERE / 'manifest.parquet'}")
