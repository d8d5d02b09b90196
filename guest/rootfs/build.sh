#!/usr/bin/env bash
# Builds smolvm's guest root file system, an ext4 image with the guest agent and an init that
# starts it, without root privileges (mkfs.ext4 -d), and prints the image's path on stdout
# (everything else goes to stderr).
#
#   guest/rootfs/build.sh [x86_64|aarch64]        # default: the host's architecture
#
# Output: $SMOLVM_CACHE/rootfs/<arch>-<variant>-<key>/{rootfs.ext4, manifest}
# ($SMOLVM_CACHE defaults to ~/.cache/smolvm), where <variant> is `alpine` or `busybox` and
# <key> = sha256(base identity, agent binary, init, this script). Cached: a second run with
# the same inputs prints the same path without building.
#
# Base system, first that applies:
#   1. Alpine Linux's official minirootfs (version and sha256 pinned below), from the
#      download cache or from the Alpine CDN (5 s connect timeout), verified before use;
#   2. when the mirror is unreachable or SMOLVM_ROOTFS_OFFLINE=1: a busybox system from
#      Debian's busybox-static package, announced with a "FALLBACK:" line; its
#      /etc/os-release says ID=smolvm-busybox.
#      (A checksum mismatch on the Alpine download is an error, never a reason to fall back.)
# Both get: /sbin/smolvm-agent (from guest/agent/build.sh, or $SMOLVM_AGENT_BIN), /sbin/init
# = guest/rootfs/init (mounts, console, starts the agent, powers off when it exits),
# /etc/smolvm-rootfs (what was built from what).
#
# Environment: SMOLVM_CACHE, SMOLVM_ROOTFS_OFFLINE=1, SMOLVM_ROOTFS_SIZE_MIB (default 128;
# the image is a sparse file), SMOLVM_AGENT_BIN (a prebuilt static agent), SMOLVM_BUSYBOX
# (a static busybox for the fallback; needed for a foreign architecture).
# Needs: mkfs.ext4 + debugfs (e2fsprogs >= 1.43), tar, gzip, sha256sum, curl (for Alpine),
# busybox-static (fallback), cargo (to build the agent).
set -euo pipefail
# The whole script is one { ...; exit; } block: bash parses it completely before running it,
# so editing this file while a (long) build runs cannot derail that build.
{

ALPINE_VERSION=3.20.3
ALPINE_BRANCH=v3.20
ALPINE_MIRROR="${SMOLVM_ALPINE_MIRROR:-https://dl-cdn.alpinelinux.org/alpine}"
declare -A ALPINE_SHA256=(
    [x86_64]=d4e6fd67dcf75e40c451560ac7265166c2b72a0f38ddc9aae756a7de3d1efa0c
    [aarch64]=041fa34a81788242df9e78fa69b97ab45b8ec47ddbf88864755610414a7bf3de
)
# Fixed timestamps (files and file system) so the same inputs give the same image.
EPOCH=1700000000

start=$SECONDS
log() { echo "rootfs: [$((SECONDS - start))s] $*" >&2; }
die() { echo "rootfs: error: $*" >&2; exit 1; }

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
root="$(cd "$here/../.." && pwd)"
arch="${1:-$(uname -m)}"
case "$arch" in
    x86_64) ;;
    aarch64 | arm64) arch=aarch64 ;;
    *) die "unknown architecture '$arch' (expected x86_64 or aarch64)" ;;
esac

export PATH="$PATH:/usr/sbin:/sbin"
for tool in mkfs.ext4 debugfs tar gzip sha256sum find; do
    command -v "$tool" >/dev/null || die "'$tool' not found; install: apt-get install e2fsprogs tar gzip coreutils findutils"
done

cache="${SMOLVM_CACHE:-${HOME:-/tmp}/.cache/smolvm}/rootfs"
mkdir -p "$cache/dl"
work="$(mktemp -d "${TMPDIR:-/tmp}/smolvm-rootfs.XXXXXX")"
trap 'rm -rf "$work"' EXIT

sha256() { sha256sum "$1" | cut -d' ' -f1; }

# --- The agent ---------------------------------------------------------------------------
if [ -n "${SMOLVM_AGENT_BIN:-}" ]; then
    agent="$SMOLVM_AGENT_BIN"
    [ -x "$agent" ] || die "SMOLVM_AGENT_BIN=$agent is not an executable file"
