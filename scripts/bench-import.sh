#!/usr/bin/env bash
# Benchmark (not a test): store base then v2 of the bench data set with mbank
# and with peer tools, in fresh repositories, and print a Markdown table.
#   mbank        mbank import base.raw, v2.raw (same machine)   -- fixed chunks
#   restic-img   restic backup base.raw, v2.raw (one repo)       -- image as a file
#   borg-img     borg create ... base.raw, v2.raw (one repo)
#   casync-img   casync make --store=S *.caibx base.raw, v2.raw
#   restic-tree  restic backup base-root/, v2-root/              -- the same files
#   borg-tree    borg create ... base-root/, v2-root/
#   casync-tree  casync make --store=S *.caidx base-root/, v2-root/
# "-img" rows are the apples-to-apples comparison for a disk image; "-tree" rows
# show what file-level tools get from the same files.
# Bytes = du -sb of the repo/store (+ casync index files) after each step.
#
# Env: MBANK (binary; default: cargo build --release -p mbank, target/release/mbank)
#      BENCH_TOOLS (space-separated subset of the rows above; default all)
#      BENCH_SKIP_MBANK=1 (drop the mbank row), BENCH_CHUNK_SIZE (mbank --chunk-size)
#      BENCH_BORG_COMPRESSION (default lz4, borg's default), MBANK_KEEP_TMP=1
set -euo pipefail
# shellcheck source=scripts/lib.sh
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"
REPO_ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)

TOOLS=${BENCH_TOOLS:-mbank restic-img borg-img casync-img restic-tree borg-tree casync-tree}
[[ ${BENCH_SKIP_MBANK:-0} == 1 ]] && TOOLS=${TOOLS//mbank/}
BORG_COMPRESSION=${BENCH_BORG_COMPRESSION:-lz4}
MACHINE=bench/dev

need restic
need borg borgbackup
need casync
need jq
need bc

log "checking the data set"
"$REPO_ROOT/scripts/bench-data.sh" >/dev/null
B=$BENCH_DIR

if [[ " $TOOLS " == *" mbank "* ]]; then
    build_mbank "$REPO_ROOT"
    [[ -x $MBANK ]] || die "mbank binary not found: $MBANK"
fi

make_tmp W
LOAD=$(load_note)
export RESTIC_PASSWORD=bench RESTIC_CACHE_DIR=$W/restic-cache
export BORG_BASE_DIR=$W/borg-base BORG_UNKNOWN_UNENCRYPTED_REPO_ACCESS_IS_OK=yes

# Page cache: drop before every timed step if the kernel lets us (cold reads for
# everyone); otherwise read every input once so all tools start warm.
if drop_caches; then
    CACHE_MODE="cold (page cache dropped before each step)"
    prep() { drop_caches || true; }
else
    CACHE_MODE="warm (drop_caches not permitted; inputs read once beforehand)"
    log "warming inputs"
    cat "$B/base.raw" "$B/v2.raw" >/dev/null
    tar -cf - -C "$B" base-root v2-root >/dev/null
    prep() { :; }
fi

# timed OUT CMD...: run CMD (stdout -> OUT, stderr -> stderr); print wall seconds.
timed() {
    local out=$1 t0 t1
    shift
    prep
    t0=$(date +%s.%N)
    "$@" >"$out"
    t1=$(date +%s.%N)
    printf '%.2f\n' "$(bc -l <<<"$t1 - $t0")"
}

# Each tool: init_X DIR, step_X DIR NAME INPUT. Results: "tool s1 b1 s2 b2" lines.
init_mbank() { "$MBANK" --bank "$1" init >&2; }
step_mbank() {
    local cs=()
    [[ -n ${BENCH_CHUNK_SIZE:-} ]] && cs=(--chunk-size "$BENCH_CHUNK_SIZE")
    "$MBANK" -q --bank "$1" import --json "${cs[@]}" "$MACHINE" "$3"
}
init_restic() { restic init -q -r "$1" >&2; }
step_restic() { restic backup -q -r "$1" --host bench --tag "$2" "$3" >&2; }
init_borg() { borg init --encryption=none "$1" >&2; }
step_borg() { borg create --compression "$BORG_COMPRESSION" "$1::$2" "$3" >&2; }
init_casync() { mkdir -p "$1/store"; }
step_casync() {
    local ext=caidx
    [[ -f $3 ]] && ext=caibx
    casync make --store="$1/store" "$1/$2.$ext" "$3" >/dev/null # prints the digest
}

RESULTS=()
for t in $TOOLS; do
    kind=${t%%-*}
    case $t in
    *-tree) in1=$B/base-root in2=$B/v2-root ;;
    *) in1=$B/base.raw in2=$B/v2.raw ;;
    esac
    d=$W/$t
    log "$t: init"
    "init_$kind" "$d"
    log "$t: base"
    s1=$(timed "$W/$t.1.out" "step_$kind" "$d" base "$in1")
    b1=$(bytes_of "$d")
    log "$t: base ${s1}s $(human "$b1"); v2"
    s2=$(timed "$W/$t.2.out" "step_$kind" "$d" v2 "$in2")
    b2=$(bytes_of "$d")
    log "$t: v2 ${s2}s $(human "$b2")"
    RESULTS+=("$t $s1 $b1 $s2 $b2")
