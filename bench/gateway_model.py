"""For bench/gateway.sh: trains scikit-learn's LinearRegression on the file
the platform trains on (feature_1, feature_2 and feature_3 = feature_1²,
target), saves it with joblib as a Pipeline that takes the raw features
[feature_1, feature_2] (as the gateway's `features` input does), and writes
MLServer's settings.json and model-settings.json.

    python gateway_model.py DATA_CSV MODEL_DIR HTTP_PORT GRPC_PORT METRICS_PORT
"""
import csv
import json
import os
import sys

import joblib
import numpy as np
import sklearn
from sklearn.compose import ColumnTransformer
from sklearn.linear_model import LinearRegression
from sklearn.pipeline import Pipeline
from sklearn.preprocessing import FunctionTransformer

data, model_dir, http_port, grpc_port, metrics_port = sys.argv[1:6]
with open(data, newline="") as f:
    rows = list(csv.DictReader(f))
x = np.array([[float(r["feature_1"]), float(r["feature_2"])] for r in rows])
y = np.array([float(r["target"]) for r in rows])
model = Pipeline([
    ("features", ColumnTransformer([
        ("raw", "passthrough", [0, 1]),
        ("feature_3", FunctionTransformer(np.square), [0]),
    ])),
    ("linear", LinearRegression()),
]).fit(x, y)

root = os.path.dirname(os.path.abspath(model_dir))
os.makedirs(model_dir, exist_ok=True)
joblib.dump(model, os.path.join(model_dir, "model.joblib"))
with open(os.path.join(model_dir, "model-settings.json"), "w") as f:
    json.dump({
        "name": "sklearn",
        "implementation": "mlserver_sklearn.SKLearnModel",
        "parameters": {"uri": "./model.joblib", "version": "v1"},
    }, f, indent=2)
with open(os.path.join(root, "settings.json"), "w") as f:
    json.dump({
        "host": "127.0.0.1",
        "http_port": int(http_port),
        "grpc_port": int(grpc_port),
        "metrics_port": int(metrics_port),
    }, f, indent=2)
linear = model.named_steps["linear"]
print(json.dumps({
    "rows": len(rows),
    "sklearn": sklearn.__version__,
    "coef": [float(c) for c in linear.coef_],
    "intercept": float(linear.intercept_),
}))
