#!/usr/bin/env bash
# Lab network benchmark (a command, not a test): `mbank export` of a published disk
# from a station through the bank server, over a link shaped by scripts/lab-net.sh,
# against the link's floor and against curl copying the disk's zstd file over the
# same link. Prints the ratios. The baseline for the transfer-speed work of issue 12.
#
# The disk is base.raw of scripts/bench-data.sh (a 2 GiB Debian disk, cached under
# /var/cache/mbank-dev/bench; made on the first run). It is imported on the server's
# host as lab/base and published; user `bench` logs in from the station. For each
# profile (BENCH_LAB_PROFILES, default "1gbit 100mbit") a lab of one station is made
# (server and station in their own network namespaces, the station's link shaped
# with tbf both ways), and BENCH_RUNS times (default 3; the median is reported):
#   - mbank export lab/base to a file on the station, over HTTPS (`serve --tls-cert`,
#     a throwaway CA made by openssl) and over plain HTTP (`serve --insecure-http`);
#   - mbank export lab/base to /dev/null (the in-order path: runs of 16 chunks);
#   - the same export to a file from the chunks alone: `admin publish` packs the head
#     (`mbank pack`), and the export rows above read that pack; for this row the pack
#     is moved aside, as for a version nobody packed;
#   - curl of base.raw.zst (zstd -3 of the disk, made once, cached) from
#     `python3 -m http.server` in the server's namespace, to /dev/null, and to a file
#     (the ratios are against the /dev/null row).
# With BENCH_LAB_WHAT containing `upload` (default "export upload"), the other way too:
#   - mbank import of base.raw from the station into a fresh bank served over HTTPS
#     (each run a new bank on the server's host, so nothing is deduplicated; only the
#     import is timed), and
#   - curl -T of base.raw.zst from the station to a Python sink in the server's
#     namespace that reads and drops what a PUT sends.
#   On a :garage profile each run's bank gets a new bucket of the lab's cluster
#   (scripts/garage.sh bucket), so nothing is deduplicated there either.
# Floor: bytes in the bank (import's bytes_stored) / the link rate. Ratios:
# floor/mbank (1.00 = the link's speed, the goal is >= 0.9) and curl/mbank (>= 1.00:
# no slower than the plain copy). Whole commands are timed; the page cache is warm on
# the server's side for both (one untimed read of the chunks and the zstd file), and
# every export starts with an empty station (export keeps no cache). Everything runs
# on this machine: server, station and shaping share its cores.
#
# A profile written PROFILE:garage (BENCH_LAB_PROFILES="1gbit 1gbit:garage") keeps the
# bank's chunks on a three-node Garage cluster (`lab-net.sh --store garage`: the nodes
# on the server namespace's loopback, replication 3, fsync on) instead of its directory;
# that bank is made and imported inside the server's namespace, and the page cache is
# not warmed for it (the chunks are in Garage's files).
#
# Env: MBANK (binary; else a release build, in CARGO_TARGET_DIR if set),
# BENCH_LAB_PROFILES, BENCH_RUNS, BENCH_LAB_SKIP_HTTP=1 (HTTPS rows only),
# BENCH_LAB_WHAT (words: export, upload; default both).
set -euo pipefail
# shellcheck source=scripts/lib.sh
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"
REPO_ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
LAB_NET=$REPO_ROOT/scripts/lab-net.sh
read -r -a PROFILES <<<"${BENCH_LAB_PROFILES:-1gbit 100mbit}"
RUNS=${BENCH_RUNS:-3}
WHAT=" ${BENCH_LAB_WHAT:-export upload} "
[[ $RUNS =~ ^[1-9][0-9]*$ ]] || die "BENCH_RUNS=$RUNS: give a number of runs"

