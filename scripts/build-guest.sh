#!/usr/bin/env bash
# Builds (once) a small real Linux guest for the tests and benchmarks: Debian's cloud
# kernel plus a busybox initramfs whose /init runs one "job" picked on the kernel
# command line. Booted under QEMU TCG it reaches user space in a few seconds and checks
# disks that are handed to it as virtio-blk, for example over NBD.
#
# It can also boot like a real machine, with its root on the disk: `mbank.root=/dev/vda`
# makes /init load the virtio modules, mount the disk and switch_root into it, running
# the disk's own init. `rootdisk` builds such a disk: a Debian 12 system made with
# debootstrap (systemd as init, openssh-server, the same kernel's modules) whose
# mbank-job.service prints the same markers and runs the same jobs, on files in /srv/mbank.
# Under TCG its systemd takes about 37 s from switch_root to ready (the initramfs-only
# guest: about 4 s), so the tests use it only where booting a real system is the point.
#
#   scripts/build-guest.sh [build]         build if missing; print KERNEL=... INITRD=...
#   scripts/build-guest.sh --force         rebuild the initramfs and re-fetch the kernel
#   scripts/build-guest.sh paths           print the paths only (fails if not built)
#   scripts/build-guest.sh mkfs FILE [MiB] make FILE a fresh raw ext4 image (default 64)
#   scripts/build-guest.sh rootdisk [--force]
#                                           build the root disk if missing (--force: run
#                                           debootstrap again); print KERNEL=... INITRD=...
#                                           ROOTDISK=...; a few minutes the first time, a
#                                           few seconds after a change of this script
#   scripts/build-guest.sh run JOB [--root] [--disk FILE | --nbd SOCKET] [APPEND...]
#                                           boot the guest by hand (JOB=shell for a prompt);
#                                           --root boots with its root on the disk (without
#                                           --disk/--nbd: the cached root disk, -snapshot)
#
# The cache lives in ${MBANK_CACHE_DIR:-/var/cache/mbank-dev}/guest/:
#   vmlinuz         the kernel (bzImage) of linux-image-*-cloud-amd64
#   initramfs-<stamp>.img  busybox, the virtio modules and /init (cpio newc, gzip);
#                   <stamp> hashes this script and the kernel package, so a change builds
#                   a new one and worktrees with different versions of this script share
#                   the cache without rebuilding each other's (unused ones go after 7 days)
#   kernel/         the kernel package, extracted with dpkg-deb -x (never installed)
#   root-tree/      rootdisk: the debootstrap output, pristine (root-tree.params says how)
#   root.raw        rootdisk: the root disk, raw ext4 without a partition table, sparse
#   root.stamp      hash of this script, the kernel package and the root parameters
# Building goes to temporary names which are renamed at the end, under a lock, so
# concurrent callers are safe and an interrupted build leaves nothing half made.
# rootdisk needs root (debootstrap, chroot for depmod) but no loop mount: the image is
# made with mkfs.ext4 -d. Env for rootdisk: MBANK_GUEST_SUITE (bookworm),
# MBANK_GUEST_MIRROR (http://deb.debian.org/debian), MBANK_GUEST_PKGS (debootstrap
# --include, default openssh-server,ca-certificates), MBANK_GUEST_ROOT_SIZE (2G).
#
# Kernel command line understood by /init and by the root disk's mbank-job (all optional):
#   mbank.job=ready|write|check|counter|shell|none
#                         default ready (the initramfs) or none (the root disk: print the
#                         ready marker and keep running)
#   mbank.token=TEXT      write: content of hello.txt (default "hello")
#   mbank.file=NAME:TEXT  write: also write NAME containing TEXT (repeatable)
#   mbank.size_mib=N      write: size of big.bin, pseudo-random (default 4)
#   mbank.dev=/dev/vda    write/check: the ext4 device, mounted on /mnt. Default /dev/vda
#                         from the initramfs; with root on disk the default is no device:
#                         the files are in /srv/mbank on the root file system
#   mbank.verbose         keep kernel messages on the console after boot
#   mbank.root=/dev/vda   /init: mount this ext4 device as root (read-only unless `rw`,
#                         like Debian; its fstab remounts it) and switch_root into it
#   init=/sbin/init       with mbank.root: the init to run on the disk
# The root disk also masks serial-getty@ttyS0 and sets systemd's ShowStatus=no to keep
# the console for the markers; add systemd.show_status=1 to see the boot's progress.
# Serial console markers (each on its own line):
#   MBANK-SWITCH-ROOT <dev>           /init: switching to the root on <dev>
#   MBANK-GUEST-READY                 /init reached and modules loaded or, with the root
#                                     on disk, the disk's system booted (after
#                                     multi-user.target)
#   MBANK-JOB <name>                  the job starts
#   MBANK-MD5 <file> <md5>            write/check: md5 of a file on the disk
#   MBANK-FILE-BEGIN <file> / MBANK-FILE-END <file>   check: the file's content between
#   MBANK-COUNTER <n>                 counter: every 0.2 s, kept in memory only
#   MBANK-JOB-DONE                    the job finished
#   MBANK-JOB-FAILED <reason>         the job failed
# The guest powers off (poweroff -f) at the end of every job; with -no-reboot and
# panic=-1 QEMU exits on a kernel panic too. With the root on disk, poweroff -f goes
# through systemd, which kills the processes and unmounts the disk first.
#
# Boot command line (QEMU 7.2 and 10 alike):
#   qemu-system-x86_64 -accel tcg -cpu max -m 256 -smp 1 -nodefaults -no-reboot \
#     -display none -serial stdio -kernel K -initrd I \
#     -append "console=ttyS0 panic=-1 mbank.job=ready" \
#     -drive driver=raw,file.driver=nbd,file.server.type=unix,file.server.path=S,if=virtio
# or, for a raw file: -drive file=F,format=raw,if=virtio
# With the root disk: the same, with "mbank.root=/dev/vda" added to -append and the
# root disk (or an NBD export of it) as the drive.
set -euo pipefail
shopt -s inherit_errexit nullglob

