#!/usr/bin/env bash
# The main job on the embedded default: a local bank in a directory, no server.
#
# Builds mbank, builds (once, cached) a realistic data set — a 2 GiB ext4 disk holding a
# Debian 12 system, and the same disk after a user installed more packages — then:
# creates a bank, imports the first disk as qcow2, imports the changed disk, imports the
# base again as a second user's machine, and shows the log, the deduplication, a
# verified export and a full verify. Then a virtual PC: the project's test guest (a
# Debian kernel and a busybox initramfs, built once by scripts/build-guest.sh) on an
# ext4 disk in the bank; it writes a file on "station A", keeps a counter in memory,
# is suspended there and resumed on "station B" (an empty cache) with its memory.
#
#   scripts/demo.sh                 bank in a fresh temp directory
#   MBANK_DEMO_DIR=/path scripts/demo.sh
set -euo pipefail
cd "$(dirname "$0")/.."
root=$PWD

# The demo keeps its chunks in the bank directory: no Garage (S3) to build.
scripts/setup.sh --no-garage
echo "== building mbank (release)" >&2
cargo build --release --locked -p mbank
mbank() { "$root/target/release/mbank" "$@"; }

echo "== data set (cached after the first run)" >&2
scripts/bench-data.sh >&2
data=${MBANK_CACHE_DIR:-/var/cache/mbank-dev}/bench
if [[ ! -f $data/base.qcow2 || $data/base.raw -nt $data/base.qcow2 ]]; then
    echo "== converting base.raw to qcow2 (once)" >&2
    qemu-img convert -f raw -O qcow2 "$data/base.raw" "$data/base.qcow2.tmp"
    mv "$data/base.qcow2.tmp" "$data/base.qcow2"
fi

dir=${MBANK_DEMO_DIR:-$(mktemp -d /tmp/mbank-demo.XXXXXX)}
export MBANK_BANK=$dir/bank
rm -rf "$MBANK_BANK" "$dir/export.raw"
mkdir -p "$dir"

step() { printf '\n\033[1m$ %s\033[0m\n' "$*"; }
step mbank --bank "$MBANK_BANK" init
mbank init

step mbank import alice/dev base.qcow2
v1=$(mbank import alice/dev "$data/base.qcow2")
echo "$v1"

step mbank import alice/dev v2.raw "   # the same disk after installing packages"
v2=$(mbank import alice/dev "$data/v2.raw")
echo "$v2"

step mbank import bob/dev base.raw "   # a second user starting from the same base"
mbank import bob/dev "$data/base.raw"

step mbank log alice/dev
mbank log alice/dev
step mbank ls
mbank ls
step mbank stats
mbank stats
alloc() { echo $(($(stat -c '%b * %B' "$1"))); }
on_disk=$(($(alloc "$data/base.raw") * 2 + $(alloc "$data/v2.raw")))
printf '\nthe three disks as raw files: 6.0 GiB apparent, %s on disk (sparse); the bank holds %s\n' \
    "$(numfmt --to=iec-i --suffix=B "$on_disk")" "$(du -sh "$MBANK_BANK" | cut -f1)"

step mbank export "alice/dev@${v1:0:8}" export.raw
mbank export "alice/dev@${v1:0:8}" "$dir/export.raw"
cmp "$data/base.raw" "$dir/export.raw"
echo "export.raw is byte-identical to base.raw ($(du -h "$dir/export.raw" | cut -f1) on disk: sparse)"

step mbank verify
mbank verify
rm -f "$dir/export.raw"

echo "== the test guest (cached after the first build)" >&2
eval "$(scripts/build-guest.sh build)"
scripts/build-guest.sh mkfs "$dir/pc-disk.raw" 256 >&2
markers() { grep --line-buffered -a 'MBANK-' | tr -d '\r'; }

step mbank create alice/pc --image pc-disk.raw --memory 256M --kernel vmlinuz --initrd initramfs.img
mbank create alice/pc --image "$dir/pc-disk.raw" --memory 256M --network none --display none \
    --kernel "$KERNEL" --initrd "$INITRD" --append "console=ttyS0 panic=-1 quiet"
rm -f "$dir/pc-disk.raw"

step mbank --cache stationA run alice/pc --console --append mbank.job=write "  # writes files, powers off"
mbank --cache "$dir/stationA" run alice/pc --console --append "mbank.job=write mbank.token=written-on-A" | markers

step mbank --cache stationA run alice/pc --console --append mbank.job=counter "&  # a counter in memory only"
mbank --cache "$dir/stationA" run alice/pc --console --append mbank.job=counter >"$dir/runA.out" &
runA=$!
until grep -q 'MBANK-COUNTER 10' "$dir/runA.out" 2>/dev/null; do
    kill -0 "$runA" 2>/dev/null || { cat "$dir/runA.out"; exit 1; }
    sleep 0.5
done
step mbank --cache stationA suspend alice/pc
mbank --cache "$dir/stationA" suspend alice/pc
wait "$runA"
markers <"$dir/runA.out" | tail -n 2

step mbank --cache stationB run alice/pc --console "&   # another station, empty cache: resumes"
mbank --cache "$dir/stationB" run alice/pc --console >"$dir/runB.out" &
runB=$!
until [[ $(grep -c 'MBANK-COUNTER' "$dir/runB.out" 2>/dev/null) -ge 5 ]]; do
    kill -0 "$runB" 2>/dev/null || { cat "$dir/runB.out"; exit 1; }
    sleep 0.5
done
step mbank --cache stationB suspend alice/pc
mbank --cache "$dir/stationB" suspend alice/pc
wait "$runB"
markers <"$dir/runB.out" | head -n 3
echo "(the counter went on from where station A stopped it)"

step mbank log alice/pc
mbank log alice/pc
rm -f "$dir/runA.out" "$dir/runB.out"
echo
echo "bank left in $MBANK_BANK"
