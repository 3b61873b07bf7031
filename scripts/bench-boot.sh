#!/usr/bin/env bash
# Boot working set benchmark (a command, not a test): how soon a real machine boots from
# a disk in the bank, in one run, each step repeated BENCH_BOOT_ROUNDS times interleaved:
#
#   a. empty cache: `mbank attach` with a fresh, empty --cache, and QEMU booting the
#      guest with its root on the NBD export, until the ready marker; bytes fetched
#   b. warm cache:  the same with the cache (a) left
#   c. local raw:   the same guest booted from a local raw copy of the disk
#   d. copy first:  `mbank export` of the whole disk to a raw file, then boot it
#   f. `mbank run` of a machine made from the same disk (kernel and initrd stored in the
#      bank with it) with an empty station cache, until the ready marker
#   g. the same with the cache (f) left
#
# and prints (d)/(a) and (d)/(f), "how much faster than copying first" (target >= 5x),
# and (b)/(c) and (g)/(c), "warm cache against a local disk" (target <= 1.2x).
#
# Under TCG the guest's CPU time dominates every boot, so (d)/(a) mostly compares boot
# with boot. To see the I/O alone (issue 3's "time to read the boot working set"), one
# untimed boot first records the guest's reads (QEMU trace virtio_blk_handle_read), and
# each round also times
#   e. replay: `mbank attach` with an empty cache, and the recorded reads issued in
#      boot order, one at a time, over NBD (python3-libnbd); against d's export alone.
#
# The guest: scripts/build-guest.sh rootdisk, a Debian 12 root (debootstrap, systemd)
# on a 2 GiB ext4 disk, booted under QEMU TCG with the host's copy of its kernel and the
# test initramfs, which mounts /dev/vda and switch_roots into the disk's systemd. Ready
# is MBANK-GUEST-READY, printed by a unit ordered after multi-user.target.
#
# The bank is a local directory here, so "fetching" is reading and decompressing chunk
# files; the page cache is dropped before (a) and (d), which both read the bank.
# Env: MBANK (binary), BENCH_BOOT_ROUNDS (default 3), BENCH_BOOT_TIMEOUT (seconds per
# boot, default 600), CARGO_TARGET_DIR (where the release binary is built).
set -euo pipefail
# shellcheck source=scripts/lib.sh
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"
REPO_ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
ROUNDS=${BENCH_BOOT_ROUNDS:-3}
BOOT_TIMEOUT=${BENCH_BOOT_TIMEOUT:-600}
READY='MBANK-GUEST-READY'

need bc
need python3
if ! /usr/bin/python3 -c 'import nbd' 2>/dev/null; then # the replay's NBD client (Debian's python)
    log "installing python3-libnbd"
    apt-get update -qq >&2
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends python3-libnbd >&2
fi
guest_paths=$("$REPO_ROOT/scripts/build-guest.sh" rootdisk)
KERNEL=$(sed -n 's/^KERNEL=//p' <<<"$guest_paths")
INITRD=$(sed -n 's/^INITRD=//p' <<<"$guest_paths")
ROOTDISK=$(sed -n 's/^ROOTDISK=//p' <<<"$guest_paths")
[[ -f $KERNEL && -f $INITRD && -f $ROOTDISK ]] || die "build-guest.sh rootdisk printed no paths"
if [[ -z ${MBANK:-} && -n ${CARGO_TARGET_DIR:-} ]]; then
    # lib.sh's build_mbank expects the binary under the repository's target/.
    log "cargo build --release -p mbank (CARGO_TARGET_DIR=$CARGO_TARGET_DIR)"
    (cd "$REPO_ROOT" && cargo build --release -q -p mbank) >&2 || die "cargo build failed"
    MBANK=$CARGO_TARGET_DIR/release/mbank
fi
build_mbank "$REPO_ROOT"
make_tmp T
note=$(load_note)

