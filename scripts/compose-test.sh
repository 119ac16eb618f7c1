#!/usr/bin/env bash
# The README's Docker Compose path, live, on this machine's Docker engine:
# build, up, predictions through the published port as the `client` user,
# the monitor's status lines, three predictor replicas, NATS and the registry
# restarted under load, a killed predictor, down/up keeping the models (and
# registering no new version of unchanged data), down -v starting over, the
# operator's mlctl commands through `run --rm mlctl`, and the observability
# profile's Prometheus scraping the monitor, with every query of the Grafana
# dashboard sent to it.
#
# Runs with docker-compose (v1) and with `docker compose` (v2) when each is
# present; a missing one is skipped with a message, both missing is a
# failure. Base images that cannot be pulled are made first by
# scripts/local-images.sh (Docker engine without a reachable registry).
#
#   scripts/compose-test.sh                  # both spellings, whichever exist
#   COMPOSE_VARIANTS=v1 scripts/compose-test.sh
#   KEEP_IMAGES=1 scripts/compose-test.sh    # keep the built image and cache
#
# Each run uses its own project name (-p), ports picked free on 127.0.0.1
# and its own image tag, and removes on exit every container, network and
# volume of the project, the image it built and the dangling images that
# appeared while it ran (the builder stages). Every wait is bounded. Prints
# the build time, the image size and the time to the first prediction.
set -euo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.."
ROOT=$(pwd)

VARIANTS=${COMPOSE_VARIANTS:-v1 v2}
RUN_ID="mlct$$"
export MLPLATFORM_IMAGE="mlplatform:${RUN_ID}"
# Test settings: a short monitor window, scheduled training every 5 s so that
# a restart's first scheduled run is seen quickly.
export MONITOR_INTERVAL=2s TRAIN_INTERVAL=5s
export NATS_CLIENT_PASSWORD=${NATS_CLIENT_PASSWORD:-client-dev-password}

WORK=$(mktemp -d "${TMPDIR:-/tmp}/compose-test.XXXXXX")
FAILURES=()
PROJECT=""
COMPOSE=()

log() { printf '[compose-test %s] %s\n' "$(date -u +%H:%M:%S)" "$*"; }
fail() {
    log "FAIL: $*"
    FAILURES+=("${COMPOSE_NAME:-}: $*")
}
die() {
    log "FATAL: $*"
    exit 1
}

# --- Clean-up, whatever happens --------------------------------------------

DANGLING_BEFORE="${WORK}/dangling-before"
docker images -q --filter dangling=true | sort -u >"${DANGLING_BEFORE}"

project_down() {
    [ -n "${PROJECT}" ] || return 0
    log "removing project ${PROJECT} (containers, networks, volumes)"
    compose --profile observability --profile tools down -v --remove-orphans --timeout 10 \
        >"${WORK}/down.log" 2>&1 || cat "${WORK}/down.log"
    # Containers of `run` and anything else labelled with the project.
    local leftovers
    leftovers=$(docker ps -aq --filter "label=com.docker.compose.project=${PROJECT}")
    [ -z "${leftovers}" ] || docker rm -f ${leftovers} >/dev/null 2>&1 || true
    leftovers=$(docker volume ls -q --filter "label=com.docker.compose.project=${PROJECT}")
    [ -z "${leftovers}" ] || docker volume rm -f ${leftovers} >/dev/null 2>&1 || true
    leftovers=$(docker network ls -q --filter "label=com.docker.compose.project=${PROJECT}")
    [ -z "${leftovers}" ] || docker network rm ${leftovers} >/dev/null 2>&1 || true
    PROJECT=""
}

