#!/usr/bin/env bash
# Lazy memory (issue 13): a guest suspended with `x-ignore-shared` (RAM on a shared
# file, the migration stream only device state) resumed by a fresh QEMU whose RAM file
# is on an mbank-memfs mount, its chunks fetched on first access; against the eager
# path (every non-zero chunk fetched into a plain file, then QEMU). One source guest
# (256 MiB, MBANK_LAZYMEM_RANDOM_MIB of random data, default 128) suspended once, then
# resumed for each chunk size (MBANK_LAZYMEM_CHUNKS, KiB, default 64,256,2048) and link
# (MBANK_LAZYMEM_RATES, Mbit/s, 0 = unlimited, default 0,1000,100). The link is a
# model inside the fetcher (one queue: a chunk of N bytes holds it N/rate seconds),
# not the lab network: it prices each fetch as a shaped link would and ignores latency.
# MBANK_LAZYMEM_ADVICE (default ignore; comma separated): what the resumed QEMU does
# with its MADV_HUGEPAGE (mbank_vm::thp): keep, thp-disable (prctl PR_SET_THP_DISABLE)
# or ignore (a seccomp filter makes it a no-op). MBANK_LAZYMEM_READAHEAD_KIB: the FUSE
# mount's max_readahead (default one chunk). "FUSE reads at answer": the read requests
# by size, and the bytes they asked.
#
# Columns: "to cont" from the start of QEMU (lazy) or of the fetch (eager) until `cont`
# returned; "to answer" until the guest printed the answer of `cat /c` on its console;
# "fetched/waited at answer" what the memory file system fetched by then and how many
# guest accesses waited on a fetch; "cold sum"/"warm sum" the guest's md5sum of its
# whole random region right after the resume and again; "dirty chunks" after the guest
# wrote 4 MiB more, `stop` and an fsync of the RAM file. QEMU 7.2, TCG.
#
#   scripts/bench-lazymem.sh      prints a Markdown table on stdout
set -euo pipefail
cd "$(dirname "$0")/.."
# shellcheck source=scripts/lib.sh
source scripts/lib.sh
note=$(load_note)
log "building and running crates/mbank-memfs/tests/qemu_lazy.rs (lazy_resume_bench)"
echo "- $(date -u '+%Y-%m-%d %H:%M UTC'); $note; $(git rev-parse --short HEAD)"
cargo test -j1 --release -q -p mbank-memfs --test qemu_lazy -- --ignored --exact \
    lazy_resume_bench --nocapture --test-threads 1 2>&1 | grep -E '^(\||guest:)'
echo "- load average $(cut -d' ' -f1 /proc/loadavg) at the end"
