#!/usr/bin/env bash
# brokers.sh: real Apache Kafka (KRaft) and NATS JetStream brokers for
# hookbridge's tests, without Docker.
#
# Subcommands:
#   install                               Install or fetch what the tests need (idempotent):
#                                         nats-server, java, python3, the Kafka jars,
#                                         Chromium and chromedriver (the console's browser tests),
#                                         and the C toolchain and OpenSSL headers that the Rust build needs.
#   libs                                  Print the directory of the Kafka jars (fetching them if needed).
#   nats-bin                              Print the path of the nats-server to run (building it if needed):
#                                         $HOOKBRIDGE_NATS_SERVER if set, else nats-server NATS_VERSION (set below)
#                                         built from the Go module proxy (under a minute, once; cached in
#                                         $HOOKBRIDGE_CACHE/nats-server-VERSION). Only when Go is missing
#                                         or the build fails, Debian's nats-server, and one line says so.
#   nats-version                          Print the nats-server version this script builds (NATS_VERSION).
#   kafka DATA_DIR PORT CONTROLLER_PORT   Run one single-node KRaft Kafka in the foreground
#                                         (formats DATA_DIR on first use; logs: DATA_DIR/kafka.log).
#   nats DATA_DIR PORT [MONITOR_PORT]     Run nats-server with JetStream in the foreground
#                                         (store: DATA_DIR/js; logs: DATA_DIR/nats.log).
#   up STATE_DIR                          Start one shared Kafka and one shared NATS in the background
#                                         and print `export` lines for the tests (meant for eval).
#   down STATE_DIR                        Stop what `up` started (TERM, then KILL).
#   free-port [N]                         Print N (default 1) distinct free loopback TCP ports.
#   wait-kafka PORT [TIMEOUT_S] [PID]     Wait until a Kafka broker on 127.0.0.1:PORT serves requests.
#   wait-nats PORT [TIMEOUT_S] [PID]      Wait until nats-server on 127.0.0.1:PORT has JetStream.
#                                         The wait-* commands fail early if PID (the broker) exits.
#
# Environment:
#   HOOKBRIDGE_CACHE                cache root for the Kafka jars and nats-server (default: ~/.cache/hookbridge)
#   HOOKBRIDGE_NATS_SERVER          a nats-server binary to run instead of the one built here
#   HOOKBRIDGE_KAFKA_JVM_OPTS       extra JVM flags for Kafka, appended last so they override the defaults
#
# Apart from the export lines of `up` and the ports of `free-port`, everything
# this script prints goes to stderr, so `eval "$(brokers.sh up DIR)"` is safe.
#
# Notes for tests that run private brokers through $HOOKBRIDGE_TEST_BROKERS_SCRIPT:
# - `kafka` and `nats` exec the broker, so the PID you spawn is the broker's; SIGKILL
#   it to simulate a crash, and run the same command again (same DATA_DIR and ports)
#   to bring the same broker back with its data.
# - A Kafka restarted after SIGKILL is ready after about 6 s here: it cannot register
#   until its old session expires (broker.session.timeout.ms=4000). A fresh one takes ~3 s.
# - Use `wait-kafka`/`wait-nats` (or client retries) rather than fixed sleeps; the Kafka
#   port accepts connections before the broker can serve requests.
set -euo pipefail

SCRIPT_DIR=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
SCRIPT_PATH=$SCRIPT_DIR/$(basename "${BASH_SOURCE[0]}")

# The nats-server the tests, the test beds and the local Docker image run: built with
# `go install` from the Go module proxy (Debian's 2.9 is too old for cluster mode).
NATS_VERSION=v2.15.3
NATS_MODULE=github.com/nats-io/nats-server/v2
NATS_BUILD_TIMEOUT=600
KAFKA_VERSION=4.1.1
KAFKA_POM=$SCRIPT_DIR/kafka/pom.xml
CACHE_DIR=${HOOKBRIDGE_CACHE:-$HOME/.cache/hookbridge}
# One directory per pom content: checkouts with different poms sharing the cache (branches,
# CI jobs) each keep their own jars instead of re-fetching over each other's.
KAFKA_HOME=$CACHE_DIR/kafka-$KAFKA_VERSION-$(sha256sum "$KAFKA_POM" | cut -c1-12)
KAFKA_LIBS=$KAFKA_HOME/libs
# Written last, after a complete copy; holds the pom's hash.
KAFKA_MARKER=$KAFKA_LIBS/.complete
NATS_HOME=$CACHE_DIR/nats-server-$NATS_VERSION
NATS_CACHED=$NATS_HOME/nats-server
# Written after the binary is in place (renamed there whole); holds the version it reports.
NATS_MARKER=$NATS_HOME/.complete