[[ $EUID == 0 ]] || die "must run as root (network namespaces)"
need bc
need openssl
need curl
need zstd
need ip iproute2
if [[ -z ${MBANK:-} && -n ${CARGO_TARGET_DIR:-} ]]; then
    log "cargo build --release -p mbank (CARGO_TARGET_DIR=$CARGO_TARGET_DIR)"
    (cd "$REPO_ROOT" && cargo build --release -q -p mbank) >&2 || die "cargo build failed"
    MBANK=$CARGO_TARGET_DIR/release/mbank
fi
build_mbank "$REPO_ROOT"
note=$(load_note)
uptime_start=$(uptime)

ratio() { printf '%.2f' "$(calc "$1 / $2")"; }
median() { printf '%s\n' "$@" | sort -g | awk '{v[NR] = $1} END {print (NR % 2) ? v[(NR + 1) / 2] : (v[NR / 2] + v[NR / 2 + 1]) / 2}'; }
jfield() { python3 -c 'import json,sys; print(json.load(open(sys.argv[1]))[sys.argv[2]])' "$1" "$2"; }

# ---- data ---------------------------------------------------------------------------
"$REPO_ROOT/scripts/bench-data.sh" >&2
IMG=$BENCH_DIR/base.raw
ZST=$BENCH_DIR/base.raw.zst
if [[ ! -f $ZST || $IMG -nt $ZST ]]; then
    log "making $ZST (zstd -3)"
    zstd -q -f -3 -T0 "$IMG" -o "$ZST.tmp"
    mv "$ZST.tmp" "$ZST"
fi
ZST_BYTES=$(bytes_of "$ZST")

make_tmp T
LAB=mbank-bench-$$
lab_down() { "$LAB_NET" down --name "$LAB" >&2 || true; }
at_exit lab_down
SERVER_PID=
serve_stop() {
    [[ -n $SERVER_PID ]] || return 0
    kill -TERM "$SERVER_PID" 2>/dev/null || true
    wait "$SERVER_PID" 2>/dev/null || true
    SERVER_PID=
}
at_exit serve_stop
WWW_PID=
www_stop() {
    [[ -n $WWW_PID ]] || return 0
    kill "$WWW_PID" 2>/dev/null || true
    wait "$WWW_PID" 2>/dev/null || true
    WWW_PID=
}
at_exit www_stop

