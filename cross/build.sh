#!/usr/bin/env bash
# Release device binaries (no test tooling) for ARM gateways; prints each binary's path.
# x86_64-unknown-linux-musl is the benchmarks' stand-in for the ARM musl builds, built alike.
#   cross/build.sh [TARGET...]
# musl targets are fully static, linked by rust-lld against the musl that rustup ships;
# glibc targets link with Debian's cross gcc. ring's C code is compiled by the cross gcc.
set -euo pipefail
cd "$(dirname "$0")/.."
targets=("${@:-aarch64-unknown-linux-musl armv7-unknown-linux-gnueabihf}")
read -r -a targets <<< "${targets[*]}"
for t in "${targets[@]}"; do
    var="$(tr 'a-z-' 'A-Z_' <<< "$t")"
    case "$t" in
        aarch64-*) gcc=aarch64-linux-gnu-gcc ;;
        armv7-*) gcc=arm-linux-gnueabihf-gcc ;;
        x86_64-*-musl) gcc=gcc ;;
        *) echo "cross/build.sh: unknown target $t" >&2; exit 2 ;;
    esac
    case "$t" in
        *-musl*) linker=rust-lld ;;
        *) linker="$gcc" ;;
    esac
    extra=()
    # The glibc builds (the .debs) can load a PKCS#11 module: keys in a TPM or HSM. A static
    # musl binary has no dynamic loader, so it leaves the feature out (and refuses such keys).
    case "$t" in *-gnu*) extra+=(--features pkcs11) ;; esac
    envs=("CC_${t//-/_}=$gcc" "CARGO_TARGET_${var}_LINKER=$linker")
    # Identical code folding: generic code instantiated alike many times is kept once
    # (28 KiB off the aarch64 binary, which must stay within 2.5 MiB). No unwind tables
    # (std's too, built below): the release profile aborts on panic, so nothing unwinds and
    # only backtraces lose them (drop this with panic=unwind).
    # Panic messages without file:line (-Z location-detail=none, through RUSTC_BOOTSTRAP as
    # the armv7 build's std already is): 60 KiB; the message itself stays, and a panic
    # aborts either way.
    # std from source (rust-src) with these flags and in the same LTO, without its
    # `backtrace` feature: a stripped binary cannot name frames anyway, so the symbolizer
    # (gimli, addr2line, miniz, demangling) only took room. 485 KiB off the aarch64 binary.
    if [ "$linker" = rust-lld ]; then
        envs+=("RUSTC_BOOTSTRAP=1"
            "CARGO_TARGET_${var}_RUSTFLAGS=-C link-arg=--icf=all -C force-unwind-tables=no -Z location-detail=none")
        extra=(-Zbuild-std=std,panic_abort -Zbuild-std-features=)
    fi
    if [ "$t" = armv7-unknown-linux-musleabihf ]; then
        # std from source (rust-src), musl and linking from zig: see cross/README.md.
        envs=("RUSTC_BOOTSTRAP=1" "ZIG_TARGET=arm-linux-musleabihf" "CC_${t//-/_}=$PWD/cross/zig-cc"
              "CARGO_TARGET_${var}_LINKER=$PWD/cross/zig-cc" "CARGO_TARGET_${var}_RUSTFLAGS=-C link-self-contained=no")
        extra=(-Zbuild-std=std,panic_abort)
    fi
    env "${envs[@]}" cargo build --locked --release --target "$t" "${extra[@]}" \
        --bin securetunnel-agent >&2
    echo "target/$t/release/securetunnel-agent"
done