else
    log "building the guest agent (guest/agent/build.sh $arch-unknown-linux-gnu)"
    agent="$(nice -n 19 "$root/guest/agent/build.sh" "$arch-unknown-linux-gnu")" ||
        die "building the agent failed (a foreign architecture needs 'rustup target add $arch-unknown-linux-gnu' and a cross linker, or set SMOLVM_AGENT_BIN)"
fi
log "agent: $agent ($(stat -c %s "$agent") bytes)"

# --- The base system -----------------------------------------------------------------------
# Fetches the pinned Alpine minirootfs into the download cache; returns 1 when the mirror
# cannot be reached. Only a verified file is ever renamed into the cache.
alpine_tarball() {
    local name="alpine-minirootfs-$ALPINE_VERSION-$arch.tar.gz"
    local want="${ALPINE_SHA256[$arch]}"
    alpine_tar="$cache/dl/$name"
    if [ -f "$alpine_tar" ]; then
        if [ "$(sha256 "$alpine_tar")" = "$want" ]; then
            log "Alpine $ALPINE_VERSION: cached $alpine_tar (sha256 verified)"
            return 0
        fi
        log "cached $alpine_tar does not match the pinned sha256; fetching it again"
        rm -f "$alpine_tar"
    fi
    [ "${SMOLVM_ROOTFS_OFFLINE:-0}" = 1 ] && { log "SMOLVM_ROOTFS_OFFLINE=1: not trying the Alpine mirror"; return 1; }
    command -v curl >/dev/null || { log "curl not found: not trying the Alpine mirror"; return 1; }
    local url="$ALPINE_MIRROR/$ALPINE_BRANCH/releases/$arch/$name"
    local part="$work/$name.part"
    log "downloading $url"
    if ! curl -fsSL --connect-timeout 5 --max-time 300 -o "$part" "$url"; then
        log "Alpine mirror unreachable ($url)"
        return 1
    fi
    local got
    got="$(sha256 "$part")"
    [ "$got" = "$want" ] || die "$name: sha256 $got does not match the pinned $want (refusing to use it)"
    # Same file system as the cache (a temporary name there), then an atomic rename.
    cp "$part" "$alpine_tar.part.$$"
    mv "$alpine_tar.part.$$" "$alpine_tar"
    log "Alpine $ALPINE_VERSION: downloaded, sha256 verified"
}

# busybox_applets BUSYBOX: its applets (`--list-full`). A foreign-architecture busybox cannot
# run here: then the host's busybox of the same version lists them (Debian builds both from
# one configuration), else a fixed list of the applets init and the agent need.
busybox_applets() {
    local bb=$1 host want version=""
    if "$bb" --list-full 2>/dev/null; then
        return 0
    fi
    want="$(grep -a -o -m1 'BusyBox v[0-9][^ ]* ([^)]*)' "$bb" | head -n1 || true)"
    host="$(command -v busybox || true)"
    [ -n "$host" ] && version="$("$host" 2>&1 | head -n1 || true)"
    if [ -n "$want" ] && [ "${version:-}" != "${version#*"$want"}" ]; then
        log "$bb cannot run here: applet list from $host ($want)"
        "$host" --list-full
        return 0
    fi
    log "$bb cannot run here: installing a fixed list of applets"
    printf '%s\n' bin/sh bin/ash bin/cat bin/cp bin/dd bin/echo bin/grep bin/hostname bin/ls \
        bin/mkdir bin/mount bin/mv bin/ping bin/rm bin/sleep bin/sync bin/umount bin/uname \
        sbin/ifconfig sbin/ip sbin/poweroff sbin/reboot sbin/halt usr/bin/env usr/bin/head \
        usr/bin/id usr/bin/seq usr/bin/setsid usr/bin/sha256sum usr/bin/tail usr/bin/tr
}

