#!/usr/bin/env python3
"""ONNX fixtures for the ml-onnx crate's tests (shared/onnx/tests/).

Usage: onnx-fixtures.py OUT_DIR

Trains small scikit-learn models on a deterministic generated data set
(3 features, fixed seed), exports them with skl2onnx and writes, for each good
model, NAME.onnx and NAME.json: the inputs (200 rows, exactly as fed to the
model) and onnxruntime's outputs on them. Also writes broken fixtures the
engine must refuse: an unsupported operator, a wrong input width, a
three-class classifier, a linear classifier whose coefficients do not match
its input, a truncated file and a 0-byte file. manifest.json lists everything written.

Needs scikit-learn, skl2onnx, onnxruntime and onnx: scripts/ci-python-deps.sh
installs the pinned versions. Exits with status 3 when one is missing.
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
    from skl2onnx.common.data_types import DoubleTensorType, FloatTensorType
    from sklearn.ensemble import GradientBoostingRegressor, RandomForestClassifier
    from sklearn.linear_model import LinearRegression, LogisticRegression
    from sklearn.neural_network import MLPRegressor
    from sklearn.pipeline import Pipeline
    from sklearn.preprocessing import StandardScaler
except ImportError as err:  # pragma: no cover - environment check
    print(
        f"onnx-fixtures.py: missing Python package ({err}); "
        "install the pinned versions with scripts/ci-python-deps.sh",
        file=sys.stderr,
    )
    sys.exit(3)

SEED = 20240611
FEATURES = 3
TRAIN_ROWS = 400
TEST_ROWS = 200
# The default ONNX opset of skl2onnx can be newer than a runtime supports; pin
# it so the fixtures do not change with the exporter's default.
TARGET_OPSET = {"": 17, "ai.onnx.ml": 3}


def data():
    """Deterministic features, a regression target and a binary label."""
    rng = np.random.default_rng(SEED)
    x = rng.normal(size=(TRAIN_ROWS + TEST_ROWS, FEATURES)) * [1.0, 2.0, 0.5] + [0.0, 1.0, -3.0]
    noise = rng.normal(scale=0.1, size=len(x))
    y_reg = 1.5 * x[:, 0] - 0.7 * x[:, 1] + 2.0 * x[:, 2] + 0.3 * x[:, 0] * x[:, 1] + noise
    y_cls = (x[:, 0] + 0.5 * x[:, 1] * x[:, 2] + noise > 0.2).astype(np.int64)
    return x[:TRAIN_ROWS], y_reg[:TRAIN_ROWS], y_cls[:TRAIN_ROWS], x[TRAIN_ROWS:]


def run_ort(model_bytes, x):
    """onnxruntime's outputs, in the order of the graph's outputs."""
    sess = ort.InferenceSession(model_bytes, providers=["CPUExecutionProvider"])
    name = sess.get_inputs()[0].name
    return sess.run(None, {name: x})


def expected_regressor(outputs):
    values = np.asarray(outputs[0]).reshape(-1)
    return [{"value": float(v)} for v in values]


def expected_classifier(outputs):
    labels, probs = outputs[0], outputs[1]
    if isinstance(probs, list):  # ZipMap: a list of {class: probability}
        p1 = [float(row[1]) for row in probs]
    else:
        p1 = [float(v) for v in np.asarray(probs)[:, 1]]
    return [{"probability": p, "label": int(l)} for p, l in zip(p1, labels)]


def write_good(out, name, kind, model, x_test, dtype, options=None):
    """Export one fitted model and write its inputs and onnxruntime's outputs."""
    x = x_test.astype(dtype)
    onx = to_onnx(model, x[:1], target_opset=TARGET_OPSET, options=options)
    raw = onx.SerializeToString()
    with open(os.path.join(out, name + ".onnx"), "wb") as f:
        f.write(raw)
    outputs = run_ort(raw, x)
    expected = expected_regressor(outputs) if kind == "regressor" else expected_classifier(outputs)
    doc = {
        "name": name,
        "kind": kind,
        "input_dtype": np.dtype(dtype).name,
        "features": FEATURES,
        "operators": sorted({n.op_type for n in onx.graph.node}),
        # Exactly the values fed to onnxruntime (float32 values are exact in JSON's doubles).
        "inputs": [[float(v) for v in row] for row in x],
        "expected": expected,
    }
    with open(os.path.join(out, name + ".json"), "w") as f:
        json.dump(doc, f)
    return {"name": name, "kind": kind, "operators": doc["operators"]}


def unsupported_operator_model():
    """A valid graph whose Binarizer (ONNX-ML) operator the engine does not run."""
    x = helper.make_tensor_value_info("X", TensorProto.FLOAT, [None, FEATURES])
    y = helper.make_tensor_value_info("Y", TensorProto.FLOAT, [None])
    axes = helper.make_tensor("axes", TensorProto.INT64, [1], [1])
    nodes = [
        helper.make_node("Binarizer", ["X"], ["B"], name="binarize", domain="ai.onnx.ml", threshold=0.5),
        helper.make_node("ReduceSum", ["B", "axes"], ["Y"], name="sum", keepdims=0),
    ]
    graph = helper.make_graph(nodes, "unsupported", [x], [y], initializer=[axes])
    opsets = [helper.make_opsetid("", 17), helper.make_opsetid("ai.onnx.ml", 3)]
    model = helper.make_model(graph, opset_imports=opsets, producer_name="onnx-fixtures")
    onnx.checker.check_model(model)
    return model.SerializeToString()


