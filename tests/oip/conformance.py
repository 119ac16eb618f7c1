#!/usr/bin/env python3
"""Open Inference Protocol conformance, as a published client sees it.

Drives the gateway with Triton's `tritonclient.http` (installed from PyPI:
`pip install 'tritonclient[http]'`), which nobody on this project wrote, and
prints one JSON object with what it read: server and model metadata,
readiness, the predictions of every case in the cases file, and the status
and message of every request that should fail. The Rust test
(`tests/tests/e2e/gateway.rs`) compares the predictions with `ml.predict`'s
answers on the same inputs.

Usage: conformance.py HOST:PORT MODEL CASES.json
CASES.json: {"user_ids": [...], "features": [[f1, f2], ...],
             "production": N, "other_version": M}
"""

import json
import sys
import urllib.error
import urllib.request

try:
    import numpy as np
    import tritonclient.http as httpclient
    from tritonclient.utils import InferenceServerException
except ImportError as error:  # the Rust test shows this line
    print(f"missing Python package ({error}): pip install 'tritonclient[http]'", file=sys.stderr)
    sys.exit(3)


def column(name, values, datatype, binary):
    array = np.array(values, dtype=np.float32 if datatype == "FP32" else np.float64)
    tensor = httpclient.InferInput(name, list(array.shape), datatype)
    tensor.set_data_from_numpy(array, binary_data=binary)
    return tensor


def user_ids(ids, binary):
    array = np.array([i.encode() for i in ids], dtype=np.object_)
    tensor = httpclient.InferInput("user_id", [len(ids)], "BYTES")
    tensor.set_data_from_numpy(array, binary_data=binary)
    return tensor


def outputs_of(result):
    response = result.get_response()
    out = {
        "model_version": response.get("model_version"),
        "id": response.get("id"),
        "prediction": result.as_numpy("prediction").tolist(),
    }
    label = result.as_numpy("label")
    out["label"] = None if label is None else label.tolist()
    return out


def failure(call):
    """Runs `call`, which should fail; returns its status and message."""
    try:
        call()
    except InferenceServerException as error:
        return {"status": error.status(), "message": error.message()}
    return {"status": None, "message": "no error"}


def raw_post(url, path, body, headers=None):
    request = urllib.request.Request(
        f"http://{url}{path}", data=body, method="POST", headers=headers or {"Content-Type": "application/json"}
    )
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            return {"status": str(response.status), "body": json.loads(response.read())}
    except urllib.error.HTTPError as error:
        return {"status": str(error.code), "body": json.loads(error.read())}


