#!/usr/bin/env bash
# Lab network benchmark of suspend and resume (a command, not a test; issues 12 and
# 13): a virtual PC suspended on station 1 and resumed on station 2 with an empty
# cache, the bank server across a link shaped by scripts/lab-net.sh, with the whole
# memory stream fetched before the guest runs (eager, the default) or with
# `--lazy-memory` (device state, then RAM chunks fetched as the guest faults).
#
# For each BENCH_RESUME_CASES entry PROFILE:MIB (default "1gbit:256 1gbit:1024
# 100mbit:256 100mbit:1024") and each BENCH_RESUME_MODES entry (default "eager lazy"):
# a lab of 2 stations and a bank in its directory; user `bench` creates bench/pc-MODE
# from station 1 (the test guest of scripts/build-guest.sh, a 64 MiB ext4 disk, MIB of
# memory), runs it (`mbank run --console`, shell job), fills half of its memory with
# random data in its shell, suspends it (timed: `mbank suspend` until it returns);
# then `mbank run` on station 2 (empty cache) resumes it, timed until the run says
# "resumed" (the guest runs again) and until the guest answers a command on its
# console; the bytes station 2 fetched in the first 10 s after its start, or until
# the guest answered if that is later (the session's control socket `stats`: disk,
# memory stream and RAM chunks); then a memory-bound loop, timed twice: the guest reads
# its random half of RAM (`dd` of the tmpfs file to /dev/null), right after the resume
# (lazily: the RAM it has not touched yet comes over the link) and again once warm;
# then the guest writes 4 MiB more random data and
# station 2 suspends it (timed), storing the bytes shown. The floor is the memory's
# bytes in the bank over the link rate.
#
# Mode `lazy-nowb` is `lazy` with the background write-back off (`--writeback-mbit 0`):
# with BENCH_RESUME_SETTLE seconds (default 0) between the fill and the first suspend,
# `lazy` against `lazy-nowb` is the time to leave with the RAM written back while the
# guest ran, against everything sent at the suspend (issue 14).
#
# Env: MBANK (binary; else a release build, in CARGO_TARGET_DIR if set),
# BENCH_RESUME_CASES, BENCH_RESUME_MODES, BENCH_RESUME_SETTLE, BENCH_RESUME_KEEP (a directory: keep each
# run's `--json` output there). TCG; everything on this machine.
set -euo pipefail
# shellcheck source=scripts/lib.sh
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"
REPO_ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
LAB_NET=$REPO_ROOT/scripts/lab-net.sh
read -r -a CASES <<<"${BENCH_RESUME_CASES:-1gbit:256 1gbit:1024 100mbit:256 100mbit:1024}"
read -r -a MODES <<<"${BENCH_RESUME_MODES:-eager lazy}"
SETTLE=${BENCH_RESUME_SETTLE:-0}
[[ $EUID == 0 ]] || die "must run as root (network namespaces)"
need openssl
need qemu-system-x86_64 qemu-system-x86
if [[ -z ${MBANK:-} && -n ${CARGO_TARGET_DIR:-} ]]; then
    (cd "$REPO_ROOT" && cargo build --release -q -p mbank) >&2 || die "cargo build failed"
    MBANK=$CARGO_TARGET_DIR/release/mbank
fi
build_mbank "$REPO_ROOT"
eval "$("$REPO_ROOT/scripts/build-guest.sh" build | grep -E '^(KERNEL|INITRD)=')"
note=$(load_note)
uptime_start=$(uptime | sed 's/^ *//')
# The JSON report `run --json` prints after the console output.
field() {
    python3 -c 'import json,sys; s=open(sys.argv[1]).read().replace("\r",""); d=json.loads(s[s.rfind("{\n  \""):])
for k in sys.argv[2].split("."): d = (d or {}).get(k)
print(d or 0)' "$1" "$2"
}
# Bytes station K's session fetched so far: disk and RAM chunks (its control socket).
fetched_now() {
    python3 - "$T/cache$1" "${XDG_RUNTIME_DIR:-/tmp}" <<'PY'
import glob, json, os, socket, sys
meta = json.load(open(glob.glob(os.path.join(sys.argv[1], "sessions/*/session.json"))[0]))
base = sys.argv[2] if os.path.isdir(sys.argv[2]) else "/tmp"
s = socket.socket(socket.AF_UNIX)
s.connect(os.path.join(base, "mbank-" + meta["session"], "control.sock"))
s.sendall(b"stats\n")
r = json.loads(s.makefile().readline())
print(r["stats"]["bytes_fetched"] + ((r.get("ram") or {}).get("bytes_fetched") or 0))
PY
}

