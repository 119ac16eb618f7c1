#!/usr/bin/env bash
# Python packages the tests use: Triton's Open Inference Protocol client
# (tests/oip/conformance.py, run by tests/tests/e2e/gateway.rs), and
# scikit-learn, skl2onnx, onnxruntime and onnx, pinned, for the ONNX fixtures
# (scripts/onnx-fixtures.py, run by shared/onnx/tests/fixtures.rs). Installs
# them for the python3 on PATH (or $OIP_PYTHON) when they are missing.
set -euo pipefail
PY="${OIP_PYTHON:-python3}"
# The ONNX fixtures' packages: scikit-learn trains, skl2onnx exports,
# onnxruntime gives the reference outputs, onnx builds the broken fixtures.
ONNX_PACKAGES=(scikit-learn==1.9.1 skl2onnx==1.20.0 onnxruntime==1.31.1 onnx==1.23.2)
if ! command -v "${PY}" >/dev/null 2>&1; then
    echo "==> ${PY} not found: installing python3 and pip with apt"
    if [ "$(id -u)" -eq 0 ]; then SUDO=(); else SUDO=(sudo); fi
    "${SUDO[@]}" apt-get update
    "${SUDO[@]}" env DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends python3 python3-pip
fi
# Debian's python3 refuses system-wide pip installs (PEP 668) unless told.
pip_install() {
    "${PY}" -m pip install --quiet "$@" \
        || "${PY}" -m pip install --quiet --break-system-packages "$@"
}
if "${PY}" -c 'import numpy, tritonclient.http' >/dev/null 2>&1; then
    echo "==> tritonclient[http] already installed for ${PY}"
else
    echo "==> installing tritonclient[http] for ${PY}"
    pip_install 'tritonclient[http]'
fi
# The pinned versions, or install them (pip leaves matching ones alone).
if "${PY}" - "${ONNX_PACKAGES[@]}" <<'PYEOF'
import sys
from importlib.metadata import PackageNotFoundError, version
for spec in sys.argv[1:]:
    name, want = spec.split("==")
    try:
        if version(name) != want:
            sys.exit(1)
    except PackageNotFoundError:
        sys.exit(1)
PYEOF
then
    echo "==> ${ONNX_PACKAGES[*]} already installed for ${PY}"
else
    echo "==> installing ${ONNX_PACKAGES[*]} for ${PY}"
    pip_install "${ONNX_PACKAGES[@]}"
fi
"${PY}" -c 'import sklearn, skl2onnx, onnxruntime, onnx; print("scikit-learn", sklearn.__version__, "skl2onnx", skl2onnx.__version__, "onnxruntime", onnxruntime.__version__, "onnx", onnx.__version__)'
"${PY}" -c 'import tritonclient; print("tritonclient", tritonclient.__version__ if hasattr(tritonclient, "__version__") else "installed")'
