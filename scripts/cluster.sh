#!/usr/bin/env bash
# cluster.sh: the cluster-mode test bed on loopback, without Docker.
#
#   3 Kafka brokers (KRaft, each broker and controller; replication factor 3,
#   min.insync.replicas 2), 3 nats-server nodes (one JetStream cluster, an R3
#   stream; hookbridge makes its R3 bucket), 3 hookbridge replicas in Kafka
#   cluster mode and 3 in JetStream cluster mode, and HAProxy in front of each
#   trio, health-checking the replicas' /readyz.
#
# Subcommands:
#   up DIR                       Start everything; writes DIR/env (the ports, for `source`).
#   down DIR                     Stop everything `up` started (TERM, then KILL).
#   replica DIR NAME start|stop|kill   One replica (k1 k2 k3 = Kafka, n1 n2 n3 = JetStream):
#                                stop is SIGTERM (drains), kill is SIGKILL.
#   kafka DIR N start|kill       Kafka broker N (1-3).
#   nats DIR N start|kill        NATS node N (1-3).
#   rolling DIR                  Restart the six replicas one after the other, each once
#                                the restarted one before it is ready again.
#
# Environment: HOOKBRIDGE_BIN (default target/debug/hookbridge), and what
# scripts/brokers.sh reads (HOOKBRIDGE_CACHE for the Kafka jars and nats-server,
# HOOKBRIDGE_NATS_SERVER). The nats-server is `scripts/brokers.sh nats-bin`'s (the
# current release, built once), resolved by `up` and kept in DIR/env.
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
BROKERS=$ROOT/scripts/brokers.sh
BIN=${HOOKBRIDGE_BIN:-$ROOT/target/debug/hookbridge}
STREAM=KINOVI_CHAOS
SUBJECT_PREFIX=chaos.tasks
REPLICAS=(k1 k2 k3 n1 n2 n3)

log() { printf 'cluster.sh: %s\n' "$*" >&2; }
die() {
  log "error: $*"
  exit 1
}
usage() {
  sed -n '2,/^set -euo/{/^#/s/^# \{0,1\}//p}' "${BASH_SOURCE[0]}" >&2
  exit 2
}

alive() { [[ -f $1 ]] && kill -0 "$(<"$1")" 2>/dev/null; }

# stop PIDFILE SIGNAL: signal, wait (bounded), then KILL.
stop() {
  local f=$1 sig=${2:-TERM} pid
  alive "$f" || {
    rm -f "$f"
    return 0
  }
  pid=$(<"$f")
  kill "-$sig" "$pid" 2>/dev/null || true
  for _ in $(seq 1 150); do
    kill -0 "$pid" 2>/dev/null || break
    sleep 0.2
  done
  kill -KILL "$pid" 2>/dev/null || true
  rm -f "$f"
}

# ---------------------------------------------------------------------------
# Kafka

kafka_props() {
  local dir=$1 n=$2
  # shellcheck disable=SC1091
  source "$dir/env"
  local port=KAFKA_PORT_$n cport=KAFKA_CPORT_$n
  cat <<EOF
process.roles=broker,controller
node.id=$n
controller.quorum.voters=1@127.0.0.1:$KAFKA_CPORT_1,2@127.0.0.1:$KAFKA_CPORT_2,3@127.0.0.1:$KAFKA_CPORT_3
listeners=PLAINTEXT://127.0.0.1:${!port},CONTROLLER://127.0.0.1:${!cport}
advertised.listeners=PLAINTEXT://127.0.0.1:${!port}
listener.security.protocol.map=PLAINTEXT:PLAINTEXT,CONTROLLER:PLAINTEXT
controller.listener.names=CONTROLLER
inter.broker.listener.name=PLAINTEXT
log.dirs=$dir/kafka$n/logs
num.partitions=6
auto.create.topics.enable=true
default.replication.factor=3
min.insync.replicas=2
offsets.topic.replication.factor=3
offsets.topic.num.partitions=3
transaction.state.log.replication.factor=3
transaction.state.log.min.isr=2
transaction.state.log.num.partitions=3
share.coordinator.state.topic.replication.factor=3
share.coordinator.state.topic.min.isr=2
group.initial.rebalance.delay.ms=0
broker.session.timeout.ms=4000
broker.heartbeat.interval.ms=1000
num.network.threads=2
num.io.threads=2
num.recovery.threads.per.data.dir=1
background.threads=2
log.cleaner.threads=1
EOF
}

