#!/usr/bin/env bash
# bench.sh: hookbridge's ingest benchmark (the speed targets of issues 3, 4 and 12),
# load generator included, everything on 127.0.0.1.
#
#   scripts/bench.sh
#
# Builds hookbridge (release) and the bench binary (benches/ingest.rs), starts a
# private single-node Kafka (scripts/brokers.sh kafka) and a private nats-server with
# JetStream (scripts/brokers.sh nats), runs hookbridge with the Kafka publisher (the
# JetStream one in the jetstream phase), and runs in order:
#   baseline    full-speed load against an in-process axum handler that only answers 200
#   dedup-on    full-speed load against hookbridge to Kafka (outbox.dedup = true, the default)
#   dedup-off   the same with HOOKBRIDGE_OUTBOX__DEDUP=false (fresh data dir)
#   jetstream   full-speed load against hookbridge to NATS JetStream (dedup on, PubAck awaited)
#   fixed-rate  open-loop load at BENCH_RATE/s, latency from each request's due time
#   drain       Kafka stopped, BENCH_DRAIN_COUNT callbacks posted, Kafka started:
#               events/s from the first publish to an empty outbox
#   dedup-size  the outbox alone: on-disk size of BENCH_DEDUP_COUNT tasks' dedup records
#   edge        hookbridge with its DEFAULT limits (rate limits on; a fresh one per
#               attack), good callbacks from 127.0.0.1 (BENCH_EDGE_RATE/s on a keep-alive
#               pool opened before the attack, BENCH_EDGE_FRESH_RATE/s each on a fresh
#               connection), the attack always from 127.0.0.2 and up; one run per attack
#               of BENCH_EDGE_PHASES:
#                 quiet   no attack: the reference
#                 burst   the sender's own burst: BENCH_EDGE_BURST callbacks for distinct
#                         tasks from 127.0.0.1 over 16 keep-alive connections, at once
#                 junk    16 connections posting invalid 1 MiB bodies, as fast as answered
#                 slow    BENCH_EDGE_SLOW connections declaring Content-Length: 100000 and
#                         sending a byte every 5 s
#                 churn   BENCH_EDGE_CHURN_RATE new connections/s, each GET /healthz, held
#                         open 2 s, against the good sender's pool
#                 forged  valid-looking callbacks for random task ids, BENCH_EDGE_FORGED_RATE/s
#                 loris   (not in the default list) BENCH_LORIS half request heads
#               each prints good p50/p99 (from the due time) and p99 / quiet p99, the good
#               callbacks LOST (any answer but 200, or none) by kind, and hookbridge's CPU
#               (/proc/PID/stat) per refused attack request. Goal: p99 <= 2x quiet, 0 lost.
#   recovery    the outbox alone: BENCH_RECOVERY_COUNT events left pending, then the time
#               to reopen it (restart after an outage), its data dir size and peak RSS
#   large       hookbridge with its Kafka unreachable (every publish fails): BENCH_LARGE_COUNT
#               valid callbacks of BENCH_LARGE_SIZE bytes posted, then kept pending for
#               BENCH_LARGE_HOLD s while the relay retries; its peak RSS (the relay's batches
#               are bounded in bytes by outbox.relay_batch_bytes)
# and, only when named in BENCH_PHASES (they take minutes), the long runs of issue 25:
#   soak        a data dir pre-filled with BENCH_SOAK_TRACKED tracked tasks (`ingest prefill`:
#               the outbox alone, distinct tasks appended by 2048 concurrent appenders and all
#               acknowledged, so their dedup records sit in the task store as after days of
#               traffic), then hookbridge (Kafka) on it under an open-loop load of NEW tasks
#               at BENCH_SOAK_RATE/s for BENCH_SOAK_MINUTES. Per minute: p50/p99/p99.9/max
#               from each request's due time (every request kept, no buckets);
#               hookbridge's own answer histogram (p50/p99/p99.9, bucket bounds); the pending
#               log's write+fdatasync and the checkpoint's transaction (count, p99/p99.9/max),
#               both from /metrics diffed per minute; VmRSS, the tracked tasks, the load average.
#   cold-start  hookbridge started again on the soak's data dir (prefilled when the soak did
#               not run) after its files were dropped from the page cache (posix_fadvise,
#               only these files; BENCH_COLD_WARM=1 keeps them), then the same load and
#               figures for BENCH_COLD_SECONDS per BENCH_COLD_WINDOW s, and the time from the
#               start to /healthz. Goal: within 2x the soak's steady minutes.
#               e.g. BENCH_PHASES="soak cold-start" scripts/bench.sh (about 13 minutes)
# then prints a summary table. Every full-speed phase also reports:
#   end to end  the broker's acknowledgements per second against the 2xx answers per
#               second, both from hookbridge's own counters over the same window
#   RSS         the bridge's peak resident set (VmHWM in /proc) over its whole run
#   ratio       its answers per second over the baseline's, same run
# Every phase is bounded in time; all processes this script started are stopped when
# it exits (also on Ctrl-C). Total: about 2.5 minutes after the build. On a shared
# machine the figures move by 10-20% between runs: compare runs made back to back, and
# read the load average printed with the summary.
#
# Environment (all optional):
#   BENCH_PHASES           phases to run, space separated (default: all, in the order above)
#   BENCH_DURATION         measured seconds of each full-speed run (default 10)
#   BENCH_CONNECTIONS      closed-loop keep-alive connections (default 128)
#   BENCH_RATE             fixed-rate requests/s (default 5000)
#   BENCH_RATE_DURATION    fixed-rate measured seconds (default 15)
#   BENCH_DRAIN_COUNT      callbacks posted during the outage (default 200000)
#   BENCH_DEDUP_COUNT      distinct tasks for dedup-size (default 1000000)
#   BENCH_RECOVERY_COUNT   pending events for recovery (default 1000000)
#   BENCH_EDGE_PHASES      edge attacks to run, in order (default: quiet burst junk slow
#                          churn forged; quiet first, it is the others' reference)
#   BENCH_EDGE_RATE        good callbacks/s on the sender's pool in the edge phases (default 100)
#   BENCH_EDGE_FRESH_RATE  good callbacks/s each on a fresh connection (default 5)
#   BENCH_EDGE_DURATION    measured seconds of each edge phase (default 10; plus 1 s of
#                          attack ramp, 1 s warm-up, at most 10 s for the last answers)
#   BENCH_EDGE_ATTACKERS   attacker addresses, 127.0.0.2 and up (default 4)
#   BENCH_EDGE_BURST       callbacks in the burst (default 3000)
#   BENCH_EDGE_SLOW        slow-body connections (default 700)
#   BENCH_EDGE_CHURN_RATE  churned connections/s (default 500)
#   BENCH_EDGE_FORGED_RATE forged callbacks/s (default 1000; 0: as fast as answered)
#   BENCH_LORIS            slow-loris connections (default 2000)
#   BENCH_JUNK_RATE        junk bodies/s (default 0: as fast as they are answered)
#   BENCH_LARGE_COUNT      large pending callbacks (default 400)
#   BENCH_LARGE_SIZE       bytes of each (default 1000000)
#   BENCH_LARGE_HOLD       seconds they stay pending, publishes failing (default 20)
#   BENCH_SOAK_RATE        new tasks/s of the soak and the cold start (default 4000)
#   BENCH_SOAK_MINUTES     soak minutes (default 10)
#   BENCH_SOAK_TRACKED     tracked tasks pre-filled (default 2000000)
#   BENCH_COLD_SECONDS     measured seconds after the cold start (default 60)
#   BENCH_COLD_WINDOW      seconds per printed window of the cold start (default 10)
#   BENCH_COLD_WARM=1      keep the data dir in the page cache for the cold start
#                          The edge phases pass HOOKBRIDGE_* on as well, e.g. to measure
#                          with the sender known (issue 19's server.senders):
#                          HOOKBRIDGE_SERVER__SENDERS='["127.0.0.1/32"]'
#   BENCH_CLIENT_THREADS   load generator runtime threads (default 1)
#   BENCH_KEEP=1           keep the state dir (logs, data) and print its path
#   BENCH_NO_SYNC=1        do not `sync` before each load phase (see measured() below)
#   BENCH_HOOKBRIDGE=PATH  run this hookbridge binary instead of building one (to compare
#                          two builds back to back)
#   BENCH_PERF=1           record a perf profile of hookbridge during each load phase
#                          and print its top symbols (needs perf)
#   HOOKBRIDGE_*           passed on to hookbridge, e.g. HOOKBRIDGE_OUTBOX__RELAY_BATCH=5000
#                          or HOOKBRIDGE_PUBLISHER__OPTIONS__LINGER_MS=20 (librdkafka linger.ms)
#
# The bench binary can also be run by hand: cargo bench --bench ingest -- --help
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
BROKERS=$ROOT/scripts/brokers.sh
cd "$ROOT"

