#!/usr/bin/env bash
# compose-smoke.sh: docker-compose.yml, exercised end to end with Docker Compose v2 or later.
#
# Gets a Compose (scripts/docker.sh compose: the machine's, else Docker Compose v5.6.0
# built and installed as the Docker CLI plugin), then runs what the README tells users to
# run, under a project name of its own on free host ports:
#   docker compose config -q      the file is valid
#   docker compose build          the bridge image, from the Dockerfile (on local base
#                                 images when no registry answers)
#   docker compose up -d
# and checks:
#   1. depends_on is health-gated: each bridge started only after its broker had passed
#      its health check;
#   2. a callback posted to each bridge is read back from Kafka and from JetStream;
#   3. with the brokers stopped, callbacks are accepted, the bridge containers are
#      re-created (on the same outbox volumes), the brokers come back, and those callbacks
#      arrive: the outbox volumes kept them;
# then tears everything down (volumes included).
#
# Exit status: 0 passed, 1 a check failed, 2 the stack could not be set up although the
# engine runs (no Compose, image build failed, ...), 3 no Docker engine. The last line
# says why (`compose-smoke: FAILED: ...`, `compose-smoke: cannot set up the stack: ...`).
#
# HOOKBRIDGE_TEST_SMOKE_KEEP=1 leaves the stack running for a look (`<compose> -p NAME down -v` later).
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
DOCKER=$ROOT/scripts/docker.sh
cd "$ROOT"

# Bounded waits, in seconds.
READY_TIMEOUT=180
ARRIVE_TIMEOUT=180

log() { printf 'compose-smoke: %s\n' "$*" >&2; }

TMP=$(mktemp -d "${TMPDIR:-/tmp}/hookbridge-smoke.XXXXXX")
PROJECT=hookbridge-smoke-$$
COMPOSE=()
STACK=0 # 1 once `up` ran: there is a stack to tear down
EVENTS= # the pid of the `docker events` recording `up`

compose() { "${COMPOSE[@]}" -p "$PROJECT" -f "$ROOT/docker-compose.yml" -f "$TMP/override.yml" "$@"; }

# shellcheck disable=SC2317 # invoked by the trap
teardown() {
  local status=$?
  [[ -z $EVENTS ]] || kill "$EVENTS" 2>/dev/null || true
  if ((STACK)); then
    if ((status == 1)); then
      log "logs of the stack:"
      compose logs --no-color --tail 40 >&2 || true
    fi
    if [[ -n ${HOOKBRIDGE_TEST_SMOKE_KEEP:-} ]]; then
      log "stack left running: ${COMPOSE[*]} -p $PROJECT -f docker-compose.yml down -v"
    else
      compose down -v --remove-orphans >/dev/null 2>&1 || log "could not tear down $PROJECT"
    fi
  fi
  rm -rf "$TMP"
  exit "$status"
}
trap teardown EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

setup_failed() {
  log "cannot set up the stack: $*"
  exit 2
}

fail() {
  log "FAILED: $*"
  exit 1
}

# setup_step WHAT CMD...: CMD's stderr is shown as it comes; its stdout lands in $OUT. When
# CMD fails, the stack cannot be set up, for the reason its last line of stderr gives
# (exit 3 when that is the lack of an engine).
OUT=
setup_step() {
  local what=$1 status=0 reason
  shift
  # stderr through tee, stdout to a file (the order of the redirections matters).
  "$@" 2>&1 >"$TMP/out" | tee "$TMP/err" >&2 || status=$?
  OUT=$(<"$TMP/out")
  ((status != 0)) || return 0
  reason=$(grep -v '^\s*$' "$TMP/err" | tail -n 1 | sed 's/^docker\.sh: \(error: \)\{0,1\}//' | cut -c1-300)
  if [[ $reason == 'no Docker engine'* ]]; then
    log "skipped: $reason"
    exit 3
  fi
  setup_failed "$what: ${reason:-exit status $status}"
}

