#!/usr/bin/env bash
# smolvm's end-to-end suite: a real Linux guest with its own virtio drivers, driven through
# smolvm's public API. One command:
#
#   guest/e2e/run.sh                         # aarch64 guest, smolvm inside an emulated arm64
#                                            # machine (QEMU TCG, "L1") with nested KVM
#   guest/e2e/run.sh --direct                # on an aarch64 host with hardware KVM
#   guest/e2e/run.sh --arch x86_64 --direct  # on an x86_64 host with hardware KVM; prints
#                                            # SKIPPED and exits 0 where Linux cannot boot
#
# Prints one `PASS <check>` / `FAIL <check>: why` line per check and `DATA <name> <value>`
# lines (timings), then `E2E: PASSED|FAILED ...`; exits non-zero on any failure.
# See guest/e2e/README.md for what runs where, the cache layout and the durations.
#
# Environment: SMOLVM_CACHE (default ~/.cache/smolvm; everything downloaded or built outside
# target/ goes under $SMOLVM_CACHE/e2e), SMOLVM_E2E_QEMU_TIMEOUT (seconds, default 900),
# SMOLVM_E2E_BOOT_TIMEOUT (per L2 boot, seconds, default 240), SMOLVM_E2E_OUT (where logs go,
# default target/e2e-out), SMOLVM_E2E_SMP (L1 CPUs, default 2), SMOLVM_E2E_IGNORE_PROBE=1
# (--direct: run even where smolvm::probe() says Linux cannot boot, to test the asset builds),
# SMOLVM_E2E_L2_KERNEL (an arm64 Image / x86 kernel to boot instead of Debian's),
# SMOLVM_E2E_TARGET_DIR (cargo target dir of the runner and agent, default target/e2e-<arch>).
# With SMOLVM_E2E_L2_KERNEL set, the suite also boots guest/rootfs/build.sh's root file system
# (check rootfs.boot; SMOLVM_ROOTFS_OFFLINE defaults to 1 here: the busybox variant, from
# Debian's busybox-static; SMOLVM_ROOTFS_OFFLINE=0 tries Alpine first).
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
root="$(cd "$here/../.." && pwd)"
cd "$root"

arch=aarch64
direct=0
while [ $# -gt 0 ]; do
    case "$1" in
        --arch) arch="${2:?--arch needs a value}"; shift 2 ;;
        --arch=*) arch="${1#--arch=}"; shift ;;
        --direct) direct=1; shift ;;
        -h|--help) sed -n '2,22p' "${BASH_SOURCE[0]}"; exit 0 ;;
        *) echo "run.sh: unknown argument '$1'" >&2; exit 2 ;;
    esac
done
case "$arch" in
    aarch64) debarch=arm64 triple=aarch64-unknown-linux-gnu ;;
    x86_64) debarch=amd64 triple=x86_64-unknown-linux-gnu ;;
    *) echo "run.sh: --arch must be aarch64 or x86_64" >&2; exit 2 ;;
esac
host_arch="$(uname -m)"
if [ "$direct" = 0 ] && [ "$arch" != aarch64 ]; then
    echo "run.sh: only the aarch64 suite runs under emulation; use --arch x86_64 --direct on an x86_64 host with hardware KVM" >&2
    exit 2
fi
if [ "$direct" = 1 ] && [ "$arch" != "$host_arch" ]; then
    echo "run.sh: --direct runs the guest on this host's KVM: --arch $arch needs an $arch host (this is $host_arch)" >&2
    exit 2
fi
# Native build when the runner runs on this host; a cross build for L1 otherwise.
cross=0
[ "$arch" != "$host_arch" ] && cross=1

export DEBIAN_FRONTEND=noninteractive
cache="${SMOLVM_CACHE:-${HOME:-/tmp}/.cache/smolvm}/e2e"
out="${SMOLVM_E2E_OUT:-$root/target/e2e-out}"
mkdir -p "$cache/debs" "$cache/build" "$out"
t_start=$EPOCHREALTIME
SUDO=()
[ "$(id -u)" != 0 ] && SUDO=(sudo)

