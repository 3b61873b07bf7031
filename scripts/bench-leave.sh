#!/usr/bin/env bash
# Lab network benchmark of the time to leave (a command, not a test; issue 14): how long
# from the end of a session (SIGINT to `mbank attach`) until its version is safe in the
# bank, after a session that wrote BENCH_LEAVE_MIB MiB (default 1024) over
# BENCH_LEAVE_SECONDS seconds (default 600), with the background write-back on (its
# default cap, 25 Mbit/s) against off (`--writeback-mbit 0`: everything is sent at
# check-in), on a link shaped by scripts/lab-net.sh (BENCH_LEAVE_PROFILE, default
# 100mbit).
#
# Both sessions run at the same time, each on its own station (its own shaped link; the
# server's side is not shaped); they leave one after the other (write-back on first), so
# the run takes BENCH_LEAVE_SECONDS plus both check-ins. Each machine is a 4 GiB disk (512 MiB of data, the rest zero) in a bank
# served over TLS from the server's namespace; a writer (python3 with libnbd) writes incompressible 1 MiB blocks
# at distinct offsets, paced evenly over the period, with a flush every 16 MiB, as a
# guest saving its work would. Then SIGINT; the leave time is until `attach` exits, its
# version committed. Prints what the check-in and the write-back sent (`attach --json`).
# Meanwhile a reader on each station reads 4 KiB, 5 times a second, each from a chunk of
# the disk's first 512 MiB (random data) not read before: the latency of a guest's read
# miss while the write-back sends, against the other station's idle link.
#
# Env: MBANK (binary; else a release build, in CARGO_TARGET_DIR if set),
# BENCH_LEAVE_MIB, BENCH_LEAVE_SECONDS, BENCH_LEAVE_PROFILE, BENCH_LEAVE_KEEP (a directory
# to copy the sessions' reports and the server's log into).
set -euo pipefail
# shellcheck source=scripts/lib.sh
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"
REPO_ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
LAB_NET=$REPO_ROOT/scripts/lab-net.sh
MIB=${BENCH_LEAVE_MIB:-1024}
READ_MIB=512
SECONDS_=${BENCH_LEAVE_SECONDS:-600}
PROFILE=${BENCH_LEAVE_PROFILE:-100mbit}
[[ $EUID == 0 ]] || die "must run as root (network namespaces)"
((MIB >= 16 && MIB <= 3072)) || die "BENCH_LEAVE_MIB must be 16..3072 (the disk is 4 GiB)"
need openssl
/usr/bin/python3 -c "import nbd" 2>/dev/null || die "python3-libnbd is missing (scripts/setup.sh installs it)"
if [[ -z ${MBANK:-} && -n ${CARGO_TARGET_DIR:-} ]]; then
    (cd "$REPO_ROOT" && cargo build --release -q -p mbank) >&2 || die "cargo build failed"
    MBANK=$CARGO_TARGET_DIR/release/mbank