# ---------------------------------------------------------------------------
# Set-up: engine, broker images, Compose

setup_step "Docker engine" bash "$DOCKER" engine
setup_step "broker images" bash "$DOCKER" images
eval "$OUT"
setup_step "Docker Compose" bash "$DOCKER" compose
read -r -a COMPOSE <<<"$OUT"
COMPOSE_VERSION=$("${COMPOSE[@]}" version --short 2>/dev/null) || COMPOSE_VERSION='?'
# scripts/test.sh names the Compose in its summary from this line.
log "using ${COMPOSE[*]} ${COMPOSE_VERSION#v}"

# The Dockerfile's base images: the official ones when pullable, else local stand-ins.
pullable() { docker image inspect "$1" >/dev/null 2>&1 || timeout 300 docker pull -q "$1" >/dev/null 2>&1; }
export HOOKBRIDGE_RUST_IMAGE=${HOOKBRIDGE_RUST_IMAGE:-rust:1.90-bookworm}
export HOOKBRIDGE_RUNTIME_IMAGE=${HOOKBRIDGE_RUNTIME_IMAGE:-debian:bookworm-slim}
if ! pullable "$HOOKBRIDGE_RUST_IMAGE"; then
  setup_step "local Rust builder image" bash "$DOCKER" builder
  HOOKBRIDGE_RUST_IMAGE=$OUT
fi
if ! pullable "$HOOKBRIDGE_RUNTIME_IMAGE"; then
  setup_step "local base image" bash "$DOCKER" base
  HOOKBRIDGE_RUNTIME_IMAGE=$OUT
fi

# ---------------------------------------------------------------------------
# The stack

export HOOKBRIDGE_IMAGE=${HOOKBRIDGE_IMAGE:-hookbridge:smoke}
HOOKBRIDGE_ADMIN_TOKEN=$(head -c 24 /dev/urandom | od -An -tx1 | tr -d ' \n')
export HOOKBRIDGE_ADMIN_TOKEN
read -r HOOKBRIDGE_KAFKA_PORT HOOKBRIDGE_NATS_PORT NATS_CLIENT_PORT < <(bash "$ROOT/scripts/brokers.sh" free-port 3 | paste -sd' ')
export HOOKBRIDGE_KAFKA_PORT HOOKBRIDGE_NATS_PORT

# The smoke test reads JetStream from the host, so it publishes the NATS port too (the
# compose file itself keeps the brokers private).
cat >"$TMP/override.yml" <<EOF
services:
  nats:
    ports:
      - "127.0.0.1:$NATS_CLIENT_PORT:4222"
EOF

# The file as users have it, without the smoke test's override.
"${COMPOSE[@]}" -p "$PROJECT" -f "$ROOT/docker-compose.yml" config -q ||
  fail "docker-compose.yml does not pass '${COMPOSE[*]} config -q'"
log "docker-compose.yml passes '${COMPOSE[*]} config -q'"

log "build: $HOOKBRIDGE_IMAGE from the Dockerfile (RUST_IMAGE=$HOOKBRIDGE_RUST_IMAGE, RUNTIME_IMAGE=$HOOKBRIDGE_RUNTIME_IMAGE)"
t0=$SECONDS
if ! compose build >"$TMP/build.log" 2>&1; then
  tail -n 30 "$TMP/build.log" >&2
  setup_failed "'${COMPOSE[*]} build' failed"
fi
size=$(docker image inspect -f '{{.Size}}' "$HOOKBRIDGE_IMAGE")
log "image $HOOKBRIDGE_IMAGE: $((size / 1000000)) MB, built in $((SECONDS - t0)) s"

# until_ok TIMEOUT WHAT CMD...: retries CMD every half second until it succeeds.
until_ok() {
  local timeout=$1 what=$2
  shift 2
  local deadline=$((SECONDS + timeout))
  until "$@" >/dev/null 2>&1; do
    ((SECONDS < deadline)) || fail "$what (not within ${timeout}s)"
    sleep 0.5
  done
}

