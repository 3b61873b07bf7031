#!/usr/bin/env bash
# Station benchmarks (a command, not a test), each printing a ratio from one run:
#
# 1. Warm-cache reads through `mbank attach` against qemu-nbd serving a raw file of the
#    same content: sequential (nbdcopy to null) and 4 KiB random read and write (fio's
#    nbd engine). Target: >= 0.9x qemu-nbd.
# 2. Check-in after a session that changed 1% of a 4 GiB disk against restic backup,
#    borg create and rsync of the whole image after the same change. Target: >= 20x
#    faster; bytes sent <= 1.1x the compressed changed chunks.
#
# Data: the 4 GiB disk is base.raw followed by v2.raw from scripts/bench-data.sh.
# Env: MBANK (binary), BENCH_SKIP_PEERS=1 (no restic/borg/rsync), BENCH_FIO_SECONDS
# (default 10), BENCH_ROUNDS (default 3): the warm-read comparison runs this many
# rounds, each a fresh `attach --discard` session warmed by one full read, with mbank
# and qemu-nbd measured back to back (alternating which goes first) so both see the
# same load; it prints the median of each and the range of the per-round ratios.
set -euo pipefail
# shellcheck source=scripts/lib.sh
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"
REPO_ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
FIO_SECONDS=${BENCH_FIO_SECONDS:-10}
ROUNDS=${BENCH_ROUNDS:-3}

need nbdcopy libnbd-bin
need fio
need qemu-nbd qemu-utils
need restic
need borg borgbackup
need rsync
need zstd
need bc
"$REPO_ROOT/scripts/bench-data.sh" >&2
build_mbank "$REPO_ROOT"
make_tmp T
note=$(load_note)

# ---- data: a 4 GiB disk of real content ------------------------------------------
DISK=$BENCH_DIR/disk4g.raw
if [[ ! -f $DISK ]]; then
    log "building $DISK (base.raw + v2.raw, sparse)"
    cp --sparse=always "$BENCH_DIR/base.raw" "$DISK.tmp"
    dd if="$BENCH_DIR/v2.raw" of="$DISK.tmp" bs=1M seek=2048 conv=sparse,notrunc status=none
    mv "$DISK.tmp" "$DISK"
fi

BANK=$T/bank CACHE=$T/cache SOCK=$T/mbank.sock QSOCK=$T/qemu.sock
"$MBANK" -q --bank "$BANK" init
"$MBANK" -q --bank "$BANK" import bench/disk "$DISK" >/dev/null

attach_start() { # [--discard]: starts attach in the background, waits for the socket
    rm -f "$SOCK"
    "$MBANK" -q --bank "$BANK" --cache "$CACHE" attach bench/disk --socket "$SOCK" --json "$@" >"$T/attach.json" &
    ATTACH_PID=$!
    for _ in $(seq 600); do [[ -S $SOCK ]] && return 0; sleep 0.1; done
    die "attach did not start"
}
attach_stop() {
    kill -INT "$ATTACH_PID"
    wait "$ATTACH_PID"
}
secs() { local s e; s=$(date +%s.%N); "$@" >/dev/null; e=$(date +%s.%N); echo "$e - $s" | bc -l; }
fio_iops() { # fio_iops URI rw
    fio --name=b --ioengine=nbd --uri="$1" --rw="$2" --bs=4k --iodepth=32 --direct=1 \
        --size=4g --time_based --runtime="$FIO_SECONDS" --randrepeat=1 --output-format=json 2>/dev/null | sed -n "/^{/,\$p" |
        python3 -c 'import json,sys; j=json.load(sys.stdin)["jobs"][0]; print(int(j["read"]["iops"]+j["write"]["iops"]))'
}
ratio() { printf '%.2f' "$(echo "scale=4; $1 / $2" | bc -l)"; }
json_field() { python3 -c 'import json,sys; print(json.load(open(sys.argv[1]))[sys.argv[2]])' "$T/attach.json" "$1"; }

