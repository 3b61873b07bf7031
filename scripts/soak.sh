#!/usr/bin/env bash
# Soak (a command, not a test): a bank server, 8 stations and GC and verify loops for N
# minutes, then everything checked.
#
#   scripts/soak.sh --minutes N [--listen ADDR:PORT | --lab PROFILE]
#
# - The bank (a directory) gets users s1..s8, lab/base (SOAK_DISK, default 256M, with
#   SOAK_DATA, default 64M, of random data; imported on the host and published), and
#   `mbank serve` with TLS on --listen (default 127.0.0.1:0; the certificate names its
#   address). Each user logs in and forks lab/base (`create sK/dev --from lab/base`).
# - 8 stations (scripts/soak.py station), each with its own cache directory, repeat
#   until the time is up: attach sK/dev, read back over NBD what they wrote last time
#   and compare, write SOAK_WRITES (default 64) random writes of 1-256 KiB (a quarter
#   unaligned, some zeros) while keeping a mirror file of what the disk must hold,
#   flush, SIGTERM (check-in); every 5th cycle remove their oldest version when they
#   have more than 4 (garbage for GC).
# - On the bank's host: `mbank gc` every SOAK_GC_PAUSE s (default 10) and `mbank verify`
#   every SOAK_VERIFY_PAUSE s (default 5), in loops, while the stations work.
# - Every SOAK_SAMPLE s (default 2) the resident memory (VmRSS) of every mbank process
#   goes to rss.csv (unix time, kind = subcommand, pid, KiB).
# - At the end: `mbank verify` must exit 0; every station's head is exported on the host
#   and its sha256 compared with the station's mirror; prints cycles, failures and the
#   largest RSS per kind of process. Exit status 1 if anything failed.
#
# Without --lab, stations and server share this machine's network and talk over
# loopback (or the address --listen names). With --lab PROFILE (1gbit, 100mbit, none) the
# soak runs on a lab network (scripts/lab-net.sh): the server in its namespace, each
# station (its attach, its NBD client) in its own behind a link shaped to PROFILE; the
# bank's host jobs (gc, verify, the final checks) and the sampler stay in this one. The
# lab is torn down at exit, also on failure or Ctrl-C.
# Env: MBANK (binary; else built, in CARGO_TARGET_DIR if set), SOAK_STATIONS (8),
# SOAK_DISK, SOAK_DATA, SOAK_WRITES, SOAK_PAUSE (s between a station's cycles, 1),
# SOAK_GC_PAUSE, SOAK_VERIFY_PAUSE, SOAK_SAMPLE; MBANK_KEEP_TMP=1 keeps the files.
set -euo pipefail
# shellcheck source=scripts/lib.sh
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"
REPO_ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
PY=/usr/bin/python3 # Debian's python: python3-libnbd
HELPER=$REPO_ROOT/scripts/soak.py

USAGE="usage: $0 --minutes N [--listen ADDR:PORT | --lab 1gbit|100mbit|none]"
MINUTES= LISTEN=${SOAK_LISTEN:-127.0.0.1:0} LAB=
while (($#)); do
    case $1 in
    --minutes) MINUTES=${2:-}; shift 2 ;;
    --listen) LISTEN=${2:-}; shift 2 ;;
    --lab) LAB=${2:-}; shift 2 ;;
    *) die "$USAGE" ;;
    esac
done
[[ $MINUTES =~ ^[1-9][0-9]*$ ]] || die "$USAGE (N: whole minutes)"
N=${SOAK_STATIONS:-8}
if [[ -n $LAB && -z ${MBANK_LAB:-} ]]; then
    [[ $LAB =~ ^(1gbit|100mbit|none)$ ]] || die "--lab $LAB: give 1gbit, 100mbit or none"
    # Again, inside a lab of N stations that lab-net.sh tears down whatever happens.
    exec "$REPO_ROOT/scripts/lab-net.sh" run --stations "$N" --profile "$LAB" -- \
        "$REPO_ROOT/scripts/soak.sh" --minutes "$MINUTES" --lab "$LAB"
