#!/usr/bin/env bash
# Python packages the tests use: Triton's Open Inference Protocol client
# (tests/oip/conformance.py, run by tests/tests/e2e/gateway.rs). Installs
# them for the python3 on PATH (or $OIP_PYTHON) when they are missing.
set -euo pipefail
PY="${OIP_PYTHON:-python3}"
if ! command -v "${PY}" >/dev/null 2>&1; then
    echo "==> ${PY} not found: installing python3 and pip with apt"
    if [ "$(id -u)" -eq 0 ]; then SUDO=(); else SUDO=(sudo); fi
    "${SUDO[@]}" apt-get update
    "${SUDO[@]}" env DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends python3 python3-pip
fi
if "${PY}" -c 'import numpy, tritonclient.http' >/dev/null 2>&1; then
    echo "==> tritonclient[http] already installed for ${PY}"
else
    echo "==> installing tritonclient[http] for ${PY}"
    # Debian's python3 refuses system-wide pip installs (PEP 668) unless told.
    "${PY}" -m pip install --quiet 'tritonclient[http]' \
        || "${PY}" -m pip install --quiet --break-system-packages 'tritonclient[http]'
fi
"${PY}" -c 'import tritonclient; print("tritonclient", tritonclient.__version__ if hasattr(tritonclient, "__version__") else "installed")'
