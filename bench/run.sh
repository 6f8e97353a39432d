#!/usr/bin/env bash
# The benchmark suite: prints one table. Builds the workspace in release mode and,
# for the static-build rows, rustup's x86_64 musl target (cross/setup.sh for ARM sizes).
# Comparing two builds in one run (ratios): bench/compare.sh OLD_BIN NEW_BIN.
#   bench/run.sh            results go to stdout; the current table is in docs/performance.md
set -euo pipefail
cd "$(dirname "$0")/.."
log() { echo "bench: $*" >&2; }
log "building (release: the workspace, then the device agent alone; static x86_64 musl agent)"
cargo build --locked --release --workspace --bins >&2
# Built alone last, so target/release/securetunnel-agent has the device's feature set, not the
# one unified with the emulator's.
cargo build --locked --release -p securetunnel-agent >&2
rustup target list --installed | grep -qx x86_64-unknown-linux-musl || rustup target add x86_64-unknown-linux-musl >&2
# cross/build.sh builds std from source for musl targets.
rustup component list --installed | grep -q '^rust-src' || rustup component add rust-src >&2
# Built as the ARM musl binaries are (cross/build.sh).
cross/build.sh x86_64-unknown-linux-musl >/dev/null
demo=target/release/securetunnel-demo
glibc="$PWD/target/release/securetunnel-agent"
musl="$PWD/target/x86_64-unknown-linux-musl/release/securetunnel-agent"

row() { printf '| %-58s | %-40s |\n' "$1" "$2"; }
echo "Machine: $(nproc) cores, $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2- | xargs), $(uname -sr)"
echo
row "measure" "result"
row "---" "---"
for build in glibc musl; do
    bin="${!build}"
    log "throughput and destination CPU, 256 MiB echo ($build)"
    out="$(DEMO_NO_REFRAME=1 SECURETUNNEL_DEMO_AGENT="$bin" "$demo" local-proxy 256)"
    thr="$(grep -o '([0-9.]* MiB/s each way)' <<< "$out" | tr -d '()')"
    cpu="$(grep -o '([0-9.]* s/GiB)' <<< "$out" | tr -d '()')"
    peak="$(grep -o 'peak RSS [0-9.]* MiB' <<< "$out")"
    row "throughput, source+destination through the emulator ($build)" "$thr"
    row "destination CPU per GiB relayed, both directions ($build)" "$cpu"
    row "destination $peak during 256 MiB ($build)" ""
    log "1-way push, 512 MiB, one frame per websocket message ($build as source and destination)"
    out="$(SECURETUNNEL_DEMO_AGENT="$bin" SECURETUNNEL_DEMO_SOURCE="$bin" "$demo" push 512)"
    row "1-way push: destination CPU per GiB ($build)" "$(grep -o 'destination [0-9.]* s/GiB' <<< "$out" | cut -d' ' -f2-)"
    row "1-way push: destination peak RSS ($build)" "$(grep -o 'peak RSS [0-9.]* MiB' <<< "$out" | cut -d' ' -f3-)"
    row "1-way push: source CPU per GiB ($build)" "$(grep -o 'source [0-9.]* s/GiB' <<< "$out" | cut -d' ' -f2-)"
    log "memory ($build)"
    mem="$(SECURETUNNEL_DEMO_AGENT="$bin" "$demo" memory 100)"
    row "agent RSS idle, MQTT + one tunnel ($build)" "$(grep -o 'connected): [0-9.]* MiB' <<< "$mem" | cut -d' ' -f2-)"
    row "extra RSS per idle TCP connection, 100 open ($build)" "$(grep -o '+[0-9.]* KiB per connection' <<< "$mem")"
    row "of the idle RSS, the binary's own pages ($build)" "$(grep -o 'resident [0-9]* KiB' <<< "$mem" | cut -d' ' -f2-)"
    if [ "$build" = musl ]; then musl_mem="$mem"; fi
done
# The gateways' static aarch64 build: qemu-user maps it as a file and its guest touches its
# pages as a CPU would, so its resident pages are measured; the rest of its idle RSS is taken
# to be the x86_64 musl build's (same code, same pointer size), qemu's own memory is not.
# Built here, so it is the same code as the x86_64 build it is set against.
aarch64=target/aarch64-unknown-linux-musl/release/securetunnel-agent
if command -v qemu-aarch64 >/dev/null && cross/build.sh aarch64-unknown-linux-musl >/dev/null; then
    log "memory (static aarch64 under qemu-user)"
    wrapper="$(mktemp)"; trap 'rm -f "$wrapper"' EXIT
    printf '#!/bin/sh\nexec qemu-aarch64 %s "$@"\n' "$(realpath "$aarch64")" > "$wrapper"; chmod +x "$wrapper"
    mem="$(SECURETUNNEL_DEMO_AGENT="$wrapper" SECURETUNNEL_DEMO_AGENT_IMAGE="$(realpath "$aarch64")" "$demo" memory 1)"
    arm_pages="$(grep -o 'resident [0-9]* KiB' <<< "$mem" | awk '{print $2}')"
    x86_pages="$(grep -o 'resident [0-9]* KiB' <<< "$musl_mem" | awk '{print $2}')"
    x86_idle="$(grep -o 'connected): [0-9.]* MiB' <<< "$musl_mem" | awk '{print $2}')"
    row "static aarch64: the binary's own pages when idle (qemu-user)" "$arm_pages KiB"
    row "static aarch64: idle RSS, MQTT + one tunnel (musl idle - its binary pages + these)" \
        "$(awk -v i="$x86_idle" -v x="$x86_pages" -v a="$arm_pages" 'BEGIN{printf "%.2f MiB (estimate)", i - (x - a) / 1024}')"
else
    log "no qemu-aarch64 or no aarch64 build (cross/setup.sh aarch64-unknown-linux-musl): no aarch64 memory rows"
fi
log "latency, 20 runs"
lat="$("$demo" latency 20)"
row "notify -> websocket connected" "$(grep 'notify ->' <<< "$lat" | grep -o 'p50.*ms   p95.*ms' | tr -s ' ')"
row "rotation switchover" "$(grep 'rotation' <<< "$lat" | grep -o 'p50.*ms   p95.*ms' | tr -s ' ')"
log "codec (criterion)"
codec="$(cargo bench --locked --bench codec -- --noplot 2>/dev/null | grep -A2 '^codec/')"
row "codec encode, 64512-byte DATA frames" "$(grep -A2 'encode' <<< "$codec" | grep -o 'thrpt:.*' | awk '{print $4, $5}')"
row "codec decode, frames across websocket messages" "$(grep -A2 'decode' <<< "$codec" | grep -o 'thrpt:.*' | awk '{print $4, $5}')"
for f in target/release/securetunnel-agent target/*-linux-*/release/securetunnel-agent; do
    [ -f "$f" ] || continue
    t="${f#target/}"; t="${t%%/*}"; [ "$t" = release ] && t="x86_64-unknown-linux-gnu"
    row "stripped binary size, $t" "$(stat -c %s "$f") bytes"
done