fi
IN_SERVER=() # the command prefix that runs something in the server's namespace
station_ns() { :; }
if [[ -n $LAB ]]; then
    LISTEN=$MBANK_LAB_SERVER_ADDR:0
    IN_SERVER=(ip netns exec "$MBANK_LAB_SERVER_NS")
    read -r -a LAB_STATIONS <<<"$MBANK_LAB_STATION_NS"
    ((${#LAB_STATIONS[@]} == N)) || die "the lab has ${#LAB_STATIONS[@]} stations, not $N"
    station_ns() { printf '%s' "${LAB_STATIONS[$(($1 - 1))]}"; }
fi
in_station() { # in_station K CMD...: CMD in station K's namespace (or here, without a lab)
    local k=$1
    shift
    if [[ -n $LAB ]]; then ip netns exec "$(station_ns "$k")" "$@"; else "$@"; fi
}
[[ $LISTEN =~ ^([0-9.]+):([0-9]+)$ ]] || die "--listen $LISTEN: give IPv4ADDR:PORT (port 0: any free one)"
HOST=${BASH_REMATCH[1]}
bytes_arg() { numfmt --from=iec "${1%[bB]}"; }
DISK=$(bytes_arg "${SOAK_DISK:-256M}")
DATA=$(bytes_arg "${SOAK_DATA:-64M}")
WRITES=${SOAK_WRITES:-64}
PAUSE=${SOAK_PAUSE:-1}
GC_PAUSE=${SOAK_GC_PAUSE:-10}
VERIFY_PAUSE=${SOAK_VERIFY_PAUSE:-5}
SAMPLE=${SOAK_SAMPLE:-2}

need openssl
need numfmt coreutils
$PY -c 'import nbd' 2>/dev/null || die "python3-libnbd is missing (apt-get install python3-libnbd)"
if [[ -z ${MBANK:-} && -n ${CARGO_TARGET_DIR:-} ]]; then
    log "cargo build --release -p mbank (CARGO_TARGET_DIR=$CARGO_TARGET_DIR)"
    (cd "$REPO_ROOT" && cargo build --release -q -p mbank) >&2 || die "cargo build failed"
    MBANK=$CARGO_TARGET_DIR/release/mbank
fi
build_mbank "$REPO_ROOT"
make_tmp T
note=$(load_note)
uptime_start=$(uptime)
BANK=$T/bank
mkdir -p "$CACHE_DIR/results"

# ---- processes, all stopped at exit --------------------------------------------------
SERVER_PID= SAMPLER_PID=
BG_PIDS=()
stop_all() {
    local p
    touch "$T/stop"
    for p in "${BG_PIDS[@]}"; do kill -TERM "$p" 2>/dev/null || true; done
    for p in "${BG_PIDS[@]}"; do wait "$p" 2>/dev/null || true; done
    BG_PIDS=()
    if [[ -n $SERVER_PID ]]; then
        kill -TERM "$SERVER_PID" 2>/dev/null || true
        wait "$SERVER_PID" 2>/dev/null || true
        SERVER_PID=
    fi
    if [[ -n $SAMPLER_PID ]]; then
        wait "$SAMPLER_PID" 2>/dev/null || true
        SAMPLER_PID=
    fi
}
at_exit stop_all

# ---- TLS: a throwaway CA and a certificate for $HOST -----------------------------------
(
    mkdir -p "$T/tls" && cd "$T/tls"
    openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes \
        -keyout ca.key -out ca.pem -days 2 -subj "/CN=mbank soak CA"
    openssl req -newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes \
        -keyout key.pem -out server.csr -subj "/CN=$HOST"
    printf 'subjectAltName=IP:%s\nbasicConstraints=CA:FALSE\n' "$HOST" >ext.cnf
    openssl x509 -req -in server.csr -CA ca.pem -CAkey ca.key -CAcreateserial \
        -out cert.pem -days 2 -extfile ext.cnf
) >/dev/null 2>&1 || die "openssl could not make the certificates"

# ---- the bank, the base, the server ------------------------------------------------------
log "bank: $N users, lab/base ($(human "$DISK"), $(human "$DATA") of data)"
"$MBANK" -q --bank "$BANK" init
for ((k = 1; k <= N; k++)); do
    printf 'soak-password-%s\n' "$k" | "$MBANK" -q --bank "$BANK" admin user add "s$k" --password-stdin >/dev/null
done
$PY "$HELPER" base "$T/base.raw" "$DISK" "$DATA"
"$MBANK" -q --bank "$BANK" import lab/base "$T/base.raw" >/dev/null
"$MBANK" -q --bank "$BANK" admin publish lab/base >/dev/null

# the sampler first: it sees every mbank process from here on
rm -f "$T/stop"
$PY "$HELPER" sample "$T/rss.csv" "$MBANK" "$SAMPLE" "$T/stop" $$ &
SAMPLER_PID=$!

${IN_SERVER[@]+"${IN_SERVER[@]}"} "$MBANK" -q --bank "$BANK" serve --listen "$LISTEN" --tls-cert "$T/tls/cert.pem" \
    --tls-key "$T/tls/key.pem" >"$T/serve.out" 2>"$T/serve.log" </dev/null &
SERVER_PID=$!
URL=
for ((i = 0; i < 600; i++)); do
    URL=$(sed -n 's/^listening on //p' "$T/serve.out")
    [[ -n $URL ]] && break
    kill -0 "$SERVER_PID" 2>/dev/null || die "mbank serve exited: $(tail -n 5 "$T/serve.log")"
    sleep 0.05
done
[[ -n $URL ]] || die "mbank serve did not say where it listens within 30 s"
log "server: $URL"

for ((k = 1; k <= N; k++)); do
    printf 'soak-password-%s\n' "$k" | XDG_CONFIG_HOME=$T/cfg/$k in_station "$k" "$MBANK" -q login "$URL" \
        --user "s$k" --password-stdin --ca-cert "$T/tls/ca.pem" >/dev/null
    XDG_CONFIG_HOME=$T/cfg/$k in_station "$k" "$MBANK" -q --bank "$URL" create "s$k/dev" --from lab/base >/dev/null
    cp --sparse=always "$T/base.raw" "$T/mirror$k.raw"
done

# ---- the soak ----------------------------------------------------------------------------
deadline=$(($(date +%s) + MINUTES * 60))
log "soak: $N stations, gc and verify loops, $MINUTES min (until $(date -d "@$deadline" +%T))"
for ((k = 1; k <= N; k++)); do
    printf '{"k": %d, "mbank": "%s", "url": "%s", "cache": "%s", "cfg": "%s", "mirror": "%s", "socket": "%s", "deadline": %d, "writes": %d, "pause": %s, "out": "%s"}\n' \
        "$k" "$MBANK" "$URL" "$T/cache/$k" "$T/cfg/$k" "$T/mirror$k.raw" "$T/st$k.sock" \
        "$deadline" "$WRITES" "$PAUSE" "$T/station$k.jsonl" >"$T/station$k.json"
    in_station "$k" $PY "$HELPER" station "$T/station$k.json" 2>"$T/station$k.err" &
    BG_PIDS+=($!)
done
host_loop() { # host_loop NAME PAUSE: runs `mbank NAME` on the bank's host until the deadline
    local name=$1 pause=$2 rc c=
    trap '[[ -z $c ]] || kill -TERM "$c" 2>/dev/null; exit 0' TERM
    while (($(date +%s) < deadline)); do
        rc=0
        "$MBANK" -q --bank "$BANK" "$name" --json >>"$T/$name.out" 2>>"$T/$name.err" &
        c=$!
        wait "$c" || rc=$?
        c=
        echo "$(date +%s) $rc" >>"$T/$name.runs"
        sleep "$pause"
    done
}
host_loop gc "$GC_PAUSE" &
BG_PIDS+=($!)
host_loop verify "$VERIFY_PAUSE" &
BG_PIDS+=($!)
for p in "${BG_PIDS[@]}"; do wait "$p" || log "WARNING: a soak process (pid $p) exited with status $?"; done
BG_PIDS=()
log "soak over: final checks"

# ---- checks ------------------------------------------------------------------------------
fails=0
verify_rc=0
"$MBANK" -q --bank "$BANK" verify --json >"$T/verify-final.json" 2>"$T/verify-final.err" || verify_rc=$?
((verify_rc == 0)) || { log "FAIL: final verify exited $verify_rc: $(tail -n 3 "$T/verify-final.err")"; fails=$((fails + 1)); }
rows=()
total_cycles=0 total_bad=0
for ((k = 1; k <= N; k++)); do
    f=$T/station$k.jsonl
    checkins=$(grep -c '"version": "' "$f" || true)
    # one summary line per cycle (it has "exit"); others say why a step failed
    bad=$(grep '"exit"' "$f" | grep -c '"ok": false' || true)
    removed=$(grep -c '"rm"' "$f" || true)
    want=$(sed -n 's/.*"final": true.*"sha256": "\([0-9a-f]*\)".*/\1/p' "$f")
    got=
    if "$MBANK" -q --bank "$BANK" export "s$k/dev" "$T/export$k.raw" 2>"$T/export$k.err"; then
        got=$(sha256sum "$T/export$k.raw" | cut -d' ' -f1)
        rm -f "$T/export$k.raw"
    fi
    same=yes
    if [[ -z $want || $got != "$want" ]]; then
        same="**no**"
        fails=$((fails + 1))
        log "FAIL: s$k/dev: head ${got:-(export failed: $(tail -n 1 "$T/export$k.err"))} is not what the station wrote (${want:-no final record})"
    fi
    if ((bad)); then
        fails=$((fails + 1))
        log "FAIL: s$k: $bad failed cycle(s): $(grep '"ok": false' "$f" | head -n 2 | tr '\n' ' ')$(sort "$f.attach.err" | uniq -c | sort -rn | head -n 2 | tr '\n' ' ')"
    fi
    total_cycles=$((total_cycles + checkins))
    total_bad=$((total_bad + bad))
    rows+=("| s$k | $checkins | $bad | $removed | $same |")
done
gc_runs=$(wc -l <"$T/gc.runs" 2>/dev/null || echo 0)
gc_bad=$(awk '$2 != 0' "$T/gc.runs" 2>/dev/null | wc -l)
verify_runs=$(wc -l <"$T/verify.runs" 2>/dev/null || echo 0)
verify_bad=$(awk '$2 != 0' "$T/verify.runs" 2>/dev/null | wc -l)
((gc_bad == 0)) || { log "FAIL: $gc_bad gc run(s) failed: $(tail -n 3 "$T/gc.err")"; fails=$((fails + 1)); }
((verify_bad == 0)) || { log "FAIL: $verify_bad verify run(s) during the soak failed: $(tail -n 3 "$T/verify.err")"; fails=$((fails + 1)); }
kill -0 "$SERVER_PID" 2>/dev/null || { log "FAIL: the server died"; fails=$((fails + 1)); }
stop_all
chunks=$(find "$BANK/chunks" -type f -name '[0-9a-f]*' | wc -l)

{
    echo "## Soak"
    echo
    echo "- $(date -u '+%F %H:%M UTC'); $note; uptime at start: ${uptime_start## }; at end: $(uptime | sed 's/^ *//')"
    if [[ -n $LAB ]]; then
        echo "- ${MBANK_NOTE:-mbank $MBANK}; $(nproc) cores; \`scripts/soak.sh --minutes $MINUTES --lab $LAB\`;" \
            "server $URL (TLS) in its network namespace, $N stations each in its own behind a $LAB link" \
            "(scripts/lab-net.sh, tbf both ways)"
    else
        echo "- ${MBANK_NOTE:-mbank $MBANK}; $(nproc) cores; \`scripts/soak.sh --minutes $MINUTES --listen $LISTEN\`;" \
            "server $URL (TLS) and $N stations on this machine, over loopback"
    fi
    echo "- lab/base $(human "$DISK") ($(human "$DATA") of data); per cycle $WRITES writes of 1-256 KiB;" \
        "gc every ${GC_PAUSE} s, verify every ${VERIFY_PAUSE} s"
    echo
    echo "| station | check-ins | failed cycles | versions removed | head = what it wrote |"
    echo "|---|---:|---:|---:|---|"
    printf '%s\n' "${rows[@]}"
    echo
    echo "- $total_cycles check-ins, $total_bad failed cycles; gc ran $gc_runs times ($gc_bad failed," \
        "$($PY "$HELPER" total "$T/gc.out" chunks_deleted) chunks deleted in all)," \
        "verify $verify_runs times ($verify_bad failed); final verify exit $verify_rc;" \
        "$chunks chunk files at the end"
    echo
    $PY "$HELPER" rss "$T/rss.csv"
    echo
    echo "- RSS: VmRSS of every mbank process every $SAMPLE s (rss.csv); kind = its subcommand"
    if ((fails)); then echo; echo "**$fails check(s) FAILED** (see the log above)"; fi
} | tee "$CACHE_DIR/results/soak.md"
((fails == 0))
