#!/usr/bin/env bash
# A lab network on one machine: the bank server and 1..N stations, each in its own
# network namespace, joined by a bridge, each station's link rate-limited in both
# directions with `tc qdisc tbf` (netem, for delay and loss, is not in this kernel).
# Needs root, `ip` and `tc` (iproute2). Run with --help for the commands.
set -euo pipefail

SELF=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)/$(basename "${BASH_SOURCE[0]}")

usage() {
    cat <<'EOF'
Usage: lab-net.sh COMMAND [OPTIONS]

A lab of network namespaces on this machine, named after the lab NAME:
  NAME-sw    the switch: a bridge br0 with one port per host (p-srv, p-st1, ...)
  NAME-srv   the bank server, eth0 = 10.77.0.1/24
  NAME-stK   station K (1..N), eth0 = 10.77.0.(10+K)/24
Every host's eth0 is a veth pair to its switch port. A station's link is shaped in
both directions with a tbf qdisc: on its eth0 (upload) and on its switch port
(download). The server's link is shaped only with --uplink. The addresses exist only inside the
lab's namespaces (nothing is added to the host's namespace), so two labs with
different names can run at once.

Commands:
  up [--name NAME] [--stations N] [--profile P] [--uplink P] [--store S]
        make the lab (after removing what an earlier lab of that name left)
  down [--name NAME]
        remove the lab: stop the processes still running in its namespaces
        (SIGTERM, then SIGKILL; a Garage cluster of the lab with them), delete its
        namespaces and the cluster's directory. Safe to run any time.
  status [--name NAME]
        the lab's namespaces, addresses and qdiscs with their counters
  exec [--name NAME] HOST -- CMD...
        run CMD in HOST's namespace; HOST is srv, stK or a full namespace name
  measure [--name NAME] [--station K] [--size MIB]
        time a download of MIB (default 32) random MiB over HTTP from the server to
        station K (default 1) and an upload back, with python3 -m http.server and curl;
        prints the rates in Mbit/s
  run [--name NAME] [--stations N] [--profile P] [--store S] -- CMD...
        up, run CMD (in the host namespace) with the lab described in its
        environment, then down, also when CMD fails or on Ctrl-C; exits with
        CMD's status. NAME defaults to mbank-lab-PID here, so runs can overlap.

Options:
  --name NAME      lab name (default mbank-lab; letters, digits, '-', at most 40)
  --stations N     number of stations, 1..200 (default 1)
  --uplink P       1gbit, 100mbit or none (default none): tbf rate of the server's
                   link, both directions: the lab's one uplink to the bank, which
                   every station shares
  --profile P      1gbit, 100mbit or none (default 100mbit): tbf rate of each
                   station's link, both directions
  --store S        where the bank server's chunks go: dir (default; the bank
                   directory) or garage: a three-node Garage cluster (scripts/garage.sh,
                   replication 3, fsync on) started in the server's namespace, its
                   S3 API on the server's address 10.77.0.1 (stations read the store
                   directly by the URLs the server hands out), its data in
                   $TMPDIR/NAME-garage. In the server's namespace because that is
                   where its store is in a lab: beside the bank server, behind the
                   same uplink (the host's loopback is another). Make
                   the bank in that namespace (`exec srv -- mbank init --store
                   $MBANK_LAB_STORE_URL`), with AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY
                   from the environment below. Needs garage (scripts/garage.sh install).
  -h, --help       this text

Environment given to CMD by `run` (and printed by `up` as shell assignments):
  MBANK_LAB                 the lab's name
  MBANK_LAB_SCRIPT          this script (for `exec`, `status`, `measure`)
  MBANK_LAB_PROFILE         the profile
  MBANK_LAB_RATE_BIT        the shaped rate in bit/s (0 for none)
  MBANK_LAB_SERVER_NS       the server's namespace
  MBANK_LAB_SERVER_ADDR     the server's address (10.77.0.1)
  MBANK_LAB_STATION_NS      the stations' namespaces, space-separated
  MBANK_LAB_STATION_ADDRS   their addresses, in the same order
  MBANK_LAB_STORE           dir or garage
  with --store garage:
  MBANK_LAB_STORE_URL       the `mbank init --store` URL of the cluster's bucket
                            (every node's endpoint, reachable in the server's namespace)
  MBANK_LAB_GARAGE_DIR      the cluster's directory (its nodes' logs are there)
  AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY   the bucket's key

