#!/usr/bin/env bash
# Installs what building and testing Machine Bank needs on a Debian 12 machine, and
# nothing when it is already there. Safe to run any number of times.
#
#   scripts/setup.sh            what the tests need
#   scripts/setup.sh --bench    also the peers the benchmarks compare against
#   scripts/setup.sh --no-garage  all but Garage (built from source, ~10 minutes, used
#                                 only by the S3 store tests; demo.sh needs none of it)
set -euo pipefail
bench=0 garage=1
for arg in "$@"; do
    case $arg in
    --bench) bench=1 ;;
    --no-garage) garage=0 ;;
    *)
        echo "usage: $0 [--bench] [--no-garage]" >&2
        exit 2
        ;;
    esac
done

# command  Debian package
needs=(
    "qemu-img qemu-utils"
    "qemu-io qemu-utils"
    "mkfs.ext4 e2fsprogs"
    "debugfs e2fsprogs"
    "sfdisk fdisk"
    "debootstrap debootstrap"
    "python3 python3"
    "strace strace"
    "nbdinfo libnbd-bin"
    "nbdcopy libnbd-bin"
    "nbdsh libnbd-bin"
    "/usr/lib/python3/dist-packages/nbd.py python3-libnbd"
    "fio fio"
    "openssl openssl"
    "curl curl"
    "ip iproute2"
    "tc iproute2"
    "bc bc"
    "sqlite3 sqlite3"
    "/usr/lib/postgresql/15/bin/initdb postgresql"
    "virt-xml-validate libvirt-clients"
    "xmllint libxml2-utils"
    "systemd-analyze systemd"
    "chromium chromium"
    "chromedriver chromium-driver"
    "/usr/lib/python3/dist-packages/selenium python3-selenium"
)
if ((bench)); then
    needs+=("restic restic" "borg borgbackup" "casync casync" "hyperfine hyperfine" "zstd zstd")
fi

missing=()
for pair in "${needs[@]}"; do
    read -r cmd pkg <<<"$pair"
    if [[ $cmd == /* ]]; then [[ -e $cmd ]] && continue; fi
    command -v "$cmd" >/dev/null 2>&1 || missing+=("$pkg")
done
if ((${#missing[@]})); then
    mapfile -t missing < <(printf '%s\n' "${missing[@]}" | sort -u)
    echo "setup: installing ${missing[*]}" >&2
    if [[ $(id -u) != 0 ]]; then
        echo "setup: need root to install Debian packages: ${missing[*]}" >&2
        exit 1
    fi
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi

if ! command -v cargo >/dev/null 2>&1; then
    echo "setup: cargo is missing; install the Rust toolchain (rustup) first" >&2
    exit 1
fi
for component in rustfmt clippy; do
    if ! rustup component list --installed 2>/dev/null | grep -q "^$component"; then
        rustup component add "$component"
    fi
done

# The test guest: QEMU (pinned so qemu-system-x86 and qemu-utils match), a Debian
# cloud kernel and a busybox initramfs, cached outside the repo.
"$(dirname "$0")/build-guest.sh" build >/dev/null
if ((garage)); then
    "$(dirname "$0")/garage.sh" install # the S3 store tests run a Garage cluster
fi
