#!/usr/bin/env python3
"""ONNX models trained on the platform's own data file, for the import tests
and the benchmark (bench/onnx.sh).

Usage: onnx-import-fixtures.py DATA_CSV OUT_DIR

Reads a data file as `mlctl gen-data` writes it (an index column, user_id,
feature_1, feature_2, target) and trains on the raw features feature_1 and
feature_2, in that order (the features the import declares):
- a regression target: a linear regression (double input), the same on the
  derived feature_3 = feature_1² too (features feature_1, feature_2,
  feature_3: the feature store computes feature_3 for it), a
  gradient-boosted regressor and a small MLP (one hidden layer of 8, behind
  a standard scaler) (float input);
- a binary target: a pipeline of a standard scaler and a logistic regression
  (float input, probabilities as a tensor) and a random forest (float
  input, skl2onnx's default ZipMap).
Each is exported with skl2onnx as NAME.onnx with NAME.json: the kind, the
features and onnxruntime's outputs for every user of the file (a value, or
the probability of class 1 and the label). For a regression target, also
writes the files an import must refuse: unsupported_operator.onnx (a
Binarizer), wrong_width.onnx (3 inputs), truncated.onnx and empty.onnx.
manifest.json lists the users, the good models and the packages' versions.

Needs scikit-learn, skl2onnx, onnxruntime and onnx (scripts/ci-python-deps.sh).
Exits with status 3 when one is missing.
"""

import csv
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from onnx_common import expected_outputs, export, versions, write_model, write_refused  # noqa: E402

import numpy as np  # noqa: E402
from sklearn.ensemble import GradientBoostingRegressor, RandomForestClassifier  # noqa: E402
from sklearn.linear_model import LinearRegression, LogisticRegression  # noqa: E402
from sklearn.neural_network import MLPRegressor  # noqa: E402
from sklearn.pipeline import Pipeline  # noqa: E402
from sklearn.preprocessing import StandardScaler  # noqa: E402

FEATURES = ["feature_1", "feature_2"]
SEED = 7


def read(path):
    ids, rows, target = [], [], []
    with open(path, newline="") as f:
        for rec in csv.DictReader(f):
            ids.append(rec["user_id"])
            rows.append([float(rec[name]) for name in FEATURES])
            target.append(float(rec["target"]))
    return ids, np.array(rows), np.array(target)


def write(out, name, kind, model, x, dtype, options=None, features=FEATURES):
    """Exports `model` as NAME.onnx with onnxruntime's outputs on `x`."""
    _, raw, _, outputs = export(model, x, dtype, options)
    doc = {"name": name, "kind": kind, "features": features,
           "expected": expected_outputs(kind, outputs)}
    write_model(out, name, raw, doc)
    return raw


def classifiers(out, x, y):
    labels = y.astype(np.int64)
    pipe = Pipeline([("scale", StandardScaler()), ("logistic", LogisticRegression())]).fit(x, labels)
    write(out, "classifier", "classifier", pipe, x, np.float32,
          options={LogisticRegression: {"zipmap": False}})
    forest = RandomForestClassifier(n_estimators=20, max_depth=6, random_state=SEED).fit(x, labels)
    write(out, "random_forest", "classifier", forest, x, np.float32)
    return ["classifier", "random_forest"]


def regressors(out, x, y):
    linear = write(out, "linear", "regressor", LinearRegression().fit(x, y), x, np.float64)
    gbr = GradientBoostingRegressor(n_estimators=40, max_depth=3, random_state=SEED).fit(x, y)
    write(out, "gbr", "regressor", gbr, x, np.float32)
    mlp = Pipeline([
        ("scale", StandardScaler()),
        ("mlp", MLPRegressor(hidden_layer_sizes=(8,), max_iter=3000, random_state=SEED)),
    ]).fit(x, y)
    write(out, "mlp", "regressor", mlp, x, np.float32)
    derived = np.hstack([x, x[:, :1] ** 2])
    write(out, "linear_derived", "regressor", LinearRegression().fit(derived, y), derived,
          np.float64, features=FEATURES + ["feature_3"])
    write_refused(out, x, y, linear, "onnx-import-fixtures")
    return ["linear", "gbr", "mlp", "linear_derived"]


def main():
    if len(sys.argv) != 3:
        print(__doc__, file=sys.stderr)
        sys.exit(2)
    ids, x, y = read(sys.argv[1])
    out = sys.argv[2]
    os.makedirs(out, exist_ok=True)
    if set(np.unique(y)) <= {0.0, 1.0}:
        good = classifiers(out, x, y)
    else:
        good = regressors(out, x, y)
    with open(os.path.join(out, "manifest.json"), "w") as f:
        json.dump({"user_ids": ids, "good": good, "versions": versions()}, f)


if __name__ == "__main__":
    main()