log "up: project $PROJECT, bridges on :$HOOKBRIDGE_KAFKA_PORT (Kafka) and :$HOOKBRIDGE_NATS_PORT (JetStream)"
STACK=1
# The project's container starts and health changes, as the engine reports them.
docker events --filter type=container --filter "label=com.docker.compose.project=$PROJECT" \
  --filter event=start --filter event=health_status \
  --format '{{.TimeNano}} {{index .Actor.Attributes "com.docker.compose.service"}} {{.Action}}' \
  >"$TMP/events" 2>&1 &
EVENTS=$!
t0=$SECONDS
compose up -d >&2 || fail "'${COMPOSE[*]} up -d'"
log "up -d returned after $((SECONDS - t0)) s"
until_ok 30 "the bridges' start events" grep -q ' hookbridge-nats start' "$TMP/events"
until_ok 30 "the bridges' start events" grep -q ' hookbridge-kafka start' "$TMP/events"
kill "$EVENTS" 2>/dev/null || true
wait "$EVENTS" 2>/dev/null || true
EVENTS=

container() {
  local id
  id=$(compose ps -q "$1") || id=
  [[ -n $id ]] || fail "no container for $1"
  printf '%s' "$id"
}

# gated BRIDGE BROKER: the bridge's container started after its broker's first "healthy"
# (depends_on: condition: service_healthy). Both times are the engine's, from the events
# recorded while `up` ran (a container's health log keeps only its last five checks).
gated() {
  local started healthy
  started=$(awk -v s="$1" '$2 == s && $3 == "start" {print $1; exit}' "$TMP/events")
  healthy=$(awk -v s="$2" '$2 == s && $3 == "health_status:" && $4 == "healthy" {print $1; exit}' "$TMP/events")
  [[ -n $started ]] || fail "no start event of $1 while up ran"
  [[ -n $healthy ]] || fail "$1 started, but $2 never reported healthy while up ran"
  ((started >= healthy)) ||
    fail "$1 started $(((healthy - started) / 1000000)) ms before $2 was healthy: depends_on is not health-gated"
}

healthy() { curl -fsS --max-time 2 "http://127.0.0.1:$1/healthz"; }
# The image's own HEALTHCHECK, as docker sees it.
docker_healthy() {
  [[ $(docker inspect -f '{{.State.Health.Status}}' "$(container "$1")") == healthy ]]
}
# The named volumes a service's container mounts.
volumes_of() { docker inspect -f '{{range .Mounts}}{{.Name}} {{end}}' "$(container "$1")"; }

wait_bridges() {
  until_ok "$READY_TIMEOUT" "Kafka bridge answers /healthz" healthy "$HOOKBRIDGE_KAFKA_PORT"
  until_ok "$READY_TIMEOUT" "JetStream bridge answers /healthz" healthy "$HOOKBRIDGE_NATS_PORT"
}

callback() {
  local id=$1
  printf '{"code":200,"message":"success","data":{"taskId":"%s","model":"seedance-20","state":"success","output":[{"url":"https://example.com/v.mp4","width":1280,"height":720}],"createTime":1735599634000}}' "$id"
}

post() {
  local port=$1 id=$2 answer
  answer=$(curl -sS --max-time 10 -w ' %{http_code}' -H 'content-type: application/json' \
    --data "$(callback "$id")" "http://127.0.0.1:$port/webhooks/kinovi") || fail "POST to :$port"
  [[ $answer == *' 200' ]] || fail "POST $id to :$port answered: $answer"
}

# Kafka, read inside its container with the image's console consumer.
kafka_has() {
  compose exec -T kafka /opt/kafka/bin/kafka-console-consumer.sh --bootstrap-server localhost:9092 \
    --topic kinovi.task-events --from-beginning --timeout-ms 10000 2>/dev/null | grep -q "\"$1\""
}

