"""What the ONNX fixture scripts share: the exporter's settings, onnxruntime's
reference outputs, and the files an import must refuse.

Used by scripts/onnx-fixtures.py (the ml-onnx crate's tests),
scripts/onnx-import-fixtures.py (the end-to-end import tests) and
bench/onnx.sh. Needs scikit-learn, skl2onnx, onnxruntime and onnx
(scripts/ci-python-deps.sh installs the pinned versions); importing this
module without them exits with status 3, naming the missing package.
"""

import json
import os
import sys

try:
    import numpy as np
    import onnx
    import onnxruntime as ort
    import skl2onnx
    import sklearn
    from onnx import TensorProto, helper
    from skl2onnx import to_onnx
    from sklearn.linear_model import LinearRegression
except ImportError as err:  # pragma: no cover - environment check
    print(
        f"{os.path.basename(sys.argv[0])}: missing Python package ({err}); "
        "install the pinned versions with scripts/ci-python-deps.sh",
        file=sys.stderr,
    )
    sys.exit(3)

# The default ONNX opset of skl2onnx can be newer than a runtime supports; pin
# it so the fixtures do not change with the exporter's default.
TARGET_OPSET = {"": 17, "ai.onnx.ml": 3}


def versions():
    """The versions of the packages that made the fixtures."""
    return {
        "scikit-learn": sklearn.__version__,
        "skl2onnx": skl2onnx.__version__,
        "onnxruntime": ort.__version__,
        "onnx": onnx.__version__,
    }


def session(model_bytes):
    """An onnxruntime session on the CPU."""
    return ort.InferenceSession(model_bytes, providers=["CPUExecutionProvider"])


def run_ort(model_bytes, x):
    """onnxruntime's outputs, in the order of the graph's outputs."""
    sess = session(model_bytes)
    return sess.run(None, {sess.get_inputs()[0].name: x})


def expected_outputs(kind, outputs):
    """One entry per row: a regressor's value, or a classifier's probability
    of class 1 and label (from a tensor or from skl2onnx's ZipMap)."""
    if kind == "regressor":
        return [{"value": float(v)} for v in np.asarray(outputs[0]).reshape(-1)]
    labels, probs = outputs[0], outputs[1]
    if isinstance(probs, list):  # ZipMap: a list of {class: probability}
        p1 = [float(row[1]) for row in probs]
    else:
        p1 = [float(v) for v in np.asarray(probs)[:, 1]]
    return [{"probability": p, "label": int(l)} for p, l in zip(p1, labels)]


def export(model, x, dtype, options=None):
    """The fitted `model` exported with a dynamic batch and an input of
    `dtype`; returns the ONNX model, its bytes, the rows as fed (of `dtype`)
    and onnxruntime's outputs on them."""
    xs = np.asarray(x).astype(dtype)
    onx = to_onnx(model, xs[:1], target_opset=TARGET_OPSET, options=options)
    raw = onx.SerializeToString()
    return onx, raw, xs, run_ort(raw, xs)


def write_model(out, name, raw, doc):
    """NAME.onnx and its description NAME.json in `out`."""
    with open(os.path.join(out, name + ".onnx"), "wb") as f:
        f.write(raw)
    with open(os.path.join(out, name + ".json"), "w") as f:
        json.dump(doc, f)


def unsupported_operator_model(width, producer):
    """A valid graph whose Binarizer (ONNX-ML) operator the engine does not run."""
    x = helper.make_tensor_value_info("X", TensorProto.FLOAT, [None, width])
    y = helper.make_tensor_value_info("Y", TensorProto.FLOAT, [None])
    axes = helper.make_tensor("axes", TensorProto.INT64, [1], [1])
    nodes = [
        helper.make_node("Binarizer", ["X"], ["B"], name="binarize", domain="ai.onnx.ml", threshold=0.5),
        helper.make_node("ReduceSum", ["B", "axes"], ["Y"], name="sum", keepdims=0),
    ]
    graph = helper.make_graph(nodes, "unsupported", [x], [y], initializer=[axes])
    opsets = [helper.make_opsetid("", 17), helper.make_opsetid("ai.onnx.ml", 3)]
    model = helper.make_model(graph, opset_imports=opsets, producer_name=producer)
    onnx.checker.check_model(model)
    return model.SerializeToString()


def write_refused(out, x, y, good_bytes, producer):
    """The files every engine and import must refuse, made from training rows
    `x` (n × width) and targets `y`: unsupported_operator.onnx (a Binarizer),
    wrong_width.onnx (width + 1 inputs), truncated.onnx (half of
    `good_bytes`) and empty.onnx (0 bytes). Returns what each refusal must
    name."""
    width = x.shape[1]
    with open(os.path.join(out, "unsupported_operator.onnx"), "wb") as f:
        f.write(unsupported_operator_model(width, producer))
    wide = np.hstack([x, x[:, :1]])
    wrong = to_onnx(LinearRegression().fit(wide, y), wide[:1].astype(np.float32), target_opset=TARGET_OPSET)
    with open(os.path.join(out, "wrong_width.onnx"), "wb") as f:
        f.write(wrong.SerializeToString())
    with open(os.path.join(out, "truncated.onnx"), "wb") as f:
        f.write(good_bytes[: len(good_bytes) // 2])
    open(os.path.join(out, "empty.onnx"), "wb").close()
    return {
        "unsupported_operator": "Binarizer",
        "wrong_width": f"{width + 1} features",
        "truncated": "not a valid ONNX model",
        "empty": "empty",
    }
