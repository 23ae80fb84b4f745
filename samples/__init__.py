"""The bundled sample archive (64 photos, MIT; provenance in README.md), installed inside facelake
as the ``facelake.samples`` package (pyproject.toml maps this folder there and ships its files as
package data), so `facelake demo` and the review notebooks find it from a wheel as from a checkout.
Tested by tests/test_packaging.py (a wheel is built and the sample found in it)."""

from pathlib import Path

FOLDER = Path(__file__).resolve().parent
MANIFEST = FOLDER / "manifest.parquet"   # image_id, uri (relative to FOLDER), identity, source