def main():
    url, model, cases_path = sys.argv[1:4]
    with open(cases_path) as f:
        cases = json.load(f)
    client = httpclient.InferenceServerClient(url=url, network_timeout=30.0)
    out = {
        "live": client.is_server_live(),
        "ready": client.is_server_ready(),
        "server": client.get_server_metadata(),
        "model": client.get_model_metadata(model),
        "version_metadata": client.get_model_metadata(model, model_version=str(cases["production"])),
        "model_ready": client.is_model_ready(model),
        "version_ready": client.is_model_ready(model, model_version=str(cases["production"])),
        "other_version_ready": client.is_model_ready(model, model_version=str(cases["other_version"])),
        "infer": {},
        "errors": {},
    }
    rows = cases["features"]
    f1 = [r[0] for r in rows]
    f2 = [r[1] for r in rows]
    ids = cases["user_ids"]
    infer = out["infer"]

    # By features, one row, binary tensors (the client's default).
    infer["features_single_binary"] = outputs_of(
        client.infer(model, [column("feature_1", f1[:1], "FP64", True), column("feature_2", f2[:1], "FP64", True)])
    )
    # By features, a batch, JSON tensors, JSON outputs asked for by name.
    infer["features_batch_json"] = outputs_of(
        client.infer(
            model,
            [column("feature_1", f1, "FP64", False), column("feature_2", f2, "FP64", False)],
            outputs=[httpclient.InferRequestedOutput("prediction", binary_data=False)],
            request_id="batch-42",
        )
    )
    # One [N, 2] FP32 matrix.
    matrix = httpclient.InferInput("features", [len(rows), 2], "FP32")
    matrix.set_data_from_numpy(np.array(rows, dtype=np.float32), binary_data=True)
    infer["features_matrix_fp32"] = outputs_of(client.infer(model, [matrix]))
    # By user id: one, binary; a batch, JSON.
    infer["user_single_binary"] = outputs_of(client.infer(model, [user_ids(ids[:1], True)], request_id="u1"))
    infer["user_batch_json"] = outputs_of(client.infer(model, [user_ids(ids, False)]))
    # The production version, named.
    infer["user_batch_versioned"] = outputs_of(
        client.infer(model, [user_ids(ids, True)], model_version=str(cases["production"]))
    )

    errors = out["errors"]
    errors["unknown_model_metadata"] = failure(lambda: client.get_model_metadata("nosuchmodel"))
    errors["unknown_model_infer"] = failure(lambda: client.infer("nosuchmodel", [user_ids(ids[:1], True)]))
    errors["unknown_version_metadata"] = failure(lambda: client.get_model_metadata(model, model_version="999"))
    errors["unknown_version_infer"] = failure(
        lambda: client.infer(model, [user_ids(ids[:1], True)], model_version="999")
    )
    errors["other_version_infer"] = failure(
        lambda: client.infer(model, [user_ids(ids[:1], True)], model_version=str(cases["other_version"]))
    )
    errors["wrong_datatype"] = failure(
        lambda: client.infer(
            model,
            [
                (lambda t: (t.set_data_from_numpy(np.array([1], dtype=np.int32)), t)[1])(
                    httpclient.InferInput("feature_1", [1], "INT32")
                ),
                column("feature_2", f2[:1], "FP64", True),
            ],
        )
    )
    errors["wrong_shape"] = failure(
        lambda: client.infer(model, [column("feature_1", [f1[:2]], "FP64", True), column("feature_2", [f2[:2]], "FP64", True)])
    )
    errors["mismatched_batches"] = failure(
        lambda: client.infer(model, [column("feature_1", f1[:2], "FP64", True), column("feature_2", f2[:1], "FP64", True)])
    )
    errors["matrix_wrong_width"] = failure(
        lambda: client.infer(
            model,
            [(lambda t: (t.set_data_from_numpy(np.zeros((2, 3), dtype=np.float64)), t)[1])(
                httpclient.InferInput("features", [2, 3], "FP64")
            )],
        )
    )
    errors["unknown_input"] = failure(lambda: client.infer(model, [column("feature_9", f1[:1], "FP64", True)]))
    errors["missing_input"] = failure(lambda: client.infer(model, [column("feature_1", f1[:1], "FP64", True)]))
    errors["unknown_user"] = failure(lambda: client.infer(model, [user_ids(["nobody"], True)]))
    errors["unknown_output"] = failure(
        lambda: client.infer(model, [user_ids(ids[:1], True)], outputs=[httpclient.InferRequestedOutput("proba")])
    )
    # What the client library will not send: raw bodies.
    path = f"/v2/models/{model}/infer"
    errors["raw_invalid_json"] = raw_post(url, path, b"{not json")
    errors["raw_count_mismatch"] = raw_post(
        url, path, json.dumps({"inputs": [{"name": "user_id", "shape": [2], "datatype": "BYTES", "data": ["a"]}]}).encode()
    )
    header = json.dumps(
        {"inputs": [{"name": "features", "shape": [1, 2], "datatype": "FP64", "parameters": {"binary_data_size": 16}}]}
    ).encode()
    errors["raw_binary_overrun"] = raw_post(
        url,
        path,
        header + b"\0" * 8,
        {"Content-Type": "application/octet-stream", "Inference-Header-Content-Length": str(len(header))},
    )
    print(json.dumps(out))


if __name__ == "__main__":
    main()
