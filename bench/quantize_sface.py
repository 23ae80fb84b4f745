"""bench/quantize_sface: make facelake/data/sface-int8-recipe.json, the int8 SFace recipe.

    pip install -e '.[quantize]'     # nncf==3.4.0, needed only by this script
    python bench/quantize_sface.py [--check]

1. Cuts calibration faces disjoint from every evaluation set: the 400 ORL photos
   (../shared/faces/orl_faces) and the bundled sample, detected and aligned exactly as the embed
   job does (YuNet, 5-point alignment, the largest face). LFW is never used.
2. Runs NNCF post-training quantization (ONNX backend, preset "performance": symmetric int8
   weights per output channel and activations; MinMax statistics over every calibration face,
   fast bias correction) on the provisioned float SFace graph (facelake.faces.onnx_rewrite.fix_sface
   with its constant weight reshapes folded).
3. Keeps only the scales NNCF chose, per quantized node input, in the recipe JSON. Provisioning
   (facelake.faces.onnx_rewrite.sface_int8) rebuilds the int8 graph from the checksum-verified float
   weights and that recipe with numpy and onnx alone, so NNCF is not a run-time dependency.

--check rebuilds the graph from the recipe and compares its outputs with NNCF's own graph on
the calibration faces (they must agree to float rounding). A new recipe changes the int8 file's
sha256: register it in facelake/faces/registry.py and re-run bench/eval.py --model sface-int8-yunet,
which writes that model's calibration.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
ORL = REPO.parent / "shared" / "faces" / "orl_faces"
SAMPLE = REPO / "samples" / "faces"
RECIPE = REPO / "facelake" / "data" / "sface-int8-recipe.json"


def calibration_faces() -> np.ndarray:
    """Aligned 112x112 BGR faces of ORL and the sample (largest face per photo), in name order."""
    import cv2

    from facelake.faces.models import FaceEngine

    paths = sorted(ORL.glob("s*/*.pgm"), key=str) + sorted(SAMPLE.glob("*.jpg"))
    if not any(p.suffix == ".pgm" for p in paths):
        sys.exit(f"no ORL photos under {ORL}: the recipe is calibrated on ORL + the sample")
    engine = FaceEngine(threads=1, recognizer=False)
    faces = []
    for path in paths:
        image = cv2.imread(str(path), cv2.IMREAD_COLOR)
        found = engine.detect(image) if image is not None else []
        if found:
            faces.append(engine.align(image, found[0].landmarks))
    return np.stack(faces)


def blob(faces: np.ndarray) -> np.ndarray:
    """SFace's input as facelake.faces.models.FaceEmbedder feeds it: RGB, channels first, 0..255."""
    return np.ascontiguousarray(faces[..., ::-1].transpose(0, 3, 1, 2), dtype=np.float32)


def float_graph():
    """The provisioned float SFace graph with its constant weight reshapes folded."""
    import onnx

    from facelake.faces.onnx_rewrite import _fold_constant_reshapes
    from facelake.faces.registry import SFACE_INT8_FOLDED, get_model
    from facelake.faces.weights import provision

    path = provision(get_model("sface-yunet"))[SFACE_INT8_FOLDED.file_name]
    model = onnx.load(str(path))
    _fold_constant_reshapes(model.graph)
    return model


def nncf_quantize(model, inputs: np.ndarray):
    import nncf

    name = model.graph.input[0].name
    dataset = nncf.Dataset([inputs[i:i + 1] for i in range(len(inputs))], lambda x: {name: x})
    return nncf.quantize(model, dataset, preset=nncf.QuantizationPreset.PERFORMANCE,
                         subset_size=len(inputs), fast_bias_correction=True)


def extract_recipe(quantized, float_model) -> dict:
    """The scales of NNCF's QuantizeLinear/DequantizeLinear pairs, keyed by the inputs they feed."""
    from onnx import numpy_helper

    from facelake.faces.onnx_rewrite import quantize_weight

    graph = quantized.graph
    inits = {i.name: numpy_helper.to_array(i) for i in graph.initializer}
    float_inits = {i.name: numpy_helper.to_array(i) for i in float_model.graph.initializer}
    float_nodes = {n.name: n for n in float_model.graph.node}
    consumers: dict[str, list[tuple[str, int]]] = {}
    for node in graph.node:
        for position, name in enumerate(node.input):
            consumers.setdefault(name, []).append((node.name, position))
    producer_of = {out: node for node in graph.node for out in node.output}

    def axis(node) -> int | None:
        return next((a.i for a in node.attribute if a.name == "axis"), None)

    weights, activations = [], []
    for node in graph.node:
        if node.op_type != "DequantizeLinear":
            continue
        scale = inits[node.input[1]]
        used = consumers.get(node.output[0], [])
        if node.input[0] in inits:  # a quantized weight
            (consumer, position), = used
            source = float_inits[float_nodes[consumer].input[position]]
            if not np.array_equal(quantize_weight(source, scale.tolist(), axis(node)), inits[node.input[0]]):
                sys.exit(f"rounding of {consumer}'s weights differs from NNCF's: update quantize_weight")
            weights.append({"consumer": consumer, "input": position, "axis": axis(node), "scale": scale.tolist()})
        else:
            quantize = producer_of[node.input[0]]
            zero = inits[quantize.input[2]]
            activations.append({"tensor": quantize.input[0], "consumers": [list(c) for c in used],
                                "axis": axis(quantize), "dtype": str(zero.dtype),
                                "scale": scale.tolist(), "zero_point": zero.tolist()})
    return {"made_by": "bench/quantize_sface.py", "nncf_preset": "performance",
            "calibration": "ORL 400 photos + facelake sample, largest face, YuNet + 5-point alignment; no LFW",
            "weights": weights, "activations": activations}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--check", action="store_true", help="compare the recipe's graph with NNCF's")
    args = parser.parse_args()
    os.environ.setdefault("DEEPFACE_HOME", str(REPO / ".deepface-home"))
    os.environ.setdefault("DEEPFACE_BACKEND_ENGINE", "onnx")
    import nncf
    import onnxruntime as ort

    from facelake.faces.onnx_rewrite import apply_int8_recipe

    inputs = blob(calibration_faces())
    print(f"{len(inputs)} calibration faces; NNCF {nncf.__version__}", file=sys.stderr)
    float_model = float_graph()
    quantized = nncf_quantize(float_model, inputs)
    recipe = extract_recipe(quantized, float_model)
    recipe["calibration_faces"] = len(inputs)
    recipe["nncf"] = nncf.__version__
    RECIPE.write_text(json.dumps(recipe, indent=1) + "\n")
    print(f"wrote {RECIPE.relative_to(REPO)}: {len(recipe['weights'])} weights, "
          f"{len(recipe['activations'])} activations", file=sys.stderr)
    if args.check:
        rebuilt = apply_int8_recipe(float_graph(), json.loads(RECIPE.read_text()))
        options = ort.SessionOptions()
        ours = ort.InferenceSession(rebuilt.SerializeToString(), options, providers=["CPUExecutionProvider"])
        theirs = ort.InferenceSession(quantized.SerializeToString(), options, providers=["CPUExecutionProvider"])
        name = rebuilt.graph.input[0].name
        a = ours.run(None, {name: inputs[:64]})[0]
        b = theirs.run(None, {name: inputs[:64]})[0]
        print(f"recipe graph vs NNCF graph: max abs difference {np.abs(a - b).max():.2e}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