LOAD_AT_START=$(cut -d' ' -f1-3 /proc/loadavg)
PHASES=${BENCH_PHASES:-baseline dedup-on dedup-off jetstream fixed-rate drain dedup-size edge recovery large}
DURATION=${BENCH_DURATION:-10}
CONNECTIONS=${BENCH_CONNECTIONS:-128}
RATE=${BENCH_RATE:-5000}
RATE_DURATION=${BENCH_RATE_DURATION:-15}
DRAIN_COUNT=${BENCH_DRAIN_COUNT:-200000}
DEDUP_COUNT=${BENCH_DEDUP_COUNT:-1000000}
RECOVERY_COUNT=${BENCH_RECOVERY_COUNT:-1000000}
EDGE_PHASES=${BENCH_EDGE_PHASES:-quiet burst junk slow churn forged}
EDGE_RATE=${BENCH_EDGE_RATE:-100}
EDGE_FRESH_RATE=${BENCH_EDGE_FRESH_RATE:-5}
EDGE_DURATION=${BENCH_EDGE_DURATION:-10}
EDGE_ATTACKERS=${BENCH_EDGE_ATTACKERS:-4}
EDGE_BURST=${BENCH_EDGE_BURST:-3000}
EDGE_SLOW=${BENCH_EDGE_SLOW:-700}
EDGE_CHURN_RATE=${BENCH_EDGE_CHURN_RATE:-500}
EDGE_FORGED_RATE=${BENCH_EDGE_FORGED_RATE:-1000}
LORIS=${BENCH_LORIS:-2000}
JUNK_RATE=${BENCH_JUNK_RATE:-0}
LARGE_COUNT=${BENCH_LARGE_COUNT:-400}
LARGE_SIZE=${BENCH_LARGE_SIZE:-1000000}
LARGE_HOLD=${BENCH_LARGE_HOLD:-20}
SOAK_RATE=${BENCH_SOAK_RATE:-4000}
SOAK_MINUTES=${BENCH_SOAK_MINUTES:-10}
SOAK_TRACKED=${BENCH_SOAK_TRACKED:-2000000}
COLD_SECONDS=${BENCH_COLD_SECONDS:-60}
COLD_WINDOW=${BENCH_COLD_WINDOW:-10}
# The slow-loris phase holds thousands of sockets in the load generator.
ulimit -n "$(ulimit -Hn)" 2>/dev/null || true
export BENCH_CLIENT_THREADS=${BENCH_CLIENT_THREADS:-1}