CACHE_DIR=${MBANK_CACHE_DIR:-/var/cache/mbank-dev}
GUEST_DIR=$CACHE_DIR/guest
KERNEL=$GUEST_DIR/vmlinuz
INITRD= # set_initrd: its name holds the stamp
ROOT_TREE=$GUEST_DIR/root-tree
ROOT_IMG=$GUEST_DIR/root.raw
ROOT_STAMP=$GUEST_DIR/root.stamp
ROOT_SUITE=${MBANK_GUEST_SUITE:-bookworm}
ROOT_MIRROR=${MBANK_GUEST_MIRROR:-http://deb.debian.org/debian}
ROOT_PKGS=${MBANK_GUEST_PKGS:-openssh-server,ca-certificates}
ROOT_SIZE=${MBANK_GUEST_ROOT_SIZE:-2G}
# Fixed so that rebuilt root disks are as alike as mkfs allows.
ROOT_UUID=6d62616e-6b00-4775-6573-740000000001
# Load order matters: each needs the ones before it.
MODULES=(virtio_ring virtio virtio_pci_modern_dev virtio_pci_legacy_dev virtio_pci virtio_blk)

log() { printf '[%(%H:%M:%S)T] build-guest: %s\n' -1 "$*" >&2; }
die() { log "ERROR: $*"; exit 1; }

print_paths() { printf 'KERNEL=%s\nINITRD=%s\n' "$KERNEL" "$INITRD"; }

# Temporary build directories, removed on exit (--one-file-system: debootstrap mounts
# /proc and /sys inside its target while it works).
TMPS=()
cleanup() { local d; for d in "${TMPS[@]}"; do rm -rf --one-file-system "$d"; done; }
trap cleanup EXIT

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

# The jobs, shared by the initramfs /init and the root disk's mbank-job: POSIX sh that
# runs under busybox ash and dash. The caller sets JOB_DEFAULT, DEV_DEFAULT, IN_ROOT
# (empty in the initramfs) and defines power_off and run_shell.
write_job_code() {
    cat <<'JOBS'
say() { echo "$*"; }
fail() {
    say "MBANK-JOB-FAILED $*"
    sync
    power_off
    exit 1
}

# Command line: mbank.job=, mbank.token=, mbank.file= (repeatable), mbank.size_mib=,
# mbank.dev=, mbank.verbose, mbank.root=, init=, ro/rw. Values cannot hold spaces.
JOB=$JOB_DEFAULT TOKEN=hello SIZE_MIB=4 DEV=$DEV_DEFAULT VERBOSE= FILES= ROOT= INIT=/sbin/init RW=
for arg in $(cat /proc/cmdline); do
    case $arg in
    mbank.job=*) JOB=${arg#mbank.job=} ;;
    mbank.token=*) TOKEN=${arg#mbank.token=} ;;
    mbank.file=*) FILES="$FILES ${arg#mbank.file=}" ;;
    mbank.size_mib=*) SIZE_MIB=${arg#mbank.size_mib=} ;;
    mbank.dev=*) DEV=${arg#mbank.dev=} ;;
    mbank.verbose) VERBOSE=1 ;;
    mbank.root=*) ROOT=${arg#mbank.root=} ;;
    init=*) INIT=${arg#init=} ;;
    rw) RW=1 ;;
    ro) RW= ;;
    esac
