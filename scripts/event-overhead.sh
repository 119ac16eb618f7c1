#!/usr/bin/env bash
# What the monitor's latency events cost the predictor: `mlctl bench` against
# one predictor with events on (and the monitor consuming them, with feature
# samples for drift) and with EVENTS=off, alternating, several runs each.
#
#   cargo build --release && scripts/event-overhead.sh [RUNS] [CONCURRENCY] [DURATION]
#
# MODES (default "on off") may also name "nosample": events on, EVENT_SAMPLE=0.
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
NATS_PID=$!
PIDS+=("${NATS_PID}")
export NATS_URL="nats://127.0.0.1:${PORT}" DATA_PATH=data/user_data.csv RUST_LOG=warn
sleep 1

REGISTRY_DIR="${WORK}/registry" "${BIN}/registry" >"${WORK}/registry.log" 2>&1 &
PIDS+=($!)
TRAIN_INTERVAL=1h "${BIN}/trainer" >"${WORK}/trainer.log" 2>&1 &
PIDS+=($!)
MONITOR_INTERVAL=10s "${BIN}/monitor" >"${WORK}/monitor.out" 2>"${WORK}/monitor.log" &
MONITOR_PID=$!
PIDS+=("${MONITOR_PID}")

# CPU seconds (user + system) a process has used.
cpu() { awk '{ printf "%.2f", ($14 + $15) / 100 }' "/proc/$1/stat"; }

run_once() { # $1: on|off|nosample
    local events=$1 sample=1
    if [ "$1" = nosample ]; then events=on sample=0; fi
    EVENTS=${events} EVENT_SAMPLE=${sample} "${BIN}/predictor" >"${WORK}/predictor-$1.log" 2>&1 &
    local pid=$!
    # Until it serves the model.
    for _ in $(seq 100); do
        if "${BIN}/mlctl" predict --features feature_1=0.3,feature_2=1.5 >/dev/null 2>&1; then break; fi
        sleep 0.2
    done
    local before after
    before="$(cpu "${pid}") $(cpu "${MONITOR_PID}") $(cpu "${NATS_PID}")"
    "${BIN}/mlctl" bench --concurrency "${CONCURRENCY}" --duration "${DURATION}" --warmup 2s --json >"${WORK}/bench.json"
    sleep 0.5 # the last events reach the monitor
    after="$(cpu "${pid}") $(cpu "${MONITOR_PID}") $(cpu "${NATS_PID}")"
    python3 - "${WORK}/bench.json" ${before} ${after} <<'PY'
import json, sys
r = json.load(open(sys.argv[1]))
b = [float(x) for x in sys.argv[2:5]]
a = [float(x) for x in sys.argv[5:8]]
# CPU over the warm-up and measured time, per request measured: an upper
# bound, the same for every mode.
per_req = lambda i: 1e6 * (a[i] - b[i]) / r["requests"]
print(round(r["throughput_rps"]), r["latency_ms"]["p50"], r["latency_ms"]["p99"],
      sum(r["errors"].values()), f"{per_req(0):.2f}", f"{per_req(1):.2f}", f"{per_req(2):.2f}")
PY
    kill -TERM "${pid}"
    wait "${pid}" || true
}

: >"${WORK}/results"
for run in $(seq "${RUNS}"); do
    for mode in ${MODES:-on off}; do
        read -r rps p50 p99 errors cpu_pred cpu_mon cpu_nats < <(run_once "${mode}")
        echo "run ${run} events=${mode}: ${rps} req/s p50=${p50}ms p99=${p99}ms errors=${errors}" \
            "cpu µs/request: predictor ${cpu_pred} monitor ${cpu_mon} nats-server ${cpu_nats}"
        echo "${mode} ${rps} ${cpu_pred} ${cpu_mon} ${cpu_nats}" >>"${WORK}/results"
    done
done

python3 - "${WORK}/results" <<'PY'
import statistics, sys
runs = {}
for line in open(sys.argv[1]):
    mode, *values = line.split()
    runs.setdefault(mode, []).append([float(v) for v in values])
sd = lambda v: statistics.stdev(v) if len(v) > 1 else 0.0
for mode, rows in runs.items():
    rps = [r[0] for r in rows]
    cpu = [sum(r[1:]) for r in rows]
    print(f"events={mode}: mean {statistics.mean(rps):,.0f} req/s, sd {sd(rps):,.0f},"
          f" min {min(rps):,.0f}, max {max(rps):,.0f} ({len(rps)} runs);"
          f" cpu (predictor + monitor + nats-server) {statistics.mean(cpu):.2f} µs/request, sd {sd(cpu):.2f}")
off = runs["off"]
off_rps = statistics.mean(r[0] for r in off)
off_cpu = statistics.mean(sum(r[1:]) for r in off)
for mode, rows in runs.items():
    if mode != "off":
        rps = statistics.mean(r[0] for r in rows)
        cpu = statistics.mean(sum(r[1:]) for r in rows)
        print(f"events={mode} against off: throughput {100 * (rps - off_rps) / off_rps:+.1f}%,"
              f" cpu per request {100 * (cpu - off_cpu) / off_cpu:+.1f}%")
PY
echo "monitor's last lines:"
tail -n 3 "${WORK}/monitor.out"
