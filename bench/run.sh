#!/usr/bin/env bash
# Regenerates BENCHMARKS.md: every figure in it comes from this script.
#
#   bench/run.sh            # about 30 minutes; needs nats-server, wrk and python3
#
# It builds the release binaries, starts a private platform (bench/stack.sh),
# measures the echo floor and the predictor with `mlctl bench`, batches, an
# open loop at 5,000 req/s for 60 s with the predictor's memory, 50 promotions
# under 2,000 req/s, scale-out over 1-3 replicas, runs the criterion benches,
# times scikit-learn's LinearRegression.fit on the same data (installed,
# pinned, into a throwaway virtualenv from PyPI), and runs bench/trainer.sh
# (the trainer on 10^6 and 10^7 rows against pandas and scikit-learn) and
# bench/gateway.sh (the HTTP gateway against NATS and MLServer 1.7).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
export PATH="${PATH}:/usr/sbin"
export BENCH_DIR=${BENCH_DIR:-/tmp/mlplatform-bench}
export BENCH_PORT=${BENCH_PORT:-14300}
export NATS_URL="nats://127.0.0.1:${BENCH_PORT}"
OUT=${BENCH_DIR}/results
SECS=${BENCH_SECS:-10}
OPEN_SECS=${BENCH_OPEN_SECS:-60}
SKLEARN_VERSION=1.5.2
mkdir -p "${OUT}"
MLCTL=target/release/mlctl

log() { printf '==> %s\n' "$*" >&2; }

log "building release binaries"
cargo build --release --locked --bins

trap 'bench/stack.sh stop' EXIT
bench/stack.sh stop || true
bench/stack.sh start 1

bench() { # name args... -> $OUT/name.json
    local name=$1
    shift
    log "mlctl bench $*"
    "${MLCTL}" bench --json "$@" >"${OUT}/${name}.json"
}

rss_kb() { awk '/VmRSS/ {print $2}' "/proc/$(cat "${BENCH_DIR}/predictor-1.pid")/status"; }

for c in 32 128; do
    bench "echo-c${c}" --echo --concurrency "${c}" --duration "${SECS}s"
    bench "predict-c${c}" --concurrency "${c}" --duration "${SECS}s"
done
for c in 4 16; do
    bench "batch1000-c${c}" --batch 1000 --concurrency "${c}" --duration "${SECS}s"
done

rss_kb >"${OUT}/rss-start.txt"
bench open-5000 --rate 5000 --duration "${OPEN_SECS}s"
rss_kb >"${OUT}/rss-end.txt"

log "50 promotions under 2,000 req/s"
"${MLCTL}" bench --json --rate 2000 --duration 30s --warmup 0s >"${OUT}/promotions.json" &
load=$!
sleep 1
start_version=$("${MLCTL}" models --json | python3 -c 'import json,sys; print(json.load(sys.stdin)["production"])')
for _ in $(seq 50); do
    "${MLCTL}" train >/dev/null
    sleep 0.2
done
end_version=$("${MLCTL}" models --json | python3 -c 'import json,sys; print(json.load(sys.stdin)["production"])')
echo "${start_version} ${end_version}" >"${OUT}/promotions-versions.txt"
wait "${load}"

for n in 1 2 3; do
    bench/stack.sh predictors "${n}"
    bench "scale-${n}" --concurrency 128 --duration "${SECS}s"
done
bench/stack.sh stop
trap - EXIT

log "criterion benches"
cargo bench --locked -p predictor --bench hot_path -- --noplot >"${OUT}/hot_path.txt" 2>&1
cargo bench --locked -p trainer --bench fit -- --noplot >"${OUT}/fit.txt" 2>&1

log "scikit-learn ${SKLEARN_VERSION} on the same 10^6 rows"
"${MLCTL}" gen-data --rows 1000000 --seed 42 --out "${BENCH_DIR}/rows-1e6.csv"
if python3 -m venv "${BENCH_DIR}/venv" &&
    "${BENCH_DIR}/venv/bin/pip" install --quiet "scikit-learn==${SKLEARN_VERSION}" pandas; then
    "${BENCH_DIR}/venv/bin/python" - "${BENCH_DIR}/rows-1e6.csv" >"${OUT}/sklearn.json" <<'PY'
import json, sys, time
import pandas as pd
from sklearn.linear_model import LinearRegression
import sklearn
df = pd.read_csv(sys.argv[1])
X = df[["feature_1", "feature_2"]].assign(feature_3=df["feature_1"] ** 2).to_numpy()
y = df["target"].to_numpy()
times = []
for _ in range(10):
    t = time.perf_counter()
    LinearRegression().fit(X, y)
    times.append(time.perf_counter() - t)
times.sort()
print(json.dumps({"version": sklearn.__version__, "median_s": times[len(times) // 2], "min_s": times[0]}))
PY
else
    echo '{"error": "scikit-learn could not be installed"}' >"${OUT}/sklearn.json"
fi

log "the trainer at scale (bench/trainer.sh)"
BENCH_DIR="${BENCH_DIR}" bench/trainer.sh >/dev/null

log "the HTTP gateway against NATS and MLServer (bench/gateway.sh)"
BENCH_DIR="${BENCH_DIR}" bench/gateway.sh >/dev/null

log "writing BENCHMARKS.md"
python3 bench/report.py "${OUT}" >BENCHMARKS.md
log "done: BENCHMARKS.md"
