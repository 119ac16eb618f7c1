#!/usr/bin/env bash
# The HTTP gateway against `ml.predict` on NATS and against MLServer, with the
# same load client; writes its figures to $BENCH_DIR/results/gateway/, prints
# the "HTTP gateway" section of BENCHMARKS.md (bench/gateway_report.py) and
# puts it in BENCHMARKS.md in place of the old one.
#
#   bench/gateway.sh            # about 6 minutes on 2 cores; needs nats-server, wrk, python3
#
# BENCH_DIR, BENCH_PORT (the private platform, as bench/stack.sh),
# GATEWAY_BENCH_PORT and MLSERVER_BENCH_PORT (+1, +2: its gRPC and metrics)
# choose where it runs; BENCH_SECS, BENCH_WARMUP_SECS, BENCH_ROUNDS and
# WRK_THREADS how long and how. bench/run.sh runs it too.
#
# Steps: release build of the platform and the gateway; a private platform
# (bench/stack.sh: nats-server, registry, monitor, trainer, one predictor);
# the gateway; MLServer 1.7 with mlserver-sklearn (pinned, from PyPI, in a
# virtualenv under target/) serving scikit-learn's LinearRegression trained
# on the file the platform trains on (bench/gateway_model.py). Then, for each
# round and for 1 and 32 requests in flight (closed loop, $SECS s each after
# a $WARMUP s warm-up): `mlctl bench` on NATS, and `wrk --latency` with
# bench/gateway.lua against the gateway's OIP infer (features FP64 and
# user_id BYTES), the gateway's /v1/predict and MLServer's OIP infer (the
# same features body). Every process it starts is stopped on exit.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
ROOT=$(pwd)
export PATH="${PATH}:/usr/sbin"
export BENCH_DIR=${BENCH_DIR:-/tmp/mlplatform-bench}
export BENCH_PORT=${BENCH_PORT:-14300}
export NATS_URL="nats://127.0.0.1:${BENCH_PORT}"
export RUST_LOG=${RUST_LOG:-warn}
GW_PORT=${GATEWAY_BENCH_PORT:-18090}
MLS_PORT=${MLSERVER_BENCH_PORT:-18091}
SECS=${BENCH_SECS:-10}
WARMUP=${BENCH_WARMUP_SECS:-2}
ROUNDS=${BENCH_ROUNDS:-2}
WRK_THREADS=${WRK_THREADS:-1}
MLSERVER_VERSION=1.7.1
# uvloop 0.22 breaks MLServer 1.7.1's inference workers ("There is no current
# event loop"), so the last release before it is pinned.
UVLOOP_VERSION=0.21.0
OUT=${BENCH_DIR}/results/gateway
VENV=target/mlserver-venv
DATA=data/user_data.csv
MLCTL=target/release/mlctl
rm -rf "${OUT}"
mkdir -p "${OUT}"

log() { printf '==> %s\n' "$*" >&2; }

machine() { # phase -> $OUT/load-phase.txt
    cut -d' ' -f1-3 /proc/loadavg >"${OUT}/load-$1.txt"
}
machine before

log "building release binaries"
cargo build --release --locked -p gateway -p mlctl -p registry -p trainer -p monitor -p predictor

log "MLServer ${MLSERVER_VERSION} in ${VENV}"
if ! "${VENV}/bin/pip" list 2>/dev/null | grep -Eq "^mlserver +${MLSERVER_VERSION}\b"; then
    python3 -m venv "${VENV}"
    "${VENV}/bin/pip" install --quiet "mlserver==${MLSERVER_VERSION}" \
        "mlserver-sklearn==${MLSERVER_VERSION}" "uvloop==${UVLOOP_VERSION}"
fi

GW_PID=
MLS_PID=
stop_pid() { # pid: TERM, up to 10 s, then KILL (its process group for MLServer)
    local pid=$1 target=$2
    [ -n "${pid}" ] || return 0
    kill -TERM "${target}" 2>/dev/null || true
    for _ in $(seq 100); do
        kill -0 "${pid}" 2>/dev/null || return 0
        sleep 0.1
    done
    kill -KILL "${target}" 2>/dev/null || true
}
cleanup() {
    stop_pid "${GW_PID}" "${GW_PID}"
    [ -z "${MLS_PID}" ] || stop_pid "${MLS_PID}" "-${MLS_PID}"
    bench/stack.sh stop
}
trap cleanup EXIT
bench/stack.sh stop || true
log "platform (bench/stack.sh) on ${NATS_URL}"
bench/stack.sh start 1

wait_http() { # url name: up to 60 s for a 200
    for _ in $(seq 600); do
        curl -sf -o /dev/null "$1" && return 0
        sleep 0.1
    done
    echo "$2 did not get ready within 60 s" >&2
    return 1
}

log "gateway on 127.0.0.1:${GW_PORT}"
target/release/gateway --addr "127.0.0.1:${GW_PORT}" >"${BENCH_DIR}/gateway.log" 2>&1 &
GW_PID=$!
wait_http "http://127.0.0.1:${GW_PORT}/v2/models/mlplatform/ready" gateway

log "MLServer on 127.0.0.1:${MLS_PORT}"
rm -rf "${BENCH_DIR}/mlserver"
"${VENV}/bin/python" bench/gateway_model.py "${DATA}" "${BENCH_DIR}/mlserver/sklearn" \
    "${MLS_PORT}" "$((MLS_PORT + 1))" "$((MLS_PORT + 2))" >"${OUT}/sklearn-model.json"