done
# The job's files: on the device DEV mounted on /mnt, or (root on disk, no mbank.dev)
# in /srv/mbank on the root file system.
if [ -n "$DEV" ]; then DIR=/mnt; else DIR=/srv/mbank; fi

wait_dev() {
    i=0
    while [ ! -b "$1" ]; do
        i=$((i + 1))
        [ $i -gt 100 ] && fail "no block device $1"
        sleep 0.1
    done
}

mount_disk() {
    if [ -n "$DEV" ]; then
        wait_dev "$DEV"
        mount -t ext4 "$DEV" /mnt || fail "mount $DEV"
    else
        mkdir -p "$DIR" || fail "mkdir $DIR"
    fi
}

umount_disk() {
    sync
    if [ -n "$DEV" ]; then umount /mnt || fail "umount /mnt"; fi
}

md5_of() {
    sum=$(md5sum "$DIR/$1") || fail "md5sum $1"
    say "MBANK-MD5 $1 ${sum%% *}"
}

run_job() {
    say "MBANK-GUEST-READY"
    [ "$JOB" = none ] && return 0
    say "MBANK-JOB $JOB"
    case $JOB in
    ready)
        ;;
    write)
        mount_disk
        printf '%s\n' "$TOKEN" >"$DIR/hello.txt" || fail "write hello.txt"
        for f in $FILES; do
            printf '%s\n' "${f#*:}" >"$DIR/${f%%:*}" || fail "write ${f%%:*}"
        done
        dd if=/dev/urandom of="$DIR/big.bin" bs=1048576 count="$SIZE_MIB" 2>/dev/null ||
            fail "write big.bin"
        sync
        md5_of big.bin
        umount_disk
        ;;
    check)
        mount_disk
        [ -f "$DIR/hello.txt" ] || fail "no hello.txt"
        say "MBANK-FILE-BEGIN hello.txt"
        cat "$DIR/hello.txt"
        say "MBANK-FILE-END hello.txt"
        for f in $FILES; do
            name=${f%%:*}
            say "MBANK-FILE-BEGIN $name"
            cat "$DIR/$name"
            say "MBANK-FILE-END $name"
        done
        if [ -f "$DIR/big.bin" ]; then md5_of big.bin; fi
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
        say "shell; exit it to power off"
        run_shell
        ;;
    *)
        fail "unknown job $JOB"
        ;;
    esac

    say "MBANK-JOB-DONE"
    sync
    power_off
}
JOBS
}

