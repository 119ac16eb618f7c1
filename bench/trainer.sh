#!/usr/bin/env bash
# The trainer at scale, side by side with pandas and scikit-learn on the same
# rows; writes its figures to $BENCH_DIR/results/trainer/ and prints the
# "Trainer at scale" section of BENCHMARKS.md (bench/trainer_report.py).
#
#   bench/trainer.sh            # about 10 minutes on 2 cores; needs nats-server, python3
#
# Steps: release build; `mlctl gen-data` of 10^6 and 10^7 rows (timed);
# criterion (`cargo bench -p trainer --bench fit`); scikit-learn's
# LinearRegression.fit on the 10^6 x 3 matrix in memory and pandas.read_csv +
# fit on the 10^6-row file (pinned versions from PyPI in a throwaway
# virtualenv); then the trainer binary, as a real process against a private
# nats-server and registry, on the 10^6 file and on 10^7 rows (linear and
# logistic): wall time of `mlctl train`, rows/s, peak RSS (VmHWM).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
export PATH="${PATH}:/usr/sbin"
BENCH_DIR=${BENCH_DIR:-/tmp/mlplatform-bench}
PORT=${TRAINER_BENCH_PORT:-14310}
OUT=${BENCH_DIR}/results/trainer
WORK=${BENCH_DIR}/trainer
BIG_ROWS=${BIG_ROWS:-10000000}
SKLEARN_VERSION=1.5.2
PANDAS_VERSION=2.2.3
export NATS_URL="nats://127.0.0.1:${PORT}"
mkdir -p "${OUT}" "${WORK}"
MLCTL=target/release/mlctl

log() { printf '==> %s\n' "$*" >&2; }
now() { date +%s.%N; }

log "building release binaries"
cargo build --release --locked -p trainer -p registry -p mlctl

gen() { # rows target file
    local t0 t1
    t0=$(now)
    "${MLCTL}" gen-data --rows "$1" --target "$2" --seed 42 --out "$3" 2>/dev/null
    t1=$(now)
    echo "{\"rows\": $1, \"target\": \"$2\", \"seconds\": $(awk "BEGIN {printf \"%.3f\", $t1 - $t0}"), \"bytes\": $(stat -c %s "$3")}"
}
log "generating data"
gen 1000000 regression "${WORK}/rows-1e6.csv" >"${OUT}/gen-1e6.json"
gen "${BIG_ROWS}" regression "${WORK}/rows-big.csv" >"${OUT}/gen-big.json"
gen "${BIG_ROWS}" binary "${WORK}/rows-big-binary.csv" >"${OUT}/gen-big-binary.json"

log "criterion: cargo bench -p trainer --bench fit"
cargo bench --locked -p trainer --bench fit -- --noplot >"${OUT}/fit.txt" 2>&1

log "scikit-learn ${SKLEARN_VERSION} and pandas ${PANDAS_VERSION}"
if [ ! -x "${BENCH_DIR}/venv-trainer/bin/python" ]; then
    python3 -m venv "${BENCH_DIR}/venv-trainer"
    "${BENCH_DIR}/venv-trainer/bin/pip" install --quiet "scikit-learn==${SKLEARN_VERSION}" "pandas==${PANDAS_VERSION}"
fi
# numpy's OpenBLAS picks its kernels from these when set; unset for this
# command only, so that scikit-learn runs as it would on a plain machine.
env -u OPENBLAS_CORETYPE -u OPENBLAS_L2_SIZE "${BENCH_DIR}/venv-trainer/bin/python" - "${WORK}/rows-1e6.csv" >"${OUT}/sklearn.json" <<'PY'
import json, sys, time
import pandas as pd
import sklearn
from sklearn.linear_model import LinearRegression

def read_and_fit(path):
    df = pd.read_csv(path)
    X = df[["feature_1", "feature_2"]].assign(feature_3=df["feature_1"] ** 2).to_numpy()
    y = df["target"].to_numpy()
    model = LinearRegression().fit(X, y)
    return X, y, model

end_to_end = []
for _ in range(5):
    t = time.perf_counter()
    X, y, _ = read_and_fit(sys.argv[1])
    end_to_end.append(time.perf_counter() - t)
fit = []
for _ in range(10):
    t = time.perf_counter()
    LinearRegression().fit(X, y)
    fit.append(time.perf_counter() - t)
fit.sort()
end_to_end.sort()
print(json.dumps({
    "sklearn": sklearn.__version__, "pandas": pd.__version__,
    "fit_median_s": fit[len(fit) // 2], "fit_min_s": fit[0],
    "end_to_end_median_s": end_to_end[len(end_to_end) // 2], "end_to_end_min_s": end_to_end[0],
}))
PY

log "the trainer as a process"
stop() { # pidfile
    [ -f "$1" ] || return 0
    kill -TERM "$(cat "$1")" 2>/dev/null || true
    for _ in $(seq 100); do
        kill -0 "$(cat "$1")" 2>/dev/null || break
        sleep 0.1
    done
    rm -f "$1"
}
cleanup() {
    stop "${WORK}/trainer.pid"
    stop "${WORK}/registry.pid"
    stop "${WORK}/nats.pid"
}
trap cleanup EXIT
rm -rf "${WORK}/registry"
nats-server -a 127.0.0.1 -p "${PORT}" >"${WORK}/nats.log" 2>&1 &
echo $! >"${WORK}/nats.pid"
for _ in $(seq 100); do
    grep -q "Server is ready" "${WORK}/nats.log" && break
    sleep 0.1
done
RUST_LOG=warn REGISTRY_DIR="${WORK}/registry" target/release/registry >"${WORK}/registry.log" 2>&1 &
echo $! >"${WORK}/registry.pid"
sleep 0.5

train() { # name file model
    local name=$1 file=$2 model=$3 pid t0 t1 hwm
    RUST_LOG=info DATA_PATH="${file}" MODEL="${model}" TRAIN_INTERVAL=0 SUBMIT_TIMEOUT=120s \
        target/release/trainer >"${OUT}/${name}.log" 2>&1 &
    pid=$!
    echo "${pid}" >"${WORK}/trainer.pid"
    for _ in $(seq 100); do
        grep -q "trainer started" "${OUT}/${name}.log" && break
        sleep 0.1
    done
    sleep 0.3
    t0=$(now)
    "${MLCTL}" train --timeout 1200s >"${OUT}/${name}.reply.json"
    t1=$(now)
    hwm=$(awk '/VmHWM/ {print $2}' "/proc/${pid}/status")
    stop "${WORK}/trainer.pid"
    echo "{\"name\": \"${name}\", \"model\": \"${model}\", \"bytes\": $(stat -c %s "${file}"), \"seconds\": $(awk "BEGIN {printf \"%.3f\", $t1 - $t0}"), \"vmhwm_kb\": ${hwm}}" >"${OUT}/${name}.json"
    log "${name}: $(cat "${OUT}/${name}.json")"
}
train train-1e6 "${WORK}/rows-1e6.csv" linear
train train-big-linear "${WORK}/rows-big.csv" linear
train train-big-logistic "${WORK}/rows-big-binary.csv" logistic
cleanup
trap - EXIT

{
    uname -a
    nproc
    rustc --version
    lscpu | sed -n 's/^Model name:[[:space:]]*//p'
    free -g | awk '/Mem:/ {print $2}'
    cut -d' ' -f1-3 /proc/loadavg
} >"${OUT}/machine.txt"
python3 bench/trainer_report.py "${OUT}"
