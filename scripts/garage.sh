#!/usr/bin/env bash
# Garage (https://garagehq.deuxfleurs.fr), an S3-compatible object store, for the S3
# chunk store's tests and benchmarks. Garage is AGPL: we run its binary, never link it.
#
#   scripts/garage.sh install             build garage into /var/cache/mbank-dev/garage
#                                         (once, minutes; quick when already there)
#   scripts/garage.sh start DIR           a 3-node cluster on 127.0.0.1 (replication 3),
#                                         with a bucket and a key; prints KEY=VALUE lines
#                                         (also kept in DIR/env). On a DIR that holds a
#                                         stopped cluster, starts its nodes again.
#   scripts/garage.sh stop DIR            stops every node of the cluster in DIR
#   scripts/garage.sh stop-node DIR N     kills node N (1..3), as in a crash
#   scripts/garage.sh start-node DIR N    starts node N again; returns once it is healthy
#   scripts/garage.sh bucket DIR NAME     a new bucket NAME on the cluster in DIR, which
#                                         the cluster's key may read and write
#
# The printed lines: GARAGE_ENDPOINTS (the nodes' S3 URLs, space-separated),
# GARAGE_ENDPOINT_N, GARAGE_REGION, GARAGE_BUCKET, AWS_ACCESS_KEY_ID,
# AWS_SECRET_ACCESS_KEY, GARAGE_PID_N. Ports are picked free at start. The S3 API
# listens on GARAGE_S3_HOST (default 127.0.0.1), which the endpoints name: a lab gives
# its server's address, so that stations reach the store too.
set -euo pipefail

GARAGE_VERSION=${GARAGE_VERSION:-2.5.0}
root=/var/cache/mbank-dev/garage
garage=$root/bin/garage
nodes=(1 2 3)

die() {
    echo "garage.sh: $*" >&2
    exit 1
}

install() {
    [[ -x $garage ]] && return 0
    mkdir -p "$root"
    exec 9>"$root.lock"
    flock 9
    [[ -x $garage ]] && return 0
    echo "garage: building garage $GARAGE_VERSION into $root (takes minutes, once)" >&2
    CARGO_TARGET_DIR=$root.build cargo install "garage@$GARAGE_VERSION" --locked --root "$root" >&2
    rm -rf "$root.build"
    "$garage" --version >&2
}

# Prints N free TCP ports on 127.0.0.1.
free_ports() {
    python3 - "$1" <<'PY'
import socket, sys
socks = []
for _ in range(int(sys.argv[1])):
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    socks.append(s)
print(" ".join(str(s.getsockname()[1]) for s in socks))
PY
}

hex() { od -An -N"$1" -tx1 /dev/urandom | tr -d ' \n'; }

g() { # g N ARGS...: the garage CLI talking to node N
    local n=$1
    shift
    "$garage" -c "$dir/node$n/garage.toml" "$@"
}

retry() { # retry what ARGS...: runs ARGS until it succeeds, for up to 30 s
    local what=$1 i
    shift
    for ((i = 0; i < 150; i++)); do
        if "$@" >"$dir/last.out" 2>&1; then
            cat "$dir/last.out"
            return 0
        fi
        sleep 0.2
    done
    cat "$dir/last.out" >&2
    die "timed out waiting to $what"
}

start_node() {
    local n=$1
    local pidfile="$dir/node$n/pid"
    if [[ -f $pidfile ]] && kill -0 "$(cat "$pidfile")" 2>/dev/null; then
        return 0
    fi
    # setsid: the node outlives the shell that started it, and a Ctrl-C there.
    setsid "$garage" -c "$dir/node$n/garage.toml" server >>"$dir/node$n/log" 2>&1 </dev/null &
    echo $! >"$pidfile"
    retry "start node $n" g "$n" node id -q >/dev/null
}

# Waits until node N answers its admin API's /health with 200: the cluster has a
# quorum as that node sees it (a restarted node needs a few seconds to rejoin).
wait_healthy() {
    retry "node $1 to be healthy" python3 -c \
        'import sys, urllib.request; urllib.request.urlopen(sys.argv[1], timeout=2)' \
        "http://127.0.0.1:$(cat "$dir/node$1/admin_port")/health" >/dev/null
}

