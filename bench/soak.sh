#!/usr/bin/env bash
# The long run of issue 21: the agent process (debug build, as the tests run it) against the
# emulator and mosquitto through SOAK_CYCLES tunnel open/rotate/close cycles (default 2,000),
# ten byte-checked local connections each. Prints RSS and descriptors every cycles/20 and
# fails if, from the 10% mark to the end, RSS grew by 1 MiB or descriptors by 5, or a
# session file was left. Needs what ./test.sh installs (mosquitto, the venv).
#   bench/soak.sh [CYCLES]
set -euo pipefail
cd "$(dirname "$0")/.."
export PATH="$PATH:/usr/sbin:/sbin"
export SOAK_CYCLES="${1:-${SOAK_CYCLES:-2000}}"
cargo test --locked --all-features --test peers resilience::a_long_run_of_tunnels_and_connections_leaks_nothing \
    -- --nocapture 2>&1 | grep -E '^soak:|test result|panicked|grew'