BANK=$T/bank SOCK=$T/mbank.sock MACHINE=bench/root
log "importing $ROOTDISK into a fresh bank"
"$MBANK" -q --bank "$BANK" init
"$MBANK" -q --bank "$BANK" import --json "$MACHINE" "$ROOTDISK" >"$T/import.json"
V0=$(python3 -c 'import json,sys; print(json.load(open(sys.argv[1]))["version"])' "$T/import.json")
# The same disk as a virtual PC for `mbank run` (f, g): its kernel and initrd in the bank.
"$MBANK" -q --bank "$BANK" create --json bench/pc --image "$ROOTDISK" --memory 256M \
    --network none --display none --kernel "$KERNEL" --initrd "$INITRD" \
    --append "console=ttyS0 panic=-1 mbank.root=/dev/vda" >"$T/create.json"
VPC=$(python3 -c 'import json,sys; print(json.load(open(sys.argv[1]))["version"])' "$T/create.json")

json_field() { python3 -c 'import json,sys; v=json.load(open(sys.argv[1])).get(sys.argv[2]); print("" if v is None else v)' "$1" "$2"; }

# boot DRIVE LOG: boots the guest with its root on DRIVE (a -drive value) and returns
# once it printed the ready marker; the guest then powers off by itself (job ready) and
# wait_guest waits for that.
QEMU_PID=
BOOT_EXTRA=()
boot() {
    : >"$2"
    qemu-system-x86_64 "${BOOT_EXTRA[@]}" -accel tcg -cpu max -m 256 -smp 1 -nodefaults -no-reboot \
        -display none -serial stdio -kernel "$KERNEL" -initrd "$INITRD" \
        -append "console=ttyS0 panic=-1 mbank.job=ready mbank.root=/dev/vda" \
        -drive "$1" </dev/null >"$2" 2>&1 &
    QEMU_PID=$!
    local deadline=$((SECONDS + BOOT_TIMEOUT))
    until grep -qa "$READY" "$2"; do
        if ! kill -0 "$QEMU_PID" 2>/dev/null; then
            tail -n 30 "$2" >&2
            die "QEMU exited before $READY (log above)"
        fi
        ((SECONDS < deadline)) || { tail -n 30 "$2" >&2; die "no $READY within $BOOT_TIMEOUT s"; }
        sleep 0.05
    done
    # Ready from the initramfs itself would mean it ignored mbank.root.
    grep -qa MBANK-SWITCH-ROOT "$2" || die "the guest did not boot from its disk (no MBANK-SWITCH-ROOT)"
}
wait_guest() {
    local deadline=$((SECONDS + 120))
    while kill -0 "$QEMU_PID" 2>/dev/null; do
        ((SECONDS < deadline)) || { kill "$QEMU_PID"; break; }
        sleep 0.1
    done
    wait "$QEMU_PID" 2>/dev/null || true
    QEMU_PID=
}
stop_guest() { if [[ -n $QEMU_PID ]]; then kill "$QEMU_PID" 2>/dev/null || true; fi; }
at_exit stop_guest

ATTACH_PID=
attach_start() { # attach_start CACHE JSON
    rm -f "$SOCK"
    "$MBANK" -q --bank "$BANK" --cache "$1" attach --json "$MACHINE" --socket "$SOCK" >"$2" &
    ATTACH_PID=$!
    local i
    for ((i = 0; i < 6000; i++)); do
        [[ -S $SOCK ]] && return 0
        kill -0 "$ATTACH_PID" 2>/dev/null || die "mbank attach exited early"
        sleep 0.01
    done
    die "mbank attach did not listen on $SOCK"
}
# attach_stop JSON: SIGTERM checks in (the guest wrote its journal, logs, fsck state);
# the new version is removed again so that every session starts from the imported one.
attach_stop() {
    kill -TERM "$ATTACH_PID"
    wait "$ATTACH_PID" || die "mbank attach failed"
    ATTACH_PID=
    local v
    v=$(json_field "$1" version)
    if [[ -n $v ]]; then "$MBANK" -q --bank "$BANK" rm "$MACHINE@$v" >/dev/null; fi
}
stop_attach() { if [[ -n $ATTACH_PID ]]; then kill -TERM "$ATTACH_PID" 2>/dev/null || true; fi; }
at_exit stop_attach