# stop_nodes SIGNAL N...: signals nodes N..., waits up to 10 s for all of them to exit,
# then kills what is left.
stop_nodes() {
    local sig=$1 n i pids=()
    shift
    for n in "$@"; do
        [[ -f $dir/node$n/pid ]] || continue
        pids+=("$(cat "$dir/node$n/pid")")
        rm -f "$dir/node$n/pid"
    done
    ((${#pids[@]})) || return 0
    kill "-$sig" "${pids[@]}" 2>/dev/null || true
    for ((i = 0; i < 100; i++)); do
        kill -0 "${pids[@]}" 2>/dev/null || break
        sleep 0.1
    done
    kill -9 "${pids[@]}" 2>/dev/null || true
}

start() {
    [[ -x $garage ]] || die "garage is not installed: run $0 install"
    mkdir -p "$dir"
    if [[ -e $dir/env ]]; then # a cluster made before: start its nodes again
        for n in "${nodes[@]}"; do start_node "$n"; done
        for n in "${nodes[@]}"; do wait_healthy "$n"; done
        cat "$dir/env"
        for n in "${nodes[@]}"; do echo "GARAGE_PID_$n=$(cat "$dir/node$n/pid")"; done
        return 0
    fi
    local secret ports n rpc s3 admin
    secret=$(hex 32)
    read -r -a ports <<<"$(free_ports 9)"
    for n in "${nodes[@]}"; do
        rpc=${ports[(n - 1) * 3]} s3=${ports[(n - 1) * 3 + 1]} admin=${ports[(n - 1) * 3 + 2]}
        mkdir -p "$dir/node$n/meta" "$dir/node$n/data"
        # fsync on: a PUT that returned means the chunk is on disk on 2 of 3 nodes.
        cat >"$dir/node$n/garage.toml" <<TOML
metadata_dir = "$dir/node$n/meta"
data_dir = "$dir/node$n/data"
db_engine = "sqlite"
metadata_fsync = true
data_fsync = true
replication_factor = 3
rpc_bind_addr = "127.0.0.1:$rpc"
rpc_public_addr = "127.0.0.1:$rpc"
rpc_secret = "$secret"
bootstrap_peers = []

[s3_api]
api_bind_addr = "${GARAGE_S3_HOST:-127.0.0.1}:$s3"
s3_region = "garage"
root_domain = ".s3.garage.localhost"

[admin]
api_bind_addr = "127.0.0.1:$admin"
TOML
        echo "$s3" >"$dir/node$n/s3_port"
        echo "$admin" >"$dir/node$n/admin_port"
    done
    for n in "${nodes[@]}"; do start_node "$n"; done
    local ids=()
    for n in "${nodes[@]}"; do ids+=("$(g "$n" node id -q)"); done
    for n in 2 3; do retry "connect node $n" g 1 node connect "${ids[n - 1]}" >/dev/null; done
    # So that a node started again (start-node) rejoins at once rather than when the
    # others next retry it, which takes tens of seconds.
    for n in "${nodes[@]}"; do
        sed -i "s/^bootstrap_peers = .*/bootstrap_peers = [$(printf '"%s", ' "${ids[@]}" | sed 's/, $//')]/" \
            "$dir/node$n/garage.toml"
    done
    for n in "${nodes[@]}"; do
        retry "assign node $n" g 1 layout assign -z dc1 -c 1G "${ids[n - 1]%%@*}" >/dev/null
    done
    retry "apply the layout" g 1 layout apply --version 1 >/dev/null
    local key_id secret_key
    key_id=GK$(hex 12)
    secret_key=$(hex 32)
    retry "create the bucket" g 1 bucket create mbank >/dev/null
    retry "import the key" g 1 key import --yes -n mbank "$key_id" "$secret_key" >/dev/null
    retry "allow the key" g 1 bucket allow --read --write --owner mbank --key "$key_id" >/dev/null
    for n in "${nodes[@]}"; do wait_healthy "$n"; done
    {
        local eps=()
        for n in "${nodes[@]}"; do eps+=("http://${GARAGE_S3_HOST:-127.0.0.1}:$(cat "$dir/node$n/s3_port")"); done
        echo "GARAGE_ENDPOINTS='${eps[*]}'"
        for n in "${nodes[@]}"; do echo "GARAGE_ENDPOINT_$n=${eps[n - 1]}"; done
        echo "GARAGE_REGION=garage"
        echo "GARAGE_BUCKET=mbank"
        echo "AWS_ACCESS_KEY_ID=$key_id"
        echo "AWS_SECRET_ACCESS_KEY=$secret_key"
    } >"$dir/env"
    cat "$dir/env"
    for n in "${nodes[@]}"; do echo "GARAGE_PID_$n=$(cat "$dir/node$n/pid")"; done
}

cmd=${1:-}
case $cmd in
install) install ;;
start | stop | stop-node | start-node)
    [[ -n ${2:-} ]] || die "usage: $0 $cmd DIR${3:+ N}"
    dir=$(realpath -m "$2")
    case $cmd in
    start) start ;;
    stop) stop_nodes TERM "${nodes[@]}" ;;
    stop-node | start-node)
        [[ ${3:-} =~ ^[123]$ ]] || die "usage: $0 $cmd DIR N (N in 1..3)"
        [[ -e $dir/env ]] || die "no cluster in $dir"
        # stop-node kills: the failure tests want a node that vanishes, as in a crash.
        if [[ $cmd == stop-node ]]; then stop_nodes KILL "$3"; else
            start_node "$3"
            wait_healthy "$3"
            echo "GARAGE_PID_$3=$(cat "$dir/node$3/pid")"
        fi
        ;;
    esac
    ;;
bucket)
    [[ -n ${2:-} && ${3:-} =~ ^[a-z0-9][a-z0-9-]{2,62}$ ]] || die "usage: $0 bucket DIR NAME (a-z, 0-9, '-')"
    dir=$(realpath -m "$2")
    [[ -e $dir/env ]] || die "no cluster in $dir"
    key_id=$(sed -n 's/^AWS_ACCESS_KEY_ID=//p' "$dir/env")
    retry "create bucket $3" g 1 bucket create "$3" >/dev/null
    retry "allow the key on $3" g 1 bucket allow --read --write --owner "$3" --key "$key_id" >/dev/null
    ;;
*)
    sed -n '5,17s/^# \{0,1\}//p' "$0" >&2
    exit 2
    ;;
esac