write_init() {
    {
        cat <<'INIT'
#!/bin/sh
# /init of the Machine Bank test guest (made by scripts/build-guest.sh).
export PATH=/bin
mkdir -p /proc /sys /dev /mnt /tmp /newroot
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev

JOB_DEFAULT=ready DEV_DEFAULT=/dev/vda IN_ROOT=
power_off() {
    poweroff -f
    sleep 10
}
run_shell() { setsid cttyhack sh -l; }
INIT
        write_job_code
        cat <<'INIT'

for m in MODULES_PLACEHOLDER; do
    insmod /lib/modules/$m.ko || fail "insmod $m"
done
# Keep the console for our markers: only errors and worse from the kernel from now on.
[ -n "$VERBOSE" ] || echo 4 >/proc/sys/kernel/printk

if [ -n "$ROOT" ]; then
    # Boot like a real machine: the disk's own system, read-only until its fstab says.
    wait_dev "$ROOT"
    if [ -n "$RW" ]; then mode=rw; else mode=ro; fi
    mount -t ext4 -o "$mode" "$ROOT" /newroot || fail "mount $ROOT"
    [ -x "/newroot$INIT" ] || [ -L "/newroot$INIT" ] || fail "no $INIT on $ROOT"
    say "MBANK-SWITCH-ROOT $ROOT"
    mount --move /dev /newroot/dev || fail "move /dev"
    umount /sys /proc
    exec switch_root /newroot "$INIT"
fi

run_job
INIT
    } >"$1"
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

set_initrd() { INITRD=$GUEST_DIR/initramfs-$(current_stamp | cut -c1-16).img; }

# The guest is built for this script and kernel, and what running it needs is here.
up_to_date() {
    set_initrd
    [[ -f $KERNEL && -f $INITRD ]] || return 1
    touch -c "$INITRD" 2>/dev/null || true # in use: keep it from the 7-day clean-up
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
    TMPS+=("$tmp")
    fetch_kernel "$tmp"
    vmlinuz=("$GUEST_DIR"/kernel/boot/vmlinuz-*)
    ((${#vmlinuz[@]} == 1)) || die "expected one boot/vmlinuz-* in the kernel package"
    cp "${vmlinuz[0]}" "$tmp/vmlinuz"
    log "building the initramfs"
    build_initramfs "$tmp" "$tmp/initramfs.img"
    set_initrd
    mv -f "$tmp/vmlinuz" "$KERNEL"
    mv -f "$tmp/initramfs.img" "$INITRD"
    find "$GUEST_DIR" -maxdepth 1 -name 'initramfs-*.img' -mtime +7 -delete
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

# ---------------------------------------------------------------------------------
# The root disk: a Debian system that boots its own init (systemd) from /dev/vda.

print_root_paths() { print_paths; printf 'ROOTDISK=%s\n' "$ROOT_IMG"; }

root_params() {
    printf 'suite=%s mirror=%s include=%s\n' "$ROOT_SUITE" "$ROOT_MIRROR" "$ROOT_PKGS"
}

root_stamp() {
    { current_stamp; root_params; echo "size=$ROOT_SIZE"; } | sha256sum | cut -d' ' -f1
}

root_up_to_date() {
    [[ -f $ROOT_IMG && -f $ROOT_STAMP && $(cat "$ROOT_STAMP") == "$(root_stamp)" ]]
}

# The debootstrap output, kept pristine in $ROOT_TREE and reused while the parameters
# are the same (making it takes a few minutes).
build_root_tree() {
    if [[ -z ${ROOT_FORCE:-} && -d $ROOT_TREE && $(cat "$GUEST_DIR/root-tree.params" 2>/dev/null) == "$(root_params)" ]]; then
        return 0
    fi
    command -v debootstrap >/dev/null 2>&1 || apt_install debootstrap
    local tmp
    tmp=$(mktemp -d "$GUEST_DIR/.root-tree.XXXXXX")
    TMPS+=("$tmp")
    log "debootstrap $ROOT_SUITE +$ROOT_PKGS from $ROOT_MIRROR (a few minutes)"
    if ! debootstrap --include="$ROOT_PKGS" "$ROOT_SUITE" "$tmp/root" "$ROOT_MIRROR" >"$tmp/debootstrap.log" 2>&1; then
        tail -n 30 "$tmp/debootstrap.log" >&2
        die "debootstrap failed"
    fi
    rm -f "$tmp"/root/var/cache/apt/archives/*.deb
    rm -f "$GUEST_DIR/root-tree.params"
    rm -rf --one-file-system "$ROOT_TREE"
    mv "$tmp/root" "$ROOT_TREE"
    root_params >"$GUEST_DIR/root-tree.params"
}

# The job runner on the root disk: the same jobs as the initramfs, as a systemd service.
write_root_job() {
    {
        cat <<'JOB'
#!/bin/sh
# mbank-job: the Machine Bank test guest's job, run by mbank-job.service once the
# system is up (made by scripts/build-guest.sh; see its header for the command line).
export PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin
exec </dev/null >/dev/console 2>&1
JOB_DEFAULT=none DEV_DEFAULT= IN_ROOT=1
power_off() {
    # systemd: stop nothing, but kill every process and unmount before powering off.
    poweroff -f
    sleep 60
}
run_shell() { setsid -w -c bash -l <>/dev/ttyS0 >&0 2>&0; }
JOB
        write_job_code
        echo
        echo 'run_job'
    } >"$1"
    chmod 755 "$1"
}

# customize_root ROOT: the kernel's modules, the job service, fstab, hostname.
customize_root() {
    local root=$1 kdir=$GUEST_DIR/kernel kver
    kver=$(basename "$(printf '%s\n' "$kdir"/lib/modules/* | head -n1)")
    [[ -d $kdir/lib/modules/$kver ]] || die "no lib/modules in the kernel package"
    # The kernel we boot with -kernel, installed as the package would (lib is usr/lib).
    mkdir -p "$root/usr/lib/modules" "$root/boot"
    cp -a "$kdir/lib/modules/$kver" "$root/usr/lib/modules/"
    cp -a "$kdir"/boot/. "$root/boot/"
    ln -sfn "boot/vmlinuz-$kver" "$root/vmlinuz"
    chroot "$root" /sbin/depmod -a "$kver" || die "depmod in the root tree failed"

    printf 'LABEL=mbank-root / ext4 errors=remount-ro 0 1\n' >"$root/etc/fstab"
    echo mbank-guest >"$root/etc/hostname"
    printf '127.0.0.1\tlocalhost\n127.0.1.1\tmbank-guest\n::1\tlocalhost ip6-localhost ip6-loopback\n' >"$root/etc/hosts"
    mkdir -p "$root/srv/mbank" "$root/usr/local/sbin" "$root/etc/systemd/system/multi-user.target.wants" \
        "$root/etc/systemd/system.conf.d"
    write_root_job "$root/usr/local/sbin/mbank-job"
    cat >"$root/etc/systemd/system/mbank-job.service" <<'UNIT'
[Unit]
Description=Machine Bank test guest: ready marker and job (mbank.job=)
# Ready means booted: after everything multi-user.target pulls in has started.
After=multi-user.target

[Service]
Type=simple
ExecStart=/usr/local/sbin/mbank-job

[Install]
WantedBy=multi-user.target
UNIT
    ln -sfn ../mbank-job.service "$root/etc/systemd/system/multi-user.target.wants/mbank-job.service"
    # The serial console is for the markers: no login prompt there, no status lines.
    ln -sfn /dev/null "$root/etc/systemd/system/serial-getty@ttyS0.service"
    printf '[Manager]\nShowStatus=no\n' >"$root/etc/systemd/system.conf.d/mbank.conf"
}

build_rootdisk() {
    build >/dev/null
    if [[ -z ${ROOT_FORCE:-} ]] && root_up_to_date; then
        print_root_paths
        return 0
    fi
    [[ $(id -u) == 0 ]] || die "need root to build the root disk (debootstrap, chroot)"
    exec 8>"$GUEST_DIR/.root.lock"
    flock 8
    if [[ -z ${ROOT_FORCE:-} ]] && root_up_to_date; then
        print_root_paths
        return 0
    fi
    local start=$SECONDS tmp
    build_root_tree
    tmp=$(mktemp -d "$GUEST_DIR/.root.XXXXXX")
    TMPS+=("$tmp")
    log "assembling the root disk"
    cp -a "$ROOT_TREE" "$tmp/root"
    customize_root "$tmp/root"
    truncate -s "$ROOT_SIZE" "$tmp/root.raw"
    mkfs.ext4 -q -F -L mbank-root -U "$ROOT_UUID" -E "hash_seed=$ROOT_UUID" -d "$tmp/root" "$tmp/root.raw"
    root_stamp >"$tmp/root.stamp"
    mv -f "$tmp/root.raw" "$ROOT_IMG"
    mv -f "$tmp/root.stamp" "$ROOT_STAMP"
    log "root disk built in $((SECONDS - start)) s: $ROOT_SIZE, $(du -sh "$ROOT_IMG" | cut -f1) allocated"
    print_root_paths
}

run_guest() {
    local job=${1:?usage: build-guest.sh run JOB [--root] [--disk FILE | --nbd SOCKET] [APPEND...]}
    shift
    local drive=() append=() root=
    while (($#)); do
        case $1 in
        --root) root=1; shift ;;
        --disk) drive=(-drive "file=$2,format=raw,if=virtio"); shift 2 ;;
        --nbd) drive=(-drive "driver=raw,file.driver=nbd,file.server.type=unix,file.server.path=$2,if=virtio"); shift 2 ;;
        *) append+=("$1"); shift ;;
        esac
    done
    if [[ -n $root ]]; then
        build_rootdisk >/dev/null
        append=(mbank.root=/dev/vda "${append[@]}")
        # Never change the cached root disk: writes go to a temporary overlay.
        ((${#drive[@]})) || drive=(-drive "file=$ROOT_IMG,format=raw,if=virtio,snapshot=on")
    else
        build >/dev/null
    fi
    exec qemu-system-x86_64 -accel tcg -cpu max -m 256 -smp 1 -nodefaults -no-reboot \
        -display none -serial stdio -kernel "$KERNEL" -initrd "$INITRD" \
        -append "console=ttyS0 panic=-1 mbank.job=$job ${append[*]}" "${drive[@]}"
}

case ${1:-build} in
build) build ;;
--force) FORCE=1 build ;;
paths) set_initrd; [[ -f $KERNEL && -f $INITRD ]] || die "not built yet: run scripts/build-guest.sh"; print_paths ;;
mkfs) shift; mkfs_image "$@" ;;
rootdisk)
    [[ ${2:-} == --force ]] && ROOT_FORCE=1
    build_rootdisk
    ;;
run) shift; run_guest "$@" ;;
-h | --help) sed -n '2,/^set -euo/p' "$0" | sed '$d' | sed 's/^# \{0,1\}//' ;;
*) die "unknown command $1 (try --help)" ;;
esac
