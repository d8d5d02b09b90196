#!/usr/bin/env bash
# Fetches Debian 12's generic amd64 kernel for smolvm's real-Linux boot tests
# (tests/linux_boot.rs) and prints the path of its bzImage on stdout.
#
#   guest/linux/fetch-kernel.sh            # -> ~/.cache/smolvm/linux/<version>/vmlinuz
#
# - Resolves the kernel package the `linux-image-amd64` meta-package currently depends on
#   (e.g. linux-image-6.1.0-56-amd64, version 6.1.192-2) with apt-cache.
# - Downloads it with `apt-get download` (no installation, no root needed unless the apt
#   lists are empty, in which case `apt-get update` is run once when we are root).
# - Extracts /boot/vmlinuz-* with `dpkg-deb -x` into
#   ${SMOLVM_CACHE:-$HOME/.cache/smolvm}/linux/<package version>/vmlinuz
#   (plus the kernel's config-* as `config`, for reference).
# - Also extracts the uncompressed vmlinux ELF from the bzImage (scripts/extract-vmlinux's
#   approach, but locating the payload exactly through the setup header's payload_offset /
#   payload_length fields and checking the decompressed size against the size the kernel
#   build appends) into the same folder as `vmlinux`, so the ELF/PVH entry can be tested.
#   Whether that worked is said on stderr; a failure there is not an error.
#
# Cached by package version: a second run downloads nothing and prints the same path.
# Everything but the final path goes to stderr. Needs: apt-get, apt-cache, dpkg-deb, od,
# and for the vmlinux: xz / zstd / gzip / bzip2 / lz4 (whichever the kernel was built with).
set -euo pipefail

log() { echo "fetch-kernel: $*" >&2; }
die() { log "error: $*"; exit 1; }

for tool in apt-cache apt-get dpkg-deb od; do
    command -v "$tool" >/dev/null || die "'$tool' not found: this script needs a Debian-based host"
done

cache_root="${SMOLVM_CACHE:-${HOME:-/tmp}/.cache/smolvm}/linux"

resolve_package() {
    # The meta-package depends on exactly one linux-image-<abi>-amd64.
    apt-cache depends linux-image-amd64 2>/dev/null |
        sed -n 's/^ *Depends: \(linux-image-[0-9][^ ]*-amd64\)$/\1/p' | head -n1 || true
}

pkg="${SMOLVM_KERNEL_PACKAGE:-}"
if [ -z "$pkg" ]; then
    pkg="$(resolve_package)"
fi
if [ -z "$pkg" ] && [ "$(id -u)" = 0 ]; then
    log "apt does not know linux-image-amd64 yet; running 'apt-get update'"
    apt-get update -qq >&2 || true
    pkg="$(resolve_package)"
fi
[ -n "$pkg" ] || die "cannot resolve linux-image-amd64 with apt-cache (is this Debian 12 with \
deb.debian.org in its sources? run 'apt-get update'); or set SMOLVM_LINUX_KERNEL to a bzImage"

version="$(apt-cache policy "$pkg" 2>/dev/null | sed -n "s/^ *Candidate: //p" | head -n1 || true)"
[ -n "$version" ] && [ "$version" != "(none)" ] || die "apt-cache knows no version of $pkg"
# An epoch's ':' is not welcome in paths.
dir="$cache_root/${version//:/%3a}"
kernel="$dir/vmlinuz"

if [ -s "$kernel" ]; then
    log "cached: $pkg $version"
    [ -s "$dir/vmlinux" ] && log "cached vmlinux ELF: $dir/vmlinux"
    echo "$kernel"
    exit 0
fi

mkdir -p "$cache_root"
# Serialise concurrent runs (tests run in parallel processes); re-check once we hold the lock.
exec 9>"$cache_root/.lock"
if command -v flock >/dev/null; then
    flock 9
fi
if [ -s "$kernel" ]; then
    log "fetched meanwhile by another run: $pkg $version"
    echo "$kernel"
    exit 0
fi

work="$(mktemp -d "$cache_root/.work.XXXXXX")"
trap 'rm -rf "$work"' EXIT
# As root, apt-get drops to the _apt user for downloads, which cannot write under a 0700
# $HOME; download as root instead (apt only warns otherwise, but the warning confuses).
apt_opts=(-q)
[ "$(id -u)" = 0 ] && apt_opts+=(-o APT::Sandbox::User=root)

