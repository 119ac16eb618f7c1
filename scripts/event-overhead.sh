#!/usr/bin/env bash
# What the monitor's latency events cost the predictor: `mlctl bench` against
# one predictor with events on (and the monitor consuming them, with feature
# samples for drift) and with EVENTS=off, alternating, several runs each.
#
#   cargo build --release && scripts/event-overhead.sh [RUNS] [CONCURRENCY] [DURATION]
#
# Everything runs on this machine: a private nats-server on a free port, the
# registry, trainer and monitor, and one predictor restarted per run. Prints
# one line per run and the mean and spread of each configuration.
set -euo pipefail

RUNS=${1:-5}
CONCURRENCY=${2:-32}
DURATION=${3:-10s}
BIN=${BIN:-target/release}
export PATH="${PATH}:/usr/sbin"

cd "$(dirname "${BASH_SOURCE[0]}")/.."
WORK=$(mktemp -d)
PIDS=()
cleanup() {
    for pid in "${PIDS[@]}"; do kill "${pid}" 2>/dev/null || true; done
    wait 2>/dev/null || true
    rm -rf "${WORK}"
}
trap cleanup EXIT

PORT=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')
nats-server -a 127.0.0.1 -p "${PORT}" -sd "${WORK}/nats" >"${WORK}/nats.log" 2>&1 &
PIDS+=($!)
export NATS_URL="nats://127.0.0.1:${PORT}" DATA_PATH=data/user_data.csv RUST_LOG=warn
sleep 1

REGISTRY_DIR="${WORK}/registry" "${BIN}/registry" >"${WORK}/registry.log" 2>&1 &
PIDS+=($!)
TRAIN_INTERVAL=1h "${BIN}/trainer" >"${WORK}/trainer.log" 2>&1 &
PIDS+=($!)
MONITOR_INTERVAL=10s "${BIN}/monitor" >"${WORK}/monitor.out" 2>"${WORK}/monitor.log" &
PIDS+=($!)

run_once() { # $1: on|off
    EVENTS=$1 "${BIN}/predictor" >"${WORK}/predictor-$1.log" 2>&1 &
    local pid=$!
    # Until it serves the model.
    for _ in $(seq 100); do
        if "${BIN}/mlctl" predict --features feature_1=0.3,feature_2=1.5 >/dev/null 2>&1; then break; fi
        sleep 0.2
    done
    "${BIN}/mlctl" bench --concurrency "${CONCURRENCY}" --duration "${DURATION}" --warmup 2s --json \
        | python3 -c 'import json,sys; r=json.load(sys.stdin); print(round(r["throughput_rps"]), r["latency_ms"]["p50"], r["latency_ms"]["p99"], sum(r["errors"].values()))'
    kill -TERM "${pid}"
    wait "${pid}" || true
}

: >"${WORK}/results"
for run in $(seq "${RUNS}"); do
    for mode in on off; do
        read -r rps p50 p99 errors < <(run_once "${mode}")
        echo "run ${run} events=${mode}: ${rps} req/s p50=${p50}ms p99=${p99}ms errors=${errors}"
        echo "${mode} ${rps}" >>"${WORK}/results"
    done
done

python3 - "${WORK}/results" <<'PY'
import statistics, sys
runs = {"on": [], "off": []}
for line in open(sys.argv[1]):
    mode, rps = line.split()
    runs[mode].append(float(rps))
for mode in ("off", "on"):
    v = runs[mode]
    print(f"events={mode}: mean {statistics.mean(v):,.0f} req/s, sd {statistics.stdev(v) if len(v) > 1 else 0:,.0f}, min {min(v):,.0f}, max {max(v):,.0f} ({len(v)} runs)")
off, on = statistics.mean(runs["off"]), statistics.mean(runs["on"])
print(f"overhead of events (on vs off): {100 * (off - on) / off:.1f}% of throughput")
PY
echo "monitor's last lines:"
tail -n 3 "${WORK}/monitor.out"