kafka_start() {
  local dir=$1 n=$2 libs data
  data=$dir/kafka$n
  libs=$(bash "$BROKERS" libs)
  mkdir -p "$data"
  kafka_props "$dir" "$n" >"$data/server.properties"
  printf 'rootLogger.level = WARN\nappender.out.type = Console\nappender.out.name = OUT\nappender.out.layout.type = PatternLayout\nappender.out.layout.pattern = [%%d] %%p %%m (%%c)%%n\nrootLogger.appenderRef.out.ref = OUT\n' >"$data/log4j2.properties"
  local jvm=(-Xms128m -Xmx384m -XX:+UseSerialGC -XX:TieredStopAtLevel=1 -XX:-UsePerfData
    "-Dlog4j2.configurationFile=$data/log4j2.properties")
  if [[ ! -f $data/logs/meta.properties ]]; then
    java "${jvm[@]}" -cp "$libs/*" kafka.tools.StorageTool format \
      --config "$data/server.properties" --cluster-id "$(<"$dir/kafka.cluster-id")" \
      --ignore-formatted >>"$data/kafka.log" 2>&1
  fi
  java "${jvm[@]}" -cp "$libs/*" kafka.Kafka "$data/server.properties" \
    </dev/null >>"$data/kafka.log" 2>&1 &
  echo $! >"$dir/kafka$n.pid"
}

# ---------------------------------------------------------------------------
# NATS

nats_start() {
  local dir=$1 n=$2 data
  data=$dir/nats$n
  # shellcheck disable=SC1091
  source "$dir/env"
  local port=NATS_PORT_$n rport=NATS_RPORT_$n bin=${NATS_SERVER:-}
  [[ -n $bin ]] || bin=$(bash "$BROKERS" nats-bin) # a DIR from before NATS_SERVER was kept
  mkdir -p "$data/js"
  cat >"$data/nats.conf" <<EOF
server_name: chaos-n$n
listen: "127.0.0.1:${!port}"
log_file: "$data/nats.log"
jetstream { store_dir: "$data/js" }
cluster {
  name: chaos
  listen: "127.0.0.1:${!rport}"
  routes: ["nats-route://127.0.0.1:$NATS_RPORT_1", "nats-route://127.0.0.1:$NATS_RPORT_2", "nats-route://127.0.0.1:$NATS_RPORT_3"]
}
EOF
  "$bin" -c "$data/nats.conf" </dev/null >>"$data/nats.out" 2>&1 &
  echo $! >"$dir/nats$n.pid"
}

# js_request PORT SUBJECT JSON: one JetStream API request; prints the answer.
js_request() {
  python3 - "$@" <<'PY'
import json, socket, sys
port, subject, body = int(sys.argv[1]), sys.argv[2], sys.argv[3].encode()
s = socket.create_connection(("127.0.0.1", port), timeout=10)
f = s.makefile("rb")
f.readline()
s.sendall(b'CONNECT {"verbose":false,"headers":false}\r\nSUB _INBOX.cl 1\r\n')
s.sendall(b"PUB %s _INBOX.cl %d\r\n%s\r\n" % (subject.encode(), len(body), body))
while True:
    line = f.readline()
    if not line:
        sys.exit(1)
    if line.startswith(b"PING"):
        s.sendall(b"PONG\r\n")
    elif line.startswith(b"MSG"):
        n = int(line.split()[-1])
        print(f.read(n + 2)[:-2].decode())
        break
PY
}

create_stream() {
  local dir=$1 answer
  # shellcheck disable=SC1091
  source "$dir/env"
  local body
  body=$(printf '{"name":"%s","subjects":["%s.>"],"num_replicas":3,"storage":"file","retention":"limits","discard":"old","duplicate_window":120000000000}' "$STREAM" "$SUBJECT_PREFIX")
  # The meta leader is elected a little after the servers listen.
  for _ in $(seq 1 120); do
    answer=$(js_request "$NATS_PORT_1" "\$JS.API.STREAM.CREATE.$STREAM" "$body" 2>/dev/null || true)
    if [[ $answer == *'"config"'* || $answer == *'already in use'* ]]; then
      log "stream $STREAM (R3) ready"
      return 0
    fi
    sleep 0.5
  done
  die "cannot create stream $STREAM: $answer"
}

# ---------------------------------------------------------------------------
# hookbridge replicas and HAProxy

