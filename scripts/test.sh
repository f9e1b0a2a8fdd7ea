#!/usr/bin/env bash
# The project's one test command: format check, clippy, then the whole test suite
# against real Kafka and NATS JetStream brokers, then (with Docker) the compose stack.
#
#   scripts/test.sh [ARGS...]     ARGS go to `cargo test` (e.g. a test name filter, `-- --nocapture`)
#
# Brokers come from the first of these that works; the output and the summary line name it:
# 1. environment: HOOKBRIDGE_TEST_KAFKA_BOOTSTRAP and HOOKBRIDGE_TEST_NATS_URL both set.
#    Nothing is started; tests that restart a broker of their own use
#    HOOKBRIDGE_TEST_BROKERS_SCRIPT (default: scripts/brokers.sh).
# 2. testcontainers: scripts/docker.sh provides a Docker engine (starting Debian's docker.io
#    if needed and allowed) and the images; every broker, private ones included, is a
#    container. Then scripts/compose-smoke.sh checks docker-compose.yml with Docker Compose
#    (scripts/docker.sh installs Compose v5.6.0 when none is found); a stack that cannot be
#    set up there fails the run.
# 3. processes: scripts/brokers.sh starts one shared Kafka and one shared NATS, stopped
#    when this script exits, and runs the private ones.
# The console's browser tests (tests/it/console.rs) run in `cargo test` with the rest: headless
# Chromium through chromedriver, both Debian's, installed by `scripts/brokers.sh install`.
# If Docker cannot be set up, one line says why and the processes are used: a machine
# without Docker still runs the whole suite (the compose stack is then skipped, and the last
# line says why).
#
# HOOKBRIDGE_TEST_BROKERS=docker|processes forces a source (docker: fail when there is no engine).
# HOOKBRIDGE_TEST_KEEP_STATE=1 keeps the process brokers' data and logs (the path is printed).
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
BROKERS=$ROOT/scripts/brokers.sh
DOCKER=$ROOT/scripts/docker.sh
cd "$ROOT"

step() { printf '==> %s\n' "$*" >&2; }
warn() { printf 'warning: %s\n' "$*" >&2; }

# CI logs are plain text files; colour codes only get in the way there.
if [[ -n ${CI:-} ]]; then
  export CARGO_TERM_COLOR=never
fi

# The nats-server of the broker processes and the chaos test's cluster (built once by
# brokers.sh; Debian's only as a fallback, which it says), resolved once for the whole run.
step "nats-server (scripts/brokers.sh nats-bin)"
HOOKBRIDGE_NATS_SERVER=$(bash "$BROKERS" nats-bin)
export HOOKBRIDGE_NATS_SERVER
NATS_VERSION=$("$HOOKBRIDGE_NATS_SERVER" --version 2>&1 | sed 's/^nats-server: //')

step "install test prerequisites (scripts/brokers.sh install)"
bash "$BROKERS" install
if command -v chromium >/dev/null && command -v chromedriver >/dev/null; then
  step "browser for the console tests: $(chromium --version 2>/dev/null | head -n 1)"
else
  warn "chromium or chromedriver missing: the console's browser tests will say so and pass"
fi

STATE=
SOURCE=
DOCKER_SKIPPED=
# shellcheck disable=SC2317 # invoked by the trap
cleanup() {
  if [[ $SOURCE == testcontainers ]]; then
    bash "$DOCKER" sweep || warn "could not remove the test containers"
  fi
  [[ -n $STATE ]] || return 0
  step "stop brokers"
  bash "$BROKERS" down "$STATE" || warn "could not stop the brokers in $STATE"
  if [[ -n ${HOOKBRIDGE_TEST_KEEP_STATE:-} ]]; then
    step "broker data and logs kept in $STATE"
  else
    rm -rf "$STATE"
  fi
}
# INT/TERM exit through the EXIT trap, which keeps the exit status.
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

# try_docker: the engine and the images, or one line saying why not. Never fails the run:
# a Docker setup problem is a reason to use the processes, not a test failure.
try_docker() {
  local log exports reason
  log=$(mktemp "${TMPDIR:-/tmp}/hookbridge-docker.XXXXXX")
  step "Docker engine and broker images (scripts/docker.sh up)"
  local ok=0
  exports=$(timeout 1200 bash "$DOCKER" up 2>"$log") && eval "$exports" && ok=1
  cat "$log" >&2
  if ((ok)); then
    rm -f "$log"
    return 0
  fi
  reason=$(grep -v '^\s*$' "$log" | tail -n 1 | cut -c1-300)
  DOCKER_SKIPPED="${reason:-scripts/docker.sh up failed} (log: $log)"
  return 1
}

mode=${HOOKBRIDGE_TEST_BROKERS:-auto}
case $mode in
  auto | docker | processes) ;;
  *)
    echo "HOOKBRIDGE_TEST_BROKERS must be docker or processes (got '$mode')" >&2
    exit 2
    ;;
esac

if [[ -n ${HOOKBRIDGE_TEST_KAFKA_BOOTSTRAP:-} && -n ${HOOKBRIDGE_TEST_NATS_URL:-} ]]; then
  SOURCE=environment
  export HOOKBRIDGE_TEST_BROKERS_SCRIPT=${HOOKBRIDGE_TEST_BROKERS_SCRIPT:-$BROKERS}
  step "brokers: environment (Kafka $HOOKBRIDGE_TEST_KAFKA_BOOTSTRAP, NATS $HOOKBRIDGE_TEST_NATS_URL)"
