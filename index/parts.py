"""The faces table as an index build reads it: part files, their rows, and shards cut from them.

The driver reads only the Parquet footers of the part files (``list_parts``: row counts and
schemas). A shard is a list of pieces, (part number, part-local row range, faiss id of the
first row), which its task reads itself (``read_rows``: only the row groups holding them).
Faces get faiss ids in input order: part files sorted by name, rows in file order (an image's
faces are in one part). The manifest records each shard's pieces as ``sources`` (part file
name, row range, first faiss id), so ``facelake.index.update`` can keep a shard whose parts did
not change.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import faiss
import numpy as np
import pyarrow as pa
import ray

from facelake import storage
from facelake.errors import ConfigError
from facelake.storage import StorageOptions

# One shard per million faces by default: 512 MB (128-d IVF-Flat) or ~50 MB (PQ) per search
# actor, and enough shards to spread search over a cluster at archive scale.
DEFAULT_SHARD_SIZE = 1_000_000
FACE_INPUT_COLUMNS = ("image_id", "face_index", "bbox", "embedding")
FacesInput = pa.Table | str | list
Piece = tuple[int, int, int, int]       # (part number, part-local start, stop, faiss id of the first row)


@dataclass(frozen=True)
class Part:
    """One input file of the faces table (or an in-memory table in the object store)."""

    uri: str | None
    rows: int
    first_row: int                      # global row number (= faiss id in a full build) of its first row
    ref: object = None                  # ray.ObjectRef of an in-memory table

    @property
    def name(self) -> str | None:
        """The file name: what a shard's ``sources`` name (parts of record are immutable)."""
        return None if self.uri is None else self.uri.rstrip("/").rsplit("/", 1)[-1]


def list_parts(faces: FacesInput, options: StorageOptions | None) -> tuple[list[Part], pa.Schema]:
    """The faces table's parts with row counts, and their unified schema (footers only)."""
    if isinstance(faces, pa.Table):
        return [Part(uri=None, rows=faces.num_rows, first_row=0, ref=ray.put(faces))], faces.schema
    uris = faces if isinstance(faces, list) else storage.list_files(faces, ".parquet", options)
    if not uris:
        raise ConfigError(f"no faces table at {storage.redact(str(faces))}: run `facelake embed` first or "
                          f"pass the folder it wrote")
    parts, schemas, first = [], [], 0
    for uri in sorted(uris) if not isinstance(faces, list) else uris:
        with storage.open_parquet(uri, options) as meta:
            rows, schema = meta.metadata.num_rows, meta.schema_arrow
        parts.append(Part(uri=uri, rows=rows, first_row=first))
        schemas.append(schema)
        first += rows
    return parts, pa.unify_schemas(schemas, promote_options="permissive")


def parts_of_record(uris: list[str], rows: list[int]) -> list[Part]:
    """Parts whose row counts are known (a table version's record): no footer is read."""
    first = np.concatenate([[0], np.cumsum(rows)[:-1]]).astype(int)
    return [Part(uri=u, rows=int(n), first_row=int(f)) for u, n, f in zip(uris, rows, first)]


def check_schema(schema: pa.Schema) -> int:
    """The embedding dimension, after checking the faces table has what an index needs."""
    missing = [c for c in FACE_INPUT_COLUMNS if c not in schema.names]
    if missing:
        raise ConfigError(f"faces table lacks column(s) {missing}: pass the table `facelake embed` "
                          f"wrote (schema facelake.schema.faces_schema)")
    if not pa.types.is_fixed_size_list(schema.field("embedding").type):
        raise ConfigError("faces.embedding must be a fixed_size_list<float32>: pass the table "
                          "`facelake embed` wrote")
    return schema.field("embedding").type.list_size


def read_rows(part: Part, start: int, stop: int, columns: list[str] | None,
              options: StorageOptions | None) -> pa.Table:
    """Rows [start, stop) (part-local) of one part, reading only the row groups that hold them."""
    if part.ref is not None:
        table = ray.get(part.ref)
        return table.slice(start, stop - start).select([c for c in columns or table.column_names
                                                        if c in table.column_names])
    with storage.open_parquet(part.uri, options) as reader:
        groups, first, offset = [], None, 0
        for g in range(reader.metadata.num_row_groups):
            n = reader.metadata.row_group(g).num_rows
            if offset + n > start and offset < stop:
                groups.append(g)
                first = offset if first is None else first
            offset += n
        wanted = [c for c in (columns or reader.schema_arrow.names) if c in reader.schema_arrow.names]
        table = reader.read_row_groups(groups, columns=wanted) if groups else reader.schema_arrow.empty_table()
    return table.slice(start - (first or 0), stop - start)


def embeddings(faces: pa.Table) -> np.ndarray:
    """(n, dim) float32 L2-normalised vectors of a faces table (renormalised defensively)."""
    dim = faces.schema.field("embedding").type.list_size
    values = faces.column("embedding").combine_chunks().flatten()
    xb = np.ascontiguousarray(values.to_numpy(zero_copy_only=False), dtype=np.float32).reshape(-1, dim)
    if not np.isfinite(xb).all():
        bad = int((~np.isfinite(xb).all(axis=1)).argmax())
        raise ConfigError(f"face {faces.column('image_id')[bad]} has a non-finite embedding: re-embed it")
    faiss.normalize_L2(xb)
    return xb


def read_faces(faces: pa.Table | str, options: StorageOptions | None = None) -> pa.Table:
    """The whole faces table, checked (small tables, tests and notebooks; jobs never call it)."""
    if isinstance(faces, str):
        try:
            faces = storage.read_table(faces, columns=None, options=options)
        except FileNotFoundError as err:
            raise ConfigError(f"no faces table at {storage.redact(faces)}: run `facelake embed` "
                              f"first or pass the folder it wrote") from err
    check_schema(faces.schema)
    return faces


def shard_bounds(n: int, shards: int | None, shard_size: int | None) -> list[tuple[int, int]]:
    """Contiguous [start, stop) row ranges, as even as possible."""
    if shards is not None and shard_size is not None:
        raise ConfigError("give --shards or --shard-size, not both")
    if shards is not None and not 1 <= shards <= n:
        raise ConfigError(f"--shards must be within 1..{n} (the number of faces), got {shards}")
    if shard_size is not None and shard_size < 1:
        raise ConfigError(f"--shard-size must be positive, got {shard_size}")
    count = shards or math.ceil(n / (shard_size or DEFAULT_SHARD_SIZE))
    edges = np.linspace(0, n, count + 1).round().astype(int)
    return [(int(a), int(b)) for a, b in zip(edges[:-1], edges[1:])]


def pieces(parts: list[Part], start: int, stop: int) -> list[Piece]:
    """The pieces covering global rows [start, stop); in a full build a row's faiss id is its
    global row number."""
    out = []
    for number, part in enumerate(parts):
        lo, hi = max(start, part.first_row), min(stop, part.first_row + part.rows)
        if lo < hi:
            out.append((number, lo - part.first_row, hi - part.first_row, lo))
    return out


def sources(parts: list[Part], shard_pieces: list[Piece]) -> list[dict]:
    """A shard's pieces as the manifest records them: part file name, row range, first faiss id.
    ``facelake.index.update`` reuses a shard whose parts are all still in the table of record."""
    return [{"part": parts[number].name, "part_rows": parts[number].rows, "start": start, "stop": stop,
             "first_id": first} for number, start, stop, first in shard_pieces]
