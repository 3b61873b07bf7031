#!/usr/bin/env bash
# How long a fork of a published base takes when the bank's chunks are on Garage (a
# command, not a test; issue 12). A three-node Garage cluster on 127.0.0.1
# (`scripts/garage.sh`, fsync on), a bank on it, the data set's base.raw
# (`scripts/bench-data.sh`) imported as lab/base and published; then BENCH_RUNS
# (default 3) forks `create lab/forkN --from lab/base` on the bank's host, each timed,
# and a `gc` after them (which must keep every fork's chunks: checked with `verify`).
#
# Env: MBANK (the binary; default target/release/mbank), BENCH_DIR (default
# /var/cache/mbank-dev/bench), BENCH_RUNS.
set -euo pipefail
# shellcheck source=scripts/lib.sh
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"
REPO_ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
MBANK=${MBANK:-$REPO_ROOT/target/release/mbank}
BENCH_DIR=${BENCH_DIR:-/var/cache/mbank-dev/bench}
RUNS=${BENCH_RUNS:-3}
DISK=$BENCH_DIR/base.raw
[[ -x $MBANK ]] || die "no mbank binary at $MBANK: build it or set MBANK"
[[ -f $DISK ]] || die "no $DISK: run scripts/bench-data.sh first"

T=$(mktemp -d /var/tmp/mbank-bench-fork.XXXXXX)
cleanup() {
    "$REPO_ROOT/scripts/garage.sh" stop "$T/garage" >/dev/null 2>&1 || true
    rm -rf "$T"
}
trap cleanup EXIT
mkdir "$T/garage"
env=$("$REPO_ROOT/scripts/garage.sh" start "$T/garage")
get() { sed -n "s/^$1=//p" <<<"$env" | tr -d "'"; }
export AWS_ACCESS_KEY_ID AWS_SECRET_ACCESS_KEY
AWS_ACCESS_KEY_ID=$(get AWS_ACCESS_KEY_ID)
AWS_SECRET_ACCESS_KEY=$(get AWS_SECRET_ACCESS_KEY)
eps=$(get GARAGE_ENDPOINTS | tr ' ' ',')
BANK=$T/bank
"$MBANK" -q --bank "$BANK" init --store "s3://$(get GARAGE_BUCKET)?endpoint=$eps&region=$(get GARAGE_REGION)"
echo "mbank: $("$MBANK" --version 2>/dev/null || echo "$MBANK")"
echo "load at start: $(uptime)"
s=$(date +%s.%N)
"$MBANK" -q -j 16 --bank "$BANK" import --json lab/base "$DISK" >"$T/import.json"
e=$(date +%s.%N)
printf 'import of %s (-j 16): %.1f s; %s\n' "$DISK" "$(echo "$e - $s" | bc)" \
    "$(grep -o '"chunks_stored":[0-9]*' "$T/import.json" || true)"
"$MBANK" -q --bank "$BANK" admin publish lab/base >/dev/null
for k in $(seq 1 "$RUNS"); do
    s=$(date +%s.%N)
    "$MBANK" -q --bank "$BANK" create "lab/fork$k" --from lab/base >/dev/null
    e=$(date +%s.%N)
    printf 'fork %d: %.2f s (load %s)\n' "$k" "$(echo "$e - $s" | bc)" "$(cut -d' ' -f1 /proc/loadavg)"
done
"$MBANK" -q --bank "$BANK" gc --json >"$T/gc.json"
echo "gc: $(tr -d '\n' <"$T/gc.json" | head -c 400)"
"$MBANK" -q --bank "$BANK" verify --json >/dev/null && echo "verify: ok"
echo "load at end: $(uptime)"
