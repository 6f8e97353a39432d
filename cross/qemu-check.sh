#!/usr/bin/env bash
# Runs ARM binaries under qemu-user: --version, check-config on the example config, and a
# sha256-checked transfer through the emulator with the ARM binary as destination (and
# source), driven by the local-proxy demo.
#   cross/qemu-check.sh TARGET BINARY DEMO
set -euo pipefail
target="${1:?target}"; binary="$(realpath "${2:?binary}")"; demo="$(realpath "${3:?securetunnel-demo}")"
case "$target" in
    aarch64-*-musl) qemu=(qemu-aarch64) ;;      # static: no -L (see cross/README.md)
    aarch64-*) qemu=(qemu-aarch64 -L /usr/aarch64-linux-gnu) ;;
    armv7-*-musleabihf) qemu=(qemu-arm) ;;
    armv7-*) qemu=(qemu-arm -L /usr/arm-linux-gnueabihf) ;;
    *) echo "qemu-check: unknown target $target" >&2; exit 2 ;;
esac
work="$(mktemp -d)"; trap 'rm -rf "$work"' EXIT
printf '#!/bin/sh\nexec %s %s "$@"\n' "${qemu[*]}" "$binary" > "$work/agent"
chmod +x "$work/agent"

"$work/agent" --version | grep -q "^securetunnel-agent " || { echo "qemu-check: --version failed" >&2; exit 1; }
sed 's/^# thing_name =/thing_name =/' config/agent.toml > "$work/agent.toml"
out="$("$work/agent" check-config --config "$work/agent.toml" 2>&1)" && { echo "qemu-check: check-config accepted missing files" >&2; exit 1; }
grep -q "mqtt.cert" <<< "$out" || { echo "qemu-check: check-config output: $out" >&2; exit 1; }
# The static builds cannot load a PKCS#11 module: a token key is refused, naming the .debs.
sed 's|^key = .*|key = "pkcs11:token=gw;object=device?module-path=/usr/lib/x.so\&pin-source=file:/etc/pin"|' \
    "$work/agent.toml" > "$work/token.toml"
out="$("$work/agent" check-config --config "$work/token.toml" 2>&1)" && { echo "qemu-check: a PKCS#11 key was accepted" >&2; exit 1; }
{ grep -q "built without PKCS#11 support" <<< "$out" && grep -q "install the glibc .deb" <<< "$out"; } \
    || { echo "qemu-check: the PKCS#11 refusal: $out" >&2; exit 1; }
SECURETUNNEL_DEMO_AGENT="$work/agent" "$demo" local-proxy 8
echo "qemu-check: $target passed"
