#!/usr/bin/env bash
# Bank server benchmarks (a command, not a test), each printing its ratios from one run:
#
# 1. HTTP against embedded, upload and download: one image (BENCH_SIZE, default 1G:
#    per 1 MiB block 70% random, 10% zero, 10% a copy of an earlier block, 10% text,
#    made deterministically by scripts/bench_server.py) is imported into a bank
#    directory (embedded), then through `mbank serve` on loopback into a fresh bank over
#    plain HTTP, and again over HTTPS (a throwaway CA made with openssl); then exported
#    from each to /dev/null. Prints MiB/s (of the image's apparent size) and
#    served/embedded.
# 2. Many stations: a base disk (BENCH_BASE_SIZE, default 256M, with BENCH_BASE_DATA,
#    default 64M, of data in 16 extents) imported as lab/base and published; one user per
#    station (s1, s2, ...) forks it (`create sK/dev --from lab/base`: shares every
#    chunk). For N in BENCH_STATIONS (default "1 8 32"), N `mbank attach` processes, each
#    with its own empty --cache, then at one instant each reads the same "boot working
#    set" through NBD: BENCH_READS (default 2000) reads of 4-64 KiB scattered over the
#    data extents, about 32 MiB, one at a time, each timed (python3-libnbd). Prints the
#    total MiB/s across stations and p50/p99 read latency. Run with the server's bank on
#    a local directory, then with its chunks in a 3-node Garage cluster
#    (scripts/garage.sh) when garage is installed and this mbank has `init --store`;
#    prints Garage/local for throughput and p99.
#
# With the defaults it takes about 7 minutes on 2 cores, 4 of them making 32 forks in
# Garage (see BENCHMARKS.md: the server touches every chunk of a fork's source in S3).
# The server runs with -q (warnings only: no per-request log lines). Page cache is not
# dropped: both sides of every ratio read warm files. Everything runs on this machine,
# so server, stations and readers share its cores.
# Env: MBANK (binary; else built, in CARGO_TARGET_DIR if set), BENCH_SIZE, BENCH_BASE_SIZE,
# BENCH_BASE_DATA, BENCH_STATIONS, BENCH_READS, BENCH_READ_TOTAL (default 32M),
# BENCH_FORK_JOBS (forks made at once, default 8),
# BENCH_SKIP_UPLOAD=1 / BENCH_SKIP_STATIONS=1 (one benchmark only), BENCH_SKIP_HTTPS=1,
# BENCH_SKIP_GARAGE=1. Sizes take K/M/G suffixes (powers of 1024).
set -euo pipefail
# shellcheck source=scripts/lib.sh
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"
REPO_ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
PY=/usr/bin/python3 # Debian's python: python3-libnbd
HELPER=$REPO_ROOT/scripts/bench_server.py
GARAGE_BIN=$CACHE_DIR/garage/bin/garage

bytes_arg() { numfmt --from=iec "${1%[bB]}"; }
SIZE=$(bytes_arg "${BENCH_SIZE:-1G}")
BASE_SIZE=$(bytes_arg "${BENCH_BASE_SIZE:-256M}")
BASE_DATA=$(bytes_arg "${BENCH_BASE_DATA:-64M}")
READ_TOTAL=$(bytes_arg "${BENCH_READ_TOTAL:-32M}")
NREADS=${BENCH_READS:-2000}
FORK_JOBS=${BENCH_FORK_JOBS:-8}
read -r -a STATIONS <<<"${BENCH_STATIONS:-1 8 32}"
MAX_N=0
for n in "${STATIONS[@]}"; do
    [[ $n =~ ^[1-9][0-9]*$ ]] || die "BENCH_STATIONS: $n is not a number of stations"
    if ((n > MAX_N)); then MAX_N=$n; fi
done

need bc
need openssl
need numfmt coreutils
if ! $PY -c 'import nbd' 2>/dev/null; then
    log "installing python3-libnbd"
    apt-get update -qq >&2
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends python3-libnbd >&2
fi
if [[ -z ${MBANK:-} && -n ${CARGO_TARGET_DIR:-} ]]; then
    # lib.sh's build_mbank expects the binary under the repository's target/.
    log "cargo build --release -p mbank (CARGO_TARGET_DIR=$CARGO_TARGET_DIR)"
    (cd "$REPO_ROOT" && cargo build --release -q -p mbank) >&2 || die "cargo build failed"
    MBANK=$CARGO_TARGET_DIR/release/mbank