# JetStream, read from the host: the stream's messages by sequence, over the NATS protocol.
jetstream_has() {
  python3 - "$NATS_CLIENT_PORT" "$1" <<'PY'
import base64, json, socket, sys

port, task_id = int(sys.argv[1]), sys.argv[2]
s = socket.create_connection(("127.0.0.1", port), timeout=5)
buf = b""

def line():
    global buf
    while b"\r\n" not in buf:
        chunk = s.recv(65536)
        if not chunk:
            sys.exit(1)
        buf += chunk
    out, buf = buf.split(b"\r\n", 1)
    return out

def payload(n):
    global buf
    while len(buf) < n + 2:
        chunk = s.recv(65536)
        if not chunk:
            sys.exit(1)
        buf += chunk
    out, buf = buf[:n], buf[n + 2:]
    return out

def request(subject, body):
    data = json.dumps(body).encode()
    s.sendall(b"PUB %s _INBOX.smoke %d\r\n%s\r\n" % (subject.encode(), len(data), data))
    while True:
        l = line()
        if l.startswith(b"PING"):
            s.sendall(b"PONG\r\n")
        elif l.startswith(b"MSG "):
            return json.loads(payload(int(l.split()[-1])))

line()  # INFO
s.sendall(b'CONNECT {"verbose":false,"pedantic":false}\r\nSUB _INBOX.smoke 1\r\n')
info = request("$JS.API.STREAM.INFO.KINOVI_TASKS", {})
state = info.get("state")
if not state:
    sys.exit(1)
for seq in range(state["first_seq"], state["last_seq"] + 1):
    msg = request("$JS.API.STREAM.MSG.GET.KINOVI_TASKS", {"seq": seq}).get("message")
    if msg and task_id.encode() in base64.b64decode(msg["data"]):
        sys.exit(0)
sys.exit(1)
PY
}

gated hookbridge-kafka kafka
gated hookbridge-nats nats
log "depends_on is health-gated: each bridge started after its broker was healthy"

wait_bridges
until_ok "$READY_TIMEOUT" "hookbridge-kafka reports healthy" docker_healthy hookbridge-kafka
log "bridges healthy"

run=smoke_$$_$RANDOM
post "$HOOKBRIDGE_KAFKA_PORT" "${run}_k1"
post "$HOOKBRIDGE_NATS_PORT" "${run}_n1"
until_ok "$ARRIVE_TIMEOUT" "${run}_k1 on Kafka" kafka_has "${run}_k1"
until_ok "$ARRIVE_TIMEOUT" "${run}_n1 in JetStream" jetstream_has "${run}_n1"
log "callbacks read back from Kafka and JetStream"

log "brokers stopped; callbacks accepted into the outboxes; bridge containers re-created"
compose stop kafka nats >&2
post "$HOOKBRIDGE_KAFKA_PORT" "${run}_k2"
post "$HOOKBRIDGE_NATS_PORT" "${run}_n2"
before_kafka=$(container hookbridge-kafka) before_nats=$(container hookbridge-nats)
volumes_kafka=$(volumes_of hookbridge-kafka) volumes_nats=$(volumes_of hookbridge-nats)
compose up -d --no-build --no-deps --force-recreate hookbridge-kafka hookbridge-nats >&2
[[ $(container hookbridge-kafka) != "$before_kafka" && $(container hookbridge-nats) != "$before_nats" ]] ||
  fail "the bridge containers were not re-created"
[[ $(volumes_of hookbridge-kafka) == "$volumes_kafka" && $(volumes_of hookbridge-nats) == "$volumes_nats" ]] ||
  fail "the re-created bridges mount other volumes than before ($volumes_kafka/$volumes_nats)"
wait_bridges
compose start kafka nats >&2
until_ok "$ARRIVE_TIMEOUT" "${run}_k2 on Kafka after the re-creation" kafka_has "${run}_k2"
until_ok "$ARRIVE_TIMEOUT" "${run}_n2 in JetStream after the re-creation" jetstream_has "${run}_n2"
log "passed with ${COMPOSE[*]} ${COMPOSE_VERSION#v}: the outbox volumes kept the accepted callbacks across re-created containers"