make_tmp T
LAB=mbank-resume-$$
lab_down() { "$LAB_NET" down --name "$LAB" >&2 || true; }
at_exit lab_down
# A RAM file system of a run that died with the bench (the lab's `down` kills it).
unmount_left() { grep -o " $T/[^ ]*" /proc/mounts | xargs -r -n1 umount -l 2>/dev/null || true; }
at_exit unmount_left
SERVER_PID=
serve_stop() {
    [[ -n $SERVER_PID ]] || return 0
    kill -TERM "$SERVER_PID" 2>/dev/null || true
    wait "$SERVER_PID" 2>/dev/null || true
    SERVER_PID=
}
at_exit serve_stop
lab_certs "$T" bench-lab-resume

in_srv() { ip netns exec "$MBANK_LAB_SERVER_NS" "$@"; }
st_ns() { local a; read -r -a a <<<"$MBANK_LAB_STATION_NS"; echo "${a[$1 - 1]}"; }
in_st() { local k=$1; shift; ip netns exec "$(st_ns "$k")" env XDG_CONFIG_HOME="$T/cfg-$k" "$@"; }

wait_for() { # FILE PATTERN PID
    local n=0
    until grep -qa -- "$2" "$1" 2>/dev/null; do
        kill -0 "$3" 2>/dev/null || die "mbank run exited before '$2' (see $1)"
        sleep 0.1
        n=$((n + 1))
        ((n < 6000)) || die "no '$2' after 600 s"
    done
}
console_line() { printf '%s\n' "$1" >&3; }
start_run() { # start_run K MACHINE [ARGS]: `mbank run --console --json` on station K, console on fd 3
    local k=$1 m=$2
    shift 2
    mkfifo "$T/in$k"
    (exec ip netns exec "$(st_ns "$k")" env XDG_CONFIG_HOME="$T/cfg-$k" "$MBANK" --bank "$URL" \
        --cache "$T/cache$k" run "$m" --console --json "$@" <"$T/in$k" >"$T/run$k.out" 2>"$T/run$k.err") &
    pid=$!
    exec 3>"$T/in$k"
}