fi
build_mbank "$REPO_ROOT"
"$MBANK" serve --help >/dev/null 2>&1 || die "$MBANK has no \`serve\` (the bank server is not in this build)"
make_tmp T
note=$(load_note)
uptime_start=$(uptime)

mibps() { printf '%.0f' "$(calc "$1 / 1048576 / $2")"; } # mibps BYTES SECONDS
ratio() { printf '%.2f' "$(calc "$1 / $2")"; }
cpu_ticks() { awk '{print $14 + $15}' "/proc/$1/stat"; } # user + system, in clock ticks
TICKS=$(getconf CLK_TCK)
jfield() { $PY -c 'import json,sys; v=json.load(open(sys.argv[1])).get(sys.argv[2]); print("" if v is None else v)' "$1" "$2"; }

# ---- processes: every one we start is stopped on exit ------------------------------
SERVER_PID= URL=
serve_start() { # serve_start BANK [--tls-cert C --tls-key K]: sets SERVER_PID, URL
    local bank=$1 out=$T/serve.$((++_serves)).out i
    shift
    : >"$out"
    "$MBANK" -q --bank "$bank" serve --listen 127.0.0.1:0 "$@" >"$out" 2>>"$T/serve.log" &
    SERVER_PID=$!
    for ((i = 0; i < 600; i++)); do
        URL=$(sed -n 's/^listening on //p' "$out")
        [[ -n $URL ]] && return 0
        kill -0 "$SERVER_PID" 2>/dev/null || die "mbank serve exited: $(tail -n 5 "$T/serve.log")"
        sleep 0.05
    done
    die "mbank serve did not say where it listens within 30 s"
}
_serves=0
serve_stop() {
    [[ -n $SERVER_PID ]] || return 0
    kill -TERM "$SERVER_PID" 2>/dev/null || true
    wait "$SERVER_PID" 2>/dev/null || true
    SERVER_PID=
}
at_exit serve_stop
ATTACH_PIDS=() READER_PIDS=()
stop_stations() {
    local p
    for p in "${READER_PIDS[@]}"; do kill "$p" 2>/dev/null || true; done
    for p in "${ATTACH_PIDS[@]}"; do kill -TERM "$p" 2>/dev/null || true; done
    for p in "${READER_PIDS[@]}" "${ATTACH_PIDS[@]}"; do wait "$p" 2>/dev/null || true; done
    ATTACH_PIDS=() READER_PIDS=()
}
at_exit stop_stations
FORK_PIDS=()
stop_forks() { local p; for p in "${FORK_PIDS[@]}"; do kill "$p" 2>/dev/null || true; done; }
at_exit stop_forks
GARAGE_DIR=
garage_stop() { [[ -z $GARAGE_DIR ]] || "$REPO_ROOT/scripts/garage.sh" stop "$GARAGE_DIR" >&2 || true; }
at_exit garage_stop

# Users: password "bench-password-NAME"; each user's token in its own XDG_CONFIG_HOME.
add_user() { printf 'bench-password-%s\n' "$2" | "$MBANK" -q --bank "$1" admin user add "$2" --password-stdin >/dev/null; }
as() { # as USER CMD...: a client command run as USER
    local u=$1
    shift
    XDG_CONFIG_HOME=$T/cfg/$u "$@"
}
login() { # login USER [--ca-cert CA]
    printf 'bench-password-%s\n' "$1" | as "$1" "$MBANK" -q login "$URL" --user "$1" --password-stdin "${@:2}" >/dev/null
}
timed() { # timed CMD...: seconds CMD took (its stdout discarded)
    local s e
    s=$(now)
    "$@" >/dev/null
    e=$(now)
    calc "$e - $s"
}

