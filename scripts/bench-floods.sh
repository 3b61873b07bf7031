#!/usr/bin/env bash
# The bank server under floods (a command, not a test): the hardening issue's items 1-4,
# against the server before the hardening and after, in one run. For each case a fresh
# `mbank -q serve` with TLS on 127.0.0.1 is flooded for FLOOD_SECONDS (default 15)
# while a legitimate user (bob, from 127.0.0.1) sends GET /v1/health and GET /v1/whoami
# one at a time, each on a new TLS connection; prints, per flood, the server's peak
# resident memory (VmHWM) and bob's p99 latency and failures, before and after.
#
#   idle      no flood (the baseline)
#   bodies    80 connections posting 32-64 MiB bodies without a token (item 1)
#   logins    100 connections posting wrong-password logins (item 2)
#   slow      1,100 connections sending their headers one byte a second (item 3)
#   amplify   4 at once: POST /v1/chunks/get naming one 16 MiB chunk 64 times (item 4)
#
# Flood connections come from distinct loopback addresses (127.1.x.y), so the
# per-address caps do not end them at once. Everything runs on this machine: flood,
# probe and server share its cores. The details are in scripts/bench_floods.py.
#
# Env: MBANK (the "after" binary; else built here, in CARGO_TARGET_DIR if set),
# MBANK_OLD (required: the "before" binary, the server before the hardening), e.g.
#     git worktree add /work/wt-old b06f940
#     (cd /work/wt-old && CARGO_TARGET_DIR=/work/wt-old/target cargo build --release -p mbank)
#     MBANK_OLD=/work/wt-old/target/release/mbank scripts/bench-floods.sh
# FLOOD_SECONDS, FLOOD_CASES (default "idle bodies logins slow amplify"),
# FLOOD_ADDRESSES (source addresses for flood connections; default one per connection),
# BODY_CONNS, LOGIN_CONNS, SLOW_CONNS, AMP_CONNS.
set -euo pipefail
# shellcheck source=scripts/lib.sh
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"
REPO_ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
PY=/usr/bin/python3

need openssl
[[ -n ${MBANK_OLD:-} ]] || die "set MBANK_OLD to the server before the hardening (see the comment at the top of $0)"
[[ -x $MBANK_OLD ]] || die "MBANK_OLD=$MBANK_OLD is not an executable"
if [[ -z ${MBANK:-} && -n ${CARGO_TARGET_DIR:-} ]]; then
    # lib.sh's build_mbank expects the binary under the repository's target/.
    log "cargo build --release -p mbank (CARGO_TARGET_DIR=$CARGO_TARGET_DIR)"
    (cd "$REPO_ROOT" && cargo build --release -q -p mbank) >&2 || die "cargo build failed"
    MBANK=$CARGO_TARGET_DIR/release/mbank
fi
build_mbank "$REPO_ROOT"
# 1,100 slow connections and the server's own descriptors
(($(ulimit -Hn) >= 4096)) || die "the open-file limit is $(ulimit -Hn); the slow-client flood needs 4096"
ulimit -n "$(ulimit -Hn)"
make_tmp T
note=$(load_note)
uptime_start=$(uptime)
results=$CACHE_DIR/results
mkdir -p "$results"

log "before: $MBANK_OLD; after: $MBANK"
table=$(FLOOD_CACHE_DIR=$BENCH_DIR $PY "$REPO_ROOT/scripts/bench_floods.py" run "$T" "before=$MBANK_OLD" "after=$MBANK")
{
    echo "## Server under floods"
    echo
    echo "- $(date -u '+%F %H:%M UTC'); $note; uptime at start: ${uptime_start## }; at end: $(uptime | sed 's/^ *//')"
    echo "- ${MBANK_NOTE:-after: $MBANK}; before: $MBANK_OLD; $(nproc) cores;" \
        "each flood ${FLOOD_SECONDS:-15} s; server \`mbank -q serve\` with TLS on 127.0.0.1"
    echo
    echo "$table"
    echo
    echo "- peak RSS: the server's VmHWM (a fresh server per row); p99, p50, max: bob's" \
        "successful requests (new TLS connection each, GET /v1/health and GET /v1/whoami" \
        "alternately, one at a time); failed: refused, reset, timed out (30 s) or not 200"
} | tee "$results/bench-floods.md"
