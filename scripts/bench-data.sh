#!/usr/bin/env bash
# Build (once, cached) the benchmark data set in /var/cache/mbank-dev/bench/:
#   base-root/  Debian 12 root tree made by debootstrap
#   base.raw    2 GiB raw ext4 image of base-root (mkfs.ext4 -d, no partition table)
#   v2-root/    base-root plus extra packages (what a second user would have)
#   v2.raw      the same change applied to a *copy of base.raw*, so unchanged
#               files keep their block offsets (realistic for block dedup)
# Re-running is cheap: finished pieces are kept; pieces are built under *.tmp
# names and renamed at the end, so a killed run just restarts that piece.
#
# Env: MBANK_CACHE_DIR (default /var/cache/mbank-dev), BENCH_SUITE (bookworm),
#      BENCH_MIRROR, BENCH_VARIANT (debootstrap variant, default "default"),
#      BENCH_BASE_PKGS (debootstrap --include), BENCH_EXTRA_PKGS (v2), BENCH_IMG_SIZE (2G),
#      BENCH_V2_METHOD=auto|fuse2fs|debugfs|mkfs (how v2.raw is made; see build_v2).
set -euo pipefail
# shellcheck source=scripts/lib.sh
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

SUITE=${BENCH_SUITE:-bookworm}
MIRROR=${BENCH_MIRROR:-http://deb.debian.org/debian}
VARIANT=${BENCH_VARIANT:-default}
# Base = debootstrap default (priority important) + what a cloud VM image has.
BASE_PKGS=${BENCH_BASE_PKGS:-linux-image-cloud-amd64,openssh-server,ca-certificates}
EXTRA_PKGS=${BENCH_EXTRA_PKGS:-python3 python3-venv git build-essential curl vim-nox}
IMG_SIZE=${BENCH_IMG_SIZE:-2G}
V2_METHOD=${BENCH_V2_METHOD:-auto}
# Fixed UUID / hash seed so rebuilt images are as reproducible as mkfs allows.
FS_UUID=6d62616e-6b00-4265-6e63-680000000001

[[ $EUID == 0 ]] || die "must run as root (debootstrap, chroot, fuse)"
mkdir -p "$BENCH_DIR"
cd "$BENCH_DIR"
exec 9>.lock
flock -n 9 || { log "waiting for another bench-data.sh ($BENCH_DIR/.lock)"; flock 9; }

# Changing any parameter invalidates the whole cached set.
PARAMS="suite=$SUITE mirror=$MIRROR variant=$VARIANT base=$BASE_PKGS extra=$EXTRA_PKGS size=$IMG_SIZE"
if [[ $(cat .params 2>/dev/null) != "$PARAMS" ]]; then
    if compgen -G 'base*' >/dev/null || compgen -G 'v2*' >/dev/null; then
        log "data set parameters changed: rebuilding everything"
        rm -rf --one-file-system base-root base.raw v2-root v2.raw v2.method
    fi
    echo "$PARAMS" >.params
fi

summary() {
    local p
    for p in base-root v2-root base.raw v2.raw; do
        printf '%-40s %10s apparent %10s allocated\n' "$BENCH_DIR/$p" \
            "$(human "$(bytes_of "$p")")" "$(human "$(alloc_of "$p")")"
    done
    [[ -f v2.method ]] && printf 'v2.raw built with method: %s\n' "$(cat v2.method)"
    return 0
}
if [[ -d base-root && -f base.raw && -d v2-root && -f v2.raw && ! base.raw -nt v2.raw ]]; then
    summary; exit 0
fi

need debootstrap
need mkfs.ext4 e2fsprogs
need debugfs e2fsprogs
T0=$SECONDS

# --- mounts: everything we mount is recorded and unmounted on exit (innermost first)
MOUNTS=()
FUSE_PID=
unmount_all() {
    local i
    for ((i = ${#MOUNTS[@]} - 1; i >= 0; i--)); do umount -l "${MOUNTS[i]}" 2>/dev/null || true; done
    MOUNTS=()
    if [[ -n $FUSE_PID ]]; then wait "$FUSE_PID" 2>/dev/null || true; fi
}
at_exit unmount_all
mnt() { mount "$@"; MOUNTS+=("${!#}"); }
# umount_to N: unmount (innermost first) until only the first N mounts remain.
umount_to() {
    while ((${#MOUNTS[@]} > $1)); do
        umount "${MOUNTS[-1]}"
        unset 'MOUNTS[-1]'
    done
}

# mkfs_image ROOTDIR IMAGE: fresh sparse ext4 image populated from ROOTDIR.
mkfs_image() {
    rm -f "$2"
    truncate -s "$IMG_SIZE" "$2"
    mkfs.ext4 -q -F -L mbank-bench -U "$FS_UUID" -E "hash_seed=$FS_UUID" -d "$1" "$2"
}

# chroot_install ROOT: apt-get install $EXTRA_PKGS inside ROOT (with recommends,
# like a user would), then apt-get clean (the freed blocks keep the old .deb
# bytes, as on a real guest disk).
chroot_install() {
    local root=$1 n=${#MOUNTS[@]}
    mnt -t proc proc "$root/proc"
    mnt -t sysfs sys "$root/sys"
    mnt --bind /dev "$root/dev"
    mnt --bind /dev/pts "$root/dev/pts"
    printf '#!/bin/sh\nexit 101\n' >"$root/usr/sbin/policy-rc.d"
    chmod 755 "$root/usr/sbin/policy-rc.d"
    # shellcheck disable=SC2086 # word splitting of the package list is intended
    chroot "$root" /usr/bin/env -i PATH=/usr/sbin:/usr/bin:/sbin:/bin DEBIAN_FRONTEND=noninteractive \
        sh -c "apt-get update -q && apt-get install -y -q -o Dpkg::Options::=--force-unsafe-io $EXTRA_PKGS && apt-get clean" >&2
    rm -f "$root/usr/sbin/policy-rc.d"
    umount_to "$n"
}

# debugfs_apply OLDTREE NEWTREE IMAGE: write the differences OLD->NEW into IMAGE
# (which holds OLDTREE) with debugfs, without mounting. Limits: hard links in new
# files become copies, new xattrs/capabilities are not copied, only f/d/l types.
debugfs_apply() {
    local old=$1 new=$2 img=$3 work
    make_tmp work
    # One line per entry: path<TAB>type size mtime mode uid gid linktarget
    local fmt='%P\t%y %s %T@ %m %U %G %l\n'
    (cd "$old" && find . -mindepth 1 -printf "$fmt" | LC_ALL=C sort) >"$work/old"
    (cd "$new" && find . -mindepth 1 -printf "$fmt" | LC_ALL=C sort) >"$work/new"
    # Paths only in old (removed), deepest first.
    LC_ALL=C join -t $'\t' -v1 "$work/old" "$work/new" | cut -f1 | LC_ALL=C sort -r |
        while IFS= read -r p; do
            if [[ -d $old/$p && ! -L $old/$p ]]; then echo "rmdir \"/$p\""; else echo "rm \"/$p\""; fi
        done >"$work/cmds"
    # New or changed entries, parents first (sorted order).
    # (-e: tabs are IFS whitespace, so an empty middle field would be lost)
    LC_ALL=C join -t $'\t' -a2 -e '?' -o 2.1,1.2,2.2 "$work/old" "$work/new" |
        while IFS=$'\t' read -r p o n; do
            [[ $o == '?' ]] && o=
            [[ $o == "$n" ]] && continue
            [[ $p == *'"'* || $p == *\\* ]] && { log "skip odd name: $p"; continue; }
            local src=$new/$p t=${n%% *} dir base mode uid gid mt
            read -r _ _ mt _ uid gid _ <<<"$n"
            mode=$(stat -c '%f' "$src")
            if [[ -n $o && ${o%% *} != "$t" ]]; then # type changed
                if [[ ${o%% *} == d ]]; then echo "rmdir \"/$p\""; else echo "rm \"/$p\""; fi
                o=
            fi
            case $t in
            d) [[ -z $o ]] && echo "mkdir \"/$p\"" ;;
            l)
                [[ -n $o ]] && echo "rm \"/$p\""
                echo "symlink \"/$p\" \"$(readlink "$src")\"" ;;
            f)
                if [[ -z $o ]] || ! cmp -s "$old/$p" "$src"; then
                    [[ -n $o ]] && echo "rm \"/$p\""
                    dir=$(dirname "/$p") base=${p##*/}
                    echo "cd \"$dir\""
                    echo "write \"$src\" \"$base\""
                    echo "cd /"
                fi ;;
            *) log "skip unsupported type $t: $p"; continue ;;
            esac
            echo "sif \"/$p\" mode 0$(printf '%o' "0x$mode")"
            echo "sif \"/$p\" uid $uid"
            echo "sif \"/$p\" gid $gid"
            echo "sif \"/$p\" mtime @${mt%.*}"
        done >>"$work/cmds"
    log "debugfs: applying $(grep -c -E '^(write|mkdir|symlink|rm|rmdir) ' "$work/cmds") changes"
    debugfs -w -f "$work/cmds" "$img" >"$work/debugfs.log" 2>&1
    if grep -E ': (File not found|Ext2 file already exists|Could not allocate)' "$work/debugfs.log" >&2; then
        die "debugfs reported errors (see above)"
    fi
}

# build_v2: make v2-root.tmp and v2.raw.tmp. Methods, most realistic first:
#   fuse2fs: mount a copy of base.raw with fuse2fs and apt-get install inside it;
#            only what apt touches moves (closest to a real guest's disk).
#   debugfs: apt-get install into a copy of base-root, then write the changed
#            files into a copy of base.raw with debugfs -w (no mount needed).
#   mkfs:    rebuild the image from the modified tree with mkfs.ext4 -d. WORST
#            for block dedup: file placement is recomputed, so most blocks move.
build_v2() {
    local method=$V2_METHOD m logs
    make_tmp logs
    rm -rf --one-file-system v2-root.tmp v2.raw.tmp
    if [[ $method == auto || $method == fuse2fs ]]; then
        need fuse2fs
        cp --sparse=always base.raw v2.raw.tmp
        make_tmp m
        # allow_other: apt downloads as user _apt; -f keeps it ours to wait for.
        fuse2fs -f -o allow_other v2.raw.tmp "$m" >"$logs/fuse2fs.log" 2>&1 &
        FUSE_PID=$!
        for _ in $(seq 50); do mountpoint -q "$m" && break; sleep 0.2; done
        if mountpoint -q "$m"; then
            MOUNTS+=("$m") method=fuse2fs
        else
            cat "$logs/fuse2fs.log" >&2
            kill "$FUSE_PID" 2>/dev/null || true
            wait "$FUSE_PID" 2>/dev/null || true
            FUSE_PID=
            [[ $method == auto ]] || die "fuse2fs mount failed"
            log "fuse2fs mount failed (no FUSE here?); falling back to debugfs"
            method=debugfs
        fi
    fi
    case $method in
    fuse2fs)
        chroot_install "$m"
        log "copying the v2 tree out of the image"
        mkdir v2-root.tmp
        cp -a "$m/." v2-root.tmp/
        rmdir v2-root.tmp/lost+found
        umount_to 0 # the fuse mount; fuse2fs flushes and exits
        wait "$FUSE_PID"
        FUSE_PID=
        ;;
    debugfs | mkfs)
        cp -a base-root v2-root.tmp
        chroot_install v2-root.tmp
        if [[ $method == debugfs ]]; then
            cp --sparse=always base.raw v2.raw.tmp
            debugfs_apply base-root v2-root.tmp v2.raw.tmp
        else
            mkfs_image v2-root.tmp v2.raw.tmp
        fi
        ;;
    *) die "unknown BENCH_V2_METHOD=$method" ;;
    esac
    # Fix only summary counters (0 = clean, 1 = fixed); anything worse is a bug.
    local rc=0
    e2fsck -fy v2.raw.tmp >"$logs/e2fsck.log" 2>&1 || rc=$?
    ((rc <= 1)) || { cat "$logs/e2fsck.log" >&2; die "e2fsck v2.raw failed ($rc)"; }
    echo "$method" >v2.method
    log "v2 built with method $method (e2fsck rc=$rc)"
}

if [[ ! -d base-root ]]; then
    log "debootstrap $VARIANT $SUITE +$BASE_PKGS from $MIRROR (a few minutes)"
    rm -rf --one-file-system base-root.tmp
    local_variant=()
    [[ $VARIANT == default ]] || local_variant=(--variant="$VARIANT")
    debootstrap "${local_variant[@]}" --include="$BASE_PKGS" "$SUITE" base-root.tmp "$MIRROR" >&2
    rm -rf base-root.tmp/var/cache/apt/archives/*.deb
    mv base-root.tmp base-root
fi
if [[ ! -f base.raw ]]; then
    log "mkfs.ext4 -d base-root -> base.raw ($IMG_SIZE)"
    mkfs_image base-root base.raw.tmp
    mv base.raw.tmp base.raw
fi
if [[ ! -d v2-root || ! -f v2.raw || base.raw -nt v2.raw ]]; then
    log "building v2 (+ $EXTRA_PKGS)"
    rm -rf --one-file-system v2-root v2.raw
    build_v2
    mv v2-root.tmp v2-root
    mv v2.raw.tmp v2.raw
fi
log "done in $((SECONDS - T0)) s"
summary
