#!/usr/bin/env bash
# Builds smolvm's minimal microVM guest kernel (Linux 6.1 LTS) from a config fragment and
# prints the output directory on stdout (everything else goes to stderr).
#
#   guest/kernel/build.sh [x86_64|aarch64]          # default: x86_64
#   guest/kernel/build.sh --check-config [ARCH]     # olddefconfig + option check only
#
# Output: $SMOLVM_CACHE/kernel/<arch>-<key>/{vmlinux, bzImage (x86_64) | Image (aarch64),
#         config, source}   ($SMOLVM_CACHE defaults to ~/.cache/smolvm)
# where <key> = sha256(source identity, arch, config fragment, this script). A second run
# with the same inputs builds nothing and prints the same directory.
#
# Kernel source, first that applies:
#   1. $SMOLVM_KERNEL_SOURCE: a linux-6.1 tarball or an extracted source directory;
#   2. kernel.org's linux-$SMOLVM_KERNEL_VERSION.tar.xz (default below), verified against
#      the sha256 in kernel.org's sha256sums.asc; reused from the download cache when
#      already there; skipped when kernel.org does not answer within a few seconds or
#      SMOLVM_KERNEL_OFFLINE=1;
#   3. Debian's linux-source-6.1 package (/usr/src/linux-source-6.1.tar.xz), installed with
#      apt-get when missing (as root).
# Tarballs are extracted once into $SMOLVM_CACHE/kernel/src/<tarball sha256>/ and built
# out of tree (O=), so all configurations share one source tree.
#
# Environment: SMOLVM_CACHE, SMOLVM_KERNEL_SOURCE, SMOLVM_KERNEL_VERSION,
# SMOLVM_KERNEL_OFFLINE=1, SMOLVM_KERNEL_JOBS (default: nproc), SMOLVM_VERBOSE=1 (full
# make output instead of a progress line every 30 s), CROSS_COMPILE (default
# aarch64-linux-gnu- / x86_64-linux-gnu- when the target is not the host's architecture).
# Needs: make, gcc, bc, bison, flex, libelf-dev, xz-utils, curl (for kernel.org), sha256sum.
set -euo pipefail
# The whole script is one { ...; exit; } block: bash parses it completely before running it,
# so editing this file while a (long) build runs cannot derail that build.
{

# The kernel.org stable release to fetch when it is reachable (Debian 12's linux-source-6.1
# is 6.1.192 too at the time of writing, so both sources give the same kernel).
DEFAULT_KERNEL_VERSION=6.1.192
KERNEL_ORG=https://cdn.kernel.org/pub/linux/kernel/v6.x

start=$SECONDS
log() { echo "kernel: [$((SECONDS - start))s] $*" >&2; }
die() { echo "kernel: error: $*" >&2; exit 1; }

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
check_only=0
if [ "${1:-}" = "--check-config" ]; then
    check_only=1
    shift
fi
arch="${1:-x86_64}"
case "$arch" in
    x86_64) karch=x86_64; image=arch/x86/boot/bzImage; image_name=bzImage; cross_default=x86_64-linux-gnu- ;;
    aarch64 | arm64) arch=aarch64; karch=arm64; image=arch/arm64/boot/Image; image_name=Image; cross_default=aarch64-linux-gnu- ;;
    *) die "unknown architecture '$arch' (expected x86_64 or aarch64)" ;;
esac
fragment="$here/microvm-$arch.config"
[ -f "$fragment" ] || die "missing config fragment $fragment"

cache="${SMOLVM_CACHE:-${HOME:-/tmp}/.cache/smolvm}/kernel"
mkdir -p "$cache/dl" "$cache/src"

for tool in make gcc bc bison flex tar xz sha256sum; do
    command -v "$tool" >/dev/null ||
        die "'$tool' not found; install: apt-get install build-essential bc bison flex libelf-dev xz-utils"
done

