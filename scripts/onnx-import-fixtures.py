#!/usr/bin/env python3
"""ONNX models trained on the platform's own data file, for the import tests.

Usage: onnx-import-fixtures.py DATA_CSV OUT_DIR

Reads a data file as `mlctl gen-data` writes it (an index column, user_id,
feature_1, feature_2, target) and trains on the raw features feature_1 and
feature_2, in that order (the features the import declares):
- a regression target: a linear regression (double input), the same on the
  derived feature_3 = feature_1² too (features feature_1, feature_2,
  feature_3: the feature store computes feature_3 for it) and a
  gradient-boosted regressor (float input);
- a binary target: a pipeline of a standard scaler and a logistic regression
  (float input, probabilities as a tensor).
Each is exported with skl2onnx as NAME.onnx with NAME.json: the kind and
onnxruntime's outputs for every user of the file (a value, or the
probability of class 1 and the label). Also writes the files an import must
refuse: unsupported_operator.onnx (a Binarizer), wrong_width.onnx (3 inputs),
truncated.onnx and empty.onnx. manifest.json lists the good models.

Needs scikit-learn, skl2onnx, onnxruntime and onnx (scripts/ci-python-deps.sh).
Exits with status 3 when one is missing.
"""

import csv
import json
import os
import sys

try:
    import numpy as np
    import onnx
    import onnxruntime as ort
    from onnx import TensorProto, helper
    from skl2onnx import to_onnx
    from sklearn.ensemble import GradientBoostingRegressor
    from sklearn.linear_model import LinearRegression, LogisticRegression
    from sklearn.pipeline import Pipeline
    from sklearn.preprocessing import StandardScaler
except ImportError as err:  # pragma: no cover - environment check
    print(f"onnx-import-fixtures.py: missing Python package ({err})", file=sys.stderr)
    sys.exit(3)

FEATURES = ["feature_1", "feature_2"]
TARGET_OPSET = {"": 17, "ai.onnx.ml": 3}
SEED = 7


def read(path):
    ids, rows, target = [], [], []
    with open(path, newline="") as f:
        for rec in csv.DictReader(f):
            ids.append(rec["user_id"])
            rows.append([float(rec[name]) for name in FEATURES])
            target.append(float(rec["target"]))
    return ids, np.array(rows), np.array(target)


def export(out, name, kind, model, x, dtype, options=None, features=FEATURES):
    xs = x.astype(dtype)
    raw = to_onnx(model, xs[:1], target_opset=TARGET_OPSET, options=options).SerializeToString()
    with open(os.path.join(out, name + ".onnx"), "wb") as f:
        f.write(raw)
    sess = ort.InferenceSession(raw, providers=["CPUExecutionProvider"])
    outputs = sess.run(None, {sess.get_inputs()[0].name: xs})
    if kind == "regressor":
        expected = [{"value": float(v)} for v in np.asarray(outputs[0]).reshape(-1)]
    else:
        labels, probs = outputs[0], np.asarray(outputs[1])
        expected = [
            {"probability": float(p[1]), "label": int(l)} for l, p in zip(labels, probs)
        ]
    with open(os.path.join(out, name + ".json"), "w") as f:
        json.dump({"name": name, "kind": kind, "features": features, "expected": expected}, f)
    return raw


def unsupported_operator_model():
    """A valid graph whose Binarizer (ONNX-ML) operator the engine does not run."""
    x = helper.make_tensor_value_info("X", TensorProto.FLOAT, [None, len(FEATURES)])
    y = helper.make_tensor_value_info("Y", TensorProto.FLOAT, [None])
    axes = helper.make_tensor("axes", TensorProto.INT64, [1], [1])
    nodes = [
        helper.make_node("Binarizer", ["X"], ["B"], name="binarize", domain="ai.onnx.ml", threshold=0.5),
        helper.make_node("ReduceSum", ["B", "axes"], ["Y"], name="sum", keepdims=0),
    ]
    graph = helper.make_graph(nodes, "unsupported", [x], [y], initializer=[axes])
    opsets = [helper.make_opsetid("", 17), helper.make_opsetid("ai.onnx.ml", 3)]
    model = helper.make_model(graph, opset_imports=opsets, producer_name="onnx-import-fixtures")
    onnx.checker.check_model(model)
    return model.SerializeToString()


def main():
    if len(sys.argv) != 3:
        print(__doc__, file=sys.stderr)
        sys.exit(2)
    ids, x, y = read(sys.argv[1])
    out = sys.argv[2]
    os.makedirs(out, exist_ok=True)
    good = []
    if set(np.unique(y)) <= {0.0, 1.0}:
        pipe = Pipeline([("scale", StandardScaler()), ("logistic", LogisticRegression())])
        pipe.fit(x, y.astype(np.int64))
        export(out, "classifier", "classifier", pipe, x, np.float32,
               options={LogisticRegression: {"zipmap": False}})
        good.append("classifier")
    else:
        linear = export(out, "linear", "regressor", LinearRegression().fit(x, y), x, np.float64)
        gbr = GradientBoostingRegressor(n_estimators=40, max_depth=3, random_state=SEED).fit(x, y)
        export(out, "gbr", "regressor", gbr, x, np.float32)
        derived = np.hstack([x, x[:, :1] ** 2])
        export(out, "linear_derived", "regressor", LinearRegression().fit(derived, y), derived,
               np.float64, features=FEATURES + ["feature_3"])
        good += ["linear", "gbr", "linear_derived"]
        with open(os.path.join(out, "truncated.onnx"), "wb") as f:
            f.write(linear[: len(linear) // 2])
        wide = np.hstack([x, x[:, :1]])
        wrong = to_onnx(LinearRegression().fit(wide, y), wide[:1], target_opset=TARGET_OPSET)
        with open(os.path.join(out, "wrong_width.onnx"), "wb") as f:
            f.write(wrong.SerializeToString())
        with open(os.path.join(out, "unsupported_operator.onnx"), "wb") as f:
            f.write(unsupported_operator_model())
        open(os.path.join(out, "empty.onnx"), "wb").close()
    with open(os.path.join(out, "manifest.json"), "w") as f:
        json.dump({"user_ids": ids, "good": good}, f)


if __name__ == "__main__":
    main()
