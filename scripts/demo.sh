#!/usr/bin/env bash
# The main job on the embedded default: a local bank in a directory, no server.
#
# Builds mbank, builds (once, cached) a realistic data set — a 2 GiB ext4 disk holding a
# Debian 12 system, and the same disk after a user installed more packages — then:
# creates a bank, imports the first disk as qcow2, imports the changed disk, imports the
# base again as a second user's machine, and shows the log, the deduplication, a
# verified export and a full verify.
#
#   scripts/demo.sh                 bank in a fresh temp directory
#   MBANK_DEMO_DIR=/path scripts/demo.sh
set -euo pipefail
cd "$(dirname "$0")/.."
root=$PWD

scripts/setup.sh
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
echo
echo "bank left in $MBANK_BANK"
