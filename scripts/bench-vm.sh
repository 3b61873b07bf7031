#!/usr/bin/env bash
# Suspend and resume of a virtual PC (`mbank run` / `mbank suspend`), for guests of
# 256 MiB, 1 GiB and 2 GiB (BENCH_VM_SIZES, in MiB). For each size, in one run:
#
#   1. create a machine (the test guest from scripts/build-guest.sh, a 64 MiB ext4 disk);
#   2. run it on station A; in its shell, fill a quarter of its memory with random data
#      (a working set that is neither zero nor shared);
#   3. first suspend on A: time, memory stream size, bytes sent to the bank;
#   4. resume on station B (an empty cache): time until the guest runs again;
#   5. a little work (4 MiB more random data), second suspend: time and bytes sent.
#
# The peer for bytes is QEMU's own migration stream (what `migrate` to a file writes,
# measured by mbank as it passes): "sent / stream" is what content-defined chunking,
# zero runs, deduplication and zstd save. Under TCG (KVM does not nest here).
#
#   scripts/bench-vm.sh            prints a table on stdout, progress on stderr
set -euo pipefail
cd "$(dirname "$0")/.."
root=$PWD
# shellcheck source=scripts/lib.sh
source scripts/lib.sh

sizes=${BENCH_VM_SIZES:-256 1024 2048}
build_mbank "$root"
eval "$(scripts/build-guest.sh build)"
work=
make_tmp work
note=$(load_note)

# fifo_shell NAME: a FIFO for a run's console input, kept open on fd 3 by the caller.
console_line() { printf '%s\n' "$1" >&3; }

wait_for() { # FILE PATTERN PID
    local n=0
    until grep -qa -- "$2" "$1" 2>/dev/null; do
        kill -0 "$3" 2>/dev/null || die "mbank run exited before '$2' (see $1)"
        sleep 0.2
        n=$((n + 1))
        ((n < 3000)) || die "no '$2' after 600 s"
    done
}

# The JSON report `run --json` prints after the console output.
json_of() { tr -d '\r' <"$1"; }
field() {
    python3 -c 'import json,sys; s=sys.stdin.read(); d=json.loads(s[s.rfind("{\n  \""):]); print(eval("d"+sys.argv[1]))' "$1"
}

# start_run DIR STATION [ARGS...]: `mbank run --console --json` of bench/pc on the
# station's cache in the background, its console input on fd 3; sets pid.
start_run() {
    local d=$1 st=$2
    shift 2
    mkfifo "$d/in$st"
    "$MBANK" --cache "$d/cache$st" run bench/pc --console --json "$@" \
        <"$d/in$st" >"$d/run$st.out" 2>"$d/run$st.err" &
    pid=$!
    exec 3>"$d/in$st"
}

# suspend_row DIR STATION SIZE STEP RESUME: suspend, wait for the run, print a row.
suspend_row() {
    local d=$1 st=$2 t0 t1 j stream sent
    t0=$(now)
    "$MBANK" --cache "$d/cache$st" -q suspend bench/pc >/dev/null
    t1=$(now)
    exec 3>&-
    wait "$pid" || die "run on $st failed: $(cat "$d/run$st.err")"
    j=$(json_of "$d/run$st.out")
    stream=$(field '["memory_saved"]["bytes"]' <<<"$j")
    sent=$(field '["memory_saved"]["bytes_stored"]' <<<"$j")
    printf '%-7s %-10s %10.2f %12s %12s %8.3f %10s\n' "$3" "$4" "$(echo "$t1 - $t0" | bc)" \
        "$(human "$stream")" "$(human "$sent")" "$(echo "$sent / $stream" | bc -l)" "$5"
}

printf '# %s\n# %s\n' "$note" "${MBANK_NOTE:-mbank $(git -C "$root" rev-parse --short HEAD)}"
printf '%-7s %-10s %10s %12s %12s %8s %10s\n' memory step seconds stream sent sent/str resume_s
for mib in $sizes; do
    log "guest of $mib MiB"
    d=$work/m$mib
    mkdir -p "$d"
    export MBANK_BANK=$d/bank
    "$MBANK" -q init
    scripts/build-guest.sh mkfs "$d/disk.raw" 64 >/dev/null 2>&1
    "$MBANK" -q create bench/pc --image "$d/disk.raw" --memory "${mib}M" --network none \
        --display none --kernel "$KERNEL" --initrd "$INITRD" \
        --append "console=ttyS0 panic=-1 quiet" >/dev/null

    # Station A: boot, fill memory, first suspend.
    start_run "$d" A --accel tcg --append mbank.job=shell
    wait_for "$d/runA.out" "exit it to power off" "$pid"
    console_line "dd if=/dev/urandom of=/fill bs=1M count=$((mib / 4)) 2>/dev/null; echo FILLED-\$((40+2))"
    wait_for "$d/runA.out" "FILLED-42" "$pid"
    suspend_row "$d" A "${mib}M" suspend-1 -

    # Station B (empty cache): resume, a little work, second suspend.
    t0=$(now)
    start_run "$d" B
    wait_for "$d/runB.err" "resumed bench/pc" "$pid"
    resume=$(echo "$(now) - $t0" | bc)
    console_line "dd if=/dev/urandom of=/fill2 bs=1M count=4 2>/dev/null; echo WORKED-\$((40+2))"
    wait_for "$d/runB.out" "WORKED-42" "$pid"
    suspend_row "$d" B "${mib}M" suspend-2 "$(printf '%.2f' "$resume")"
    rm -rf "$d"
done
