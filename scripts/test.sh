#!/usr/bin/env bash
# The project's one test command: format check, clippy, then the whole test suite
# against real Kafka and NATS JetStream brokers.
#
#   scripts/test.sh [ARGS...]     ARGS go to `cargo test` (e.g. a test name filter, `-- --nocapture`)
#
# Brokers: unless HOOKBRIDGE_TEST_KAFKA_BOOTSTRAP and HOOKBRIDGE_TEST_NATS_URL are both
# set (then those brokers are used and nothing is started), one shared Kafka and one
# shared NATS are started with scripts/brokers.sh and stopped when this script exits.
# HOOKBRIDGE_TEST_BROKERS_SCRIPT always points at brokers.sh, for tests that run
# private brokers (e.g. to kill and restart one).
#
# HOOKBRIDGE_TEST_KEEP_STATE=1 keeps the brokers' data and logs (the path is printed).
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
BROKERS=$ROOT/scripts/brokers.sh
cd "$ROOT"

step() { printf '==> %s\n' "$*" >&2; }
warn() { printf 'warning: %s\n' "$*" >&2; }

# CI logs are plain text files; colour codes only get in the way there.
if [[ -n ${CI:-} ]]; then
  export CARGO_TERM_COLOR=never
fi

step "install test prerequisites (scripts/brokers.sh install)"
bash "$BROKERS" install

export HOOKBRIDGE_TEST_BROKERS_SCRIPT=$BROKERS

STATE=
# shellcheck disable=SC2317 # invoked by the trap
cleanup() {
  [[ -n $STATE ]] || return 0
  step "stop brokers"
  bash "$BROKERS" down "$STATE" || warn "could not stop the brokers in $STATE"
  if [[ -n ${HOOKBRIDGE_TEST_KEEP_STATE:-} ]]; then
    step "broker data and logs kept in $STATE"
  else
    rm -rf "$STATE"
  fi
}

if [[ -n ${HOOKBRIDGE_TEST_KAFKA_BOOTSTRAP:-} && -n ${HOOKBRIDGE_TEST_NATS_URL:-} ]]; then
  step "use the brokers from the environment: Kafka $HOOKBRIDGE_TEST_KAFKA_BOOTSTRAP, NATS $HOOKBRIDGE_TEST_NATS_URL"
else
  STATE=$(mktemp -d "${TMPDIR:-/tmp}/hookbridge-test.XXXXXX")
  # Set before starting anything, so an interrupt during startup still cleans up.
  # INT/TERM exit through the EXIT trap, which keeps the exit status.
  trap cleanup EXIT
  trap 'exit 130' INT
  trap 'exit 143' TERM
  step "start Kafka and NATS (scripts/brokers.sh up $STATE)"
  # Not `eval "$(...)"` directly: that would hide a failure of `up` (eval of "" succeeds).
  exports=$(bash "$BROKERS" up "$STATE")
  eval "$exports"
  step "Kafka $HOOKBRIDGE_TEST_KAFKA_BOOTSTRAP, NATS $HOOKBRIDGE_TEST_NATS_URL"
fi

step "cargo fmt --all -- --check"
if cargo fmt --version >/dev/null 2>&1; then
  cargo fmt --all -- --check
else
  warn "rustfmt is not installed; skipping the format check"
fi

step "cargo clippy --all-targets --locked -- -D warnings"
cargo clippy --all-targets --locked -- -D warnings

# Benches are load generators run by scripts/bench.sh (clippy above still checks them).
step "cargo test --locked --lib --bins --tests${*:+ $*}"
status=0
cargo test --locked --lib --bins --tests "$@" || status=$?
if ((status == 0)); then
  step "tests passed"
else
  step "tests failed (exit status $status)"
fi
exit "$status"