# ---- data (cached under $BENCH_DIR: made once) -------------------------------------
mkdir -p "$BENCH_DIR" "$CACHE_DIR/results"
IMG=$BENCH_DIR/server-image-v1-$SIZE.raw
BASE=$BENCH_DIR/server-base-v1-$BASE_SIZE-$BASE_DATA.raw
if [[ -z ${BENCH_SKIP_UPLOAD:-} && ! -f $IMG ]]; then
    log "making $IMG ($(human "$SIZE"))"
    $PY "$HELPER" image "$IMG.tmp" "$SIZE"
    mv "$IMG.tmp" "$IMG"
fi
if [[ -z ${BENCH_SKIP_STATIONS:-} && ! -f $BASE.extents ]]; then
    log "making $BASE ($(human "$BASE_SIZE"), $(human "$BASE_DATA") of data)"
    $PY "$HELPER" base "$BASE.tmp" "$BASE_SIZE" "$BASE_DATA" >"$BASE.extents.tmp"
    mv "$BASE.tmp" "$BASE"
    mv "$BASE.extents.tmp" "$BASE.extents"
fi

# ---- TLS: a throwaway CA and a certificate for 127.0.0.1 ---------------------------
make_cert() {
    local d=$T/tls
    mkdir -p "$d"
    (
        cd "$d"
        openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes \
            -keyout ca.key -out ca.pem -days 2 -subj "/CN=mbank bench CA"
        openssl req -newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes \
            -keyout key.pem -out server.csr -subj /CN=127.0.0.1
        printf 'subjectAltName=IP:127.0.0.1,DNS:localhost\nbasicConstraints=CA:FALSE\n' >ext.cnf
        openssl x509 -req -in server.csr -CA ca.pem -CAkey ca.key -CAcreateserial \
            -out cert.pem -days 2 -extfile ext.cnf
    ) >/dev/null 2>&1 || die "openssl could not make the test certificates"
}

# ==== 1. upload and download: embedded vs HTTP vs HTTPS ==============================
declare -A UP DOWN STORED UPCPU DOWNCPU
upload_download() { # upload_download KIND: sets UP[KIND] DOWN[KIND] STORED[KIND] (s, s, bytes)
    local kind=$1 bank=$T/bank-$1 target
    "$MBANK" -q --bank "$bank" init
    if [[ $kind == embedded ]]; then
        target=$bank
    else
        add_user "$bank" bench
        if [[ $kind == https ]]; then
            serve_start "$bank" --tls-cert "$T/tls/cert.pem" --tls-key "$T/tls/key.pem"
            login bench --ca-cert "$T/tls/ca.pem"
        else
            serve_start "$bank"
            login bench
        fi
        target=$URL
    fi
    log "  $kind: import into $target"
    local s e c0=
    [[ -z $SERVER_PID ]] || c0=$(cpu_ticks "$SERVER_PID")
    s=$(now)
    as bench "$MBANK" -q --bank "$target" import --json bench/img "$IMG" >"$T/import-$kind.json"
    e=$(now)
    UP[$kind]=$(calc "$e - $s")
    STORED[$kind]=$(jfield "$T/import-$kind.json" bytes_stored)
    UPCPU[$kind]=- DOWNCPU[$kind]=-
    if [[ -n $SERVER_PID ]]; then
        UPCPU[$kind]=$(printf %.1f "$(calc "($(cpu_ticks "$SERVER_PID") - $c0) / $TICKS")")
        c0=$(cpu_ticks "$SERVER_PID")
    fi
    log "  $kind: export from $target"
    DOWN[$kind]=$(timed as bench "$MBANK" -q --bank "$target" export bench/img -)
    [[ -z $SERVER_PID ]] || DOWNCPU[$kind]=$(printf %.1f "$(calc "($(cpu_ticks "$SERVER_PID") - $c0) / $TICKS")")
    log "  $kind: import $(mibps "$SIZE" "${UP[$kind]}") MiB/s, export $(mibps "$SIZE" "${DOWN[$kind]}") MiB/s"
    serve_stop
    rm -rf "$bank"
}
KINDS=()
if [[ -z ${BENCH_SKIP_UPLOAD:-} ]]; then
    log "1. upload and download, $(human "$SIZE") image: embedded, HTTP, HTTPS"
    cat "$IMG" >/dev/null # the same warm page cache for every import
    KINDS=(embedded http)
    [[ -n ${BENCH_SKIP_HTTPS:-} ]] || { make_cert; KINDS+=(https); }
    for k in "${KINDS[@]}"; do upload_download "$k"; done
