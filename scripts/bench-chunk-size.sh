#!/usr/bin/env bash
# Benchmark (not a test): effect of mbank's --chunk-size. For each size: fresh
# bank, import base.raw then v2.raw (same machine), and report
#   - seconds of each import and bytes stored after each (mbank stats),
#   - catalog index size per version: disk_size / chunk_size * 32 bytes,
#   - cost of one 4 KiB guest write = one whole chunk re-uploaded; the compressed
#     estimate is bytes_stored / chunks_new of the first import.
# Env: MBANK (binary; default: cargo build --release -p mbank),
#      BENCH_CHUNK_SIZES (default "4K 16K 64K 256K 1M 4M"), MBANK_KEEP_TMP=1
set -euo pipefail
# shellcheck source=scripts/lib.sh
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"
REPO_ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
SIZES=${BENCH_CHUNK_SIZES:-4K 16K 64K 256K 1M 4M}
MACHINE=bench/dev

need jq
log "checking the data set"
"$REPO_ROOT/scripts/bench-data.sh" >/dev/null
build_mbank "$REPO_ROOT"
[[ -x $MBANK ]] || die "mbank binary not found: $MBANK"
make_tmp W
LOAD=$(load_note)

if drop_caches; then
    CACHE_MODE="cold (page cache dropped before each import)"
else
    CACHE_MODE="warm (drop_caches not permitted; images read once beforehand)"
    cat "$BENCH_DIR/base.raw" "$BENCH_DIR/v2.raw" >/dev/null
fi

# import BANK IMAGE CHUNK_SIZE -> JSON line on stdout; wall seconds added as "wall".
import() {
    local t0 t1 json
    drop_caches || true
    t0=$(date +%s.%N)
    json=$("$MBANK" -q --bank "$1" import --json --chunk-size "$3" "$MACHINE" "$2")
    t1=$(date +%s.%N)
    jq -c --argjson wall "$(bc -l <<<"$t1 - $t0")" '. + {wall: $wall}' <<<"$json"
}
stored() { "$MBANK" --bank "$1" stats --json | jq .bytes_stored; }
to_bytes() { numfmt --from=iec "$1"; }
MiB() { awk -v b="$1" 'BEGIN { printf "%.1f", b / 1048576 }'; }

echo "## Chunk size: base.raw then v2.raw into a fresh bank per size"
echo
echo "- images: $(human "$(bytes_of "$BENCH_DIR/base.raw")") raw ext4; page cache: $CACHE_MODE; $(nproc) cores, $LOAD"
echo "- mbank: $MBANK${MBANK_NOTE:+ ($MBANK_NOTE)}"
echo "- stored = mbank stats bytes_stored after the import; index = disk_size / chunk * 32 B per version"
echo "- 4 KiB write cost = one chunk re-uploaded: raw chunk size, and compressed estimate"
echo "  (bytes_stored / chunks_new of the base import)"
echo
echo "| chunk | base s | stored after base MiB | v2 s | stored after v2 MiB | v2 delta MiB | v2 chunks dedup/total | index / version KiB | 4 KiB write costs (raw / est. compressed) |"
echo "|---:|---:|---:|---:|---:|---:|---:|---:|---:|"
for cs in $SIZES; do
    bank=$W/bank-$cs
    log "chunk $cs: init + import base"
    "$MBANK" --bank "$bank" init >&2
    j1=$(import "$bank" "$BENCH_DIR/base.raw" "$cs")
    b1=$(stored "$bank")
    log "chunk $cs: base $j1; import v2"
    j2=$(import "$bank" "$BENCH_DIR/v2.raw" "$cs")
    b2=$(stored "$bank")
    log "chunk $cs: v2 $j2"
    csb=$(to_bytes "$cs")
    disk=$(jq .disk_size <<<"$j1")
    # shellcheck disable=SC2017 # ceil(disk / chunk) chunks, 32 bytes each
    index=$(((disk + csb - 1) / csb * 32))
    est=$(jq 'if .chunks_new > 0 then (.bytes_stored / .chunks_new | floor) else 0 end' <<<"$j1")
    printf '| %s | %.2f | %s | %.2f | %s | %s | %s/%s | %s | %s / %s |\n' "$cs" \
        "$(jq .wall <<<"$j1")" "$(MiB "$b1")" "$(jq .wall <<<"$j2")" "$(MiB "$b2")" \
        "$(MiB $((b2 - b1)))" "$(jq .chunks_dedup <<<"$j2")" "$(jq .chunks_total <<<"$j2")" \
        "$((index / 1024))" \
        "$(human "$csb")" "$(human "$est")"
    [[ ${MBANK_KEEP_TMP:-} == 1 ]] || rm -rf "$bank"
done