# ---- 1. warm-cache reads -----------------------------------------------------------
log "1. warm-cache reads: attach vs qemu-nbd, $ROUNDS rounds"
size=$(stat -c %s "$DISK")
MURI="nbd+unix:///?socket=$SOCK" QURI="nbd+unix:///?socket=$QSOCK"
qemu_start() { # qemu-nbd on a fresh copy (random writes fill holes, which later reads
    # would then have to read: each round starts both sides from the same content)
    rm -f "$QSOCK"
    cp --sparse=always "$DISK" "$T/q.raw"
    cat "$T/q.raw" >/dev/null
    qemu-nbd -f raw --socket "$QSOCK" --persistent --shared=8 "$T/q.raw" &
    QPID=$!
    for _ in $(seq 100); do [[ -S $QSOCK ]] && break; sleep 0.1; done
    nbdcopy "$QURI" null: # warm
}
qemu_stop() {
    kill "$QPID"
    wait "$QPID" 2>/dev/null || true
    QPID=
    rm -f "$T/q.raw"
}
qemu_kill() { [[ -z ${QPID:-} ]] || kill "$QPID"; }
at_exit qemu_kill
measure() { # measure WORKLOAD URI: MiB/s for seq, IOPS for rr / rw
    case $1 in
        seq) echo "scale=0; $size / 1048576 / $(secs nbdcopy "$2" null:)" | bc -l ;;
        rr) fio_iops "$2" randread ;;
        rw) fio_iops "$2" randwrite ;;
    esac
}
declare -A MB Q R
for ((r = 1; r <= ROUNDS; r++)); do
    qemu_start
    attach_start --discard
    nbdcopy "$MURI" null: # warm: the station cache, and this process's first verification
    for w in seq rr rw; do
        if ((r % 2)); then m=$(measure $w "$MURI"); q=$(measure $w "$QURI")
        else q=$(measure $w "$QURI"); m=$(measure $w "$MURI"); fi
        MB[$w]+="$m " Q[$w]+="$q " R[$w]+="$(ratio "$m" "$q") "
        log "  round $r $w: mbank $m, qemu-nbd $q"
    done
    attach_stop
    qemu_stop
done
median() { tr ' ' '\n' | grep . | sort -g | awk '{a[NR]=$1} END {print a[int((NR+1)/2)]}'; }
range() { tr ' ' '\n' | grep . | sort -g | awk 'NR==1{lo=$1} {hi=$1} END {printf "%s–%s", lo, hi}'; }

# ---- 2. check-in after changing 1% ------------------------------------------------
log "2. check-in of a 1% change"
CHANGE=$T/change.bin
head -c $((size / 100)) /dev/urandom >"$CHANGE" # 1% of the disk, random data
nchunks=$((size / 100 / 65536))
attach_start
# Write the change as 64 KiB pieces spread over the disk (every 100th chunk).
/usr/bin/python3 - "$SOCK" "$CHANGE" "$nchunks" <<'PY'
import sys, subprocess
sock, change, n = sys.argv[1], sys.argv[2], int(sys.argv[3])
data = open(change, "rb").read()
import nbd
h = nbd.NBD(); h.connect_unix(sock)
for i in range(n):
    h.pwrite(data[i*65536:(i+1)*65536], i * 100 * 65536)
