"""Index parameters: chosen from the collection size, validated before any work starts.

Defaults (measured on ``facelake.index.synthetic.clustered`` data, see tests/test_index.py and
bench/results/index.json):

- nlist ~ 4*sqrt(N) rounded to a power of two, at most N/39 (faiss wants >= 39 training points
  per list) and at most 65536; 1 for tiny collections (then IVF is exact).
- nprobe = max(16, nlist/64), capped at nlist. Recall@10 against exact IndexFlatIP, 500-1000
  probes: nlist 256 (10k): nprobe 8 -> 0.948, 16 -> 0.989; nlist 1024 (100k): 8 -> 0.977,
  16 -> 0.997; nlist 4096 (1M): 16 -> 0.980, 32 -> 0.986, 64 -> 0.991. Larger collections
  need a larger share of lists scanned less than proportionally, hence the nlist/64 term.
- nprobe is then tuned at build time: the smallest power of two whose recall@10 against exact
  search reaches TARGET_RECALL on TUNING_QUERIES new-photo stand-ins (index.build.tuning_probes:
  sample faces turned, in a random direction, by TUNING_TURN of the angle to their nearest other
  face of the collection); the curve is recorded in the version manifest. The faces themselves
  were too easy a proxy (recall saturated at nprobe 4-8 while new photos needed 32-64, and
  got easier as the collection grew). Calibrated with synthetic new-photo probes (exact truth,
  1,000-2,000 probes; "needs" = recall@10 >= 0.98):
  20k x 64-d: stand-ins 0.987 at 32, 0.995 at 64 -> 64, probes 0.993 (needs 32);
  100k: 0.983 at 8, 0.998 at 16 -> 16, probes 0.997 (needs 16);
  1M (PQ + re-rank): 0.989 at 64, 0.993 at 128 -> 128, probes 0.991 (needs 32);
  2M: 0.988 at 64, 0.991 at 128 -> 128, probes 0.990 (needs 64).
  Turning by the whole angle made compressed shards look far worse than they search (0.90 at
  nprobe 64 at 1M: the stand-ins' neighbours are all alike, and PQ cannot order them).
- Compressed shards: from COMPRESS_AT faces, IVF-PQ fast-scan (4-bit sub-quantizers, faiss's
  ``PQ<m>x4fs``: codes scanned with SIMD lookup tables held in registers) with
  PQ_BYTES_PER_128_DIMS-byte codes per 128 dims (at most MAX_PQ_BYTES), plus an exact re-rank of
  the RERANK_FACTOR*k best codes from the full vectors, which stay on disk (memory-mapped);
  IVF-PQ alone gave recall@10 0.81-0.87. Measured side by side in one process at 1M synthetic
  faces (nlist 4096, nprobe 32, 8,192 probes; a loaded machine, so relative only): IVF-Flat 379
  us/probe, SQ8 275, SQfp16 460, PQ64x4fs + re-rank x10 77 at the same recall@10 (0.98),
  RaBitQ fast-scan + re-rank 445 at 0.95. The IVF-Flat scan is bound by memory bandwidth (512
  bytes per scanned face), hence compression from half a million faces on.
- train_size = 64 points per list (faiss's k-means samples at most 256), all points when fewer;
  with PQ at least 64 * 2**bits so every sub-quantizer sees enough residuals.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

from facelake.errors import ConfigError

MIN_POINTS_PER_LIST = 39        # faiss warns below this many training points per centroid
MAX_NLIST = 65536
TRAIN_POINTS_PER_LIST = 64
PQ_NBITS = 4                    # 16 codes per sub-quantizer: faiss's fast-scan (SIMD) layout
PQ_MIN_TRAIN = 64 * (1 << 8)    # as for 8-bit codes: also enough for the coarse k-means
NPROBE_FLOOR = 16
NPROBE_DIVISOR = 64
TARGET_RECALL = 0.99            # tuned nprobe's recall@10 on the stand-ins (goal 0.98 on new photos)
TUNING_TURN = 0.75              # stand-ins turn this share of the angle to their nearest other face
TUNING_QUERIES = 1000           # sample faces searched per nprobe when tuning
COMPRESS_AT = 500_000           # faces from which shards are PQ-compressed by default
PQ_BYTES_PER_128_DIMS = 32
MAX_PQ_BYTES = 64
RERANK_FACTOR = 10              # PQ candidates re-ranked exactly per wanted result
MAX_TUNED_NPROBE = 512          # tuning stops here: beyond it a scan costs more than it finds


@dataclass(frozen=True)
class IndexParams:
    """What to build: IVF-Flat (pq_m None) or IVF-PQ with pq_m sub-quantizers of 8 bits."""

    dim: int
    nlist: int
    pq_m: int | None = None
    metric: Literal["ip"] = "ip"    # inner product of L2-normalised vectors = cosine
    nprobe: int = NPROBE_FLOOR
    train_size: int = 0
    rerank: int = 0                 # 0: none; else re-rank rerank*k PQ candidates exactly

    @property
    def factory(self) -> str:
        """faiss index_factory string for these parameters (recorded in the manifest)."""
        return f"IVF{self.nlist},{'Flat' if self.pq_m is None else f'PQ{self.pq_m}x{PQ_NBITS}fs'}"

    def bytes_per_vector(self) -> int:
        """Resident bytes per vector in a searcher: codes plus its 8-byte id (twice: in the
        inverted list and in the id table's faiss_id column)."""
        return (self.dim * 4 if self.pq_m is None else self.pq_m * PQ_NBITS // 8) + 16


def default_pq(dim: int) -> int:
    """Sub-quantizers of the default compressed shard: 32 bytes per 128 dims, at most 64 bytes
    (fast-scan wants an even number of sub-quantizers that divides the dimension)."""
    per_byte = 8 // PQ_NBITS
    m = max(2, min(MAX_PQ_BYTES, dim * PQ_BYTES_PER_128_DIMS // 128) * per_byte)
    while m > 2 and (dim % m or m % 2):
        m -= 1
    return m


def nprobe_ladder(nlist: int) -> list[int]:
    """Candidate nprobe values tried when tuning: powers of two up to nlist (at most
    MAX_TUNED_NPROBE), and that bound itself."""
    top = min(nlist, MAX_TUNED_NPROBE)
    ladder = [1 << i for i in range(top.bit_length()) if (1 << i) < top]
    return ladder + [top]


def default_nprobe(nlist: int) -> int:
    return max(1, min(nlist, max(NPROBE_FLOOR, nlist // NPROBE_DIVISOR)))


def default_nlist(n: int) -> int:
    target = 2 ** round(math.log2(max(1.0, 4 * math.sqrt(n))))
    bound = max(1, min(MAX_NLIST, n // MIN_POINTS_PER_LIST))
    bound = 2 ** int(math.log2(bound))           # largest power of two within the bound
    return max(1, min(target, bound))


def choose_params(n: int, dim: int, *, nlist: int | None = None, pq: int | None = None,
                  nprobe: int | None = None, rerank: int | None = None) -> IndexParams:
    """Parameters for ``n`` vectors of size ``dim``; None means "decide from n".

    ``pq`` 0 forces IVF-Flat; None compresses from COMPRESS_AT faces. ``rerank`` None re-ranks
    compressed shards by RERANK_FACTOR; 0 turns re-ranking off.
    """
    if pq is None and n >= COMPRESS_AT:
        pq = default_pq(dim)
    pq = pq or None
    if rerank is not None and rerank < 0:
        raise ConfigError(f"--rerank must be 0 (off) or a positive factor, got {rerank}")
    if n < 1:
        raise ConfigError("no faces to index: the faces table is empty (run `facelake embed` first)")
    if dim < 1:
        raise ConfigError(f"embedding dimension must be positive, got {dim}")
    if nlist is not None and not 1 <= nlist <= min(n, MAX_NLIST):
        raise ConfigError(f"--nlist {nlist} is out of range for {n} faces: use 1..{min(n, MAX_NLIST)} "
                          f"(or omit it; the default would be {default_nlist(n)})")
    if pq is not None:
        if pq < 2 or dim % pq or pq % 2:
            divisors = [m for m in (4, 8, 16, 32, 64, 128) if dim % m == 0 and m <= dim]
            raise ConfigError(f"--pq {pq} must be even and divide the embedding dimension {dim}: try one "
                              f"of {divisors}")
        if n < 256:
            raise ConfigError(f"--pq needs at least 256 faces to train its codebooks, "
                              f"got {n}: omit --pq (IVF-Flat) for a collection this small")
    nlist = nlist or default_nlist(n)
    if nprobe is not None and not 1 <= nprobe <= nlist:
        raise ConfigError(f"--nprobe {nprobe} must be within 1..nlist ({nlist})")
    train = min(n, TRAIN_POINTS_PER_LIST * nlist)
    if pq is not None:
        train = min(n, max(train, PQ_MIN_TRAIN))
    rerank = 0 if pq is None else (RERANK_FACTOR if rerank is None else rerank)
    return IndexParams(dim=dim, nlist=nlist, pq_m=pq, nprobe=nprobe or default_nprobe(nlist), train_size=train,
                       rerank=rerank)