echo "## Lab network: resume on an empty station" >"$T/report.md"
{
    echo
    echo "- $(date -u '+%F %H:%M UTC'); $note; uptime at start: $uptime_start"
    echo "- ${MBANK_NOTE:-mbank $MBANK}; $(nproc) cores; stations, server and QEMU (TCG) on this machine"
    echo "- $SETTLE s between the fill and the first suspend"
    echo
    echo "| link | guest | path | suspend s | memory in the bank | floor s | resume s (runs) | resume s (answers) | MiB fetched in 10 s | loop s (after resume) | loop s (warm) | suspend after 4 MiB s | MiB stored |"
    echo "|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"
} >>"$T/report.md"
one_run() { # one_run PROFILE MIB MODE
    local profile=$1 mib=$2 mode=$3 lazy=() k loop=()
    case $mode in
    lazy) lazy=(--lazy-memory) ;;
    lazy-nowb) lazy=(--lazy-memory --writeback-mbit 0) ;;
    eager) ;;
    *) die "unknown mode $mode (eager, lazy, lazy-nowb)" ;;
    esac
    local m=bench/pc-$mode
    for k in 1 2; do rm -rf "$T/cache$k" "$T/in$k"; done
    in_st 1 "$MBANK" -q --bank "$URL" create "$m" --image "$T/disk.raw" --memory "${mib}M" \
        --network none --display none --kernel "$KERNEL" --initrd "$INITRD" \
        --append "console=ttyS0 panic=-1 quiet" >/dev/null

    start_run 1 "$m" --accel tcg --append mbank.job=shell "${lazy[@]}"
    wait_for "$T/run1.out" "exit it to power off" "$pid"
        # On a tmpfs of its own: the guest's root, a tmpfs of half its RAM, holds less.
    console_line "mkdir -p /big && mount -t tmpfs -o size=$((mib / 2 + 8))m big /big && dd if=/dev/urandom of=/big/fill bs=1M count=$((mib / 2)) 2>/dev/null && echo FILLED-\$((40+2))"
    wait_for "$T/run1.out" "FILLED-42" "$pid"
    sleep "$SETTLE"
    t0=$(now)
    in_st 1 "$MBANK" -q --bank "$URL" --cache "$T/cache1" suspend "$m" >/dev/null
    suspend_s=$(calc "$(now) - $t0")
    exec 3>&-
    wait "$pid" || die "run on station 1 failed: $(cat "$T/run1.err")"
    stored=$(calc "$(field "$T/run1.out" memory_saved.bytes_stored) + $(field "$T/run1.out" ram_saved.bytes_stored)")
    log "  $mode: suspend $(printf %.2f "$suspend_s") s, memory stored $(human "$stored")"

    t0=$(now)
    start_run 2 "$m" "${lazy[@]}"
    wait_for "$T/run2.err" "resumed $m" "$pid"
    resume_s=$(calc "$(now) - $t0")
    console_line "echo ANSWER-\$((40+2))"
    wait_for "$T/run2.out" "ANSWER-42" "$pid"
    answer_s=$(calc "$(now) - $t0")
    log "  $mode: resume on an empty station: runs after $(printf %.2f "$resume_s") s, answers after $(printf %.2f "$answer_s") s"
    sleep "$(calc "if ($t0 + 10 > $(now)) $t0 + 10 - $(now) else 0")"
    fetched=$(fetched_now 2)
    for k in 1 2; do
        t1=$(now)
        console_line "dd if=/big/fill of=/dev/null bs=1M 2>/dev/null && echo LOOP$k-\$((40+2))"
        wait_for "$T/run2.out" "LOOP$k-42" "$pid"
        loop[k]=$(calc "$(now) - $t1")
    done
    log "  $mode: the loop over the random half of RAM: $(printf %.2f "${loop[1]}") s after the resume, $(printf %.2f "${loop[2]}") s warm"
        console_line "dd if=/dev/urandom of=/big/w bs=1M count=4 2>/dev/null && echo WROTE-\$((40+2))"
    wait_for "$T/run2.out" "WROTE-42" "$pid"
    t1=$(now)
    in_st 2 "$MBANK" -q --bank "$URL" --cache "$T/cache2" suspend "$m" >/dev/null
    suspend2_s=$(calc "$(now) - $t1")
    exec 3>&-
    wait "$pid" || die "run on station 2 failed: $(cat "$T/run2.err")"
    if [[ -n ${BENCH_RESUME_KEEP:-} ]]; then
        mkdir -p "$BENCH_RESUME_KEEP"
        cp "$T/run1.out" "$BENCH_RESUME_KEEP/$profile-$mib-$mode-st1.out"
        cp "$T/run2.out" "$BENCH_RESUME_KEEP/$profile-$mib-$mode-st2.out"
    fi
    stored2=$(calc "$(field "$T/run2.out" memory_saved.bytes_stored) + $(field "$T/run2.out" ram_saved.bytes_stored)")
    floor=$(calc "$stored * 8 / $MBANK_LAB_RATE_BIT")
    printf '| %s | %s MiB, %s MiB random | %s | %.2f | %s | %.2f | %.2f | %.2f | %.1f | %.2f | %.2f | %.2f | %.1f |\n' \
        "$profile" "$mib" "$((mib / 2))" "$mode" "$suspend_s" "$(human "$stored")" "$floor" "$resume_s" \
        "$answer_s" "$(calc "$fetched / 1048576")" "${loop[1]}" "${loop[2]}" "$suspend2_s" "$(calc "$stored2 / 1048576")" \
        >>"$T/report.md"
}
for c in "${CASES[@]}"; do
    profile=${c%%:*} mib=${c#*:}
    log "$profile, a $mib MiB guest: lab up"
    eval "$("$LAB_NET" up --name "$LAB" --profile "$profile" --stations 2)"
    BANK=$T/bank-$profile
    rm -rf "$BANK"
    "$MBANK" -q --bank "$BANK" init
    printf 'bench-password-resume\n' | "$MBANK" -q --bank "$BANK" admin user add bench --password-stdin >/dev/null
    : >"$T/serve.out"
    in_srv "$MBANK" -q --bank "$BANK" serve --listen "$MBANK_LAB_SERVER_ADDR:0" \
        --tls-cert "$T/cert.pem" --tls-key "$T/key.pem" >"$T/serve.out" 2>>"$T/serve.log" &
    SERVER_PID=$!
    URL=
    for ((i = 0; i < 600; i++)); do
        URL=$(sed -n 's/^listening on //p' "$T/serve.out")
        [[ -n $URL ]] && break
        sleep 0.05
    done
    [[ -n $URL ]] || die "mbank serve did not say where it listens"
    for k in 1 2; do
        rm -rf "$T/cfg-$k"
        printf 'bench-password-resume\n' | in_st "$k" "$MBANK" -q login "$URL" --user bench \
            --password-stdin --ca-cert "$T/ca.pem" >/dev/null
    done
    "$REPO_ROOT/scripts/build-guest.sh" mkfs "$T/disk.raw" 64 >/dev/null 2>&1
    for mode in "${MODES[@]}"; do one_run "$profile" "$mib" "$mode"; done
    serve_stop
    lab_down
done
echo "- load average at the end: $(cut -d' ' -f1-3 /proc/loadavg)" >>"$T/report.md"
tee "$CACHE_DIR/results/bench-lab-resume.md" <"$T/report.md"