replica_config() {
  local dir=$1 name=$2
  # shellcheck disable=SC1091
  source "$dir/env"
  local pub=PORT_$name admin=ADMIN_$name
  cat <<EOF
[server]
listen = "127.0.0.1:${!pub}"
shutdown_timeout_ms = 5000
# Every replica sees HAProxy (and the test clients) as 127.0.0.1.
max_connections_per_client = 512
[server.rate_limit]
refusals_per_sec = 0
[admin]
listen = "127.0.0.1:${!admin}"
[outbox]
data_dir = "$dir/$name/data"
retry_initial_ms = 50
retry_max_ms = 1000
[log]
level = "warn"
EOF
  if [[ $name == k* ]]; then
    cat <<EOF
[publisher]
type = "kafka"
brokers = "$KAFKA_BOOTSTRAP"
topic = "chaos.task-events"
message_timeout_ms = 10000
[cluster]
enabled = true
transactional_id = "chaos-$name"
partitions = 6
replication_factor = 3
drain_ms = 2000
EOF
  else
    cat <<EOF
[publisher]
type = "nats"
url = "$NATS_URL"
subject = "$SUBJECT_PREFIX.{state}.{task}"
[cluster]
enabled = true
drain_ms = 2000
EOF
  fi
}

replica() {
  local dir=$1 name=$2 action=$3
  [[ " ${REPLICAS[*]} " == *" $name "* ]] || die "no replica $name"
  case $action in
  start)
    mkdir -p "$dir/$name"
    replica_config "$dir" "$name" >"$dir/$name/hookbridge.toml"
    "$BIN" --config "$dir/$name/hookbridge.toml" </dev/null >>"$dir/$name/out.log" 2>&1 &
    echo $! >"$dir/$name.pid"
    ;;
  stop) stop "$dir/$name.pid" TERM ;;
  kill) stop "$dir/$name.pid" KILL ;;
  *) usage ;;
  esac
}

# wait_ready NAME: until the replica's /readyz answers 200 (bounded).
wait_ready() {
  local dir=$1 name=$2
  # shellcheck disable=SC1091
  source "$dir/env"
  local admin=ADMIN_$name
  for _ in $(seq 1 240); do
    if python3 -c "import urllib.request,sys; urllib.request.urlopen('http://127.0.0.1:${!admin}/readyz', timeout=2)" 2>/dev/null; then
      return 0
    fi
    sleep 0.5
  done
  die "replica $name not ready after 120 s (log: $dir/$name/out.log)"
}

haproxy_start() {
  local dir=$1
  # shellcheck disable=SC1091
  source "$dir/env"
  {
    cat <<EOF
global
  maxconn 4000
defaults
  mode http
  timeout connect 1s
  timeout client 30s
  timeout server 30s
  timeout queue 10s
  retries 3
  option redispatch 1
  # A replica killed mid-request answers nothing: the callback is sent to
  # another one (cluster mode dedups the rare double).
  retry-on conn-failure empty-response
EOF
    for kind in k n; do
      local front=HAPROXY_$kind
      printf 'frontend f_%s\n  bind 127.0.0.1:%s\n  default_backend b_%s\n' "$kind" "${!front}" "$kind"
      printf 'backend b_%s\n  balance roundrobin\n  option httpchk GET /readyz\n  http-check expect status 200\n  default-server inter 300ms fall 2 rise 2\n' "$kind"
      for i in 1 2 3; do
        local pub=PORT_$kind$i admin=ADMIN_$kind$i
        printf '  server %s%s 127.0.0.1:%s check port %s\n' "$kind" "$i" "${!pub}" "${!admin}"
      done
      # When every replica says not ready (all lost coordination at once),
      # they still take callbacks into their outboxes rather than refuse:
      # the provider never retries.
      for i in 1 2 3; do
        local pub=PORT_$kind$i
        printf '  server %s%s-backup 127.0.0.1:%s backup\n' "$kind" "$i" "${!pub}"
      done
    done
  } >"$dir/haproxy.cfg"
  haproxy -f "$dir/haproxy.cfg" </dev/null >>"$dir/haproxy.log" 2>&1 &
  echo $! >"$dir/haproxy.pid"
}

# ---------------------------------------------------------------------------

