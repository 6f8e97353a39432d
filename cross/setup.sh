#!/usr/bin/env bash
# Installs what cross builds need, idempotently: Rust std for the targets (rustup), Debian's
# cross C compilers (ring's C and assembly; the glibc targets link with them) and qemu-user.
#   cross/setup.sh [TARGET...]     default: the two targets CI builds
set -euo pipefail
cd "$(dirname "$0")/.."
targets=("${@:-aarch64-unknown-linux-musl armv7-unknown-linux-gnueabihf}")
read -r -a targets <<< "${targets[*]}"
packages=(qemu-user)
for t in "${targets[@]}"; do
    case "$t" in
        aarch64-*) packages+=(gcc-aarch64-linux-gnu) ;;
        armv7-*) packages+=(gcc-arm-linux-gnueabihf) ;;
        *) echo "cross/setup.sh: unknown target $t" >&2; exit 2 ;;
    esac
done
missing=()
for p in "${packages[@]}"; do dpkg -s "$p" >/dev/null 2>&1 || missing+=("$p"); done
as_root() {
    if [ "$(id -u)" -eq 0 ]; then "$@"
    elif command -v sudo >/dev/null; then sudo "$@"
    else echo "cross/setup.sh: run as root or install sudo to install: $*" >&2; return 1
    fi
}
if [ "${#missing[@]}" -gt 0 ]; then
    as_root env DEBIAN_FRONTEND=noninteractive apt-get update -qq
    as_root env DEBIAN_FRONTEND=noninteractive apt-get -o DPkg::Lock::Timeout=900 install -y -qq "${missing[@]}" >/dev/null
fi
installed="$(rustup target list --installed)"
for t in "${targets[@]}"; do
    if [ "$t" = armv7-unknown-linux-musleabihf ]; then
        # rustup's std for this target is not reachable here: build std from source and
        # link against zig's musl.
        rustup component list --installed | grep -q '^rust-src' || rustup component add rust-src >/dev/null
        [ -x .venv/bin/python ] || python3 -m venv .venv
        .venv/bin/python -c "import ziglang" 2>/dev/null || .venv/bin/pip install -q ziglang
        continue
    fi
    # The other musl targets build std from source too (cross/build.sh: smaller), and link
    # against rustup's musl (its self-contained objects come with the target).
    case "$t" in *-musl*) rustup component list --installed | grep -q '^rust-src' || rustup component add rust-src >/dev/null ;; esac
    grep -qx "$t" <<< "$installed" || rustup target add "$t" >/dev/null
done
