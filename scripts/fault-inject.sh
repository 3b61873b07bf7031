#!/usr/bin/env bash
# Fault injection (a command, not a benchmark): kill -9 of `mbank attach` during writes
# and during check-in, full disks (bank and station cache on small tmpfs mounts), a
# concurrent stress of imports, sessions, kill -9 + recover, gc, rm and verify, and
# malformed NBD traffic against attach. Prints a summary of counts on stdout and exits
# non-zero on any lost write, wrong data, crash, hang or unexpected error.
#
# Usage: scripts/fault-inject.sh [--minutes N] [--seed S] [--quick] [--only PHASE,...]
#   --minutes N  length of the stress phase (default 10; with --quick 0.33)
#   --seed S     repeat a run (the seed is printed at the start and in the summary)
#   --quick      a few trials of each kind, about a minute (what CI runs)
#   --only       some of: kill-write,kill-checkin,disk-full,stress,malformed-nbd
# Env: MBANK (binary; default: a fresh release build), MBANK_KEEP_TMP=1 keeps the work
# directory. Needs root (tmpfs mounts), python3 with libnbd (python3-libnbd). Only a
# Unix socket is used; no network.
set -euo pipefail
# shellcheck source=scripts/lib.sh
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"
REPO_ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)

[[ $(id -u) == 0 ]] || die "fault injection mounts tmpfs file systems: run it as root"
# The system python3 has the libnbd module; another python3 earlier in PATH may not.
PY=/usr/bin/python3
[[ -x $PY ]] || need python3
$PY -c 'import nbd' 2>/dev/null || { need nbdsh python3-libnbd; }
$PY -c 'import nbd' || die "python3 cannot import nbd (apt-get install python3-libnbd)"

build_mbank "$REPO_ROOT"
[[ -x $MBANK ]] || die "MBANK=$MBANK is not an executable"
MBANK=$(realpath "$MBANK")
make_tmp T
# Unmount what a killed run left mounted below the work directory (before it goes).
umount_below() { findmnt -rn -o TARGET | grep -F "$T/" | sort -r | xargs -r -n1 umount -l; }
at_exit umount_below

log "work directory $T${MBANK_NOTE:+ ($MBANK_NOTE)}"
MBANK=$MBANK $PY "$REPO_ROOT/scripts/fault_inject.py" --work "$T" "$@"