step() { printf '\n==> %s\n' "$*" >&2; }
die() {
  printf 'bench.sh: error: %s\n' "$*" >&2
  exit 1
}
now_ms() { date +%s%3N; }
want() { [[ " $PHASES " == *" $1 "* ]]; }

# ---------------------------------------------------------------------------
# Build

step "build: cargo build --release --bin hookbridge; cargo bench --no-run --bench ingest"
bash "$BROKERS" install
if [[ -n ${BENCH_HOOKBRIDGE:-} ]]; then
  HOOKBRIDGE=$BENCH_HOOKBRIDGE
else
  cargo build --release --bin hookbridge
  HOOKBRIDGE=${CARGO_TARGET_DIR:-$ROOT/target}/release/hookbridge
fi
# The bench's artifact line (the hookbridge binary is built too, for CARGO_BIN_EXE_*).
BENCH=$(cargo bench --no-run --bench ingest --message-format=json |
  grep '"kind":\["bench"\]' | sed -n 's/.*"executable":"\([^"]*\)".*/\1/p' | tail -n 1)
[[ -x $HOOKBRIDGE && -x ${BENCH:-} ]] || die "build did not produce hookbridge and the bench binary"

# ---------------------------------------------------------------------------
# Processes (only the ones started here are ever stopped)

STATE=$(mktemp -d "${TMPDIR:-/tmp}/hookbridge-bench.XXXXXX")
KAFKA_PID='' NATS_PID='' HB_PID='' HB_NAME='' DRAIN_PID=''

alive() { [[ -n $1 ]] && kill -0 "$1" 2>/dev/null; }

# stop PID TIMEOUT_S: TERM, wait (bounded), then KILL.
stop() {
  local pid=$1 timeout=$2
  alive "$pid" || return 0
  kill -TERM "$pid" 2>/dev/null || true
  local deadline=$((SECONDS + timeout))
  while alive "$pid" && ((SECONDS < deadline)); do sleep 0.1; done
  if alive "$pid"; then
    printf 'bench.sh: pid %s did not stop in %ss; killing it\n' "$pid" "$timeout" >&2
    kill -KILL "$pid" 2>/dev/null || true
  fi
  wait "$pid" 2>/dev/null || true
}