# Prints the path of a static busybox for $arch.
find_busybox() {
    local bb="${SMOLVM_BUSYBOX:-}"
    if [ -z "$bb" ]; then
        [ "$arch" = "$(uname -m)" ] ||
            die "the busybox fallback for $arch needs SMOLVM_BUSYBOX=<a static $arch busybox> (e.g. from busybox-static:arm64)"
        if ! dpkg-query -W -f '${Status}' busybox-static 2>/dev/null | grep -q 'ok installed'; then
            if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
                log "installing busybox-static with apt-get"
                apt-get install -y -qq busybox-static >&2 ||
                    die "apt-get install busybox-static failed"
            else
                die "the fallback needs Debian's busybox-static: apt-get install busybox-static (or set SMOLVM_BUSYBOX)"
            fi
        fi
        bb="$(dpkg -L busybox-static | grep -m1 '/bin/busybox$')" || die "busybox-static lists no /bin/busybox"
    fi
    [ -x "$bb" ] || die "$bb is not executable"
    if command -v readelf >/dev/null && readelf -l "$bb" 2>/dev/null | grep -q INTERP; then
        die "$bb is dynamically linked; the guest has no libraries: install busybox-static"
    fi
    echo "$bb"
}

stage="$work/stage"
mkdir -p "$stage"
alpine_tar=""
if alpine_tarball; then
    variant=alpine
    base_id="alpine-minirootfs $ALPINE_VERSION $arch sha256=${ALPINE_SHA256[$arch]}"
else
    variant=busybox
    busybox="$(find_busybox)"
    bb_version="$(dpkg-query -W -f '${Version}' busybox-static 2>/dev/null || echo unknown)"
    base_id="busybox-static $bb_version sha256=$(sha256 "$busybox")"
    echo "rootfs: ================================================================" >&2
    echo "rootfs: FALLBACK: busybox rootfs (Alpine mirror unreachable)" >&2
    echo "rootfs:   base: Debian busybox-static $bb_version ($busybox)" >&2
    echo "rootfs: ================================================================" >&2
fi

key="$(
    {
        printf '%s\n%s\nagent sha256=%s\n' "$arch" "$base_id" "$(sha256 "$agent")"
        cat "$here/init" "${BASH_SOURCE[0]}"
        echo "size=${SMOLVM_ROOTFS_SIZE_MIB:-128}"
    } | sha256sum | cut -c1-16
)"
dest="$cache/$arch-$variant-$key"
if [ -f "$dest/rootfs.ext4" ]; then
    log "cached: $dest/rootfs.ext4 ($variant)"
    echo "$dest/rootfs.ext4"
    exit 0
fi

# --- Staging tree ------------------------------------------------------------------------------
if [ "$variant" = alpine ]; then
    log "unpacking Alpine $ALPINE_VERSION minirootfs"
    # -p keeps modes (setuid bbsuid) for a non-root user too; owners are fixed in the image.
    tar -xzpf "$alpine_tar" -C "$stage" --no-same-owner
    os_name="Alpine Linux $ALPINE_VERSION (smolvm)"
else
    log "assembling the busybox tree"
    for d in bin sbin usr/bin usr/sbin etc root proc sys dev tmp run var/log mnt; do
        mkdir -p "$stage/$d"
    done
    chmod 1777 "$stage/tmp"
    chmod 0700 "$stage/root"
    install -m 0755 "$busybox" "$stage/bin/busybox"
    # One symlink per applet, where busybox says it lives (bin/sh, sbin/poweroff, ...).
    while IFS= read -r applet; do
        applet="${applet#/}"
        if [ -z "$applet" ] || [ "$applet" = bin/busybox ] || [ -L "$stage/$applet" ]; then
            continue
        fi
        mkdir -p "$stage/$(dirname "$applet")"
        ln -s /bin/busybox "$stage/$applet"
    done < <(busybox_applets "$busybox")
    printf 'root:x:0:0:root:/root:/bin/sh\nnobody:x:65534:65534:nobody:/:/bin/false\n' >"$stage/etc/passwd"
    printf 'root:x:0:\nnobody:x:65534:\n' >"$stage/etc/group"
    printf '127.0.0.1\tlocalhost\n::1\tlocalhost\n' >"$stage/etc/hosts"
    cat >"$stage/etc/os-release" <<EOF
NAME="smolvm busybox fallback"
ID=smolvm-busybox
PRETTY_NAME="smolvm busybox fallback rootfs (Debian busybox-static $bb_version; built because the Alpine mirror was unreachable)"
VERSION_ID="$bb_version"
EOF
    os_name="smolvm busybox fallback (busybox-static $bb_version)"