# Runs apt-get install for the given packages when we are root, else says what to install.
apt_install() {
    if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
        log "installing $* with apt-get"
        apt-get install -y -qq "$@" >&2 || { apt-get update -qq >&2 && apt-get install -y -qq "$@" >&2; } ||
            die "apt-get install $* failed"
    else
        die "missing $*: install it (apt-get install $*)"
    fi
}

# --- Source ------------------------------------------------------------------------------
# Sets src_tar (a verified tarball) or src_dir (a ready source tree), and src_id.
src_tar=""
src_dir=""
src_id=""

kernel_org_tarball() {
    local version="${SMOLVM_KERNEL_VERSION:-$DEFAULT_KERNEL_VERSION}"
    local name="linux-$version.tar.xz"
    local dest="$cache/dl/$name"
    if [ -f "$dest" ] && [ -f "$dest.sha256" ]; then
        # Re-verify: a cached file is only trusted if it still matches its recorded sum.
        if [ "$(sha256sum "$dest" | cut -d' ' -f1)" = "$(cat "$dest.sha256")" ]; then
            src_tar="$dest"
            src_id="kernel.org $name sha256=$(cat "$dest.sha256")"
            log "source: cached kernel.org tarball $dest"
            return 0
        fi
        log "cached $dest does not match its sha256; fetching it again"
        rm -f "$dest" "$dest.sha256"
    fi
    [ "${SMOLVM_KERNEL_OFFLINE:-0}" = 1 ] && return 1
    command -v curl >/dev/null || { log "curl not found: not trying kernel.org"; return 1; }
    local sums
    if ! sums="$(curl -fsSL --connect-timeout 5 --max-time 30 "$KERNEL_ORG/sha256sums.asc" 2>/dev/null)"; then
        log "kernel.org unreachable (no answer within 5 s)"
        return 1
    fi
    local sum
    sum="$(printf '%s\n' "$sums" | awk -v n="$name" '$2 == n { print $1 }')"
    [[ "$sum" =~ ^[0-9a-f]{64}$ ]] || die "kernel.org's sha256sums.asc lists no $name (set SMOLVM_KERNEL_VERSION)"
    # Download to a temporary name in the same directory; only a verified file is renamed
    # into place, so an interrupted or corrupted download never looks like a cached one.
    dl_tmp="$dest.part.$$"
    trap 'rm -f "$dl_tmp" "$dl_tmp.sha256"' EXIT
    log "downloading $KERNEL_ORG/$name"
    curl -fL --connect-timeout 10 --retry 3 --progress-bar -o "$dl_tmp" "$KERNEL_ORG/$name" ||
        die "download of $name failed"
    local got
    got="$(sha256sum "$dl_tmp" | cut -d' ' -f1)"
    [ "$got" = "$sum" ] || die "$name: sha256 $got does not match kernel.org's $sum"
    echo "$sum" >"$dl_tmp.sha256"
    mv "$dl_tmp" "$dest"
    mv "$dl_tmp.sha256" "$dest.sha256"
    trap - EXIT
    log "verified sha256 $sum"
    src_tar="$dest"
    src_id="kernel.org $name sha256=$sum"
}

debian_tarball() {
    local t=/usr/src/linux-source-6.1.tar.xz
    if [ ! -f "$t" ]; then
        apt_install linux-source-6.1
    fi
    [ -f "$t" ] || die "$t missing after installing linux-source-6.1"
    local version
    version="$(dpkg-query -W -f '${Version}' linux-source-6.1 2>/dev/null || echo unknown)"
    log "source: Debian linux-source-6.1 $version ($t); hashing it"
    # The package's files are checked by apt (signed Release -> Packages -> .deb); the hash
    # here identifies the tarball for the cache key.
    src_tar="$t"
    src_id="debian linux-source-6.1 $version sha256=$(sha256sum "$t" | cut -d' ' -f1)"
}