# shellcheck disable=SC2317 # invoked by the trap
cleanup() {
  stop "$DRAIN_PID" 5
  stop "$HB_PID" 20
  stop "$KAFKA_PID" 30
  stop "$NATS_PID" 10
  if [[ -n ${BENCH_KEEP:-} ]]; then
    printf 'bench.sh: logs and data kept in %s\n' "$STATE" >&2
  else
    rm -rf "$STATE"
  fi
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

mapfile -t PORTS < <(bash "$BROKERS" free-port 6)
KPORT=${PORTS[0]} KCPORT=${PORTS[1]} HPORT=${PORTS[2]} APORT=${PORTS[3]} NPORT=${PORTS[4]}
# Nothing listens there: the large phase's Kafka that never answers.
DEADPORT=${PORTS[5]}
URL=http://127.0.0.1:$HPORT
ADMIN=http://127.0.0.1:$APORT

start_kafka() {
  local try
  for try in 1 2; do
    bash "$BROKERS" kafka "$STATE/kafka" "$KPORT" "$KCPORT" </dev/null >/dev/null 2>&1 &
    KAFKA_PID=$!
    bash "$BROKERS" wait-kafka "$KPORT" 90 "$KAFKA_PID" && return 0
    stop "$KAFKA_PID" 30
    KAFKA_PID=
    # A first start can fail in the format step (a random cluster id that starts with
    # "-" reads as an option); an unformatted data dir is safe to start over once.
    [[ $try == 1 && ! -f $STATE/kafka/logs/meta.properties ]] || break
    printf 'bench.sh: Kafka failed to format; retrying once\n' >&2
    rm -rf "$STATE/kafka"
  done
  die "Kafka did not start (log: $STATE/kafka/kafka.log)"
}

start_nats() {
  bash "$BROKERS" nats "$STATE/nats" "$NPORT" </dev/null >/dev/null 2>&1 &
  NATS_PID=$!
  bash "$BROKERS" wait-nats "$NPORT" 30 "$NATS_PID" || die "nats-server did not start (log: $STATE/nats/nats.log)"
}

# The publisher settings of each broker (the config refuses unknown keys, so only one set).
KAFKA_PUBLISHER=(HOOKBRIDGE_PUBLISHER__TYPE=kafka HOOKBRIDGE_PUBLISHER__BROKERS="127.0.0.1:$KPORT"
  HOOKBRIDGE_PUBLISHER__TOPIC=bench)
NATS_PUBLISHER=(HOOKBRIDGE_PUBLISHER__TYPE=nats HOOKBRIDGE_PUBLISHER__URL="nats://127.0.0.1:$NPORT"
  HOOKBRIDGE_PUBLISHER__SUBJECT='bench.{state}' HOOKBRIDGE_PUBLISHER__STREAM__NAME=BENCH
  HOOKBRIDGE_PUBLISHER__STREAM__SUBJECTS='["bench.>"]')
PUBLISHER=("${KAFKA_PUBLISHER[@]}")
# Every phase runs hookbridge's default limits: valid callbacks are never rate limited.

# start_hookbridge NAME [VAR=VALUE...]: a fresh data dir per NAME, the publisher of $PUBLISHER.
start_hookbridge() {
  local name=$1
  shift
  HB_NAME=$name
  env "${PUBLISHER[@]}" \
    HOOKBRIDGE_OUTBOX__DATA_DIR="$STATE/data-$name" \
    HOOKBRIDGE_SERVER__LISTEN="127.0.0.1:$HPORT" \
    HOOKBRIDGE_ADMIN__LISTEN="127.0.0.1:$APORT" \
    HOOKBRIDGE_LOG__LEVEL="${HOOKBRIDGE_LOG__LEVEL:-warn}" \
    "$@" "$HOOKBRIDGE" </dev/null >"$STATE/hookbridge-$name.log" 2>&1 &
  HB_PID=$!
  "$BENCH" wait-http --url "$URL/healthz" --timeout 30 ||
    die "hookbridge did not start (log: $STATE/hookbridge-$name.log)"
}

# Peak RSS (VmHWM) of the running hookbridge, in MiB, kept as $STATE/rss-NAME.out.
stop_hookbridge() {
  if alive "$HB_PID"; then
    awk '/^VmHWM:/ { printf "RESULT rss_peak_mib=%.0f\n", $2 / 1024 }' "/proc/$HB_PID/status" \
      >"$STATE/rss-$HB_NAME.out" 2>/dev/null || true
  fi
  stop "$HB_PID" 20
  HB_PID=
}

# counters: "accepted published" from hookbridge's /admin/status.
counters() {
  curl -fsS --max-time 5 "$ADMIN/admin/status" |
    jq -r '.outbox.counters | "\(.accepted) \(.published)"' 2>/dev/null || echo "- -"
}

# buckets: hookbridge's answer-time and pending-log fdatasync histograms from /metrics,
# as "name le count" lines (name: webhook_answer or outbox_fsync).
buckets() {
  curl -fsS --max-time 5 "$ADMIN/metrics" 2>/dev/null |
    sed -n 's/^hookbridge_\(webhook_answer\|outbox_fsync\)_duration_seconds_bucket{le="\([^"]*\)"} \([0-9]*\)$/\1 \2 \3/p'
}

# server_side NAME BEFORE AFTER: what hookbridge itself measured between two buckets
# snapshots. The answer time runs from the handler's start (body read) to its answer:
# without the load generator's, the sockets' and HTTP parsing's share. Printed: its
# share within 2 ms and the bucket bound of its p99; then the same for the fdatasync of
# each group commit, with how many answers a sync carried on average.
server_side() {
  paste -d' ' "$2" "$3" | awk '
    { key = $1 " " $2; n[key] = $6 - $3; if (!($1 in total) || $2 == "+Inf") total[$1] = n[key]; les[$1] = les[$1] " " $2 }
    function within(name, le) { return total[name] > 0 ? n[name " " le] / total[name] * 100 : 0 }
    function p99(name,   k, list, i, le) {
      k = split(les[name], list, " ")
      for (i = 1; i <= k; i++) {
        le = list[i]
        if (n[name " " le] >= 0.99 * total[name]) return (le == "+Inf") ? "inf" : le * 1000
      }
      return "-"
    }
    END {
      if (total["webhook_answer"] <= 0) { print "RESULT server_within_2ms=- server_p99_le_ms=-"; exit }
      printf "hookbridge answer time (its own histogram): %.2f%% within 2 ms, p99 <= %s ms\n", within("webhook_answer", "0.002"), p99("webhook_answer")
      if (total["outbox_fsync"] > 0)
        printf "its write + fdatasync per group: %d groups (%.1f answers each), %.2f%% within 1 ms, %.2f%% within 2 ms, p99 <= %s ms\n", total["outbox_fsync"], total["webhook_answer"] / total["outbox_fsync"], within("outbox_fsync", "0.001"), within("outbox_fsync", "0.002"), p99("outbox_fsync")
      printf "RESULT server_within_2ms=%.2f server_p99_le_ms=%s sync_within_1ms=%.2f sync_p99_le_ms=%s\n", within("webhook_answer", "0.002"), p99("webhook_answer"), within("outbox_fsync", "0.001"), p99("outbox_fsync")
    }' | tee "$STATE/$1-server.out"
}

# full_speed NAME: a closed-loop phase against the running hookbridge, then the end-to-end
# rate over the same window (broker acks/s vs answers/s) and the wait until it drained.
full_speed() {
  local name=$1 a0 p0 a1 p1 t0 t1 c0 c1
  read -r a0 p0 < <(counters)
  t0=$(now_ms) c0=$(proc_ticks "$HB_PID")
  measured "$name" "$BENCH" full-speed --url "$URL" --duration "$DURATION" --connections "$CONNECTIONS"
  read -r a1 p1 < <(counters)
  t1=$(now_ms) c1=$(proc_ticks "$HB_PID")
  phase "$name-relay" "$BENCH" wait-drained --url "$URL" --admin-url "$ADMIN" --timeout 120
  awk -v a0="$a0" -v p0="$p0" -v a1="$a1" -v p1="$p1" -v ms="$((t1 - t0))" -v ticks="$((c1 - c0))" 'BEGIN {
    if (a0 == "-" || a1 == "-") { print "RESULT e2e_ratio=-"; exit }
    acc = (a1 - a0) / (ms / 1000); pub = (p1 - p0) / (ms / 1000)
    printf "end to end over %.1f s: answered %.0f/s, acked by the broker %.0f/s\n", ms / 1000, acc, pub
    # CPU per event: steadier than the rates when other work shares the cores.
    cpu_us = (a1 > a0) ? ticks * 10000 / (a1 - a0) : 0
    printf "hookbridge CPU per accepted event: %.1f us\n", cpu_us
    printf "RESULT e2e_accepted_rps=%.0f e2e_published_rps=%.0f e2e_ratio=%.2f cpu_us_per_event=%.1f\n", acc, pub, (acc > 0 ? pub / acc : 0), cpu_us
  }' | tee "$STATE/$name-e2e.out"
}

