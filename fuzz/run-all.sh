#!/usr/bin/env bash
# Runs every smolvm fuzz target (or the ones named as arguments) for FUZZ_SECONDS seconds each
# (default 60), starting from the checked-in seeds in fuzz/seeds/<target>/, and fails if any
# target finds a crash, a failed assertion, a leak, a hang or an out-of-memory input.
#
#   fuzz/run-all.sh                      # all targets, 60 s each
#   FUZZ_SECONDS=30 fuzz/run-all.sh cmdline
#   fuzz/run-all.sh ioapic legacy_pio    # just the guest-facing device targets
#
# Targets (all of `cargo fuzz list`): legacy_pio, ioapic, kernel_loader, cmdline, virtqueue,
# disk_overlay, virtio_mmio, virtio_blk, agent_protocol, virtio_net, virtio_vsock.
#
# The working corpus lives in fuzz/corpus/<target>/ (git-ignored; it grows between runs) and
# crashing inputs in fuzz/artifacts/<target>/. Needs a nightly toolchain (rustup) and
# cargo-fuzz; both are installed when missing.
set -euo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")"
seconds=${FUZZ_SECONDS:-60}
# A single input taking longer than this (seconds) counts as a hang.
timeout=${FUZZ_TIMEOUT:-25}

if ! cargo +nightly --version >/dev/null 2>&1; then
    echo "==> installing the nightly toolchain (cargo-fuzz needs it for the sanitizers)"
    rustup toolchain install nightly --profile minimal
fi
if ! cargo fuzz --version >/dev/null 2>&1; then
    echo "==> installing cargo-fuzz"
    cargo install cargo-fuzz --locked
fi

if [ "$#" -gt 0 ]; then
    targets=("$@")
else
    mapfile -t targets < <(cargo +nightly fuzz list)
fi

echo "==> building ${targets[*]}"
for t in "${targets[@]}"; do
    cargo +nightly fuzz build "$t"
done

failed=()
for t in "${targets[@]}"; do
    corpus="corpus/$t"
    mkdir -p "$corpus"
    if [ -d "seeds/$t" ]; then
        cp -n "seeds/$t"/* "$corpus"/ 2>/dev/null || true
    fi
    echo "==> fuzzing $t for ${seconds}s"
    if ! cargo +nightly fuzz run "$t" "$corpus" -- \
        -max_total_time="$seconds" -rss_limit_mb=2048 -timeout="$timeout" -print_final_stats=1; then
        echo "!!! $t failed; reproduce with: cargo +nightly fuzz run $t fuzz/artifacts/$t/<file>" >&2
        failed+=("$t")
    fi
done

if [ "${#failed[@]}" -gt 0 ]; then
    echo "==> FAILED: ${failed[*]}" >&2
    exit 1
fi
echo "==> all ${#targets[@]} targets ran ${seconds}s without a finding"