# The boot's reads, recorded once from a local raw copy (untimed): "offset length" lines.
log "recording the boot's reads (one traced boot, untimed)"
cp --sparse=always "$ROOTDISK" "$T/local.raw"
BOOT_EXTRA=(-trace enable=virtio_blk_handle_read -D "$T/reads.trace")
boot "file=$T/local.raw,format=raw,if=virtio" "$T/record.log"
wait_guest
BOOT_EXTRA=()
rm -f "$T/local.raw"
sed -n 's/.*virtio_blk_handle_read .* sector \([0-9]*\) nsectors \([0-9]*\).*/\1 \2/p' "$T/reads.trace" |
    awk '{print $1 * 512, $2 * 512}' >"$T/reads.txt"
read -r n_reads read_bytes < <(awk '{n++; b += $2} END {print n + 0, b + 0}' "$T/reads.txt")
((n_reads > 0)) || die "the traced boot recorded no reads"
read_unique=$(python3 -c '
import sys
s = set()
for l in open(sys.argv[1]):
    o, n = map(int, l.split())
    s.update(range(o // 4096, (o + n + 4095) // 4096))
print(len(s) * 4096)' "$T/reads.txt")
log "the boot read $(human "$read_bytes") in $n_reads requests ($(human "$read_unique") distinct)"
replay() { # replay SOCKET: the recorded reads, in order, one at a time
    /usr/bin/python3 - "$1" "$T/reads.txt" <<'PY2'
import sys, nbd
h = nbd.NBD()
h.connect_unix(sys.argv[1])
for line in open(sys.argv[2]):
    off, n = map(int, line.split())
    h.pread(n, off)
h.shutdown()
PY2
}

# run_boot CACHE LOG: `mbank run` of bench/pc@VPC until ready (echoes seconds); the
# guest then powers off, the session checks in, and that version is removed again.
run_boot() {
    local s e pid deadline=$((SECONDS + BOOT_TIMEOUT))
    s=$(now)
    "$MBANK" --bank "$BANK" --cache "$1" run "bench/pc@${VPC:0:12}" --console --accel tcg --json \
        --append mbank.job=ready </dev/null >"$2" 2>"$2.err" &
    pid=$!
    until grep -qa "$READY" "$2"; do
        kill -0 "$pid" 2>/dev/null || die "mbank run exited before $READY: $(tail -n 5 "$2.err")"
        ((SECONDS < deadline)) || { kill -TERM "$pid"; die "no $READY within $BOOT_TIMEOUT s"; }
        sleep 0.05
    done
    e=$(now)
    grep -qa MBANK-SWITCH-ROOT "$2" || die "the guest did not boot from its disk (no MBANK-SWITCH-ROOT)"
    wait "$pid" || die "mbank run failed: $(tail -n 5 "$2.err")"
    local v
    v=$(python3 -c 'import json,sys; s=open(sys.argv[1]).read(); d=json.loads(s[s.rfind("{\n  \""):]); print(d["session"]["version"] or "")' "$2")
    if [[ -n $v ]]; then "$MBANK" -q --bank "$BANK" rm "bench/pc@$v" >/dev/null; fi
    calc "$e - $s"
}

NBD_DRIVE="driver=raw,file.driver=nbd,file.server.type=unix,file.server.path=$SOCK,if=virtio"
declare -a A B C D DX DB E E_FETCHED FETCHED FETCHED_CHUNKS WARM_FETCHED F G
for ((r = 0; r < ROUNDS; r++)); do
    log "round $((r + 1))/$ROUNDS"
    cache=$T/cache-$r

    # a. empty cache
    drop_caches || log "cannot drop the page cache (not root?)"
    s=$(now)
    attach_start "$cache" "$T/a$r.json"
    boot "$NBD_DRIVE" "$T/a$r.log"
    e=$(now)
    wait_guest
    attach_stop "$T/a$r.json"
    A[r]=$(calc "$e - $s")
    FETCHED[r]=$(json_field "$T/a$r.json" bytes_fetched)
    FETCHED_CHUNKS[r]=$(json_field "$T/a$r.json" chunks_fetched)
    log "  a. empty cache: $(printf %.1f "${A[r]}") s, fetched $(human "${FETCHED[r]}")"

    # b. warm cache (what a left)
    s=$(now)
    attach_start "$cache" "$T/b$r.json"
    boot "$NBD_DRIVE" "$T/b$r.log"
    e=$(now)
    wait_guest
    attach_stop "$T/b$r.json"
    B[r]=$(calc "$e - $s")
    WARM_FETCHED[r]=$(json_field "$T/b$r.json" bytes_fetched)
    log "  b. warm cache: $(printf %.1f "${B[r]}") s, fetched $(human "${WARM_FETCHED[r]}")"
    rm -rf "$cache"

    # c. local raw copy (made untimed; it is in the page cache, the best case)
    cp --sparse=always "$ROOTDISK" "$T/local.raw"
    s=$(now)
    boot "file=$T/local.raw,format=raw,if=virtio" "$T/c$r.log"
    e=$(now)
    wait_guest
    C[r]=$(calc "$e - $s")
    rm -f "$T/local.raw"
    log "  c. local raw: $(printf %.1f "${C[r]}") s"

    # d. copy first: export the whole disk, then boot it
    drop_caches || true
    s=$(now)
    "$MBANK" -q --bank "$BANK" export "$MACHINE@${V0:0:12}" "$T/copy.raw"
    m=$(now)
    boot "file=$T/copy.raw,format=raw,if=virtio" "$T/d$r.log"
    e=$(now)
    wait_guest
    DX[r]=$(calc "$m - $s")
    DB[r]=$(calc "$e - $m")
    D[r]=$(calc "$e - $s")
    rm -f "$T/copy.raw"
    log "  d. copy first: $(printf %.1f "${D[r]}") s (export $(printf %.1f "${DX[r]}") s)"

    # e. replay of the boot's reads through attach, empty cache
    drop_caches || true
    s=$(now)
    attach_start "$T/cache-e$r" "$T/e$r.json"
    replay "$SOCK"
    e=$(now)
    attach_stop "$T/e$r.json"
    E[r]=$(calc "$e - $s")
    E_FETCHED[r]=$(json_field "$T/e$r.json" bytes_fetched)
    rm -rf "$T/cache-e$r"
    log "  e. replay: $(printf %.2f "${E[r]}") s, fetched $(human "${E_FETCHED[r]}")"

    # f, g. mbank run: empty cache, then warm
    drop_caches || true
    F[r]=$(run_boot "$T/cache-f$r" "$T/f$r.out")
    log "  f. mbank run, empty cache: $(printf %.1f "${F[r]}") s"
    G[r]=$(run_boot "$T/cache-f$r" "$T/g$r.out")
    log "  g. mbank run, warm cache: $(printf %.1f "${G[r]}") s"
    rm -rf "$T/cache-f$r"
done

median() { printf '%s\n' "$@" | sort -g | awk '{v[NR] = $1} END {print (NR % 2) ? v[(NR + 1) / 2] : (v[NR / 2] + v[NR / 2 + 1]) / 2}'; }
list() { local x out=; for x in "$@"; do out+="${out:+, }$(printf %.1f "$x")"; done; echo "$out"; }
list2() { local x out=; for x in "$@"; do out+="${out:+, }$(printf %.2f "$x")"; done; echo "$out"; }
ratio() { printf '%.2f' "$(calc "$1 / $2")"; }
mA=$(median "${A[@]}") mB=$(median "${B[@]}") mC=$(median "${C[@]}") mD=$(median "${D[@]}")
mDX=$(median "${DX[@]}") mE=$(median "${E[@]}") mFR=$(median "${F[@]}") mG=$(median "${G[@]}") mF=$(median "${FETCHED[@]}") mFC=$(median "${FETCHED_CHUNKS[@]}")
size=$(stat -c %s "$ROOTDISK")
alloc=$(alloc_of "$ROOTDISK")
stored=$(json_field "$T/import.json" bytes_stored)
chunks=$(json_field "$T/import.json" chunks_total)
zero=$(json_field "$T/import.json" chunks_zero)
nonzero_bytes=$(( (chunks - zero) * $(json_field "$T/import.json" chunk_size) ))
mkdir -p "$CACHE_DIR/results"
{
    echo "## Boot working set"
    echo
    echo "- $note; ${MBANK_NOTE:-mbank $MBANK}; $ROUNDS rounds, interleaved a b c d e; medians, then each round"
    echo "- disk: scripts/build-guest.sh rootdisk, $(human "$size") raw ext4, $(human "$alloc") allocated," \
        "$chunks chunks ($zero zero), $(human "$stored") stored compressed in the bank"
    echo "- guest: QEMU TCG, 1 vCPU, 256 MiB; host kernel + initramfs, root on /dev/vda (Debian 12, systemd) until $READY"
    echo
    echo "| boot until ready | s (median) | rounds | bytes fetched |"
    echo "|---|---:|---|---:|"
    echo "| a. attach, empty cache | $(printf %.1f "$mA") | $(list "${A[@]}") | $(human "$mF") ($mFC chunks) |"
    echo "| b. attach, warm cache | $(printf %.1f "$mB") | $(list "${B[@]}") | $(human "$(median "${WARM_FETCHED[@]}")") |"
    echo "| c. local raw file | $(printf %.1f "$mC") | $(list "${C[@]}") | - |"
    echo "| d. export, then boot the raw file | $(printf %.1f "$mD") | $(list "${D[@]}") | whole disk |"
    echo "| (d: of which export) | $(printf %.1f "$mDX") | $(list "${DX[@]}") | $(human "$nonzero_bytes") |"
    echo "| (d: of which boot) | $(printf %.1f "$(median "${DB[@]}")") | $(list "${DB[@]}") | |"
    echo "| f. mbank run, empty cache | $(printf %.1f "$mFR") | $(list "${F[@]}") | |"
    echo "| g. mbank run, warm cache | $(printf %.1f "$mG") | $(list "${G[@]}") | |"
    echo "| e. replay of the boot's reads, attach, empty cache | $(printf %.2f "$mE") | $(list2 "${E[@]}") | $(human "$(median "${E_FETCHED[@]}")") |"
    echo
    echo "- the boot read $(human "$read_bytes") from its disk in $n_reads requests ($(human "$read_unique") distinct)"
    echo "- empty cache against copying first, I/O only, export (d) / replay (e): $(ratio "$mDX" "$mE")x faster"
    echo "- empty cache against copying first, (d)/(a): $(ratio "$mD" "$mA")x faster (target >= 5x)"
    echo "- warm cache against a local raw file, (b)/(c): $(ratio "$mB" "$mC")x (target <= 1.2x)"
    echo "- mbank run: copying first against an empty cache, (d)/(f): $(ratio "$mD" "$mFR")x (target >= 5x);" \
        "warm cache against a local raw file, (g)/(c): $(ratio "$mG" "$mC")x (target <= 1.2x)"
    echo "- working set: the boot fetched $(human "$mF") of the disk's $(human "$nonzero_bytes") of non-zero chunks" \
        "($(printf %.1f "$(calc "100 * $mF / $nonzero_bytes")")%), plaintext"
} | tee "$CACHE_DIR/results/bench-boot.md"