elapsed() { awk -v a="$1" -v b="$EPOCHREALTIME" 'BEGIN { printf "%.1f", b - a }'; }
log() { echo "[e2e $(elapsed "$t_start")s] $*" >&2; }
die() { echo "E2E: FAILED: $*"; exit 1; }
timed() { # NAME CMD...: runs CMD, logs its duration
    local name=$1 t=$EPOCHREALTIME
    shift
    "$@"
    log "$name: $(elapsed "$t")s"
    echo "DATA setup.$name $(elapsed "$t")s" >>"$out/setup-data"
}
: >"$out/setup-data"

# --- 1. packages ---------------------------------------------------------------------------
installed() { dpkg-query -W -f='${Status}' "$1" 2>/dev/null | grep -q 'install ok installed'; }

install_packages() {
    local want=(cpio e2fsprogs kmod xz-utils zstd)
    if [ "$cross" = 1 ]; then
        want+=(gcc-aarch64-linux-gnu libc6-dev-arm64-cross rustc-web cargo-web)
    fi
    [ "$direct" = 0 ] && want+=(qemu-system-arm)
    local missing=() p
    for p in "${want[@]}"; do installed "$p" || missing+=("$p"); done
    local std_missing=0
    if [ "$cross" = 1 ] && ! installed "libstd-rust-web-dev:$debarch"; then std_missing=1; fi
    if [ "$debarch" != "$(dpkg --print-architecture)" ] &&
        ! dpkg --print-foreign-architectures | grep -qx "$debarch"; then
        log "dpkg --add-architecture $debarch"
        "${SUDO[@]}" dpkg --add-architecture "$debarch"
        "${SUDO[@]}" apt-get update -qq
    elif [ ${#missing[@]} -gt 0 ] || [ $std_missing = 1 ]; then
        "${SUDO[@]}" apt-get update -qq
    fi
    if [ ${#missing[@]} -gt 0 ]; then
        log "installing ${missing[*]}"
        nice "${SUDO[@]}" apt-get install -y -qq "${missing[@]}" >&2
    fi
    if [ $std_missing = 1 ]; then
        log "installing libstd-rust-web-dev:$debarch"
        nice "${SUDO[@]}" apt-get install -y -qq --no-install-recommends \
            "libstd-rust-web-dev:$debarch" >&2
    fi
    # The kernel meta-package must be resolvable for the foreign architecture.
    if ! apt-cache policy "linux-image-$debarch:$debarch" 2>/dev/null | grep -q 'Candidate: [0-9]'; then
        "${SUDO[@]}" apt-get update -qq
    fi
}

# --- 2. Debian packages, cached by version -------------------------------------------------
# fetch_deb PACKAGE:ARCH -> prints the directory the package is unpacked in
fetch_deb() {
    local pkg=$1 version dir
    version="$(apt-cache policy "$pkg" 2>/dev/null | sed -n 's/^ *Candidate: //p' | head -n1)"
    [ -n "$version" ] && [ "$version" != "(none)" ] || die "apt-cache knows no version of $pkg"
    dir="$cache/debs/${pkg%%:*}_${version//:/%3a}_${pkg##*:}"
    if [ ! -e "$dir/.done" ]; then
        log "downloading $pkg $version"
        rm -rf "$dir" && mkdir -p "$dir"
        local apt_opts=(-q)
        [ "$(id -u)" = 0 ] && apt_opts+=(-o APT::Sandbox::User=root)
        (cd "$dir" && apt-get download "${apt_opts[@]}" "$pkg=$version" >&2) ||
            die "apt-get download $pkg=$version failed"
        dpkg-deb -x "$dir"/*.deb "$dir/root"
        rm -f "$dir"/*.deb
        echo "$pkg $version" >"$dir/.done"
    fi
    echo "$dir"
}

resolve_kernel_package() {
    apt-cache depends "linux-image-$debarch:$debarch" 2>/dev/null |
        sed -n "s/^ *Depends: \(linux-image-[0-9][^ ]*-$debarch\)\(:$debarch\)\?\$/\1/p" | head -n1
}

fetch_packages() {
    local kpkg
    kpkg="${SMOLVM_E2E_KERNEL_PACKAGE:-$(resolve_kernel_package)}"
    [ -n "$kpkg" ] || die "cannot resolve linux-image-$debarch:$debarch (run apt-get update)"
    kdir="$(fetch_deb "$kpkg:$debarch")"
    bbdir="$(fetch_deb "busybox-static:$debarch")"
    kernel_image="$(ls "$kdir"/root/boot/vmlinuz-* | head -n1)"
    l1_kernel="$kernel_image" # the emulated machine (L1) always runs Debian's kernel
    kver="${kernel_image##*/vmlinuz-}"
    # SMOLVM_E2E_L2_KERNEL: boot another guest kernel instead (e.g. the microVM kernel from
    # guest/kernel/build.sh, whose drivers are built in: the modules then fail to load,
    # harmlessly, and the checks run against the built-in drivers).
    if [ -n "${SMOLVM_E2E_L2_KERNEL:-}" ]; then
        kernel_image="$SMOLVM_E2E_L2_KERNEL"
        log "L2 kernel: $kernel_image (SMOLVM_E2E_L2_KERNEL)"
    fi
    moddir="$kdir/root/lib/modules/$kver"
    [ -d "$moddir" ] || die "no modules in $kdir for $kver"
    # The package ships no modules.dep (the installer runs depmod): make one.
    if [ ! -s "$moddir/modules.dep" ]; then
        depmod -b "$kdir/root" "$kver" || die "depmod failed"
    fi
    log "kernel $kpkg ($kver), $(cat "$bbdir/.done")"
}

# --- 3. binaries: the runner and the guest agent ------------------------------------------
build_binaries() {
    local tdir="${SMOLVM_E2E_TARGET_DIR:-$root/target/e2e-$arch}"
    if [ "$cross" = 1 ]; then
        # Debian's toolchain: it has the arm64 standard library (rustup here has not).
        local linker_var
        linker_var="CARGO_TARGET_$(echo "$triple" | tr 'a-z-' 'A-Z_')_LINKER"
        env PATH="/usr/bin:$PATH" RUSTC=/usr/bin/rustc "$linker_var=aarch64-linux-gnu-gcc" \
            RUSTFLAGS="-C target-feature=+crt-static" \
            nice /usr/bin/cargo build -q --release --manifest-path guest/e2e/runner/Cargo.toml \
            --target "$triple" --target-dir "$tdir" >&2
        env PATH="/usr/bin:$PATH" RUSTC=/usr/bin/rustc "$linker_var=aarch64-linux-gnu-gcc" \
            RUSTFLAGS="-C target-feature=+crt-static" \
            nice /usr/bin/cargo build -q --release --locked --manifest-path guest/agent/Cargo.toml \
            --target "$triple" --target-dir "$tdir/agent" >&2
    else
        RUSTFLAGS="-C target-feature=+crt-static" nice cargo build -q --release \
            --manifest-path guest/e2e/runner/Cargo.toml --target "$triple" --target-dir "$tdir" >&2
        RUSTFLAGS="-C target-feature=+crt-static" nice cargo build -q --release --locked \
            --manifest-path guest/agent/Cargo.toml --target "$triple" --target-dir "$tdir/agent" >&2
    fi
    runner_bin="$tdir/$triple/release/smolvm-e2e"
    agent_bin="$tdir/agent/$triple/release/smolvm-agent"
    [ -x "$runner_bin" ] && [ -x "$agent_bin" ] || die "build produced no binaries"
}

# --- 4. guest assets: L2 initramfs, disk images -------------------------------------------
# mod_closure NAME... -> module paths (relative to $moddir), dependencies first, built-ins left out
mod_closure() {
    awk -v want="$*" '
        function base(p,  b) { b = p; sub(/.*\//, "", b); sub(/\.ko(\.(xz|zst|gz))?$/, "", b); gsub(/-/, "_", b); return b }
        function add(m,  n, i, d) {
            if (m in seen) return
            seen[m] = 1
            n = split(deps[m], d, " ")
            for (i = n; i >= 1; i--) add(d[i])
            order[++count] = m
        }
        { p = $1; sub(/:$/, "", p); byname[base(p)] = p; deps[p] = ""; for (i = 2; i <= NF; i++) deps[p] = deps[p] " " $i }
        END {
            n = split(want, w, " ")
            for (i = 1; i <= n; i++) { k = w[i]; gsub(/-/, "_", k); if (k in byname) add(byname[k]) }
            for (i = 1; i <= count; i++) print order[i]
        }' "$moddir/modules.dep"
}

# copy_modules DEST NAME... : copies the modules (decompressed) to DEST/lib/modules and writes
# DEST/etc/modules.load with them in load order
copy_modules() {
    local dest=$1 m f
    shift
    mkdir -p "$dest/lib/modules" "$dest/etc"
    : >"$dest/etc/modules.load"
    for m in $(mod_closure "$@"); do
        f="$(basename "$m")"
        case "$f" in
            *.ko.xz) xz -dc "$moddir/$m" >"$dest/lib/modules/${f%.xz}"; f="${f%.xz}" ;;
            *.ko.zst) zstd -qdc "$moddir/$m" >"$dest/lib/modules/${f%.zst}"; f="${f%.zst}" ;;
            *.ko.gz) gzip -dc "$moddir/$m" >"$dest/lib/modules/${f%.gz}"; f="${f%.gz}" ;;
            *) cp "$moddir/$m" "$dest/lib/modules/$f" ;;
        esac
        echo "$f" >>"$dest/etc/modules.load"
    done
}

install_busybox() { # DEST: busybox plus /bin/sh; the init scripts run `busybox --install -s`
    local dest=$1
    mkdir -p "$dest/bin" "$dest/sbin" "$dest/usr/bin" "$dest/usr/sbin"
    cp "$bbdir/root/bin/busybox" "$dest/bin/busybox"
    ln -sf busybox "$dest/bin/sh"
}

mkcpio() { # DIR OUT
    (cd "$1" && find . -mindepth 1 | LC_ALL=C sort | cpio -o -H newc -R 0:0 --quiet) >"$2"
}

L2_MODULES=(virtio_mmio virtio_blk virtio_net vmw_vsock_virtio_transport ext4 crc32c_generic
    crc32c-arm64 crc32c_intel)

# Only a kernel with virtio and ext4 built in (the microVM kernel, SMOLVM_E2E_L2_KERNEL) can
# mount a root file system without an initramfs: the rootfs.boot check needs one.
build_rootfs() {
    rootfs_image=""
    [ -n "${SMOLVM_E2E_L2_KERNEL:-}" ] || return 0
    rootfs_image="$(SMOLVM_AGENT_BIN="$agent_bin" SMOLVM_BUSYBOX="$bbdir/root/bin/busybox" \
        SMOLVM_ROOTFS_OFFLINE="${SMOLVM_ROOTFS_OFFLINE:-1}" \
        SMOLVM_ROOTFS_SIZE_MIB="${SMOLVM_ROOTFS_SIZE_MIB:-32}" \
        nice bash "$root/guest/rootfs/build.sh" "$arch")" || die "guest/rootfs/build.sh failed"
    [ -f "$rootfs_image" ] || die "guest/rootfs/build.sh printed no image ($rootfs_image)"
    log "root file system: $rootfs_image"
}

build_guest_assets() {
    local key
    build_rootfs
    key="$(cat "$runner_bin" "$agent_bin" "$here/init-l2.sh" "$here/run.sh" "$kdir/.done" \
        "$bbdir/.done" "$kernel_image" ${rootfs_image:+"$rootfs_image"} | sha256sum | cut -c1-16)"
    assets="$cache/build/assets-$arch-$key"
    if [ -e "$assets/.done" ]; then
        log "cached guest assets: $assets"
        return
    fi
    rm -rf "$assets" "$assets.tmp" && mkdir -p "$assets.tmp"
    local a="$assets.tmp" r="$assets.tmp/l2root"
    # L2 initramfs
    install_busybox "$r"
    mkdir -p "$r/proc" "$r/sys" "$r/dev" "$r/tmp" "$r/mnt" "$r/sbin" "$r/root"
    cp "$agent_bin" "$r/sbin/smolvm-agent"
    cp "$here/init-l2.sh" "$r/init"
    chmod 755 "$r/init"
    copy_modules "$r" "${L2_MODULES[@]}"
    log "L2 modules: $(tr '\n' ' ' <"$r/etc/modules.load")"
    mkcpio "$r" "$a/initrd"
    rm -rf "$r"
    cp "$kernel_image" "$a/kernel"
    # Disk images: ext4 with a known file, one per disk mode
    mkdir -p "$a/diskroot"
    printf 'hello from the smolvm e2e disk image\n' >"$a/diskroot/hello.txt"
    cp "$a/diskroot/hello.txt" "$a/hello.txt"
    local label
    for label in rw ov ro; do
        mkfs.ext4 -q -F -L "e2e-$label" -O ^has_journal -d "$a/diskroot" "$a/$label.img" 8M >/dev/null
    done
    rm -rf "$a/diskroot"
    if [ -n "$rootfs_image" ]; then
        cp --sparse=always "$rootfs_image" "$a/rootfs.ext4"
    fi
    touch "$a/.done"
    mv "$a" "$assets"
    log "guest assets: $assets ($(du -sh "$assets" | cut -f1))"
}

# --- 5. L1: an initramfs with the runner and the guest assets -----------------------------
build_l1() {
    local key
    local envfile v
    envfile="$(mktemp)"
    # Runner settings travel into L1 as a sourced file.
    for v in SMOLVM_E2E_BOOT_TIMEOUT SMOLVM_E2E_ONLY SMOLVM_E2E_EXTRA_BOOTS SMOLVM_E2E_EXTRA_HALT_PROBE; do
        [ -n "${!v:-}" ] && printf 'export %s=%q\n' "$v" "${!v}" >>"$envfile"
    done
    local rootfs_asset=()
    [ -f "$assets/rootfs.ext4" ] && rootfs_asset=("$assets/rootfs.ext4")
    key="$(cat "$assets/initrd" "$assets/kernel" "$runner_bin" "$here/init-l1.sh" "$envfile" \
        "${rootfs_asset[@]}" | sha256sum | cut -c1-16)"
    l1="$cache/build/l1-$key"
    if [ -e "$l1/.done" ]; then
        rm -f "$envfile"
        log "cached L1 initramfs: $l1"
        return
    fi
    rm -rf "$l1" "$l1.tmp" && mkdir -p "$l1.tmp"
    local r="$l1.tmp/root"
    install_busybox "$r"
    mkdir -p "$r/proc" "$r/sys" "$r/dev" "$r/tmp" "$r/e2e/assets" "$r/sbin"
    cp "$here/init-l1.sh" "$r/init"
    chmod 755 "$r/init"
    cp "$runner_bin" "$r/sbin/smolvm-e2e"
    cp "$envfile" "$r/e2e/env"
    rm -f "$envfile"
    cp "$assets"/{kernel,initrd,rw.img,ov.img,ro.img,hello.txt} "$r/e2e/assets/"
    [ ${#rootfs_asset[@]} -gt 0 ] && cp "${rootfs_asset[0]}" "$r/e2e/assets/rootfs.ext4"
    copy_modules "$r" tun
    mkcpio "$r" "$l1.tmp/initrd"
    rm -rf "$r"
    touch "$l1.tmp/.done"
    mv "$l1.tmp" "$l1"
    log "L1 initramfs: $l1/initrd ($(du -h "$l1/initrd" | cut -f1))"
}

run_l1() {
    local qlog="$out/l1-console.log" rc=0
    log "booting L1 (qemu-system-aarch64 TCG, nested KVM); console: $qlog"
    timeout --foreground -k 10 "${SMOLVM_E2E_QEMU_TIMEOUT:-900}" \
        nice qemu-system-aarch64 -M virt,virtualization=on,gic-version=3 -cpu max -accel tcg \
        -smp "${SMOLVM_E2E_SMP:-2}" -m 3072 -kernel "$l1_kernel" -initrd "$l1/initrd" \
        -append "console=ttyAMA0 rdinit=/init loglevel=4" \
        -nographic -no-reboot -monitor none -serial stdio </dev/null 2>&1 |
        sed -u 's/\r$//' | tee "$qlog" |
        grep --line-buffered -E '^(PASS|FAIL|DATA|SKIPPED|E2E-|SMOLVM-L1)' || rc=$?
    results="$qlog"
}

run_direct() {
    local rlog="$out/runner.log" run="$out/run"
    rm -rf "$run" && mkdir -p "$run"
    cp "$assets"/{kernel,initrd,rw.img,ov.img,ro.img,hello.txt} "$run/"
    [ -f "$assets/rootfs.ext4" ] && cp --sparse=always "$assets/rootfs.ext4" "$run/"
    log "running the suite on this host's KVM"
    timeout -k 10 "${SMOLVM_E2E_QEMU_TIMEOUT:-900}" \
        "$runner_bin" run --assets "$run" --out "$out" 2>"$out/runner.stderr" | tee "$rlog" || true
    results="$rlog"
    if [ "$arch" = x86_64 ]; then
        boot_alpine_flow >>"$rlog"
    fi
}

# The README's first command, end to end (x86_64 hardware KVM): builds or reuses the cached
# microVM kernel and rootfs (guest/kernel, guest/rootfs), boots, waits for the agent, runs
# `cat /etc/os-release`, powers off. Its timeline lines become DATA.
boot_alpine_flow() {
    local blog="$out/boot_alpine.log"
    log "running cargo run --release --example boot_alpine (log: $blog)"
    if timeout -k 10 1800 cargo run --release --example boot_alpine >"$blog" 2>&1 &&
        grep -q '^ID=' "$blog"; then
        echo "PASS boot_alpine.flow"
    else
        echo "FAIL boot_alpine.flow: exit or output wrong (see $blog)"
    fi
    sed -n 's/^  \(VMM set-up done\|kernel: first console output\|init started\|agent ready\) *\([0-9.]*\) ms.*/DATA boot_alpine.\1 \2ms/p' "$blog" |
        tr ' ' '_' | sed 's/^DATA_boot_alpine\./DATA boot_alpine./; s/_\([0-9.]*ms\)$/ \1/'
}

summarise() {
    local f=$1 pass fail
    cat "$out/setup-data"
    pass=$(grep -c '^PASS ' "$f" || true)
    fail=$(grep -c '^FAIL ' "$f" || true)
    if ! grep -q '^E2E-RESULT ' "$f"; then
        echo "FAIL e2e.runner-finished: no E2E-RESULT line (see $f)"
        tail -n 30 "$f" | sed 's/^/  | /'
        fail=$((fail + 1))
    fi
    echo "DATA e2e.total $(elapsed "$t_start")s"
    if [ "$fail" -gt 0 ] || [ "$pass" -eq 0 ]; then
        echo "E2E: FAILED ($pass passed, $fail failed; logs in $out)"
        exit 1
    fi
    echo "E2E: PASSED ($pass checks; logs in $out)"
}

timed packages install_packages
if [ "$direct" = 1 ]; then
    # Build the runner first: on a host that cannot boot Linux, say so and stop.
    timed build build_binaries
    verdict="$("$runner_bin" probe)"
    if [ "$verdict" != OK ] && [ -z "${SMOLVM_E2E_IGNORE_PROBE:-}" ]; then
        echo "$verdict"
        exit 0
    fi
    timed fetch fetch_packages
else
    timed fetch fetch_packages
    timed build build_binaries
fi
timed assets build_guest_assets
if [ "$direct" = 1 ]; then
    timed run run_direct
else
    timed l1-initramfs build_l1
    timed run run_l1
fi
summarise "$results"