Examples:
  lab-net.sh run --profile 1gbit --stations 2 -- sh -c \
      'ip netns exec $MBANK_LAB_SERVER_NS mbank serve --listen $MBANK_LAB_SERVER_ADDR:8443 ... &
       ip netns exec ${MBANK_LAB_STATION_NS%% *} mbank --bank https://$MBANK_LAB_SERVER_ADDR:8443 ls'
  lab-net.sh up --profile 100mbit && lab-net.sh measure && lab-net.sh down
EOF
}

die() {
    echo "lab-net.sh: $*" >&2
    exit 1
}

NAME=
STATIONS=1
STORE=dir
PROFILE=100mbit
UPLINK=none
STATION_K=1
SIZE_MIB=32
parse() { # parse ARGS...: options into globals; what follows `--` into CMD
    CMD=()
    while (($#)); do
        case $1 in
        --name) NAME=${2:?--name needs a value}; shift 2 ;;
        --stations) STATIONS=${2:?--stations needs a value}; shift 2 ;;
        --profile) PROFILE=${2:?--profile needs a value}; shift 2 ;;
        --uplink) UPLINK=${2:?--uplink needs a value}; shift 2 ;;
        --store) STORE=${2:?--store needs a value}; shift 2 ;;
        --station) STATION_K=${2:?--station needs a value}; shift 2 ;;
        --size) SIZE_MIB=${2:?--size needs a value}; shift 2 ;;
        -h | --help) usage; exit 0 ;;
        --) shift; CMD=("$@"); break ;;
        *) CMD=("$@"); break ;;
        esac
    done
    [[ -z $NAME || $NAME =~ ^[A-Za-z0-9][A-Za-z0-9-]{0,39}$ ]] ||
        die "--name $NAME: use letters, digits and '-' (at most 40 characters)"
    [[ $STATIONS =~ ^[1-9][0-9]*$ ]] && ((STATIONS <= 200)) ||
        die "--stations $STATIONS: give a number of stations from 1 to 200"
    case $PROFILE in
    1gbit) RATE_BIT=1000000000 BURST=512kb ;;
    100mbit) RATE_BIT=100000000 BURST=128kb ;;
    none) RATE_BIT=0 BURST= ;;
    *) die "--profile $PROFILE: the profiles are 1gbit, 100mbit and none" ;;
    esac
    case $UPLINK in
    1gbit) UP_RATE_BIT=1000000000 UP_BURST=512kb ;;
    100mbit) UP_RATE_BIT=100000000 UP_BURST=128kb ;;
    none) UP_RATE_BIT=0 UP_BURST= ;;
    *) die "--uplink $UPLINK: the rates are 1gbit, 100mbit and none" ;;
    esac
    [[ $STORE == dir || $STORE == garage ]] || die "--store $STORE: the stores are dir and garage"
    [[ $STATION_K =~ ^[1-9][0-9]*$ ]] || die "--station $STATION_K: give a station number (1, 2, ...)"
    [[ $SIZE_MIB =~ ^[1-9][0-9]*$ ]] || die "--size $SIZE_MIB: give a number of MiB"
}

need_root() {
    [[ $(id -u) == 0 ]] || die "needs root (it makes network namespaces); run it as root"
    command -v ip >/dev/null && command -v tc >/dev/null ||
        die "needs ip and tc: apt-get install iproute2 (scripts/setup.sh does)"
}

# The lab's namespaces that exist now.
lab_namespaces() {
    ip netns list | awk '{print $1}' | sort | grep -E "^${NAME}-(sw|srv|st[0-9]+)\$" || true
}

# Shapes dev DEV in namespace NS to the profile's rate (egress; tbf shapes what a
# device sends). The burst holds one 64 KiB GSO packet with room to spare (tbf drops
# a packet larger than its burst); `latency` bounds the queue.
shape() {
    local ns=$1 dev=$2
    ((RATE_BIT > 0)) || return 0
    ip netns exec "$ns" tc qdisc replace dev "$dev" root tbf rate "$RATE_BIT"bit burst "$BURST" latency 50ms
}