# phase NAME CMD...: runs CMD, shows and keeps its output in $STATE/NAME.out.
phase() {
  local name=$1
  shift
  "$@" | tee "$STATE/$name.out"
}

# CPU accounting, a cheap profile: where the two cores went during a load phase.
# Ticks are USER_HZ (100/s). busy = user+nice+system+irq+softirq+steal of all CPUs.
busy_ticks() { awk '/^cpu /{ print $2 + $3 + $4 + $7 + $8 + $9 }' /proc/stat; }
proc_ticks() {
  local pid=$1
  if [[ -n $pid && -r /proc/$pid/stat ]]; then
    sed 's/.*) //' "/proc/$pid/stat" | awk '{ print $12 + $13 }'
  else
    echo 0
  fi
}
# "name ticks" per thread name of PID (trailing digits dropped: rdk:broker1 -> rdk:broker).
thread_ticks() {
  local pid=$1 f
  [[ -n $pid && -d /proc/$pid/task ]] || return 0
  for f in /proc/"$pid"/task/*/stat; do
    sed -E 's/^[0-9]+ \((.*)\) (.*)$/\1|\2/' "$f" 2>/dev/null || true
  done | awk -F'|' '{ split($2, a, " "); n = $1; gsub(/[ ]/, "_", n); sub(/[-_0-9]+$/, "", n); t[n] += a[12] + a[13] }
    END { for (n in t) print n, t[n] }'
}

# measured NAME CMD...: phase NAME, then one line on where the CPU went (hookbridge by
# thread, the broker (NATS when running, else Kafka), the load generator as it reports itself, everything else, idle).
measured() {
  local name=$1
  shift
  # Write back the page cache first. Otherwise the kernel flushes the previous phase's
  # Kafka log (hundreds of MB, ~30 s after it was written) in the middle of this one,
  # and on one shared ext4 disk the outbox's fdatasync waits behind it (stalls of
  # 100-200 ms). BENCH_NO_SYNC=1 keeps that effect in the figures.
  [[ -n ${BENCH_NO_SYNC:-} ]] || sync
  local k0 c0 t0
  thread_ticks "$HB_PID" >"$STATE/$name.threads0"
  k0=$(proc_ticks "${NATS_PID:-$KAFKA_PID}") c0=$(busy_ticks) t0=$(now_ms)
  local perf_pid=
  if [[ -n ${BENCH_PERF:-} && -n $HB_PID ]] && command -v perf >/dev/null; then
    perf record -q -F 999 -p "$HB_PID" -o "$STATE/$name.perf.data" >/dev/null 2>&1 &
    perf_pid=$!
  fi
  phase "$name" "$@"
  if [[ -n $perf_pid ]]; then
    kill -INT "$perf_pid" 2>/dev/null || true
    wait "$perf_pid" 2>/dev/null || true
    perf report -i "$STATE/$name.perf.data" --no-children --sort comm,symbol --stdio 2>/dev/null |
      grep -v '^#' | grep -v '^$' | head -n 40 >"$STATE/$name.perf.txt" || true
    echo "hookbridge perf profile (top symbols by thread; full: $STATE/$name.perf.txt):"
    head -n 25 "$STATE/$name.perf.txt"
  fi
  thread_ticks "$HB_PID" >"$STATE/$name.threads1"
  local k1 c1 t1
  k1=$(proc_ticks "${NATS_PID:-$KAFKA_PID}") c1=$(busy_ticks) t1=$(now_ms)
  awk -v wall_ms="$((t1 - t0))" -v kafka="$((k1 - k0))" -v busy="$((c1 - c0))" \
    -v gen="$(result "$name" cpu_s)" -v cores="$(nproc)" '
    FNR == NR { before[$1] = $2; next }
    { d = $2 - before[$1]; hb += d; if (d > 0) th[$1] = d }
    END {
      wall = wall_ms / 1000; gen = (gen == "-") ? 0 : gen
      nt = 0; for (n in th) names[++nt] = n
      for (i = 1; i <= nt; i++) for (j = i + 1; j <= nt; j++)
        if (th[names[j]] > th[names[i]]) { x = names[i]; names[i] = names[j]; names[j] = x }
      detail = ""
      for (i = 1; i <= nt && i <= 5; i++) detail = detail sprintf("%s%s %.1f", i > 1 ? ", " : "", names[i], th[names[i]] / 100)
      other = busy / 100 - hb / 100 - kafka / 100 - gen
      printf "cpu-s over %.1f s wall (%d cores = %.1f): hookbridge %.1f [%s], broker %.1f, load generator %.1f, other %.1f, idle %.1f\n",
        wall, cores, wall * cores, hb / 100, detail, kafka / 100, gen, other, wall * cores - busy / 100
    }' "$STATE/$name.threads0" "$STATE/$name.threads1" | tee -a "$STATE/$name.out"
}

# result NAME KEY: a field of the phase's RESULT line ("-" when missing).
result() {
  local v
  v=$(sed -n "s/^RESULT.* $2=\([^ ]*\).*/\1/p; s/^RESULT $2=\([^ ]*\).*/\1/p" "$STATE/$1.out" 2>/dev/null | head -n 1)
  printf '%s' "${v:--}"
}