done

# ---- report (stdout)
MiB() { printf '%.1f' "$(bc -l <<<"$1 / 1048576")"; }
echo "## Import benchmark: base then v2 into one fresh repository"
echo
echo "- data: base.raw / v2.raw $(human "$(bytes_of "$B/base.raw")") raw ext4 each" \
    "($(human "$(alloc_of "$B/base.raw")") / $(human "$(alloc_of "$B/v2.raw")") allocated);" \
    "trees $(human "$(bytes_of "$B/base-root")") / $(human "$(bytes_of "$B/v2-root")");" \
    "v2 made with $(cat "$B/v2.method" 2>/dev/null || echo '?')"
echo "- page cache: $CACHE_MODE; $(nproc) cores, $LOAD; kernel $(uname -r)"
echo "- $(restic version | cut -d' ' -f1-2) (repo v2, compression auto = zstd, CDC ~1 MiB avg);" \
    "$(borg --version) (encryption none, compression $BORG_COMPRESSION, CDC ~2 MiB avg);" \
    "casync $(casync --version | awk 'NR==1{print $2}') (defaults: zstd, CDC 64 KiB avg)"
if [[ " $TOOLS " == *" mbank "* ]]; then
    echo "- mbank: $MBANK${BENCH_CHUNK_SIZE:+ --chunk-size $BENCH_CHUNK_SIZE}${MBANK_NOTE:+ ($MBANK_NOTE)}; import JSON:"
    for i in 1 2; do echo "  \`$(jq -c . "$W/mbank.$i.out")\`"; done
fi
echo
echo "| tool | base s | base MiB | v2 s | v2 delta MiB | total MiB | base s / mbank | v2 s / mbank |"
echo "|---|---:|---:|---:|---:|---:|---:|---:|"
m1='' m2=''
for r in "${RESULTS[@]}"; do
    read -r t s1 b1 s2 b2 <<<"$r"
    [[ $t == mbank ]] && m1=$s1 m2=$s2
done
ratio() { if [[ -n $2 && $2 != 0.00 ]]; then printf '%.2f' "$(bc -l <<<"$1 / $2")"; else echo -; fi; }
for r in "${RESULTS[@]}"; do
    read -r t s1 b1 s2 b2 <<<"$r"
    echo "| $t | $s1 | $(MiB "$b1") | $s2 | $(MiB $((b2 - b1))) | $(MiB "$b2") | $(ratio "$s1" "$m1") | $(ratio "$s2" "$m2") |"
done