garage_dir() { echo "${TMPDIR:-/tmp}/$NAME-garage"; }

do_down() {
    local ns pids left=()
    mapfile -t left < <(lab_namespaces)
    # The cluster's nodes ran in the server's namespace: they are stopped with it.
    if ((${#left[@]} == 0)); then
        rm -rf "$(garage_dir)"
        return 0
    fi
    # Processes still inside keep the namespace's network alive: stop them.
    for ns in "${left[@]}"; do
        pids=$(ip netns pids "$ns" 2>/dev/null || true)
        [[ -z $pids ]] || kill -TERM $pids 2>/dev/null || true
    done
    local i
    for ((i = 0; i < 50; i++)); do
        pids=
        for ns in "${left[@]}"; do pids+=$(ip netns pids "$ns" 2>/dev/null || true); done
        [[ -n $pids ]] || break
        sleep 0.1
    done
    for ns in "${left[@]}"; do
        pids=$(ip netns pids "$ns" 2>/dev/null || true)
        [[ -z $pids ]] || kill -KILL $pids 2>/dev/null || true
        ip netns delete "$ns" 2>/dev/null || true
    done
    rm -rf "$(garage_dir)"
    left=()
    mapfile -t left < <(lab_namespaces)
    ((${#left[@]} == 0)) || die "could not delete namespaces ${left[*]}: see \`ip netns pids NS\`, then run down again"
}

# add_host NS PORT ADDR: a namespace with eth0 (ADDR/24), its veth peer PORT on br0.
add_host() {
    local ns=$1 port=$2 addr=$3 sw=$NAME-sw
    ip netns add "$ns"
    ip -n "$ns" link set lo up
    ip -n "$sw" link add "$port" type veth peer name eth0 netns "$ns"
    ip -n "$sw" link set "$port" master br0 up
    ip -n "$ns" addr add "$addr/24" dev eth0
    ip -n "$ns" link set eth0 up
}

reaches() { # reaches NS: true if NS gets an answer from 10.77.0.1
    local i err
    for ((i = 0; i < 3; i++)); do
        err=$(ip netns exec "$1" timeout 2 bash -c 'exec 3<>/dev/tcp/10.77.0.1/9' 2>&1) && return 0
        [[ $err == *"refused"* ]] && return 0
    done
    return 1
}

station_addr() { echo "10.77.0.$((10 + $1))"; }

lab_env() {
    local k ns=() addrs=()
    for ((k = 1; k <= STATIONS; k++)); do
        ns+=("$NAME-st$k")
        addrs+=("$(station_addr "$k")")
    done
    MBANK_LAB=$NAME
    MBANK_LAB_SCRIPT=$SELF
    MBANK_LAB_PROFILE=$PROFILE
    MBANK_LAB_RATE_BIT=$RATE_BIT
    MBANK_LAB_SERVER_NS=$NAME-srv
    MBANK_LAB_SERVER_ADDR=10.77.0.1
    MBANK_LAB_STATION_NS=${ns[*]}
    MBANK_LAB_STATION_ADDRS=${addrs[*]}
    MBANK_LAB_STORE=$STORE
    export MBANK_LAB MBANK_LAB_SCRIPT MBANK_LAB_PROFILE MBANK_LAB_RATE_BIT MBANK_LAB_SERVER_NS \
        MBANK_LAB_SERVER_ADDR MBANK_LAB_STATION_NS MBANK_LAB_STATION_ADDRS MBANK_LAB_STORE
}

# Starts the lab's Garage cluster in the server's namespace; sets and exports its
# variables (MBANK_LAB_STORE_URL, MBANK_LAB_GARAGE_DIR, the key).
garage_up() {
    local dir env eps
    dir=$(garage_dir)
    rm -rf "$dir"
    env=$(ip netns exec "$NAME-srv" env GARAGE_S3_HOST=10.77.0.1 "$(dirname "$SELF")/garage.sh" start "$dir") ||
        die "could not start the Garage cluster in $NAME-srv (see $dir/node*/log)"
    eps=$(sed -n "s/^GARAGE_ENDPOINTS='\(.*\)'\$/\1/p" <<<"$env" | tr ' ' ',')
    [[ -n $eps ]] || die "garage.sh start printed no endpoints:\n$env"
    MBANK_LAB_STORE_URL="s3://$(sed -n 's/^GARAGE_BUCKET=//p' <<<"$env")?endpoint=$eps&region=garage"
    MBANK_LAB_GARAGE_DIR=$dir
    AWS_ACCESS_KEY_ID=$(sed -n 's/^AWS_ACCESS_KEY_ID=//p' <<<"$env")
    AWS_SECRET_ACCESS_KEY=$(sed -n 's/^AWS_SECRET_ACCESS_KEY=//p' <<<"$env")
    export MBANK_LAB_STORE_URL MBANK_LAB_GARAGE_DIR AWS_ACCESS_KEY_ID AWS_SECRET_ACCESS_KEY
}

do_up() {
    do_down
    local sw=$NAME-sw k at ns dev
    # On any failure, leave nothing half made.
    trap 'do_down' ERR
    ip netns add "$sw"
    ip -n "$sw" link set lo up
    ip -n "$sw" link add br0 type bridge
    ip -n "$sw" link set br0 up
    add_host "$NAME-srv" p-srv 10.77.0.1
    if ((UP_RATE_BIT > 0)); then
        # The server's uplink: what it sends, and what the switch sends it.
        for at in "$NAME-srv eth0" "$sw p-srv"; do
            read -r ns dev <<<"$at"
            ip netns exec "$ns" tc qdisc replace dev "$dev" root tbf rate "$UP_RATE_BIT"bit burst "$UP_BURST" latency 50ms
        done
    fi
    for ((k = 1; k <= STATIONS; k++)); do
        add_host "$NAME-st$k" "p-st$k" "$(station_addr "$k")"
        shape "$NAME-st$k" eth0   # upload: station -> switch
        shape "$sw" "p-st$k"      # download: switch -> station
    done
    # Every station reaches the server: a TCP connection to a closed port is refused
    # at once when the link works (there is no ping here); bounded by 3 tries of 2 s.
    for ((k = 1; k <= STATIONS; k++)); do
        reaches "$NAME-st$k" || { do_down; die "station $k ($NAME-st$k) cannot reach the server at 10.77.0.1"; }
    done
    lab_env
    [[ $STORE != garage ]] || garage_up || { do_down; die "the Garage cluster did not start"; }
    trap - ERR
}

do_status() {
    local ns
    mapfile -t nss < <(lab_namespaces)
    ((${#nss[@]})) || { echo "lab $NAME: not up"; return 0; }
    for ns in "${nss[@]}"; do
        echo "== $ns"
        ip -n "$ns" -br addr show | grep -v '^lo ' || true
        ip netns exec "$ns" tc -s qdisc show | grep -A3 '^qdisc tbf' || true
        pids=$(ip netns pids "$ns" | tr '\n' ' ')
        [[ -z $pids ]] || echo "processes: $pids"
    done
}

resolve_ns() { # resolve_ns HOST: the namespace name of srv, stK or a full name
    case $1 in
    srv | sw | st[0-9]*) echo "$NAME-$1" ;;
    *) echo "$1" ;;
    esac
}

do_measure() {
    local srv=$NAME-srv st=$NAME-st$STATION_K dir port=8099 pid i down up
    ip netns list | grep -q "^$st\\b" || die "no namespace $st: is the lab $NAME up with at least $STATION_K station(s)?"
    dir=$(mktemp -d)
    head -c "$((SIZE_MIB * 1048576))" /dev/urandom >"$dir/blob"
    # A file server that also takes PUTs (read and dropped), for the upload.
    ip netns exec "$srv" python3 -c '
import http.server, sys
class H(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *a): pass
    def do_PUT(self):
        n = int(self.headers["Content-Length"])
        buf = bytearray(1 << 20)
        while n > 0:
            got = self.rfile.readinto(memoryview(buf)[:min(n, len(buf))])
            if not got: break
            n -= got
        self.send_response(204); self.end_headers()
http.server.ThreadingHTTPServer.allow_reuse_address = True
h = lambda *a, **k: H(*a, directory=sys.argv[1], **k)
http.server.ThreadingHTTPServer(("10.77.0.1", int(sys.argv[2])), h).serve_forever()
' "$dir" "$port" >/dev/null 2>&1 &
    pid=$!
    for ((i = 0; i < 100; i++)); do
        ip netns exec "$st" curl -s -o /dev/null "http://10.77.0.1:$port/" && break
        sleep 0.1
    done
    down=$(ip netns exec "$st" curl -sS -o /dev/null -w '%{speed_download}' "http://10.77.0.1:$port/blob")
    up=$(ip netns exec "$st" curl -sS -o /dev/null -H 'Expect:' -T "$dir/blob" -w '%{speed_upload}' "http://10.77.0.1:$port/x")
    kill "$pid" 2>/dev/null || true
    wait "$pid" 2>/dev/null || true
    rm -rf "$dir"
    local rate
    rate=$(ip netns exec "$st" tc qdisc show dev eth0 | sed -n 's/.* tbf .* rate \([^ ]*\) .*/\1/p')
    printf 'download %.1f Mbit/s, upload %.1f Mbit/s (%s MiB; tbf rate %s)\n' \
        "$(echo "$down * 8 / 1000000" | bc -l)" "$(echo "${up:-0} * 8 / 1000000" | bc -l)" "$SIZE_MIB" "${rate:-none}"
}

main() {
    local cmd=${1:-}
    [[ -n $cmd ]] || { usage >&2; exit 2; }
    shift
    case $cmd in
    -h | --help | help) usage; return 0 ;;
    esac
    parse "$@"
    need_root
    case $cmd in
    up)
        NAME=${NAME:-mbank-lab}
        do_up
        echo "lab $NAME up: $STATIONS station(s), profile $PROFILE, store $STORE" >&2
        local v
        local vars=(MBANK_LAB MBANK_LAB_SCRIPT MBANK_LAB_PROFILE MBANK_LAB_RATE_BIT MBANK_LAB_SERVER_NS
            MBANK_LAB_SERVER_ADDR MBANK_LAB_STATION_NS MBANK_LAB_STATION_ADDRS MBANK_LAB_STORE)
        [[ $STORE != garage ]] || vars+=(MBANK_LAB_STORE_URL MBANK_LAB_GARAGE_DIR AWS_ACCESS_KEY_ID AWS_SECRET_ACCESS_KEY)
        for v in "${vars[@]}"; do
            printf '%s=%q\n' "$v" "${!v}"
        done
        ;;
    down) NAME=${NAME:-mbank-lab}; do_down ;;
    status) NAME=${NAME:-mbank-lab}; do_status ;;
    exec)
        NAME=${NAME:-mbank-lab}
        ((${#CMD[@]} >= 2)) || die "exec needs HOST -- CMD..."
        local ns
        ns=$(resolve_ns "${CMD[0]}")
        [[ ${CMD[1]} == -- ]] && CMD=("${CMD[@]:2}") || CMD=("${CMD[@]:1}")
        ((${#CMD[@]})) || die "exec needs a command after HOST --"
        exec ip netns exec "$ns" "${CMD[@]}"
        ;;
    measure) NAME=${NAME:-mbank-lab}; do_measure ;;
    run)
        NAME=${NAME:-mbank-lab-$$}
        ((${#CMD[@]})) || die "run needs a command after --"
        trap 'do_down' EXIT
        do_up
        echo "lab $NAME up: $STATIONS station(s), profile $PROFILE, store $STORE" >&2
        # CMD runs as a child we wait for, so that a signal reaches this shell at once
        # (bash runs a trap only after a foreground child ends): SIGINT or SIGTERM is
        # passed on to CMD as SIGTERM (a background child ignores SIGINT), then the
        # lab goes down when CMD has ended. `<&0`: CMD keeps our standard input.
        local child status=0 sig=
        "${CMD[@]}" <&0 &
        child=$!
        trap 'sig=130; kill -TERM "$child" 2>/dev/null || true' INT
        trap 'sig=143; kill -TERM "$child" 2>/dev/null || true' TERM
        while :; do
            status=0
            wait "$child" || status=$?
            kill -0 "$child" 2>/dev/null || break
        done
        [[ -z $sig ]] || status=$sig
        exit "$status"
        ;;
    *) usage >&2; die "unknown command $cmd" ;;
    esac
}

main "$@"