log "downloading $pkg $version"
(cd "$work" && apt-get download "${apt_opts[@]}" "$pkg=$version" >&2) ||
    die "apt-get download $pkg=$version failed (no network or no Debian mirror?)"
deb="$(ls "$work"/*.deb 2>/dev/null | head -n1)"
[ -n "$deb" ] || die "apt-get download produced no .deb"
dpkg-deb -x "$deb" "$work/root"
vmlinuz="$(ls "$work"/root/boot/vmlinuz-* 2>/dev/null | head -n1)"
[ -n "$vmlinuz" ] || die "$pkg contains no /boot/vmlinuz-*"

stage="$work/out"
mkdir -p "$stage"
cp "$vmlinuz" "$stage/vmlinuz"
cp "$work"/root/boot/config-* "$stage/config" 2>/dev/null || true
echo "$pkg $version" >"$stage/package"

# --- vmlinux extraction ------------------------------------------------------------------
# Reads an unsigned little-endian integer of $2 bytes at byte offset $1 of $3.
le() { od -An -t "u$2" -j "$1" -N "$2" "$3" | tr -d ' \n'; }

extract_vmlinux() {
    local img="$1" out="$2"
    local magic proto setup_sects pm_start off len
    magic="$(dd if="$img" bs=1 skip=$((0x202)) count=4 2>/dev/null)"
    [ "$magic" = "HdrS" ] || { log "not a bzImage (no HdrS)"; return 1; }
    proto="$(le $((0x206)) 2 "$img")"
    [ "$proto" -ge $((0x208)) ] || { log "boot protocol $proto < 2.08: no payload fields"; return 1; }
    setup_sects="$(le $((0x1f1)) 1 "$img")"
    [ "$setup_sects" -ne 0 ] || setup_sects=4
    pm_start=$(((setup_sects + 1) * 512))
    off=$((pm_start + $(le $((0x248)) 4 "$img")))
    len="$(le $((0x24c)) 4 "$img")"
    [ "$len" -gt 4 ] || { log "empty payload"; return 1; }
    # The build appends the decompressed size (le32) to the compressed stream.
    local payload="$work/payload" want
    tail -c +$((off + 1)) "$img" | head -c "$len" >"$payload"
    want="$(le $((len - 4)) 4 "$payload")"
    truncate -s $((len - 4)) "$payload"

    local sig cmd
    sig="$(od -An -tx1 -N6 "$payload" | tr -d ' \n')"
    case "$sig" in
        fd377a585a00*) cmd="xz -dc" ;;
        28b52ffd*) cmd="zstd -dc" ;;
        1f8b*) cmd="gzip -dc" ;;
        425a68*) cmd="bzip2 -dc" ;;
        02214c18*) cmd="lz4 -dc" ;;
        5d0000*) cmd="xz --format=lzma -dc" ;;
        894c5a*) cmd="lzop -dc" ;;
        *) log "unknown compression (payload starts with $sig)"; return 1 ;;
    esac
    command -v "${cmd%% *}" >/dev/null || { log "'${cmd%% *}' is not installed"; return 1; }
    $cmd <"$payload" >"$out.tmp" 2>/dev/null || true
    local got
    got="$(stat -c %s "$out.tmp")"
    if [ "$got" != "$want" ]; then
        log "decompressing with '$cmd' gave $got bytes, the image says $want"
        return 1
    fi
    [ "$(od -An -tx1 -N4 "$out.tmp" | tr -d ' \n')" = 7f454c46 ] ||
        { log "decompressed payload is not an ELF"; return 1; }
    mv "$out.tmp" "$out"
    log "extracted vmlinux ELF with '$cmd' ($got bytes, relocations appended after the ELF)"
}

if extract_vmlinux "$stage/vmlinuz" "$stage/vmlinux"; then
    if command -v readelf >/dev/null && readelf -n "$stage/vmlinux" 2>/dev/null | grep -q 'Xen.*0x00000012'; then
        log "vmlinux carries the PVH entry note (XEN_ELFNOTE_PHYS32_ENTRY)"
    fi
else
    rm -f "$stage/vmlinux" "$stage/vmlinux.tmp"
    log "vmlinux extraction FAILED; only the bzImage is available"
fi

rm -rf "$dir"
mv "$stage" "$dir"
log "stored in $dir"
echo "$kernel"