if [ -n "${SMOLVM_KERNEL_SOURCE:-}" ]; then
    if [ -d "$SMOLVM_KERNEL_SOURCE" ]; then
        [ -f "$SMOLVM_KERNEL_SOURCE/Makefile" ] || die "SMOLVM_KERNEL_SOURCE=$SMOLVM_KERNEL_SOURCE has no Makefile"
        src_dir="$(cd "$SMOLVM_KERNEL_SOURCE" && pwd)"
        # A directory is identified by its path and version, not its contents: rebuild with
        # a fresh SMOLVM_CACHE after editing it.
        src_id="directory $src_dir $(make -s -C "$src_dir" kernelversion 2>/dev/null)"
        log "source: directory $src_dir"
    elif [ -f "$SMOLVM_KERNEL_SOURCE" ]; then
        src_tar="$SMOLVM_KERNEL_SOURCE"
        src_id="tarball sha256=$(sha256sum "$src_tar" | cut -d' ' -f1)"
        log "source: tarball $src_tar"
    else
        die "SMOLVM_KERNEL_SOURCE=$SMOLVM_KERNEL_SOURCE is neither a file nor a directory"
    fi
elif ! kernel_org_tarball; then
    log "falling back to Debian's linux-source-6.1 package"
    debian_tarball
fi

if [ -n "$src_tar" ]; then
    tar_sum="${src_id##*sha256=}"
    src_root="$cache/src/$tar_sum"
    # Concurrent runs (parallel tests) extract once: the first takes the lock, the others
    # wait for it and find the tree complete.
    exec 9>"$src_root.lock"
    command -v flock >/dev/null && flock 9
    if [ ! -f "$src_root/.complete" ]; then
        log "extracting $src_tar into $src_root (once; 10-60 s)"
        rm -rf "$src_root" "$src_root.tmp.$$"
        mkdir -p "$src_root.tmp.$$"
        trap 'rm -rf "$src_root.tmp.$$"' EXIT
        nice -n 19 tar -xJf "$src_tar" -C "$src_root.tmp.$$"
        touch "$src_root.tmp.$$/.complete"
        mv "$src_root.tmp.$$" "$src_root"
        trap - EXIT
        log "extracted"
    fi
    exec 9>&-
    # The tarball holds one top-level directory (linux-6.1.N/ or linux-source-6.1/).
    src_dir="$(find "$src_root" -mindepth 1 -maxdepth 1 -type d | head -n1)"
    [ -f "$src_dir/Makefile" ] || die "no kernel source tree in $src_root"
fi
log "kernel $(make -s -C "$src_dir" kernelversion 2>/dev/null) from $src_dir"

# --- Toolchain ---------------------------------------------------------------------------
make_args=(ARCH="$karch")
host_arch="$(uname -m)"
if [ "$host_arch" != "$arch" ]; then
    cross="${CROSS_COMPILE:-$cross_default}"
    if ! command -v "${cross}gcc" >/dev/null; then
        apt_install "gcc-${cross%-}"
    fi
    make_args+=(CROSS_COMPILE="$cross")
    log "cross-compiling with ${cross}gcc"
fi

