#!/usr/bin/env bash
# Start (or stop) a local platform for benchmarking: a private nats-server and
# the release binaries, logs and pids under $BENCH_DIR.
#
#   bench/stack.sh start [PREDICTORS]   # default 1 predictor replica
#   bench/stack.sh predictors N         # change the number of replicas
#   bench/stack.sh registry [VAR=VALUE...]  # restart the registry with this environment
#   bench/stack.sh stop
#
# NATS listens on $BENCH_PORT (default 14300); export
# NATS_URL=nats://127.0.0.1:$BENCH_PORT to talk to it.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
export PATH="${PATH}:/usr/sbin"
BENCH_DIR=${BENCH_DIR:-/tmp/mlplatform-bench}
BENCH_PORT=${BENCH_PORT:-14300}
BIN=${BIN:-target/release}
export NATS_URL="nats://127.0.0.1:${BENCH_PORT}"
export RUST_LOG=${RUST_LOG:-warn}

start_proc() { # name [env...] -- starts $BIN/name in the background
    local name=$1
    shift
    env "$@" "${BIN}/${name%%-*}" >"${BENCH_DIR}/${name}.log" 2>&1 &
    echo $! >"${BENCH_DIR}/${name}.pid"
}

stop_proc() {
    local pidfile=$1
    [ -f "${pidfile}" ] || return 0
    kill -TERM "$(cat "${pidfile}")" 2>/dev/null || true
    for _ in $(seq 50); do
        kill -0 "$(cat "${pidfile}")" 2>/dev/null || break
        sleep 0.1
    done
    kill -KILL "$(cat "${pidfile}")" 2>/dev/null || true
    rm -f "${pidfile}"
}

predictors() {
    local want=$1 have
    have=$(find "${BENCH_DIR}" -name 'predictor-*.pid' | wc -l)
    while [ "${have}" -lt "${want}" ]; do
        have=$((have + 1))
        start_proc "predictor-${have}" PREDICTOR_ID="predictor-${have}"
    done
    while [ "${have}" -gt "${want}" ]; do
        stop_proc "${BENCH_DIR}/predictor-${have}.pid"
        have=$((have - 1))
    done
    [ "${want}" -gt 0 ] || return 0
    # Wait until the replicas answer with a model.
    for _ in $(seq 100); do
        if "${BIN}/mlctl" predict --features feature_1=1,feature_2=1 >/dev/null 2>&1; then
            return 0
        fi
        sleep 0.1
    done
    echo "predictors did not serve within 10 s" >&2
    return 1
}

case "${1:-}" in
start)
    mkdir -p "${BENCH_DIR}"
    rm -rf "${BENCH_DIR}/registry" "${BENCH_DIR}/nats"
    nats-server -a 127.0.0.1 -p "${BENCH_PORT}" -js -sd "${BENCH_DIR}/nats" >"${BENCH_DIR}/nats.log" 2>&1 &
    echo $! >"${BENCH_DIR}/nats.pid"
    for _ in $(seq 100); do
        "${BIN}/mlctl" models >/dev/null 2>&1 && break
        grep -q "Server is ready" "${BENCH_DIR}/nats.log" && break
        sleep 0.1
    done
    start_proc registry REGISTRY_DIR="${BENCH_DIR}/registry"
    start_proc monitor MONITOR_INTERVAL="${MONITOR_INTERVAL:-10s}"
    start_proc trainer TRAIN_INTERVAL=0
    sleep 0.5
    "${BIN}/mlctl" train >/dev/null
    predictors "${2:-1}"
    ;;
predictors)
    predictors "$2"
    ;;
registry)
    shift
    stop_proc "${BENCH_DIR}/registry.pid"
    start_proc registry REGISTRY_DIR="${BENCH_DIR}/registry" "$@"
    for _ in $(seq 100); do
        "${BIN}/mlctl" models >/dev/null 2>&1 && exit 0
        sleep 0.1
    done
    echo "the registry did not answer within 10 s" >&2
    exit 1
    ;;
stop)
    for pidfile in "${BENCH_DIR}"/predictor-*.pid "${BENCH_DIR}"/trainer.pid "${BENCH_DIR}"/monitor.pid \
        "${BENCH_DIR}"/registry.pid "${BENCH_DIR}"/nats.pid; do
        stop_proc "${pidfile}"
    done
    ;;
*)
    echo "usage: $0 start [N] | predictors N | registry [VAR=VALUE...] | stop" >&2
    exit 2
    ;;
esac
