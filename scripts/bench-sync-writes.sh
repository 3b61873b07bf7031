#!/usr/bin/env bash
# Synced random writes (a command, not a test): `mbank attach` against qemu-nbd on the
# same data, as a guest that syncs (dpkg, databases, editors) writes. fio's nbd engine
# writes 4 KiB blocks at random offsets, each block once (fio's random map), with an NBD
# FLUSH after every 8 writes (--fsync=8), one request in flight. Each round starts a
# fresh session (`attach --discard`) and a fresh sparse copy of the image for qemu-nbd,
# so every write lands on a block never written before; mbank and qemu-nbd are measured
# back to back, alternating which goes first. Prints each round and the ratio
# mbank / qemu-nbd. Target (issue 14): >= 1.0x.
#
# Data: base.raw from scripts/bench-data.sh. Env: MBANK (binary), BENCH_FIO_SECONDS
# (default 10), BENCH_ROUNDS (default 3), BENCH_QD (default 1), BENCH_FSYNC (default 8).
set -euo pipefail
# shellcheck source=scripts/lib.sh
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"
REPO_ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
FIO_SECONDS=${BENCH_FIO_SECONDS:-10}
ROUNDS=${BENCH_ROUNDS:-3}
QD=${BENCH_QD:-1}
FSYNC=${BENCH_FSYNC:-8}

need fio
need qemu-nbd qemu-utils
need bc
"$REPO_ROOT/scripts/bench-data.sh" >&2
build_mbank "$REPO_ROOT"
make_tmp T
note=$(load_note)

DISK=$BENCH_DIR/base.raw
size=$(stat -c %s "$DISK")
BANK=$T/bank CACHE=$T/cache SOCK=$T/mbank.sock QSOCK=$T/qemu.sock
"$MBANK" -q --bank "$BANK" init
"$MBANK" -q --bank "$BANK" import bench/disk "$DISK" >/dev/null
MURI="nbd+unix:///?socket=$SOCK" QURI="nbd+unix:///?socket=$QSOCK"

attach_start() {
    rm -f "$SOCK"
    "$MBANK" -q --bank "$BANK" --cache "$CACHE" attach bench/disk --socket "$SOCK" --discard &
    ATTACH_PID=$!
    for _ in $(seq 600); do [[ -S $SOCK ]] && return 0; sleep 0.1; done
    die "attach did not start"
}
attach_stop() { kill -INT "$ATTACH_PID"; wait "$ATTACH_PID" || true; ATTACH_PID=; }
qemu_start() {
    rm -f "$QSOCK"
    cp --sparse=always "$DISK" "$T/q.raw"
    sync
    qemu-nbd -f raw --socket "$QSOCK" --persistent --shared=8 "$T/q.raw" &
    QPID=$!
    for _ in $(seq 100); do [[ -S $QSOCK ]] && return 0; sleep 0.1; done
    die "qemu-nbd did not start"
}
qemu_stop() { kill "$QPID"; wait "$QPID" 2>/dev/null || true; QPID=; rm -f "$T/q.raw"; }
cleanup() {
    [[ -z ${QPID:-} ]] || kill "$QPID" 2>/dev/null || true
    [[ -z ${ATTACH_PID:-} ]] || kill "$ATTACH_PID" 2>/dev/null || true
}
at_exit cleanup
fio_iops() { # fio_iops URI
    (cd "$T" && fio --name=s --ioengine=nbd --uri="$1" --rw=randwrite --bs=4k --iodepth="$QD" \
        --fsync="$FSYNC" --size="$size" --time_based --runtime="$FIO_SECONDS" --randrepeat=1 \
        --output-format=json 2>/dev/null) | sed -n "/^{/,\$p" |
        python3 -c 'import json,sys; j=json.load(sys.stdin)["jobs"][0]; print(int(j["write"]["iops"]))'
}
ratio() { printf '%.2f' "$(echo "scale=4; $1 / $2" | bc -l)"; }

log "synced random writes: attach vs qemu-nbd, $ROUNDS rounds"
M="" Q="" R=""
for ((r = 1; r <= ROUNDS; r++)); do
    qemu_start
    attach_start
    if ((r % 2)); then m=$(fio_iops "$MURI"); q=$(fio_iops "$QURI")
    else q=$(fio_iops "$QURI"); m=$(fio_iops "$MURI"); fi
    M+="$m " Q+="$q " R+="$(ratio "$m" "$q") "
    log "  round $r: mbank $m IOPS, qemu-nbd $q IOPS, ratio $(ratio "$m" "$q")"
    attach_stop
    qemu_stop
done
median() { tr ' ' '\n' | grep . | sort -g | awk '{a[NR]=$1} END {print a[int((NR+1)/2)]}'; }
range() { tr ' ' '\n' | grep . | sort -g | awk 'NR==1{lo=$1} {hi=$1} END {printf "%s–%s", lo, hi}'; }
mkdir -p "$CACHE_DIR/results"
{
    echo "## Station: synced random writes"
    echo
    echo "- $note; ${MBANK_NOTE:-mbank $MBANK}; disk: base.raw ($((size >> 20)) MiB), 64 KiB chunks"
    echo "- fio nbd engine, 4 KiB random writes onto never-written blocks, FLUSH every $FSYNC, qd $QD, ${FIO_SECONDS} s; fresh session per round"
    echo
    echo "| mbank attach (IOPS) | qemu-nbd (IOPS) | median ratio | ratios | per round (mbank / qemu-nbd) |"
    echo "|---:|---:|---:|---:|---|"
    echo "| $(median <<<"$M") | $(median <<<"$Q") | $(median <<<"$R") | $(range <<<"$R") | $(paste -d/ <(tr ' ' '\n' <<<"$M" | grep .) <(tr ' ' '\n' <<<"$Q" | grep .) | tr '\n' ' ') |"
} | tee "$CACHE_DIR/results/bench-sync-writes.md"
