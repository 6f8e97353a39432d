#!/usr/bin/env bash
# Fuzzes every parser that takes input from the network or a file, with libFuzzer (cargo fuzz),
# for at least RUNS executions each (default 1,000,000), and prints the counts. Seeds are in
# fuzz/seeds/<target>; what the fuzzer finds goes to a scratch corpus, crashes to
# fuzz/artifacts/<target> (turn each into a unit test).
#   fuzz/run.sh [RUNS] [TARGET...]
# Needs cargo-fuzz (cargo install cargo-fuzz). Built without a sanitizer (-s none) so the
# stable toolchain builds it (RUSTC_BOOTSTRAP=1 for libFuzzer's flags); Rust code is memory
# safe, so what is sought is panics, hangs and unbounded allocation (-rss_limit_mb).
set -euo pipefail
cd "$(dirname "$0")"
runs="${1:-1000000}"; shift || true
targets=("${@:-frames notify config handshake_response}")
read -r -a targets <<< "${targets[*]}"
command -v cargo-fuzz >/dev/null || { echo "fuzz: cargo install cargo-fuzz first" >&2; exit 2; }
export RUSTC_BOOTSTRAP=1
cargo fuzz build -s none >&2
work="$(mktemp -d)"; trap 'rm -rf "$work"' EXIT
printf '%-20s %12s %10s\n' target executions seconds
for t in "${targets[@]}"; do
    mkdir -p "$work/$t"
    start=$(date +%s)
    out="$(cargo fuzz run -s none "$t" "$work/$t" "seeds/$t" -- -runs="$runs" -rss_limit_mb=512 \
        -max_len=65536 -timeout=10 2>&1)" || { echo "$out" | tail -40 >&2; echo "fuzz: $t FAILED" >&2; exit 1; }
    done_line="$(grep -o 'Done [0-9]* runs' <<< "$out" | tail -n 1)"
    printf '%-20s %12s %10s\n' "$t" "${done_line//[^0-9]/}" "$(( $(date +%s) - start ))"
done
