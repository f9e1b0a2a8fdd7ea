#!/usr/bin/env bash
# compose-smoke.sh: docker-compose.yml, exercised end to end.
#
# Builds the hookbridge image from the repo's Dockerfile (from local base images when no
# registry answers), brings the stack up under a project name of its own on free host
# ports, and checks:
#   1. a callback posted to each bridge is read back from Kafka and from JetStream;
#   2. with the brokers stopped, callbacks are accepted, the bridge containers are
#      re-created (same outbox volumes), the brokers come back, and those callbacks
#      arrive: the outbox volume kept them;
# then tears everything down (volumes included).
#
# Exit status: 0 passed, 1 a check failed, 2 the stack could not be set up on this machine
# (no engine, no compose command, image build failed).
#
# Uses `docker compose` (v2) when present, else docker-compose (v1.29).
# HOOKBRIDGE_TEST_SMOKE_KEEP=1 leaves the stack running for a look (`<compose> -p NAME down -v` later).
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
DOCKER=$ROOT/scripts/docker.sh
cd "$ROOT"

# Bounded waits, in seconds.
READY_TIMEOUT=180
ARRIVE_TIMEOUT=180

log() { printf 'compose-smoke: %s\n' "$*" >&2; }
setup_failed() {
  log "cannot set up the stack: $*"
  exit 2
}

# ---------------------------------------------------------------------------
# Set-up: engine, images, compose command

bash "$DOCKER" engine || setup_failed "no Docker engine"
exports=$(bash "$DOCKER" images) || setup_failed "broker images"
eval "$exports"

if docker compose version >/dev/null 2>&1; then
  COMPOSE=(docker compose)
elif command -v docker-compose >/dev/null; then
  COMPOSE=(docker-compose)
else
  setup_failed "neither 'docker compose' nor docker-compose is installed"
fi
log "using ${COMPOSE[*]} ($("${COMPOSE[@]}" version --short 2>/dev/null || echo '?'))"

# The Dockerfile's base images: the official ones when pullable, else local stand-ins.
pullable() { docker image inspect "$1" >/dev/null 2>&1 || timeout 300 docker pull -q "$1" >/dev/null 2>&1; }
export HOOKBRIDGE_RUST_IMAGE=${HOOKBRIDGE_RUST_IMAGE:-rust:1.90-bookworm}
export HOOKBRIDGE_RUNTIME_IMAGE=${HOOKBRIDGE_RUNTIME_IMAGE:-debian:bookworm-slim}
if ! pullable "$HOOKBRIDGE_RUST_IMAGE"; then
  HOOKBRIDGE_RUST_IMAGE=$(bash "$DOCKER" builder) || setup_failed "local Rust builder image"
fi
if ! pullable "$HOOKBRIDGE_RUNTIME_IMAGE"; then
  HOOKBRIDGE_RUNTIME_IMAGE=$(bash "$DOCKER" base) || setup_failed "local base image"
fi

export HOOKBRIDGE_IMAGE=${HOOKBRIDGE_IMAGE:-hookbridge:smoke}
log "docker build -t $HOOKBRIDGE_IMAGE (RUST_IMAGE=$HOOKBRIDGE_RUST_IMAGE, RUNTIME_IMAGE=$HOOKBRIDGE_RUNTIME_IMAGE)"
build_log=$(mktemp "${TMPDIR:-/tmp}/hookbridge-image.XXXXXX")
t0=$SECONDS
# The legacy builder: no buildx plugin needed, and the Dockerfile needs nothing newer.
if ! DOCKER_BUILDKIT=0 docker build --force-rm -t "$HOOKBRIDGE_IMAGE" \
  --build-arg "RUST_IMAGE=$HOOKBRIDGE_RUST_IMAGE" --build-arg "RUNTIME_IMAGE=$HOOKBRIDGE_RUNTIME_IMAGE" \
  . >"$build_log" 2>&1; then
  tail -n 30 "$build_log" >&2
  setup_failed "docker build failed (log: $build_log)"
fi
rm -f "$build_log"
size=$(docker image inspect -f '{{.Size}}' "$HOOKBRIDGE_IMAGE")
log "image $HOOKBRIDGE_IMAGE: $((size / 1000000)) MB, built in $((SECONDS - t0)) s"

# ---------------------------------------------------------------------------
# The stack

PROJECT=hookbridge-smoke-$$
HOOKBRIDGE_ADMIN_TOKEN=$(head -c 24 /dev/urandom | od -An -tx1 | tr -d ' \n')
export HOOKBRIDGE_ADMIN_TOKEN
read -r HOOKBRIDGE_KAFKA_PORT HOOKBRIDGE_NATS_PORT NATS_CLIENT_PORT < <(bash "$ROOT/scripts/brokers.sh" free-port 3 | paste -sd' ')
export HOOKBRIDGE_KAFKA_PORT HOOKBRIDGE_NATS_PORT

# The smoke test reads JetStream from the host, so it publishes the NATS port too (the
# compose file itself keeps the brokers private).
OVERRIDE=$(mktemp "${TMPDIR:-/tmp}/hookbridge-compose.XXXXXX.yml")
cat >"$OVERRIDE" <<EOF
services:
  nats:
    ports:
      - "127.0.0.1:$NATS_CLIENT_PORT:4222"
EOF
compose() { "${COMPOSE[@]}" -p "$PROJECT" -f "$ROOT/docker-compose.yml" -f "$OVERRIDE" "$@"; }

# shellcheck disable=SC2317 # invoked by the trap
teardown() {
  local status=$?
  if ((status == 1)); then
    log "logs of the stack:"
    compose logs --no-color --tail 40 >&2 || true
  fi
  if [[ -n ${HOOKBRIDGE_TEST_SMOKE_KEEP:-} ]]; then
    log "stack left running: ${COMPOSE[*]} -p $PROJECT -f docker-compose.yml down -v"
  else
    compose down -v --remove-orphans >/dev/null 2>&1 || log "could not tear down $PROJECT"
  fi
  rm -f "$OVERRIDE"
  exit "$status"
}
trap teardown EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

fail() {
  log "FAILED: $*"
  exit 1
}

log "up: project $PROJECT, bridges on :$HOOKBRIDGE_KAFKA_PORT (Kafka) and :$HOOKBRIDGE_NATS_PORT (JetStream)"
compose up -d --no-build >&2 || fail "compose up"

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

healthy() { curl -fsS --max-time 2 "http://127.0.0.1:$1/healthz"; }
# The image's own HEALTHCHECK, as docker sees it.
docker_healthy() {
  [[ $(docker inspect -f '{{.State.Health.Status}}' "$(compose ps -q "$1")") == healthy ]]
}

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
compose up -d --no-build --no-deps --force-recreate hookbridge-kafka hookbridge-nats >&2
wait_bridges
compose start kafka nats >&2
until_ok "$ARRIVE_TIMEOUT" "${run}_k2 on Kafka after the re-creation" kafka_has "${run}_k2"
until_ok "$ARRIVE_TIMEOUT" "${run}_n2 in JetStream after the re-creation" jetstream_has "${run}_n2"
log "passed: the outbox volumes kept the accepted callbacks across re-created containers"