fi
echo smolvm >"$stage/etc/hostname"
# Alpine's /sbin/init is a symlink to busybox init: replace it with ours.
rm -f "$stage/sbin/init"
install -m 0755 "$here/init" "$stage/sbin/init"
install -m 0755 "$agent" "$stage/sbin/smolvm-agent"
mkdir -p "$stage/etc/smolvm/rc.d"
cat >"$stage/etc/smolvm-rootfs" <<EOF
variant=$variant
arch=$arch
base=$base_id
agent_sha256=$(sha256 "$agent")
init=/sbin/init (guest/rootfs/init)
key=$key
EOF
find "$stage" -exec touch -h -d "@$EPOCH" {} +

# --- Image ---------------------------------------------------------------------------------
size_mib="${SMOLVM_ROOTFS_SIZE_MIB:-128}"
image="$work/rootfs.ext4"
log "mkfs.ext4 -d: ${size_mib} MiB image, $(du -sk "$stage" | cut -f1) KiB of files"
# Fixed UUID and directory-hash seed (from the key) and fake time: reproducible images.
uuid="$(echo "$key" | sha256sum | sed -E 's/^(.{8})(.{4}).(.{3}).(.{3})(.{12}).*/\1-\2-4\3-8\4-\5/')"
# 4 KiB blocks (mke2fs would pick 1 KiB for a "small" image): fewer, larger virtio-blk requests.
E2FSPROGS_FAKE_TIME="$EPOCH" mkfs.ext4 -q -F -b 4096 -L smolvm-root -U "$uuid" \
    -E "root_owner=0:0,hash_seed=$uuid" -d "$stage" "$image" "${size_mib}M" >&2 ||
    die "mkfs.ext4 -d failed (needs e2fsprogs >= 1.43)"

# A debugfs pass over every inode:
# - owners: mkfs.ext4 -d copies the staged files' owners; built as an ordinary user they
#   would belong to that user inside the guest. Every inode goes to root instead;
# - atime/ctime/crtime: mkfs.ext4 copies the staged atimes (which reading the staging tree
#   updates) and stamps ctime/crtime with the current time (touch cannot set ctime); fixing
#   them makes the image depend on its inputs only.
log "normalizing owners and timestamps (debugfs)"
set_owner=0
[ "$(id -u)" != 0 ] && set_owner=1
(cd "$stage" && find . -mindepth 1 -printf '/%P\n'; echo /) | while IFS= read -r p; do
    for field in atime ctime crtime; do
        printf 'sif "%s" %s @%s\n' "$p" "$field" "$EPOCH"
    done
    if [ "$set_owner" = 1 ]; then
        printf 'sif "%s" uid 0\nsif "%s" gid 0\n' "$p" "$p"
    fi
done >"$work/fixup.debugfs"
printf 'sif /lost+found ctime @%s\nsif /lost+found crtime @%s\n' "$EPOCH" "$EPOCH" >>"$work/fixup.debugfs"
E2FSPROGS_FAKE_TIME="$EPOCH" debugfs -w -f "$work/fixup.debugfs" "$image" >/dev/null 2>&1 ||
    die "debugfs could not normalize the image"

# Check what the guest needs is there before publishing.
for f in /sbin/init /sbin/smolvm-agent /etc/os-release /bin/sh; do
    debugfs -R "stat $f" "$image" 2>/dev/null | grep -q '^Inode:' || die "$f missing from the image"
done

cat >"$work/manifest" <<EOF
$(cat "$stage/etc/smolvm-rootfs")
os=$os_name
size_mib=$size_mib
image_sha256=$(sha256 "$image")
EOF
mkdir -p "$cache"
rm -rf "$dest.tmp.$$"
mkdir "$dest.tmp.$$"
cp --sparse=always "$image" "$work/manifest" "$dest.tmp.$$/"
rm -rf "$dest"
mv "$dest.tmp.$$" "$dest"

log "done in $((SECONDS - start))s: $dest/rootfs.ext4 ($variant: $os_name; $(du -k "$dest/rootfs.ext4" | cut -f1) KiB used of ${size_mib} MiB)"
if [ "$variant" = busybox ]; then
    echo "rootfs: FALLBACK: busybox rootfs (Alpine mirror unreachable) -> $dest/rootfs.ext4" >&2
fi
echo "$dest/rootfs.ext4"
exit 0
}