(cd "${BENCH_DIR}/mlserver" && exec setsid "${ROOT}/${VENV}/bin/mlserver" start . \
    >"${BENCH_DIR}/mlserver.log" 2>&1) &
MLS_PID=$!
wait_http "http://127.0.0.1:${MLS_PORT}/v2/models/sklearn/ready" MLServer

# One row of the training file: its user id and raw features.
IFS=, read -r _ USER_ID F1 F2 _ < <(sed -n 2p "${DATA}")
FEATURES_BODY="{\"inputs\":[{\"name\":\"features\",\"shape\":[1,2],\"datatype\":\"FP64\",\"data\":[${F1},${F2}]}]}"
USER_BODY="{\"inputs\":[{\"name\":\"user_id\",\"shape\":[1],\"datatype\":\"BYTES\",\"data\":[\"${USER_ID}\"]}]}"
V1_BODY="{\"user_id\":\"${USER_ID}\"}"
GW=http://127.0.0.1:${GW_PORT}
MLS=http://127.0.0.1:${MLS_PORT}
# The same row through both, kept for the report (the two models agree).
curl -sf -H 'Content-Type: application/json' -d "${FEATURES_BODY}" \
    "${GW}/v2/models/mlplatform/infer" >"${OUT}/gateway-features.reply.json"
curl -sf -H 'Content-Type: application/json' -d "${FEATURES_BODY}" \
    "${MLS}/v2/models/sklearn/infer" >"${OUT}/mlserver-features.reply.json"

point() { # name concurrency url body -> $OUT/name-cC.json (and .txt)
    local name=$1 c=$2 url=$3 body=$4 threads=1 file
    [ "$2" -lt "${WRK_THREADS}" ] || threads=${WRK_THREADS}
    file="${OUT}/${name}-c${c}-r${round}"
    log "round ${round}: ${name} at ${c} in flight"
    WRK_BODY=${body} wrk -t "${threads}" -c "${c}" -d "${WARMUP}s" -s bench/gateway.lua "${url}" >/dev/null
    WRK_BODY=${body} wrk -t "${threads}" -c "${c}" -d "${SECS}s" --latency -s bench/gateway.lua "${url}" >"${file}.txt"
    python3 - "${file}" "${name}" "${c}" "${threads}" "${url}" "${round}" <<'PY'
import json, sys
file, name, c, threads, url, rnd = sys.argv[1:]
line = next(l for l in open(file + ".txt") if l.startswith("WRK_JSON "))
r = json.loads(line[len("WRK_JSON "):])
r.update(name=name, client="wrk", concurrency=int(c), threads=int(threads), url=url, round=int(rnd))
json.dump(r, open(file + ".json", "w"))
PY
}

for round in $(seq "${ROUNDS}"); do
    for c in 1 32; do
        log "round ${round}: mlctl bench at ${c} in flight"
        "${MLCTL}" bench --json --concurrency "${c}" --warmup "${WARMUP}s" --duration "${SECS}s" \
            >"${OUT}/nats-c${c}-r${round}.json"
        point gateway-features "${c}" "${GW}/v2/models/mlplatform/infer" "${FEATURES_BODY}"
        point gateway-user "${c}" "${GW}/v2/models/mlplatform/infer" "${USER_BODY}"
        point gateway-v1 "${c}" "${GW}/v1/predict" "${V1_BODY}"
        point mlserver-features "${c}" "${MLS}/v2/models/sklearn/infer" "${FEATURES_BODY}"
    done
done

{
    echo "threads_gateway=$(ls "/proc/${GW_PID}/task" | wc -l)"
    echo "threads_mlserver=$(pgrep -g "${MLS_PID}" | xargs -I{} ls /proc/{}/task | wc -l)"
    echo "processes_mlserver=$(pgrep -g "${MLS_PID}" | wc -l)"
} >"${OUT}/threads.txt"
cleanup
trap - EXIT
machine after

{
    echo "nproc=$(nproc)"
    echo "cpu=$(lscpu | sed -n 's/^Model name:[[:space:]]*//p')"
    echo "mem_gib=$(free -g | awk '/Mem:/ {print $2}')"
    echo "kernel=$(uname -r)"
    echo "rustc=$(rustc --version)"
    echo "nats=$(nats-server --version)"
    echo "wrk=$(wrk -v 2>&1 | head -1)"
    echo "python=$("${VENV}/bin/python" --version)"
    echo "pip=$("${VENV}/bin/pip" list 2>/dev/null | awk '/^(mlserver|mlserver-sklearn|scikit-learn|numpy|uvloop|uvicorn|fastapi) / {printf "%s %s, ", $1, $2}')"
    echo "secs=${SECS}"
    echo "warmup=${WARMUP}"
    echo "wrk_threads=${WRK_THREADS}"
} >"${OUT}/machine.txt"
python3 bench/gateway_report.py "${OUT}" | tee "${OUT}/section.md"
python3 - BENCHMARKS.md "${OUT}/section.md" <<'PY'
import re, sys
path, section = sys.argv[1], open(sys.argv[2]).read().rstrip() + "\n\n"
text = open(path).read()
pattern = re.compile(r"^## HTTP gateway.*?(?=^## )", re.S | re.M)
text = pattern.sub(lambda _: section, text, count=1) if pattern.search(text) else text.rstrip() + "\n\n" + section
open(path, "w").write(text)
PY
log "done: BENCHMARKS.md"