# ---------------------------------------------------------------------------
# Phases

if want baseline; then
  step "baseline: trivial axum handler, ${DURATION}s, $CONNECTIONS connections"
  measured baseline "$BENCH" baseline --duration "$DURATION" --connections "$CONNECTIONS"
fi

if want dedup-on || want dedup-off || want fixed-rate || want drain || want edge; then
  step "start Kafka on 127.0.0.1:$KPORT"
  start_kafka
fi

if want dedup-on; then
  step "full-speed: hookbridge with dedup on, ${DURATION}s, $CONNECTIONS connections"
  start_hookbridge dedup-on
  full_speed dedup-on
  stop_hookbridge
fi

if want dedup-off; then
  step "full-speed: hookbridge with dedup off, ${DURATION}s, $CONNECTIONS connections"
  start_hookbridge dedup-off HOOKBRIDGE_OUTBOX__DEDUP=false
  full_speed dedup-off
  stop_hookbridge
fi

if want jetstream; then
  step "full-speed: hookbridge to JetStream (dedup on), ${DURATION}s, $CONNECTIONS connections"
  start_nats
  PUBLISHER=("${NATS_PUBLISHER[@]}")
  start_hookbridge jetstream
  full_speed jetstream
  stop_hookbridge
  PUBLISHER=("${KAFKA_PUBLISHER[@]}")
  stop "$NATS_PID" 10
  NATS_PID=
fi

if want fixed-rate || want drain; then
  start_hookbridge steady
fi

if want fixed-rate; then
  step "fixed-rate: ${RATE}/s for ${RATE_DURATION}s (dedup on)"
  buckets >"$STATE/fixed-rate.buckets0"
  measured fixed-rate "$BENCH" fixed-rate --url "$URL" --rate "$RATE" --duration "$RATE_DURATION"
  buckets >"$STATE/fixed-rate.buckets1"
  server_side fixed-rate "$STATE/fixed-rate.buckets0" "$STATE/fixed-rate.buckets1"
  phase fixed-rate-relay "$BENCH" wait-drained --url "$URL" --admin-url "$ADMIN" --timeout 60
fi

DRAIN_READY_DELAY=-
if want drain; then
  step "drain: stop Kafka, post $DRAIN_COUNT callbacks, start Kafka"
  [[ -n ${BENCH_NO_SYNC:-} ]] || sync
  stop "$KAFKA_PID" 30
  KAFKA_PID=
  "$BENCH" drain --url "$URL" --admin-url "$ADMIN" --count "$DRAIN_COUNT" --connections "$CONNECTIONS" --timeout 180 \
    >"$STATE/drain.out" 2>&1 &
  DRAIN_PID=$!
  deadline=$((SECONDS + 180))
  until grep -q '^drain: posted' "$STATE/drain.out"; do
    alive "$DRAIN_PID" || {
      cat "$STATE/drain.out"
      die "the drain run ended before posting everything"
    }
    ((SECONDS < deadline)) || die "posting $DRAIN_COUNT callbacks took over 180 s"
    sleep 0.2
  done
  cat "$STATE/drain.out"
  start_kafka
  ready_ms=$(now_ms)
  echo "Kafka ready again (unix_ms=$ready_ms)"
  status=0
  wait "$DRAIN_PID" || status=$?
  DRAIN_PID=
  sed -n '/^drain: posted/,$p' "$STATE/drain.out" | tail -n +2
  ((status == 0)) || die "the drain measurement failed (exit $status)"
  first_ms=$(result drain first_publish_unix_ms)
  [[ $first_ms == - ]] || DRAIN_READY_DELAY=$((first_ms - ready_ms))
  echo "Kafka ready -> first event published: ${DRAIN_READY_DELAY} ms (poll interval 20 ms)"
fi
stop_hookbridge

EDGE_QUIET_P99=
if want edge; then
  # hookbridge's defaults: the attack comes from other addresses than the sender, as in
  # the field. A fresh hookbridge per attack, so that one attack's buckets and
  # connections do not carry into the next.
  for attack in $EDGE_PHASES; do
    step "edge $attack: ${EDGE_RATE}/s + ${EDGE_FRESH_RATE}/s good callbacks for ${EDGE_DURATION}s"
    start_hookbridge "edge-$attack"
    [[ -n ${BENCH_NO_SYNC:-} ]] || sync
    quiet=()
    [[ -z $EDGE_QUIET_P99 || $EDGE_QUIET_P99 == - ]] || quiet=(--quiet-p99-ms "$EDGE_QUIET_P99")
    phase "edge-$attack" "$BENCH" edge --url "$URL" --attack "$attack" --server-pid "$HB_PID" \
      --rate "$EDGE_RATE" --fresh-rate "$EDGE_FRESH_RATE" --duration "$EDGE_DURATION" \
      --attackers "$EDGE_ATTACKERS" --burst "$EDGE_BURST" --slow-connections "$EDGE_SLOW" \
      --churn-rate "$EDGE_CHURN_RATE" --forged-rate "$EDGE_FORGED_RATE" --junk-rate "$JUNK_RATE" \
      --loris "$LORIS" "${quiet[@]}"
    [[ $attack != quiet ]] || EDGE_QUIET_P99=$(result edge-quiet p99_ms)
    stop_hookbridge
  done
