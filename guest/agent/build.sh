#!/usr/bin/env bash
# Builds the smolvm guest agent as a static Linux binary and prints its path.
#
#   guest/agent/build.sh                          # host triple (x86_64-unknown-linux-gnu here)
#   guest/agent/build.sh x86_64-unknown-linux-musl
#   guest/agent/build.sh aarch64-unknown-linux-gnu  # needs that target and a cross linker
#
# glibc targets link statically with +crt-static; the agent makes no NSS calls (getpwnam,
# getaddrinfo...), which static glibc cannot serve. The output is in
# target/agent/<triple>/release/smolvm-agent (CARGO_TARGET_DIR overrides target/agent).
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
root="$(cd "$here/../.." && pwd)"
target="${1:-$(rustc -vV | sed -n 's/^host: //p')}"
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$root/target/agent}"
export RUSTFLAGS="${RUSTFLAGS:-} -C target-feature=+crt-static"

cargo build --release --locked --manifest-path "$here/Cargo.toml" --target "$target" >&2
bin="$CARGO_TARGET_DIR/$target/release/smolvm-agent"
if command -v file >/dev/null 2>&1; then
    file "$bin" >&2
fi
echo "$bin"
