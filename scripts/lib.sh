# shellcheck shell=bash disable=SC2034 # variables are used by the sourcing scripts
# Shared helpers for the scripts/bench-*.sh scripts. Source it, don't run it.

shopt -s inherit_errexit # set -e also inside $(...)

CACHE_DIR=${MBANK_CACHE_DIR:-/var/cache/mbank-dev}
BENCH_DIR=$CACHE_DIR/bench
TMP_ROOT=$CACHE_DIR/tmp

# Progress goes to stderr so stdout stays clean for the results.
log() { printf '[%(%H:%M:%S)T] %s\n' -1 "$*" >&2; }
die() { log "ERROR: $*"; exit 1; }

# need CMD [PACKAGE]: install PACKAGE (default CMD) with apt only if CMD is missing.
_apt_updated=
need() {
    local cmd=$1 pkg=${2:-$1}
    command -v "$cmd" >/dev/null 2>&1 && return 0
    log "installing $pkg (for $cmd)"
    if [[ -z $_apt_updated ]]; then apt-get update -qq >&2; _apt_updated=1; fi
    DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends "$pkg" >&2
    command -v "$cmd" >/dev/null 2>&1 || die "$cmd still missing after installing $pkg"
}

# Apparent size (bytes) of a file, or total of a directory tree.
bytes_of() { du -sb "$1" | cut -f1; }
# Allocated size (bytes) on disk; for sparse images this is smaller.
alloc_of() { du -sB1 "$1" | cut -f1; }
human() { numfmt --to=iec-i --suffix=B --format=%.1f "$1"; }

# at_exit CMD: run CMD on exit (last registered runs first), before temp dirs go.
_exit_hooks=()
_tmp_dirs=()
at_exit() { _exit_hooks+=("$1"); }
_on_exit() {
    local i
    for ((i = ${#_exit_hooks[@]} - 1; i >= 0; i--)); do ${_exit_hooks[i]} || true; done
    [[ ${MBANK_KEEP_TMP:-} == 1 ]] && return 0
    for i in "${_tmp_dirs[@]}"; do rm -rf --one-file-system "$i"; done
}
trap _on_exit EXIT
trap 'exit 130' INT TERM

# Fresh temp dir under $TMP_ROOT, removed on exit (set MBANK_KEEP_TMP=1 to keep).
# Usage: make_tmp VAR  (sets VAR; not via $(...), which would lose the bookkeeping)
make_tmp() {
    mkdir -p "$TMP_ROOT"
    local d
    d=$(mktemp -d "$TMP_ROOT/${0##*/}.XXXXXX")
    _tmp_dirs+=("$d")
    printf -v "$1" '%s' "$d"
}

# Best effort: drop the page cache; returns 1 if not allowed.
drop_caches() { sync; { echo 3 >/proc/sys/vm/drop_caches; } 2>/dev/null; }

# Other work on the machine skews timings: say so in the report and on stderr.
load_note() {
    local l
    l=$(cut -d' ' -f1 /proc/loadavg)
    if awk -v l="$l" -v n="$(nproc)" 'BEGIN{exit !(l > n / 4)}'; then
        log "WARNING: load average $l on $(nproc) cores before starting; timings will be noisy"
    fi
    echo "load average $l at start"
}

# build_mbank REPO_ROOT: set MBANK (unless given) to a fresh release build. If the
# build fails but an older binary exists, use it and set MBANK_NOTE to say so.
MBANK_NOTE=
build_mbank() {
    [[ -n ${MBANK:-} ]] && return 0
    MBANK=$1/target/release/mbank
    log "cargo build --release -p mbank"
    if ! (cd "$1" && cargo build --release -q -p mbank) >&2; then
        [[ -x $MBANK ]] || die "cargo build failed and there is no $MBANK"
        MBANK_NOTE="cargo build failed; STALE binary built $(date -r "$MBANK" '+%F %T')"
        log "WARNING: $MBANK_NOTE"
    fi
}

# Time now in seconds (with nanoseconds), and arithmetic on such numbers.
now() { date +%s.%N; }
calc() { echo "$*" | bc -l; }

# lab_certs DIR NAME: a CA (DIR/ca.pem) and the lab server's certificate for 10.77.0.1
# (DIR/cert.pem, DIR/key.pem), as scripts/lab-net.sh addresses its server.
lab_certs() {
    (
        cd "$1"
        openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes \
            -keyout ca.key -out ca.pem -days 2 -subj "/CN=mbank $2 CA"
        openssl req -newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes \
            -keyout key.pem -out server.csr -subj /CN=10.77.0.1
        printf 'subjectAltName=IP:10.77.0.1\nbasicConstraints=CA:FALSE\n' >ext.cnf
        openssl x509 -req -in server.csr -CA ca.pem -CAkey ca.key -CAcreateserial \
            -out cert.pem -days 2 -extfile ext.cnf
    ) >/dev/null 2>&1 || die "openssl could not make the certificates"
}