fi
stop "$KAFKA_PID" 30
KAFKA_PID=

if want dedup-size; then
  step "dedup-size: $DEDUP_COUNT distinct tasks through the outbox alone"
  phase dedup-size "$BENCH" dedup-size --dir "$STATE/dedup-size" --count "$DEDUP_COUNT"
fi

if want recovery; then
  step "recovery: reopen the outbox alone with $RECOVERY_COUNT events pending"
  phase recovery "$BENCH" recovery --dir "$STATE/recovery" --count "$RECOVERY_COUNT"
  rm -rf "$STATE/recovery"
fi

if want large; then
  step "large: $LARGE_COUNT callbacks of $LARGE_SIZE bytes pending for ${LARGE_HOLD}s, every publish failing"
  start_hookbridge large HOOKBRIDGE_PUBLISHER__BROKERS="127.0.0.1:$DEADPORT" \
    HOOKBRIDGE_PUBLISHER__MESSAGE_TIMEOUT_MS=2000
  phase large "$BENCH" large-pending --url "$URL" --admin-url "$ADMIN" --count "$LARGE_COUNT" \
    --size "$LARGE_SIZE" --hold "$LARGE_HOLD"
  stop_hookbridge
  echo "peak RSS with $LARGE_COUNT pending events of $LARGE_SIZE bytes: $(result rss-large rss_peak_mib) MiB"
fi

# The long runs (issue 25): one data dir pre-filled with SOAK_TRACKED tracked tasks, the
# soak on it, then the cold start on the same dir (SOAK_TRACKED plus the soak's tasks).
SOAK_DIR=$STATE/data-soak
if want soak || want cold-start; then
  [[ -n $KAFKA_PID ]] || {
    step "start Kafka on 127.0.0.1:$KPORT"
    start_kafka
  }
  step "prefill: $SOAK_TRACKED tracked tasks in $SOAK_DIR (the outbox alone)"
  phase prefill "$BENCH" prefill --dir "$SOAK_DIR" --count "$SOAK_TRACKED"
fi

if want soak; then
  step "soak: ${SOAK_RATE}/s new tasks for ${SOAK_MINUTES} min on $SOAK_TRACKED tracked tasks"
  start_hookbridge soak
  measured soak "$BENCH" soak --url "$URL" --admin-url "$ADMIN" --rate "$SOAK_RATE" \
    --duration "$((SOAK_MINUTES * 60))" --window 60 --server-pid "$HB_PID" --label minute
  stop_hookbridge
fi

COLD_OPEN_MS=-
if want cold-start; then
  step "cold-start: ${SOAK_RATE}/s for ${COLD_SECONDS}s right after a start on $SOAK_DIR, page cache dropped"
  [[ -n ${BENCH_NO_SYNC:-} ]] || sync
  # Its files only, as after a reboot (BENCH_COLD_WARM=1 keeps them cached).
  [[ -n ${BENCH_COLD_WARM:-} ]] || "$BENCH" evict-cache --dir "$SOAK_DIR"
  t0=$(now_ms)
  start_hookbridge cold-start HOOKBRIDGE_OUTBOX__DATA_DIR="$SOAK_DIR"
  COLD_OPEN_MS=$(($(now_ms) - t0))
  echo "start -> /healthz answers: $COLD_OPEN_MS ms"
  measured cold-start "$BENCH" soak --url "$URL" --admin-url "$ADMIN" --rate "$SOAK_RATE" \
    --duration "$COLD_SECONDS" --window "$COLD_WINDOW" --server-pid "$HB_PID" --label "${COLD_WINDOW}s"
  stop_hookbridge
fi
stop "$KAFKA_PID" 30
KAFKA_PID=

# ---------------------------------------------------------------------------
# Summary

ratio() { awk -v a="$1" -v b="$2" 'BEGIN { if (a + 0 > 0 && b + 0 > 0) printf "%.2f", a / b; else printf "-" }'; }