cmd_up() {
  local dir=$1
  mkdir -p "$dir"
  dir=$(cd "$dir" && pwd)
  [[ -x $BIN ]] || die "no hookbridge binary at $BIN (cargo build, or set HOOKBRIDGE_BIN)"
  command -v haproxy >/dev/null || {
    log "installing haproxy (Debian package)"
    apt-get install -y haproxy >/dev/null 2>&1 || { apt-get update >/dev/null && apt-get install -y haproxy >/dev/null; }
  }
  local p nats_server
  nats_server=$(bash "$BROKERS" nats-bin)
  log "nats-server: $nats_server ($("$nats_server" --version 2>&1))"
  HOOKBRIDGE_NATS_SERVER=$nats_server bash "$BROKERS" install
  mapfile -t p < <(bash "$BROKERS" free-port 26)
  {
    echo "KAFKA_PORT_1=${p[0]} KAFKA_PORT_2=${p[1]} KAFKA_PORT_3=${p[2]}"
    echo "KAFKA_CPORT_1=${p[3]} KAFKA_CPORT_2=${p[4]} KAFKA_CPORT_3=${p[5]}"
    echo "NATS_PORT_1=${p[6]} NATS_PORT_2=${p[7]} NATS_PORT_3=${p[8]}"
    echo "NATS_RPORT_1=${p[9]} NATS_RPORT_2=${p[10]} NATS_RPORT_3=${p[11]}"
    echo "PORT_k1=${p[12]} PORT_k2=${p[13]} PORT_k3=${p[14]} PORT_n1=${p[15]} PORT_n2=${p[16]} PORT_n3=${p[17]}"
    echo "ADMIN_k1=${p[18]} ADMIN_k2=${p[19]} ADMIN_k3=${p[20]}"
    echo "HAPROXY_k=${p[21]} HAPROXY_n=${p[22]}"
    echo "KAFKA_BOOTSTRAP=127.0.0.1:${p[0]},127.0.0.1:${p[1]},127.0.0.1:${p[2]}"
    echo "NATS_URL=nats://127.0.0.1:${p[6]},nats://127.0.0.1:${p[7]},nats://127.0.0.1:${p[8]}"
    echo "ADMIN_n1=${p[23]} ADMIN_n2=${p[24]} ADMIN_n3=${p[25]}"
    echo "NATS_STREAM=$STREAM"
    printf 'NATS_SERVER=%q\n' "$nats_server"
  } >"$dir/env"
  head -c 16 /dev/urandom | base64 | tr '+/' '-_' | tr -d '=\n' | sed 's/^-/A/' >"$dir/kafka.cluster-id"
  for n in 1 2 3; do kafka_start "$dir" "$n"; done
  for n in 1 2 3; do nats_start "$dir" "$n"; done
  # shellcheck disable=SC1091
  source "$dir/env"
  for n in 1 2 3; do
    local port=NATS_PORT_$n
    bash "$BROKERS" wait-nats "${!port}" 60 "$(<"$dir/nats$n.pid")"
  done
  create_stream "$dir"
  for n in 1 2 3; do
    local port=KAFKA_PORT_$n
    bash "$BROKERS" wait-kafka "${!port}" 180 "$(<"$dir/kafka$n.pid")"
  done
  log "Kafka ready: $KAFKA_BOOTSTRAP"
  for name in "${REPLICAS[@]}"; do replica "$dir" "$name" start; done
  for name in "${REPLICAS[@]}"; do wait_ready "$dir" "$name"; done
  haproxy_start "$dir"
  # Until HAProxy has checked the replicas and serves through each frontend.
  for front in "$HAPROXY_k" "$HAPROXY_n"; do
    for _ in $(seq 1 60); do
      python3 -c "import urllib.request; urllib.request.urlopen('http://127.0.0.1:$front/healthz', timeout=2)" 2>/dev/null && break
      sleep 0.5
    done
  done
  log "up: Kafka bridge http://127.0.0.1:$HAPROXY_k, JetStream bridge http://127.0.0.1:$HAPROXY_n (env: $dir/env)"
}

cmd_down() {
  local dir=$1
  [[ -d $dir ]] || return 0
  stop "$dir/haproxy.pid" TERM
  for name in "${REPLICAS[@]}"; do stop "$dir/$name.pid" TERM; done
  for n in 1 2 3; do stop "$dir/nats$n.pid" TERM; done
  for n in 1 2 3; do stop "$dir/kafka$n.pid" TERM; done
}

cmd_rolling() {
  local dir=$1
  for name in "${REPLICAS[@]}"; do
    replica "$dir" "$name" stop
    replica "$dir" "$name" start
    wait_ready "$dir" "$name"
    log "replica $name restarted and ready"
  done
}

main() {
  (($# >= 2)) || usage
  local cmd=$1 dir=$2
  shift 2
  case $cmd in
  up) cmd_up "$dir" ;;
  down) cmd_down "$dir" ;;
  rolling) cmd_rolling "$dir" ;;
  replica) (($# == 2)) || usage && replica "$dir" "$1" "$2" ;;
  kafka)
    (($# == 2)) || usage
    case $2 in start) kafka_start "$dir" "$1" ;; kill) stop "$dir/kafka$1.pid" KILL ;; *) usage ;; esac
    ;;
  nats)
    (($# == 2)) || usage
    case $2 in start) nats_start "$dir" "$1" ;; kill) stop "$dir/nats$1.pid" KILL ;; *) usage ;; esac
    ;;
  *) usage ;;
  esac
}

main "$@"