h.flush(); h.shutdown()
PY
s=$(date +%s.%N); attach_stop; e=$(date +%s.%N)
checkin_total=$(echo "$e - $s" | bc -l)
mb_checkin=$(json_field checkin_seconds)
mb_sent=$(json_field bytes_uploaded)
mb_chunks=$(json_field chunks_uploaded)
V1=$(json_field version)
"$MBANK" -q --bank "$BANK" export "bench/disk@${V1:0:8}" "$T/new.raw"
# The compressed size of exactly the changed chunks, for the bytes-sent target.
changed=$(python3 -c '
import sys, subprocess
f = open(sys.argv[1], "rb"); n = int(sys.argv[2]); tot = 0
for i in range(n):
    f.seek(i * 100 * 65536); c = f.read(65536)
    p = subprocess.run(["zstd", "-3", "-c", "-q"], input=c, capture_output=True).stdout
    tot += min(len(p), len(c)) + 16
print(tot)' "$T/new.raw" "$nchunks" 2>/dev/null || echo 0)

peer() { # peer NAME first-cmd second-cmd  (second is timed)
    bash -c "$2" >/dev/null 2>&1
    drop_caches || true
    local s e; s=$(date +%s.%N); bash -c "$3" >/dev/null 2>&1; e=$(date +%s.%N)
    echo "$e - $s" | bc -l
}
results=()
if [[ -z ${BENCH_SKIP_PEERS:-} ]]; then
    export RESTIC_PASSWORD=bench
    cp --sparse=always "$DISK" "$T/img.raw"
    r_t=$(peer restic "restic init -q -r $T/restic && restic -q -r $T/restic backup $T/img.raw" \
        "cp --sparse=always $T/new.raw $T/img.raw && restic -q -r $T/restic backup $T/img.raw")
    cp --sparse=always "$DISK" "$T/img.raw"
    b_t=$(peer borg "borg init -e none $T/borg && borg create $T/borg::a $T/img.raw" \
        "cp --sparse=always $T/new.raw $T/img.raw && borg create $T/borg::b $T/img.raw")
    cp --sparse=always "$DISK" "$T/dst.raw"
    x_t=$(peer rsync "true" "rsync --inplace --no-whole-file $T/new.raw $T/dst.raw")
    results=("restic backup|$r_t" "borg create|$b_t" "rsync --inplace|$x_t")
    # the copy of new.raw into img.raw is inside the timed restic/borg steps: subtract it
    cp_t=$(peer cp "true" "cp --sparse=always $T/new.raw $T/img2.raw")
fi

{
    echo "## Station: warm reads and check-in"
    echo
    echo "- $note; ${MBANK_NOTE:-mbank $MBANK}; disk: 4 GiB (base.raw + v2.raw), 64 KiB chunks"
    echo
    echo "Warm reads, $ROUNDS rounds (median of each; ratio = mbank / qemu-nbd per round):"
    echo
    echo "| workload | mbank attach | qemu-nbd | median ratio | ratios |"
    echo "|---|---:|---:|---:|---:|"
    declare -A names=([seq]="sequential, nbdcopy (MiB/s)" [rr]="4 KiB random read, fio qd32 (IOPS)" [rw]="4 KiB random write, fio qd32 (IOPS)")
    for w in seq rr rw; do
        echo "| ${names[$w]} | $(median <<<"${MB[$w]}") | $(median <<<"${Q[$w]}") | $(median <<<"${R[$w]}") | $(range <<<"${R[$w]}") |"
    done
    echo
    echo "Check-in after writing $nchunks chunks ($((size / 100 / 1048576)) MiB, 1% of the disk):"
    echo "mbank check-in ${mb_checkin} s (SIGINT to exit ${checkin_total} s), sent $mb_sent bytes in $mb_chunks chunks;"
    echo "compressed changed chunks (zstd -3 + 16-byte header): $changed bytes; ratio sent/changed: $(ratio "$mb_sent" "${changed:-1}")"
    echo
    if ((${#results[@]})); then
        echo "| peer, whole image after the change | s | mbank check-in faster by |"
        echo "|---|---:|---:|"
        for r in "${results[@]}"; do
            IFS='|' read -r name t <<<"$r"
            case $name in restic*|borg*) t=$(echo "$t - $cp_t" | bc -l) ;; esac
            printf '| %s | %.2f | %.1fx |\n' "$name" "$t" "$(ratio "$t" "$mb_checkin")"
        done
    fi
} | tee "$CACHE_DIR/results/bench-station.md"
