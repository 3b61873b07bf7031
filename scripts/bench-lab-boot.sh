#!/usr/bin/env bash
# Lab network benchmark of cold boots (a command, not a test; issue 12): the root-disk
# Debian guest (`scripts/build-guest.sh rootdisk`) with user files added to its disk
# that the boot never reads, booted on stations of a lab (`scripts/lab-net.sh`) whose
# disk is served by `mbank attach` from the bank server across a shaped link. Prints
# each boot's I/O from the session statistics (`attach --json`: bytes fetched from the
# bank, misses the guest waited on and their total wait, prefetch hits) beside its
# wall time, and the ratios issue 12 asks for.
#
# The disk: root.raw (2 GiB ext4, systemd Debian 12) grown by BENCH_USER_MIB (default
# 512) MiB, holding that much pseudo-random data in /home/files/f*.bin (64 MiB files,
# written with debugfs; never read by the boot). Made once, cached under $BENCH_DIR.
# It is imported on the server's host as lab/base and published; user `bench` forks it
# from the stations. A boot is QEMU (TCG, 256 MiB, 1 vCPU) with the test guest's kernel
# and initramfs switching to the disk's root (`mbank.root=/dev/vda`), running the
# `write` job (a few small files in /srv/mbank, so the session checks in a version and
# its working set) and powering off; the attach is then stopped (SIGTERM: check-in).
#
# Series (BENCH_BOOT_SERIES, default "dir:1gbit dir:100mbit"; STORE:PROFILE, STORE dir
# or garage): a lab of 2 stations; machine bench/pc forked from lab/base, then
#   cold      station 1, empty cache, no working set yet (this boot records one)
#   cold+ws   station 2, empty cache, the working set the first boot stored
#   warm      station 1 again, its cache holding what the first boot fetched
#   export    station 1: `mbank export lab/base` to a file (what export-then-boot moves
#             before its boot can start; the boot itself is then a local one)
# and once, outside the lab: a boot from a local copy of the disk (the "then boot").
# Targets (issue 12): export's bytes / the cold boot's bytes >= 5; the I/O the guest
# waits on with the working set: cold+ws misses waited <= 1.5 x warm's.
#
# Concurrent (BENCH_BOOT_CONCURRENT, default "dir:1gbit:8"; "" to skip): a lab of N
# stations; the published base gets its working set from a first boot on the server's
# host (attach on the bank directory itself), then one station boots a fork alone, then
# N stations each boot their own fork at the same moment. Per station: bytes fetched,
# misses waited, wait; against the one alone. STORE garage works but is slow: each
# fork touches every chunk of the base, a copy of each object onto itself on Garage
# (minutes per fork of this disk; see docs/BENCHMARKS.md).
#
# Replay (BENCH_BOOT_REPLAY, default ""; e.g. "garage:1gbit:32"): as Concurrent, for more
# stations than this machine can boot TCG guests at once: one station boots its fork
# alone with QEMU tracing the guest's disk reads (`-trace blk_co_preadv`); then one
# station alone, and then N stations at the same moment, each on its own fork with an
# empty cache, replay those reads in their order through their own `mbank attach`
# (qemu-io over NBD, one read at a time). The forks' times are reported too. An entry
# with a fourth field `peers` ("dir:1gbit:8:peers") adds a round with LAN sharing
# (issue 17): station 1 serves the cache of its "alone" replay (`mbank peer`), and N
# stations with MBANK_PEERS naming it replay again at the same moment, each on a new
# fork with an empty cache; reported with the bytes the peer served, so what the bank
# server sent is the rest. BENCH_BOOT_PEERS (default "1"; e.g. "1 4") runs that round
# once per count P: stations 1..P each serve a copy of that cache, every station names
# them all (each request starts at the next peer in turn).
#
# BENCH_BOOT_UPLINK (1gbit, 100mbit; default none) shapes the server's own link too: the
# lab's one uplink to the bank, which all stations share (`lab-net.sh --uplink`).
# BENCH_BOOT_SERVE_ARGS: more options for `mbank serve` (e.g. --no-direct-reads, for a
# bank on Garage whose stations then read every chunk through the server). The replay
# rounds report what the servers sent (their metrics, `mbank_sent_bytes_total`) and the
# CPU time they used (/proc). BENCH_BOOT_SERVERS (default 1; e.g. 2): that many `mbank
# serve` processes on one bank whose catalog is in PostgreSQL (`init --postgres`, a
# PostgreSQL server on the server namespace's loopback); station k uses server
# ((k - 1) mod S) + 1.
#
# Env: MBANK (binary; else a release build, in CARGO_TARGET_DIR if set),
# BENCH_USER_MIB, BENCH_BOOT_SERIES, BENCH_BOOT_CONCURRENT, BENCH_BOOT_REPLAY. Everything (server, Garage,
# stations, the shaping and every QEMU) shares this machine's cores: wall times of
# concurrent TCG boots say more about the CPU than the network.
set -euo pipefail
# shellcheck source=scripts/lib.sh
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"
REPO_ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
LAB_NET=$REPO_ROOT/scripts/lab-net.sh
USER_MIB=${BENCH_USER_MIB:-512}
read -r -a SERIES <<<"${BENCH_BOOT_SERIES-dir:1gbit dir:100mbit}"
read -r -a CONCURRENT <<<"${BENCH_BOOT_CONCURRENT-dir:1gbit:8}"
read -r -a REPLAY <<<"${BENCH_BOOT_REPLAY-}"
SERVERS=${BENCH_BOOT_SERVERS:-1}
[[ $SERVERS =~ ^[1-9]$ ]] || die "BENCH_BOOT_SERVERS=$SERVERS: give 1 to 9"
[[ $USER_MIB =~ ^[0-9]+$ ]] || die "BENCH_USER_MIB=$USER_MIB: give MiB"
[[ $EUID == 0 ]] || die "must run as root (network namespaces)"
need openssl
need debugfs e2fsprogs
need resize2fs e2fsprogs
need qemu-system-x86_64 qemu-system-x86
need ip iproute2
if [[ -z ${MBANK:-} && -n ${CARGO_TARGET_DIR:-} ]]; then
    log "cargo build --release -p mbank (CARGO_TARGET_DIR=$CARGO_TARGET_DIR)"
    (cd "$REPO_ROOT" && cargo build --release -q -p mbank) >&2 || die "cargo build failed"
    MBANK=$CARGO_TARGET_DIR/release/mbank
