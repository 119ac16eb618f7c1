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

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from onnx_common import (  # noqa: E402  (exits with status 3 without the packages)
    TARGET_OPSET,
    expected_outputs,
    export,
    versions,
    write_model,
    write_refused,
)

import numpy as np  # noqa: E402
from skl2onnx import to_onnx  # noqa: E402
from sklearn.ensemble import GradientBoostingRegressor, RandomForestClassifier  # noqa: E402
from sklearn.linear_model import LinearRegression, LogisticRegression  # noqa: E402
from sklearn.neural_network import MLPRegressor  # noqa: E402
from sklearn.pipeline import Pipeline  # noqa: E402
from sklearn.preprocessing import StandardScaler  # noqa: E402

SEED = 20240611
FEATURES = 3
TRAIN_ROWS = 400
TEST_ROWS = 200


def data():
    """Deterministic features, a regression target and a binary label."""
    rng = np.random.default_rng(SEED)
    x = rng.normal(size=(TRAIN_ROWS + TEST_ROWS, FEATURES)) * [1.0, 2.0, 0.5] + [0.0, 1.0, -3.0]
    noise = rng.normal(scale=0.1, size=len(x))
    y_reg = 1.5 * x[:, 0] - 0.7 * x[:, 1] + 2.0 * x[:, 2] + 0.3 * x[:, 0] * x[:, 1] + noise
    y_cls = (x[:, 0] + 0.5 * x[:, 1] * x[:, 2] + noise > 0.2).astype(np.int64)
    return x[:TRAIN_ROWS], y_reg[:TRAIN_ROWS], y_cls[:TRAIN_ROWS], x[TRAIN_ROWS:]


def write_good(out, name, kind, model, x_test, dtype, options=None):
    """Export one fitted model and write its inputs and onnxruntime's outputs."""
    onx, raw, x, outputs = export(model, x_test, dtype, options)
    doc = {
        "name": name,
        "kind": kind,
        "input_dtype": np.dtype(dtype).name,
        "features": FEATURES,
        "operators": sorted({n.op_type for n in onx.graph.node}),
        # Exactly the values fed to onnxruntime (float32 values are exact in JSON's doubles).
        "inputs": [[float(v) for v in row] for row in x],
        "expected": expected_outputs(kind, outputs),
    }
    write_model(out, name, raw, doc)
    return {"name": name, "kind": kind, "operators": doc["operators"]}


def write_broken(out, x_train, y_reg, y_cls, linear_bytes):
    """The fixtures the engine must refuse, with what the refusal must name."""
    broken = write_refused(out, x_train, y_reg, linear_bytes, "onnx-fixtures")
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
        "versions": versions(),
        "features": FEATURES,
        "good": good,
        "broken": broken,
    }
    with open(os.path.join(out, "manifest.json"), "w") as f:
        json.dump(manifest, f, indent=1)
    print(json.dumps(manifest, indent=1))


if __name__ == "__main__":
    main()
