#!/usr/bin/env bash
# Every release artefact: static musl binaries for aarch64 and armv7 (OpenWrt and old-glibc
# gateways), glibc binaries for aarch64 and armv7 (Debian), .debs for amd64/arm64/armhf and
# .ipks for aarch64_generic/arm_cortex-a7, into dist/. Prints a size table.
set -euo pipefail
cd "$(dirname "$0")/.."
all=(aarch64-unknown-linux-musl armv7-unknown-linux-musleabihf aarch64-unknown-linux-gnu armv7-unknown-linux-gnueabihf)
cross/setup.sh "${all[@]}"
command -v cargo-deb >/dev/null || cargo install --locked --quiet cargo-deb
rm -rf dist && mkdir -p dist
cross/build.sh "${all[@]}" > /dev/null
for t in "${all[@]}"; do cp "target/$t/release/securetunnel-agent" "dist/securetunnel-agent-$t"; done
cargo deb --locked --output dist/ > /dev/null
for t in aarch64-unknown-linux-gnu armv7-unknown-linux-gnueabihf; do
    cargo deb --locked --no-build --target "$t" --output dist/ > /dev/null
done
packaging/openwrt/build-ipk.sh target/aarch64-unknown-linux-musl/release/securetunnel-agent aarch64_generic dist > /dev/null
packaging/openwrt/build-ipk.sh target/armv7-unknown-linux-musleabihf/release/securetunnel-agent arm_cortex-a7 dist > /dev/null
printf '%-60s %10s\n' artefact bytes
for f in dist/*; do printf '%-60s %10s\n' "${f#dist/}" "$(stat -c %s "$f")"; done