fi
build_mbank "$REPO_ROOT"
note=$(load_note)
uptime_start=$(uptime | sed 's/^ *//')

jget() { python3 -c 'import json,sys; v=json.load(open(sys.argv[1]))
for k in sys.argv[2].split("."): v = v[k]
print(v)' "$1" "$2"; }

# ---- the guest and its disk ----------------------------------------------------------
eval "$("$REPO_ROOT/scripts/build-guest.sh" rootdisk | grep -E '^(KERNEL|INITRD|ROOTDISK)=')"
mkdir -p "$BENCH_DIR"
DISK=$BENCH_DIR/rootdisk-user$USER_MIB.raw
if [[ ! -f $DISK || $ROOTDISK -nt $DISK ]]; then
    log "making $DISK: the root disk with $USER_MIB MiB of user files"
    cp --sparse=always "$ROOTDISK" "$DISK.tmp"
    truncate -s "$(($(stat -c %s "$ROOTDISK") + USER_MIB * 1048576 + 268435456))" "$DISK.tmp"
    e2fsck -fy "$DISK.tmp" >/dev/null 2>&1 || true
    resize2fs "$DISK.tmp" >/dev/null 2>&1 || die "resize2fs $DISK.tmp failed"
    debugfs -w -R "mkdir /home/files" "$DISK.tmp" >/dev/null 2>&1
    f=$BENCH_DIR/user-file.tmp
    for ((i = 0; i * 64 < USER_MIB; i++)); do
        head -c $((64 * 1048576)) /dev/urandom >"$f"
        debugfs -w -R "write $f /home/files/f$i.bin" "$DISK.tmp" >/dev/null 2>&1
    done
    rm -f "$f"
    e2fsck -fn "$DISK.tmp" >/dev/null 2>&1 || die "the grown disk does not pass e2fsck"
    mv "$DISK.tmp" "$DISK"
fi
DISK_BYTES=$(stat -c %s "$DISK")

make_tmp T
LAB=mbank-boot-$$
lab_down() { "$LAB_NET" down --name "$LAB" >&2 || true; }
at_exit lab_down
SERVER_PIDS=()
URLS=()
PGDIR=
serve_stop() {
    local pid
    for pid in "${SERVER_PIDS[@]}"; do
        kill -TERM "$pid" 2>/dev/null || true
        wait "$pid" 2>/dev/null || true
    done
    SERVER_PIDS=()
    if [[ -n $PGDIR ]]; then
        runuser -u postgres -- "$PGBIN/pg_ctl" -D "$PGDIR/data" stop -m fast >/dev/null 2>&1 || true
        rm -rf "$PGDIR"
        PGDIR=
    fi
}
at_exit serve_stop
url_of() { # url_of STATION: the server station k uses (stations take the servers in turn)
    echo "${URLS[($1 - 1) % ${#URLS[@]}]}"
}
cpu_ticks() { # the servers' CPU time so far (user + system, clock ticks)
    local pid t=0
    for pid in "${SERVER_PIDS[@]}"; do
        t=$((t + $(awk '{ print $14 + $15 }' "/proc/$pid/stat")))
    done
    echo "$t"
}
TICKS=$(getconf CLK_TCK)
pg_up() { # a PostgreSQL server on the server namespace's loopback, database `bank`
    PGBIN=$(ls -d /usr/lib/postgresql/*/bin | sort -V | tail -n 1)
    [[ -x $PGBIN/initdb ]] || die "BENCH_BOOT_SERVERS > 1 needs PostgreSQL (scripts/setup.sh installs it)"
    # Not under $T: the postgres user must reach it.
    PGDIR=/tmp/mbank-bench-pg-$$
    rm -rf "$PGDIR"
    mkdir -p "$PGDIR"
    chown postgres: "$PGDIR"
    runuser -u postgres -- "$PGBIN/initdb" -D "$PGDIR/data" -A trust -U mbank --no-sync >/dev/null
    in_srv runuser -u postgres -- "$PGBIN/pg_ctl" -D "$PGDIR/data" -l "$PGDIR/log" -w \
        -o "-p 5432 -k $PGDIR -c listen_addresses=127.0.0.1 -c max_connections=300" start >/dev/null ||
        die "PostgreSQL did not start: $(tail -n 5 "$PGDIR/log")"
    in_srv runuser -u postgres -- "$PGBIN/createdb" -h 127.0.0.1 -p 5432 -U mbank bank
}

lab_certs "$T" bench-lab-boot

# The bank's host is the server's namespace (a Garage cluster listens on its loopback).
in_srv() { ip netns exec "$MBANK_LAB_SERVER_NS" "$@"; }
st_ns() { local a; read -r -a a <<<"$MBANK_LAB_STATION_NS"; echo "${a[$1 - 1]}"; }
in_st() { local k=$1; shift; ip netns exec "$(st_ns "$k")" env XDG_CONFIG_HOME="$T/cfg-$k" "$@"; }

lab_up() { # lab_up STORE PROFILE STATIONS: the lab, a bank on STORE, its server, logins
    local store=$1 profile=$2 n=$3 i out=$T/serve.out
    eval "$("$LAB_NET" up --name "$LAB" --profile "$profile" --stations "$n" --store "$store" --uplink "${BENCH_BOOT_UPLINK:-none}")"
    [[ $store != garage ]] || export AWS_ACCESS_KEY_ID AWS_SECRET_ACCESS_KEY
    BANK=$T/bank-$store-$profile-$n
    local init=(init)
    [[ $store == garage ]] && init+=(--store "$MBANK_LAB_STORE_URL")
    if ((SERVERS > 1)); then
        pg_up
        init+=(--postgres postgresql://mbank@127.0.0.1:5432/bank)
    fi
    in_srv "$MBANK" -q --bank "$BANK" "${init[@]}"
    log "importing $DISK as lab/base ($store)"
    # -j 16: on Garage each chunk is first asked after (a HEAD of 45-90 ms); more in flight.
    in_srv "$MBANK" -q -j 16 --bank "$BANK" import --json lab/base "$DISK" >"$T/import.json"
    STORED=$(jget "$T/import.json" bytes_stored)
    in_srv "$MBANK" -q --bank "$BANK" admin publish lab/base >/dev/null
    printf 'bench-password-boot\n' | in_srv "$MBANK" -q --bank "$BANK" admin user add bench --password-stdin >/dev/null
    printf 'bench-password-adm\n' | in_srv "$MBANK" -q --bank "$BANK" admin user add benchadm --admin --password-stdin >/dev/null
    local extra=() s u
    read -r -a extra <<<"${BENCH_BOOT_SERVE_ARGS:-}"
    URLS=()
    for ((s = 1; s <= SERVERS; s++)); do
        out=$T/serve$s.out
        : >"$out"
        # `exec`: the pid is mbank's own, whose CPU time the rounds read.
        # -q unless its log is kept (a line per request).
        (exec ip netns exec "$MBANK_LAB_SERVER_NS" "$MBANK" $([[ -n ${BENCH_BOOT_LOGS:-} ]] || echo -q) --bank "$BANK" serve \
            --listen "$MBANK_LAB_SERVER_ADDR:0" --lan-sharing "${extra[@]}" \
            --tls-cert "$T/cert.pem" --tls-key "$T/key.pem" >"$out" 2>>"$T/serve.log") &
        SERVER_PIDS+=($!)
        u=
        for ((i = 0; i < 600; i++)); do
            u=$(sed -n 's/^listening on //p' "$out")
            [[ -n $u ]] && break
            kill -0 "${SERVER_PIDS[s - 1]}" 2>/dev/null || die "mbank serve exited: $(tail -n 5 "$T/serve.log")"
            sleep 0.05
        done
        [[ -n $u ]] || die "mbank serve did not say where it listens"
        URLS+=("$u")
    done
    URL=${URLS[0]}
    for ((i = 1; i <= n; i++)); do
        rm -rf "$T/cfg-$i"
        printf 'bench-password-boot\n' | in_st "$i" "$MBANK" -q login "$(url_of "$i")" --user bench \
            --password-stdin --ca-cert "$T/ca.pem" >/dev/null
    done
    rm -rf "$T/cfg-adm"
    for u in "${URLS[@]}"; do
        printf 'bench-password-adm\n' | ip netns exec "$(st_ns 1)" env XDG_CONFIG_HOME="$T/cfg-adm" \
            "$MBANK" -q login "$u" --user benchadm --password-stdin --ca-cert "$T/ca.pem" >/dev/null
    done
}
lab_end() { # BENCH_BOOT_LOGS=DIR keeps the servers' log there
    serve_stop
    [[ -z ${BENCH_BOOT_LOGS:-} ]] || { mkdir -p "$BENCH_BOOT_LOGS" && cp "$T/serve.log" "$BENCH_BOOT_LOGS/serve-$(date +%H%M%S).log"; }
    lab_down
}
sent_bytes() { # what the servers sent so far: their metrics, read with the administrator's tokens
    local token u t=0 b
    for u in "${URLS[@]}"; do
        # credentials.json: bank URL -> {token, ...} (possibly under a wrapper).
        token=$(python3 -c 'import json,sys
def f(v, url):
    if isinstance(v, dict):
        for k, x in v.items():
            if k.rstrip("/") == url.rstrip("/") and isinstance(x, dict) and isinstance(x.get("token"), str):
                return x["token"]
        for x in v.values():
            t = f(x, url)
            if t: return t
    return None
print(f(json.load(open(sys.argv[1])), sys.argv[2]))' "$T/cfg-adm/mbank/credentials.json" "$u")
        [[ $token != None ]] || die "no administrator token for $u"
        b=$(ip netns exec "$(st_ns 1)" curl -sS --cacert "$T/ca.pem" -H "Authorization: Bearer $token" "$u/metrics" |
            awk '$1 == "mbank_sent_bytes_total" { print $2 }')
        t=$(calc "$t + $b")
    done
    echo "$t"
}

forks() { # forks TAG N [PREFIX]: bench/PREFIX1..N (default pc; station k forks its own) and bench/alone, timed
    local k s t all="" pre=${3:-pc}
    for ((k = 1; k <= $2; k++)); do
        s=$(now)
        in_st "$k" "$MBANK" -q --bank "$(url_of "$k")" create "bench/$pre$k" --from lab/base >/dev/null
        t=$(calc "$(now) - $s")
        all="$all $(printf %.1f "$t")"
    done
    [[ $pre == pc ]] || return 0
    s=$(now)
    in_st 1 "$MBANK" -q --bank "$URL" create bench/alone --from lab/base >/dev/null
    t=$(calc "$(now) - $s")
    FORKS_NOTE="forks through the server (\`create --from lab/base\`, one after another): $(printf %.1f "$t") s for bench/alone; bench/pc1..$2:$all s"
    log "  $FORKS_NOTE"
}

QEMU=(qemu-system-x86_64 -accel tcg -cpu max -m 256 -smp 1 -nodefaults -no-reboot -display none)
APPEND="console=ttyS0 panic=-1 mbank.job=write mbank.size_mib=1 mbank.root=/dev/vda"
QEMU_EXTRA=()
qemu_boot() { # qemu_boot DRIVE CONSOLE: boots, waits for the power-off
    timeout 1800 "${QEMU[@]}" "${QEMU_EXTRA[@]}" -serial "file:$2" -kernel "$KERNEL" -initrd "$INITRD" \
        -append "$APPEND" -drive "$1" </dev/null >/dev/null 2>&1 || true
    grep -q MBANK-JOB-DONE "$2" || die "the guest did not finish its job: $(tail -n 20 "$2")"
}

attach_start() { # attach_start TAG STATION(0: the bank's host) MACHINE CACHE: ATT_PID[TAG]
    local tag=$1 k=$2 m=$3 cache=$4 sock=$T/$1.sock i
    # `exec`: $! is mbank itself (ip netns exec and env exec too), which attach_stop
    # signals; a background subshell would ignore the signal.
    local ns=$MBANK_LAB_SERVER_NS bank=$BANK
    ((k == 0)) || ns=$(st_ns "$k") bank=$(url_of "$k")
    (exec ip netns exec "$ns" env XDG_CONFIG_HOME="$T/cfg-$k" ${PEERS_ENV:+MBANK_PEERS=$PEERS_ENV} "$MBANK" -q --bank "$bank" \
        --cache "$cache" attach "$m" --socket "$sock" --json >"$T/$tag.json" 2>"$T/$tag.err") &
    ATT_PID[$tag]=$!
    for ((i = 0; i < 3000; i++)); do
        [[ -S $sock ]] && return 0
        kill -0 "${ATT_PID[$tag]}" 2>/dev/null || die "attach $tag exited: $(cat "$T/$tag.err")"
        sleep 0.02
    done
    die "attach $tag did not serve"
}
attach_stop() { # attach_stop TAG: SIGTERM, which checks the session in
    kill -TERM "${ATT_PID[$1]}"
    wait "${ATT_PID[$1]}" || die "attach $1 failed: $(cat "$T/$1.err")"
}
declare -A ATT_PID SECS
boot() { # boot TAG STATION MACHINE CACHE: a boot through attach; SECS[TAG], $T/TAG.json
    local s e
    attach_start "$1" "$2" "$3" "$4"
    s=$(now)
    qemu_boot "driver=raw,file.driver=nbd,file.server.type=unix,file.server.path=$T/$1.sock,if=virtio" "$T/$1.console"
    e=$(now)
    SECS[$1]=$(calc "$e - $s")
    attach_stop "$1"
    log "  $1: $(printf %.1f "${SECS[$1]}") s, $(stats_of "$1")"
}
stats_of() { # one line of a boot's statistics
    printf 'fetched %s MiB (%s chunks), waited on %s misses (%.1f s), prefetch hits %s, working set stored %s' \
        "$(calc "$(jget "$T/$1.json" stats.bytes_fetched) / 1048576" | xargs printf %.1f)" \
        "$(jget "$T/$1.json" stats.chunks_fetched)" "$(jget "$T/$1.json" stats.misses_waited)" \
        "$(jget "$T/$1.json" stats.miss_wait_seconds)" "$(jget "$T/$1.json" stats.prefetch_hits)" \
        "$(jget "$T/$1.json" workset_stored)"
}
row() { # row LABEL TAG: a table row of a boot
    local j=$T/$2.json
    printf '| %s | %.1f | %.1f | %s | %s | %.2f | %s |\n' "$1" "${SECS[$2]}" \
        "$(calc "$(jget "$j" stats.bytes_fetched) / 1048576")" "$(jget "$j" stats.chunks_fetched)" \
        "$(jget "$j" stats.misses_waited)" "$(jget "$j" stats.miss_wait_seconds)" "$(jget "$j" stats.prefetch_hits)"
}
bytes() { jget "$T/$1.json" stats.bytes_fetched; }
misses() { jget "$T/$1.json" stats.misses_waited; }

at_once() { # at_once TAG N PREFIX JOB: stations 1..N attach bench/PREFIXk, run `JOB TAG-k` at the same moment, then check in; SECS[TAG-k]
    local p=$1 n=$2 pre=$3 job=$4 k s
    local -A pids=()
    for ((k = 1; k <= n; k++)); do attach_start "$p-$k" "$k" "bench/$pre$k" "$T/cache-$p-$k"; done
    log "  $n at once ($job)"
    s=$(now)
    for ((k = 1; k <= n; k++)); do
        (
            "$job" "$p-$k"
            calc "$(now) - $s" >"$T/$p-$k.secs"
        ) &
        pids[$k]=$!
    done
    for ((k = 1; k <= n; k++)); do wait "${pids[$k]}" || die "$job $k of $n failed"; done
    for ((k = 1; k <= n; k++)); do
        SECS[$p-$k]=$(cat "$T/$p-$k.secs")
        attach_stop "$p-$k"
        log "  station $k: $(printf %.1f "${SECS[$p-$k]}") s, $(stats_of "$p-$k")"
    done
}
boot_on() { # boot_on TAG: QEMU boots from attach TAG's socket
    qemu_boot "driver=raw,file.driver=nbd,file.server.type=unix,file.server.path=$T/$1.sock,if=virtio" "$T/$1.console"
}

REPORT=$T/report.md
: >"$REPORT"
head_rows() {
    echo "| boot | wall s | MiB fetched | chunks fetched | misses waited | wait s | prefetch hits |"
    echo "|---|---:|---:|---:|---:|---:|---:|"
}

# ---- the local boot (export-then-boot's second half) ---------------------------------
log "a boot from a local copy of the disk (no mbank)"
cp --sparse=always "$DISK" "$T/local.raw"
s=$(now)
qemu_boot "file=$T/local.raw,format=raw,if=virtio" "$T/local.console"
LOCAL_SECS=$(calc "$(now) - $s")
rm -f "$T/local.raw"
log "  local boot: $(printf %.1f "$LOCAL_SECS") s"

# ---- series: cold, cold with the working set, warm, export ---------------------------
for sp in "${SERIES[@]}"; do
    store=${sp%%:*} profile=${sp#*:}
    log "series $store $profile: lab up"
    lab_up "$store" "$profile" 2
    in_st 1 "$MBANK" -q --bank "$URL" create bench/pc --from lab/base >/dev/null
    p=$store-$profile
    boot "$p-cold" 1 bench/pc "$T/cache-$p-1"
    boot "$p-ws" 2 bench/pc "$T/cache-$p-2"
    boot "$p-warm" 1 bench/pc "$T/cache-$p-1"
    s=$(now)
    in_st 1 "$MBANK" -q --bank "$URL" export lab/base "$T/export.raw"
    EXPORT_SECS=$(calc "$(now) - $s")
    rm -f "$T/export.raw"
    log "  export: $(printf %.1f "$EXPORT_SECS") s"
    {
        echo "### $profile, chunks in $store: one station"
        echo
        echo "lab/base: $(human "$DISK_BYTES") disk, $(human "$STORED") in the bank"
        echo
        head_rows
        row "cold, empty cache, no working set" "$p-cold"
        row "cold, empty cache, recorded working set" "$p-ws"
        row "warm cache" "$p-warm"
        printf '| export-then-boot: export %.1f s + local boot %.1f s | %.1f | %.1f | | | | |\n' \
            "$EXPORT_SECS" "$LOCAL_SECS" "$(calc "$EXPORT_SECS + $LOCAL_SECS")" "$(calc "$STORED / 1048576")"
        echo
        printf -- '- export-then-boot bytes / cold boot bytes: **%.1f×** (target ≥ 5); with the working set: %.1f×\n' \
            "$(calc "$STORED / $(bytes "$p-cold")")" "$(calc "$STORED / $(bytes "$p-ws")")"
        printf -- '- misses the guest waited on: cold %s, cold with the working set %s, warm %s (target: cold+ws ≤ 1.5 × warm)\n' \
            "$(misses "$p-cold")" "$(misses "$p-ws")" "$(misses "$p-warm")"
        printf -- '- wall: cold %.1f s, cold+ws %.1f s, warm %.1f s, export-then-boot %.1f s; cold+ws / warm %.2f×\n' \
            "${SECS[$p-cold]}" "${SECS[$p-ws]}" "${SECS[$p-warm]}" "$(calc "$EXPORT_SECS + $LOCAL_SECS")" \
            "$(calc "${SECS[$p-ws]} / ${SECS[$p-warm]}")"
        echo
    } >>"$REPORT"
    lab_end
done

# ---- N stations at the same moment ---------------------------------------------------
for c in "${CONCURRENT[@]}"; do
    store=${c%%:*} rest=${c#*:} profile=${rest%%:*} n=${rest#*:}
    log "concurrent $store $profile, $n stations: lab up"
    lab_up "$store" "$profile" "$n"
    p=conc-$store-$profile-$n
    # The published base's first boot, on the bank's host: it gets its working set.
    boot "$p-first" 0 lab/base "$T/cache-$p-host"
    in_srv "$MBANK" -q --bank "$BANK" admin publish lab/base >/dev/null
    forks "$p" "$n"
    boot "$p-alone" 1 bench/alone "$T/cache-$p-alone"
    at_once "$p" "$n" pc boot_on
    {
        echo "### $profile, chunks in $store: $n stations booting forks of one published base at once"
        echo
        echo "lab/base: $(human "$DISK_BYTES") disk, $(human "$STORED") in the bank; its working set from a first boot on the bank's host"
        echo
        head_rows
        row "first boot of the base (bank's host, no network)" "$p-first"
        row "one station alone" "$p-alone"
        for ((k = 1; k <= n; k++)); do row "station $k of $n" "$p-$k"; done
        echo
        tot=0 maxm=0 maxw=0
        for ((k = 1; k <= n; k++)); do
            tot=$(calc "$tot + $(bytes "$p-$k")")
            m=$(misses "$p-$k")
            ((m > maxm)) && maxm=$m
            w=$(jget "$T/$p-$k.json" stats.miss_wait_seconds)
            maxw=$(calc "if ($w > $maxw) $w else $maxw")
        done
        printf -- '- per station: mean %.1f MiB fetched (alone %.1f: %.2f×); most misses waited %s (alone %s); longest total wait %.1f s (alone %.1f s)\n' \
            "$(calc "$tot / $n / 1048576")" "$(calc "$(bytes "$p-alone") / 1048576")" \
            "$(calc "$tot / $n / $(bytes "$p-alone")")" "$maxm" "$(misses "$p-alone")" "$maxw" \
            "$(jget "$T/$p-alone.json" stats.miss_wait_seconds)"
        echo "- $FORKS_NOTE"
        echo
    } >>"$REPORT"
    lab_end
done

# ---- N stations replaying one boot's reads at the same moment --------------------------
replay() { # replay TAG: the traced boot's reads, in order, over NBD from attach TAG
    qemu-io -f raw "nbd+unix:///?socket=$T/$1.sock" <"$T/reads.qio" >"$T/$1.qio.out" 2>&1 ||
        die "replay $1 failed: $(tail -n 5 "$T/$1.qio.out")"
}
lan_round() { # lan_round TAG N P: N replays at once with stations 1..P serving station 1's cache as their peers
    local p=$1 n=$2 np=$3 k j s addrs=() pids=() all
    read -r -a all <<<"$MBANK_LAB_STATION_ADDRS"
    for ((j = 1; j <= np; j++)); do
        local addr=${all[j - 1]}:7071 cache=$T/cache-$p-alone
        # Peers past the first serve a copy of station 1's cache.
        if ((j > 1)); then
            rm -rf "$T/cache-$p-peer$j"
            cp -a "$T/cache-$p-alone" "$T/cache-$p-peer$j"
            cache=$T/cache-$p-peer$j
        fi
        (exec ip netns exec "$(st_ns "$j")" env XDG_CONFIG_HOME="$T/cfg-$j" "$MBANK" -q --bank "$(url_of "$j")" \
            --cache "$cache" peer --listen "$addr" >"$T/peer$j.out" 2>"$T/peer$j.err") &
        pids+=($!)
        for ((k = 0; k < 600; k++)); do
            grep -q "listening on" "$T/peer$j.out" 2>/dev/null && break
            kill -0 "${pids[j - 1]}" 2>/dev/null || die "mbank peer exited: $(cat "$T/peer$j.err")"
            sleep 0.05
        done
        addrs+=("$addr")
    done
    log "  LAN sharing: station 1's cache served on ${addrs[*]}; $n new forks"
    forks "$p-lan$np" "$n" "l${np}pc"
    PEERS_ENV=$(IFS=,; echo "${addrs[*]}")
    local sent0 sent1
    # Before the attaches: each starts fetching its working set at once.
    sent0=$(sent_bytes)
    local cpu0 cpu1
    cpu0=$(cpu_ticks)
    at_once "$p-lan$np" "$n" "l${np}pc" replay
    PEERS_ENV=
    sent1=$(sent_bytes)
    cpu1=$(cpu_ticks)
    local served=0 nserved=0 tot=0 ntot=0 maxs=0
    for ((j = 1; j <= np; j++)); do
        ip netns exec "$(st_ns "$j")" curl -sS "http://${addrs[j - 1]}/v1/peer/stats" >"$T/peer$j-stats.json" ||
            die "cannot read peer $j's statistics"
        served=$(calc "$served + $(jget "$T/peer$j-stats.json" bytes_served)")
        nserved=$(calc "$nserved + $(jget "$T/peer$j-stats.json" chunks_served)")
        kill -TERM "${pids[j - 1]}" 2>/dev/null || true
        wait "${pids[j - 1]}" 2>/dev/null || true
    done
    p=$p-lan$np
    for ((k = 1; k <= n; k++)); do
        tot=$(calc "$tot + $(bytes "$p-$k")")
        ntot=$(calc "$ntot + $(jget "$T/$p-$k.json" stats.chunks_fetched)")
        maxs=$(calc "if (${SECS[$p-$k]} > $maxs) ${SECS[$p-$k]} else $maxs")
    done
    p=${p%-lan$np}
    {
        echo "#### The same with LAN sharing: station 1's cache (of its replay alone) served by $np peer(s) (stations 1..$np), every station naming them all"
        echo
        head_rows
        for ((k = 1; k <= n; k++)); do row "station $k of $n (replay, LAN sharing)" "$p-lan$np-$k"; done
        echo
        printf -- '- per station: mean %.1f MiB fetched (alone %.1f: %.2f×); slowest replay %.1f s; the peers sent %.1f MiB (compressed) of the %.1f MiB (plain) the stations fetched (%.0f%% of the chunks): the bank server sent %.1f MiB (its metrics) and used %.1f CPU-s\n' \
            "$(calc "$tot / $n / 1048576")" "$(calc "$(bytes "$p-alone") / 1048576")" \
            "$(calc "$tot / $n / $(bytes "$p-alone")")" "$maxs" "$(calc "$served / 1048576")" \
            "$(calc "$tot / 1048576")" "$(calc "100 * $nserved / $ntot")" "$(calc "($sent1 - $sent0) / 1048576")" "$(calc "($cpu1 - $cpu0) / $TICKS")"
        echo
    } >>"$REPORT"
}
PEERS_ENV=
for c in "${REPLAY[@]}"; do
    IFS=: read -r store profile n opt <<<"$c"
    log "replay $store $profile, $n stations: lab up"
    lab_up "$store" "$profile" "$n"
    p=replay-$store-$profile-$n
    boot "$p-first" 0 lab/base "$T/cache-$p-host"
    in_srv "$MBANK" -q --bank "$BANK" admin publish lab/base >/dev/null
    forks "$p" "$n"
    in_st 1 "$MBANK" -q --bank "$URL" create bench/traced --from lab/base >/dev/null
    # QEMU appends to a trace file: each round traces into a new one.
    rm -f "$T/boot.trace"
    QEMU_EXTRA=(-trace "enable=blk_co_preadv,file=$T/boot.trace")
    boot "$p-traced" 1 bench/traced "$T/cache-$p-traced"
    QEMU_EXTRA=()
    python3 - "$T/boot.trace" >"$T/reads.qio" <<'PY'
import re, sys
for line in open(sys.argv[1]):
    m = re.search(r"blk_co_preadv .* offset (\d+) bytes (\d+)", line)
    if m:
        print(f"read -q {m.group(1)} {m.group(2)}")
PY
    nreads=$(wc -l <"$T/reads.qio")
    ((nreads > 0)) || die "the traced boot recorded no reads ($T/boot.trace)"
    log "  the traced boot read $nreads times"
    attach_start "$p-alone" 1 bench/alone "$T/cache-$p-alone"
    s=$(now)
    replay "$p-alone"
    SECS[$p-alone]=$(calc "$(now) - $s")
    attach_stop "$p-alone"
    log "  alone: $(printf %.1f "${SECS[$p-alone]}") s, $(stats_of "$p-alone")"
    # Before the attaches: each starts fetching its working set at once.
    sent0=$(sent_bytes)
    cpu0=$(cpu_ticks)
    at_once "$p" "$n" pc replay
    # After the check-ins.
    sent1=$(sent_bytes)
    cpu1=$(cpu_ticks)
    {
        echo "### $profile, chunks in $store: $n stations replaying one boot's $nreads disk reads at once (no QEMU)${BENCH_BOOT_UPLINK:+, server uplink $BENCH_BOOT_UPLINK}"
        echo
        echo "lab/base: $(human "$DISK_BYTES") disk, $(human "$STORED") in the bank; its working set from a first boot on the bank's host; the reads traced from one QEMU boot of a fork on station 1"
        echo
        head_rows
        row "first boot of the base (bank's host, no network; QEMU)" "$p-first"
        row "the traced boot (station 1, QEMU)" "$p-traced"
        row "one station alone (replay)" "$p-alone"
        for ((k = 1; k <= n; k++)); do row "station $k of $n (replay)" "$p-$k"; done
        echo
        tot=0 maxm=0 maxw=0 maxs=0
        for ((k = 1; k <= n; k++)); do
            tot=$(calc "$tot + $(bytes "$p-$k")")
            m=$(misses "$p-$k")
            ((m > maxm)) && maxm=$m
            w=$(jget "$T/$p-$k.json" stats.miss_wait_seconds)
            maxw=$(calc "if ($w > $maxw) $w else $maxw")
            maxs=$(calc "if (${SECS[$p-$k]} > $maxs) ${SECS[$p-$k]} else $maxs")
        done
        printf -- '- per station: mean %.1f MiB fetched (alone %.1f: %.2f×); most misses waited %s (alone %s); longest total wait %.1f s (alone %.1f s); slowest replay %.1f s (alone %.1f s)\n' \
            "$(calc "$tot / $n / 1048576")" "$(calc "$(bytes "$p-alone") / 1048576")" \
            "$(calc "$tot / $n / $(bytes "$p-alone")")" "$maxm" "$(misses "$p-alone")" "$maxw" \
            "$(jget "$T/$p-alone.json" stats.miss_wait_seconds)" "$maxs" "${SECS[$p-alone]}"
        printf -- '- the bank server%s sent %.1f MiB from the start of the %s sessions to their check-ins (its metrics: chunks as stored, indexes, answers) and used %.1f CPU-s%s\n' \
            "$( ((SERVERS > 1)) && echo "s ($SERVERS, one bank in PostgreSQL)")" \
            "$(calc "($sent1 - $sent0) / 1048576")" "$n" "$(calc "($cpu1 - $cpu0) / $TICKS")" \
            "${BENCH_BOOT_SERVE_ARGS:+; serve $BENCH_BOOT_SERVE_ARGS}"
        echo "- $FORKS_NOTE"
        echo
    } >>"$REPORT"
    if [[ ${opt:-} == peers* ]]; then
        for np in ${BENCH_BOOT_PEERS:-1}; do lan_round "$p" "$n" "$np"; done
    fi
    lab_end
done

{
    echo "## Lab network: cold boots of the root-disk guest"
    echo
    echo "- $(date -u '+%F %H:%M UTC'); $note; uptime at start: $uptime_start; at end: $(uptime | sed 's/^ *//')"
    echo "- ${MBANK_NOTE:-mbank $MBANK}; $(nproc) cores; stations, server, Garage and every QEMU (TCG) on this machine"
    echo "- disk: root.raw + $USER_MIB MiB of user files the boot never reads; a boot from a local copy took $(printf %.1f "$LOCAL_SECS") s"
    echo
    cat "$REPORT"
} | tee "$CACHE_DIR/results/bench-lab-boot.md"