cleanup() {
    local rc=$?
    set +e
    jobs -p | xargs -r kill 2>/dev/null
    project_down
    if [ -z "${KEEP_IMAGES:-}" ]; then
        docker image rm "${MLPLATFORM_IMAGE}" >/dev/null 2>&1
        # Only the dangling images this run made: the builder and planner
        # stages (and their untagged parents, removed with them).
        docker images -q --filter dangling=true | sort -u >"${WORK}/dangling-after"
        local new
        new=$(comm -13 "${DANGLING_BEFORE}" "${WORK}/dangling-after")
        if [ -n "${new}" ]; then
            log "removing $(printf '%s\n' ${new} | wc -l) dangling image(s) made by this run"
            docker image rm ${new} >/dev/null 2>&1
        fi
    else
        log "KEEP_IMAGES set: ${MLPLATFORM_IMAGE} and the build cache are kept"
    fi
    rm -rf "${WORK}"
    exit "${rc}"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

# --- Helpers -----------------------------------------------------------------

compose() { "${COMPOSE[@]}" -p "${PROJECT}" -f "${ROOT}/docker-compose.yml" "$@"; }

# now_ms: wall clock in milliseconds.
now_ms() { date +%s%3N; }

# wait_until SECONDS DESCRIPTION COMMAND...: poll every 0.2 s; false on timeout.
wait_until() {
    local limit=$1 what=$2
    shift 2
    local deadline=$((SECONDS + limit))
    while ! "$@" >/dev/null 2>&1; do
        if [ "${SECONDS}" -ge "${deadline}" ]; then
            log "timed out after ${limit}s: ${what}"
            return 1
        fi
        sleep 0.2
    done
}

free_port() {
    python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'
}

# The host's mlctl as the `client` user, through the published port.
client() {
    NATS_URL="nats://127.0.0.1:${NATS_PORT}" NATS_USER=client NATS_PASSWORD="${NATS_CLIENT_PASSWORD}" \
        NATS_INBOX_PREFIX=_INBOX_client NATS_REQUEST_TIMEOUT=${REQUEST_TIMEOUT:-2s} \
        timeout 30 "${MLCTL}" "$@"
}

USER_ID=$(sed -n '2p' data/user_data.csv | cut -d, -f2)
predict_ok() { REQUEST_TIMEOUT=1s client predict "${USER_ID}" >"${WORK}/predict.out" 2>&1; }
# predicted_by TEXT: a prediction whose reply contains TEXT.
predicted_by() { predict_ok && grep -qF "$1" "${WORK}/predict.out"; }
PRODUCTION_BEFORE=""

# The operator's mlctl inside the compose network (the README's command).
operator() { timeout 120 "${COMPOSE[@]}" -p "${PROJECT}" -f "${ROOT}/docker-compose.yml" run --rm -T mlctl "$@"; }

# versions: the registry's model versions, one a line (through mlctl models).
versions() {
    operator models --json 2>>"${WORK}/operator.err" |
        python3 -c 'import json, sys; print("\n".join(str(m["version"]) for m in json.load(sys.stdin)["models"]))'
}

# bench_bg NAME SECONDS: a closed loop of 4 in flight as `client`, in the background.
bench_bg() {
    client bench --concurrency 4 --duration "$2s" >"${WORK}/bench-$1.out" 2>&1 &
    echo $! >"${WORK}/bench-$1.pid"
}
# bench_wait NAME: wait for it (in this shell: not inside $(...), where it is
# not a child), print its report and set BENCH_FAILED to its failed requests
# (-1 when it printed no report).
BENCH_FAILED=-1
bench_wait() {
    wait "$(cat "${WORK}/bench-$1.pid")" || true
    grep -v 'WARN\|ERROR' "${WORK}/bench-$1.out" | sed 's/^/    /'
    local line
    line=$(sed -n 's/.*: \([0-9]*\) requests, \([0-9]*\) ok in .*/\1 \2/p' "${WORK}/bench-$1.out")
    if [ -n "${line}" ]; then
        BENCH_FAILED=$((${line% *} - ${line#* }))
    else
        BENCH_FAILED=-1
    fi
}

monitor_counted() { compose logs --no-color monitor 2>/dev/null | grep -q 'window=.*count=[1-9]'; }
trainer_ran() { compose logs --no-color trainer 2>/dev/null | grep -Eq 'model registered|skipping the scheduled run'; }
registry_answers() { [ -n "$(versions)" ]; }
monitor_saw_predictors() {
    compose logs --no-color --tail 20 monitor 2>/dev/null | grep -q "predictors=$1 "
}

prom_query() {
    curl -fsS --max-time 5 "http://127.0.0.1:${PROM_PORT}/api/v1/query" --data-urlencode "query=$1"
}
prom_has_data() {
    prom_query "$1" | python3 -c 'import json, sys; r = json.load(sys.stdin); sys.exit(0 if r["status"] == "success" and r["data"]["result"] else 1)'
}

# --- Preparation ---------------------------------------------------------------

log "base images (scripts/local-images.sh)"
scripts/local-images.sh

MLCTL=${MLCTL:-}
if [ -z "${MLCTL}" ]; then
    log "building the host's mlctl (the client of the test)"
    cargo build --locked --quiet -p mlctl
    MLCTL="${ROOT}/target/debug/mlctl"
fi
"${MLCTL}" --version >/dev/null

# --- One full pass with one Compose spelling -----------------------------------

run_variant() {
    COMPOSE_NAME=$1
    case "$1" in
    v1) COMPOSE=(docker-compose) ;;
    v2) COMPOSE=(docker compose) ;;
    esac
    PROJECT="${RUN_ID}${1}"
    NATS_PORT=$(free_port)
    PROM_PORT=$(free_port)
    export NATS_HOST_PORT="127.0.0.1:${NATS_PORT}" PROMETHEUS_HOST_PORT="127.0.0.1:${PROM_PORT}"
    log "=== ${COMPOSE[*]} ($("${COMPOSE[@]}" version --short 2>/dev/null || true)), project ${PROJECT}, NATS on ${NATS_HOST_PORT}"

    # 1. Build (cold when the cache is empty) and start, as the README says.
    local cold="warm"
    docker image inspect "${MLPLATFORM_IMAGE}" >/dev/null 2>&1 || cold="first"
    local t0
    t0=$(now_ms)
    compose build >"${WORK}/build.log" 2>&1 || {
        tail -n 40 "${WORK}/build.log"
        die "build failed"
    }
    BUILD_S=$((($(now_ms) - t0) / 1000))
    IMAGE_MB=$(docker image inspect -f '{{.Size}}' "${MLPLATFORM_IMAGE}" | awk '{printf "%.0f", $1 / 1e6}')
    log "build (${cold} for this tag): ${BUILD_S}s; image ${MLPLATFORM_IMAGE}: ${IMAGE_MB} MB"

    t0=$(now_ms)
    compose up -d --build >"${WORK}/up.log" 2>&1 || {
        cat "${WORK}/up.log"
        die "up failed"
    }
    if wait_until 90 "a first prediction as client" predict_ok; then
        FIRST_MS=$(($(now_ms) - t0))
        log "first prediction $((FIRST_MS / 1000)).$((FIRST_MS % 1000 / 100))s after 'up -d --build' (fresh volumes: includes the first training): $(cat "${WORK}/predict.out")"
    else
        compose logs --no-color --tail 30
        die "no prediction through port ${NATS_PORT}"
    fi
    client predict --features feature_1=0.3,feature_2=1.5 >/dev/null || fail "prediction from raw features"
    if client predict no-such-user >"${WORK}/unknown.out" 2>&1; then
        fail "an unknown user id was answered: $(cat "${WORK}/unknown.out")"
    fi

    # 2. The monitor's status lines; logs without colour codes, no NATS chatter.
    if wait_until 30 "a monitor status line" monitor_counted; then
        log "monitor: $(compose logs --no-color monitor | grep 'window=.*count=[1-9]' | tail -n1 | sed 's/^[^|]*| //')"
    else
        fail "no monitor status line with requests"
    fi
    compose logs --no-color >"${WORK}/all.log" 2>&1
    if grep -q $'\e\[' "${WORK}/all.log"; then
        fail "ANSI colour codes in the services' logs: $(grep -c $'\e\[' "${WORK}/all.log") line(s)"
    fi
    if grep -E 'INFO (async_nats|hyper|axum)' "${WORK}/all.log" | head -n 3 | grep -q .; then
        fail "libraries' INFO lines in the default logs"
    fi

    # LOG_FORMAT=json: one JSON object a line; RUST_LOG still changes the
    # default (mlctl's is warnings only).
    if compose run --rm -T -e LOG_FORMAT=json -e RUST_LOG=info mlctl models \
        >/dev/null 2>"${WORK}/json.err"; then
        if python3 - "${WORK}/json.err" <<'EOF2'
import json, sys
lines = [l for l in open(sys.argv[1]) if l.startswith("{")]
events = [json.loads(l) for l in lines]
sys.exit(0 if events and all("level" in e and "fields" in e for e in events) else 1)
EOF2
        then
            log "LOG_FORMAT=json RUST_LOG=info: $(grep -c '^{' "${WORK}/json.err") JSON log line(s) from mlctl"
        else
            sed 's/^/    /' "${WORK}/json.err"
            fail "LOG_FORMAT=json did not give JSON log lines (or RUST_LOG=info was ignored)"
        fi
    else
        fail "run --rm mlctl models with LOG_FORMAT=json"
    fi

    # 3. The operator's commands through `run --rm mlctl` (admin user), and
    # what promote and rollback do to the predictions' model version.
    local cmd
    for cmd in "models" "runs" "train" "promote 1 --reason compose-test" "rollback --reason compose-test" "history"; do
        # shellcheck disable=SC2086
        if operator ${cmd} >"${WORK}/op.out" 2>&1; then
            log "run --rm mlctl ${cmd}: ok ($(wc -l <"${WORK}/op.out") lines)"
            # mlctl logs warnings only unless RUST_LOG says otherwise.
            if grep -q ' INFO ' "${WORK}/op.out"; then
                fail "run --rm mlctl ${cmd} printed INFO log lines"
            fi
            case "${cmd}" in
            promote*)
                wait_until 15 "predictions from version 1 after promote 1" predicted_by '"model_version":1,' ||
                    fail "predictions do not come from version 1 after promote 1"
                ;;
            rollback*)
                wait_until 15 "predictions from the version before promote 1 after rollback" \
                    predicted_by "\"model_version\":${PRODUCTION_BEFORE}," ||
                    fail "predictions do not come from version ${PRODUCTION_BEFORE} after rollback"
                ;;
            train)
                PRODUCTION_BEFORE=$(operator models --json 2>>"${WORK}/operator.err" |
                    python3 -c 'import json, sys; print(json.load(sys.stdin)["production"])')
                log "production after train: v${PRODUCTION_BEFORE}"
                ;;
            esac
        else
            grep -v '^Creating' "${WORK}/op.out" | sed 's/^/    /'
            fail "run --rm mlctl ${cmd}"
        fi
    done

    # 4. Three predictors, all answering.
    compose up -d --scale predictor=3 >"${WORK}/scale.log" 2>&1 || {
        cat "${WORK}/scale.log"
        fail "up --scale predictor=3"
    }
    local running
    running=$(compose ps -q predictor | wc -l)
    [ "${running}" -eq 3 ] || fail "${running} predictor containers instead of 3"
    bench_bg scale 8
    local failed
    bench_wait scale
    failed=${BENCH_FAILED}
    [ "${failed}" = 0 ] || fail "${failed} failed requests with three predictors"
    if wait_until 20 "predictors=3 in a monitor line" monitor_saw_predictors 3; then
        log "three predictors answered: $(compose logs --no-color --tail 20 monitor | grep 'predictors=3 ' | tail -n1 | grep -o 'count=[0-9]* .*predictors=3')"
    else
        fail "the monitor did not hear from three predictors"
    fi

    # 5. NATS restarted under load: a short outage, then everything answers.
    bench_bg nats 12
    sleep 2
    compose restart nats >/dev/null 2>&1 || fail "restart nats"
    bench_wait nats
    failed=${BENCH_FAILED}
    log "restart nats under load: ${failed} of the requests failed during the outage"
    wait_until 30 "predictions after the NATS restart" predict_ok || fail "no prediction after restart nats"

    # 6. The registry restarted under load: the predictors keep serving.
    bench_bg registry 8
    sleep 2
    compose restart registry >/dev/null 2>&1 || fail "restart registry"
    bench_wait registry
    failed=${BENCH_FAILED}
    [ "${failed}" = 0 ] || fail "${failed} failed requests while the registry restarted"
    wait_until 30 "the registry answering after its restart" registry_answers ||
        fail "the registry does not answer after its restart"

    # 7. A predictor killed under load: at most the requests in flight on it.
    bench_bg kill 8
    sleep 2
    docker kill "$(compose ps -q predictor | head -n1)" >/dev/null || fail "docker kill predictor"
    bench_wait kill
    failed=${BENCH_FAILED}
    log "docker kill predictor under load (4 in flight): ${failed} request(s) failed"
    if [ "${failed}" -lt 0 ] || [ "${failed}" -gt 4 ]; then
        fail "${failed} failed requests when one predictor was killed (at most the 4 in flight expected)"
    fi
    predict_ok || fail "no prediction after a predictor was killed"

    # 8. Observability: Prometheus scrapes the monitor; the dashboard's queries.
    compose --profile observability up -d prometheus >"${WORK}/prom.log" 2>&1 || {
        cat "${WORK}/prom.log"
        fail "up prometheus"
    }
    bench_bg prom 20
    if wait_until 60 "Prometheus scraping the monitor" prom_has_data 'up{job="monitor"} == 1'; then
        log "Prometheus scrapes the monitor (up{job=\"monitor\"} == 1)"
    else
        fail "Prometheus does not scrape the monitor"
    fi
    client predict no-such-user >/dev/null 2>&1 || true
    bench_wait prom
    wait_until 30 "request counts in Prometheus" prom_has_data 'sum(rate(ml_predict_requests_total[1m])) > 0' ||
        fail "no request rate in Prometheus"
    check_dashboard

    # 9. down / up: models kept, no new version of unchanged data.
    local before after
    before=$(versions | tr '\n' ' ')
    compose --profile observability down >/dev/null 2>&1 || fail "down"
    t0=$(now_ms)
    compose up -d >"${WORK}/up2.log" 2>&1 || fail "up after down"
    if wait_until 60 "a prediction after down/up" predict_ok; then
        local ms=$(($(now_ms) - t0))
        UP_WARM_MS=${ms}
        log "first prediction $((ms / 1000)).$((ms % 1000 / 100))s after 'up -d' (images built, models on the volume)"
    else
        fail "no prediction after down/up"
    fi
    # The trainer's first scheduled run after the restart, then the versions.
    wait_until 30 "the trainer's first run after up" trainer_ran ||
        fail "no trainer run after down/up"
    after=$(versions | tr '\n' ' ')
    log "versions before down: ${before:-none}; after up: ${after:-none}"
    [ -n "${before}" ] || fail "no versions before down"
    case "${after}" in
    "${before}"*) ;;
    *) fail "models lost over down/up (${before} -> ${after})" ;;
    esac
    [ "${after}" = "${before}" ] ||
        fail "the trainer registered a new version of unchanged data after down/up (${before} -> ${after})"

    # 10. down -v: everything starts over.
    compose --profile observability down -v >/dev/null 2>&1 || fail "down -v"
    t0=$(now_ms)
    compose up -d >"${WORK}/up3.log" 2>&1 || fail "up after down -v"
    if wait_until 90 "a prediction after down -v / up" predict_ok; then
        local ms=$(($(now_ms) - t0))
        log "first prediction $((ms / 1000)).$((ms % 1000 / 100))s after 'up -d' on empty volumes (images built)"
        UP_COLD_MS=${ms}
    else
        fail "no prediction after down -v"
    fi
    after=$(versions | tr '\n' ' ')
    [ "${after}" = "1 " ] || fail "after down -v the registry holds versions '${after}', not just 1"

    project_down
    log "=== ${COMPOSE_NAME} done: build ${BUILD_S}s, image ${IMAGE_MB} MB, first prediction ${FIRST_MS} ms (up --build, empty volumes), ${UP_WARM_MS:-?} ms (up, models kept), ${UP_COLD_MS:-?} ms (up, empty volumes)"
}

