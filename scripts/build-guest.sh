#!/usr/bin/env bash
# Builds (once) a small real Linux guest for the tests: Debian's cloud kernel plus a
# busybox initramfs whose /init runs one "job" picked on the kernel command line.
# Booted under QEMU TCG it reaches user space in a few seconds and checks disks that
# are handed to it as virtio-blk, for example over NBD.
#
#   scripts/build-guest.sh [build]         build if missing; print KERNEL=... INITRD=...
#   scripts/build-guest.sh --force         rebuild the initramfs and re-fetch the kernel
#   scripts/build-guest.sh paths           print the paths only (fails if not built)
#   scripts/build-guest.sh mkfs FILE [MiB] make FILE a fresh raw ext4 image (default 64)
#   scripts/build-guest.sh run JOB [--disk FILE | --nbd SOCKET] [APPEND...]
#                                           boot the guest by hand (JOB=shell for a prompt)
#
# The cache lives in ${MBANK_CACHE_DIR:-/var/cache/mbank-dev}/guest/:
#   vmlinuz         the kernel (bzImage) of linux-image-*-cloud-amd64
#   initramfs.img   busybox, the virtio modules and /init (cpio newc, gzip)
#   kernel/         the kernel package, extracted with dpkg-deb -x (never installed)
#   stamp           hash of this script and the kernel package; a change rebuilds
# Building goes to temporary names which are renamed at the end, under a lock, so
# concurrent callers are safe and an interrupted build leaves nothing half made.
#
# Kernel command line understood by /init (all optional but mbank.job):
#   mbank.job=ready|write|check|counter|shell
#   mbank.token=TEXT      write: content of /mnt/hello.txt (default "hello")
#   mbank.file=NAME:TEXT  write: also write /mnt/NAME containing TEXT (repeatable)
#   mbank.size_mib=N      write: size of /mnt/big.bin, pseudo-random (default 4)
#   mbank.dev=/dev/vda    write/check: the ext4 device
#   mbank.verbose         keep kernel messages on the console after boot
# Serial console markers (each on its own line):
#   MBANK-GUEST-READY                 /init reached, modules loaded
#   MBANK-JOB <name>                  the job starts
#   MBANK-MD5 <file> <md5>            write/check: md5 of a file on the disk
#   MBANK-FILE-BEGIN <file> / MBANK-FILE-END <file>   check: the file's content between
#   MBANK-COUNTER <n>                 counter: every 0.2 s, kept in memory only
#   MBANK-JOB-DONE                    the job finished
#   MBANK-JOB-FAILED <reason>         the job failed
# The guest powers off (poweroff -f) at the end of every job; with -no-reboot and
# panic=-1 QEMU exits on a kernel panic too.
#
# Boot command line (QEMU 7.2 and 10 alike):
#   qemu-system-x86_64 -accel tcg -cpu max -m 256 -smp 1 -nodefaults -no-reboot \
#     -display none -serial stdio -kernel K -initrd I \
#     -append "console=ttyS0 panic=-1 mbank.job=ready" \
#     -drive driver=raw,file.driver=nbd,file.server.type=unix,file.server.path=S,if=virtio
# or, for a raw file: -drive file=F,format=raw,if=virtio
set -euo pipefail
shopt -s inherit_errexit nullglob

CACHE_DIR=${MBANK_CACHE_DIR:-/var/cache/mbank-dev}
GUEST_DIR=$CACHE_DIR/guest
KERNEL=$GUEST_DIR/vmlinuz
INITRD=$GUEST_DIR/initramfs.img
STAMP=$GUEST_DIR/stamp
# Load order matters: each needs the ones before it.
MODULES=(virtio_ring virtio virtio_pci_modern_dev virtio_pci_legacy_dev virtio_pci virtio_blk)

log() { printf '[%(%H:%M:%S)T] build-guest: %s\n' -1 "$*" >&2; }
die() { log "ERROR: $*"; exit 1; }

print_paths() { printf 'KERNEL=%s\nINITRD=%s\n' "$KERNEL" "$INITRD"; }

# ---------------------------------------------------------------------------------
# Host packages

_apt_updated=
apt_install() {
    [[ $(id -u) == 0 ]] || die "need root to install Debian packages: $*"
    log "installing $*"
    if [[ -z $_apt_updated ]]; then apt-get update -qq >&2; _apt_updated=1; fi
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "$@" >&2
}

pkg_installed() { [[ $(dpkg-query -W -f='${Status}' "$1" 2>/dev/null) == "install ok installed" ]]; }