fi
build_mbank "$REPO_ROOT"
note=$(load_note)
uptime_start=$(uptime | sed 's/^ *//')
field() { python3 -c 'import json,sys; d=json.load(open(sys.argv[1]))
for k in sys.argv[2].split("."): d = d[k]
print(d)' "$1" "$2"; }

make_tmp T
LAB=mbank-leave-$$
lab_down() { "$LAB_NET" down --name "$LAB" >&2 || true; }
at_exit lab_down
PIDS=()
stop_all() {
    local p
    for p in "${PIDS[@]}"; do kill -KILL "$p" 2>/dev/null || true; done
}
at_exit stop_all
lab_certs "$T" bench-leave

log "$PROFILE lab with 2 stations"
eval "$("$LAB_NET" up --name "$LAB" --profile "$PROFILE" --stations 2)"
in_srv() { ip netns exec "$MBANK_LAB_SERVER_NS" "$@"; }
st_ns() { local a; read -r -a a <<<"$MBANK_LAB_STATION_NS"; echo "${a[$1 - 1]}"; }
in_st() { local k=$1; shift; ip netns exec "$(st_ns "$k")" env XDG_CONFIG_HOME="$T/cfg-$k" "$@"; }

BANK=$T/bank
"$MBANK" -q --bank "$BANK" init
printf 'bench-password-leave\n' | "$MBANK" -q --bank "$BANK" admin user add bench --password-stdin >/dev/null
in_srv "$MBANK" --bank "$BANK" serve --listen "$MBANK_LAB_SERVER_ADDR:0" \
    --tls-cert "$T/cert.pem" --tls-key "$T/key.pem" >"$T/serve.out" 2>"$T/serve.log" &
PIDS+=($!)
URL=
for ((i = 0; i < 600; i++)); do
    URL=$(sed -n 's/^listening on //p' "$T/serve.out")
    [[ -n $URL ]] && break
    sleep 0.05
done
[[ -n $URL ]] || die "mbank serve did not say where it listens: $(cat "$T/serve.log")"
# The disk: 4 GiB, its first READ_MIB of random data (what the reader reads), the rest
# zero (where the writer writes). The second import finds every chunk in the bank.
head -c "$((READ_MIB << 20))" /dev/urandom >"$T/base.raw"
truncate -s 4G "$T/base.raw"
for k in 1 2; do
    printf 'bench-password-leave\n' | in_st "$k" "$MBANK" -q login "$URL" --user bench \
        --password-stdin --ca-cert "$T/ca.pem" >/dev/null
done
log "importing the base disk ($READ_MIB MiB of data) through the server"
in_st 1 "$MBANK" -q --bank "$URL" import bench/on "$T/base.raw" >/dev/null
in_st 1 "$MBANK" -q --bank "$URL" import bench/off "$T/base.raw" >/dev/null
rm -f "$T/base.raw"

# The writer: MIB distinct 1 MiB blocks of random data, paced over SECONDS_, a flush
# every 16 MiB and at the end.
cat >"$T/writer.py" <<'EOF'
import os, sys, time, random, nbd
sock, mib, secs = sys.argv[1], int(sys.argv[2]), float(sys.argv[3])
h = nbd.NBD()
h.connect_uri("nbd+unix:///?socket=" + sock)
first = int(sys.argv[4])  # MiB: the writes go past the reader's data
blocks = list(range(first, h.get_size() >> 20))
random.Random(7).shuffle(blocks)
t0 = time.monotonic()
for i, b in enumerate(blocks[:mib]):
    h.pwrite(os.urandom(1 << 20), b << 20)
    if (i + 1) % 16 == 0:
        h.flush()
    ahead = t0 + secs * (i + 1) / mib - time.monotonic()
    if ahead > 0:
        time.sleep(ahead)
h.flush()
h.shutdown()
print(f"wrote {mib} MiB in {time.monotonic() - t0:.1f} s")
EOF
# The reader: 4 KiB reads, each in a chunk not read before (a miss the guest waits on),
# 5 a second for the period; prints the latencies' percentiles in ms as JSON.
cat >"$T/reader.py" <<'EOF'
import json, sys, time, random, nbd
sock, mib, secs = sys.argv[1], int(sys.argv[2]), float(sys.argv[3])
h = nbd.NBD()
h.connect_uri("nbd+unix:///?socket=" + sock)
chunks = list(range(mib * 16))  # 64 KiB chunks
rnd = random.Random(11)
rnd.shuffle(chunks)
n = min(len(chunks), int(secs * 5))
lat = []
t0 = time.monotonic()
for i in range(n):
    off = (chunks[i] << 16) + (rnd.randrange(16) << 12)
    s = time.monotonic()
    h.pread(4096, off)
    lat.append((time.monotonic() - s) * 1000)
    ahead = t0 + secs * (i + 1) / n - time.monotonic()
    if ahead > 0:
        time.sleep(ahead)
h.shutdown()
lat.sort()
q = lambda p: lat[min(len(lat) - 1, int(p * len(lat)))]
print(json.dumps({"reads": n, "p50": q(0.5), "p99": q(0.99), "max": lat[-1],
                  "mean": sum(lat) / n}))
EOF

start_attach() { # K MACHINE EXTRA...: attach on station K, its socket T/sK.sock
    local k=$1 m=$2
    shift 2
    # Not through in_st: $! must be mbank itself (ip netns exec and env exec it), for
    # the SIGINT below.
    ip netns exec "$(st_ns "$k")" env XDG_CONFIG_HOME="$T/cfg-$k" "$MBANK" --bank "$URL" \
        --cache "$T/cache$k" attach "$m" --socket "$T/s$k.sock" --checkpoint-minutes 0 \
        --json "$@" >"$T/attach$k.json" 2>"$T/attach$k.err" &
    PIDS+=($!)
    eval "APID$k=$!"
    for ((i = 0; i < 600; i++)); do
        [[ -S $T/s$k.sock ]] && return 0
        sleep 0.05
    done
    die "attach on station $k did not start: $(cat "$T/attach$k.err")"
}
start_attach 1 bench/on
start_attach 2 bench/off --writeback-mbit 0
log "writing $MIB MiB over $SECONDS_ s on both stations, reading meanwhile"
for k in 1 2; do
    /usr/bin/python3 "$T/writer.py" "$T/s$k.sock" "$MIB" "$SECONDS_" "$READ_MIB" >"$T/w$k.out" &
    eval "W$k=$!"
    /usr/bin/python3 "$T/reader.py" "$T/s$k.sock" "$READ_MIB" "$SECONDS_" >"$T/r$k.out" &
    eval "R$k=$!"
done
for k in 1 2; do
    wait "$(eval echo "\$W$k")" || die "the writer on station $k failed"
    wait "$(eval echo "\$R$k")" || die "the reader on station $k failed"
done
log "  $(cat "$T/w1.out"); $(cat "$T/w2.out")"

# SIGINT to one station, then (once it has left) the other: each leave on its own, the
# server not busy with the other's check-in (on this 2-core machine a 1 GiB upload
# through the server takes the CPU a commit needs). Until its attach exits, polled every
# 10 ms (bash reaps the child as it ends).
for k in 1 2; do
    pid=$(eval echo "\$APID$k")
    t0=$(now)
    kill -INT "$pid"
    while kill -0 "$pid" 2>/dev/null; do sleep 0.01; done
    calc "$(now) - $t0" >"$T/leave$k"
done
for k in 1 2; do
    wait "$(eval echo "\$APID$k")" || die "attach on station $k failed: $(cat "$T/attach$k.err")"
done
rate=$MBANK_LAB_RATE_BIT

{
    echo "## Leave time after a session's writes (issue 14)"
    echo
    echo "- $(date -u '+%F %H:%M UTC'); $note; uptime at start: $uptime_start"
    echo "- ${MBANK_NOTE:-mbank $MBANK}; $(nproc) cores; lab profile $PROFILE ($((rate / 1000000)) Mbit/s a station's link); bank served over TLS, chunks in its directory"
    echo "- each session wrote $MIB MiB of random data in 1 MiB blocks over $SECONDS_ s, a flush every 16 MiB; both at once, one per station; then each left in turn (write-back on first)"
    echo
    echo "| write-back | leave s (SIGINT until the version is committed) | sent during the session | check-in sent | chunks the check-in sent | floor for the check-in's bytes s |"
    echo "|---|---:|---:|---:|---:|---:|"
    for k in 1 2; do
        j=$T/attach$k.json
        sent=$(field "$j" bytes_uploaded)
        [[ $k == 1 ]] && wb="on (25 Mbit/s cap)" || wb="off (--writeback-mbit 0)"
        printf '| %s | %.2f | %s | %s | %s | %.2f |\n' "$wb" "$(cat "$T/leave$k")" \
            "$(human "$(field "$j" stats.written_back_bytes)")" "$(human "$sent")" \
            "$(field "$j" chunks_uploaded)" "$(calc "$sent * 8 / $rate")"
    done
    echo
    echo "Ratio (off / on): $(printf %.1f "$(calc "$(cat "$T/leave2") / $(cat "$T/leave1")")")×"
    echo
    echo "Guest reads during the session (4 KiB, each a miss fetched from the bank, 5 a second):"
    echo
    echo "| station's link | reads | p50 ms | p99 ms | max ms | mean ms |"
    echo "|---|---:|---:|---:|---:|---:|"
    for k in 1 2; do
        [[ $k == 1 ]] && what="write-back sending" || what="idle (no write-back)"
        printf '| %s | %s | %.1f | %.1f | %.1f | %.1f |\n' "$what" "$(field "$T/r$k.out" reads)" \
            "$(field "$T/r$k.out" p50)" "$(field "$T/r$k.out" p99)" "$(field "$T/r$k.out" max)" \
            "$(field "$T/r$k.out" mean)"
    done
} | tee "$T/report.md"
if [[ -n ${BENCH_LEAVE_KEEP:-} ]]; then
    mkdir -p "$BENCH_LEAVE_KEEP"
    cp "$T"/attach*.json "$T"/attach*.err "$T"/serve.log "$T/report.md" "$BENCH_LEAVE_KEEP"/
fi