# Every query of the Grafana dashboard, with Grafana's $__rate_interval
# replaced by 1m, must parse in Prometheus and return data.
check_dashboard() {
    local expr ok=0 total=0
    while IFS= read -r expr; do
        total=$((total + 1))
        if wait_until 30 "data for ${expr}" prom_has_data "${expr}"; then
            ok=$((ok + 1))
        else
            log "  no data (or no parse): ${expr}: $(prom_query "${expr}" 2>&1 | head -c 300)"
            fail "dashboard query without data: ${expr}"
        fi
    done < <(python3 - deploy/grafana/dashboards/mlplatform.json <<'EOF'
import json, sys
dashboard = json.load(open(sys.argv[1]))
def panels(items):
    for panel in items:
        yield panel
        yield from panels(panel.get("panels", []))
for panel in panels(dashboard["panels"]):
    for target in panel.get("targets", []):
        if target.get("expr"):
            print(target["expr"].replace("$__rate_interval", "1m").replace("$__interval", "15s"))
EOF
    )
    log "Grafana dashboard: ${ok} of ${total} panel queries return data from Prometheus"
    [ "${total}" -gt 0 ] || fail "no queries found in the dashboard"
}

ran=0
for variant in ${VARIANTS}; do
    case "${variant}" in
    v1) probe=(docker-compose version) ;;
    v2) probe=(docker compose version) ;;
    *) die "unknown variant ${variant} (v1 or v2)" ;;
    esac
    if ! "${probe[@]}" >/dev/null 2>&1; then
        log "skipping ${variant}: '${probe[*]}' is not available on this machine"
        continue
    fi
    run_variant "${variant}"
    ran=$((ran + 1))
done
[ "${ran}" -gt 0 ] || die "neither docker-compose (v1) nor docker compose (v2) is available"

if [ "${#FAILURES[@]}" -gt 0 ]; then
    log "${#FAILURES[@]} check(s) failed:"
    printf '  - %s\n' "${FAILURES[@]}"
    exit 1
fi
log "all checks passed"