# Bounded waits used by `up`.
KAFKA_START_TIMEOUT=90
NATS_START_TIMEOUT=15
STOP_TIMEOUT=30

log() { printf 'brokers.sh: %s\n' "$*" >&2; }
now_ms() { date +%s%3N; }
die() {
  log "error: $*"
  exit 1
}

usage() {
  sed -n '2,/^set -euo/{/^#/s/^# \{0,1\}//p}' "$SCRIPT_PATH" >&2
  exit "${1:-2}"
}

# ---------------------------------------------------------------------------
# install

# Runs a command as root (CI runners and dev containers are usually root; fall back to sudo).
as_root() {
  if [[ $EUID -eq 0 ]]; then
    "$@"
  elif command -v sudo >/dev/null; then
    sudo "$@"
  else
    die "need root (or sudo) to run: $*"
  fi
}

apt_install() {
  command -v apt-get >/dev/null || die "apt-get not found; install these by hand: $*"
  log "apt-get install $*"
  as_root apt-get update -qq >&2
  as_root env DEBIAN_FRONTEND=noninteractive \
    apt-get install -y -qq --no-install-recommends "$@" >&2
}

# Installs, in one apt run, the system packages that are missing.
ensure_system_packages() {
  local pkgs=()
  command -v java >/dev/null || pkgs+=(default-jre-headless)
  command -v python3 >/dev/null || pkgs+=(python3) # free ports and broker readiness probes
  command -v curl >/dev/null || pkgs+=(curl)          # the README's examples (tests/it/readme.rs)
  command -v pkg-config >/dev/null || pkgs+=(pkg-config)
  # The Rust build compiles librdkafka (C) with TLS; openssl-sys finds OpenSSL through pkg-config.
  if ! command -v pkg-config >/dev/null || ! pkg-config --exists openssl; then
    pkgs+=(libssl-dev)
  fi
  if ! command -v cc >/dev/null || ! command -v make >/dev/null; then
    pkgs+=(build-essential)
  fi
  # The console's browser tests (tests/it/console.rs): headless Chromium and its WebDriver,
  # Debian's (no browser download from elsewhere). A font, so that screenshots show text.
  command -v chromium >/dev/null || pkgs+=(chromium fonts-liberation)
  command -v chromedriver >/dev/null || pkgs+=(chromium-driver)
  # Maven is only needed to fetch the Kafka jars the first time.
  if ! kafka_jars_ready && ! command -v mvn >/dev/null; then
    pkgs+=(maven)
  fi
  if ((${#pkgs[@]})); then
    apt_install "${pkgs[@]}"
  fi
}

pom_hash() { sha256sum "$KAFKA_POM" | cut -d' ' -f1; }

kafka_jars_ready() {
  [[ -f $KAFKA_MARKER && "$(<"$KAFKA_MARKER")" == "$(pom_hash)" ]]
}

# Copies Kafka and its runtime dependencies from Maven Central into the cache.
# A lock keeps parallel jobs that share the cache from copying over each other;
# the copy goes to a temp dir and is moved into place only when complete.
ensure_kafka_jars() {
  kafka_jars_ready && return 0
  mkdir -p "$KAFKA_HOME"
  (
    flock 9
    kafka_jars_ready && exit 0 # someone else finished while we waited
    command -v mvn >/dev/null || die "mvn not found; run: $SCRIPT_PATH install"
    local tmp=$KAFKA_HOME/libs.tmp
    rm -rf "$tmp"
    log "fetching Kafka $KAFKA_VERSION jars into $KAFKA_LIBS"
    # The sed strips the stray colour codes Debian's Maven 3.8 prints even in batch mode.
    mvn -q -B -f "$KAFKA_POM" dependency:copy-dependencies \
      -DoutputDirectory="$tmp" -DincludeScope=runtime 2>&1 |
      sed -e 's/\x1b\[[0-9;]*m//g' -e '/^[[:space:]]*$/d' >&2
    [[ -f $tmp/kafka_2.13-$KAFKA_VERSION.jar ]] || die "maven did not produce kafka_2.13-$KAFKA_VERSION.jar"
    rm -rf "$KAFKA_LIBS"
    mv "$tmp" "$KAFKA_LIBS"
    pom_hash >"$KAFKA_MARKER"
  ) 9>"$KAFKA_HOME/.lock"
}

# ---------------------------------------------------------------------------
# nats-server

nats_ready() {
  [[ -x $NATS_CACHED && -f $NATS_MARKER && "$(<"$NATS_MARKER")" == "$NATS_VERSION" ]]
}

# go on PATH, else the official tarball's place.
go_cmd() {
  if command -v go >/dev/null; then
    command -v go
  elif [[ -x /usr/local/go/bin/go ]]; then
    printf '%s' /usr/local/go/bin/go
  else
    return 1
  fi
}

# Builds nats-server $NATS_VERSION into the cache. On failure, sets NATS_WHY (one line)
# and returns 1. A lock keeps parallel jobs that share the cache from building twice; the
# binary is built in a temp dir and renamed into place whole, then the marker is written.
build_nats() {
  nats_ready && return 0
  local go
  go=$(go_cmd) || {
    NATS_WHY="go is not installed"
    return 1
  }
  mkdir -p "$NATS_HOME"
  local why
  why=$(
    exec 9>"$NATS_HOME/.lock"
    flock 9
    nats_ready && exit 0 # someone else finished while we waited
    rm -rf "$NATS_HOME"/build.* # left by a build that was killed
    tmp=$(mktemp -d "$NATS_HOME/build.XXXXXX")
    trap 'rm -rf "$tmp"' EXIT
    buildlog=$NATS_HOME/build.log
    t0=$SECONDS
    log "building nats-server $NATS_VERSION from the Go module proxy with $("$go" env GOVERSION) (under a minute, once; log $buildlog)"
    # Outside any Go module of the caller's; CGO_ENABLED=0 makes a static binary, which
    # also runs in the local Docker image.
    if ! (cd "$tmp" && CGO_ENABLED=0 GOBIN="$tmp" PATH="$(dirname "$go"):$PATH" \
      timeout "$NATS_BUILD_TIMEOUT" "$go" install "$NATS_MODULE@$NATS_VERSION") >"$buildlog" 2>&1; then
      echo "go install of $NATS_VERSION failed: $(grep -v '^\s*$' "$buildlog" | tail -n 1 | cut -c1-200) (log: $buildlog)"
      exit 1
    fi
    got=$("$tmp/nats-server" --version 2>&1) || got="no answer to --version"
    if [[ $got != "nats-server: $NATS_VERSION" ]]; then
      echo "the nats-server just built reports '$got', not $NATS_VERSION"
      exit 1
    fi
    rm -f "$NATS_MARKER"
    mv -f "$tmp/nats-server" "$NATS_CACHED"
    echo "$NATS_VERSION" >"$NATS_MARKER"
    log "built nats-server $NATS_VERSION in $((SECONDS - t0)) s ($NATS_CACHED)"
  ) && return 0
  NATS_WHY=${why:-the build failed}
  return 1
}

# The nats-server to run; prints its path. See `nats-bin` above.
nats_bin() {
  if [[ -n ${HOOKBRIDGE_NATS_SERVER:-} ]]; then
    [[ -x $HOOKBRIDGE_NATS_SERVER ]] || die "HOOKBRIDGE_NATS_SERVER=$HOOKBRIDGE_NATS_SERVER is not an executable"
    printf '%s\n' "$HOOKBRIDGE_NATS_SERVER"
    return 0
  fi
  NATS_WHY=
  if build_nats; then
    printf '%s\n' "$NATS_CACHED"
    return 0
  fi
  command -v nats-server >/dev/null || apt_install nats-server
  local bin version
  bin=$(command -v nats-server) || die "no nats-server: $NATS_WHY, and Debian's could not be installed"
  version=$("$bin" --version 2>&1 | sed 's/^nats-server: v\{0,1\}//')
  log "using Debian's nats-server $version as a fallback ($NATS_WHY); cluster mode needs >= 2.11"
  printf '%s\n' "$bin"
}

cmd_install() {
  ensure_system_packages
  ensure_kafka_jars
  nats_bin >/dev/null
}

# ---------------------------------------------------------------------------
# Small probes, in Python because they speak binary protocols or bind sockets.

# free-ports N: binds N sockets at once to port 0, so the ports are distinct.
# kafka PORT:   Kafka Metadata v4 request (v0-v3 are gone in Kafka 4); the broker is
#               ready when it lists itself, which happens only once it is unfenced
#               (the port accepts connections well before that).
# nats PORT:    nats-server greets with INFO {...}; it starts listening for clients only
#               after JetStream is up, and the INFO says "jetstream": true.
probe() {
  python3 - "$@" <<'PY'
import json, socket, struct, sys

cmd = sys.argv[1]
if cmd == "free-ports":
    socks = []
    for _ in range(int(sys.argv[2])):
        s = socket.socket()
        s.bind(("127.0.0.1", 0))
        socks.append(s)
    print("\n".join(str(s.getsockname()[1]) for s in socks))
    sys.exit(0)

port = int(sys.argv[2])
try:
    with socket.create_connection(("127.0.0.1", port), timeout=2) as s:
        if cmd == "kafka":
            client = b"brokers.sh"
            # header v1: api_key=3 (Metadata), version 4, correlation id, client id;
            # body: topics = [] (none, we only want brokers), allow_auto_topic_creation = false
            req = struct.pack(">hhih", 3, 4, 7, len(client)) + client + struct.pack(">i?", 0, False)
            s.sendall(struct.pack(">i", len(req)) + req)
            buf = b""
            while len(buf) < 16:  # size, correlation id, throttle time, broker count
                chunk = s.recv(4096)
                if not chunk:
                    sys.exit(1)
                buf += chunk
            _, corr, _, brokers = struct.unpack(">iiii", buf[:16])
            sys.exit(0 if corr == 7 and brokers > 0 else 1)
        else:
            buf = b""
            while b"\r\n" not in buf:
                chunk = s.recv(4096)
                if not chunk:
                    sys.exit(1)
                buf += chunk
            line = buf.split(b"\r\n", 1)[0]
            ok = line.startswith(b"INFO ") and json.loads(line[5:]).get("jetstream") is True
            sys.exit(0 if ok else 1)
except (OSError, ValueError):
    sys.exit(1)
PY
}

cmd_free_port() {
  local n=${1:-1}
  [[ $n =~ ^[1-9][0-9]*$ ]] || die "free-port: N must be a positive number"
  probe free-ports "$n"
}

# True while PID runs (a zombie counts as gone: orphans may not get reaped quickly).
alive() {
  local pid=$1 stat
  kill -0 "$pid" 2>/dev/null || return 1
  stat=$(cat "/proc/$pid/stat" 2>/dev/null) || return 0
  [[ ${stat##*) } != Z* ]]
}

# wait_ready KIND PORT TIMEOUT [PID]: polls the probe until it succeeds, the deadline
# passes, or PID exits.
wait_ready() {
  local kind=$1 port=$2 timeout=$3 pid=${4:-}
  local deadline=$((SECONDS + timeout))
  until probe "$kind" "$port"; do
    if [[ -n $pid ]] && ! alive "$pid"; then
      log "$kind (pid $pid) exited before it was ready"
      return 1
    fi
    if ((SECONDS >= deadline)); then
      log "$kind on 127.0.0.1:$port not ready after ${timeout}s"
      return 1
    fi
    sleep 0.25
  done
}

# ---------------------------------------------------------------------------
# kafka

# Broker settings for tests on a small shared machine: one node that is both
# broker and controller, replication factor 1 everywhere, few threads.
write_kafka_config() {
  local data=$1 port=$2 cport=$3
  cat >"$data/server.properties" <<EOF
# Generated by brokers.sh on every start; edits are overwritten.
process.roles=broker,controller
node.id=1
# A static quorum: the voter set lives in this file rather than in the log, so the
# same data dir comes back as the same cluster.
controller.quorum.voters=1@127.0.0.1:$cport
listeners=PLAINTEXT://127.0.0.1:$port,CONTROLLER://127.0.0.1:$cport
advertised.listeners=PLAINTEXT://127.0.0.1:$port
listener.security.protocol.map=PLAINTEXT:PLAINTEXT,CONTROLLER:PLAINTEXT
controller.listener.names=CONTROLLER
inter.broker.listener.name=PLAINTEXT
log.dirs=$data/logs

num.partitions=3
auto.create.topics.enable=true
default.replication.factor=1
min.insync.replicas=1
offsets.topic.replication.factor=1
transaction.state.log.replication.factor=1
transaction.state.log.min.isr=1
share.coordinator.state.topic.replication.factor=1
share.coordinator.state.topic.min.isr=1
# The defaults (50 partitions each) make the first consumer group / transactional
# producer wait while 50 partitions are created.
offsets.topic.num.partitions=3
transaction.state.log.num.partitions=3
# Tests should not wait 3 s for a consumer group to form.
group.initial.rebalance.delay.ms=0

# After a SIGKILL, the restarted broker cannot register until the session of its
# previous incarnation expires (default 9 s). Tests that simulate outages restart
# brokers, so keep that short; heartbeats are local, so a 4 s gap still means a stall.
broker.session.timeout.ms=4000
broker.heartbeat.interval.ms=1000

# Fewer threads: the machine has 2 cores and the Rust build and tests share them.
num.network.threads=2
num.io.threads=2
num.recovery.threads.per.data.dir=1
background.threads=4
log.cleaner.threads=1
EOF
}

# Send the broker's logs to stdout, which cmd_kafka redirects to DATA_DIR/kafka.log.
# Quietens the loggers that Kafka's own log4j2.yaml also sends elsewhere.
write_kafka_log4j() {
  cat >"$1/log4j2.properties" <<'EOF'
# Generated by brokers.sh on every start; edits are overwritten.
status = warn
appender.out.type = Console
appender.out.name = OUT
appender.out.layout.type = PatternLayout
appender.out.layout.pattern = [%d] %p %m (%c)%n
rootLogger.level = INFO
rootLogger.appenderRef.out.ref = OUT
logger.request.name = kafka.request.logger
logger.request.level = WARN
logger.state.name = state.change.logger
logger.state.level = WARN
logger.cleaner.name = kafka.log.LogCleaner
logger.cleaner.level = WARN
logger.authorizer.name = kafka.authorizer.logger
logger.authorizer.level = WARN
# Config dumps (hundreds of lines per start); the settings are in server.properties.
logger.config.name = org.apache.kafka.common.config.AbstractConfig
logger.config.level = WARN
EOF
}

kafka_jvm_opts() {
  local data=$1
  # Serial GC and a small heap: fewest GC threads and least memory for a test broker.
  # C1 only (TieredStopAtLevel=1): much less JIT CPU while starting, plenty fast for tests.
  # No perf data: avoids hsperfdata files and a little overhead.
  printf '%s\n' -Xms256m -Xmx512m -XX:+UseSerialGC -XX:TieredStopAtLevel=1 \
    -XX:-UsePerfData -XX:+ExitOnOutOfMemoryError -Djava.awt.headless=true \
    "-Dlog4j2.configurationFile=$data/log4j2.properties"
}

# A Kafka cluster id: 16 random bytes, URL-safe base64. Never one that starts
# with '-', which the storage tool would read as an option.
random_cluster_id() {
  local id=-
  while [[ $id == -* ]]; do
    id=$(head -c 16 /dev/urandom | base64 | tr '+/' '-_' | tr -d '=\n')
  done
  printf '%s' "$id"
}

cmd_kafka() {
  (($# == 3)) || usage
  local data=$1 port=$2 cport=$3
  command -v java >/dev/null || die "java not found; run: $SCRIPT_PATH install"
  ensure_kafka_jars
  mkdir -p "$data"
  data=$(cd "$data" && pwd)
  write_kafka_config "$data" "$port" "$cport"
  write_kafka_log4j "$data"

  local opts=()
  mapfile -t opts < <(kafka_jvm_opts "$data")
  # Word splitting is intended: a list of flags.
  # shellcheck disable=SC2206
  opts+=(${HOOKBRIDGE_KAFKA_JVM_OPTS:-})

  exec >>"$data/kafka.log" 2>&1
  echo "[brokers.sh] $(date -Is) starting Kafka (pid $$) on 127.0.0.1:$port, controller 127.0.0.1:$cport"
  # Format only once: re-formatting would throw away the data a restarted broker must keep.
  # meta.properties is written last by the format, so its presence means a complete format.
  if [[ ! -f $data/logs/meta.properties ]]; then
    java -Xmx128m -XX:TieredStopAtLevel=1 -XX:+UseSerialGC -XX:-UsePerfData \
      "-Dlog4j2.configurationFile=$data/log4j2.properties" -cp "$KAFKA_LIBS/*" \
      kafka.tools.StorageTool format --config "$data/server.properties" \
      --cluster-id "$(random_cluster_id)" --ignore-formatted
  fi
  # exec: the caller's PID is the JVM's, so SIGKILL on it really kills the broker.
  exec java "${opts[@]}" -cp "$KAFKA_LIBS/*" kafka.Kafka "$data/server.properties"
}

# ---------------------------------------------------------------------------
# nats

cmd_nats() {
  (($# == 2 || $# == 3)) || usage
  local data=$1 port=$2 mport=${3:-} bin
  bin=$(nats_bin)
  mkdir -p "$data/js"
  data=$(cd "$data" && pwd)
  # A fixed server_name: JetStream keys some of its state by server name, and the
  # default is random, so a restarted server would not be the "same" one.
  {
    echo "# Generated by brokers.sh on every start; edits are overwritten."
    echo "server_name: hookbridge-test"
    echo "listen: \"127.0.0.1:$port\""
    [[ -z $mport ]] || echo "http: \"127.0.0.1:$mport\""
    echo "log_file: \"$data/nats.log\""
    echo "jetstream { store_dir: \"$data/js\" }"
  } >"$data/nats.conf"
  # Errors before the log file is opened (bad config, port in use) land in the same file.
  exec >>"$data/nats.log" 2>&1
  echo "[brokers.sh] $(date -Is) starting $bin (pid $$) on 127.0.0.1:$port"
  exec "$bin" -c "$data/nats.conf"
}

# ---------------------------------------------------------------------------
# up / down

# True if PID runs and its command line mentions DIR, i.e. it is still the broker
# we started and not some unrelated process that reused the PID.
ours() {
  local pid=$1 dir=$2
  alive "$pid" || return 1
  [[ -r /proc/$pid/cmdline ]] || return 0
  tr '\0' ' ' <"/proc/$pid/cmdline" | grep -qF -- "$dir"
}

# stop_pids STATE_DIR PIDFILE...: TERM, wait (bounded), then KILL; removes the pid files.
stop_pids() {
  local state=$1 f pid pids=()
  shift
  for f in "$@"; do
    [[ -f $f ]] || continue
    pid=$(<"$f")
    if [[ $pid =~ ^[0-9]+$ ]] && ours "$pid" "$state"; then
      kill -TERM "$pid" 2>/dev/null || true
      pids+=("$pid")
    fi
    rm -f "$f"
  done
  local deadline=$((SECONDS + STOP_TIMEOUT))
  for pid in "${pids[@]}"; do
    while alive "$pid" && ((SECONDS < deadline)); do sleep 0.2; done
    if alive "$pid"; then
      log "pid $pid still running after ${STOP_TIMEOUT}s; killing it"
      kill -KILL "$pid" 2>/dev/null || true
    fi
  done
}

# Starts `brokers.sh SUBCOMMAND ARGS...` in the background, stdin and stdout detached
# (so `$(brokers.sh up ...)` does not wait for the brokers), and sets BG_PID.
start_bg() {
  local logfile=$1
  shift
  mkdir -p "$(dirname "$logfile")"
  bash "$SCRIPT_PATH" "$@" </dev/null >>"$logfile" 2>&1 3>&- &
  BG_PID=$!
}

fail_up() {
  local state=$1 logfile=$2
  log "last lines of $logfile:"
  tail -n 40 "$logfile" >&2 || true
  stop_pids "$state" "$state/kafka.pid" "$state/nats.pid"
  exit 1
}

cmd_up() {
  (($# == 1)) || usage
  # Keep stdout for the export lines only; anything else goes to stderr.
  exec 3>&1 1>&2
  local state=$1
  mkdir -p "$state"
  state=$(cd "$state" && pwd)
  local f
  for f in "$state/kafka.pid" "$state/nats.pid"; do
    if [[ -f $f ]] && ours "$(<"$f")" "$state"; then
      die "brokers already running for $state; run: $SCRIPT_PATH down $state"
    fi
  done

  ensure_system_packages
  ensure_kafka_jars
  # Resolved once: the brokers started below, and the tests' private ones, run this binary.
  HOOKBRIDGE_NATS_SERVER=$(nats_bin)
  export HOOKBRIDGE_NATS_SERVER
  log "NATS: $HOOKBRIDGE_NATS_SERVER ($("$HOOKBRIDGE_NATS_SERVER" --version 2>&1))"

  local ports
  mapfile -t ports < <(probe free-ports 4)
  ((${#ports[@]} == 4)) || die "could not find free ports"
  local kport=${ports[0]} kcport=${ports[1]} nport=${ports[2]} mport=${ports[3]}

  local t0
  t0=$(now_ms)
  start_bg "$state/kafka/kafka.log" kafka "$state/kafka" "$kport" "$kcport"
  local kpid=$BG_PID
  echo "$kpid" >"$state/kafka.pid"
  start_bg "$state/nats/nats.log" nats "$state/nats" "$nport" "$mport"
  local npid=$BG_PID
  echo "$npid" >"$state/nats.pid"
  echo "$kport" >"$state/kafka.port"
  echo "$kcport" >"$state/kafka.controller-port"
  echo "$nport" >"$state/nats.port"
  echo "$mport" >"$state/nats.monitor-port"

  wait_ready nats "$nport" "$NATS_START_TIMEOUT" "$npid" || fail_up "$state" "$state/nats/nats.log"
  log "NATS ready on 127.0.0.1:$nport after $(($(now_ms) - t0)) ms (monitoring: http://127.0.0.1:$mport)"
  wait_ready kafka "$kport" "$KAFKA_START_TIMEOUT" "$kpid" || fail_up "$state" "$state/kafka/kafka.log"
  log "Kafka ready on 127.0.0.1:$kport after $(($(now_ms) - t0)) ms (log: $state/kafka/kafka.log)"

  {
    printf 'export HOOKBRIDGE_TEST_KAFKA_BOOTSTRAP=%q\n' "127.0.0.1:$kport"
    printf 'export HOOKBRIDGE_TEST_NATS_URL=%q\n' "nats://127.0.0.1:$nport"
    printf 'export HOOKBRIDGE_TEST_BROKERS_SCRIPT=%q\n' "$SCRIPT_PATH"
    printf 'export HOOKBRIDGE_NATS_SERVER=%q\n' "$HOOKBRIDGE_NATS_SERVER"
  } | tee "$state/env" >&3
}

cmd_down() {
  (($# == 1)) || usage
  local state=$1
  [[ -d $state ]] || return 0
  state=$(cd "$state" && pwd)
  stop_pids "$state" "$state/kafka.pid" "$state/nats.pid"
}

# ---------------------------------------------------------------------------

main() {
  (($#)) || usage
  local cmd=$1
  shift
  case $cmd in
    install) cmd_install ;;
    libs) ensure_kafka_jars && printf '%s\n' "$KAFKA_LIBS" ;;
    nats-bin) nats_bin ;;
    nats-version) printf '%s\n' "$NATS_VERSION" ;;
    kafka) cmd_kafka "$@" ;;
    nats) cmd_nats "$@" ;;
    up) cmd_up "$@" ;;
    down) cmd_down "$@" ;;
    free-port) cmd_free_port "$@" ;;
    wait-kafka) wait_ready kafka "${1:?PORT}" "${2:-$KAFKA_START_TIMEOUT}" "${3:-}" ;;
    wait-nats) wait_ready nats "${1:?PORT}" "${2:-$NATS_START_TIMEOUT}" "${3:-}" ;;
    -h | --help | help) usage 0 ;;
    *) usage ;;
  esac
}

main "$@"