# --- Configure -----------------------------------------------------------------------------
# Checks every option the fragment sets against a .config; prints the mismatches.
check_config() {
    local config="$1" bad=0 line sym want got
    while IFS= read -r line; do
        if [[ "$line" =~ ^(CONFIG_[A-Za-z0-9_]+)=(.*)$ ]]; then
            sym="${BASH_REMATCH[1]}"
            want="${BASH_REMATCH[2]}"
        elif [[ "$line" =~ ^#\ (CONFIG_[A-Za-z0-9_]+)\ is\ not\ set$ ]]; then
            sym="${BASH_REMATCH[1]}"
            want=n
        else
            continue
        fi
        got="$(sed -n "s/^$sym=\(.*\)$/\1/p" "$config")"
        [ -n "$got" ] || got=n
        if [ "$got" != "$want" ]; then
            echo "kernel: option $sym: fragment says $want, .config has $got" >&2
            bad=1
        fi
    done <"$fragment"
    return "$bad"
}

# make allnoconfig with the fragment forced in, then olddefconfig; checks the result.
configure() {
    local out="$1"
    mkdir -p "$out"
    make -s -C "$src_dir" O="$out" "${make_args[@]}" KCONFIG_ALLCONFIG="$fragment" allnoconfig >&2
    make -s -C "$src_dir" O="$out" "${make_args[@]}" olddefconfig >&2
    if ! check_config "$out/.config"; then
        die "the fragment $fragment does not survive olddefconfig (see above)"
    fi
    log "all $(grep -cE '^(CONFIG_|# CONFIG_.* is not set)' "$fragment") options of $(basename "$fragment") hold after olddefconfig"
}

if [ "$check_only" = 1 ]; then
    tmp_out="$(mktemp -d "${TMPDIR:-/tmp}/smolvm-kconfig.XXXXXX")"
    trap 'rm -rf "$tmp_out"' EXIT
    configure "$tmp_out"
    exit 0
fi

key="$(printf '%s\n%s\n' "$src_id" "$arch" | cat - "$fragment" "${BASH_SOURCE[0]}" | sha256sum | cut -c1-16)"
dest="$cache/$arch-$key"
if [ -f "$dest/$image_name" ] && [ -f "$dest/vmlinux" ]; then
    log "cached: $dest"
    echo "$dest"
    exit 0
fi

build="$cache/build/$arch-$key"
log "configuring in $build"
rm -rf "$build"
configure "$build"

jobs="${SMOLVM_KERNEL_JOBS:-$(nproc)}"
log "building vmlinux + $image_name with make -j$jobs at nice 19 (about 8 minutes on 2 cores)"
logfile="$build/build.log"
targets=(vmlinux "$image_name")
if [ "${SMOLVM_VERBOSE:-0}" = 1 ]; then
    nice -n 19 make -C "$src_dir" O="$build" "${make_args[@]}" -j"$jobs" "${targets[@]}" 2>&1 | tee "$logfile" >&2
    status=${PIPESTATUS[0]}
else
    nice -n 19 make -C "$src_dir" O="$build" "${make_args[@]}" -j"$jobs" "${targets[@]}" >"$logfile" 2>&1 &
    make_pid=$!
    # Progress: a line every 30 s with the number of objects compiled so far.
    while kill -0 "$make_pid" 2>/dev/null; do
        for _ in $(seq 30); do
            kill -0 "$make_pid" 2>/dev/null || break
            sleep 1
        done
        if kill -0 "$make_pid" 2>/dev/null; then
            log "building... $(grep -c '^  CC ' "$logfile" || true) files compiled"
        fi
    done
    status=0
    wait "$make_pid" || status=$?
fi
if [ "$status" != 0 ]; then
    tail -n 40 "$logfile" >&2
    die "make failed (exit $status); full log: $logfile"
fi

# Publish atomically: copy into a temporary directory next to the destination, rename.
rm -rf "$dest.tmp.$$"
mkdir -p "$dest.tmp.$$"
cp "$build/vmlinux" "$build/$image" "$build/.config" "$dest.tmp.$$/"
mv "$dest.tmp.$$/.config" "$dest.tmp.$$/config"
echo "$src_id" >"$dest.tmp.$$/source"
rm -rf "$dest"
mv "$dest.tmp.$$" "$dest"
# The object tree is 100+ MB and not needed once the images are out.
rm -rf "$build"

log "done in $((SECONDS - start))s: $dest"
log "  vmlinux    $(stat -c %s "$dest/vmlinux") bytes"
log "  $image_name $(stat -c %s "$dest/$image_name") bytes"
echo "$dest"
exit 0
}