fi

# ==== 2. many stations ===============================================================
READS=$T/reads.txt
declare -A TP P50 P99 PMAX WALL FETCHED LATE SCPU SETUP_IMPORT SETUP_FORKS
GARAGE_NOTE=
stations_round() { # stations_round COLUMN N
    local col=$1 n=$2 k i start
    log "  $col, $n station(s): attach"
    for ((k = 1; k <= n; k++)); do
        rm -f "$T/st$k.sock"
        # not through `as`: $! must be mbank's pid, not a subshell's
        XDG_CONFIG_HOME=$T/cfg/s$k "$MBANK" -q --bank "$URL" --cache "$T/cache/$k" attach "s$k/dev" \
            --socket "$T/st$k.sock" --json >"$T/att$k.json" 2>"$T/att$k.err" &
        ATTACH_PIDS+=($!)
    done
    for ((k = 1; k <= n; k++)); do
        for ((i = 0; ; i++)); do
            [[ -S $T/st$k.sock ]] && break
            kill -0 "${ATTACH_PIDS[k - 1]}" 2>/dev/null || die "attach s$k/dev exited: $(tail -n 5 "$T/att$k.err")"
            ((i < 3000)) || die "attach s$k/dev did not listen within 150 s"
            sleep 0.05
        done
    done
    # Every reader connects, then waits for the same instant.
    start=$(calc "$(now) + 1.5 + $n * 0.15")
    local cpu0
    cpu0=$(cpu_ticks "$SERVER_PID")
    for ((k = 1; k <= n; k++)); do
        $PY "$HELPER" read "$T/st$k.sock" "$READS" "$start" "$T/read$k.json" 2>"$T/read$k.err" &
        READER_PIDS+=($!)
    done
    for ((k = 1; k <= n; k++)); do
        wait "${READER_PIDS[k - 1]}" || die "reader $k failed: $(tail -n 5 "$T/read$k.err")"
    done
    READER_PIDS=()
    SCPU[$col,$n]=$(calc "($(cpu_ticks "$SERVER_PID") - $cpu0) / $TICKS")
    local outs=() fetched=0 f
    for ((k = 1; k <= n; k++)); do outs+=("$T/read$k.json"); done
    read -r _ WALL[$col,$n] TP[$col,$n] P50[$col,$n] P99[$col,$n] PMAX[$col,$n] LATE[$col,$n] \
        < <($PY "$HELPER" summary "$start" "${outs[@]}")
    for k in "${!ATTACH_PIDS[@]}"; do kill -TERM "${ATTACH_PIDS[k]}"; done
    for ((k = 1; k <= n; k++)); do
        wait "${ATTACH_PIDS[k - 1]}" || die "attach s$k/dev failed (exit $?): $(tail -n 5 "$T/att$k.err")"
        f=$(jfield "$T/att$k.json" bytes_fetched)
        fetched=$((fetched + ${f:-0}))
    done
    ATTACH_PIDS=()
    FETCHED[$col,$n]=$fetched
    rm -rf "$T/cache"
    log "  $col, $n station(s): ${TP[$col,$n]} MiB/s total, p50 ${P50[$col,$n]} ms, p99 ${P99[$col,$n]} ms, fetched $(human "$fetched")"
}
stations_column() { # stations_column COLUMN [init args...]
    local col=$1 bank=$T/bank-st-$1 k n
    shift
    log "  $col: bank, $MAX_N users, lab/base published, one fork per user"
    "$MBANK" -q --bank "$bank" init "$@"
    for ((k = 1; k <= MAX_N; k++)); do add_user "$bank" "s$k"; done
    local s e
    s=$(now)
    "$MBANK" -q --bank "$bank" import lab/base "$BASE" >/dev/null
    e=$(now)
    SETUP_IMPORT[$col]=$(calc "$e - $s")
    "$MBANK" -q --bank "$bank" admin publish lab/base >/dev/null
    serve_start "$bank"
    for ((k = 1; k <= MAX_N; k++)); do login "s$k"; done
    # The forks, FORK_JOBS at a time: each asks the server which of lab/base's chunks
    # it has (POST /v1/chunks/have), and the server touches every one of them in the
    # store, one after the other: ~70 ms each in Garage, so 32 forks at once make
    # those requests outlast the client's 120 s timeout.
    s=$(now)
    for ((k = 1; k <= MAX_N; k++)); do
        XDG_CONFIG_HOME=$T/cfg/s$k "$MBANK" -q --bank "$URL" create "s$k/dev" --from lab/base >/dev/null 2>"$T/create$k.err" &
        FORK_PIDS+=($!)
        if ((${#FORK_PIDS[@]} == FORK_JOBS || k == MAX_N)); then
            local j=$((k - ${#FORK_PIDS[@]} + 1)) p
            for p in "${FORK_PIDS[@]}"; do
                wait "$p" || die "create s$j/dev --from lab/base failed: $(tail -n 5 "$T/create$j.err")"
                j=$((j + 1))
            done
            FORK_PIDS=()
        fi
    done
    e=$(now)
    SETUP_FORKS[$col]=$(calc "$e - $s")
    log "  $col: import of lab/base $(printf %.1f "${SETUP_IMPORT[$col]}") s, $MAX_N forks through the server $(printf %.1f "${SETUP_FORKS[$col]}") s"
    for n in "${STATIONS[@]}"; do stations_round "$col" "$n"; done
    serve_stop
    rm -rf "$bank"
}
COLS=()
if [[ -z ${BENCH_SKIP_STATIONS:-} ]]; then
    $PY "$HELPER" reads "$BASE.extents" "$READS" "$NREADS" "$READ_TOTAL"
    read -r READ_N READ_BYTES < <(awk '{n++; b += $2} END {print n + 0, b + 0}' "$READS")
    log "2. many stations: ${STATIONS[*]}; each station reads $(human "$READ_BYTES") in $READ_N reads"
    stations_column local
    COLS=(local)
    if [[ -n ${BENCH_SKIP_GARAGE:-} ]]; then
        GARAGE_NOTE="Garage column skipped (BENCH_SKIP_GARAGE=1)"
    elif [[ ! -x $GARAGE_BIN ]]; then
        GARAGE_NOTE="Garage column skipped: garage is not installed ($GARAGE_BIN missing); install it with scripts/setup.sh (or scripts/garage.sh install)"
    elif ! "$MBANK" init --help 2>/dev/null | grep -q -- '--store'; then
        GARAGE_NOTE="Garage column skipped: this mbank has no \`init --store\` (S3 banks not in this build)"
    else
        GARAGE_DIR=$T/garage
        "$REPO_ROOT/scripts/garage.sh" start "$GARAGE_DIR" >"$T/garage.env"
        export AWS_ACCESS_KEY_ID AWS_SECRET_ACCESS_KEY
        AWS_ACCESS_KEY_ID=$(sed -n 's/^AWS_ACCESS_KEY_ID=//p' "$T/garage.env")
        AWS_SECRET_ACCESS_KEY=$(sed -n 's/^AWS_SECRET_ACCESS_KEY=//p' "$T/garage.env")
        # every node's endpoint (the store moves to the next one on a failure)
        ep=$(sed -n "s/^GARAGE_ENDPOINTS='\(.*\)'\$/\1/p" "$T/garage.env" | tr ' ' ',')
        bucket=$(sed -n 's/^GARAGE_BUCKET=//p' "$T/garage.env")
        stations_column garage --store "s3://$bucket?endpoint=$ep&region=garage"
        COLS+=(garage)
        GARAGE_NOTE="Garage: 3 nodes on 127.0.0.1 (scripts/garage.sh, replication 3, fsync on), the server's store given all 3 endpoints (it uses the first until one fails)"
    fi
    [[ -z $GARAGE_NOTE ]] || log "$GARAGE_NOTE"
fi

# ==== report ========================================================================
{
    echo "## Bank server"
    echo
    echo "- $(date -u '+%F %H:%M UTC'); $note; uptime at start: ${uptime_start## }; at end: $(uptime | sed 's/^ *//')"
    echo "- ${MBANK_NOTE:-mbank $MBANK}; $(nproc) cores; server \`mbank -q serve\` on 127.0.0.1, clients on the same machine"
    if ((${#KINDS[@]})); then
        echo
        echo "Upload (import) and download (export to /dev/null) of one $(human "$SIZE") image" \
            "(70% random, 10% zero, 10% repeated, 10% text), each into a fresh bank; MiB/s of the image's size:"
        echo
        echo "| bank | import s | import MiB/s | export s | export MiB/s | stored | import vs embedded | export vs embedded | server CPU s, import / export |"
        echo "|---|---:|---:|---:|---:|---:|---:|---:|---:|"
        for k in "${KINDS[@]}"; do
            printf '| %s | %.2f | %s | %.2f | %s | %s | %s | %s | %s / %s |\n' "$k" "${UP[$k]}" "$(mibps "$SIZE" "${UP[$k]}")" \
                "${DOWN[$k]}" "$(mibps "$SIZE" "${DOWN[$k]}")" "$(human "${STORED[$k]:-0}")" \
                "$(ratio "${UP[embedded]}" "${UP[$k]}")" "$(ratio "${DOWN[embedded]}" "${DOWN[$k]}")" \
                "${UPCPU[$k]}" "${DOWNCPU[$k]}"
        done
        echo
        echo "- times are whole commands (process start included; login before, untimed); ratios are" \
            "served/embedded throughput (1.00 = as fast as the embedded bank)"
    fi
    if ((${#COLS[@]})); then
        echo
        echo "Many stations: lab/base ($(human "$BASE_SIZE"), $(human "$BASE_DATA") of data) forked once per user;" \
            "N \`mbank attach\` (plain HTTP, each its own empty cache) and N readers at once, each" \
            "$READ_N reads ($(human "$READ_BYTES")) of 4–64 KiB one at a time:"
        echo
        echo "| bank | stations | total MiB/s | per station MiB/s | p50 ms | p99 ms | max ms | wall s | fetched from the server | fetched MiB/s | server CPU s |"
        echo "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"
        for c in "${COLS[@]}"; do
            for n in "${STATIONS[@]}"; do
                printf '| %s | %s | %s | %.1f | %s | %s | %s | %s | %s | %s | %.1f |\n' "$c" "$n" "${TP[$c,$n]}" \
                    "$(calc "${TP[$c,$n]} / $n")" "${P50[$c,$n]}" "${P99[$c,$n]}" "${PMAX[$c,$n]}" \
                    "${WALL[$c,$n]}" "$(human "${FETCHED[$c,$n]}")" "$(mibps "${FETCHED[$c,$n]}" "${WALL[$c,$n]}")" \
                    "${SCPU[$c,$n]}"
                ((LATE[$c,$n] == 0)) || echo "|  | (${LATE[$c,$n]} reader(s) connected after the start: a late start) | | | | | | | | | |"
            done
        done
        echo
        for c in "${COLS[@]}"; do
            printf -- '- setup, %s: import of lab/base on the host %.1f s; %s forks (`create sK/dev --from lab/base` through the server, %s at a time) %.1f s\n' \
                "$c" "${SETUP_IMPORT[$c]}" "$MAX_N" "$FORK_JOBS" "${SETUP_FORKS[$c]}"
        done
        if [[ " ${COLS[*]} " == *" garage "* ]]; then
            echo
            echo "| stations | throughput Garage/local | p99 Garage/local |"
            echo "|---:|---:|---:|"
            for n in "${STATIONS[@]}"; do
                echo "| $n | $(ratio "${TP[garage,$n]}" "${TP[local,$n]}") | $(ratio "${P99[garage,$n]}" "${P99[local,$n]}") |"
            done
        fi
        echo
        echo "- total MiB/s: what the readers read, over the time from their common start to the last" \
            "one's end; latencies of all reads of all stations pooled; fetched: bytes_fetched summed" \
            'over the stations'"'"' `attach --json` (64 KiB chunks: about twice what is read); server CPU:' \
            'user + system seconds of `mbank serve` during the reads'
        [[ -z $GARAGE_NOTE ]] || echo "- $GARAGE_NOTE"
    fi
} | tee "$CACHE_DIR/results/bench-server.md"
