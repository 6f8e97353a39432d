#!/usr/bin/env bash
# notify -> websocket connected, and rotation switchover: p50/p95 over N runs (default 20).
# One stack (embedded broker, emulator, agent process in release build) serves every run;
# each run opens a tunnel, waits for the agent's websocket, rotates the destination token,
# waits for the agent to reconnect with the new token, and closes the tunnel.
set -euo pipefail
cd "$(dirname "$0")/.."
runs="${1:-20}"
cargo build --release --workspace --bins >&2
echo "machine: $(nproc) cores, $(uname -m), $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2- | xargs)"
target/release/securetunnel-demo latency "$runs"