elif [[ $mode != processes ]] && try_docker; then
  SOURCE=testcontainers
  # Private brokers are containers too.
  unset HOOKBRIDGE_TEST_KAFKA_BOOTSTRAP HOOKBRIDGE_TEST_NATS_URL HOOKBRIDGE_TEST_BROKERS_SCRIPT
  step "brokers: testcontainers (Kafka $HOOKBRIDGE_TEST_KAFKA_IMAGE, NATS $HOOKBRIDGE_TEST_NATS_IMAGE)"
  # The tests' NATS is the image's; the chaos test's cluster still runs brokers.sh's.
  image_nats=$(timeout 60 docker run --rm "$HOOKBRIDGE_TEST_NATS_IMAGE" --version 2>&1 | sed -n 's/^nats-server: //p') || true
  if [[ ${image_nats:-unknown} != "$NATS_VERSION" ]]; then
    NATS_VERSION="${image_nats:-unknown} (image; $NATS_VERSION for the chaos test)"
  fi
else
  if [[ $mode == docker ]]; then
    echo "HOOKBRIDGE_TEST_BROKERS=docker, but Docker is not available: $DOCKER_SKIPPED" >&2
    exit 1
  fi
  [[ -z $DOCKER_SKIPPED ]] || warn "not using Docker: $DOCKER_SKIPPED; using scripts/brokers.sh"
  SOURCE=processes
  STATE=$(mktemp -d "${TMPDIR:-/tmp}/hookbridge-test.XXXXXX")
  export HOOKBRIDGE_TEST_BROKERS_SCRIPT=$BROKERS
  step "start Kafka and NATS (scripts/brokers.sh up $STATE)"
  # Not `eval "$(...)"` directly: that would hide a failure of `up` (eval of "" succeeds).
  exports=$(bash "$BROKERS" up "$STATE")
  eval "$exports"
  step "brokers: processes (Kafka $HOOKBRIDGE_TEST_KAFKA_BOOTSTRAP, NATS $HOOKBRIDGE_TEST_NATS_URL)"
fi

step "cargo fmt --all -- --check"
if cargo fmt --version >/dev/null 2>&1; then
  cargo fmt --all -- --check
else
  warn "rustfmt is not installed; skipping the format check"
fi

step "cargo clippy --all-targets --locked -- -D warnings"
cargo clippy --all-targets --locked -- -D warnings

step "the module graph: no import cycle, no file in src/ over 700 lines of code (scripts/imports.py)"
python3 scripts/imports.py

# Benches are load generators run by scripts/bench.sh (clippy above still checks them).
step "cargo test --locked --lib --bins --tests${*:+ $*} (brokers: $SOURCE, nats-server $NATS_VERSION)"
status=0
cargo test --locked --lib --bins --tests "$@" || status=$?
# The chaos test starts broker clusters and six replicas of its own: alone, after the rest.
if ((status == 0 && $# == 0)); then
  step "chaos test: cluster mode on broker clusters, reduced scale (tests/it/chaos.rs)"
  cargo test --locked --test it chaos -- --ignored --nocapture || status=$?
fi

# The compose stack, whenever the tests ran on the Docker engine. There, a stack that cannot
# be set up (no Compose, image build, ...) fails the run with the reason: a skip would hide
# a missing step. Only a machine without a usable engine skips it, and the summary says so.
if ((status != 0)); then
  compose="not run: the tests failed"
elif (($#)); then
  compose="skipped: a filtered run"
elif [[ $SOURCE == testcontainers ]]; then
  step "compose stack (scripts/compose-smoke.sh)"
  smoke_log=$(mktemp "${TMPDIR:-/tmp}/hookbridge-smoke.XXXXXX")
  smoke=0
  bash "$ROOT/scripts/compose-smoke.sh" 2>&1 | tee "$smoke_log" >&2 || smoke=$?
  # (grep finds nothing after a pass: not an error here)
  reason=$(grep -E '^compose-smoke: (FAILED: |cannot set up the stack: |skipped: )' "$smoke_log" |
    tail -n 1 | sed 's/^compose-smoke: //' | cut -c1-300) || true
  used=$(sed -n 's/^compose-smoke: using //p' "$smoke_log" | tail -n 1) || true
  rm -f "$smoke_log"
  if ((smoke == 0)); then
    compose="passed (${used:-compose version unknown})"
  else
    compose="FAILED (exit status $smoke): ${reason:-see above}"
    status=1
  fi
elif [[ $SOURCE == processes && $mode == processes ]]; then
  compose="skipped: HOOKBRIDGE_TEST_BROKERS=processes"
elif [[ $SOURCE == processes ]]; then
  compose="skipped: no usable Docker engine"
else
  compose="skipped: brokers from the environment"
fi

summary="brokers: $SOURCE"
if [[ $SOURCE == environment ]]; then
  summary+="; nats-server $NATS_VERSION for private brokers and the chaos test"
else
  summary+="; nats-server $NATS_VERSION"
fi
[[ -z $DOCKER_SKIPPED ]] || summary+=" (Docker not used: $DOCKER_SKIPPED)"
summary+="; compose stack: $compose"
if ((status == 0)); then
  step "tests passed ($summary)"
else
  step "tests failed, exit status $status ($summary)"
fi
exit "$status"
