#!/usr/bin/env bash
# Imported ONNX models against the native linear model, in one run on one
# stack; writes the figures to $BENCH_DIR/results/onnx/ and replaces the
# "Imported ONNX models" section of BENCHMARKS.md (bench/onnx_report.py).
#
#   bench/onnx.sh            # 5 minutes of measurement after the release builds; needs nats-server,
#                            # python3 with scripts/ci-python-deps.sh's packages
#
# Steps: release build; a private platform (bench/stack.sh, one predictor,
# the trainer's native linear model on data/user_data.csv); the fixtures of
# scripts/onnx-import-fixtures.py trained on that file (regressors) and on
# the same users with a binary target (classifiers: the registry is
# restarted with that file as its holdout to evaluate them); each model
# imported with `mlctl import`, promoted, and measured with `mlctl bench`:
# 32 requests in flight (one user id each) and batches of 1,000 user ids (4
# in flight), BENCH_SECS (10) seconds each, the native model first and last.
# Then `cargo bench -p ml-onnx --bench latency`: the engine (tract, with the
# crate's tree evaluator) against onnxruntime (Python, the same files) per
# row and per batch of 200 on the tree models.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
export PATH="${PATH}:/usr/sbin"
export BENCH_DIR=${BENCH_DIR:-/tmp/mlplatform-bench}
export BENCH_PORT=${BENCH_PORT:-14300}
export NATS_URL="nats://127.0.0.1:${BENCH_PORT}"
export USER=${USER:-bench}
OUT=${BENCH_DIR}/results/onnx
FIXTURES=${BENCH_DIR}/onnx-fixtures
SECS=${BENCH_SECS:-10}
DATA=data/user_data.csv
MLCTL=target/release/mlctl
mkdir -p "${OUT}" "${FIXTURES}"
rm -f "${OUT}"/*.json

log() { printf '==> %s\n' "$*" >&2; }
field() { python3 -c "import json,sys; print(json.load(sys.stdin)$1)"; }

log "building release binaries"
cargo build --release --locked --bins

log "fixtures: scikit-learn models on ${DATA} and on its users with a binary target"
python3 scripts/onnx-import-fixtures.py "${DATA}" "${FIXTURES}/regression" >/dev/null
python3 - "${DATA}" "${FIXTURES}/binary.csv" <<'PY'
import csv, sys
rows = list(csv.DictReader(open(sys.argv[1])))
cut = sorted(float(r["target"]) for r in rows)[len(rows) // 2]
with open(sys.argv[2], "w", newline="") as f:
    w = csv.writer(f)
    w.writerow(["", "user_id", "feature_1", "feature_2", "target"])
    for r in rows:
        w.writerow([r[""], r["user_id"], r["feature_1"], r["feature_2"], int(float(r["target"]) > cut)])
PY
python3 scripts/onnx-import-fixtures.py "${FIXTURES}/binary.csv" "${FIXTURES}/binary" >/dev/null

trap 'bench/stack.sh stop' EXIT
bench/stack.sh stop || true
bench/stack.sh start 1
native=$("${MLCTL}" models --json | field '["production"]')

serve() { # version: promote it and wait until the predictor answers with it
    "${MLCTL}" promote "$1" --reason "onnx benchmark" >/dev/null
    for _ in $(seq 100); do
        if "${MLCTL}" predict a1b588c6-8c08-42f9-b0d8-9e5b1401840d 2>/dev/null | grep -q "\"model_version\":$1[,}]"; then
            return 0
        fi
        sleep 0.1
    done
    echo "version $1 not served within 10 s" >&2
    return 1
}

measure() { # name version
    serve "$2"
    log "$1 (v$2): 32 in flight, then batches of 1,000"
    "${MLCTL}" bench --json --concurrency 32 --duration "${SECS}s" >"${OUT}/$1-c32.json"
    "${MLCTL}" bench --json --batch 1000 --concurrency 4 --duration "${SECS}s" >"${OUT}/$1-batch1000.json"
}

import() { # name dir: imports the fixture, records the registry's reply
    "${MLCTL}" import "$2/$1.onnx" --features feature_1,feature_2 --reason "onnx benchmark" \
        >"${OUT}/$1-import.json"
    field '["version"]' <"${OUT}/$1-import.json"
}

measure native-first "${native}"
for name in linear gbr mlp; do
    measure "onnx-${name}" "$(import "${name}" "${FIXTURES}/regression")"
done
bench/stack.sh registry REGISTRY_HOLDOUT_PATH="${FIXTURES}/binary.csv"
for name in classifier random_forest; do
    measure "onnx-${name}" "$(import "${name}" "${FIXTURES}/binary")"
done
measure native-last "${native}"
"${MLCTL}" models --json >"${OUT}/models.json"
bench/stack.sh stop
trap - EXIT

log "engine against onnxruntime (cargo bench -p ml-onnx --bench latency)"
cargo bench --locked -p ml-onnx --bench latency -- --noplot >"${OUT}/latency.txt" 2>&1

{
    uname -r
    nproc
    rustc --version
    lscpu | sed -n 's/^Model name:[[:space:]]*//p'
    free -g | awk '/Mem:/ {print $2}'
    cut -d' ' -f1-3 /proc/loadavg
    python3 -c 'import onnxruntime, sklearn, skl2onnx; print(f"onnxruntime {onnxruntime.__version__}, scikit-learn {sklearn.__version__}, skl2onnx {skl2onnx.__version__}")'
} >"${OUT}/machine.txt"
python3 bench/onnx_report.py "${OUT}" BENCHMARKS.md
log "done: the \"Imported ONNX models\" section of BENCHMARKS.md"