def write_broken(out, x_train, y_reg, y_cls, linear_bytes):
    """The fixtures the engine must refuse, with what the refusal must name."""
    broken = {}
    with open(os.path.join(out, "unsupported_operator.onnx"), "wb") as f:
        f.write(unsupported_operator_model())
    broken["unsupported_operator"] = "Binarizer"
    wide = np.hstack([x_train, x_train[:, :1]])
    wrong = to_onnx(LinearRegression().fit(wide, y_reg), wide[:1].astype(np.float32), target_opset=TARGET_OPSET)
    with open(os.path.join(out, "wrong_width.onnx"), "wb") as f:
        f.write(wrong.SerializeToString())
    broken["wrong_width"] = "4 features"
    y3 = np.digitize(y_reg, np.quantile(y_reg, [1 / 3, 2 / 3]))
    multiclass = RandomForestClassifier(n_estimators=3, max_depth=3, random_state=SEED).fit(x_train, y3)
    onx = to_onnx(
        multiclass,
        x_train[:1].astype(np.float32),
        target_opset=TARGET_OPSET,
        options={RandomForestClassifier: {"zipmap": False}},
    )
    with open(os.path.join(out, "multiclass.onnx"), "wb") as f:
        f.write(onx.SerializeToString())
    broken["multiclass"] = "3 classes"
    # A LinearClassifier without intercepts, whose coefficients then do not
    # match its input width (onnxruntime refuses it; the engine must too).
    logistic = LogisticRegression().fit(x_train, y_cls)
    onx = to_onnx(logistic, x_train[:1].astype(np.float32), target_opset=TARGET_OPSET,
                  options={LogisticRegression: {"zipmap": False}})
    node = next(n for n in onx.graph.node if n.op_type == "LinearClassifier")
    kept = [a for a in node.attribute if a.name != "intercepts"]
    del node.attribute[:]
    node.attribute.extend(kept)
    with open(os.path.join(out, "inconsistent_linear.onnx"), "wb") as f:
        f.write(onx.SerializeToString())
    broken["inconsistent_linear"] = "3 and 6 values"
    with open(os.path.join(out, "truncated.onnx"), "wb") as f:
        f.write(linear_bytes[: len(linear_bytes) // 2])
    broken["truncated"] = "not a valid ONNX model"
    open(os.path.join(out, "empty.onnx"), "wb").close()
    broken["empty"] = "empty"
    return broken


def main():
    if len(sys.argv) != 2:
        print(__doc__, file=sys.stderr)
        sys.exit(2)
    out = sys.argv[1]
    os.makedirs(out, exist_ok=True)
    x_train, y_reg, y_cls, x_test = data()
    f32, f64 = np.float32, np.float64
    good = [
        write_good(out, "linear_regression", "regressor", LinearRegression().fit(x_train, y_reg), x_test, f64),
        write_good(
            out,
            "scaled_logistic",
            "classifier",
            Pipeline([("scale", StandardScaler()), ("logistic", LogisticRegression())]).fit(x_train, y_cls),
            x_test,
            f32,
            options={LogisticRegression: {"zipmap": False}},
        ),
        write_good(
            out,
            "gradient_boosting",
            "regressor",
            GradientBoostingRegressor(n_estimators=40, max_depth=3, random_state=SEED).fit(x_train, y_reg),
            x_test,
            f32,
        ),
        # Exported with skl2onnx's defaults: the probabilities go through a ZipMap.
        write_good(
            out,
            "random_forest",
            "classifier",
            RandomForestClassifier(n_estimators=15, max_depth=5, random_state=SEED).fit(x_train, y_cls),
            x_test,
            f32,
        ),
        write_good(
            out,
            "mlp",
            "regressor",
            MLPRegressor(hidden_layer_sizes=(8,), max_iter=2000, random_state=SEED).fit(x_train, y_reg),
            x_test,
            f32,
        ),
    ]
    with open(os.path.join(out, "linear_regression.onnx"), "rb") as f:
        linear_bytes = f.read()
    broken = write_broken(out, x_train, y_reg, y_cls, linear_bytes)
    manifest = {
        "versions": {
            "scikit-learn": sklearn.__version__,
            "skl2onnx": skl2onnx.__version__,
            "onnxruntime": ort.__version__,
            "onnx": onnx.__version__,
        },
        "features": FEATURES,
        "good": good,
        "broken": broken,
    }
    with open(os.path.join(out, "manifest.json"), "w") as f:
        json.dump(manifest, f, indent=1)
    print(json.dumps(manifest, indent=1))


if __name__ == "__main__":
    main()