BANK=$T/bank
DIR_BANK=$BANK
log "importing $IMG into a fresh bank as lab/base (on the server's host)"
"$MBANK" -q --bank "$BANK" init
"$MBANK" -q --bank "$BANK" import --json lab/base "$IMG" >"$T/import.json"
"$MBANK" -q --bank "$BANK" admin publish lab/base >/dev/null
printf 'bench-password-lab\n' | "$MBANK" -q --bank "$BANK" admin user add bench --password-stdin >/dev/null
STORED=$(jfield "$T/import.json" bytes_stored)
PACKED=$(stat -c %s "$BANK"/packs/*.pack)
log "bytes in the bank: $(human "$STORED"); its pack: $(human "$PACKED"); zstd file: $(human "$ZST_BYTES")"
mkdir -p "$T/www"
ln "$ZST" "$T/www/base.raw.zst" 2>/dev/null || cp "$ZST" "$T/www/base.raw.zst"

# A throwaway CA and a certificate for the lab's server address.
lab_certs "$T" bench-lab

in_srv() { ip netns exec "$MBANK_LAB_SERVER_NS" "$@"; }
in_st() { ip netns exec "$MBANK_LAB_STATION_NS" env XDG_CONFIG_HOME="$T/cfg" "$@"; }

serve_start() { # serve_start SCHEME: sets SERVER_PID, URL
    local out=$T/serve.out i tls=()
    if [[ $1 == https ]]; then tls=(--tls-cert "$T/cert.pem" --tls-key "$T/key.pem"); else tls=(--insecure-http); fi
    : >"$out"
    in_srv "$MBANK" -q --bank "$BANK" serve --listen "$MBANK_LAB_SERVER_ADDR:0" "${tls[@]}" >"$out" 2>>"$T/serve.log" &
    SERVER_PID=$!
    for ((i = 0; i < 600; i++)); do
        URL=$(sed -n 's/^listening on //p' "$out")
        [[ -n $URL ]] && break
        kill -0 "$SERVER_PID" 2>/dev/null || die "mbank serve exited: $(tail -n 5 "$T/serve.log")"
        sleep 0.05
    done
    [[ -n $URL ]] || die "mbank serve did not say where it listens within 30 s"
    rm -rf "$T/cfg"
    local ca=()
    [[ $1 == http ]] || ca=(--ca-cert "$T/ca.pem")
    printf 'bench-password-lab\n' | in_st "$MBANK" -q login "$URL" --user bench --password-stdin "${ca[@]}" >/dev/null
}

timed() { # timed CMD...: seconds CMD took
    local s e
    s=$(now)
    "$@" >/dev/null
    e=$(now)
    calc "$e - $s"
}
export_file() { in_st "$MBANK" -q --bank "$URL" export lab/base "$T/out.raw"; }
# Run after each timed run of a row (not timed): removing the 2 GiB file export wrote
# took 0.1-0.2 s of the row's time before.
after_export_file() { rm -f "$T/out.raw"; }
export_null() { in_st "$MBANK" -q --bank "$URL" export lab/base /dev/null; }
# Moves the bank's packs aside for the timed command: an export from the chunks alone.
export_unpacked() {
    mv "$BANK/packs" "$BANK/packs.aside"
    local rc=0
    export_file || rc=$?
    mv "$BANK/packs.aside" "$BANK/packs"
    return $rc
}
after_export_unpacked() { after_export_file; }
curl_zst() { # checks the size: a stale server on the port must not pass for a fast one
    local n
    n=$(in_st curl -sS -o /dev/null -w '%{size_download}' "http://$MBANK_LAB_SERVER_ADDR:8099/base.raw.zst")
    [[ $n == "$ZST_BYTES" ]] || die "curl fetched $n bytes of base.raw.zst, not $ZST_BYTES"
}
# The same into a file beside the export's (no fsync: curl does none), removed after.
curl_zst_file() {
    local n
    n=$(in_st curl -sS -o "$T/out.zst" -w '%{size_download}' "http://$MBANK_LAB_SERVER_ADDR:8099/base.raw.zst")
    [[ $n == "$ZST_BYTES" ]] || die "curl fetched $n bytes of base.raw.zst, not $ZST_BYTES"
}
after_curl_zst_file() { rm -f "$T/out.zst"; }

cat >"$T/sink.py" <<'PY'
import sys
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
class Sink(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    def do_PUT(self):
        n = int(self.headers.get("Content-Length", "0"))
        while n > 0:
            b = self.rfile.read(min(n, 1 << 20))
            if not b:
                break
            n -= len(b)
        self.send_response(201)
        self.send_header("Content-Length", "0")
        self.end_headers()
    do_GET = do_PUT
    def log_message(self, *a):
        pass
ThreadingHTTPServer((sys.argv[1], int(sys.argv[2])), Sink).serve_forever()
PY
curl_put() {
    local n
    n=$(in_st curl -sS -o /dev/null -w '%{size_upload}' -T "$ZST" "http://$MBANK_LAB_SERVER_ADDR:8098/base.raw.zst")
    [[ $n == "$ZST_BYTES" ]] || die "curl sent $n bytes of base.raw.zst, not $ZST_BYTES"
}
import_up() { # import_up TAG STORE: a fresh bank served over HTTPS; times the station's import only
    BANK=$T/bank-up-$1
    if [[ $2 == garage ]]; then
        in_srv "$REPO_ROOT/scripts/garage.sh" bucket "$MBANK_LAB_GARAGE_DIR" "up-$1" >/dev/null
        in_srv "$MBANK" -q --bank "$BANK" init --store "${MBANK_LAB_STORE_URL/s3:\/\/mbank\?/s3://up-$1?}" >/dev/null
    else
        "$MBANK" -q --bank "$BANK" init >/dev/null
    fi
    printf 'bench-password-lab\n' | "$MBANK" -q --bank "$BANK" admin user add bench --password-stdin >/dev/null
    serve_start https
    timed in_st "$MBANK" -q --bank "$URL" import bench/up "$IMG"
    serve_stop
    # Removed after the profile's runs: ext4 makes the next bank's files slowly while it
    # still has the inodes of thousands just deleted (recently_deleted in a profile).
}

declare -A MED RATE
ROWS=()
if [[ $WHAT == *" export "* ]]; then
    ROWS+=("mbank export, HTTPS, to a file" "mbank export, HTTPS, to /dev/null")
    ROWS+=("mbank export, HTTPS, to a file, no pack")
    [[ -n ${BENCH_LAB_SKIP_HTTP:-} ]] || ROWS+=("mbank export, HTTP, to a file")
    ROWS+=("curl of the zstd file, HTTP" "curl of the zstd file, HTTP, to a file")
fi
if [[ $WHAT == *" upload "* ]]; then
    ROWS+=("mbank import to a fresh bank, HTTPS" "curl -T of the zstd file, HTTP")
fi
measure() { # measure PROFILE ROW CMD...: MED[PROFILE,ROW] = median seconds of RUNS runs
    local p=$1 row=$2 r t ts=()
    shift 2
    for ((r = 1; r <= RUNS; r++)); do
        t=$(timed "$@")
        ts+=("$t")
        log "  $p, $row: $(printf %.2f "$t") s (load $(cut -d' ' -f1 /proc/loadavg))"
        if declare -F "after_$1" >/dev/null; then "after_$1"; fi
    done
    MED[$p,$row]=$(median "${ts[@]}")
}

for p in "${PROFILES[@]}"; do
    log "profile $p: lab up"
    store=dir
    [[ $p != *:garage ]] || store=garage
    eval "$("$LAB_NET" up --name "$LAB" --profile "${p%%:*}" --stations 1 --store "$store")"
    RATE[$p]=$MBANK_LAB_RATE_BIT
    ((RATE[$p] > 0)) || die "profile $p has no rate: the floor needs one"
    log "  $($LAB_NET measure --name "$LAB" --size 16)"
    [[ $store != garage ]] || export AWS_ACCESS_KEY_ID AWS_SECRET_ACCESS_KEY
    if [[ $store == garage && $WHAT == *" export "* ]]; then
        BANK=$T/bank-garage-${p%%:*}
        log "  importing $IMG into a bank on Garage (in the server's namespace)"
        in_srv "$MBANK" -q --bank "$BANK" init --store "$MBANK_LAB_STORE_URL"
        in_srv "$MBANK" -q -j 16 --bank "$BANK" import lab/base "$IMG" >/dev/null
        in_srv "$MBANK" -q --bank "$BANK" admin publish lab/base >/dev/null
        printf 'bench-password-lab\n' | in_srv "$MBANK" -q --bank "$BANK" admin user add bench --password-stdin >/dev/null
        cat "$ZST" >/dev/null
    else
        BANK=$DIR_BANK
        # Warm the server's page cache for both sides.
        cat "$BANK"/chunks/*/* "$ZST" >/dev/null
    fi
    if [[ $WHAT == *" upload "* ]]; then
        export_bank=$BANK
        ts_up=()
        for ((r = 1; r <= RUNS; r++)); do
            t=$(import_up "${p%%:*}-$store-$r" "$store")
            ts_up+=("$t")
            log "  $p, import: $(printf %.2f "$t") s (load $(cut -d' ' -f1 /proc/loadavg))"
        done
        MED[$p,mbank import to a fresh bank, HTTPS]=$(median "${ts_up[@]}")
        # Not through in_srv: $! must be python's pid (ip netns exec execs it), for www_stop.
        ip netns exec "$MBANK_LAB_SERVER_NS" python3 "$T/sink.py" "$MBANK_LAB_SERVER_ADDR" 8098 >/dev/null 2>&1 &
        WWW_PID=$!
        for ((i = 0; i < 100; i++)); do
            in_st curl -s -o /dev/null "http://$MBANK_LAB_SERVER_ADDR:8098/" && break
            sleep 0.1
        done
        measure "$p" "curl -T of the zstd file, HTTP" curl_put
        www_stop
        rm -rf "$T"/bank-up-*
        BANK=$export_bank
    fi
    if [[ $WHAT != *" export "* ]]; then
        lab_down
        continue
    fi
    serve_start https
    measure "$p" "mbank export, HTTPS, to a file" export_file
    measure "$p" "mbank export, HTTPS, to /dev/null" export_null
    measure "$p" "mbank export, HTTPS, to a file, no pack" export_unpacked
    serve_stop
    if [[ -z ${BENCH_LAB_SKIP_HTTP:-} ]]; then
        serve_start http
        measure "$p" "mbank export, HTTP, to a file" export_file
        serve_stop
    fi
    ip netns exec "$MBANK_LAB_SERVER_NS" python3 -m http.server --bind "$MBANK_LAB_SERVER_ADDR" --directory "$T/www" 8099 >/dev/null 2>&1 &
    WWW_PID=$!
    for ((i = 0; i < 100; i++)); do
        in_st curl -s -o /dev/null "http://$MBANK_LAB_SERVER_ADDR:8099/" && break
        sleep 0.1
    done
    measure "$p" "curl of the zstd file, HTTP" curl_zst
    measure "$p" "curl of the zstd file, HTTP, to a file" curl_zst_file
    www_stop
    lab_down
done

# ==== report ========================================================================
CURL_ROW="curl of the zstd file, HTTP"
PUT_ROW="curl -T of the zstd file, HTTP"
{
    echo "## Lab network"
    echo
    echo "- $(date -u '+%F %H:%M UTC'); $note; uptime at start: ${uptime_start## }; at end: $(uptime | sed 's/^ *//')"
    echo "- ${MBANK_NOTE:-mbank $MBANK}; $(nproc) cores; one station, the server and the shaping on this machine"
    echo "- lab/base: $(human "$(bytes_of "$IMG")") Debian disk (base.raw), $(human "$STORED") in the bank;" \
        "its pack $(human "$PACKED") (what the export rows move, but \"no pack\");" \
        "zstd -3 file $(human "$ZST_BYTES"); median of $RUNS run(s)"
    echo
    echo "| link | what | seconds | MiB/s of bytes moved | floor s | floor / this | curl / this |"
    echo "|---|---|---:|---:|---:|---:|---:|"
    for p in "${PROFILES[@]}"; do
        floor=$(calc "$STORED * 8 / ${RATE[$p]}")
        for row in "${ROWS[@]}"; do
            t=${MED[$p,$row]:-}
            [[ -n $t ]] || continue # an upload row of a :garage profile
            moved=$STORED
            [[ $row != "mbank export"* || $row == *"no pack" ]] || moved=$PACKED
            [[ $row != "$CURL_ROW"* && $row != "$PUT_ROW" ]] || moved=$ZST_BYTES
            ref=$CURL_ROW
            [[ $row != *import* && $row != "$PUT_ROW" ]] || ref=$PUT_ROW
            printf '| %s | %s | %.2f | %.1f | %.2f | %s | %s |\n' "$p" "$row" "$t" \
                "$(calc "$moved / 1048576 / $t")" "$floor" "$(ratio "$floor" "$t")" \
                "$(ratio "${MED[$p,$ref]}" "$t")"
        done
    done
    echo
    echo "- floor: bytes in the bank / the link rate (tbf's rate; TCP carries about 95% of it);" \
        "floor / this >= 0.9 is issue 12's goal for mbank, curl / this >= 1.00 its second" \
        "(an import is compared with curl -T, an export with curl's download)"
    echo "- MiB/s of bytes moved: the pack's bytes (mbank export), bytes in the bank (import," \
        "export with no pack) or of the zstd file (curl) per second"
} | tee "$CACHE_DIR/results/bench-lab.md"