ensure_host_tools() {
    local missing=()
    # A machine may come with a newer qemu-utils (10.x, from backports) than Debian 12's
    # qemu-system-x86 (7.2), which it Breaks: installing qemu-system-x86 alone removes
    # it, and "apt-get install qemu-system-x86 qemu-utils" gives up ("held broken
    # packages"). So install both in one command, pinned to qemu-system-x86's
    # candidate version, allowing qemu-utils to go down to it: 7.2 of both.
    if ! command -v qemu-system-x86_64 >/dev/null 2>&1; then
        local v
        if [[ -z $_apt_updated ]]; then apt-get update -qq >&2; _apt_updated=1; fi
        v=$(apt-cache policy qemu-system-x86 | sed -n 's/^ *Candidate: //p')
        [[ -n $v && $v != "(none)" ]] || die "apt knows no qemu-system-x86"
        missing+=(--allow-downgrades "qemu-system-x86=$v" "qemu-utils=$v")
    elif ! command -v qemu-nbd >/dev/null 2>&1 || ! command -v qemu-img >/dev/null 2>&1; then
        missing+=(qemu-utils)
    fi
    pkg_installed busybox-static || missing+=(busybox-static)
    command -v cpio >/dev/null 2>&1 || missing+=(cpio)
    command -v mkfs.ext4 >/dev/null 2>&1 || missing+=(e2fsprogs)
    command -v gzip >/dev/null 2>&1 || missing+=(gzip)
    if ((${#missing[@]})); then
        apt_install "${missing[@]}"
    fi
    for c in qemu-system-x86_64 qemu-nbd qemu-img cpio mkfs.ext4 gzip; do
        command -v "$c" >/dev/null 2>&1 || die "$c is still missing after installing packages"
    done
    [[ -x /bin/busybox ]] || die "/bin/busybox missing (package busybox-static)"
}

# ---------------------------------------------------------------------------------
# The kernel package: linux-image-cloud-amd64 is a metapackage; its dependency is the
# real linux-image-<version>-cloud-amd64 that holds vmlinuz and the modules.

kernel_package_name() {
    local dep
    dep=$(apt-cache depends linux-image-cloud-amd64 2>/dev/null |
        sed -n 's/^ *Depends: \(linux-image-[0-9][^ ]*-cloud-amd64\)$/\1/p' | head -n1)
    if [[ -z $dep ]]; then
        if [[ -z $_apt_updated ]]; then apt-get update -qq >&2; _apt_updated=1; fi
        dep=$(apt-cache depends linux-image-cloud-amd64 2>/dev/null |
            sed -n 's/^ *Depends: \(linux-image-[0-9][^ ]*-cloud-amd64\)$/\1/p' | head -n1)
    fi
    [[ -n $dep ]] || die "cannot tell which package linux-image-cloud-amd64 depends on"
    printf '%s\n' "$dep"
}

# fetch_kernel TMP: leaves the extracted package in $GUEST_DIR/kernel (reused if there)
fetch_kernel() {
    local tmp=$1 pkg deb
    if [[ -f $GUEST_DIR/kernel/.package && -z ${FORCE:-} ]]; then
        return 0
    fi
    pkg=$(kernel_package_name)
    log "downloading $pkg"
    mkdir -p "$tmp/deb"
    # apt-get download runs as the _apt user when it can; let it write there.
    chmod 777 "$tmp/deb"
    (cd "$tmp/deb" && apt-get download -qq "$pkg" >&2 2>/dev/null) ||
        (cd "$tmp/deb" && apt-get update -qq >&2 && apt-get download -qq "$pkg" >&2) ||
        die "apt-get download $pkg failed"
    deb=("$tmp"/deb/*.deb)
    ((${#deb[@]} == 1)) || die "expected one .deb in $tmp/deb, found ${#deb[@]}"
    log "extracting $(basename "${deb[0]}")"
    dpkg-deb -x "${deb[0]}" "$tmp/kernel"
    dpkg-deb -f "${deb[0]}" Package Version >"$tmp/kernel/.package"
    rm -rf "$GUEST_DIR/kernel.old"
    [[ -e $GUEST_DIR/kernel ]] && mv "$GUEST_DIR/kernel" "$GUEST_DIR/kernel.old"
    mv "$tmp/kernel" "$GUEST_DIR/kernel"
    rm -rf "$GUEST_DIR/kernel.old"
}

# ---------------------------------------------------------------------------------
# The initramfs

write_init() {
    cat >"$1" <<'INIT'
#!/bin/sh
# /init of the Machine Bank test guest (made by scripts/build-guest.sh).
export PATH=/bin
mkdir -p /proc /sys /dev /mnt /tmp
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev

say() { echo "$*"; }
fail() {
    say "MBANK-JOB-FAILED $*"
    sync
    poweroff -f
    sleep 10
    exit 1
}

# Command line: mbank.job=, mbank.token=, mbank.file= (repeatable), mbank.size_mib=,
# mbank.dev=, mbank.verbose. Values cannot hold spaces.
JOB=ready TOKEN=hello SIZE_MIB=4 DEV=/dev/vda VERBOSE= FILES=
for arg in $(cat /proc/cmdline); do
    case $arg in
    mbank.job=*) JOB=${arg#mbank.job=} ;;
    mbank.token=*) TOKEN=${arg#mbank.token=} ;;
    mbank.file=*) FILES="$FILES ${arg#mbank.file=}" ;;
    mbank.size_mib=*) SIZE_MIB=${arg#mbank.size_mib=} ;;
    mbank.dev=*) DEV=${arg#mbank.dev=} ;;
    mbank.verbose) VERBOSE=1 ;;
    esac
done

for m in MODULES_PLACEHOLDER; do
    insmod /lib/modules/$m.ko || fail "insmod $m"
done
# Keep the console for our markers: only errors and worse from the kernel from now on.
[ -n "$VERBOSE" ] || echo 4 >/proc/sys/kernel/printk

say "MBANK-GUEST-READY"
say "MBANK-JOB $JOB"

wait_dev() {
    i=0
    while [ ! -b "$DEV" ]; do
        i=$((i + 1))
        [ $i -gt 100 ] && fail "no block device $DEV"
        sleep 0.1
    done
}

mount_disk() {
    wait_dev
    mount -t ext4 "$DEV" /mnt || fail "mount $DEV"
}

umount_disk() {
    sync
    umount /mnt || fail "umount /mnt"
}

md5_of() {
    sum=$(md5sum "/mnt/$1") || fail "md5sum $1"
    say "MBANK-MD5 $1 ${sum%% *}"
}

case $JOB in
ready)
    ;;
write)
    mount_disk
    printf '%s\n' "$TOKEN" >/mnt/hello.txt || fail "write hello.txt"
    for f in $FILES; do
        printf '%s\n' "${f#*:}" >"/mnt/${f%%:*}" || fail "write ${f%%:*}"
    done
    dd if=/dev/urandom of=/mnt/big.bin bs=1048576 count="$SIZE_MIB" 2>/dev/null ||
        fail "write big.bin"
    sync
    md5_of big.bin
    umount_disk
    ;;
check)
    mount_disk
    [ -f /mnt/hello.txt ] || fail "no hello.txt"
    say "MBANK-FILE-BEGIN hello.txt"
    cat /mnt/hello.txt
    say "MBANK-FILE-END hello.txt"
    for f in $FILES; do
        name=${f%%:*}
        say "MBANK-FILE-BEGIN $name"
        cat "/mnt/$name"
        say "MBANK-FILE-END $name"
    done
    if [ -f /mnt/big.bin ]; then md5_of big.bin; fi
    umount_disk
    ;;
counter)
    n=0
    while :; do
        n=$((n + 1))
        say "MBANK-COUNTER $n"
        sleep 0.2
    done
    ;;
shell)
    say "busybox shell; exit it to power off"
    setsid cttyhack sh -l
    ;;
*)
    fail "unknown job $JOB"
    ;;
esac

say "MBANK-JOB-DONE"
sync
poweroff -f
sleep 10
INIT
    sed -i "s/MODULES_PLACEHOLDER/${MODULES[*]}/" "$1"
    chmod 755 "$1"
}

# build_initramfs TMP OUT
build_initramfs() {
    local tmp=$1 out=$2 root=$1/root kdir moddir m src applet
    kdir=$GUEST_DIR/kernel
    moddir=$(printf '%s\n' "$kdir"/lib/modules/* | head -n1)
    [[ -d $moddir ]] || die "no lib/modules in the kernel package"
    mkdir -p "$root"/{bin,dev,proc,sys,mnt,tmp,lib/modules}
    cp /bin/busybox "$root/bin/busybox"
    for applet in $("$root/bin/busybox" --list); do
        [[ $applet == busybox ]] || ln -sf busybox "$root/bin/$applet"
    done
    for m in "${MODULES[@]}"; do
        src=$(find "$moddir/kernel" -name "$m.ko" -o -name "$m.ko.xz" -o -name "$m.ko.zst" -o -name "$m.ko.gz" | head -n1)
        [[ -n $src ]] || die "module $m not found under $moddir"
        # Decompress here: busybox insmod does not handle every compression.
        case $src in
        *.ko) cp "$src" "$root/lib/modules/$m.ko" ;;
        *.ko.xz) command -v xz >/dev/null || apt_install xz-utils; xz -dc "$src" >"$root/lib/modules/$m.ko" ;;
        *.ko.zst) command -v zstd >/dev/null || apt_install zstd; zstd -qdc "$src" >"$root/lib/modules/$m.ko" ;;
        *.ko.gz) gzip -dc "$src" >"$root/lib/modules/$m.ko" ;;
        esac
    done
    write_init "$root/init"
    (cd "$root" && find . -print0 | LC_ALL=C sort -z |
        cpio --null -o -H newc --owner=0:0 --quiet) | gzip -9n >"$out"
}

current_stamp() {
    { sha256sum "$0" | cut -d' ' -f1; cat "$GUEST_DIR/kernel/.package" 2>/dev/null; } | sha256sum | cut -d' ' -f1
}

# The guest is built for this script and kernel, and what running it needs is here.
up_to_date() {
    [[ -f $KERNEL && -f $INITRD && -f $STAMP && $(cat "$STAMP") == "$(current_stamp)" ]] || return 1
    local c
    for c in qemu-system-x86_64 qemu-nbd qemu-img mkfs.ext4; do
        command -v "$c" >/dev/null 2>&1 || return 1
    done
}

build() {
    mkdir -p "$GUEST_DIR"
    if [[ -z ${FORCE:-} ]] && up_to_date; then
        print_paths
        return 0
    fi
    exec 9>"$GUEST_DIR/.lock"
    flock 9
    # Someone else may have built it while we waited.
    if [[ -z ${FORCE:-} ]] && up_to_date; then
        print_paths
        return 0
    fi
    local start=$SECONDS tmp vmlinuz
    ensure_host_tools
    tmp=$(mktemp -d "$GUEST_DIR/.build.XXXXXX")
    BUILD_TMP=$tmp
    trap 'rm -rf "$BUILD_TMP"' EXIT
    fetch_kernel "$tmp"
    vmlinuz=("$GUEST_DIR"/kernel/boot/vmlinuz-*)
    ((${#vmlinuz[@]} == 1)) || die "expected one boot/vmlinuz-* in the kernel package"
    cp "${vmlinuz[0]}" "$tmp/vmlinuz"
    log "building the initramfs"
    build_initramfs "$tmp" "$tmp/initramfs.img"
    current_stamp >"$tmp/stamp"
    mv -f "$tmp/vmlinuz" "$KERNEL"
    mv -f "$tmp/initramfs.img" "$INITRD"
    mv -f "$tmp/stamp" "$STAMP"
    log "built in $((SECONDS - start)) s: $(sed -n 1,2p "$GUEST_DIR/kernel/.package" | tr '\n' ' ')"
    print_paths
}

mkfs_image() {
    local file=${1:?usage: build-guest.sh mkfs FILE [MiB]} mib=${2:-64}
    command -v mkfs.ext4 >/dev/null 2>&1 || apt_install e2fsprogs
    rm -f "$file"
    truncate -s "${mib}M" "$file"
    mkfs.ext4 -F -q "$file"
    printf '%s\n' "$file"
}

run_guest() {
    local job=${1:?usage: build-guest.sh run JOB [--disk FILE | --nbd SOCKET] [APPEND...]}
    shift
    local drive=() append=()
    while (($#)); do
        case $1 in
        --disk) drive=(-drive "file=$2,format=raw,if=virtio"); shift 2 ;;
        --nbd) drive=(-drive "driver=raw,file.driver=nbd,file.server.type=unix,file.server.path=$2,if=virtio"); shift 2 ;;
        *) append+=("$1"); shift ;;
        esac
    done
    build >/dev/null
    exec qemu-system-x86_64 -accel tcg -cpu max -m 256 -smp 1 -nodefaults -no-reboot \
        -display none -serial stdio -kernel "$KERNEL" -initrd "$INITRD" \
        -append "console=ttyS0 panic=-1 mbank.job=$job ${append[*]}" "${drive[@]}"
}

case ${1:-build} in
build) build ;;
--force) FORCE=1 build ;;
paths) [[ -f $KERNEL && -f $INITRD ]] || die "not built yet: run scripts/build-guest.sh"; print_paths ;;
mkfs) shift; mkfs_image "$@" ;;
run) shift; run_guest "$@" ;;
-h | --help) sed -n '2,/^set -euo/p' "$0" | sed '$d' | sed 's/^# \{0,1\}//' ;;
*) die "unknown command $1 (try --help)" ;;
esac