step "summary ($(nproc) cores, load average at the start: $LOAD_AT_START, load generator on the same machine, BENCH_CLIENT_THREADS=$BENCH_CLIENT_THREADS)"
{
  base=$(result baseline rps)
  printf '%-44s %14s %s\n' "measure" "figure" "target"
  printf '%-44s %14s %s\n' "baseline: trivial axum handler, req/s" "$base" ""
  for run in dedup-on dedup-off jetstream; do
    case $run in
      dedup-on) label="Kafka, dedup on" goal=">= 0.50x" ;;
      dedup-off) label="Kafka, dedup off" goal="" ;;
      jetstream) label="JetStream, dedup on" goal=">= 0.45x" ;;
    esac
    want "$run" || continue
    printf '%-44s %14s %s\n' "hookbridge $label: accepted/s" "$(result "$run" rps)" ""
    printf '%-44s %14s %s\n' "  ratio to baseline" "$(ratio "$(result "$run" rps)" "$base")" "$goal"
    printf '%-44s %14s %s\n' "  p50 / p99 ms (closed loop)" "$(result "$run" p50_ms) / $(result "$run" p99_ms)" ""
    printf '%-44s %14s %s\n' "  end to end: broker acks/s (/ answers/s)" "$(result "$run-e2e" e2e_published_rps) ($(result "$run-e2e" e2e_ratio))" ">= 0.95"
    printf '%-44s %14s %s\n' "  hookbridge CPU us per event" "$(result "$run-e2e" cpu_us_per_event)" ""
    printf '%-44s %14s %s\n' "  peak RSS MiB" "$(result "rss-$run" rss_peak_mib)" "<= 128"
  done
  printf '%-44s %14s %s\n' "ratio dedup on / dedup off" "$(ratio "$(result dedup-on rps)" "$(result dedup-off rps)")" ""
  printf '%-44s %14s %s\n' "fixed ${RATE}/s: p50 / p99 ms (from due time)" "$(result fixed-rate p50_ms) / $(result fixed-rate p99_ms)" "p99 <= 2"
  printf '%-44s %14s %s\n' "  max ms; service-time p99 ms" "$(result fixed-rate max_ms); $(result fixed-rate service_p99_ms)" ""
  printf '%-44s %14s %s\n' "  hookbridge's own: within 2 ms; p99 <= ms" "$(result fixed-rate-server server_within_2ms)%; $(result fixed-rate-server server_p99_le_ms)" ""
  printf '%-44s %14s %s\n' "ingest with Kafka down: accepted/s" "$(result drain rps)" ""
  printf '%-44s %14s %s\n' "drain after outage: events/s" "$(result drain drain_rps)" ">= 100000"
  printf '%-44s %14s %s\n' "  Kafka ready -> first publish, ms" "$DRAIN_READY_DELAY" ""
  printf '%-44s %14s %s\n' "  peak RSS MiB (fixed rate + drain)" "$(result rss-steady rss_peak_mib)" "<= 128"
  printf '%-44s %14s %s\n' "dedup records, $DEDUP_COUNT tasks: MiB" "$(result dedup-size dedup_mib)" ""
  printf '%-44s %14s %s\n' "  bytes per task (pages; file diff MiB)" "$(result dedup-size dedup_bytes_per_task) ($(result dedup-size file_diff_mib))" ""
  printf '%-44s %14s %s\n' "  outbox append us, dedup on / off" "$(result dedup-size append_on_us) / $(result dedup-size append_off_us)" ""
  if want edge; then
    printf '%-44s %14s %s\n' "edge (${EDGE_RATE}+${EDGE_FRESH_RATE}/s good): p50 / p99 ms" "" ""
    for attack in $EDGE_PHASES; do
      printf '%-44s %14s %s\n' "  $attack: p50 / p99 ms (x quiet)" \
        "$(result "edge-$attack" p50_ms) / $(result "edge-$attack" p99_ms) ($(result "edge-$attack" p99_ratio))" "<= 2x"
      printf '%-44s %14s %s\n' "    lost; CPU us per refused (refused)" \
        "$(result "edge-$attack" lost); $(result "edge-$attack" cpu_us_per_refused) ($(result "edge-$attack" refused))" "lost 0"
    done
    [[ " $EDGE_PHASES " != *" burst "* ]] ||
      printf '%-44s %14s %s\n' "  burst of $EDGE_BURST: 200 / 429 / other / conn err" \
        "$(result edge-burst burst_200) / $(result edge-burst burst_429) / $(result edge-burst burst_other) / $(result edge-burst burst_errors)" "all 200"
  fi
  printf '%-44s %14s %s\n' "reopen with $RECOVERY_COUNT pending: s" "$(result recovery open_s)" ""
  printf '%-44s %14s %s\n' "  peak RSS MiB; data dir MiB" "$(result recovery rss_peak_mib); $(result recovery data_mib)" ""
  printf '%-44s %14s %s\n' "  fill: appends/s" "$(result recovery fill_rps)" ""
  printf '%-44s %14s %s\n' "$LARGE_COUNT pending x $LARGE_SIZE B, failing: RSS MiB" "$(result rss-large rss_peak_mib)" "<= 256"
  if want soak || want cold-start; then
    printf '%-44s %14s %s\n' "prefill $SOAK_TRACKED tracked tasks: s" "$(result prefill prefill_s)" ""
  fi
  if want soak; then
    printf '%-44s %14s %s\n' "soak ${SOAK_RATE}/s ${SOAK_MINUTES} min: p50/p99/p99.9 ms" "$(result soak p50_ms) / $(result soak p99_ms) / $(result soak p999_ms)" ""
    printf '%-44s %14s %s\n' "  worst minute p99 / p99.9 ms" "$(result soak worst_p99_ms) / $(result soak worst_p999_ms)" "<= 2 / 10"
    printf '%-44s %14s %s\n' "  RSS MiB first -> last minute (max)" "$(result soak rss_first_mib) -> $(result soak rss_last_mib) ($(result soak rss_max_mib))" "flat"
  fi
  if want cold-start; then
    printf '%-44s %14s %s\n' "cold start: start -> /healthz ms" "$COLD_OPEN_MS" ""
    printf '%-44s %14s %s\n' "  first ${COLD_SECONDS}s p50/p99/p99.9 ms" "$(result cold-start p50_ms) / $(result cold-start p99_ms) / $(result cold-start p999_ms)" "<= 2x soak"
    printf '%-44s %14s %s\n' "  worst ${COLD_WINDOW}s p99 / p99.9 ms" "$(result cold-start worst_p99_ms) / $(result cold-start worst_p999_ms)" ""
  fi
} | tee "$STATE/summary.txt"
