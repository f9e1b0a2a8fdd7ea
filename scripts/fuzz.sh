#!/usr/bin/env bash
# fuzz.sh: the long fuzz run (benches/fuzz.rs). Feeds CASES generated hostile
# bodies (default 10,000,000) through the parser and every publisher's encoder
# on THREADS threads (default 2) and prints the count; exits non-zero, printing
# the body, if one panics or breaks the property of src/event/cases.rs.
#
#   scripts/fuzz.sh [CASES] [THREADS]
#
# FUZZ_SEED=N replays a run. Needs no broker. Builds with the bench (release)
# profile; 10 million cases take several minutes on two cores.
set -euo pipefail
cd "$(dirname "$0")/.."
exec cargo bench --bench fuzz -- "${1:-10000000}" "${2:-2}"
